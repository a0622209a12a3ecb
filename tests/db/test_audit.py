"""The audit trail is append-only and tamper-evident, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from sqlalchemy import delete, inspect, text, update

from node.audit.trail import record, verify
from node.db.models import AuditEvent
from node.db.session import Database
from tests.conftest import run_cli


@pytest.fixture
def db(db_url: str) -> Database:
    database = Database(db_url)
    yield database
    database.dispose()


def fill(db: Database, n: int = 5) -> None:
    for i in range(n):
        with db.session() as s:
            record(
                s, "test.event", actor="os:tester", detail={"i": i}, study_instance_uid=f"1.2.3.{i}"
            )


def test_migrations_create_every_table(db: Database) -> None:
    tables = set(inspect(db.engine).get_table_names())
    assert {
        "studies",
        "series",
        "instances",
        "associations",
        "audit_events",
        "jobs",
        "deliveries",
        "alembic_version",
    } <= tables


def test_intact_chain_verifies(db: Database) -> None:
    fill(db)
    with db.session() as s:
        result = verify(s)
    assert result.ok and result.checked == 5


def test_edited_event_is_named(db: Database) -> None:
    fill(db)
    with db.session() as s:
        s.execute(update(AuditEvent).where(AuditEvent.seq == 3).values(outcome="failed"))
    with db.session() as s:
        result = verify(s)
    assert result.broken_seq == 3
    assert "edited" in result.reason


def test_deleted_event_is_named(db: Database) -> None:
    fill(db)
    with db.session() as s:
        s.execute(delete(AuditEvent).where(AuditEvent.seq == 2))
    with db.session() as s:
        result = verify(s)
    assert result.broken_seq == 2
    assert "missing" in result.reason


def test_rehashed_edit_still_breaks_the_next_link(db: Database) -> None:
    """An attacker who recomputes the edited row's own hash breaks the link after it."""
    from node.audit.trail import stored_event_hash

    fill(db)
    with db.session() as s:
        ev = s.query(AuditEvent).filter_by(seq=2).one()
        ev.actor = "os:mallory"
        ev.hash = stored_event_hash(ev)
    with db.session() as s:
        result = verify(s)
    assert result.broken_seq == 3


def test_audit_verify_cli_exits_nonzero_and_names_the_event(tmp_path: Path, db_url: str) -> None:
    config = tmp_path / "node.yaml"
    config.write_text(
        yaml.safe_dump({"storage": {"root": str(tmp_path / "s")}, "database": {"url": db_url}})
    )
    database = Database(db_url)
    fill(database, 4)
    assert run_cli(config, "audit", "verify").returncode == 0
    recent = json.loads(run_cli(config, "audit", "--since", "1h", "--json").stdout)
    assert [e["action"] for e in recent][:4] == ["test.event"] * 4
    assert (
        json.loads(run_cli(config, "audit", "--since", "2099-01-01T00:00", "--json").stdout) == []
    )
    with database.engine.begin() as conn:
        conn.execute(text("UPDATE audit_events SET detail = :d WHERE seq = 2"), {"d": '{"i":99}'})
    database.dispose()
    proc = run_cli(config, "audit", "verify", check=False)
    assert proc.returncode == 1
    assert "seq 2" in proc.stderr
