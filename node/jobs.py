"""Jobs: created by the scheduler from stable studies, run stage by stage, resumable.

States: ``queued -> running -> done | failed | dead | cancelled``. A job's
idempotency key is (study, pipeline, the chosen series and their instance
counts): the same study sent again makes the same key and no new job; a new
series, or a re-opened one that grew, makes a new key and the new job
supersedes the older ones of that study and pipeline.

Each stage's outputs are written under the job folder and its
``outputs.json`` marker is renamed into place before the database records
the stage done (one transaction with its audit event), so after ``kill -9``
a restart re-queues running jobs and resumes at the first stage without a
marker. Delivery is idempotent per (object, destination) and object UIDs are
derived from the job key, so nothing is sent twice.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pydicom
from sqlalchemy import select

from node.audit.context import AuditConfig
from node.audit.trail import record
from node.config import Settings
from node.db.models import Instance, Job, JobStage, Series, Study, utcnow
from node.db.session import Database
from node.pipelines import Decision, Pipeline, SeriesInfo, decide
from node.stages import STAGE_FUNCTIONS, BadInput, JobContext, open_database
from pipelines.io.dicom import series_attributes

log = logging.getLogger(__name__)

ACTOR = "node"
PRIORITY_ORDER = {"urgent": 0, "normal": 1, "offpeak": 2}


def job_key(study_uid: str, pipeline: str, chosen: Mapping[str, tuple[str, int]]) -> str:
    """SHA-256 of study, pipeline and (role, series UID, instance count) of the chosen series."""
    parts = [study_uid, pipeline] + [f"{r}={u}:{n}" for r, (u, n) in sorted(chosen.items())]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()


class Scheduler:
    """Turns stable studies into jobs (called on every tick of ``serve``)."""

    def __init__(self, db: Database, settings: Settings, pipelines: Sequence[Pipeline]) -> None:
        """Keep the pipelines and a cache of series headers (read once per series)."""
        self.db, self.settings, self.pipelines = db, settings, list(pipelines)
        self._headers: dict[str, dict[str, Any]] = {}
        # study UID -> (series UID, instance count) pairs already decided on
        self._settled: dict[str, tuple[tuple[str, int], ...]] = {}

    def _attributes(self, root: Path, series_uid: str, path: str, modality: str | None) -> Any:
        if series_uid not in self._headers:
            try:
                ds = pydicom.dcmread(root / path, stop_before_pixels=True)
                self._headers[series_uid] = series_attributes(ds)
            except Exception as exc:
                # An accepted instance may still hold a value pydicom cannot convert
                # (the fuzz suite found ScanningSequence re-typed FL with 2 bytes:
                # BytesLengthException). Unhandled, it ended every scheduler tick, so
                # no study got a job; the series falls back to its modality instead.
                log.warning(
                    "series %s: header not readable for the pipeline rules (%s); "
                    "using its modality only",
                    series_uid,
                    type(exc).__name__,
                )
                self._headers[series_uid] = {"Modality": modality}
        return self._headers[series_uid]

    def tick(self, now: datetime | None = None) -> list[int]:
        """Create the jobs that are due; return their ids."""
        moment = now or utcnow()
        root = self.settings.storage.root
        created = []
        with self.db.session() as s:
            recent = moment - timedelta(days=7)
            studies = s.scalars(select(Study).where(Study.last_received_at >= recent)).all()
            candidates = []
            for study in studies:
                if not study.series or any(x.state != "stable" for x in study.series):
                    continue
                signature = tuple(
                    sorted((x.series_instance_uid, x.instance_count) for x in study.series)
                )
                if self._settled.get(study.study_instance_uid) == signature:
                    continue  # decided before with these very series: nothing new
                infos = []
                for x in study.series:
                    first = s.scalar(
                        select(Instance.path).where(Instance.series_id == x.id).limit(1)
                    )
                    if first is None:
                        continue
                    attrs = dict(self._attributes(root, x.series_instance_uid, first, x.modality))
                    attrs.setdefault("Modality", x.modality)
                    infos.append(
                        SeriesInfo(
                            x.series_instance_uid, attrs, x.instance_count, True, x.stable_at
                        )
                    )
                counts = {x.series_instance_uid: x.instance_count for x in study.series}
                candidates.append((study.study_instance_uid, infos, counts, signature))
        for study_uid, infos, counts, signature in candidates:
            waiting = False
            for pipeline in self.pipelines:
                decision = decide(pipeline, infos, now=moment)
                waiting |= decision.retry_at is not None
                if decision.start:
                    job_id = self._create(study_uid, pipeline, decision, counts)
                    if job_id is not None:
                        created.append(job_id)
            if not waiting:  # final for these series until one changes or a new one comes
                self._settled[study_uid] = signature
        return created

    def _create(
        self, study_uid: str, pipeline: Pipeline, decision: Decision, counts: Mapping[str, int]
    ) -> int | None:
        chosen = {r: (u, counts.get(u, 0)) for r, u in decision.roles.items()}
        key = job_key(study_uid, pipeline.name, chosen)
        now = utcnow()
        with self.db.session() as s:
            if s.scalar(select(Job.id).where(Job.idempotency_key == key)) is not None:
                return None
            job = Job(
                idempotency_key=key,
                study_instance_uid=study_uid,
                pipeline=pipeline.name,
                state="queued",
                priority=pipeline.priority,
                attempts=0,
                created_at=now,
                updated_at=now,
                inputs=json.dumps(decision.roles),
            )
            s.add(job)
            s.flush()
            job.folder = str(self.settings.storage.root / "jobs" / str(job.id))
            for stage in pipeline.stages:
                s.add(JobStage(job_id=job.id, stage=stage, state="pending", attempts=0))
            older = s.scalars(
                select(Job).where(
                    Job.study_instance_uid == study_uid,
                    Job.pipeline == pipeline.name,
                    Job.id != job.id,
                    Job.superseded_by.is_(None),
                )
            ).all()
            for old in older:
                old.superseded_by = job.id
                if old.state == "queued":
                    old.state, old.updated_at = "cancelled", now
            record(
                s,
                "job.created",
                actor=ACTOR,
                study_instance_uid=study_uid,
                detail={
                    "job": job.id,
                    "pipeline": pipeline.name,
                    "roles": decision.roles,
                    "reason": decision.reason,
                    "supersedes": [o.id for o in older],
                },
            )
            return job.id


def recover(db: Database) -> list[int]:
    """At start-up: jobs left ``running`` by a crash go back to ``queued`` (they resume)."""
    with db.session() as s:
        rows = s.scalars(select(Job).where(Job.state == "running")).all()
        for job in rows:
            job.state, job.updated_at = "queued", utcnow()
            record(
                s,
                "job.recovered",
                actor=ACTOR,
                study_instance_uid=job.study_instance_uid,
                detail={"job": job.id, "stage": job.stage},
            )
        return [j.id for j in rows]


def context(db: Database, settings: Settings, job: Job, pipeline: Pipeline) -> JobContext:
    """The picklable context of ``job`` (instance files per role from the index)."""
    inputs: dict[str, str] = json.loads(job.inputs or "{}")
    root = settings.storage.root
    files: dict[str, list[Path]] = {}
    with db.session() as s:
        for role, uid in inputs.items():
            series = s.scalar(select(Series).where(Series.series_instance_uid == uid))
            if series is None:
                raise BadInput(f"series {uid} ({role}) is no longer in the index")
            paths = s.scalars(select(Instance.path).where(Instance.series_id == series.id)).all()
            files[role] = [root / p for p in paths]
    clinical_file = clinical_path(settings, job.study_instance_uid)
    clinical = json.loads(clinical_file.read_text()) if clinical_file.is_file() else {}
    return JobContext(
        job_id=job.id,
        job_key=job.idempotency_key,
        folder=Path(str(job.folder)),
        study_instance_uid=job.study_instance_uid,
        inputs=inputs,
        files=files,
        primary=pipeline.required[0],
        segmentation_model=pipeline.segmentation_model,
        signatures=pipeline.signatures,
        destinations=pipeline.destinations or tuple(d.name for d in settings.destinations),
        database_url=settings.database_url,
        audit=AuditConfig.from_settings(settings),
        uid_root=settings.uids.root,
        device=settings.jobs.device,
        clinical=clinical,
    )


def clinical_path(settings: Settings, study_uid: str) -> Path:
    """Where ``sarcnode clinical set`` keeps a study's clinical factors (JSON)."""
    from node.dicom.validate import validate_uid

    ok, reason = validate_uid(study_uid)
    if not ok:
        raise ValueError(f"Study Instance UID {study_uid!r}: {reason}")
    return settings.storage.root / "clinical" / f"{study_uid}.json"


