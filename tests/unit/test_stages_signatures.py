"""Several signature cards on one job: each scores, or says why not; out of range is said.

Real parts throughout: the shipped segmentation model and demo PFS card,
T1-only logistic cards written with plausible numbers (as the real-cohort
cards are), :func:`node.jobs.execute` running the segment, radiomics, score
and encode stages on a SQLite index, dciodvfy on the SR, and the ``sarcnode``
CLI as a subprocess for ``jobs show``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pydicom
import pytest
import yaml

from node.db.models import Job, JobStage, utcnow
from node.db.session import Database
from node.jobs import execute
from node.stages import JobContext
from pipelines.synth.study import write_study
from tests.conftest import run_cli
from tests.pipelines.test_encode import dciodvfy_errors, pdf_text, sr_items
from tests.pipelines.test_scoring_domain import SPHERICITY, t1_card

pytestmark = pytest.mark.slow  # the demo network and three cards on CPU: ~2-5 min each

REPO = Path(__file__).resolve().parents[2]
SEG_MODEL = REPO / "models" / "sarcnode-seg-demo"
DEMO = REPO / "models" / "sarcnode-pfs-demo"
STAGES = ["segment", "radiomics", "score", "encode"]


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic study's DICOM folders (T1 and T2FS), read only by the tests."""
    folder = tmp_path_factory.mktemp("study")
    write_study(folder, 5)
    return folder / "dicom"


def _job(
    tmp_path: Path, study: Path, roles: list[str], signatures: list[Path]
) -> tuple[Database, JobContext, Path]:
    """A queued job over ``roles`` of ``study`` scored by ``signatures``, and a node config."""
    url = f"sqlite:///{tmp_path / 'index.db'}"
    db = Database(url)
    files = {role: sorted((study / role).glob("*.dcm")) for role in roles}
    heads = {r: pydicom.dcmread(f[0], stop_before_pixels=True) for r, f in files.items()}
    inputs = {role: str(ds.SeriesInstanceUID) for role, ds in heads.items()}
    study_uid = str(heads["T2FS"].StudyInstanceUID)
    now = utcnow()
    with db.session() as s:
        job = Job(
            idempotency_key="signatures-test",
            study_instance_uid=study_uid,
            pipeline="sarcoma-mr",
            state="queued",
            attempts=0,
            created_at=now,
            updated_at=now,
            inputs=json.dumps(inputs),
            folder=str(tmp_path / "jobs" / "1"),
        )
        s.add(job)
        s.flush()
        job_id = job.id
        for stage in STAGES:
            s.add(JobStage(job_id=job_id, stage=stage, state="pending", attempts=0))
    ctx = JobContext(
        job_id=job_id,
        job_key="signatures-test",
        folder=tmp_path / "jobs" / "1",
        study_instance_uid=study_uid,
        inputs=inputs,
        files=files,
        primary="T2FS",
        segmentation_model=SEG_MODEL,
        signatures=tuple(signatures),
        destinations=(),
        database_url=url,
        device="cpu",
    )
    config = tmp_path / "node.yaml"
    config.write_text(
        yaml.safe_dump({"storage": {"root": str(tmp_path / "s")}, "database": {"url": url}})
    )
    return db, ctx, config


def _run(db: Database, ctx: JobContext) -> None:
    try:
        assert execute(ctx, STAGES, max_attempts=1) == "done"
    finally:
        db.dispose()


def _groups(sr: pydicom.Dataset) -> dict[str, pydicom.Dataset]:
    """The SR's measurement groups by tracking identifier."""
    measurements = next(
        item
        for item in sr.ContentSequence
        if item.ConceptNameCodeSequence[0].CodeMeaning == "Imaging Measurements"
    )
    out = {}
    for group in measurements.ContentSequence:
        if group.ValueType == "CONTAINER":
            (tracking,) = [
                i.TextValue
                for i in group.ContentSequence
                if i.ValueType == "TEXT"
                and i.ConceptNameCodeSequence[0].CodeMeaning == "Tracking Identifier"
            ]
            out[tracking] = group
    return out


