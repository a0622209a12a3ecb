"""The audit chain holds against a database writer (issue 13, item 7).

Each attack is made the way someone who can write the database but not read
the node's files would make it: plain SQL on the audit table, re-hashing with
the only hash they can compute (SHA-256). ``sarcnode audit verify`` must exit 1
and name the finding; the node must refuse to append to (or start on) a chain
shorter than its anchor until an admin acknowledges the break. SQLite and
PostgreSQL both run (the ``db_url`` fixture).
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy import Connection, insert, select, text

from node.audit.context import AuditConfig, AuditContext
from node.audit.keys import ENV_KEY, AuditKeyError, load_keyring
from node.audit.trail import (
    GENESIS,
    AuditBreakError,
    event_hash,
    record,
)
from node.config import load_settings
from node.db.models import AuditEvent
from node.db.session import Database
from tests.conftest import SARCNODE, run_cli

Tamper = Callable[[Connection, int], None]


@pytest.fixture
def config(tmp_path: Path, db_url: str) -> Path:
    """A node config on the test database, key and anchor under its storage root."""
    path = tmp_path / "node.yaml"
    path.write_text(
        yaml.safe_dump({"storage": {"root": str(tmp_path / "s")}, "database": {"url": db_url}})
    )
    return path


def keyed(config: Path) -> Database:
    """The database as the node and the admin CLI open it (audit key and anchor)."""
    settings = load_settings(config)
    return Database(settings.database_url, audit=AuditContext.from_settings(settings))


def fill(db: Database, n: int, start: int = 0) -> None:
    for i in range(start, start + n):
        with db.session() as s:
            record(s, "test.event", actor="os:tester", detail={"i": i}, study_instance_uid="1.2.3")


def attack(config: Path, tamper: Tamper, n: int) -> None:
    """Run ``tamper`` as a database writer: plain SQL, no key, no anchor."""
    db = Database(load_settings(config).database_url, migrate=False)
    with db.engine.begin() as conn:
        tamper(conn, n)
    db.dispose()


def rehash_from(conn: Connection, first: int) -> None:
    """Re-link and re-hash every event from ``first`` on, as well as one can without the key."""
    cols = [c for c in AuditEvent.__table__.c if c.name not in {"id", "hash", "hash_alg", "key_id"}]
    rows = conn.execute(
        select(*cols, AuditEvent.hash).where(AuditEvent.seq >= first - 1).order_by(AuditEvent.seq)
    ).all()
    prev = GENESIS
    for row in rows:
        fields = dict(row._mapping)
        if fields["seq"] < first:
            prev = fields["hash"]
            continue
        fields.pop("hash")
        fields["prev_hash"] = prev
        prev = event_hash(**fields)
        conn.execute(
            text("UPDATE audit_events SET prev_hash = :p, hash = :h WHERE seq = :s"),
            {"p": fields["prev_hash"], "h": prev, "s": fields["seq"]},
        )


def edit_and_rehash(conn: Connection, n: int) -> None:
    conn.execute(text("UPDATE audit_events SET actor = 'os:mallory' WHERE seq = 3"))
    rehash_from(conn, 3)


def forge_keyed(conn: Connection, n: int) -> None:
    """Append an event labelled as keyed (copying the key id), hashed with SHA-256."""
    key_id = conn.execute(text("SELECT key_id FROM audit_events WHERE seq = :s"), {"s": n}).scalar()
    _append(conn, n, "hmac-sha256", key_id)


def forge_plain(conn: Connection, n: int) -> None:
    """Append an event labelled as legacy plain SHA-256 (a downgrade)."""
    _append(conn, n, "sha256", None)


def _append(conn: Connection, n: int, alg: str, key_id: str | None) -> None:
    prev = conn.execute(text("SELECT hash FROM audit_events WHERE seq = :s"), {"s": n}).scalar()
    last = conn.execute(select(AuditEvent.ts).where(AuditEvent.seq == n)).scalar_one()
    fields: dict[str, Any] = {
        "seq": n + 1,
        "ts": last,
        "actor": "os:mallory",
        "actor_ip": None,
        "action": "instance.deleted",
        "outcome": "ok",
        "study_instance_uid": "1.2.3",
        "series_instance_uid": None,
        "sop_instance_uid": None,
        "detail": "{}",
        "prev_hash": prev,
    }
    conn.execute(
        insert(AuditEvent).values(**fields, hash=event_hash(**fields), hash_alg=alg, key_id=key_id)
    )


def wipe(conn: Connection, n: int) -> None:
    conn.execute(text("DELETE FROM audit_events"))


def truncate(conn: Connection, n: int) -> None:
    conn.execute(text("DELETE FROM audit_events WHERE seq > :s"), {"s": n - 2})


def delete_and_renumber(conn: Connection, n: int) -> None:
    conn.execute(text("DELETE FROM audit_events WHERE seq = 3"))
    for seq in range(4, n + 1):
        conn.execute(
            text("UPDATE audit_events SET seq = :new WHERE seq = :old"),
            {"new": seq - 1, "old": seq},
        )
    rehash_from(conn, 3)


def delete_middle(conn: Connection, n: int) -> None:
    conn.execute(text("DELETE FROM audit_events WHERE seq = 3"))


def downgrade_all(conn: Connection, n: int) -> None:
    """Relabel every event as legacy and re-hash the whole chain: valid plain SHA-256."""
    conn.execute(text("UPDATE audit_events SET hash_alg = 'sha256', key_id = NULL"))
    rehash_from(conn, 1)


N = 6  # events in the chain before the attack (5 written + `audit verify`'s own)

CASES: list[tuple[str, Tamper, list[str]]] = [
    ("rehash", edit_and_rehash, ["[rehashed] seq 3:"]),
    ("forge-keyed", forge_keyed, [f"[forged] seq {N + 1}:"]),
    ("forge-plain", forge_plain, [f"[forged] seq {N + 1}:", "plain SHA-256 event after keyed"]),
    ("wipe", wipe, ["[wiped] seq 1:", f"says {N} event(s) were committed"]),
    ("truncate", truncate, [f"[truncated] seq {N - 1}:", f"ends at seq {N - 2}"]),
    ("delete-renumber", delete_and_renumber, ["[rehashed] seq 3:", f"[truncated] seq {N}:"]),
    ("delete", delete_middle, ["[gap] seq 3:", "event 3 is missing"]),
    ("downgrade", downgrade_all, [f"[rehashed] seq {N}:", "anchor recorded"]),
]


def test_a_keyed_chain_verifies_and_names_its_key(config: Path) -> None:
    db = keyed(config)
    fill(db, 5)
    key_id = db.audit.keyring.current.key_id if db.audit else ""
    db.dispose()
    proc = run_cli(config, "audit", "verify")
    assert "audit chain intact: 5 events verified" in proc.stdout
    assert f"seq 1-5: hmac-sha256, key {key_id}" in proc.stdout
    report = json.loads(run_cli(config, "audit", "verify", "--json").stdout)
    assert report["ok"] and report["checked"] == 6 and report["findings"] == []
    assert report["anchor"]["seq"] == 6 and report["legacy_events"] == 0
    assert report["segments"] == [
        {"first_seq": 1, "last_seq": 6, "hash_alg": "hmac-sha256", "key_id": key_id}
    ]


@pytest.mark.parametrize(("name", "tamper", "expected"), CASES, ids=[c[0] for c in CASES])
def test_each_attack_is_detected_by_audit_verify(
    config: Path, name: str, tamper: Tamper, expected: list[str]
) -> None:
    db = keyed(config)
    fill(db, 5)
    db.dispose()
    run_cli(config, "audit", "verify")  # intact; its own event is seq 6 and is anchored
    attack(config, tamper, N)
    proc = run_cli(config, "audit", "verify", check=False)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "audit chain BROKEN" in proc.stderr
    for line in expected:
        assert line in proc.stderr, proc.stderr


def test_appending_to_a_truncated_chain_is_refused(config: Path) -> None:
    """Even inside the anchor's write interval: the process remembers what it committed."""
    db = keyed(config)
    fill(db, 5)
    attack(config, truncate, 5)
    with pytest.raises(AuditBreakError, match=r"ends at seq 3"), db.session() as s:
        record(s, "test.event", actor="os:tester")
    with db.session() as s:
        assert s.scalar(select(AuditEvent.seq).order_by(AuditEvent.seq.desc()).limit(1)) == 3
    assert db.audit is not None and db.audit.anchor is not None
    db.audit.flush()
    anchored = db.audit.anchor.read(db.audit.keyring)
    assert anchored is not None and anchored.seq == 5  # what was committed; never moved back
    db.dispose()


