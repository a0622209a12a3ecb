"""Scale-out benchmark: studies per minute through a Ray cluster of N worker nodes.

For each N in ``--workers`` (default 1 and 2), on loopback and from scratch:

1. a Ray head (``ray start --head --num-cpus 0``: it schedules, runs no task)
   and N worker nodes (``ray start --address ... --num-cpus C``), each its
   own raylet, as N machines would be; token authentication on, with a token
   made for this run;
2. a throw-away PostgreSQL cluster from Debian's package (``initdb`` +
   ``pg_ctl``, as ``tests/conftest.py`` does) holding the node's database;
3. ``sarcnode serve`` with ``jobs.executor: {kind: ray, address: <head>}``,
   ``jobs.max_parallel`` = N x C, the shipped ``sarcoma-mr`` pipeline on CPU
   (absolute paths, no wait for an optional series) and a folder destination;
4. M synthetic studies (T1 + FS-T2, ``pipelines.synth.study.write_study``,
   made once and sent to each fresh node) sent by dcmtk's storescu over one
   association, back to back, as a PACS pushes them.

Figures, from the node's own records: the span from the first instance
received to the last result delivered, studies per minute over that span,
each study's latency (last instance -> last of its results delivered), and
per-stage seconds (mean over the studies), plus how many of the N Ray
nodes ran a stage. Every process it starts (serve, the Ray nodes and their
workers, PostgreSQL) runs in a session of its own and is ended on exit,
Ctrl-C or SIGTERM included: each leader first gets SIGTERM, then what is
left of its session gets SIGKILL. It never runs ``ray stop``, which would
end every Ray process on the machine, other users' too.

Run: ``make bench-scale`` or ``.venv/bin/python bench/scale.py [--workers 1,2]
[--studies 6] [--cpus-per-worker 1] [--keep] [--json] [--dry-run]``. It needs
dcmtk, PostgreSQL (Debian) and Ray (``pip install -e '.[ray]'``). A
benchmark, not a test: it prints figures; it exits 1 if a job failed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != REPO / "bench"]
sys.path.insert(0, str(REPO))

BIN = Path(sys.executable).parent
SARCNODE, RAY = BIN / "sarcnode", BIN / "ray"
STORESCU = "/usr/bin/storescu"
SCANNER = "SCALESCU"
STAGES = ("segment", "radiomics", "score", "encode", "deliver")


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _postgres_bindir() -> Path | None:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    return found[-1].parent if found else None


class Sessions:
    """The processes this bench started, each leader in a session of its own.

    A session id is inherited by every child that does not call setsid (Ray's
    raylet and its workers, serve's worker pool, PostgreSQL's backends), so
    ending what is left in our sessions ends exactly what we started.
    """

    def __init__(self) -> None:
        self.leaders: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(self, name: str, argv: list[str], log: Path, **kw: Any) -> subprocess.Popen[bytes]:
        """Start ``argv`` in a new session, output to ``log``; remember it."""
        with log.open("ab") as out:
            proc = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, **kw
            )
        self.leaders.append((name, proc))
        return proc

    def stop(self, proc: subprocess.Popen[bytes], grace_s: float = 30.0) -> None:
        """SIGTERM the leader, wait ``grace_s``, then SIGKILL whatever is left of its session."""
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(grace_s)
        self.kill_session(proc.pid)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)

    @staticmethod
    def members(sid: int) -> list[int]:
        """The processes whose session id is ``sid`` (from /proc/<pid>/stat)."""
        found = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if int(fields[3]) == sid:  # state, ppid, pgrp, session
                found.append(int(stat.parent.name))
        return found

    def kill_session(self, sid: int) -> None:
        """SIGKILL every process still in session ``sid``."""
        for pid in self.members(sid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def leftovers(self) -> list[str]:
        """``name: pid`` of anything still alive in our sessions (killed as found)."""
        left = []
        for name, proc in self.leaders:
            for pid in self.members(proc.pid):
                left.append(f"{name}: {pid}")
            self.kill_session(proc.pid)
        return left


def start_postgres(sessions: Sessions, stack: contextlib.ExitStack, bindir: Path) -> int:
    """A private PostgreSQL on a loopback port (fsync on, as in production); its port."""
    base = Path(tempfile.mkdtemp(prefix="sarcnode-scale-pg-"))
    stack.callback(shutil.rmtree, base, ignore_errors=True)
    run_as: list[str] = []
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        shutil.chown(base, "postgres", "postgres")
        run_as = ["runuser", "-u", "postgres", "--"]
    data, port = base / "data", free_port()
    initdb = [str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "sarcnode"]
    subprocess.run([*run_as, *initdb, "-E", "UTF8"], check=True, capture_output=True, timeout=120)
    opts = f"-p {port} -k {base} -c listen_addresses=127.0.0.1"
    ctl = [*run_as, str(bindir / "pg_ctl"), "-D", str(data), "-l", str(base / "log")]
    # pg_ctl leaves the postmaster in pg_ctl's session: started in a new one, it is tracked.
    leader = sessions.start("postgres", [*ctl, "-o", opts, "-w", "start"], base / "ctl.log")

    def stop() -> None:
        # The postmaster makes a session of its own (setsid): if pg_ctl could not
        # stop it, it and its backends are ended through the pid in its pid file.
        pidfile = data / "postmaster.pid"
        postmaster = int(pidfile.read_text().split()[0]) if pidfile.exists() else 0
        with contextlib.suppress(subprocess.TimeoutExpired):
            subprocess.run([*ctl, "-m", "fast", "-w", "stop"], capture_output=True, timeout=60)
        if postmaster and Path(f"/proc/{postmaster}").exists():
            sessions.kill_session(postmaster)
        sessions.stop(leader, grace_s=5)

    stack.callback(stop)
    if leader.wait(90) != 0:
        raise RuntimeError(f"PostgreSQL did not start:\n{(base / 'log').read_text()[-2000:]}")
    return port


def create_database(port: int, name: str) -> str:
    """A fresh database ``name`` on the bench's PostgreSQL; its SQLAlchemy URL."""
    import psycopg

    dsn = f"host=127.0.0.1 port={port} user=sarcnode dbname=postgres"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return f"postgresql+psycopg://sarcnode@127.0.0.1:{port}/{name}"