def _coded(group: pydicom.Dataset) -> dict[str, str]:
    return {
        i.ConceptNameCodeSequence[0].CodeValue: i.ConceptCodeSequence[0].CodeValue
        for i in group.ContentSequence
        if i.ValueType == "CODE"
    }


def _nums(group: pydicom.Dataset) -> dict[str, float]:
    return {
        i.ConceptNameCodeSequence[0].get("CodeValue")
        or i.ConceptNameCodeSequence[0].get("LongCodeValue"): float(
            i.MeasuredValueSequence[0].NumericValue
        )
        for i in group.ContentSequence
        if i.ValueType == "NUM"
    }


def test_three_cards_score_one_study_and_the_one_outside_its_range_says_so(
    tmp_path: Path, study: Path
) -> None:
    metastasis = t1_card(tmp_path / "models" / "lungmets")
    # Sphericity lies in (0, 1]: a training range of 2 to 3 puts every study outside it.
    grade = t1_card(
        tmp_path / "models" / "grade",
        "sarcnode-grade-test",
        endpoint="high_grade",
        sphericity=(2.0, 3.0),
    )
    db, ctx, config = _job(tmp_path, study, ["T2FS", "T1"], [DEMO, metastasis, grade])
    _run(db, ctx)

    radiomics = json.loads((ctx.folder / "radiomics" / "outputs.json").read_text())
    # Cards that share a parameter file, sequences and regions share one extraction.
    assert sorted(tuple(e["cards"]) for e in radiomics["extractions"]) == [
        ("sarcnode-lungmets-test", "sarcnode-grade-test"),
        ("sarcnode-pfs-demo",),
    ]
    scores = json.loads((ctx.folder / "score" / "score.json").read_text())["scores"]
    demo, lungmets, high_grade = scores
    assert demo["signature"] == "sarcnode-pfs-demo" and "radscore" in demo
    assert demo["applicability"]["status"] in ("inside", "outside")
    assert demo["training_cohort"] == {"n": 140, "source": "synthetic"}
    assert lungmets["applicability"]["status"] == "inside"
    assert lungmets["risk_group"] in ("positive", "negative") and 0 < lungmets["probability"] < 1
    assert high_grade["risk_group"] is None
    sphericity = high_grade["features"][SPHERICITY]
    assert high_grade["applicability"]["status"] == "outside"
    assert high_grade["applicability"]["text"].startswith(
        f"outside the model's range: {SPHERICITY} {sphericity:.4g} below the training range "
        f"2 to 3 by {2 - sphericity:.4g}"
    )

    # The SR: valid, a group per card; the one outside its range has no risk group and no
    # prediction, but the verdict and by how much; every card's lines in the notes.
    sr_path = ctx.folder / "encode" / "sr.dcm"
    assert dciodvfy_errors(sr_path) == []
    sr = pydicom.dcmread(sr_path)
    groups = _groups(sr)
    assert list(groups) == [
        "Tumour",
        "Tumour: sarcnode-pfs-demo 1.1.0",
        "Tumour: sarcnode-lungmets-test 1.0.0",
        "Tumour: sarcnode-grade-test 1.0.0",
    ]
    inside = groups["Tumour: sarcnode-lungmets-test 1.0.0"]
    assert _coded(inside)["riskgroup"] == lungmets["risk_group"]
    assert _coded(inside)["applicability"] == "inrange"
    assert _coded(inside)["trainingcohort"] == "realcohort"
    assert _nums(inside)["p-lung_metastasis"] == pytest.approx(100 * lungmets["probability"])
    assert _nums(inside)["trainingsize"] == 37
    outside = groups["Tumour: sarcnode-grade-test 1.0.0"]
    assert "riskgroup" not in _coded(outside)
    assert _coded(outside)["applicability"] == "outsiderange"
    assert "p-high_grade" not in _nums(outside)
    assert _nums(outside)["outsideby"] == pytest.approx(2 - sphericity, rel=1e-6)
    assert _coded(outside)["clinicaluse"] == "notclinical"
    notes = [
        i.TextValue
        for i in sr_items(sr.ContentSequence)
        if i.ValueType == "TEXT" and i.ConceptNameCodeSequence[0].CodeValue == "signaturenote"
    ]
    assert len(notes) == 3
    assert "no risk group: outside the model's range" in notes[2]
    assert f"{SPHERICITY} {sphericity:.4g} below the training range" in notes[2]
    assert "nested CV: nested-CV AUC 0.71" in notes[1] and "fitted on 37 real patients" in notes[1]
    assert "SYNTHETIC patients: the plumbing demo" in notes[0]

    pdf = pydicom.dcmread(ctx.folder / "encode" / "report_pdf.dcm")
    text = pdf_text(bytes(pdf.EncapsulatedDocument)[: int(pdf.EncapsulatedDocumentLength)])
    assert "sarcnode-grade-test: OUTSIDE THE MODEL'S RANGE - no risk group, no prediction" in text
    assert "rad-score" in text and "no risk group: outside the model's range" in text

    shown: dict[str, Any] = json.loads(
        run_cli(config, "jobs", "show", str(ctx.job_id), "--json").stdout
    )
    by_card = {s["signature"]: s for s in shown["scores"]}
    assert list(by_card) == ["sarcnode-pfs-demo", "sarcnode-lungmets-test", "sarcnode-grade-test"]
    assert by_card["sarcnode-grade-test"]["risk_group"] is None
    assert by_card["sarcnode-grade-test"]["applicability"]["status"] == "outside"
    assert "outside the model's range" in by_card["sarcnode-grade-test"]["applicability"]["text"]
    assert by_card["sarcnode-lungmets-test"]["training_cohort"] == {"n": 37, "source": "real"}
    score_stage = next(s for s in shown["stages"] if s["stage"] == "score")["outputs"]
    assert score_stage["signature"] == "sarcnode-pfs-demo"  # the one-card outputs, as before
    human = run_cli(config, "jobs", "show", str(ctx.job_id)).stdout
    assert "sarcnode-grade-test 1.0.0 (high_grade)" in human
    assert "no risk group: outside the model's range" in human
    assert "fitted on 37 real patients" in human and "NOT FOR CLINICAL USE" in human