def test_two_processes_and_their_threads_append_without_a_false_break(config: Path) -> None:
    """serve and the CLI share the chain and the anchor: neither sees the other as a break."""
    from concurrent.futures import ThreadPoolExecutor

    first, second = keyed(config), keyed(config)  # two contexts, as two processes have
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda db: fill(db, 15), [first, second, first, second]))
    first.dispose()
    second.dispose()
    report = json.loads(run_cli(config, "audit", "verify", "--json").stdout)
    assert report["ok"], report["findings"]
    assert report["checked"] == 60 and report["anchor"]["seq"] == 60


def test_legacy_events_verify_and_are_reported_as_such(config: Path) -> None:
    url = load_settings(config).database_url
    plain = Database(url)
    fill(plain, 3)  # written before audit keys: plain SHA-256
    db = keyed(config)
    fill(db, 2, start=3)
    db.dispose()
    proc = run_cli(config, "audit", "verify")
    assert "audit chain intact: 5 events verified" in proc.stdout
    assert "seq 1-3: plain SHA-256 (legacy" in proc.stdout
    assert "seq 4-5: hmac-sha256" in proc.stdout
    with pytest.raises(AuditKeyError, match="no audit key"), plain.session() as s:
        record(s, "test.event", actor="os:tester")  # once keyed, never plain again
    plain.dispose()


