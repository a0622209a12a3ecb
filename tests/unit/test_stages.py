"""The segment stage's quality estimate, from the runner to the SR and ``jobs show``.

Real parts throughout: the shipped demo model (its card copied and given
test-time views and a review threshold above any agreement, so every mask is
flagged), :func:`node.jobs.execute` on a SQLite index, the encode stage's
SR, and the ``sarcnode`` CLI as a subprocess.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pydicom
import pytest
import yaml
from sqlalchemy import select

from node.db.models import AuditEvent, Job, JobStage, utcnow
from node.db.session import Database
from node.jobs import execute
from node.stages import JobContext
from pipelines.synth.study import write_study
from tests.conftest import run_cli
from tests.dicomgen import write_series
from tests.pipelines.test_encode import sr_items

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "models" / "sarcnode-seg-demo"


@pytest.fixture(scope="module")
def t2fs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The T2FS series of a synthetic study (read only by the tests)."""
    study = tmp_path_factory.mktemp("study")
    write_study(study, 5)
    return study / "dicom" / "T2FS"


def _model(folder: Path, **changes: object) -> Path:
    """The demo model with ``changes`` to its card (weights and checksums untouched)."""
    shutil.copytree(DEMO, folder)
    card = yaml.safe_load((folder / "card.yaml").read_text())
    for key, value in changes.items():  # one level deep: a section keeps what is not changed
        card[key] = (card.get(key) or {}) | value if isinstance(value, dict) else value
    (folder / "card.yaml").write_text(yaml.safe_dump(card, sort_keys=False))
    return folder


def _job(
    tmp_path: Path, series: Path, model: Path, stages: list[str]
) -> tuple[Database, JobContext, Path]:
    """A queued job over the T2FS series in ``series``, its context, and a node config."""
    url = f"sqlite:///{tmp_path / 'index.db'}"
    db = Database(url)
    files = sorted(series.glob("*.dcm"))
    first = pydicom.dcmread(files[0], stop_before_pixels=True)
    now = utcnow()
    with db.session() as s:
        job = Job(
            idempotency_key="quality-test",
            study_instance_uid=str(first.StudyInstanceUID),
            pipeline="sarcoma-mr",
            state="queued",
            attempts=0,
            created_at=now,
            updated_at=now,
            inputs=json.dumps({"T2FS": str(first.SeriesInstanceUID)}),
            folder=str(tmp_path / "jobs" / "1"),
        )
        s.add(job)
        s.flush()
        job_id = job.id
        for stage in stages:
            s.add(JobStage(job_id=job_id, stage=stage, state="pending", attempts=0))
    ctx = JobContext(
        job_id=job_id,
        job_key="quality-test",
        folder=tmp_path / "jobs" / "1",
        study_instance_uid=str(first.StudyInstanceUID),
        inputs={"T2FS": str(first.SeriesInstanceUID)},
        files={"T2FS": files},
        primary="T2FS",
        segmentation_model=model,
        signatures=(),
        destinations=(),
        database_url=url,
        device="cpu",
    )
    config = tmp_path / "node.yaml"
    config.write_text(
        yaml.safe_dump({"storage": {"root": str(tmp_path / "s")}, "database": {"url": url}})
    )
    return db, ctx, config


