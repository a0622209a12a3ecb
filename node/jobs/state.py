"""A job's lifecycle in one place: the states, the allowed moves, one function that moves.

In the spirit of pynetdicom's ``fsm.py``: :data:`TRANSITIONS` lists every
allowed move as (event, from-states, to-state, audit action), and
:func:`transition` is the only code that changes ``Job.state``. It checks the
move against the table (an illegal one raises :class:`IllegalTransition` and
changes nothing), updates the row, writes the audit event in the caller's
transaction and logs one line. A job stage's row (``JobStage.state``) is
changed here too, by the ``stage_*`` helpers.

Failures that a retry may cure (an internal error raised by a stage, a stage
past its time limit, a worker that died) share one :class:`RetryPolicy`:
each counts an attempt, and the job goes back to ``queued`` (due after an
exponential back-off with jitter, capped) until the policy is exhausted,
then ``dead``. Bad input (:class:`pipelines.errors.BadInput`) is ``failed``
at once: no retry can cure the study.

::

    queued ──start──▶ running ──finish──▶ done
      ▲  │              │ │ └──reject──▶ failed
      │  │              │ └─error | timeout | crash (attempts left)──▶ queued
      │  │              └───error | timeout | crash (policy exhausted)──▶ dead
      │  └─cancel | supersede──▶ cancelled
      └── retry (failed, dead, cancelled), rescore (done, failed), recover (running)
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy.orm import Session

from node.audit.trail import record
from node.config import JobSettings
from node.db.models import Job, JobStage, utcnow

log = logging.getLogger("node.jobs")

ACTOR = "node"

QUEUED, RUNNING, DONE, FAILED, DEAD, CANCELLED = (
    "queued",
    "running",
    "done",
    "failed",
    "dead",
    "cancelled",
)
#: States a job does not leave by itself (only an admin's retry or a re-score).
FINAL = frozenset({DONE, FAILED, DEAD, CANCELLED})

#: A job stage's states (``JobStage.state``).
PENDING, STAGE_RUNNING, STAGE_DONE, STAGE_FAILED = "pending", "running", "done", "failed"

#: Events caused by a failure a retry may cure: the retry policy picks queued or dead.
RETRIABLE = frozenset({"error", "timeout", "crash"})


class IllegalTransition(RuntimeError):
    """A move the table does not allow (the message names the job, event and state)."""


@dataclass(frozen=True)
class Transition:
    """One row of the table: ``event`` moves a job from any of ``sources`` to ``target``.

    ``action`` and ``outcome`` are the audit event's; ``attempt`` counts one
    attempt; ``fresh`` starts the count again (attempts, error and end time
    cleared) for a job an admin or a re-score queues again.
    """

    event: str
    sources: frozenset[str]
    target: str
    action: str
    outcome: str = "ok"
    attempt: bool = False
    fresh: bool = False


def _t(event: str, sources: set[str], target: str, action: str, **kw: Any) -> Transition:
    return Transition(event, frozenset(sources), target, action, **kw)


TRANSITIONS: tuple[Transition, ...] = (
    _t("start", {QUEUED, RUNNING}, RUNNING, "job.stage.started"),  # each stage starts one
    _t("finish", {RUNNING}, DONE, "job.done"),
    _t("reject", {QUEUED, RUNNING}, FAILED, "job.failed", outcome="failed", attempt=True),
    _t("error", {RUNNING}, QUEUED, "job.stage.failed", outcome="failed", attempt=True),
    _t("error", {RUNNING}, DEAD, "job.dead", outcome="failed", attempt=True),
    _t("timeout", {RUNNING}, QUEUED, "job.stage.timeout", outcome="failed", attempt=True),
    _t("timeout", {RUNNING}, DEAD, "job.stage.timeout", outcome="failed", attempt=True),
    _t("crash", {RUNNING}, QUEUED, "job.worker_crashed", outcome="failed", attempt=True),
    _t("crash", {RUNNING}, DEAD, "job.worker_crashed", outcome="failed", attempt=True),
    _t("recover", {RUNNING}, QUEUED, "job.recovered"),
    _t("cancel", {QUEUED, RUNNING}, CANCELLED, "job.cancelled"),
    _t("supersede", {QUEUED}, CANCELLED, "job.superseded"),
    _t("retry", {FAILED, DEAD, CANCELLED}, QUEUED, "job.retry", fresh=True),
    _t("rescore", {DONE, FAILED}, QUEUED, "job.rescore", fresh=True),
)


def find(event: str, target: str | None = None) -> Transition:
    """The table's row for ``event`` (and ``target``, where the event has two).

    Raises
    ------
    IllegalTransition
        No such event, or ``target`` is needed (or not one the event allows).
    """
    rows = [t for t in TRANSITIONS if t.event == event and target in (None, t.target)]
    if len(rows) == 1:
        return rows[0]
    if not rows:
        raise IllegalTransition(f"no transition {event!r}" + (f" to {target}" if target else ""))
    raise IllegalTransition(f"event {event!r} needs its target: one of {[t.target for t in rows]}")


def allowed(state: str, event: str, target: str | None = None) -> bool:
    """Whether a job in ``state`` may take ``event`` (to ``target``)."""
    try:
        return state in find(event, target).sources
    except IllegalTransition:
        return False


@dataclass(frozen=True)
class RetryPolicy:
    """When a failed attempt is tried again, and when the job is given up (``dead``).

    Try ``n + 1`` is due ``base_s * 2**(n - 1)`` seconds after failure ``n``,
    capped at ``cap_s``, spread by +/- ``jitter`` (a fraction) so jobs that
    failed together do not retry together. The spread is drawn from the job's
    id and attempt count, not a random generator, so every process (the
    runner's claim, a test) computes the same due time from the row alone.
    """

    max_attempts: int = 3
    base_s: float = 30.0
    cap_s: float = 3600.0
    jitter: float = 0.2

    @classmethod
    def from_settings(cls, jobs: JobSettings) -> RetryPolicy:
        """The policy of the ``jobs`` settings section."""
        return cls(jobs.max_attempts, jobs.retry_base_s, jobs.retry_max_s, jobs.retry_jitter)

    def exhausted(self, attempts: int) -> bool:
        """Whether ``attempts`` failed attempts are all the policy allows."""
        return attempts >= self.max_attempts

    def delay_s(self, attempts: int, job_id: int) -> float:
        """Seconds between failure number ``attempts`` and the next try (0 before any)."""
        if attempts <= 0 or self.base_s <= 0:
            return 0.0
        exponent = min(attempts - 1, 60)  # 2**60 s is past any cap
        delay = min(self.cap_s, self.base_s * 2.0**exponent)
        digest = hashlib.sha256(f"{job_id}:{attempts}".encode()).digest()
        spread = int.from_bytes(digest[:8], "big") / 2**64 * 2 - 1  # in [-1, 1)
        return max(0.0, delay * (1 + self.jitter * spread))

    def due_at(self, job: Job) -> datetime:
        """When a queued ``job`` may be claimed (its last failure plus the back-off)."""
        return job.updated_at + timedelta(seconds=self.delay_s(job.attempts, job.id))


def transition(
    s: Session,
    job: Job,
    event: str,
    *,
    target: str | None = None,
    actor: str = ACTOR,
    error: str | None = None,
    detail: Mapping[str, Any] | None = None,
    stage: str | None = None,
    now: datetime | None = None,
) -> str:
    """Move ``job`` by ``event``: the row, its audit event (same transaction) and a log line.

    ``stage`` is the stage the event concerns (``start`` records it on the
    job; a failure's ``error`` is kept on the job as ``"<stage>: <error>"``,
    first 2,000 characters); ``detail`` holds more audit facts. Returns the
    new state.

    Raises
    ------
    IllegalTransition
        The table has no such move from the job's state; nothing is changed.
    """
    move = find(event, target)
    if job.state not in move.sources:
        raise IllegalTransition(
            f"job {job.id}: {event!r} is not allowed from {job.state!r} "
            f"(only from {', '.join(sorted(move.sources))})"
        )
    moment = now or utcnow()
    previous = job.state
    job.state, job.updated_at = move.target, moment
    if move.fresh:
        job.attempts, job.error, job.finished_at = 0, None, None
    if move.attempt:
        job.attempts += 1
    if error is not None:
        job.error = (f"{stage}: {error}" if stage else error)[:2000]
    if event == "start":
        job.stage = stage
        job.started_at = job.started_at or moment
    if event == "finish":
        job.error = None
    if move.target in FINAL:
        job.finished_at = moment
    facts: dict[str, Any] = {"job": job.id}
    if stage is not None:
        facts["stage"] = stage
    facts |= dict(detail or {})
    if move.attempt:
        facts |= {"attempts": job.attempts, "state": move.target}
    if error is not None and "error" not in facts:
        facts["error"] = error[:500]
    record(
        s,
        move.action,
        actor=actor,
        outcome=move.outcome,
        study_instance_uid=job.study_instance_uid,
        detail=facts,
    )
    level = logging.WARNING if move.outcome != "ok" else logging.INFO
    where = f" at {stage}" if stage else ""
    why = f": {error[:300]}" if error else ""
    log.log(level, "job %d %s -> %s (%s%s)%s", job.id, previous, move.target, event, where, why)
    return move.target


def fail_attempt(
    s: Session,
    job: Job,
    cause: str,
    policy: RetryPolicy,
    *,
    error: str,
    stage: str | None = None,
    detail: Mapping[str, Any] | None = None,
) -> str:
    """A failure a retry may cure (``error``, ``timeout``, ``crash``): queued again, or dead.

    The one place the retry policy decides: the attempt this failure ends is
    counted, and when that was the last one the policy allows the job is
    ``dead``. Returns the new state.
    """
    if cause not in RETRIABLE:
        raise IllegalTransition(f"{cause!r} is not a retriable failure ({sorted(RETRIABLE)})")
    target = DEAD if policy.exhausted(job.attempts + 1) else QUEUED
    facts = dict(detail or {})
    if target == QUEUED:
        retry_in = policy.delay_s(job.attempts + 1, job.id)
        facts["retry_in_s"] = round(retry_in, 1)
    return transition(s, job, cause, target=target, error=error, stage=stage, detail=facts)


def stage_started(row: JobStage, now: datetime | None = None) -> None:
    """A stage's row as it starts: running, one more attempt."""
    row.state, row.attempts, row.started_at = STAGE_RUNNING, row.attempts + 1, now or utcnow()


def stage_done(row: JobStage, outputs: str, now: datetime | None = None) -> None:
    """A stage's row once its outputs are checkpointed: done, outputs (JSON) kept."""
    row.state, row.ended_at, row.outputs, row.error = STAGE_DONE, now or utcnow(), outputs, None


def stage_failed(row: JobStage, error: str, now: datetime | None = None) -> None:
    """A stage's row after a failure: failed, with the reason."""
    row.state, row.ended_at, row.error = STAGE_FAILED, now or utcnow(), error[:2000]


def stage_reset(row: JobStage) -> None:
    """A stage to be run again (a re-score): pending, its outputs and error cleared."""
    row.state, row.outputs, row.error = PENDING, None, None


def stage_is_done(row: JobStage) -> bool:
    """Whether the row says the stage finished (its marker file must agree)."""
    return row.state == STAGE_DONE