def test_a_job_worker_signs_with_the_node_key_and_may_run_ahead_of_the_anchor(
    config: Path,
) -> None:
    """Workers sign events but leave the anchor to the node; events beyond it verify."""
    from node.stages import JobContext, open_database

    settings = load_settings(config)
    db = keyed(config)
    fill(db, 3)
    db.dispose()
    ctx = JobContext(
        job_id=1,
        job_key="k",
        folder=Path("unused"),
        study_instance_uid="1.2.3",
        inputs={},
        files={},
        primary="t2fs",
        segmentation_model=Path("unused"),
        signatures=(),
        destinations=(),
        database_url=settings.database_url,
        audit=AuditConfig.from_settings(settings),
    )
    worker = open_database(ctx)
    assert worker.audit is not None and worker.audit.anchor is None
    fill(worker, 2, start=3)
    worker.dispose()
    report = json.loads(run_cli(config, "audit", "verify", "--json").stdout)
    assert report["ok"] and report["anchor"]["seq"] == 3 and report["beyond_anchor"] == 2
    assert [s["hash_alg"] for s in report["segments"]] == ["hmac-sha256"]


def test_a_tampered_or_missing_anchor_is_a_finding(config: Path) -> None:
    db = keyed(config)
    fill(db, 3)
    assert db.audit is not None and db.audit.anchor is not None
    path = db.audit.anchor.path
    db.dispose()
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, "seq": 1}))  # hide truncation without the key
    proc = run_cli(config, "audit", "verify", check=False)
    assert proc.returncode == 1
    assert "[anchor] chain:" in proc.stderr and "does not match its MAC" in proc.stderr
    path.unlink()
    proc = run_cli(config, "audit", "verify", check=False)
    assert proc.returncode == 1
    assert "anchor" in proc.stderr and "is missing" in proc.stderr
    assert "not recorded in the trail" in proc.stderr


def test_key_rotation_keeps_old_events_verifiable(config: Path) -> None:
    db = keyed(config)
    fill(db, 3)
    assert db.audit is not None
    old = db.audit.keyring.current.key_id
    key_file = db.audit.config.key_file
    db.dispose()
    proc = run_cli(config, "audit", "rotate-key")
    assert "signs from now on" in proc.stdout
    db = keyed(config)
    assert db.audit is not None
    new = db.audit.keyring.current.key_id
    assert new != old and db.audit.keyring.key_ids == [old, new]
    fill(db, 2, start=3)
    db.dispose()
    report = json.loads(run_cli(config, "audit", "verify", "--json").stdout)
    assert report["ok"], report["findings"]
    assert [(s["key_id"], s["first_seq"], s["last_seq"]) for s in report["segments"]] == [
        (old, 1, 3),
        (new, 4, 6),  # 4: the rotation's own event, 5-6 filled
    ]
    # Dropping the old key makes its events unverifiable: the reason to keep it.
    lines = key_file.read_text().splitlines()
    key_file.write_text("\n".join(line for line in lines if line.startswith("#")) + "\n")
    key_file.write_text(key_file.read_text() + lines[-1] + "\n")
    proc = run_cli(config, "audit", "verify", check=False)
    assert proc.returncode == 1
    assert f"[unverifiable] seq 1: 3 event(s) from seq 1 are signed with key id {old}" in (
        proc.stderr
    )


