"""The tick comes when a series turns stable, not at its next interval; delivery when a job ends.

A real index (SQLite) and a real APScheduler with interval jobs far longer
than the test, as ``serve`` schedules its tick and its delivery round.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from apscheduler.schedulers.background import BackgroundScheduler

from node.db.models import Series, Study, utcnow
from node.db.session import Database
from node.jobs.wake import Wake

STABLE_S = 1.5


@pytest.fixture
def scheduler() -> Iterator[tuple[BackgroundScheduler, dict[str, list[datetime]]]]:
    """A started scheduler whose tick and delivery jobs would next run in 10 minutes."""
    ran: dict[str, list[datetime]] = {"tick": [], "deliver": []}
    scheduler = BackgroundScheduler(timezone="UTC")
    for name, runs in ran.items():
        scheduler.add_job(lambda runs=runs: runs.append(utcnow()), "interval", seconds=600, id=name)
    scheduler.start()
    yield scheduler, ran
    scheduler.shutdown(wait=False)


def _index(tmp_path: Path, state: str) -> Database:
    """An index holding one series in ``state``, its last instance received just now."""
    db = Database(f"sqlite:///{tmp_path / 'index.db'}")
    now = utcnow()
    with db.session() as s:
        study = Study(study_instance_uid="1.2.3", first_received_at=now, last_received_at=now)
        s.add(study)
        s.flush()
        s.add(
            Series(
                series_instance_uid="1.2.3.4",
                study_id=study.id,
                first_received_at=now,
                last_received_at=now,
                state=state,
            )
        )
    return db


def _wait(runs: list[datetime], seconds: float) -> None:
    end = time.monotonic() + seconds
    while not runs and time.monotonic() < end:
        time.sleep(0.05)


def test_the_tick_runs_at_the_stability_deadline(
    tmp_path: Path, scheduler: tuple[BackgroundScheduler, dict[str, list[datetime]]]
) -> None:
    db = _index(tmp_path, "receiving")
    due = Wake(db, scheduler[0], STABLE_S).after_tick()
    assert due is not None and abs((due - utcnow()).total_seconds() - STABLE_S) < 0.5
    runs = scheduler[1]["tick"]
    _wait(runs, STABLE_S + 5)
    assert runs, "the tick waited for its 10-minute interval"
    assert due <= runs[0] <= due + timedelta(seconds=1)
    db.dispose()


def test_nothing_arriving_leaves_the_tick_alone_but_a_pipeline_wait_wakes_it(
    tmp_path: Path, scheduler: tuple[BackgroundScheduler, dict[str, list[datetime]]]
) -> None:
    db = _index(tmp_path, "stable")
    wake = Wake(db, scheduler[0], STABLE_S)
    assert wake.after_tick() is None
    time.sleep(0.5)
    assert not scheduler[1]["tick"]
    waiting_until = utcnow() + timedelta(seconds=0.5)  # a pipeline waits for an optional series
    assert wake.after_tick(retry_at=waiting_until) == waiting_until
    _wait(scheduler[1]["tick"], 5)
    assert scheduler[1]["tick"] and scheduler[1]["tick"][0] >= waiting_until
    db.dispose()


def test_a_finished_job_runs_the_delivery_round_at_once(
    tmp_path: Path, scheduler: tuple[BackgroundScheduler, dict[str, list[datetime]]]
) -> None:
    db = _index(tmp_path, "stable")
    Wake(db, scheduler[0], STABLE_S).delivery()
    _wait(scheduler[1]["deliver"], 5)
    assert scheduler[1]["deliver"] and not scheduler[1]["tick"]
    db.dispose()