@pytest.mark.slow  # the network on CPU: ~30-60 s
def test_a_flagged_mask_is_delivered_with_its_flag_and_jobs_show_says_why(
    tmp_path: Path, t2fs: Path
) -> None:
    model = _model(
        tmp_path / "model", ensemble={"tta": ["none", "x"]}, quality={"review_below": 1.01}
    )
    db, ctx, config = _job(tmp_path, t2fs, model, ["segment", "encode"])
    try:
        assert execute(ctx, ["segment", "encode"], max_attempts=1) == "done"  # flagged, not failed
    finally:
        db.dispose()

    quality = json.loads((ctx.folder / "segment" / "outputs.json").read_text())["quality"]
    assert quality["review"] is True and 0 < quality["score"] <= 1
    assert quality["threshold"] == 1.01
    assert quality["reasons"] == [
        f"views of the ensemble disagree: agreement {quality['score']:.2f} < 1.01"
    ]
    sr = pydicom.dcmread(ctx.folder / "encode" / "sr.dcm")
    coded = {
        i.ConceptNameCodeSequence[0].get("CodeValue"): i.ConceptCodeSequence[0].CodeValue
        for i in sr_items(sr.ContentSequence)
        if i.ValueType == "CODE"
    }
    assert coded["segreview"] == "reviewneeded"

    shown = json.loads(run_cli(config, "jobs", "show", str(ctx.job_id), "--json").stdout)
    assert shown["state"] == "done"
    assert shown["segmentation_quality"] == quality
    segment = next(s for s in shown["stages"] if s["stage"] == "segment")
    assert segment["outputs"]["quality"] == quality
    human = run_cli(config, "jobs", "show", str(ctx.job_id)).stdout
    assert (
        f"segmentation quality {quality['score']:.2f} - REVIEW: views of the ensemble disagree"
        in human
    )


@pytest.mark.slow  # the network on CPU: ~30-60 s
def test_an_unflagged_mask_shows_its_score_and_no_review(tmp_path: Path, t2fs: Path) -> None:
    model = _model(
        tmp_path / "model", ensemble={"tta": ["none", "x"]}, quality={"review_below": 0.0}
    )
    db, ctx, config = _job(tmp_path, t2fs, model, ["segment"])
    try:
        assert execute(ctx, ["segment"], max_attempts=1) == "done"
    finally:
        db.dispose()
    shown = json.loads(run_cli(config, "jobs", "show", str(ctx.job_id), "--json").stdout)
    quality = shown["segmentation_quality"]
    assert quality["review"] is False and quality["reasons"] == []
    human = run_cli(config, "jobs", "show", str(ctx.job_id)).stdout
    assert f"segmentation quality {quality['score']:.2f} (review below 0.00) - review: no" in human


def test_noise_fails_the_job_for_good_with_what_was_measured(tmp_path: Path) -> None:
    """An image of noise is refused before any network runs: no retry, the reason audited."""
    write_series(tmp_path / "noise", 8)
    db, ctx, config = _job(tmp_path, tmp_path / "noise", DEMO, ["segment", "encode"])
    try:
        assert execute(ctx, ["segment", "encode"], max_attempts=3) == "failed"
        with db.session() as s:
            job = s.get(Job, ctx.job_id)
            assert job is not None
            error = str(job.error)
            failed = s.scalars(select(AuditEvent).where(AuditEvent.action == "job.failed")).one()
            detail = json.loads(failed.detail)
    finally:
        db.dispose()
    assert error.startswith(
        "segment: ImplausibleImageError: T2FS series: the image looks like noise"
    )
    assert "neighbouring voxels correlate" in error
    assert detail["stage"] == "segment"
    assert detail["error"].startswith("ImplausibleImageError: ")
    shown = json.loads(run_cli(config, "jobs", "show", str(ctx.job_id), "--json").stdout)
    assert shown["state"] == "failed" and shown["segmentation_quality"] is None


@pytest.mark.parametrize(
    ("quality", "line"),
    [
        (None, "segmentation quality: not recorded"),
        (
            {"score": None, "review": False, "threshold": 0.8, "reasons": []},
            "segmentation quality n/a (one test-time view) (review below 0.80) - review: no",
        ),
        (
            {
                "score": None,
                "review": True,
                "threshold": 0.8,
                "reasons": ["the locator found no tumour"],
            },
            "segmentation quality n/a (one test-time view) - REVIEW: the locator found no tumour",
        ),
    ],
)
def test_quality_text(quality: dict[str, object] | None, line: str) -> None:
    from node.cli.jobs import quality_text

    assert quality_text(quality).startswith(line)