def _wait_for(
    what: str, ready: Callable[[], bool], timeout_s: float, alive: Callable[[], bool]
) -> None:
    deadline = time.monotonic() + timeout_s
    while not ready():
        if not alive():
            raise RuntimeError(f"{what}: the process ended first")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not ready after {timeout_s:g} s")
        time.sleep(0.2)


def _started(
    name: str, proc: subprocess.Popen[bytes], log: Path, ready: Callable[[], bool]
) -> None:
    try:
        _wait_for(name, ready, 120, lambda: proc.poll() is None)
    except RuntimeError as exc:
        raise RuntimeError(
            f"{exc}; its log ends:\n{log.read_text(errors='replace')[-2000:]}"
        ) from None


def start_ray(
    sessions: Sessions,
    stack: contextlib.ExitStack,
    root: Path,
    workers: int,
    cpus: int,
    env: dict[str, str],
) -> str:
    """A Ray head and ``workers`` worker nodes of ``cpus`` CPUs on this host; the head's address.

    Each node is started once the one before it is up, with its agent's port
    chosen here: Ray's fixed default (52365) is taken by the first node on a host.
    """
    port = free_port()
    common = ["--block", "--node-ip-address", "127.0.0.1", "--disable-usage-stats"]
    common += ["--object-store-memory", str(256 << 20), "--temp-dir", str(root / "ray")]
    head_only = ["--head", "--port", str(port), "--num-cpus", "0", "--include-dashboard", "false"]
    nodes = [("ray head", head_only)] + [
        (f"ray worker {i}", ["--address", f"127.0.0.1:{port}", "--num-cpus", str(cpus)])
        for i in range(workers)
    ]
    for name, own in nodes:
        log = root / f"{name.replace(' ', '-')}.log"
        agent = ["--dashboard-agent-listen-port", str(free_port())]
        proc = sessions.start(name, [str(RAY), "start", *own, *agent, *common], log, env=env)
        stack.callback(sessions.stop, proc)
        _started(name, proc, log, lambda log=log: "Ray runtime started" in log.read_text())  # type: ignore[misc]
    return f"127.0.0.1:{port}"


def make_studies(folder: Path, count: int, seed: int) -> list[Path]:
    """``count`` synthetic studies (T1 + FS-T2) under ``folder``; their ``dicom`` folders."""
    from pipelines.synth.study import write_study

    made = []
    for i in range(count):
        study = folder / f"study-{i:03d}"
        if not (study / "truth.json").exists():
            write_study(study, seed + i)
        made.append(study / "dicom")
    return made


