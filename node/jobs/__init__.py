"""Jobs: created from stable studies, run stage by stage, resumable; one lifecycle owner.

States: ``queued -> running -> done | failed | dead | cancelled``, changed
only by :func:`node.jobs.state.transition` (the table and the retry policy
are in :mod:`node.jobs.state`). The package's parts:

- :mod:`node.jobs.state` -- states, allowed transitions, the retry policy;
- :mod:`node.jobs.scheduler` -- jobs from stable studies, supersede, claim
  order, recovery after a crash, re-score, a job's context;
- :mod:`node.jobs.executor` -- the local process pool and the Ray executor;
- :mod:`node.jobs.worker` -- what runs in a worker: set-up, the GPU lock,
  one job's stages with their checkpoints and error classification.
"""

from __future__ import annotations

from node.jobs.executor import RayRunner, Runner, make_runner
from node.jobs.scheduler import (
    PRIORITY_ORDER,
    Scheduler,
    clinical_path,
    context,
    job_key,
    next_job,
    recover,
    rescore,
)
from node.jobs.state import IllegalTransition, RetryPolicy, transition
from node.jobs.worker import execute

__all__ = [
    "PRIORITY_ORDER",
    "IllegalTransition",
    "RayRunner",
    "RetryPolicy",
    "Runner",
    "Scheduler",
    "clinical_path",
    "context",
    "execute",
    "job_key",
    "make_runner",
    "next_job",
    "recover",
    "rescore",
    "transition",
]
