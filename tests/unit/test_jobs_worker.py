"""One job's run in process: errors classified, retry then dead, supersede, GPU lock, outbox.

A fault is injected through the test hook (:mod:`node.testing`) inside the
stage, so no model runs: what is tested is what the worker and the state
machine make of the exception, on a node database made by the migrations.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import random
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest
from sqlalchemy import select

from node.config import DeliverySettings, Settings
from node.db.models import AuditEvent, Delivery, Job, JobStage, utcnow
from node.db.session import Database
from node.jobs import RetryPolicy, Scheduler, execute
from node.jobs.worker import gpu_lock
from node.pipelines import Decision, Pipeline
from node.stages import JobContext
from node.testing import Fault, inject, parse

STAGES = ["segment", "encode"]


@pytest.fixture()
def job(tmp_path: Path) -> tuple[Database, JobContext]:
    """A queued job of two stages on a fresh SQLite index, and its context."""
    url = f"sqlite:///{tmp_path / 'index.db'}"
    db = Database(url)
    now = utcnow()
    with db.session() as s:
        row = Job(
            idempotency_key="worker-test",
            study_instance_uid="1.2.826.0.1.3680043.8.498.1",
            pipeline="sarcoma-mr",
            state="queued",
            attempts=0,
            created_at=now,
            updated_at=now,
            inputs="{}",
            folder=str(tmp_path / "jobs" / "1"),
        )
        s.add(row)
        s.flush()
        for stage in STAGES:
            s.add(JobStage(job_id=row.id, stage=stage, state="pending", attempts=0))
        job_id = row.id
    ctx = JobContext(
        job_id=job_id,
        job_key="worker-test",
        folder=tmp_path / "jobs" / "1",
        study_instance_uid="1.2.826.0.1.3680043.8.498.1",
        inputs={},
        files={},
        primary="T2FS",
        segmentation_model=tmp_path / "no-model",
        signatures=(),
        destinations=(),
        database_url=url,
        device="cpu",
    )
    yield db, ctx
    db.dispose()


def _audit(db: Database, action: str) -> list[dict[str, object]]:
    with db.session() as s:
        rows = s.scalars(select(AuditEvent).where(AuditEvent.action == action)).all()
        return [json.loads(r.detail) for r in rows]


def test_a_bug_in_a_stage_is_retried_then_dead_with_its_traceback(
    job: tuple[Database, JobContext], caplog: pytest.LogCaptureFixture
) -> None:
    db, ctx = job
    caplog.set_level(logging.INFO, logger="node.jobs")
    with inject(Fault("segment", raises="KeyError")):
        policy = RetryPolicy(max_attempts=3, base_s=5, cap_s=60, jitter=0)  # as the runner's
        states = [execute(ctx, STAGES, policy=policy) for _ in range(3)]
    assert states == ["queued", "queued", "dead"]
    with db.session() as s:
        row = s.get(Job, ctx.job_id)
        assert row is not None
        assert (row.state, row.attempts) == ("dead", 3)
        assert (
            row.error == "segment: KeyError: 'injected by SARCNODE_TEST_FAULT in the segment stage'"
        )
        stages = {r.stage: (r.state, r.attempts) for r in s.scalars(select(JobStage))}
    assert stages == {"segment": ("failed", 3), "encode": ("pending", 0)}
    retried = _audit(db, "job.stage.failed")
    (dead,) = _audit(db, "job.dead")
    assert [d["state"] for d in retried] == ["queued", "queued"] and dead["state"] == "dead"
    assert [d["retry_in_s"] for d in retried] == [5, 10]  # the policy passed, not a default
    for detail in [*retried, dead]:
        text = str(detail["traceback"])
        assert text.startswith("Traceback (most recent call last):")
        assert 'node/testing.py", line' in text  # where it was raised
        assert text.rstrip().endswith("KeyError: '<value withheld>'")  # scrubbed as log lines
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 3 and all(r.exc_info and r.exc_info[0] is KeyError for r in errors)
    assert "internal error in the segment stage" in errors[0].getMessage()
    assert "running -> dead (error at segment)" in caplog.text


def test_a_geometry_error_fails_the_job_at_once_with_its_reason(
    job: tuple[Database, JobContext], caplog: pytest.LogCaptureFixture
) -> None:
    db, ctx = job
    with inject(Fault("segment", raises="GeometryError")):
        assert execute(ctx, STAGES, max_attempts=3) == "failed"
    with db.session() as s:
        row = s.get(Job, ctx.job_id)
        assert row is not None
        assert row.state == "failed" and row.attempts == 1 and row.finished_at is not None
        assert row.error == (
            "segment: GeometryError: injected by SARCNODE_TEST_FAULT in the segment stage"
        )
    (failed,) = _audit(db, "job.failed")
    assert failed["stage"] == "segment" and "traceback" not in failed
    assert str(failed["error"]).startswith("GeometryError: ")
    assert not any(r.levelno >= logging.ERROR for r in caplog.records)  # not a bug: no traceback
    assert _audit(db, "job.stage.failed") == []


def test_a_cancelled_job_starts_no_further_stage(job: tuple[Database, JobContext]) -> None:
    db, ctx = job
    with db.session() as s:
        row = s.get(Job, ctx.job_id)
        assert row is not None
        row.state = "cancelled"  # as `sarcnode jobs cancel` leaves it
    assert execute(ctx, STAGES, max_attempts=3) == "cancelled"
    assert _audit(db, "job.stage.started") == []


@pytest.mark.parametrize(
    "spec", ["segment", "segment:pause", "segment:raise=SystemExit", ":pause=1", "x:pause=-1"]
)
def test_a_malformed_fault_is_refused_not_ignored(spec: str) -> None:
    with pytest.raises(ValueError, match="SARCNODE_TEST_FAULT"):
        parse(spec)


def test_a_new_series_supersedes_the_queued_job(tmp_path: Path) -> None:
    settings = Settings.model_validate(
        {"storage": {"root": str(tmp_path)}, "database": {"url": f"sqlite:///{tmp_path}/i.db"}}
    )
    db = Database(settings.database_url)
    pipeline = Pipeline(
        name="sarcoma-mr",
        path=tmp_path / "p.yaml",
        modality="MR",
        series_rule=None,
        roles={},  # type: ignore[arg-type]  # not read by job creation
        required=("T2FS",),
        optional=(),
        wait_for_optional_s=0,
        priority="normal",
        stages=("segment",),
        segmentation_model=tmp_path,
        signatures=(),
        destinations=(),
    )
    scheduler = Scheduler(db, settings, [pipeline])
    decision = Decision("sarcoma-mr", True, "ready", roles={"T2FS": "1.2.3"})
    first = scheduler._create("1.2", pipeline, decision, {"1.2.3": 10})
    assert scheduler._create("1.2", pipeline, decision, {"1.2.3": 10}) is None  # same key
    second = scheduler._create("1.2", pipeline, decision, {"1.2.3": 12})  # the series grew
    with db.session() as s:
        jobs = {j.id: (j.state, j.superseded_by) for j in s.scalars(select(Job))}
    assert jobs == {first: ("cancelled", second), second: ("queued", None)}
    assert _audit(db, "job.superseded") == [{"job": first, "by": second}]
    db.dispose()


def _hold(folder: str, seconds: float) -> tuple[float, float]:
    with gpu_lock(Path(folder), "cuda"):
        start = time.monotonic()
        time.sleep(seconds)
        return start, time.monotonic()


def test_the_gpu_lock_is_shared_by_a_pool_and_the_pool_that_replaces_it(tmp_path: Path) -> None:
    """As after a time-out kill: the old pool's worker still runs, the new pool's waits."""
    context = multiprocessing.get_context("fork")
    old = ProcessPoolExecutor(1, mp_context=context)
    first = old.submit(_hold, str(tmp_path), 1.0)
    time.sleep(0.3)  # the old worker holds the lock
    old.shutdown(wait=False)
    new = ProcessPoolExecutor(1, mp_context=context)
    second = new.submit(_hold, str(tmp_path), 0.1)
    (_, a_end), (b_start, _) = first.result(timeout=30), second.result(timeout=30)
    new.shutdown()
    assert b_start >= a_end  # never both at once
    assert (tmp_path / "gpu-0.lock").is_file()


def _delivery(db: Database, attempts: int = 0) -> int:
    now = utcnow()
    with db.session() as s:
        row = Delivery(
            sop_instance_uid="1.2.3.9",
            path="/x.dcm",
            destination="pacs",
            state="pending",
            attempts=attempts,
            created_at=now,
            updated_at=now,
            next_attempt_at=now,
        )
        s.add(row)
        s.flush()
        return row.id


@pytest.mark.parametrize(
    ("attempts", "error", "commitment", "state", "wait"),
    [
        (0, None, None, "done", None),
        (0, None, "1.2.3.77", "committing", None),
        (0, "refused 0xA700", None, "pending", (8.0, 12.0)),  # 10 s +/- 20 %
        (2, "refused 0xA700", None, "pending", (32.0, 48.0)),  # third failure: 40 s
        (3, "refused 0xA700", None, "dead", None),  # the fourth of four attempts
    ],
)
def test_the_outbox_settles_an_attempt(
    tmp_path: Path,
    attempts: int,
    error: str | None,
    commitment: str | None,
    state: str,
    wait: tuple[float, float] | None,
) -> None:
    from node.delivery import _settle

    db = Database(f"sqlite:///{tmp_path / 'index.db'}")
    policy = DeliverySettings(max_attempts=4, backoff_base_s=10, backoff_max_s=60, jitter=0.2)
    delivery_id = _delivery(db, attempts)
    outcome = _settle(db, delivery_id, error, policy, random.Random(7), commitment=commitment)
    assert (outcome.ok, outcome.state) == (error is None, state)
    with db.session() as s:
        row = s.get(Delivery, delivery_id)
        assert row is not None
        assert (row.state, row.attempts, row.last_error) == (state, attempts + 1, error)
        assert row.commitment_uid == commitment
        if wait is None:
            assert row.next_attempt_at is None
        else:
            assert row.next_attempt_at is not None
            seconds = (row.next_attempt_at - row.updated_at).total_seconds()
            assert wait[0] <= seconds <= wait[1]
        (event,) = s.scalars(select(AuditEvent)).all()
    assert event.action == ("delivery.sent" if error is None else "delivery.failed")
    assert json.loads(event.detail)["state"] == state
    db.dispose()


def test_the_admin_cli_moves_jobs_only_as_the_lifecycle_allows(
    job: tuple[Database, JobContext], tmp_path: Path
) -> None:
    """``jobs cancel`` and ``jobs retry`` go through the state machine: refusals exit 2."""
    from tests.conftest import run_cli

    db, ctx = job
    config = tmp_path / "node.yaml"
    config.write_text(
        f"storage: {{root: {tmp_path / 's'}}}\ndatabase: {{url: '{ctx.database_url}'}}\n"
    )
    job_id = str(ctx.job_id)
    refused = run_cli(config, "jobs", "retry", job_id, check=False)
    assert refused.returncode == 2 and "cannot be retried: it is queued" in refused.stderr
    run_cli(config, "jobs", "cancel", job_id)
    refused = run_cli(config, "jobs", "cancel", job_id, check=False)
    assert refused.returncode == 2 and "cannot be cancelled: it is cancelled" in refused.stderr
    run_cli(config, "jobs", "retry", job_id)
    with db.session() as s:
        row = s.get(Job, ctx.job_id)
        assert row is not None and (row.state, row.attempts, row.finished_at) == ("queued", 0, None)
    assert [d["job"] for d in _audit(db, "job.cancelled")] == [ctx.job_id]
    assert [d["job"] for d in _audit(db, "job.retry")] == [ctx.job_id]
