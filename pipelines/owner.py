"""End a worker process when the process that owns it is gone (``kill -9`` included).

Pool and job workers are children of a multiprocessing forkserver, not of
their owner: after ``kill -9`` of the owner (``serve``, or a job worker killed
for a time-out) nothing tells them, and they would wait on their queue for
ever, or finish a stage that the restarted node runs again. One watchdog for
both kinds: the radiomics pool (:mod:`pipelines.radiomics.extract`) and the
node's job workers (``node.jobs.worker``), which also end their orphaned
forkserver.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time

__all__ = ["watch_owner"]

#: How often the owner is looked for (seconds).
POLL_S = 0.5
#: Exit status of a worker whose owner is gone.
ORPHAN_EXIT = 70


def watch_owner(owner: int, *, end_forkserver: bool = False, name: str = "owner-watchdog") -> None:
    """Start a daemon thread that ends this process once ``owner`` no longer exists.

    With ``end_forkserver`` the parent (the forkserver that made this
    process, unless it is ``owner`` itself or init) is killed first, so no
    orphaned forkserver is left behind either.
    """

    def watch() -> None:
        while True:
            time.sleep(POLL_S)
            try:
                os.kill(owner, 0)
            except ProcessLookupError:
                parent = os.getppid()
                if end_forkserver and parent not in (1, owner):
                    with contextlib.suppress(OSError):
                        os.kill(parent, signal.SIGKILL)
                os._exit(ORPHAN_EXIT)

    threading.Thread(target=watch, name=name, daemon=True).start()
