"""Run the service's tick when a study becomes due, not at the next interval.

A series is stable ``scheduler.series_stable_seconds`` after its last
instance; a pipeline waiting for an optional series decides at a known
moment too (:attr:`node.pipelines.Decision.retry_at`). After each tick,
:meth:`Wake.after_tick` brings the next tick forward to the earliest of
these moments, so a study's job starts when its last series turns stable
rather than up to a tick later; and when a job ends, the delivery round
runs at once instead of at its next interval. The interval tick stays: it
is the fallback, and what watches everything else. The moments come from
the database, so series received by other processes count too.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from sqlalchemy import func, select

from node.db.models import Series, utcnow
from node.db.session import Database

if TYPE_CHECKING:
    from apscheduler.schedulers.base import BaseScheduler

log = logging.getLogger("node.jobs")

#: Added to a deadline so the tick finds the series past it (the cutoff is ``<=``).
MARGIN = timedelta(milliseconds=20)


def next_stable_at(db: Database, stable_seconds: float) -> datetime | None:
    """When the earliest series still receiving turns stable if nothing more arrives (naive UTC)."""
    with db.session() as s:
        receiving = select(func.min(Series.last_received_at)).where(Series.state == "receiving")
        last = s.scalar(receiving)
    return None if last is None else last + timedelta(seconds=stable_seconds)


class Wake:
    """Moves the next run of the scheduler's interval jobs forward to when work is due."""

    def __init__(
        self,
        db: Database,
        scheduler: BaseScheduler,
        stable_seconds: float,
        *,
        tick: str = "tick",
        deliver: str = "deliver",
    ) -> None:
        """``tick`` and ``deliver`` are the ids of the scheduler's tick and delivery jobs."""
        self.db, self.scheduler, self.stable_seconds = db, scheduler, stable_seconds
        self.tick, self.deliver = tick, deliver

    def after_tick(self, retry_at: datetime | None = None) -> datetime | None:
        """Bring the next tick forward to the next stability deadline or ``retry_at``; return it."""
        stable_at = next_stable_at(self.db, self.stable_seconds)
        due = min((t for t in (stable_at, retry_at) if t is not None), default=None)
        if due is not None:
            self._bring_forward(self.tick, max(due + MARGIN, utcnow() + MARGIN))
        return due

    def delivery(self) -> None:
        """Run the delivery round now (a job has just queued its objects)."""
        self._bring_forward(self.deliver, utcnow())

    def _bring_forward(self, job_id: str, when: datetime) -> None:
        """Run ``job_id`` at ``when`` (naive UTC) if that is before its next run."""
        aware = when.replace(tzinfo=UTC)
        try:
            job = self.scheduler.get_job(job_id)
            if job is None or job.next_run_time is None or aware >= job.next_run_time:
                return
            job.modify(next_run_time=aware)
        except Exception:  # the scheduler is shutting down: the interval run stays
            log.debug("cannot bring %s forward", job_id, exc_info=True)
