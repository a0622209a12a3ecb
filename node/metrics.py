"""Prometheus metrics of a running node, read from the audit trail and the database.

Every fact worth counting is already an audit event, committed with the
change it records, by whichever process made it (the SCP's threads, job
workers in their own processes, the admin CLI). :class:`NodeMetrics` follows
the trail (events after the head it saw at start, on every scheduler tick and
every scrape) and turns each new event into counter increments, so the
figures are exactly what was committed and no service needs a metrics hook:

- ``sarcnode_instances_received_total{outcome}``: stored, duplicate, conflict;
- ``sarcnode_instances_refused_total{reason}``: the refusal's kind (too-large, ...);
- ``sarcnode_associations_total{outcome}``: accepted, rejected, released, aborted,
  tls_failed; ``sarcnode_connections_total{outcome}``: refused or aborted at TCP level;
- ``sarcnode_jobs_finished_total{state}`` and ``sarcnode_job_duration_seconds{state}``;
- ``sarcnode_stage_duration_seconds{stage}`` (histogram of finished stages);
- ``sarcnode_delivery_attempts_total{destination,result}``: sent, failed, committed;
- ``sarcnode_audit_events_total{action,outcome}``.

Gauges are read from the database at scrape time: jobs by state, the queue
depth (queued jobs), deliveries by state, the age of the oldest overdue
delivery, free disk under the storage root and the seconds since the last
scheduler tick. Counters start at zero when ``serve`` starts, as Prometheus
expects (``rate()`` handles the reset).
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from sqlalchemy import func, select

from node.db.models import AuditEvent, Delivery, Job, utcnow
from node.db.session import Database

log = logging.getLogger(__name__)

#: Buckets for stage and job durations: a second to two hours.
DURATION_BUCKETS = (1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200)
#: Job states that end a job (and the audit actions that say so).
FINAL_STATES = ("done", "failed", "dead", "cancelled")
_RECEIVED = {
    "instance.stored": "stored",
    "instance.duplicate": "duplicate",
    "instance.duplicate_conflict": "conflict",
}
#: At most this many events are read per follow (a backlog is read over several).
BATCH = 5000


@dataclass(frozen=True)
class JobEnd:
    """A job that reached a final state, as the audit trail says (for the serve log)."""

    job_id: int
    state: str
    pipeline: str | None
    seconds: float | None
    stage: str | None
    error: str | None


class NodeMetrics:
    """The node's Prometheus registry, fed by :meth:`follow`."""

    def __init__(
        self,
        db: Database,
        storage_root: Path,
        *,
        last_tick: Callable[[], float | None] = lambda: None,
    ) -> None:
        """Start following the audit trail at its current head (history is not recounted).

        ``last_tick`` returns the ``time.monotonic()`` of the last scheduler
        tick (None before the first).
        """
        self.db = db
        self.storage_root = storage_root
        self.last_tick = last_tick
        self.registry = CollectorRegistry()
        self._lock = threading.Lock()
        r = self.registry
        self.received = Counter(
            "sarcnode_instances_received",
            "Instances received and indexed, by outcome (stored, duplicate, conflict).",
            ["outcome"],
            registry=r,
        )
        self.refused = Counter(
            "sarcnode_instances_refused",
            "C-STORE requests refused, by reason (the refusal's kind).",
            ["reason"],
            registry=r,
        )
        self.associations = Counter(
            "sarcnode_associations",
            "Associations by outcome (accepted, rejected, released, aborted, tls_failed).",
            ["outcome"],
            registry=r,
        )
        self.connections = Counter(
            "sarcnode_connections",
            "TCP connections refused or aborted by the transport guard, before DICOM.",
            ["outcome"],
            registry=r,
        )
        self.jobs_finished = Counter(
            "sarcnode_jobs_finished",
            "Jobs that reached a final state, by state.",
            ["state"],
            registry=r,
        )
        self.job_seconds = Histogram(
            "sarcnode_job_duration_seconds",
            "From a job's start to its final state, by state.",
            ["state"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.stage_seconds = Histogram(
            "sarcnode_stage_duration_seconds",
            "Duration of finished job stages, by stage.",
            ["stage"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.delivery_attempts = Counter(
            "sarcnode_delivery_attempts",
            "Delivery attempts by destination and result (sent, failed, committed).",
            ["destination", "result"],
            registry=r,
        )
        self.audit_events = Counter(
            "sarcnode_audit_events",
            "Audit events committed (by any process), by action and outcome.",
            ["action", "outcome"],
            registry=r,
        )
        r.register(_StateCollector(self))
        with db.session() as s:
            self._seq = int(s.scalar(select(func.max(AuditEvent.seq))) or 0)

    def follow(self) -> list[JobEnd]:
        """Count the audit events committed since the last call; return the jobs that ended.

        Never raises: a database that cannot be read is logged and retried
        on the next call (the health endpoint reports it).
        """
        with self._lock:
            try:
                return self._follow()
            except Exception:
                log.exception("metrics: cannot read the audit trail")
                return []

    def _follow(self) -> list[JobEnd]:
        ended: list[tuple[int, str, dict[str, Any]]] = []
        with self.db.session() as s:
            rows = s.execute(
                select(AuditEvent.seq, AuditEvent.action, AuditEvent.outcome, AuditEvent.detail)
                .where(AuditEvent.seq > self._seq)
                .order_by(AuditEvent.seq)
                .limit(BATCH)
            ).all()
            for seq, action, outcome, raw in rows:
                self._seq = max(self._seq, int(seq))
                detail = _detail(raw)
                self._count(str(action), str(outcome), detail)
                state = _job_end_state(str(action), detail)
                if state is not None and isinstance(detail.get("job"), int):
                    ended.append((int(detail["job"]), state, detail))
            if not ended:
                return []
            jobs = {
                j.id: j for j in s.scalars(select(Job).where(Job.id.in_([e[0] for e in ended])))
            }
            result = []
            for job_id, state, detail in ended:
                job = jobs.get(job_id)
                seconds = None
                if job is not None and job.started_at is not None:
                    seconds = ((job.finished_at or utcnow()) - job.started_at).total_seconds()
                    self.job_seconds.labels(state).observe(max(0.0, seconds))
                self.jobs_finished.labels(state).inc()
                result.append(
                    JobEnd(
                        job_id,
                        state,
                        job.pipeline if job is not None else None,
                        seconds,
                        detail.get("stage") or (job.stage if job is not None else None),
                        detail.get("error") or (job.error if job is not None else None),
                    )
                )
            return result

    def _count(self, action: str, outcome: str, detail: dict[str, Any]) -> None:
        self.audit_events.labels(action, outcome).inc()
        if action in _RECEIVED:
            self.received.labels(_RECEIVED[action]).inc()
        elif action == "instance.refused":
            self.refused.labels(str(detail.get("kind") or "unknown")[:40]).inc()
        elif action.startswith("association."):
            self.associations.labels(action.removeprefix("association.")).inc()
        elif action in ("connection.refused", "connection.aborted"):
            count = detail.get("count")
            n = count if isinstance(count, int) and count > 0 else 1
            self.connections.labels(action.removeprefix("connection.")).inc(n)
        elif action == "job.stage.done":
            seconds = detail.get("seconds")
            if isinstance(seconds, int | float):
                self.stage_seconds.labels(str(detail.get("stage"))).observe(float(seconds))
        elif action in ("delivery.sent", "delivery.failed", "delivery.committed"):
            destination = str(detail.get("destination") or "?")[:64]
            self.delivery_attempts.labels(destination, action.removeprefix("delivery.")).inc()

    def exposition(self) -> bytes:
        """The text exposition format, after following the trail up to now."""
        from prometheus_client import generate_latest

        self.follow()
        return generate_latest(self.registry)


def _detail(raw: str | None) -> dict[str, Any]:
    try:
        value = json.loads(raw) if raw else {}
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _job_end_state(action: str, detail: dict[str, Any]) -> str | None:
    """The final state an audit event puts a job in, or None when it does not end one."""
    if action == "job.done":
        return "done"
    if action == "job.cancelled":
        return "cancelled"
    if action in ("job.failed", "job.dead"):
        return action.removeprefix("job.")
    if action in ("job.stage.timeout", "job.worker_crashed") and detail.get("state") == "dead":
        return "dead"
    return None


class _StateCollector:
    """Gauges read at scrape time: jobs, queue, outbox, disk, scheduler."""

    def __init__(self, metrics: NodeMetrics) -> None:
        self.m = metrics

    def collect(self) -> Iterator[Metric]:
        """One sample set per scrape; a database error leaves the DB gauges out."""
        try:
            yield from self._from_database()
        except Exception as exc:
            log.warning("metrics: database gauges unavailable: %s", type(exc).__name__)
        try:
            free = shutil.disk_usage(self.m.storage_root).free
            yield GaugeMetricFamily(
                "sarcnode_storage_free_bytes", "Free bytes under storage.root.", value=free
            )
        except OSError:
            pass
        tick = self.m.last_tick()
        if tick is not None:
            yield GaugeMetricFamily(
                "sarcnode_scheduler_tick_age_seconds",
                "Seconds since the scheduler's last tick.",
                value=time.monotonic() - tick,
            )

    def _from_database(self) -> Iterator[Metric]:
        with self.m.db.session() as s:
            jobs = dict(s.execute(select(Job.state, func.count()).group_by(Job.state)).all())
            deliveries = dict(
                s.execute(select(Delivery.state, func.count()).group_by(Delivery.state)).all()
            )
            oldest_due = s.scalar(
                select(func.min(Delivery.next_attempt_at)).where(Delivery.state == "pending")
            )
        by_state = GaugeMetricFamily("sarcnode_jobs", "Jobs by state.", labels=["state"])
        for state in sorted({"queued", "running", *FINAL_STATES, *map(str, jobs)}):
            by_state.add_metric([state], float(jobs.get(state, 0)))
        yield by_state
        yield GaugeMetricFamily(
            "sarcnode_job_queue_depth",
            "Jobs waiting to run (state queued).",
            value=float(jobs.get("queued", 0)),
        )
        outbox = GaugeMetricFamily("sarcnode_deliveries", "Outbox rows by state.", labels=["state"])
        for state in sorted({"pending", "committing", "done", "dead", *map(str, deliveries)}):
            outbox.add_metric([state], float(deliveries.get(state, 0)))
        yield outbox
        overdue = 0.0
        if oldest_due is not None:
            overdue = max(0.0, (utcnow() - oldest_due).total_seconds())
        yield GaugeMetricFamily(
            "sarcnode_outbox_overdue_seconds",
            "How long the most overdue pending delivery has been due (0: none overdue).",
            value=overdue,
        )
