"""The admin CLI as an admin uses it (issue 15, item 4).

A node's SQLite database is made by the real code (migrations, the keyed
audit trail, the ingestor storing real DICOM instances, the outbox queueing
a real result file); the commands run as the ``sarcnode`` console script in
a subprocess, or through typer's runner where many calls would be slow.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from dataclasses import dataclass
from io import StringIO
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import generate_uid
from rich.console import Console
from sqlalchemy import select
from typer.testing import CliRunner

from node.audit.context import AuditContext
from node.audit.trail import record
from node.cli import common
from node.cli import main as cli
from node.config import load_settings
from node.db.models import AuditEvent, Job, JobStage, utcnow
from node.db.session import Database
from node.delivery import enqueue
from node.store.files import InstanceFiles
from node.store.ingest import Ingestor, Peer
from tests.conftest import SARCNODE
from tests.dicomgen import mr_dataset

#: A UID as long as the standard allows (64 characters): the ones tables used to cut.
LONG_PREFIX = "1.2.826.0.1.3680043.8.498."


def long_uid() -> str:
    """A fresh 64-character UID."""
    uid = (str(generate_uid(LONG_PREFIX)) + "1" * 64)[:64]
    assert len(uid) == 64
    return uid


@dataclass
class NodeDb:
    """A node's config and the UIDs and ids its database holds."""

    root: Path
    config: Path
    study: str
    series: str
    instances: list[str]
    job_id: int
    mask: Path


def make_node(root: Path) -> NodeDb:
    """A node database with one study (3 instances), one finished job and one delivery."""
    root.mkdir(parents=True)
    config = root / "node.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "dicom": {"port": 1, "accept_any_calling_ae": True},
                "storage": {"root": str(root / "storage"), "min_free_mb": 1},
                "jobs": {"pipelines_dir": str(root / "no-pipelines")},
            }
        )
    )
    settings = load_settings(config)
    db = Database(settings.database_url, audit=AuditContext.from_settings(settings))
    study, series = long_uid(), long_uid()
    instances = [long_uid() for _ in range(3)]
    ingestor = Ingestor(db, InstanceFiles(settings.storage.root), min_free_mb=1)
    for i, sop in enumerate(instances):
        ds = mr_dataset(study, series, i, sop_uid=sop, size=16)
        buf = DicomBytesIO()
        buf.is_little_endian, buf.is_implicit_VR = True, False
        write_dataset(buf, ds)
        ingestor.store(
            command_sop_class_uid=str(ds.SOPClassUID),
            command_sop_instance_uid=sop,
            file_meta=ds.file_meta,
            dataset=buf.getvalue(),
            peer=Peer(None, "SCANNER1", "127.0.0.1"),
        )
    folder = settings.storage.root / "jobs" / "1"
    mask = folder / "segment" / "mask_T2FS.nii.gz"
    now = utcnow()
    with db.session() as s:
        job = Job(
            idempotency_key="admin-cli-test",
            study_instance_uid=study,
            pipeline="sarcoma-mr",
            state="done",
            stage="encode",
            attempts=1,
            created_at=now,
            updated_at=now,
            started_at=now,
            finished_at=now,
            inputs=json.dumps({"T2FS": series}),
            folder=str(folder),
        )
        s.add(job)
        s.flush()
        job_id = job.id
        outputs = {
            "segment": {
                "model": "sarcnode-seg-demo",
                "volume_ml": 12.5,
                "masks": {"T2FS": str(mask)},
                "quality": None,
            },
            "encode": {"files": {"sr": str(folder / "encode" / "sr.dcm")}},
        }
        for stage, out in outputs.items():
            s.add(
                JobStage(
                    job_id=job_id,
                    stage=stage,
                    state="done",
                    attempts=1,
                    started_at=now,
                    ended_at=now,
                    outputs=json.dumps(out),
                )
            )
        record(s, "job.created", actor="node", study_instance_uid=study, detail={"job": job_id})
        record(s, "job.done", actor="node", study_instance_uid=study, detail={"job": job_id})
    result = root / "result.dcm"
    mr_dataset(study, long_uid(), 0, sop_uid=long_uid(), size=16).save_as(
        result, enforce_file_format=True
    )
    enqueue(db, [result], ["pacs"], job_id=job_id)
    db.dispose()
    return NodeDb(root, config, study, series, instances, job_id, mask)