def test_key_file_is_private_and_others_readable_is_refused(config: Path) -> None:
    db = keyed(config)
    fill(db, 1)
    assert db.audit is not None
    key_file = db.audit.config.key_file
    db.dispose()
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(key_file.parent.stat().st_mode) == 0o700
    key_file.chmod(0o640)
    with pytest.raises(AuditKeyError, match=r"mode 0640: group or others"):
        load_keyring(key_file, create=True, environ={})
    proc = run_cli(config, "audit", "verify", check=False)
    assert proc.returncode == 1
    assert "mode 0640" in proc.stderr and "chmod 600" in proc.stderr


def test_key_from_the_environment(config: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_KEY, "ab" * 32)
    db = keyed(config)
    fill(db, 2)
    assert db.audit is not None
    assert db.audit.keyring.source == f"${ENV_KEY}"
    assert not db.audit.config.key_file.exists()  # nothing written when the env has the key
    db.dispose()
    assert run_cli(config, "audit", "verify").returncode == 0
    monkeypatch.setenv(ENV_KEY, "cd" * 32)  # the wrong key: nothing verifies
    proc = run_cli(config, "audit", "verify", check=False)
    assert proc.returncode == 1 and "[unverifiable]" in proc.stderr
    monkeypatch.setenv(ENV_KEY, "abcd")
    with pytest.raises(AuditKeyError, match="too short"):
        load_keyring(Path("/nonexistent"), create=False)


def test_serve_refuses_a_truncated_chain_until_the_break_is_acknowledged(
    node_factory: Any,
) -> None:
    node = node_factory()
    node.start()
    node.stop()
    # started, stopped, this verification (anchored when it commits)
    head = json.loads(node.cli("audit", "verify", "--json").stdout)["checked"] + 1
    assert head == 3
    db_path = Path(node.settings["storage"]["root"]) / "sarcnode.db"
    attack_url = f"sqlite:///{db_path}"
    db = Database(attack_url, migrate=False)
    with db.engine.begin() as conn:
        conn.execute(text("DELETE FROM audit_events WHERE seq > :s"), {"s": head - 2})
    db.dispose()

    serve = subprocess.run(
        [SARCNODE, "serve", "--config", str(node.config_path)],
        capture_output=True,
        text=True,
        timeout=120,
        env={k: v for k, v in os.environ.items() if k != "SARCNODE_CONFIG"},
        check=False,
    )
    assert serve.returncode == 1, serve.stderr
    assert "refusing to start" in serve.stderr
    assert f"ends at seq {head - 2}" in serve.stderr and "acknowledge-break" in serve.stderr

    proc = node.cli("audit", "verify", check=False)
    assert proc.returncode == 1 and "[truncated]" in proc.stderr
    assert node.cli("audit", "acknowledge-break", check=False).returncode == 2  # --reason needed
    proc = node.cli("audit", "acknowledge-break", "--reason", "restored from the 02:00 backup")
    assert f"seq {head - 1}" in proc.stdout
    proc = node.cli("audit", "verify")
    assert "acknowledged break" in proc.stdout and "restored from the 02:00 backup" in proc.stdout
    node.start()  # appends again, from the acknowledgement on
    node.stop()
    assert node.cli("audit", "verify").returncode == 0
    assert "audit head seq=" in node.log()


def test_an_anchor_edited_in_place_with_its_mtime_restored_is_still_caught(config: Path) -> None:
    """The anchor's check is redone when the file changes, even keeping size and mtime."""
    db = keyed(config)
    fill(db, 3)
    assert db.audit is not None and db.audit.anchor is not None
    db.audit.flush()
    fill(db, 1, start=3)  # checked against the anchor just written
    path = db.audit.anchor.path
    before = path.stat()
    raw = path.read_bytes()
    at = raw.index(b'"hash": "') + len(b'"hash": "')
    with path.open("r+b") as fh:  # same inode, same size: one hex digit of the hash changed
        fh.seek(at)
        fh.write(b"0" if raw[at : at + 1] != b"0" else b"1")
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert path.stat().st_mtime_ns == before.st_mtime_ns
    with pytest.raises(AuditBreakError, match="does not match its MAC"), db.session() as s:
        record(s, "test.event", actor="os:tester")
    db.dispose()