def rescore(db: Database, study_uid: str, *, actor: str) -> int | None:
    """Queue the study's latest finished job again from its score stage; return its id."""
    later = ("score", "encode", "deliver")
    with db.session() as s:
        job = s.scalars(
            select(Job)
            .where(
                Job.study_instance_uid == study_uid,
                Job.superseded_by.is_(None),
                Job.state.in_(("done", "failed")),
            )
            .order_by(Job.id.desc())
        ).first()
        if job is None:
            return None
        for row in s.scalars(select(JobStage).where(JobStage.job_id == job.id)):
            if row.stage in later:
                row.state, row.outputs, row.error = "pending", None, None
                (Path(str(job.folder)) / row.stage / "outputs.json").unlink(missing_ok=True)
        job.state, job.attempts, job.error, job.finished_at = "queued", 0, None, None
        job.updated_at = utcnow()
        record(s, "job.rescore", actor=actor, study_instance_uid=study_uid, detail={"job": job.id})
        return job.id


_GPU_LOCK: Any = None


def _init_worker(lock: Any, owner: int) -> None:
    """Worker set-up: the GPU lock, and a watchdog so no worker outlives the node.

    Workers are children of the forkserver, not of ``serve``; after ``kill -9``
    of ``serve`` they (and the forkserver) would live on and could finish a
    stage the restarted node runs again. The watchdog checks ``owner`` (the
    node's PID) every half second and then ends the forkserver and itself.
    """
    global _GPU_LOCK
    _GPU_LOCK = lock

    def watch() -> None:
        import signal

        while True:
            time.sleep(0.5)
            try:
                os.kill(owner, 0)
            except ProcessLookupError:
                parent = os.getppid()
                if parent not in (1, owner):
                    with contextlib.suppress(OSError):
                        os.kill(parent, signal.SIGKILL)  # the orphaned forkserver
                os._exit(70)

    threading.Thread(target=watch, name="owner-watchdog", daemon=True).start()