def test_a_t1_card_on_a_study_without_t1_is_skipped_with_the_reason(
    tmp_path: Path, study: Path
) -> None:
    metastasis = t1_card(tmp_path / "models" / "lungmets")
    db, ctx, config = _job(tmp_path, study, ["T2FS"], [DEMO, metastasis])
    _run(db, ctx)  # the SEG and the measurements still go out

    scores = json.loads((ctx.folder / "score" / "score.json").read_text())["scores"]
    assert [(s["signature"], s["skipped"]) for s in scores] == [
        ("sarcnode-pfs-demo", "needs T1: not in the study (it has T2FS)"),
        ("sarcnode-lungmets-test", "needs T1: not in the study (it has T2FS)"),
    ]
    assert scores[1]["training_cohort"] == {"n": 37, "source": "real"}
    sr_path = ctx.folder / "encode" / "sr.dcm"
    assert dciodvfy_errors(sr_path) == []
    sr = pydicom.dcmread(sr_path)
    assert list(_groups(sr)) == ["Tumour"]
    notes = [i.TextValue for i in sr_items(sr.ContentSequence) if i.ValueType == "TEXT"]
    assert any("not scored: needs T1: not in the study" in n for n in notes)
    shown = json.loads(run_cli(config, "jobs", "show", str(ctx.job_id), "--json").stdout)
    assert shown["state"] == "done" and len(shown["scores"]) == 2
    human = run_cli(config, "jobs", "show", str(ctx.job_id)).stdout
    assert "sarcnode-lungmets-test 1.0.0 (lung_metastasis)" in human
    assert "not scored: needs T1: not in the study (it has T2FS)" in human