def pipeline_folder(root: Path) -> Path:
    """The shipped sarcoma-mr pipeline with absolute paths and no wait for the optional T1."""
    shipped = REPO / "config" / "pipelines"
    data = yaml.safe_load((shipped / "sarcoma-mr.yaml").read_text())
    data["trigger"]["roles_file"] = str((shipped / data["trigger"]["roles_file"]).resolve())
    data["trigger"]["wait_for_optional_s"] = 0
    data["segmentation_model"] = str((shipped / data["segmentation_model"]).resolve())
    data["signatures"] = [str((shipped / s).resolve()) for s in data["signatures"]]
    folder = root / "pipelines"
    folder.mkdir()
    (folder / "sarcoma-mr.yaml").write_text(yaml.safe_dump(data))
    return folder


def node_config(root: Path, db_url: str, ray_address: str, slots: int, port: int) -> Path:
    """The node's config file for one run; its path."""
    settings = {
        "dicom": {
            "ae_title": "SARCNODE",
            "bind": "127.0.0.1",
            "port": port,
            "allowed_calling_aes": [SCANNER],
        },
        "storage": {"root": str(root / "storage"), "min_free_mb": 100},
        "database": {"url": db_url},
        "scheduler": {"series_stable_seconds": 2, "tick_seconds": 0.5},
        "logging": {"level": "INFO"},
        "monitoring": {"port": free_port()},
        "jobs": {
            "pipelines_dir": str(pipeline_folder(root)),
            "device": "cpu",
            "max_parallel": slots,
            "executor": {"kind": "ray", "address": ray_address},
        },
        "destinations": [{"name": "archive", "kind": "folder", "path": str(root / "out")}],
        "delivery": {"backoff_base_s": 1, "backoff_max_s": 2},
    }
    config = root / "node.yaml"
    config.write_text(yaml.safe_dump(settings))
    return config


def send(studies: list[Path], port: int) -> float:
    """All studies over one storescu association, back to back; seconds it took."""
    started = time.monotonic()
    subprocess.run(
        [STORESCU, "+sd", "+r", "-aet", SCANNER, "-aec", "SARCNODE", "127.0.0.1", str(port)]
        + [str(s) for s in studies],
        check=True,
        capture_output=True,
        timeout=1800,
        env={**os.environ, "TCP_NODELAY": "1"},
    )
    return time.monotonic() - started


def wait_done(engine: Any, studies: int, timeout_s: float, alive: Callable[[], bool]) -> None:
    """Until every study's job has ended and each done job's results are delivered."""
    from sqlalchemy import func, select

    from node.db.models import Delivery, Job

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not alive():
            raise RuntimeError("serve ended during the run")
        with engine.connect() as conn:
            jobs = conn.execute(select(Job.state, Job.error)).all()
            pending = conn.scalar(
                select(func.count()).select_from(Delivery).where(Delivery.state != "done")
            )
        ended = [j for j in jobs if j.state in ("done", "failed", "dead", "cancelled")]
        bad = [j for j in ended if j.state != "done"]
        if bad:
            raise RuntimeError(f"{len(bad)} job(s) not done: {bad[0].state}: {bad[0].error}")
        if len(jobs) >= studies and len(ended) == len(jobs) and pending == 0:
            return
        time.sleep(1.0)
    raise RuntimeError(f"the {studies} studies not through after {timeout_s:g} s")


def _mean(values: list[float]) -> float:
    return round(sum(values) / len(values), 2) if values else float("nan")


def _ray_nodes(workers: list[str]) -> int:
    """How many raylets (Ray nodes) the stage workers ``ray@host:pid`` hang from."""
    parents = set()
    for worker in workers:
        with contextlib.suppress(OSError, ValueError, IndexError):
            pid = int(worker.rsplit(":", 1)[1])
            parents.add(int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1]))
    return len(parents)