def _worker() -> str:
    """Which executor and process ran a stage (``ray@host:pid`` or ``local@host:pid``)."""
    import socket
    import sys

    kind = "local"
    if "ray" in sys.modules:
        import ray

        kind = "ray" if ray.is_initialized() else "local"
    return f"{kind}@{socket.gethostname()}:{os.getpid()}"


def _fault_pause(stage: str) -> None:
    """Fault injection for crash tests: ``SARCNODE_FAULT_PAUSE=<stage>:<seconds>``.

    Sleeps after the stage's work and before its outputs are committed, so a
    test can ``kill -9`` the node at a known point of a known stage.
    """
    spec = os.environ.get("SARCNODE_FAULT_PAUSE", "")
    name, _, seconds = spec.partition(":")
    if name == stage and seconds:
        time.sleep(float(seconds))


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    """Write JSON atomically (temp file, fsync, rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.part")
    with temp.open("w") as f:
        json.dump(data, f, indent=2, default=str)
        f.flush()
        os.fsync(f.fileno())
    temp.replace(path)


def _write_marker(folder: Path, outputs: Mapping[str, Any]) -> None:
    _write_json(folder / "outputs.json", outputs)


def execute(ctx: JobContext, stages: Sequence[str], max_attempts: int) -> str:
    """Run the job's stages from the first unfinished one; return the job's final state."""
    from node.stages import GPU_STAGES

    transient: tuple[type[BaseException], ...] = (OSError, RuntimeError, MemoryError)
    bad_input = _bad_input_errors()
    db = open_database(ctx)
    try:
        for stage in stages:
            marker = ctx.folder / stage / "outputs.json"
            with db.session() as s:
                row = s.scalar(
                    select(JobStage).where(JobStage.job_id == ctx.job_id, JobStage.stage == stage)
                )
                job = s.get(Job, ctx.job_id)
                assert row is not None and job is not None
                if job.state == "cancelled":
                    return "cancelled"
                if row.state == "done" and marker.is_file():
                    continue
                row.state, row.attempts, row.started_at = "running", row.attempts + 1, utcnow()
                job.state, job.stage, job.updated_at = "running", stage, utcnow()
                job.started_at = job.started_at or utcnow()
                record(
                    s,
                    "job.stage.started",
                    actor=ACTOR,
                    study_instance_uid=ctx.study_instance_uid,
                    detail={"job": ctx.job_id, "stage": stage, "attempt": row.attempts},
                )
            _write_json(
                ctx.folder / "running.json",
                {"stage": stage, "pid": os.getpid(), "started": time.time()},
            )
            try:
                if stage in GPU_STAGES and _GPU_LOCK is not None and ctx.device != "cpu":
                    with _GPU_LOCK:
                        outputs = STAGE_FUNCTIONS[stage](ctx)
                else:
                    outputs = STAGE_FUNCTIONS[stage](ctx)
            except bad_input as exc:
                _fail(db, ctx, stage, f"{type(exc).__name__}: {exc}", final="failed")
                return "failed"
            except transient as exc:
                return _fail(
                    db,
                    ctx,
                    stage,
                    f"{type(exc).__name__}: {exc}",
                    final=None,
                    max_attempts=max_attempts,
                )
            _fault_pause(stage)
            _write_marker(ctx.folder / stage, outputs)
            with db.session() as s:
                row = s.scalar(
                    select(JobStage).where(JobStage.job_id == ctx.job_id, JobStage.stage == stage)
                )
                assert row is not None
                row.state, row.ended_at = "done", utcnow()
                row.outputs, row.error = json.dumps(outputs, default=str), None
                seconds = (row.ended_at - (row.started_at or row.ended_at)).total_seconds()
                record(
                    s,
                    "job.stage.done",
                    actor=ACTOR,
                    study_instance_uid=ctx.study_instance_uid,
                    detail={
                        "job": ctx.job_id,
                        "stage": stage,
                        "seconds": round(seconds, 2),
                        "worker": _worker(),
                    },
                )
        with db.session() as s:
            job = s.get(Job, ctx.job_id)
            assert job is not None
            job.state, job.finished_at, job.updated_at, job.error = "done", utcnow(), utcnow(), None
            record(
                s,
                "job.done",
                actor=ACTOR,
                study_instance_uid=ctx.study_instance_uid,
                detail={"job": ctx.job_id},
            )
        return "done"
    finally:
        db.dispose()


def _bad_input_errors() -> tuple[type[BaseException], ...]:
    from pipelines.encode.seg import EncodeError
    from pipelines.radiomics.extract import ExtractionError
    from pipelines.segment.card import ModelError
    from pipelines.signature.card import ScoreError

    return (BadInput, EncodeError, ExtractionError, ScoreError, ModelError, ValueError, KeyError)


def _fail(
    db: Database,
    ctx: JobContext,
    stage: str,
    error: str,
    *,
    final: str | None,
    max_attempts: int = 1,
) -> str:
    """Record a failed stage: ``failed`` for bad input, else re-queued until ``max_attempts``."""
    with db.session() as s:
        row = s.scalar(
            select(JobStage).where(JobStage.job_id == ctx.job_id, JobStage.stage == stage)
        )
        job = s.get(Job, ctx.job_id)
        assert row is not None and job is not None
        row.state, row.ended_at, row.error = "failed", utcnow(), error[:2000]
        job.attempts += 1
        state = final or ("dead" if job.attempts >= max_attempts else "queued")
        job.state, job.error, job.updated_at = state, f"{stage}: {error}"[:2000], utcnow()
        if state in ("failed", "dead"):
            job.finished_at = utcnow()
        record(
            s,
            f"job.{'stage.failed' if state == 'queued' else state}",
            actor=ACTOR,
            outcome="failed",
            study_instance_uid=ctx.study_instance_uid,
            detail={
                "job": ctx.job_id,
                "stage": stage,
                "error": error[:500],
                "attempts": job.attempts,
                "state": state,
            },
        )
        return state


class Runner:
    """The local executor: queued jobs run in a process pool, ``jobs.max_parallel`` at a time."""

    def __init__(self, db: Database, settings: Settings, pipelines: Sequence[Pipeline]) -> None:
        """Start nothing yet; :meth:`tick` claims and submits."""
        self.db, self.settings = db, settings
        self.pipelines = {p.name: p for p in pipelines}
        self.running: dict[int, Any] = {}
        self._mutex = threading.Lock()
        self._start()

    def _start(self) -> None:
        import multiprocessing

        context_mp = multiprocessing.get_context("forkserver")
        self._lock = context_mp.Lock()
        self.pool = ProcessPoolExecutor(
            max_workers=self.settings.jobs.max_parallel,
            mp_context=context_mp,
            initializer=_init_worker,
            initargs=(self._lock, os.getpid()),
        )

    def _submit(self, ctx: JobContext, stages: list[str]) -> Any:
        return self.pool.submit(execute, ctx, stages, self.settings.jobs.max_attempts)

    @staticmethod
    def _finished(handle: Any) -> tuple[bool, BaseException | None]:
        future: Future[str] = handle
        if not future.done():
            return False, None
        return True, future.exception()

    def tick(self, now: datetime | None = None) -> list[int]:
        """Forget finished futures, then submit queued jobs while slots are free."""
        with self._mutex:
            for job_id, handle in list(self.running.items()):
                finished, error = self._finished(handle)
                if finished:
                    del self.running[job_id]
                    if error is not None:
                        self._crashed(job_id, repr(error))
            self._enforce_timeouts()
            submitted = []
            while len(self.running) < self.settings.jobs.max_parallel:
                claimed = self._claim(now or utcnow())
                if claimed is None:
                    break
                submitted.append(claimed)
            return submitted

    def _claim(self, now: datetime) -> int | None:
        with self.db.session() as s:
            queued = s.scalars(select(Job).where(Job.state == "queued")).all()
            due = [
                j
                for j in queued
                if j.id not in self.running
                and j.pipeline in self.pipelines
                and (
                    j.attempts == 0
                    or j.updated_at
                    + timedelta(seconds=self.settings.jobs.retry_base_s * 2 ** (j.attempts - 1))
                    <= now
                )
                and (j.priority != "offpeak" or self.settings.jobs.in_offpeak(now))
            ]
            if not due:
                return None
            job = min(due, key=lambda j: (PRIORITY_ORDER.get(j.priority, 1), j.created_at, j.id))
            pipeline = self.pipelines[job.pipeline]
            stages = [
                r.stage
                for r in s.scalars(
                    select(JobStage).where(JobStage.job_id == job.id).order_by(JobStage.id)
                )
            ]
            job_id = job.id
        try:
            ctx = context(self.db, self.settings, job, pipeline)
        except BadInput as exc:
            with self.db.session() as s:
                row = s.get(Job, job_id)
                assert row is not None
                row.state, row.error, row.finished_at = "failed", str(exc), utcnow()
                record(
                    s,
                    "job.failed",
                    actor=ACTOR,
                    outcome="failed",
                    study_instance_uid=row.study_instance_uid,
                    detail={"job": job_id, "error": str(exc)},
                )
            return job_id
        self.running[job_id] = self._submit(ctx, stages or list(pipeline.stages))
        return job_id

    def _enforce_timeouts(self) -> None:
        """Kill a stage that runs past its pipeline's limit; the job retries or goes dead."""
        for job_id in list(self.running):
            with self.db.session() as s:
                job = s.get(Job, job_id)
                folder = Path(str(job.folder)) if job is not None and job.folder else None
                pipeline = self.pipelines.get(job.pipeline) if job is not None else None
            if folder is None or pipeline is None:
                continue
            try:
                info = json.loads((folder / "running.json").read_text())
            except (OSError, ValueError):
                continue
            stage = str(info.get("stage"))
            limit = pipeline.timeouts_s.get(stage)
            if limit is None or time.time() - float(info.get("started", 0)) <= limit:
                continue
            self._kill(self.running.pop(job_id), int(info.get("pid", 0)))
            self._timed_out(job_id, stage, limit)

    def _kill(self, handle: Any, pid: int) -> None:
        """Stop the process running a stage (the local pool is rebuilt: it breaks)."""
        import signal

        if pid > 0:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        self.pool.shutdown(wait=False, cancel_futures=True)
        self._start()

    def _timed_out(self, job_id: int, stage: str, limit: float) -> None:
        with self.db.session() as s:
            job = s.get(Job, job_id)
            row = s.scalar(
                select(JobStage).where(JobStage.job_id == job_id, JobStage.stage == stage)
            )
            if job is None or row is None:
                return
            error = f"{stage} timed out after {limit:g} s"
            row.state, row.ended_at, row.error = "failed", utcnow(), error
            job.attempts += 1
            job.state = "dead" if job.attempts >= self.settings.jobs.max_attempts else "queued"
            job.error, job.updated_at = error, utcnow()
            if job.state == "dead":
                job.finished_at = utcnow()
            record(
                s,
                "job.stage.timeout",
                actor=ACTOR,
                outcome="failed",
                study_instance_uid=job.study_instance_uid,
                detail={"job": job_id, "stage": stage, "limit_s": limit, "state": job.state},
            )

    def _crashed(self, job_id: int, error: str) -> None:
        """A worker died under the job (not an error the stage raised): re-queue it."""
        with self.db.session() as s:
            job = s.get(Job, job_id)
            if job is None or job.state != "running":
                return
            job.attempts += 1
            job.state = "dead" if job.attempts >= self.settings.jobs.max_attempts else "queued"
            job.error, job.updated_at = f"worker crashed: {error}"[:2000], utcnow()
            record(
                s,
                "job.worker_crashed",
                actor=ACTOR,
                outcome="failed",
                study_instance_uid=job.study_instance_uid,
                detail={"job": job_id, "state": job.state},
            )

    def shutdown(self) -> None:
        """Stop accepting work; running stages are abandoned (they resume after restart)."""
        self.pool.shutdown(wait=False, cancel_futures=True)

    def stop(self, grace_s: float) -> list[int]:
        """Give running jobs ``grace_s`` to finish, then end their workers.

        Returns the jobs still running at the deadline: their stage's work since
        its last checkpoint is lost, and the caller re-queues them
        (:func:`recover`), so the next start resumes them at that stage.
        """
        with self._mutex:
            deadline = time.monotonic() + grace_s
            while time.monotonic() < deadline and not all(
                self._finished(h)[0] for h in self.running.values()
            ):
                time.sleep(0.1)
            left = [j for j, h in self.running.items() if not self._finished(h)[0]]
            self._terminate()
            return left

    def _terminate(self) -> None:
        # The pool's worker processes (a private attribute of ProcessPoolExecutor:
        # shutdown() alone lets a running stage go on and the interpreter wait for it).
        processes = dict(getattr(self.pool, "_processes", None) or {})
        self.pool.shutdown(wait=False, cancel_futures=True)
        for process in processes.values():
            with contextlib.suppress(OSError, ValueError):
                process.kill()


