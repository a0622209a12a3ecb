"""Run fuzz classes against a real ``sarcnode serve`` and check the node after each.

:class:`FuzzNode` starts ``sarcnode serve`` on a free loopback port with a
config of its own (calling AEs ``FUZZER`` and ``HONEST`` on the allow-list,
short set-up/PDU/idle deadlines so network attacks end within seconds, a
32 MiB data set cap, a log file). :class:`Campaign` sends each class's cases
(:mod:`tests.fuzz.generator`), reusing one association for every request the
node answers and opening one per case whose expected outcome ends it; raw
socket attacks run six at a time from their own loopback addresses. After
each class it checks, and :class:`ClassResult` records:

- serve alive: the process runs and a C-ECHO from another address (pynetdicom,
  calling AE ``HONEST``) is answered with Success within 10 s;
- every input answered with a status (or abort, reject) its case allows;
  0x0110 and no answer are never allowed;
- nothing written outside the storage root (no file beside the config and the
  logs, no ``sarcnode-fuzz-escape*`` in the root's parents or /tmp);
- no orphans: every file under ``<root>/dicom`` is indexed, every indexed file
  exists, nothing is left in ``<root>/tmp``;
- ``sarcnode audit verify`` exits 0;
- serve's RSS (VmRSS, and VmHWM: the peak since start) and thread count;
- the log lines written during the class: lines holding a planted patient
  value (:data:`PHI_RE` or a planted birth date), raw control characters,
  and errors or tracebacks (the node's own faults).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tests.fuzz.cases import PROPOSALS, AssociateCase, Case, NetCase, StoreCase
from tests.fuzz.corpus import MARKER, Corpus
from tests.fuzz.dimse import (
    ABORT,
    ACCEPTED,
    CLOSED,
    CMD_AFFECTED_SOP_CLASS,
    CMD_AFFECTED_SOP_INSTANCE,
    CMD_MESSAGE_ID,
    DROPPED,
    PDU_ABORT,
    PDU_ASSOCIATE_AC,
    PDU_ASSOCIATE_RJ,
    REJECT,
    TIMEOUT,
    Outcome,
    PeerEnded,
    RawAssociation,
    associate_rq,
    command_set,
    p_data,
    read_pdu,
    store_rq_elements,
)
from tests.fuzz.generator import CLASSES, generate
from tests.peers import free_port

SARCNODE = str(Path(sys.executable).parent / "sarcnode")
FUZZ_AE = b"FUZZER"
HONEST_AE = "HONEST"
NODE_AE = "SARCNODE"
#: The honest peer's source address (the fuzz sends from 127.0.0.1 and 127.0.0.20-25).
HONEST_SOURCE = "127.0.0.8"
NET_SOURCES = tuple(f"127.0.0.{20 + i}" for i in range(6))
#: Any part of a planted text value (they all start with the marker).
PHI_RE = re.compile(MARKER + r"[A-Z2-7]{4}", re.IGNORECASE)
_DATE_RE = re.compile(rb"(?<![\d.])(\d{8})(?![\d.])")
#: Raw control characters a log line must never hold (tab aside).
_CONTROL_RE = re.compile(rb"[\x00-\x08\x0b-\x1f\x7f]")
_ERROR_RE = re.compile(rb" (ERROR|CRITICAL) |Traceback")
#: An error the node's own code logged (its faults, not a library's complaint about input).
_NODE_ERROR_RE = re.compile(rb" (ERROR|CRITICAL) node\.")
#: node.logs' record of an exception that ended a thread (one of serve's own threads died).
_THREAD_DEATH_RE = re.compile(rb"node\.threads: thread .* ended by ")
#: The node's idle timeout (dicom.network_timeout_s) in the fuzz config.
IDLE_TIMEOUT_S = 5.0
#: Outcome of a request the node left unanswered until its idle timeout closed the association.
IDLE_CLOSED = "idle-closed"
#: Name prefix of the files the hostile UIDs would create outside the root.
ESCAPE_NAME = "sarcnode-fuzz-escape"
MiB = 1024 * 1024


# -- the node ---------------------------------------------------------------------------------


def proc_status_kb(pid: int, key: str) -> int:
    """A value (kB, or a count) from /proc/<pid>/status; 0 when the process is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        return 0
    return 0


