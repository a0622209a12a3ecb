"""The job lifecycle table, in process: every move, refusals, retry policy, claim order.

Expected moves are written out here from the lifecycle the README and the
issue describe (queued -> running -> done | failed | dead | cancelled, plus
recovery, admin retry, re-score, supersede), not read from the table, so a
change to the table shows up as a failing row.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from node.db.models import JOB_STATES, AuditEvent, Job, JobStage
from node.db.session import Database
from node.jobs import state
from node.jobs.scheduler import next_job, rescore
from node.jobs.state import IllegalTransition, RetryPolicy

T0 = datetime(2026, 3, 2, 10, 0, 0)  # a Monday, 10:00 UTC: outside the default off-peak window

# (event, from state) -> (to state, audit action); anything not listed is refused.
EXPECTED: dict[tuple[str, str], tuple[str, str]] = {
    ("start", "queued"): ("running", "job.stage.started"),
    ("start", "running"): ("running", "job.stage.started"),  # the next stage
    ("finish", "running"): ("done", "job.done"),
    ("reject", "queued"): ("failed", "job.failed"),  # a series gone before it ran
    ("reject", "running"): ("failed", "job.failed"),
    ("recover", "running"): ("queued", "job.recovered"),
    ("cancel", "queued"): ("cancelled", "job.cancelled"),
    ("cancel", "running"): ("cancelled", "job.cancelled"),
    ("supersede", "queued"): ("cancelled", "job.superseded"),
    ("retry", "failed"): ("queued", "job.retry"),
    ("retry", "dead"): ("queued", "job.retry"),
    ("retry", "cancelled"): ("queued", "job.retry"),
    ("rescore", "done"): ("queued", "job.rescore"),
    ("rescore", "failed"): ("queued", "job.rescore"),
}
# Failures a retry may cure: from running only, to queued or (policy exhausted) dead.
RETRIABLE_ACTIONS = {
    "error": {"queued": "job.stage.failed", "dead": "job.dead"},
    "timeout": {"queued": "job.stage.timeout", "dead": "job.stage.timeout"},
    "crash": {"queued": "job.worker_crashed", "dead": "job.worker_crashed"},
}
EVENTS = sorted({e for e, _ in EXPECTED} | set(RETRIABLE_ACTIONS))


@pytest.fixture()
def db(tmp_path: Path) -> Database:
    """A node database made by the real migrations (SQLite)."""
    database = Database(f"sqlite:///{tmp_path / 'index.db'}")
    yield database
    database.dispose()


def _job(db: Database, job_state: str = "queued", **fields: object) -> int:
    with db.session() as s:
        job = Job(
            idempotency_key=f"k-{job_state}-{fields}",
            study_instance_uid="1.2.3.4",
            pipeline=str(fields.pop("pipeline", "sarcoma-mr")),
            state=job_state,
            attempts=0,
            created_at=T0,
            updated_at=T0,
            **fields,
        )
        s.add(job)
        s.flush()
        return job.id


def _events(db: Database) -> list[tuple[str, dict[str, object]]]:
    with db.session() as s:
        rows = s.scalars(select(AuditEvent).order_by(AuditEvent.seq)).all()
        return [(r.action, json.loads(r.detail)) for r in rows]


@pytest.mark.parametrize("source", JOB_STATES)
@pytest.mark.parametrize("event", EVENTS)
def test_every_move_is_allowed_or_refused_as_the_lifecycle_says(
    db: Database, event: str, source: str
) -> None:
    job_id = _job(db, source)
    if event in RETRIABLE_ACTIONS:
        targets = RETRIABLE_ACTIONS[event] if source == "running" else {}
        for target in ("queued", "dead"):
            assert state.allowed(source, event, target) == (target in targets)
        expected = (targets["queued"], "queued") if targets else None
        kwargs: dict[str, str] = {"target": "queued", "error": "boom"}
    else:
        move = EXPECTED.get((event, source))
        assert state.allowed(source, event) == (move is not None)
        expected = (move[1], move[0]) if move else None
        kwargs = {}
    with db.session() as s:
        job = s.get(Job, job_id)
        assert job is not None
        if expected is None:
            with pytest.raises(IllegalTransition, match=f"job {job_id}: '{event}' is not allowed"):
                state.transition(s, job, event, **kwargs)
        else:
            assert state.transition(s, job, event, **kwargs) == expected[1]
    with db.session() as s:
        job = s.get(Job, job_id)
        assert job is not None
        assert job.state == (expected[1] if expected else source)  # a refusal changes nothing
    assert [a for a, _ in _events(db)] == ([expected[0]] if expected else [])


def test_a_retriable_event_needs_its_target_and_an_unknown_event_is_refused(
    db: Database,
) -> None:
    job_id = _job(db, "running")
    with db.session() as s:
        job = s.get(Job, job_id)
        assert job is not None
        with pytest.raises(IllegalTransition, match="needs its target"):
            state.transition(s, job, "error")
        with pytest.raises(IllegalTransition, match="no transition 'explode'"):
            state.transition(s, job, "explode")
        with pytest.raises(IllegalTransition, match="no transition 'finish' to queued"):
            state.transition(s, job, "finish", target="queued")
    assert _events(db) == []


@pytest.mark.parametrize(
    ("cause", "actions"),
    [
        ("error", ["job.stage.failed", "job.stage.failed", "job.dead"]),
        ("timeout", ["job.stage.timeout"] * 3),
        ("crash", ["job.worker_crashed"] * 3),
    ],
)
def test_each_retriable_failure_is_queued_again_until_the_policy_gives_up(
    db: Database, cause: str, actions: list[str]
) -> None:
    policy = RetryPolicy(max_attempts=3, base_s=10, cap_s=100, jitter=0)
    job_id = _job(db, "running")
    seen = []
    for attempt in (1, 2, 3):
        with db.session() as s:
            job = s.get(Job, job_id)
            assert job is not None
            if attempt > 1:
                state.transition(s, job, "start", stage="segment")
            seen.append(state.fail_attempt(s, job, cause, policy, error=f"failure {attempt}"))
            assert job.attempts == attempt
    assert seen == ["queued", "queued", "dead"]
    failures = [(a, d) for a, d in _events(db) if a != "job.stage.started"]
    assert [a for a, _ in failures] == actions
    assert [d["state"] for _, d in failures] == ["queued", "queued", "dead"]
    assert [d.get("retry_in_s") for _, d in failures] == [10, 20, None]  # base x 2^(n-1)
    with db.session() as s:
        job = s.get(Job, job_id)
        assert job is not None
        assert job.error == "failure 3" and job.finished_at is not None


def test_bad_input_is_failed_at_once_whatever_attempts_are_left(db: Database) -> None:
    job_id = _job(db, "running")
    with db.session() as s:
        job = s.get(Job, job_id)
        assert job is not None
        state.transition(s, job, "reject", error="GeometryError: gap", stage="segment")
    with db.session() as s:
        job = s.get(Job, job_id)
        assert job is not None
        assert (job.state, job.attempts, job.error) == ("failed", 1, "segment: GeometryError: gap")
    ((action, detail),) = _events(db)
    assert action == "job.failed" and detail["error"] == "GeometryError: gap"


def test_an_admin_retry_starts_the_count_again(db: Database) -> None:
    job_id = _job(db, "dead", error="segment: KeyError: 'x'", finished_at=T0)
    with db.session() as s:
        job = s.get(Job, job_id)
        assert job is not None
        job.attempts = 3
        state.transition(s, job, "retry", actor="admin")
    with db.session() as s:
        job = s.get(Job, job_id)
        assert job is not None
        assert (job.state, job.attempts, job.error, job.finished_at) == ("queued", 0, None, None)


@pytest.mark.parametrize(
    ("attempts", "low", "high"),
    [(0, 0, 0), (1, 8, 12), (2, 16, 24), (3, 32, 48), (4, 64, 96), (5, 80, 120), (40, 80, 120)],
)
def test_back_off_doubles_with_jitter_up_to_the_cap(attempts: int, low: float, high: float) -> None:
    policy = RetryPolicy(max_attempts=50, base_s=10, cap_s=100, jitter=0.2)
    delays = [policy.delay_s(attempts, job_id) for job_id in range(1, 41)]
    assert all(low <= d <= high for d in delays), delays
    if attempts:
        assert len({round(d, 6) for d in delays}) > 30  # spread: jobs failing together part
    assert delays == [policy.delay_s(attempts, job_id) for job_id in range(1, 41)]  # stable


def _claimable(**fields: object) -> Job:
    values: dict[str, object] = {
        "id": 1,
        "state": "queued",
        "pipeline": "sarcoma-mr",
        "priority": "normal",
        "attempts": 0,
        "created_at": T0,
        "updated_at": T0,
    }
    return Job(**(values | fields))


CLAIMS = [
    # (jobs as (id, priority, created minutes after T0, attempts), now minutes, expected id)
    ([(1, "normal", 0, 0), (2, "urgent", 5, 0)], 10, 2),  # urgent first, though younger
    ([(1, "offpeak", 0, 0), (2, "normal", 5, 0)], 10, 2),  # normal before off-peak
    ([(1, "offpeak", 0, 0)], 10, None),  # off-peak waits for its window (20:00-06:00)
    ([(1, "offpeak", 0, 0)], 11 * 60, 1),  # 21:00: inside the window
    ([(1, "normal", 5, 0), (2, "normal", 0, 0)], 10, 2),  # same priority: oldest first
    ([(3, "normal", 0, 0), (2, "normal", 0, 0)], 10, 2),  # same age: lowest id
    ([(1, "urgent", 0, 1), (2, "normal", 0, 0)], 0.1, 2),  # a failed job waits its back-off
    ([(1, "urgent", 0, 1)], 0.6, 1),  # 30 s base, no jitter: due after 30 s
    ([(1, "urgent", 0, 2)], 0.9, None),  # second failure: 60 s
    ([(1, "urgent", 0, 2)], 1.1, 1),
]


@pytest.mark.parametrize(("jobs", "minutes", "expected"), CLAIMS)
def test_claim_order(
    jobs: list[tuple[int, str, int, int]], minutes: float, expected: int | None
) -> None:
    from node.config import JobSettings

    settings = JobSettings()
    queued = [
        _claimable(
            id=i,
            priority=p,
            created_at=T0 + timedelta(minutes=c),
            updated_at=T0 + timedelta(minutes=c),
            attempts=a,
        )
        for i, p, c, a in jobs
    ]
    chosen = next_job(
        queued,
        now=T0 + timedelta(minutes=minutes),
        policy=RetryPolicy(max_attempts=3, base_s=30, cap_s=3600, jitter=0),
        in_offpeak=settings.in_offpeak,
    )
    assert (chosen.id if chosen else None) == expected


def test_claim_skips_running_unknown_pipelines_and_other_states() -> None:
    policy = RetryPolicy(jitter=0)
    jobs = [
        _claimable(id=1),
        _claimable(id=2, pipeline="gone"),
        _claimable(id=3, state="failed"),
        _claimable(id=4, created_at=T0 + timedelta(minutes=1)),
    ]
    now = T0 + timedelta(minutes=5)
    pick = next_job(jobs, now=now, policy=policy, in_offpeak=lambda _: False, skip={1})
    assert pick is not None and pick.id == 2  # pipelines not restricted: the older one
    pick = next_job(
        jobs, now=now, policy=policy, in_offpeak=lambda _: False, skip={1}, pipelines={"sarcoma-mr"}
    )
    assert pick is not None and pick.id == 4


def test_rescore_queues_the_finished_job_from_its_score_stage(db: Database, tmp_path: Path) -> None:
    folder = tmp_path / "jobs" / "1"
    job_id = _job(db, "done", folder=str(folder), finished_at=T0)
    stages = ["segment", "radiomics", "score", "encode", "deliver"]
    with db.session() as s:
        for stage in stages:
            s.add(JobStage(job_id=job_id, stage=stage, state="done", attempts=1, outputs="{}"))
            (folder / stage).mkdir(parents=True)
            (folder / stage / "outputs.json").write_text("{}")
    assert rescore(db, "1.2.3.4", actor="admin") == job_id
    with db.session() as s:
        rows = {r.stage: r.state for r in s.scalars(select(JobStage))}
        job = s.get(Job, job_id)
        assert job is not None and (job.state, job.finished_at) == ("queued", None)
    assert rows == {
        "segment": "done",
        "radiomics": "done",
        "score": "pending",
        "encode": "pending",
        "deliver": "pending",
    }
    markers = sorted(p.parent.name for p in folder.glob("*/outputs.json"))
    assert markers == ["radiomics", "segment"]
    assert [a for a, _ in _events(db)] == ["job.rescore"]
    assert rescore(db, "1.2.3.4", actor="admin") is None  # queued: nothing finished to re-score


def _job_state_literals(path: Path) -> list[int]:
    """Lines of ``path`` that assign a job-state string to a ``.state`` or ``state=``."""
    import ast

    lines = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        pairs: list[tuple[ast.AST, ast.expr]] = []
        if isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Tuple) and isinstance(node.value, ast.Tuple):
                    pairs += list(zip(target.elts, node.value.elts, strict=False))
                else:
                    pairs.append((target, node.value))
        elif isinstance(node, ast.Call):
            pairs += [(kw, kw.value) for kw in node.keywords if kw.arg == "state"]
        for target, value in pairs:
            named = isinstance(target, ast.keyword) or (
                isinstance(target, ast.Attribute) and target.attr == "state"
            )
            if named and isinstance(value, ast.Constant) and value.value in JOB_STATES:
                lines.append(node.lineno)
    return sorted(lines)


def test_job_states_are_assigned_in_the_state_module_only(tmp_path: Path) -> None:
    """The outbox's rows have states of their own (``node/delivery``); no one else sets one."""
    sample = tmp_path / "sample.py"
    sample.write_text(
        'job.state = "queued"\nJob(id=1, state="done")\nrow.state, row.error = "dead", None\n'
        'series.state = "stable"\nQUEUED = "queued"\n'
    )
    assert _job_state_literals(sample) == [1, 2, 3]  # what the scan catches, and not
    root = Path(__file__).resolve().parents[2] / "node"
    found = {
        str(p.relative_to(root)): lines
        for p in sorted(root.rglob("*.py"))
        if p.relative_to(root).parts[0] != "delivery" and p != root / "jobs" / "state.py"
        if (lines := _job_state_literals(p))
    }
    assert found == {}
