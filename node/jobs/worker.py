"""What runs in a job worker process: its set-up, the GPU lock, and one job's stages.

Each stage's outputs are written under the job folder and its
``outputs.json`` marker is renamed into place before the database records
the stage done (one transaction with its audit event), so after ``kill -9``
a restart re-queues running jobs and resumes at the first stage without a
marker. Delivery is idempotent per (object, destination) and object UIDs are
derived from the job key, so nothing is sent twice.

Errors are classified once (:data:`bad_input_errors`): bad input fails the
job at once with its reason; anything else a stage raises is an internal
error, logged here with its traceback (also in the audit detail) and retried
under the retry policy until the job is ``dead``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import time
import traceback
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from node.audit.trail import record
from node.db.models import Job, JobStage
from node.db.session import Database
from node.jobs import state
from node.stages import (
    GPU_STAGES,
    STAGE_FUNCTIONS,
    JobContext,
    Warm,
    drop_volumes,
    open_database,
    warm_up,
)
from node.testing import Fault, fault_hook
from pipelines.errors import BadInput
from pipelines.owner import watch_owner

log = logging.getLogger("node.jobs")

#: Where this worker's GPU lock files live (set by :func:`init_worker`; None: no lock).
_LOCK_DIR: Path | None = None
#: How much of a traceback the audit detail keeps (its end: where it was raised).
TRACEBACK_CHARS = 4000


def init_worker(
    lock_dir: Path | None,
    owner: int,
    log_level: str,
    log_file: Path | None,
    warm: Warm | None = None,
) -> None:
    """Worker set-up: logging as the node's, the GPU lock folder, an owner watchdog, warm-up.

    Workers are children of the forkserver, not of ``serve``; after ``kill -9``
    of ``serve`` they (and the forkserver) would live on and could finish a
    stage the restarted node runs again. The watchdog checks ``owner`` (the
    node's PID) every half second and then ends the forkserver and itself.
    ``warm`` names what to load before the first job
    (:func:`node.stages.warm_up`); a warm-up that fails is logged and left
    to the first job, it never stops the worker.
    """
    from node.logs import setup_logging

    global _LOCK_DIR
    _LOCK_DIR = lock_dir
    setup_logging(log_level, log_file)

    watch_owner(owner, end_forkserver=True)
    if warm is not None:
        try:
            warm_up(warm)
        except Exception:
            log.exception("job worker warm-up failed: the first job loads what it needs")


def ready() -> int:
    """A task that does nothing: submitted to start a worker ahead of the first job."""
    return os.getpid()


@contextlib.contextmanager
def gpu_lock(lock_dir: Path | None, device: str) -> Iterator[None]:
    """Hold the lock of ``device``'s GPU (one file lock per CUDA device index) for the block.

    A file lock under the storage root outlives any pool: after a time-out
    kill rebuilds the pool, a worker of the old pool still running a GPU stage
    and one of the new pool take the same lock, and the kernel releases it
    when its holder dies. No lock for ``cpu`` or without a lock folder.
    """
    if lock_dir is None or device == "cpu":
        yield
        return
    index = device.partition(":")[2] or "0"
    lock_dir.mkdir(parents=True, exist_ok=True)
    with (lock_dir / f"gpu-{index}.lock").open("a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def worker_name() -> str:
    """Which executor and process ran a stage (``ray@host:pid`` or ``local@host:pid``)."""
    import socket
    import sys

    kind = "local"
    if "ray" in sys.modules:
        import ray

        kind = "ray" if ray.is_initialized() else "local"
    return f"{kind}@{socket.gethostname()}:{os.getpid()}"


def bad_input_errors() -> tuple[type[Exception], ...]:
    """The errors that fail a job at once: the study (or the model it needs) is the problem.

    :class:`pipelines.errors.BadInput` and the stages' own named errors whose
    message is the reason; never ``ValueError`` or ``KeyError`` as such (a bug
    raises those, and it is retried and logged with its traceback).
    """
    from pipelines.encode.seg import EncodeError
    from pipelines.radiomics.extract import ExtractionError
    from pipelines.segment.card import ModelError
    from pipelines.signature.card import ScoreError

    return (BadInput, EncodeError, ExtractionError, ScoreError, ModelError)


def write_json(path: Path, data: Mapping[str, Any]) -> None:
    """Write JSON atomically (temp file, fsync, rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.part")
    with temp.open("w") as f:
        json.dump(data, f, indent=2, default=str)
        f.flush()
        os.fsync(f.fileno())
    temp.replace(path)


def execute(
    ctx: JobContext,
    stages: Sequence[str],
    max_attempts: int = 3,
    policy: state.RetryPolicy | None = None,
) -> str:
    """Run the job's stages from the first unfinished one; return the job's state after it.

    ``policy`` is the node's retry policy (the runner passes it; without one,
    the default policy with ``max_attempts``): an internal error on the last
    allowed attempt makes the job ``dead``, before it ``queued`` again, due
    after the policy's back-off.
    """
    policy = policy or state.RetryPolicy(max_attempts=max_attempts)
    fault = fault_hook()
    bad_input = bad_input_errors()
    db = open_database(ctx)
    try:
        for stage in stages:
            began = _begin(db, ctx, stage)
            if began == "skip":
                continue
            if began != "run":
                return began
            try:
                outputs = _run(ctx, stage, fault)
            except bad_input as exc:
                return _failed(db, ctx, stage, "reject", exc, policy)
            except Exception as exc:
                return _failed(db, ctx, stage, "error", exc, policy)
            if fault is not None:
                fault.before_checkpoint(stage)
            write_json(ctx.folder / stage / "outputs.json", outputs)
            _stage_done(db, ctx, stage, outputs)
        return _end(db, ctx)
    finally:
        db.dispose()


def _rows(s: Session, ctx: JobContext, stage: str) -> tuple[Job, JobStage]:
    row = s.scalar(select(JobStage).where(JobStage.job_id == ctx.job_id, JobStage.stage == stage))
    job = s.get(Job, ctx.job_id)
    assert row is not None and job is not None, f"job {ctx.job_id} or its {stage} stage is gone"
    return job, row


def _begin(db: Database, ctx: JobContext, stage: str) -> str:
    """Start ``stage``: "run", "skip" (checkpointed before), or the state that stops the job."""
    with db.session() as s:
        job, row = _rows(s, ctx, stage)
        if not state.allowed(job.state, "start"):
            return job.state  # cancelled (or retried by hand) while the last stage ran
        if state.stage_is_done(row) and (ctx.folder / stage / "outputs.json").is_file():
            return "skip"
        state.stage_started(row)
        state.transition(s, job, "start", stage=stage, detail={"attempt": row.attempts})
    write_json(
        ctx.folder / "running.json", {"stage": stage, "pid": os.getpid(), "started": time.time()}
    )
    return "run"


def _run(ctx: JobContext, stage: str, fault: Fault | None) -> dict[str, Any]:
    """The stage's work, under the GPU lock when it is a GPU stage."""
    lock_dir = _LOCK_DIR if stage in GPU_STAGES else None
    with gpu_lock(lock_dir, ctx.device):
        if fault is not None:
            fault.before_stage(stage)
        return STAGE_FUNCTIONS[stage](ctx)


def _failed(
    db: Database,
    ctx: JobContext,
    stage: str,
    event: str,
    exc: Exception,
    policy: state.RetryPolicy,
) -> str:
    """Record a stage's failure: bad input ``failed`` at once, an internal error retried."""
    error = f"{type(exc).__name__}: {exc}"
    detail: dict[str, Any] = {}
    if event == "error":
        from node.logs import scrub_traceback

        text = "".join(traceback.format_exception(exc))
        detail["traceback"] = scrub_traceback(text)[-TRACEBACK_CHARS:]
        log.error("job %d: internal error in the %s stage", ctx.job_id, stage, exc_info=exc)
    with db.session() as s:
        job, row = _rows(s, ctx, stage)
        state.stage_failed(row, error)
        if job.state != state.RUNNING:
            return job.state  # cancelled meanwhile: it stays so
        if event == "reject":
            return state.transition(s, job, "reject", error=error, stage=stage)
        return state.fail_attempt(s, job, "error", policy, error=error, stage=stage, detail=detail)


def _stage_done(db: Database, ctx: JobContext, stage: str, outputs: Mapping[str, Any]) -> None:
    with db.session() as s:
        _, row = _rows(s, ctx, stage)
        state.stage_done(row, json.dumps(outputs, default=str))
        assert row.ended_at is not None
        seconds = (row.ended_at - (row.started_at or row.ended_at)).total_seconds()
        record(
            s,
            "job.stage.done",
            actor=state.ACTOR,
            study_instance_uid=ctx.study_instance_uid,
            detail={
                "job": ctx.job_id,
                "stage": stage,
                "seconds": round(seconds, 2),
                "worker": worker_name(),
            },
        )


def _end(db: Database, ctx: JobContext) -> str:
    with db.session() as s:
        job = s.get(Job, ctx.job_id)
        assert job is not None
        if not state.allowed(job.state, "finish"):
            return job.state  # cancelled while its last stage ran
        ended = state.transition(s, job, "finish")
    drop_volumes(ctx)  # the decoded series are not kept with a finished job's results
    return ended