def reset_peak_rss(pid: int) -> bool:
    """Reset the process's VmHWM to its current RSS (Linux ``clear_refs`` 5); False if refused."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


@dataclass
class FuzzNode:
    """A ``sarcnode serve`` under fuzz, with its own folder, config and logs."""

    base: Path
    port: int
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0

    @classmethod
    def create(cls, base: Path) -> FuzzNode:
        """Write the config under ``base`` (created) and return the node, not started."""
        base.mkdir(parents=True, exist_ok=True)
        node = cls(base.resolve(), free_port())
        settings: dict[str, Any] = {
            "dicom": {
                "ae_title": NODE_AE,
                "bind": "127.0.0.1",
                "port": node.port,
                "allowed_calling_aes": [FUZZ_AE.decode(), HONEST_AE],
                "setup_timeout_s": 2,
                "pdu_timeout_s": 2,
                "network_timeout_s": IDLE_TIMEOUT_S,
            },
            "storage": {"root": str(node.storage), "min_free_mb": 50, "max_dataset_mb": 24},
            "jobs": {"pipelines_dir": str(node.base / "no-pipelines")},
            "logging": {"level": "INFO", "file": str(node.file_log)},
        }
        node.config.write_text(yaml.safe_dump(settings))
        return node

    @property
    def config(self) -> Path:
        """The node's YAML config."""
        return self.base / "node.yaml"

    @property
    def storage(self) -> Path:
        """The storage root."""
        return self.base / "storage"

    @property
    def stdout_log(self) -> Path:
        """serve's stdout and stderr."""
        return self.base / "serve.log"

    @property
    def file_log(self) -> Path:
        """serve's log file (``logging.file``)."""
        return self.base / "serve-file.log"

    @property
    def pid(self) -> int:
        """serve's process id."""
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 60.0) -> None:
        """Start serving; wait until the heartbeat file says the SCP listens."""
        heartbeat = self.storage / "run" / "serve.json"
        heartbeat.unlink(missing_ok=True)
        env = {k: v for k, v in os.environ.items() if k != "SARCNODE_CONFIG"}
        with self.stdout_log.open("ab") as log:
            self.proc = subprocess.Popen(
                [SARCNODE, "serve", "--config", str(self.config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )
        self.starts += 1
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"serve exited {self.proc.returncode}; see {self.stdout_log}")
            if heartbeat.exists():
                return
            time.sleep(0.1)
        raise RuntimeError(f"serve did not start in {timeout:.0f} s; see {self.stdout_log}")

    def stop(self) -> int | None:
        """SIGTERM (SIGKILL after 15 s); the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode

    def running(self) -> bool:
        """Whether the process is still there."""
        return self.proc is not None and self.proc.poll() is None

    def echo(self, timeout: float = 10.0) -> bool:
        """A C-ECHO from :data:`HONEST_SOURCE` (pynetdicom) answered with Success in time."""
        from pynetdicom import AE

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.running():
            ae = AE(ae_title=HONEST_AE)
            ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 5
            ae.add_requested_context("1.2.840.10008.1.1")
            assoc = ae.associate(
                "127.0.0.1", self.port, ae_title=NODE_AE, bind_address=(HONEST_SOURCE, 0)
            )
            if assoc.is_established:
                try:
                    status = assoc.send_c_echo()
                    if "Status" in status and int(status.Status) == 0:
                        return True
                finally:
                    assoc.release()
            time.sleep(0.5)
        return False

    def audit_verify(self) -> tuple[bool, str]:
        """``sarcnode audit verify``: (exit 0, its first output line)."""
        proc = subprocess.run(
            [SARCNODE, "audit", "verify", "--config", str(self.config)],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        first = (proc.stdout or proc.stderr).strip().splitlines()
        return proc.returncode == 0, first[0] if first else f"exit {proc.returncode}"

    def tree_and_index(self) -> tuple[set[str], set[str], list[str]]:
        """(files under dicom/, indexed paths, files under tmp/), read beside the running node."""
        dicom = self.storage / "dicom"
        files = {p.relative_to(self.storage).as_posix() for p in dicom.rglob("*") if p.is_file()}
        db = self.storage / "sarcnode.db"
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)) as c:
            rows = c.execute("SELECT path FROM instances").fetchall()
        tmp = [p.name for p in (self.storage / "tmp").glob("*")]
        return files, {r[0] for r in rows}, tmp

    def planted_studies(self) -> int:
        """Studies whose patient name or ID is a planted value (the PHI did reach the node)."""
        db = self.storage / "sarcnode.db"
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)) as c:
            query = "SELECT count(*) FROM studies WHERE patient_name LIKE ? OR patient_id LIKE ?"
            return int(c.execute(query, (MARKER + "%", MARKER + "%")).fetchone()[0])

    def outside_root(self, expected: set[str]) -> list[str]:
        """Files written outside the storage root: beside it, or where an escape would land."""
        found = []
        for path in self.base.rglob("*"):
            if path.is_relative_to(self.storage) or not path.is_file():
                continue
            rel = path.relative_to(self.base).as_posix()
            if rel not in expected:
                found.append(rel)
        for folder in [*self.storage.parents, Path("/tmp")]:
            with contextlib.suppress(OSError):
                found += [str(p) for p in folder.glob(ESCAPE_NAME + "*")]
        return sorted(set(found))


# -- results ------------------------------------------------------------------------------------


@dataclass
class ClassResult:
    """What one class sent, what came back, and the checks after it."""

    name: str
    sent: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    wrong: int = 0
    wrong_examples: list[str] = field(default_factory=list)
    unanswered: int = 0
    seconds: float = 0.0
    alive: bool = True
    crashed: bool = False
    orphans: int = 0
    missing: int = 0
    leftover_tmp: int = 0
    outside_root: list[str] = field(default_factory=list)
    audit_ok: bool = True
    audit_line: str = ""
    phi_lines: int = 0
    phi_examples: list[str] = field(default_factory=list)
    control_lines: int = 0
    error_lines: int = 0
    error_examples: list[str] = field(default_factory=list)
    thread_deaths: int = 0
    node_errors: int = 0
    node_error_examples: list[str] = field(default_factory=list)
    rss_mb: float = 0.0
    peak_rss_mb: float = 0.0
    threads: int = 0
    indexed: int = 0
    association_retries: int = 0
    stray_responses: int = 0

    @property
    def clean(self) -> bool:
        """Every check held (log errors are reported, not judged here)."""
        return (
            self.alive
            and not self.crashed
            and self.wrong == 0
            and self.stray_responses == 0
            and self.orphans == 0
            and self.missing == 0
            and self.leftover_tmp == 0
            and not self.outside_root
            and self.audit_ok
            and self.phi_lines == 0
            and self.control_lines == 0
        )


def outcome_name(outcome: Outcome) -> str:
    """``0xC000`` for a status, the word otherwise."""
    return f"0x{outcome:04X}" if isinstance(outcome, int) else outcome


# -- sending ------------------------------------------------------------------------------------


class Sender:
    """Sends cases to the node: one shared association for what the node answers."""

    def __init__(self, port: int, idle_timeout_s: float, timeout_s: float = 15.0) -> None:
        self.port = port
        self.idle_timeout_s = idle_timeout_s
        self.timeout_s = timeout_s
        self.shared: RawAssociation | None = None
        self.retries = 0
        #: Responses that answered another request than the one awaited.
        self.stray_responses = 0

    def _open(self, source: str | None = None) -> RawAssociation | str:
        """An association from FUZZER; retried while the node refuses (slots held) for 30 s."""
        deadline = time.monotonic() + 30
        while True:
            got = RawAssociation.open(
                self.port,
                FUZZ_AE,
                NODE_AE.encode(),
                list(PROPOSALS),
                source=source,
                timeout_s=self.timeout_s,
            )
            if isinstance(got, RawAssociation) or time.monotonic() > deadline:
                return got
            self.retries += 1
            time.sleep(0.5)

    def close(self) -> None:
        """Release the shared association."""
        if self.shared is not None:
            self.shared.release()
            self.shared = None

    def store(self, case: StoreCase) -> tuple[Outcome, str]:
        """Send one C-STORE case; (outcome, Error Comment)."""
        if case.own_association:
            assoc = self._open()
        else:
            if self.shared is not None and (
                time.monotonic() - self.shared.last_used > self.idle_timeout_s - 1.5
            ):
                self.close()  # the node would close it as idle: release it first
            if self.shared is None or self.shared.ended:
                self.shared = None
                opened = self._open()
                if isinstance(opened, str):
                    return f"no association ({opened})", ""
                self.shared = opened
            assoc = self.shared
        if isinstance(assoc, str):
            return f"no association ({assoc})", ""
        try:
            cid = case.context_id or assoc.context_id(*case.context)
            if cid is None:
                raise ValueError(f"context {case.context} was not proposed")
            message_id: int | None = None
            if case.raw_command is not None:
                command = case.raw_command
            else:
                message_id = assoc.take_message_id()
                elements = store_rq_elements(
                    case.sop_class or b"", case.sop_instance or b"", message_id
                )
                if case.sop_class is None:
                    elements[CMD_AFFECTED_SOP_CLASS] = None
                if case.sop_instance is None:
                    elements[CMD_AFFECTED_SOP_INSTANCE] = None
                elements.update(dict(case.command_changes))
                if CMD_MESSAGE_ID in dict(case.command_changes):
                    message_id = None  # the case changed or dropped it: any answer counts
                command = command_set(elements)
            started = time.monotonic()
            strays = assoc.stray_responses
            outcome = assoc.request(cid, command, case.data_set, message_id)
            strays = assoc.stray_responses - strays
            self.stray_responses += strays
            if outcome == ABORT and time.monotonic() - started > self.idle_timeout_s - 0.5:
                # Not an answer: the node forgot the request and closed an idle association.
                return IDLE_CLOSED, f"closed after {time.monotonic() - started:.1f} s"
            note = f" [{strays} stray response(s) skipped]" if strays else ""
            return outcome, assoc.last_comment + note
        finally:
            if case.own_association:
                assoc.release()

    def associate(self, case: AssociateCase) -> tuple[Outcome, str]:
        """Request an association with the case's AE titles; reject, abort or accepted.

        A connection dropped at accept (the address's connections still held by the
        previous cases' aborted associations) is tried again for up to 15 s.
        """
        deadline = time.monotonic() + 15
        while True:
            got = RawAssociation.open(
                self.port,
                case.calling,
                NODE_AE.encode() if case.called is None else case.called,
                [("1.2.840.10008.1.1", "1.2.840.10008.1.2")],
                timeout_s=self.timeout_s,
            )
            if got != DROPPED or time.monotonic() > deadline:
                break
            self.retries += 1
            time.sleep(0.2)
        if isinstance(got, str):
            return got, ""
        got.release()
        return ACCEPTED, ""


def run_net_case(port: int, case: NetCase, source: str) -> tuple[Outcome, str, int]:
    """Play a raw-socket attack from ``source``: how the node ended it, and set-up retries.

    An attack that needs an association first is played again (up to 15 s) when
    the node turns that association down as over a limit (A-ASSOCIATE-RJ
    transient: the slots of the attacks just before are still being released).
    """
    deadline = time.monotonic() + 15
    retries = 0
    while True:
        outcome, comment = _play(port, case, source)
        if comment != _SETUP_REFUSED or time.monotonic() > deadline:
            return outcome, comment, retries
        retries += 1
        time.sleep(0.3)


#: The comment of an attack whose own A-ASSOCIATE-RQ was refused (not the attack's result).
_SETUP_REFUSED = "association refused before the attack"


def _play(port: int, case: NetCase, source: str) -> tuple[Outcome, str]:
    """One play of ``case`` (see :func:`run_net_case`)."""
    rq_contexts = [(1, "1.2.840.10008.5.1.4.1.1.4", ["1.2.840.10008.1.2.1"])]
    started = time.monotonic()
    deadline = started + case.limit_s
    try:
        sock = socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(source, 0))
    except OSError:
        return DROPPED, _SETUP_REFUSED
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        for kind, arg in case.steps:
            if kind == "close":
                return CLOSED, ""
            if kind == "send":
                assert isinstance(arg, bytes)
                sock.sendall(arg)
            elif kind == "drip":
                assert isinstance(arg, bytes)
                for i in range(len(arg)):
                    sock.sendall(arg[i : i + 1])
                    time.sleep(0.25)
                    if time.monotonic() > deadline:
                        break
            elif kind == "associate":
                sock.sendall(associate_rq(FUZZ_AE, NODE_AE.encode(), rq_contexts))
                try:
                    pdu_type, _ = read_pdu(sock, deadline)
                except PeerEnded as exc:
                    if exc.before_any_byte:  # dropped at accept: a slot limit, not the attack
                        return DROPPED, _SETUP_REFUSED
                    raise
                if pdu_type != PDU_ASSOCIATE_AC:
                    return (REJECT if pdu_type == PDU_ASSOCIATE_RJ else ABORT), _SETUP_REFUSED
            elif kind == "store_half":
                assert isinstance(arg, bytes)
                elements = store_rq_elements("1.2.840.10008.5.1.4.1.1.4", "2.25.1", 1)
                for part in (
                    p_data(1, 0x03, command_set(elements)),
                    p_data(1, 0x00, arg[: len(arg) // 2]),
                ):
                    sock.sendmsg(part)
        while True:  # the node must end the connection
            pdu_type, _ = read_pdu(sock, deadline)
            if pdu_type == PDU_ABORT:
                return ABORT, f"A-ABORT after {time.monotonic() - started:.1f} s"
            if pdu_type == PDU_ASSOCIATE_RJ:
                return REJECT, ""
    except PeerEnded as exc:
        return exc.outcome, f"{exc} after {time.monotonic() - started:.1f} s"
    except TimeoutError:
        return TIMEOUT, f"still open after {case.limit_s:g} s"
    except OSError as exc:  # reset while sending: the node ended it
        return ABORT, f"{type(exc).__name__} after {time.monotonic() - started:.1f} s"
    finally:
        with contextlib.suppress(OSError):
            sock.close()


# -- the campaign ----------------------------------------------------------------------------------


class LogWatch:
    """Reads the node's logs from where it last stopped and judges each new line."""

    def __init__(self, paths: Iterable[Path]) -> None:
        self.paths = list(paths)
        self.offsets = {p: 0 for p in self.paths}

    def new_lines(self) -> list[bytes]:
        """Lines written since the last call, in every log."""
        lines: list[bytes] = []
        for path in self.paths:
            if not path.exists():
                continue
            with path.open("rb") as f:
                f.seek(self.offsets[path])
                data = f.read()
            end = data.rfind(b"\n") + 1
            self.offsets[path] += end
            lines += data[:end].split(b"\n")[:-1]
        return lines


class Campaign:
    """Classes of hostile input against one node, checked after each class."""

    def __init__(
        self,
        node: FuzzNode,
        corpus: Corpus,
        seed: int,
        *,
        rss_limit_mb: float = 500.0,
        progress: Callable[[str], None] | None = None,
    ) -> None:
        self.node = node
        self.corpus = corpus
        self.seed = seed
        self.rss_limit_mb = rss_limit_mb
        self.progress = progress or (lambda _msg: None)
        self.sender = Sender(node.port, IDLE_TIMEOUT_S)
        self.logs = LogWatch([node.stdout_log, node.file_log])
        self.dates: set[bytes] = set()
        self.tokens = 0
        self.crashes = 0
        #: Every case's (class, label, outcome, comment) when tracing.
        self.trace: list[tuple[str, str, str, str]] | None = None
        self.expected_files = {"node.yaml", "serve.log", "serve-file.log"}

    def run(self, counts: dict[str, int]) -> list[ClassResult]:
        """Every class in ``counts`` (in :data:`CLASSES` order), each checked after it."""
        self.logs.new_lines()  # the start-up lines are not the fuzz's
        results = []
        for name in CLASSES:
            if counts.get(name, 0) > 0:
                results.append(self.run_class(name, counts[name]))
        self.sender.close()
        return results

    def _note_tokens(self, tokens: Iterable[str]) -> None:
        for tok in tokens:
            self.tokens += 1
            if tok.isdigit():
                self.dates.add(tok.encode())

    def run_class(self, name: str, n: int) -> ClassResult:
        """Send ``n`` inputs of class ``name``; then check the node."""
        result = ClassResult(name)
        # Peak RSS per class where the kernel lets us reset it (else: peak since start).
        reset_peak_rss(self.node.pid)
        started = time.monotonic()
        retries_before = self.sender.retries
        strays_before = self.sender.stray_responses
        cases = generate(name, self.seed, n, self.corpus)
        if name == "network":
            self._run_network(list(cases), result)
        else:
            for case in cases:
                self._note_tokens(case.tokens)
                if isinstance(case, StoreCase):
                    outcome, comment = self.sender.store(case)
                elif isinstance(case, AssociateCase):
                    outcome, comment = self.sender.associate(case)
                else:
                    raise TypeError(type(case))
                self._judge(result, case, outcome, comment)
                if not self.node.running():
                    break
        self.sender.close()
        result.seconds = time.monotonic() - started
        result.association_retries += self.sender.retries - retries_before
        result.stray_responses = self.sender.stray_responses - strays_before
        self._check(result)
        self.progress(
            f"{name}: {result.sent} inputs in {result.seconds:.1f} s, {result.wrong} wrong, "
            f"{'clean' if result.clean else 'NOT CLEAN'}"
        )
        return result

    def _run_network(self, cases: list[Case], result: ClassResult) -> None:
        with ThreadPoolExecutor(len(NET_SOURCES)) as pool:
            futures = []
            for i, case in enumerate(cases):
                assert isinstance(case, NetCase)
                self._note_tokens(case.tokens)
                source = NET_SOURCES[i % len(NET_SOURCES)]
                futures.append((case, pool.submit(run_net_case, self.node.port, case, source)))
            for case, future in futures:
                outcome, comment, retries = future.result()
                result.association_retries += retries
                self._judge(result, case, outcome, comment)

    def _judge(self, result: ClassResult, case: Case, outcome: Outcome, comment: str) -> None:
        if self.trace is not None:
            self.trace.append((case.cls, case.label, outcome_name(outcome), comment))
        result.sent += 1
        result.outcomes[outcome_name(outcome)] += 1
        if outcome in (TIMEOUT, IDLE_CLOSED):
            result.unanswered += 1
        if outcome not in case.expect:
            result.wrong += 1
            if len(result.wrong_examples) < 8:
                expected = "/".join(sorted(outcome_name(e) for e in case.expect))
                note = f" ({comment[:100]})" if comment else ""
                result.wrong_examples.append(
                    f"{case.label[:110]}: got {outcome_name(outcome)}, expected {expected}{note}"
                )

    def _check(self, result: ClassResult) -> None:
        node = self.node
        result.alive = node.running() and node.echo()
        if not node.running():
            result.crashed = True
            self.crashes += 1
            node.stop()
            node.start()
        # What the last aborted associations leave behind is gone once the node
        # answers again; give the reaper a moment for the .part files of aborts.
        time.sleep(0.3)
        files, indexed, tmp = node.tree_and_index()
        result.orphans = len(files - indexed)
        result.missing = len(indexed - files)
        result.leftover_tmp = len(tmp)
        result.indexed = len(indexed)
        result.outside_root = node.outside_root(self.expected_files)
        result.audit_ok, result.audit_line = node.audit_verify()
        result.rss_mb = proc_status_kb(node.pid, "VmRSS") / 1024
        result.peak_rss_mb = proc_status_kb(node.pid, "VmHWM") / 1024
        result.threads = proc_status_kb(node.pid, "Threads")
        for line in self.logs.new_lines():
            phi = bool(PHI_RE.search(line.decode("utf-8", "replace"))) or any(
                d in self.dates for d in _DATE_RE.findall(line)
            )
            if phi:
                result.phi_lines += 1
                if len(result.phi_examples) < 3:
                    result.phi_examples.append(line[:200].decode("utf-8", "replace"))
            if _CONTROL_RE.search(line):
                result.control_lines += 1
            if _THREAD_DEATH_RE.search(line):
                result.thread_deaths += 1
            if _NODE_ERROR_RE.search(line):
                result.node_errors += 1
                message = line.split(b" ERROR ", 1)[-1][:160].decode("utf-8", "replace")
                if (
                    message not in result.node_error_examples
                    and len(result.node_error_examples) < 3
                ):
                    result.node_error_examples.append(message)
            if _ERROR_RE.search(line):
                result.error_lines += 1
                if len(result.error_examples) < 3:
                    result.error_examples.append(line[:200].decode("utf-8", "replace"))


# -- the report ---------------------------------------------------------------------------------


@dataclass
class Totals:
    """The whole campaign's figures."""

    inputs: int
    crashes: int
    orphans: int
    missing: int
    outside_root: int
    phi_lines: int
    control_lines: int
    wrong: int
    unanswered: int
    stray_responses: int
    audit_ok: bool
    peak_rss_mb: float
    max_threads: int
    error_lines: int
    thread_deaths: int
    node_errors: int
    association_retries: int
    wall_s: float
    #: Studies indexed with a planted patient name or ID: the PHI reached the node.
    planted_studies: int = 0
    planted_values: int = 0

    @classmethod
    def of(cls, results: list[ClassResult], campaign: Campaign, wall_s: float) -> Totals:
        """Sum ``results``; the positive control of the PHI check from the node's index."""
        return cls(
            planted_studies=campaign.node.planted_studies(),
            planted_values=campaign.tokens,
            inputs=sum(r.sent for r in results),
            crashes=campaign.crashes,
            orphans=sum(r.orphans for r in results),
            missing=sum(r.missing for r in results),
            outside_root=sum(len(r.outside_root) for r in results),
            phi_lines=sum(r.phi_lines for r in results),
            control_lines=sum(r.control_lines for r in results),
            wrong=sum(r.wrong for r in results),
            unanswered=sum(r.unanswered for r in results),
            stray_responses=sum(r.stray_responses for r in results),
            audit_ok=all(r.audit_ok for r in results),
            peak_rss_mb=max((r.peak_rss_mb for r in results), default=0.0),
            max_threads=max((r.threads for r in results), default=0),
            error_lines=sum(r.error_lines for r in results),
            thread_deaths=sum(r.thread_deaths for r in results),
            node_errors=sum(r.node_errors for r in results),
            association_retries=sum(r.association_retries for r in results),
            wall_s=wall_s,
        )


def report(results: list[ClassResult], totals: Totals, *, seed: int) -> str:
    """The figures, one line per class and the totals, for a person."""
    lines = [
        f"fuzz seed {seed}: {totals.inputs} inputs in {len(results)} classes "
        "(RSS and peak in MiB: after the class, and the class's VmHWM; thr: serve's threads; "
        "err: log lines at ERROR or of a traceback; node: ERROR records of the node's own code)",
        f"{'class':<16} {'sent':>5} {'wrong':>5} {'s':>6} {'RSS':>5} {'peak':>5} {'thr':>4} "
        f"{'orph':>4} {'phi':>3} {'err':>4} {'node':>4} audit  outcomes",
    ]
    for r in results:
        outcomes = " ".join(f"{k}:{v}" for k, v in sorted(r.outcomes.items()))
        lines.append(
            f"{r.name:<16} {r.sent:>5} {r.wrong:>5} {r.seconds:>6.1f} {r.rss_mb:>5.0f} "
            f"{r.peak_rss_mb:>5.0f} "
            f"{r.threads:>4} {r.orphans:>4} {r.phi_lines:>3} {r.error_lines:>4} {r.node_errors:>4} "
            f"{'ok' if r.audit_ok else 'BROKEN':<6} {outcomes}"
        )
    lines.append("")
    lines += [
        f"inputs sent:            {totals.inputs}",
        f"crashes:                {totals.crashes}",
        f"orphans:                {totals.orphans} (indexed but missing: {totals.missing})",
        f"outside the root:       {totals.outside_root}",
        f"PHI lines:              {totals.phi_lines} ({totals.planted_values} patient values "
        f"planted; {totals.planted_studies} studies indexed under a planted name or ID)",
        f"control-char lines:     {totals.control_lines}",
        f"wrong-class statuses:   {totals.wrong} (unanswered: {totals.unanswered}; "
        f"second responses: {totals.stray_responses})",
        f"audit verify:           {'intact after every class' if totals.audit_ok else 'BROKEN'}",
        f"set-up retries:         {totals.association_retries} (associations or connections "
        "the node turned down for a moment as over a slot limit, tried again)",
        f"RSS peak:               {totals.peak_rss_mb:.0f} MiB (VmHWM); threads at most "
        f"{totals.max_threads}",
        f"error/traceback lines:  {totals.error_lines}; the node's own ERROR records: "
        f"{totals.node_errors} (threads ended by an exception: {totals.thread_deaths})",
        f"wall time:              {totals.wall_s:.0f} s",
    ]
    for r in results:
        for example in r.wrong_examples:
            lines.append(f"  wrong {r.name}: {example}")
        for example in r.phi_examples:
            lines.append(f"  PHI {r.name}: {example}")
        for example in r.node_error_examples:
            lines.append(f"  node error {r.name}: {example}")
        for path in r.outside_root[:5]:
            lines.append(f"  outside root {r.name}: {path}")
        if not r.alive:
            lines.append(f"  {r.name}: serve did not answer a C-ECHO after the class")
        if not r.audit_ok:
            lines.append(f"  {r.name}: {r.audit_line}")
    return "\n".join(lines)


__all__ = ["Campaign", "ClassResult", "FuzzNode", "Totals", "report"]