def figures(engine: Any) -> dict[str, Any]:
    """Studies per minute, latencies and per-stage seconds from the node's database."""
    from sqlalchemy import func, select

    from node.db.models import AuditEvent, Delivery, Instance, Job, JobStage, Series, Study

    with engine.connect() as conn:
        first = conn.scalar(select(func.min(Instance.received_at)))
        last_in = dict(
            conn.execute(
                select(Study.study_instance_uid, func.max(Instance.received_at))
                .join(Series, Series.study_id == Study.id)
                .join(Instance, Instance.series_id == Series.id)
                .group_by(Study.study_instance_uid)
            ).all()
        )
        delivered = dict(
            conn.execute(
                select(Delivery.study_instance_uid, func.max(Delivery.delivered_at)).group_by(
                    Delivery.study_instance_uid
                )
            ).all()
        )
        jobs = conn.execute(select(Job.id, Job.study_instance_uid, Job.created_at)).all()
        stages = conn.execute(
            select(JobStage.job_id, JobStage.stage, JobStage.started_at, JobStage.ended_at)
        ).all()
        details = conn.scalars(
            select(AuditEvent.detail).where(AuditEvent.action == "job.stage.done")
        ).all()
    end = max(delivered.values())
    span = (end - first).total_seconds()
    started = {j.id: min(s.started_at for s in stages if s.job_id == j.id) for j in jobs}
    per_stage = {
        name: _mean(
            [(s.ended_at - s.started_at).total_seconds() for s in stages if s.stage == name]
        )
        for name in STAGES
    }
    workers = sorted({json.loads(d).get("worker", "") for d in details})
    return {
        "studies": len(jobs),
        "span_s": round(span, 1),
        "studies_per_min": round(len(jobs) / span * 60, 2),
        "latency_s": _mean(
            [
                (delivered[j.study_instance_uid] - last_in[j.study_instance_uid]).total_seconds()
                for j in jobs
            ]
        ),
        "to_job_s": _mean(
            [(j.created_at - last_in[j.study_instance_uid]).total_seconds() for j in jobs]
        ),
        "queued_s": _mean([(started[j.id] - j.created_at).total_seconds() for j in jobs]),
        "stages_s": per_stage,
        "stage_processes": len(workers),
        "ray_nodes_used": _ray_nodes(workers),
    }