class RayRunner(Runner):
    """The Ray executor: the same :func:`execute` as a Ray task, GPUs as Ray resources.

    With ``jobs.executor.address`` it joins that cluster (``ray://head:10001``
    or ``auto``); without, it starts a local Ray instance. A job whose device
    is CUDA asks Ray for one GPU, so Ray runs one such job per GPU at a time.
    Workers reach the database and the job folders by the same URL and paths,
    so on a multi-machine cluster these must be shared (PostgreSQL and a
    shared file system).
    """

    def _start(self) -> None:
        import ray

        executor = self.settings.jobs.executor
        if not ray.is_initialized():
            if executor.address:
                ray.init(address=executor.address, include_dashboard=False)
            else:
                ray.init(num_cpus=executor.num_cpus, include_dashboard=False)
        self._task = ray.remote(execute)

    def _submit(self, ctx: JobContext, stages: list[str]) -> Any:
        gpus = 1 if ctx.device == "cuda" else 0
        return self._task.options(num_gpus=gpus, max_retries=0).remote(
            ctx, stages, self.settings.jobs.max_attempts
        )

    @staticmethod
    def _finished(handle: Any) -> tuple[bool, BaseException | None]:
        import ray

        ready, _ = ray.wait([handle], timeout=0)
        if not ready:
            return False, None
        try:
            ray.get(handle)
        except Exception as exc:  # a worker died, or the task raised (not a stage error)
            return True, exc
        return True, None

    def _kill(self, handle: Any, pid: int) -> None:
        import ray

        ray.cancel(handle, force=True)

    def _terminate(self) -> None:
        for handle in self.running.values():
            self._kill(handle, 0)
        self.shutdown()

    def shutdown(self) -> None:
        """Leave the cluster (a local instance stops with it)."""
        import ray

        if ray.is_initialized():
            ray.shutdown()


def make_runner(db: Database, settings: Settings, pipelines: Sequence[Pipeline]) -> Runner:
    """The executor the configuration names (``jobs.executor.kind``)."""
    if settings.jobs.executor.kind == "ray":
        return RayRunner(db, settings, pipelines)
    return Runner(db, settings, pipelines)