@pytest.fixture(scope="module")
def node_db(tmp_path_factory: pytest.TempPathFactory) -> NodeDb:
    """One node database the read-only tests share."""
    return make_node(tmp_path_factory.mktemp("admin") / "node")


def sarcnode(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """The console script, as an admin runs it (no ``SARCNODE_CONFIG`` unless given)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("SARCNODE_")}
    return subprocess.run(
        [SARCNODE, *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=base | {"COLUMNS": "120"} | (env or {}),
        cwd=cwd,
    )


def invoke(*args: str, env: dict[str, str | None] | None = None) -> Any:
    """Typer's runner over the same app (in-process: many calls stay quick)."""
    unset: dict[str, str | None] = {k: None for k in os.environ if k.startswith("SARCNODE_")}
    return CliRunner().invoke(cli.app, list(args), env=unset | (env or {}))


def flat(text: str) -> str:
    """Help text without rich's box characters and line breaks, for phrase matching."""
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", text).split())


# -- --version and --config ------------------------------------------------------------


def test_version_prints_the_package_version() -> None:
    from node import __version__

    proc = sarcnode("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"sarcnode {__version__}"


def test_config_goes_before_or_after_the_command(node_db: NodeDb) -> None:
    cfg = str(node_db.config)
    before = sarcnode("--config", cfg, "jobs", "--json")
    after = sarcnode("jobs", "--json", "--config", cfg)
    assert before.returncode == after.returncode == 0, before.stderr + after.stderr
    assert json.loads(before.stdout) == json.loads(after.stdout)
    assert [j["id"] for j in json.loads(before.stdout)] == [node_db.job_id]
    shown = sarcnode("-c", cfg, "jobs", "show", str(node_db.job_id), "--json")
    assert shown.returncode == 0 and json.loads(shown.stdout)["id"] == node_db.job_id
    # Typed on the command line, before the command, it wins over $SARCNODE_CONFIG ...
    elsewhere = node_db.root / "other.yaml"
    elsewhere.write_text(yaml.safe_dump({"storage": {"root": str(node_db.root / "nothing")}}))
    env = {"SARCNODE_CONFIG": str(elsewhere)}
    assert sarcnode("--config", cfg, "studies", "--json", env=env).returncode == 0
    # ... and the one after the command wins over the one before it.
    nearest = sarcnode("--config", cfg, "studies", "--config", str(elsewhere))
    assert nearest.returncode == 2 and str(node_db.root / "nothing") in nearest.stderr


# -- --json: arrays for lists, one object for one thing, as each help says ------------

LIST_COMMANDS = [
    ["studies"],
    ["series"],
    ["instances"],
    ["associations"],
    ["audit"],
    ["deliveries"],
    ["jobs"],
    ["pipelines", "list"],
]
OBJECT_COMMANDS = [["status"], ["jobs", "show", "{job}"], ["audit", "verify"]]


@pytest.mark.parametrize(
    ("command", "shape"),
    [(c, "array") for c in LIST_COMMANDS] + [(c, "object") for c in OBJECT_COMMANDS],
    ids=lambda v: " ".join(v) if isinstance(v, list) else v,
)
def test_json_shape_is_the_one_the_help_names(
    node_db: NodeDb, command: list[str], shape: str
) -> None:
    args = [a.format(job=node_db.job_id) for a in command]
    helped = invoke(*[a for a in args if not a.isdigit()], "--help")
    assert helped.exit_code == 0
    other = "object" if shape == "array" else "array"
    assert f"one JSON {shape}" in flat(helped.output)
    assert f"one JSON {other}" not in flat(helped.output)
    extra = [] if args[0] == "pipelines" else ["--config", str(node_db.config)]
    if args[:2] == ["pipelines", "list"]:
        extra = ["--pipelines", str(Path(common.PIPELINES_DIR))]
    ran = invoke(*args, "--json", *extra)
    assert ran.exit_code in (0, 1), ran.output  # status: 1, no serve runs here
    data = json.loads(ran.stdout)
    assert isinstance(data, list if shape == "array" else dict), data


def test_list_commands_give_an_array_even_of_one_row(node_db: NodeDb) -> None:
    ran = invoke("studies", "--json", "--config", str(node_db.config))
    [study] = json.loads(ran.stdout)
    assert study["study_instance_uid"] == node_db.study and study["instances"] == 3


# -- invalid values -------------------------------------------------------------------


def test_an_unknown_state_is_refused_naming_the_valid_ones(node_db: NodeDb) -> None:
    proc = sarcnode("jobs", "--state", "bogus", "--config", str(node_db.config))
    assert proc.returncode == 2 and proc.stdout == ""
    said = flat(proc.stderr)
    assert "'bogus' is not one of 'queued', 'running', 'done', 'failed', 'dead', 'cancelled'" in (
        said
    )
    refused = invoke("deliveries", "--state", "sent", "--config", str(node_db.config))
    assert refused.exit_code == 2
    assert "'pending', 'committing', 'done', 'dead'" in flat(refused.output)
    assert invoke("jobs", "--limit", "0", "--config", str(node_db.config)).exit_code == 2
    done = invoke("jobs", "--state", "done", "--json", "--config", str(node_db.config))
    assert [j["id"] for j in json.loads(done.stdout)] == [node_db.job_id]


# -- clinical set ---------------------------------------------------------------------


def test_clinical_set_refuses_a_study_the_node_never_received(tmp_path: Path) -> None:
    node = make_node(tmp_path / "node")
    cfg = str(node.config)
    stranger = long_uid()
    refused = invoke("clinical", "set", stranger, "--edema", "yes", "--config", cfg)
    assert refused.exit_code == 2
    assert f"the node holds no study {stranger}" in flat(refused.output)
    clinical = node.root / "storage" / "clinical"
    assert not (clinical / f"{stranger}.json").exists()
    assert invoke("clinical", "set", node.study, "--sex", "X", "--config", cfg).exit_code == 2

    early = invoke("clinical", "set", stranger, "--grade", "3", "--before-arrival", "--config", cfg)
    assert early.exit_code == 0, early.output
    assert json.loads((clinical / f"{stranger}.json").read_text()) == {"grade3": 1}

    held = invoke("clinical", "set", node.study, "--edema", "yes", "--age", "60", "--config", cfg)
    assert held.exit_code == 0, held.output
    assert "age 60, edema yes" in held.stdout and "{" not in held.stdout
    assert f"job {node.job_id} queued again from its score stage" in held.stdout
    settings = load_settings(node.config)
    db = Database(settings.database_url, audit=AuditContext.from_settings(settings))
    try:
        with db.session() as s:
            studies = s.scalars(
                select(AuditEvent.study_instance_uid).where(AuditEvent.action == "clinical.set")
            ).all()
    finally:
        db.dispose()
    assert studies == [stranger, node.study]  # the refused call recorded nothing


# -- full UIDs --------------------------------------------------------------------------


def test_tables_print_whole_uids_to_a_pipe_at_120_columns(node_db: NodeDb) -> None:
    cfg = str(node_db.config)
    for command, uids in [
        (["studies"], [node_db.study]),
        (["series"], [node_db.series]),
        (["instances", "--series", node_db.series], node_db.instances),
        (["jobs"], [node_db.study]),
        (["audit", "--study", node_db.study], [node_db.series]),
        (["deliveries"], []),
    ]:
        proc = sarcnode(*command, "--config", cfg)
        assert proc.returncode == 0, proc.stderr
        assert "…" not in proc.stdout, proc.stdout
        lines = proc.stdout.splitlines()
        for uid in uids:
            assert any(uid in line for line in lines), (command, uid, proc.stdout)


def test_tables_fold_uids_on_a_terminal_rather_than_cut_them(
    node_db: NodeDb, monkeypatch: pytest.MonkeyPatch
) -> None:
    screen = StringIO()
    monkeypatch.setattr(common, "out", Console(file=screen, force_terminal=True, width=120))
    ran = invoke("instances", "--config", str(node_db.config))
    assert ran.exit_code == 0, ran.output
    text = re.sub(r"\x1b\[[0-9;]*m", "", screen.getvalue())
    assert "…" not in text
    first_column = "".join(
        line.split("│")[1].strip() for line in text.splitlines() if line.startswith("│")
    )
    for uid in node_db.instances:
        assert uid in first_column, text


# -- jobs show and status ---------------------------------------------------------------


def test_jobs_show_prints_stages_outputs_deliveries_and_audit(node_db: NodeDb) -> None:
    proc = sarcnode("jobs", "show", str(node_db.job_id), "--config", str(node_db.config))
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert f"study {node_db.study}" in text and f"input T2FS: series {node_db.series}" in text
    assert "outputs of segment:" in text and f"masks.T2FS: {node_db.mask}" in text
    assert "volume_ml: 12.5" in text and "outputs of encode:" in text
    assert re.search(r"Deliveries.*pacs.*pending", text, re.S), text
    assert re.search(r"Audit.*job\.created.*job\.done.*delivery\.queued", text, re.S), text

    shown = json.loads(
        sarcnode(
            "jobs", "show", str(node_db.job_id), "--json", "--config", str(node_db.config)
        ).stdout
    )
    assert [e["action"] for e in shown["audit"]] == ["job.created", "job.done", "delivery.queued"]
    assert [d["destination"] for d in shown["deliveries"]] == ["pacs"]
    assert shown["stages"][0]["outputs"]["masks"] == {"T2FS": str(node_db.mask)}


def test_status_prints_readable_lines_not_python_values(node_db: NodeDb) -> None:
    proc = sarcnode("status", "--config", str(node_db.config))
    assert proc.returncode == 1  # serve is not running: the SCP is down
    text = proc.stdout
    for raw in ("{", "}", "None", "[]", "'"):
        assert raw not in text, (raw, text)
    assert "DOWN: not running (no heartbeat)" in text
    assert "1 studies, 1 series (1 receiving, 0 stable), 3 instances" in text
    assert re.search(r"jobs\s+│?\s*1 done", text), text
    assert re.search(r"deliveries\s+│?\s*1 pending", text), text
    info = json.loads(sarcnode("status", "--json", "--config", str(node_db.config)).stdout)
    assert info["jobs"] == {"done": 1} and info["deliveries"] == {"pending": 1}
    assert info["scp_up"] is False and info["instances"] == 3


# -- no database where the config points -------------------------------------------------


def test_read_commands_refuse_a_missing_database_instead_of_creating_one(
    tmp_path: Path,
) -> None:
    root = tmp_path / "not-the-node"
    env = {"SARCNODE_STORAGE__ROOT": str(root)}
    proc = sarcnode("jobs", env=env, cwd=tmp_path)
    assert proc.returncode == 2 and proc.stdout == ""
    assert f"no node database at {root / 'sarcnode.db'}" in flat(proc.stderr)
    for command in (
        ["status"],
        ["studies", "--json"],
        ["audit"],
        ["audit", "verify"],
        ["deliveries"],
        ["jobs", "show", "1"],
        ["clinical", "set", long_uid(), "--edema", "yes", "--before-arrival"],
    ):
        ran = invoke(*command, env={"SARCNODE_STORAGE__ROOT": str(root)})
        assert ran.exit_code == 2, (command, ran.output)
        assert "no node database at" in flat(ran.output), (command, ran.output)
    assert not root.exists()  # nothing created: no folder, no database, no key


@pytest.mark.postgres
def test_an_empty_postgresql_database_is_not_taken_for_the_node(
    postgres: Any, tmp_path: Path
) -> None:
    url = postgres.create_database()
    ran = invoke("jobs", env={"SARCNODE_DATABASE__URL": url, "SARCNODE_STORAGE__ROOT": "x"})
    assert ran.exit_code == 2 and "no sarcnode tables" in flat(ran.output), ran.output