def run_once(
    n: int, cpus: int, studies: list[Path], timeout_s: float, keep: bool
) -> dict[str, Any]:
    """One cluster of ``n`` worker nodes, one node, the studies through it; the figures."""
    from sqlalchemy import create_engine
    from sqlalchemy.pool import NullPool

    bindir = _postgres_bindir()
    assert bindir is not None
    root = Path(tempfile.mkdtemp(prefix=f"scale{n}-"))  # short: Ray's socket paths
    sessions = Sessions()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SARCNODE_", "RAY_"))}
    env |= {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    env |= {"RAY_USAGE_STATS_ENABLED": "0"}
    with contextlib.ExitStack() as stack:
        stack.callback(_report_leftovers, sessions)
        if keep:
            print(f"N={n}: keeping {root} (serve.log, ray-*.log, storage)", file=sys.stderr)
        else:
            stack.callback(shutil.rmtree, root, ignore_errors=True)
        pg = start_postgres(sessions, stack, bindir)
        url = create_database(pg, f"scale_{n}")
        address = start_ray(sessions, stack, root, n, cpus, env)
        port = free_port()
        config = node_config(root, url, address, n * cpus, port)
        serve = sessions.start(
            "serve", [str(SARCNODE), "serve", "--config", str(config)], root / "serve.log", env=env
        )
        stack.callback(sessions.stop, serve)
        heartbeat = root / "storage" / "run" / "serve.json"
        _wait_for("serve", heartbeat.exists, 180, lambda: serve.poll() is None)
        engine = create_engine(url, poolclass=NullPool)
        stack.callback(engine.dispose)
        sent_s = send(studies, port)
        try:
            wait_done(engine, len(studies), timeout_s, lambda: serve.poll() is None)
        except RuntimeError:
            print((root / "serve.log").read_text(errors="replace")[-3000:], file=sys.stderr)
            raise
        return figures(engine) | {"workers": n, "cpus": n * cpus, "send_s": round(sent_s, 1)}


def _report_leftovers(sessions: Sessions) -> None:
    left = sessions.leftovers()
    if left:
        print(f"bench/scale.py: ended processes left over: {', '.join(left)}", file=sys.stderr)


def preflight(cpus: int, workers: list[int]) -> list[str]:
    """What is missing to run (empty when all is there)."""
    missing = []
    if not Path(STORESCU).exists():
        missing.append(f"dcmtk storescu ({STORESCU}; Debian dcmtk)")
    if _postgres_bindir() is None:
        missing.append("PostgreSQL server (/usr/lib/postgresql/*/bin/initdb; Debian postgresql)")
    if not RAY.exists():
        missing.append(f"Ray ({RAY}; pip install -e '.[ray]')")
    if not (REPO / "models" / "sarcnode-seg-demo").is_dir():
        missing.append("the segmentation model models/sarcnode-seg-demo")
    if max(workers) * cpus > (os.cpu_count() or 1):
        print(
            f"note: {max(workers)} x {cpus} CPUs asked on a {os.cpu_count()}-core machine",
            file=sys.stderr,
        )
    return missing


def _terminate(signum: int, _frame: Any) -> None:
    print(f"bench/scale.py: signal {signum}, stopping what it started", file=sys.stderr)
    raise SystemExit(128 + signum)  # unwinds through every clean-up callback


def _print(rows: list[dict[str, Any]]) -> None:
    print(
        f"{'N':>2} {'CPUs':>4} {'studies':>7} {'span s':>7} {'studies/min':>11} "
        f"{'latency s':>9} {'to job s':>8} {'queued s':>8} "
        + " ".join(f"{s:>9}" for s in STAGES)
        + "  ray nodes used"
    )
    for r in rows:
        print(
            f"{r['workers']:>2} {r['cpus']:>4} {r['studies']:>7} {r['span_s']:>7.1f} "
            f"{r['studies_per_min']:>11.2f} {r['latency_s']:>9.1f} {r['to_job_s']:>8.1f} "
            f"{r['queued_s']:>8.1f} "
            + " ".join(f"{r['stages_s'][s]:>9.1f}" for s in STAGES)
            + f"  {r['ray_nodes_used']} of {r['workers']}"
        )
    if len(rows) > 1:
        base = rows[0]["studies_per_min"]
        gains = ", ".join(f"N={r['workers']}: {r['studies_per_min'] / base:.2f}x" for r in rows[1:])
        print(f"against N={rows[0]['workers']}: {gains}")


def main(argv: list[str] | None = None) -> int:
    """Run each N in turn; print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", default="1,2", help="Ray worker node counts, e.g. 1,2,4,8")
    parser.add_argument("--cpus-per-worker", type=int, default=1)
    parser.add_argument("--studies", type=int, default=6, help="M, studies sent per run")
    parser.add_argument("--seed", type=int, default=5000)
    parser.add_argument("--timeout-s", type=float, default=3600, help="per run")
    parser.add_argument("--data", type=Path, help="keep the generated studies here (reused)")
    parser.add_argument("--keep", action="store_true", help="keep each run's folder (logs)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--dry-run", action="store_true", help="check what it needs; start nothing")
    args = parser.parse_args(argv)
    workers = [int(w) for w in args.workers.split(",") if w.strip()]
    if not workers or min(workers) < 1 or args.studies < 1 or args.cpus_per_worker < 1:
        parser.error("--workers, --studies and --cpus-per-worker must be positive")
    missing = preflight(args.cpus_per_worker, workers)
    if missing or args.dry_run:
        for m in missing:
            print(f"bench/scale.py needs {m}", file=sys.stderr)
        if not missing:
            each = f"{args.cpus_per_worker} CPU(s) per worker"
            print(f"would run N = {workers}, {args.studies} studies, {each}")
        return 2 if missing else 0
    # Ctrl-C too when started in the background (a shell leaves SIGINT ignored there).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGHUP, _terminate)
    with contextlib.ExitStack() as stack:
        data = args.data
        if data is None:
            data = Path(tempfile.mkdtemp(prefix="scale-studies-"))
            stack.callback(shutil.rmtree, data, ignore_errors=True)
        studies = make_studies(data, args.studies, args.seed)
        rows, failed = [], ""
        for n in workers:
            print(f"N={n}: {n} Ray worker node(s) x {args.cpus_per_worker} CPU", file=sys.stderr)
            try:
                rows.append(run_once(n, args.cpus_per_worker, studies, args.timeout_s, args.keep))
            except RuntimeError as exc:  # the runs before it still count
                failed = f"N={n}: {exc}"
                break
            print(f"N={n}: {json.dumps(rows[-1])}", file=sys.stderr)
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    if args.json:
        print(
            json.dumps(
                {"date": stamp, "host": platform.node(), "cores": os.cpu_count(), "runs": rows},
                indent=2,
            )
        )
    else:
        print(f"{stamp}, {platform.node()}, {os.cpu_count()} cores, load after {load}")
        _print(rows)
    if failed:
        print(f"bench/scale.py: {failed}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except RuntimeError as exc:
        print(f"bench/scale.py: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        print("bench/scale.py: interrupted; what it started is stopped", file=sys.stderr)
        raise SystemExit(130) from None
