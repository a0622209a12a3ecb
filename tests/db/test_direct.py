"""Statements on the DBAPI cursor (node.db.direct): what the ORM reads back, both backends."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from node.audit.context import AuditConfig, AuditContext
from node.audit.trail import record, verify
from node.db.direct import Direct
from node.db.models import AuditEvent, Study
from node.db.session import Database


@pytest.fixture
def db(db_url: str, tmp_path: Path) -> Database:
    ctx = AuditContext(AuditConfig(tmp_path / "audit.key", tmp_path / "head.json"))
    database = Database(db_url, audit=ctx)
    yield database
    database.dispose()


@pytest.mark.parametrize(
    "when",
    [datetime(2026, 12, 3, 15, 4, 5, 123456), datetime(2026, 12, 3, 15, 4, 5)],  # no microseconds
)
def test_a_datetime_written_directly_is_stored_as_the_orm_stores_it(
    db: Database, when: datetime
) -> None:
    with db.session() as s:
        s.add(Study(study_instance_uid="1.1", first_received_at=when, last_received_at=when))
        d = Direct(s)
        d.run(
            "INSERT INTO studies (study_instance_uid, first_received_at, last_received_at) "
            "VALUES (?, ?, ?)",
            ("1.2", d.when(when), d.when(when)),
        )
    with db.session() as s:
        # Same stored value (SQLite compares the text), so time windows find both rows.
        raw = Direct(s).run("SELECT last_received_at FROM studies ORDER BY id").fetchall()
        assert raw[0] == raw[1]
        assert Direct(s).datetime_of(raw[1][0]) == when
        at_or_before = select(Study.study_instance_uid).where(Study.last_received_at <= when)
        assert sorted(s.scalars(at_or_before)) == ["1.1", "1.2"]
        before = select(Study.study_instance_uid).where(Study.last_received_at < when)
        assert list(s.scalars(before)) == []
        study = s.scalars(select(Study).where(Study.study_instance_uid == "1.2")).one()
        assert (study.first_received_at, study.last_received_at) == (when, when)


def test_a_driver_error_is_raised_as_sqlalchemy_raises_it(db: Database) -> None:
    sql = "INSERT INTO studies (study_instance_uid, first_received_at, last_received_at) "
    sql += "VALUES (?, ?, ?)"
    with pytest.raises(IntegrityError), db.session() as s:
        d = Direct(s)
        now = d.when(datetime(2026, 1, 1))
        d.run(sql, ("1.2.3", now, now))
        d.run(sql, ("1.2.3", now, now))  # unique Study Instance UID
    with db.session() as s:  # rolled back as a whole
        assert s.scalars(select(Study)).all() == []


def test_events_appended_directly_keep_the_keyed_chain_verifiable(db: Database) -> None:
    for i in range(3):
        with db.session() as s:
            record(s, "test.event", actor="node", detail={"i": i, "when": datetime(2026, 1, 1)})
    with db.session() as s:
        result = verify(s)
        assert result.ok, result.findings
        assert result.checked == 3
        assert [e.detail for e in s.scalars(select(AuditEvent).order_by(AuditEvent.seq))] == [
            '{"i":0,"when":"2026-01-01 00:00:00"}',
            '{"i":1,"when":"2026-01-01 00:00:00"}',
            '{"i":2,"when":"2026-01-01 00:00:00"}',
        ]


def test_a_savepoint_rolled_back_undoes_what_ran_directly_in_it(db: Database) -> None:
    """As a group commit runs each instance: one refused leaves its neighbours' rows."""
    with db.session() as s:
        record(s, "test.b", actor="node")
        with pytest.raises(ValueError), s.begin_nested():
            record(s, "test.c", actor="node")
            raise ValueError("c refused")
        with s.begin_nested():
            record(s, "test.d", actor="node")
    with db.session() as s:
        actions = s.scalars(select(AuditEvent.action).order_by(AuditEvent.seq)).all()
        assert actions == ["test.b", "test.d"]
        assert verify(s).ok
