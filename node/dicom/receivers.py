"""Several Storage SCP processes behind the one DICOM port (``dicom.receivers`` > 1).

One Python process receives at most about one core's worth of C-STOREs: the
GIL serialises pynetdicom's PDU decoding and its two polling threads per
association. With ``dicom.receivers: N`` (or ``auto``: one per CPU) the
``serve`` process binds and listens on the DICOM port itself, then starts N
receiver processes (``spawn``: a fresh interpreter, never a fork of the
threaded parent) that inherit the listening socket and each run their own
:class:`~node.dicom.scp.StorageSCP` (pynetdicom AE, threads, Ingestor and
database engine) accepting from it. Every receiver writes the one index: SQLite
in WAL mode serialises writers across processes (``BEGIN IMMEDIATE``), and
nothing of the index or the audit chain head is cached between transactions,
so audit events from all receivers form one unbroken chain.

What stays node-wide: the transport guard's connection slots live in a
:class:`Ledger` in shared memory (an array of slots, one per admitted
connection, with its receiver's pid, source address and calling AE), behind a
``flock`` on a file, which the kernel releases if its holder is killed. So
``dicom.max_connections_per_ip``, ``dicom.max_associations_per_peer`` and the
total connection limit (``max_associations + max_connections_per_ip``) count
over all receivers. ``dicom.max_associations`` itself is pynetdicom's own
per-AE counter: each receiver enforces it on its own associations, while the
node-wide connection limit bounds the sum (an association needs a connection).

The receivers share the accept queue; a receiver holding more connections than
the least busy live one leaves a waiting connection to it (for at most
:data:`BALANCE_WAIT_S`), so parallel associations spread over the processes.

The parent keeps the scheduler, the outbox and ``/health``, ``/metrics`` (whose
instance counts come from the audit trail in the database, so they include
every receiver's). It audits each receiver's start (``receiver.started``, with
its pid) and unexpected end (``receiver.died``, with its exit code), restarts a
dead one (after a back-off if it dies at once), and on stop sends SIGTERM to
all of them: each refuses new C-STOREs (0xA700), lets its associations finish
within ``dicom.shutdown_grace_s``, aborts the rest, audits
``receiver.stopped`` and exits; one still alive after the grace is killed.
Receivers ask the kernel for SIGKILL when the parent dies (``PR_SET_PDEATHSIG``
on Linux), so a ``kill -9`` of ``serve`` leaves no receiver holding the port and
is the same as today's ``kill -9`` of the one process: nothing unanswered is
kept half-done beyond what the next start's reconcile handles, and no receiver
is still writing while a new ``serve`` reconciles the instance tree.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import fcntl
import logging
import multiprocessing
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from multiprocessing.process import BaseProcess
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from node.dicom.limits import TransportLimits
from node.dicom.transport import Connection, ConnectionRegistry, GuardedAssociationServer

if TYPE_CHECKING:
    from node.config import Settings

log = logging.getLogger(__name__)

#: How long a busier receiver leaves a waiting connection to a less busy one (seconds).
BALANCE_WAIT_S = 0.05
#: A receiver that ends within this many seconds of its start is restarted after a back-off.
QUICK_DEATH_S = 5.0
#: Longest back-off before restarting a receiver that keeps dying (seconds).
MAX_BACKOFF_S = 30.0
_PR_SET_PDEATHSIG = 1
_IP_LEN = 46  # the longest textual IPv6 address, plus NUL
_AE_LEN = 17  # an AE title, plus NUL


class _Slot(ctypes.Structure):
    """One admitted connection: its receiver (0: free), source address, calling AE."""

    _fields_ = [
        ("pid", ctypes.c_int),
        ("ip", ctypes.c_char * _IP_LEN),
        ("ae", ctypes.c_char * _AE_LEN),
    ]


def _ae_bytes(calling_ae: str) -> bytes:
    return calling_ae.encode("latin-1", "replace")[: _AE_LEN - 1]


class Ledger:
    """The node's connection slots, shared by every receiver process.

    Built in the parent and handed to each receiver when it is spawned. The
    array lives in shared memory; a ``flock`` on ``lock_path`` (opened anew in
    each process, and a thread lock within it) guards every read-modify-write,
    and is released by the kernel if the process holding it dies.
    """

    def __init__(self, capacity: int, receivers: int, lock_path: Path) -> None:
        """``capacity``: the node-wide connection limit; ``receivers``: process slots."""
        ctx = multiprocessing.get_context("spawn")
        self.capacity = capacity
        self.lock_path = lock_path
        self._slots: Any = ctx.RawArray(_Slot, capacity)
        self._pids: Any = ctx.RawArray(ctypes.c_int, receivers)
        self._local: threading.Lock | None = None
        self._fd = -1

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_local"], state["_fd"] = None, -1  # opened anew in the receiver
        return state

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        if self._local is None:
            self._local = threading.Lock()
        with self._local:
            if self._fd < 0:
                self._fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(self._fd, fcntl.LOCK_UN)

    def register(self, index: int, pid: int) -> None:
        """Receiver ``index`` runs as ``pid`` (it takes connections from now on)."""
        with self._locked():
            self._pids[index] = pid

    def unregister(self, index: int) -> int:
        """Receiver ``index`` has ended: free its slots; how many it held."""
        with self._locked():
            pid, self._pids[index] = self._pids[index], 0
            if not pid:
                return 0
            freed = 0
            for slot in self._slots:
                if slot.pid == pid:
                    slot.pid, freed = 0, freed + 1
            return freed

    def admit(self, pid: int, ip: str, limits: TransportLimits) -> int | str:
        """A slot for a connection from ``ip`` to receiver ``pid``, or why it is refused."""
        raw = ip.encode("ascii", "replace")[: _IP_LEN - 1]
        with self._locked():
            used = [s for s in self._slots if s.pid]
            if len(used) >= min(limits.max_connections, self.capacity):
                return f"{limits.max_connections} connections open (the node's limit)"
            held = sum(1 for s in used if s.ip == raw)
            if held >= limits.max_connections_per_ip:
                return f"peer {ip} already holds {held} connections (dicom.max_connections_per_ip)"
            index = next(i for i, s in enumerate(self._slots) if not s.pid)
            slot = self._slots[index]
            slot.pid, slot.ip, slot.ae = pid, raw, b""
            return index

    def claim(self, index: int, calling_ae: str, limit: int) -> int | None:
        """Count slot ``index`` as an association of (its address, ``calling_ae``).

        None when it fits under ``limit``, else how many that pair holds node-wide.
        """
        ae = _ae_bytes(calling_ae)
        with self._locked():
            mine = self._slots[index]
            held = sum(
                1
                for i, s in enumerate(self._slots)
                if i != index and s.pid and s.ip == mine.ip and s.ae == ae
            )
            if held >= limit:
                return held
            mine.ae = ae
            return None

    def release(self, indexes: list[int]) -> None:
        """The connections in these slots are over."""
        if not indexes:
            return
        with self._locked():
            for index in indexes:
                self._slots[index].pid = 0

    def loads(self, pid: int) -> tuple[int, int]:
        """(connections ``pid`` holds, fewest any registered receiver holds)."""
        with self._locked():
            counts = {p: 0 for p in self._pids if p}
            for slot in self._slots:
                if slot.pid in counts:
                    counts[slot.pid] += 1
        mine = counts.get(pid, 0)
        return mine, min(counts.values(), default=mine)

    def connections(self) -> int:
        """Connections open on the node (all receivers)."""
        with self._locked():
            return sum(1 for s in self._slots if s.pid)


class SharedRegistry(ConnectionRegistry):
    """The transport guard's registry, its limits counted over every receiver.

    The base class still applies the allow-list and counts this process's own
    connections (never more than the node's); each admitted connection also
    takes a :class:`Ledger` slot, where the node-wide limits are checked.
    """

    def __init__(
        self,
        limits: TransportLimits,
        on_finished: Callable[[Any], None] | None,
        ledger: Ledger,
    ) -> None:
        """As :class:`ConnectionRegistry`, with the node's ``ledger``."""
        super().__init__(limits, on_finished)
        self.ledger = ledger
        self._slot_of: dict[Connection, int] = {}

    def admit(self, ip: str, port: int) -> Connection | str:
        """A slot here and in the ledger, or the reason the connection is refused."""
        verdict = super().admit(ip, port)
        if isinstance(verdict, str):
            return verdict
        slot = self.ledger.admit(os.getpid(), ip, self.limits)
        with self._lock:
            if isinstance(slot, str):
                self._open.remove(verdict)
                return slot
            self._slot_of[verdict] = slot
        return verdict

    def claim_association(self, conn: Connection, calling_ae: str, limit: int) -> int | None:
        """Count ``conn`` against (address, calling AE) over all receivers."""
        with self._lock:
            slot = self._slot_of.get(conn)
        if slot is None:
            return super().claim_association(conn, calling_ae, limit)
        held = self.ledger.claim(slot, calling_ae, limit)
        if held is None:
            conn.calling_ae = calling_ae
        return held

    def sweep(self, now: float) -> list[Any]:
        """As the base class; the ledger slots of released connections are freed."""
        groups = super().sweep(now)
        with self._lock:
            still = set(self._open)
            gone = [c for c in self._slot_of if c not in still]
            slots = [self._slot_of.pop(c) for c in gone]
        self.ledger.release(slots)
        return groups


class ReceiverServer(GuardedAssociationServer):
    """The guarded server on a listening socket it inherited (never binds, never shuts it).

    Build it with ``AE.make_server(..., server_class=ReceiverServer, listener=...,
    ledger=...)`` plus the guard's own arguments.
    """

    def __init__(self, *args: Any, listener: socket.socket, ledger: Ledger, **kwargs: Any) -> None:
        """``listener``: the parent's listening socket; ``ledger``: the node's slots."""
        self._listener = listener
        self.ledger = ledger
        self._declined_since = 0.0
        self._declined_last = 0.0
        super().__init__(*args, **kwargs)
        self.registry = SharedRegistry(self.limits, self.registry.on_finished, ledger)

    def server_bind(self) -> None:
        """Use the inherited socket (non-blocking: the receivers race for each connection)."""
        assert self.socket is not None
        self.socket.close()
        self.socket = self._listener
        self._listener.setblocking(False)
        self.server_address = self._listener.getsockname()

    def server_activate(self) -> None:
        """The parent already listens."""

    def server_close(self) -> None:
        """Close this process's descriptor only: ``shutdown()`` would stop every receiver."""
        if self.socket is not None:
            self.socket.close()

    def get_request(self) -> tuple[socket.socket, Any]:
        """Accept, unless a less busy receiver should take this connection.

        Raises
        ------
        BlockingIOError
            Left to another receiver, or another took it first (socketserver
            ignores an ``OSError`` here and polls again).
        """
        mine, least = self.ledger.loads(os.getpid())
        if mine > least:
            now = time.monotonic()
            if now - self._declined_last > BALANCE_WAIT_S:  # a new wait, not the last one's
                self._declined_since = now
            self._declined_last = now
            if now - self._declined_since < BALANCE_WAIT_S:
                time.sleep(0.002)
                raise BlockingIOError("a less busy receiver takes it")
        return super().get_request()


def receiver_count(setting: int | str) -> int:
    """``dicom.receivers`` as a number of processes (``auto``: one per CPU)."""
    if setting == "auto":
        return max(1, len(os.sched_getaffinity(0)))
    return int(setting)


def listen(bind: str, port: int, backlog: int) -> socket.socket:
    """The DICOM port's listening socket, made once by the parent (an error names it)."""
    family = socket.AF_INET6 if ":" in bind else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((bind, port))
        sock.listen(backlog)
    except OSError:
        sock.close()
        raise
    return sock


def _die_with_parent(parent: int) -> None:
    """Ask for SIGKILL when the parent dies (Linux); exit if it is already gone."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:
        os._exit(0)


def receiver_main(
    index: int, settings: Settings, listener: socket.socket, ledger: Ledger, parent: int
) -> None:
    """A receiver process: its own StorageSCP on ``listener`` until SIGTERM, then drain.

    Runs in a spawned interpreter. Exit status 0 after a drain; anything else
    is an unexpected end the parent audits and restarts.
    """
    _die_with_parent(parent)
    stop = threading.Event()

    def _signal(_signum: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _signal)
    signal.signal(signal.SIGINT, _signal)
    from node.logs import setup_logging

    setup_logging(settings.logging.level, settings.logging.file)
    scp, db, ingestor = _build_scp(settings, listener, ledger)
    scp.start()
    ledger.register(index, os.getpid())
    log.info("receiver %d (pid %d) accepting on port %d", index, os.getpid(), settings.dicom.port)
    while not stop.wait(1.0):
        pass
    started = time.monotonic()
    ingestor.closing.set()
    open_assocs, aborted = scp.drain(settings.dicom.shutdown_grace_s)
    from node.audit.trail import record

    with db.session() as s:
        record(
            s,
            "receiver.stopped",
            actor="node",
            detail={
                "receiver": index,
                "pid": os.getpid(),
                "associations_open": open_assocs,
                "associations_aborted": aborted,
                "seconds": round(time.monotonic() - started, 2),
            },
        )
    db.dispose()


def _build_scp(settings: Settings, listener: socket.socket, ledger: Ledger) -> tuple[Any, Any, Any]:
    """(StorageSCP, Database, Ingestor) of one receiver, on the inherited ``listener``."""
    from node.audit.context import AuditContext
    from node.db.session import Database
    from node.delivery import commitment_report
    from node.dicom.scp import StorageSCP
    from node.store.files import InstanceFiles
    from node.store.ingest import Ingestor, IngestPolicy

    db = Database(
        settings.database_url,
        echo=settings.database.echo,
        audit=AuditContext.from_settings(settings),
    )
    files = InstanceFiles(settings.storage.root, fsync=settings.storage.fsync)
    ingestor = Ingestor(
        db,
        files,
        min_free_mb=settings.storage.min_free_mb,
        policy=IngestPolicy.from_settings(settings),
    )

    def on_commitment(
        transaction: str, committed: list[str], failed: dict[str, int], actor: str
    ) -> int:
        return commitment_report(
            db, transaction, committed, failed, actor=actor, policy=settings.delivery
        )

    scp = StorageSCP(settings.dicom, db, ingestor, on_commitment=on_commitment)
    scp.server_class = ReceiverServer
    scp.server_options = {"listener": listener, "ledger": ledger}
    return scp, db, ingestor


class ReceiverPool:
    """The parent's side: the listening socket, the ledger, N receivers kept alive.

    ``audit(action, outcome, detail)`` records the receivers' starts and deaths.
    """

    def __init__(
        self,
        settings: Settings,
        count: int,
        audit: Callable[[str, str, dict[str, Any]], None],
    ) -> None:
        """``count`` receivers for ``settings``' DICOM port."""
        self.settings = settings
        self.count = count
        self.audit = audit
        self.ledger: Ledger | None = None
        self._ctx = multiprocessing.get_context("spawn")
        self._listener: socket.socket | None = None
        self._procs: list[BaseProcess | None] = [None] * count
        self._started_at = [0.0] * count
        self._restart_at = [0.0] * count
        self._failures = [0] * count
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._watcher: threading.Thread | None = None

    def start(self) -> None:
        """Listen on the port, start every receiver, then watch them from a thread.

        The watcher thread lives as long as the node: a receiver's death signal
        (``PR_SET_PDEATHSIG``) follows the thread that started it.

        Raises
        ------
        OSError
            The port cannot be bound (in use, not permitted).
        """
        d = self.settings.dicom
        limits = TransportLimits.from_settings(d)
        self._listener = listen(d.bind, d.port, GuardedAssociationServer.request_queue_size)
        run = self.settings.storage.root / "run"
        run.mkdir(parents=True, exist_ok=True)
        self.ledger = Ledger(limits.max_connections, self.count, run / "receivers.lock")
        with self._lock:
            for index in range(self.count):
                self._spawn(index)
        self._watcher = threading.Thread(target=self._watch, name="sarcnode-receivers", daemon=True)
        self._watcher.start()
        log.info("storage SCP: %d receiver processes on %s:%d", self.count, d.bind, d.port)

    def _spawn(self, index: int) -> None:
        assert self._listener is not None and self.ledger is not None
        proc = self._ctx.Process(
            target=receiver_main,
            args=(index, self.settings, self._listener, self.ledger, os.getpid()),
            name=f"sarcnode-receiver-{index}",
            daemon=False,
        )
        proc.start()
        self._procs[index] = proc
        self._started_at[index] = time.monotonic()
        self.audit("receiver.started", "ok", {"receiver": index, "pid": proc.pid})

    def _watch(self) -> None:
        while not self._stopping.wait(0.5):
            try:
                self.check()
            except Exception:
                log.exception("receiver watch failed")

    def check(self) -> None:
        """Audit and restart receivers that ended without being asked (with back-off)."""
        assert self.ledger is not None
        now = time.monotonic()
        with self._lock:
            for index, proc in enumerate(self._procs):
                if self._stopping.is_set():
                    return
                if proc is not None and not proc.is_alive():
                    self._procs[index] = None
                    freed = self.ledger.unregister(index)
                    quick = now - self._started_at[index] < QUICK_DEATH_S
                    self._failures[index] = self._failures[index] + 1 if quick else 0
                    backoff = min(MAX_BACKOFF_S, 2.0 ** self._failures[index]) if quick else 0.0
                    self._restart_at[index] = now + backoff
                    log.error(
                        "receiver %d (pid %s) ended with status %s; restart in %.0f s",
                        index,
                        proc.pid,
                        proc.exitcode,
                        backoff,
                    )
                    self.audit(
                        "receiver.died",
                        "failed",
                        {
                            "receiver": index,
                            "pid": proc.pid,
                            "exitcode": proc.exitcode,
                            "connections_freed": freed,
                            "restart_in_s": backoff,
                        },
                    )
                if self._procs[index] is None and now >= self._restart_at[index]:
                    self._spawn(index)

    def alive(self) -> tuple[int, int]:
        """(receivers alive, receivers configured)."""
        with self._lock:
            return sum(1 for p in self._procs if p is not None and p.is_alive()), self.count

    def stop(self, grace_s: float) -> tuple[int, int]:
        """SIGTERM to every receiver (each drains within ``grace_s``); kill what is left.

        Returns (receivers that stopped by themselves, receivers killed).
        """
        self._stopping.set()
        if self._watcher is not None:
            self._watcher.join(timeout=5)
        with self._lock:
            procs = [p for p in self._procs if p is not None]
        for proc in procs:
            with contextlib.suppress(OSError):
                proc.terminate()
        if self._listener is not None:
            self._listener.close()  # the port is free once the receivers have closed theirs
        deadline = time.monotonic() + grace_s + 5.0  # a drain takes grace plus its audit
        killed = 0
        for proc in procs:
            proc.join(timeout=max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                log.warning("receiver pid %s still running after the grace: killed", proc.pid)
                proc.kill()
                proc.join(timeout=5)
                killed += 1
        return len(procs) - killed, killed
