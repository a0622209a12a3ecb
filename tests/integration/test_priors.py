"""Prior studies from a real Orthanc: found, moved, analysed and compared; and the failures.

The baseline synthetic study lives in Orthanc only; its follow-up (tumour
+40 %) is sent to the node, which finds the baseline by C-FIND, C-MOVEs it
to itself, analyses it and reports the change in the SR it delivers. The
failure modes run the compare stage in-process against the same Orthanc
(no prior), a port nobody listens on (PACS down) and a prior whose images
are blank (cannot be segmented).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
import yaml
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from sqlalchemy import select

from node.audit.context import AuditContext
from node.config import Settings, load_settings
from node.db.models import AuditEvent
from node.db.session import Database
from node.jobs.scheduler import prior_plan
from node.pipelines import load_pipeline
from node.priors import NO_COMPARISON, NO_PRIOR, compare_stage
from node.stages import JobContext
from node.store.files import InstanceFiles
from node.store.index import mark_stable_series
from node.store.ingest import Ingestor, Peer
from pipelines.synth.study import write_study
from tests.conftest import NodeProcess, free_port
from tests.integration.test_e2e import pipeline_node, send, wait_for
from tests.orthanc import Orthanc, orthanc  # noqa: F401 (fixture)

pytestmark = [pytest.mark.integration]
SEED = 21


@dataclass(frozen=True)
class Studies:
    baseline: Path
    follow_up: Path  # +40 %, 120 days later
    blank_prior: Path  # the baseline's T2FS with every pixel 0: nothing to segment


def _uid(folder: Path) -> str:
    return str(pydicom.dcmread(next((folder / "dicom" / "T2FS").iterdir())).StudyInstanceUID)


@pytest.fixture(scope="module")
def studies(tmp_path_factory: pytest.TempPathFactory) -> Studies:
    root = tmp_path_factory.mktemp("priors")
    write_study(root / "baseline", SEED)
    write_study(root / "follow-up", SEED, follow_up_days=120, volume_change_pct=40)
    blank = root / "blank" / "dicom" / "T2FS"
    blank.mkdir(parents=True)
    for path in sorted((root / "baseline" / "dicom" / "T2FS").iterdir()):
        ds = pydicom.dcmread(path)
        ds.PixelData = np.zeros((ds.Rows, ds.Columns), np.uint16).tobytes()
        ds.save_as(blank / path.name, enforce_file_format=True)
    return Studies(root / "baseline", root / "follow-up", root / "blank")


def truth_change_pct(studies: Studies) -> float:
    """The generator's tumour volume change on the FS-T2 truth masks, in %."""

    def ml(folder: Path) -> float:
        mask = sitk.ReadImage(str(folder / "masks" / "T2FS_tumour.nii.gz"))
        return float(sitk.GetArrayViewFromImage(mask).sum()) * float(np.prod(mask.GetSpacing()))

    return 100.0 * (ml(studies.follow_up) / ml(studies.baseline) - 1)


def with_compare(pipelines: Path) -> Path:
    """The test pipeline file with the compare stage and a one-year prior rule."""
    path = pipelines / "sarcoma-mr.yaml"
    data = yaml.safe_load(path.read_text())
    data["stages"] = ["segment", "radiomics", "score", "compare", "encode", "deliver"]
    data["priors"] = {"max_age_days": 365}
    path.write_text(yaml.safe_dump(data))
    return path


def post_study(pacs: Orthanc, folder: Path) -> None:
    for path in sorted(folder.rglob("*.dcm")):
        pacs.post_instance(path.read_bytes())


# -- in-process: the stage against the failure modes ---------------------------------------


def local_node(tmp_path: Path, port: int) -> tuple[Settings, Database, Path]:
    """Settings, a migrated index and the pipeline file of a node whose prior source is ``port``."""
    node = pipeline_node(tmp_path, _PacsStub(port))  # type: ignore[arg-type]
    pipeline = with_compare(tmp_path / "pipelines")
    node |= {
        "dicom": {"port": 1, "accept_any_calling_ae": True},
        "storage": {"root": str(tmp_path / "storage"), "min_free_mb": 1},
        "priors": {
            "sources": [{"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": port}],
            "move_timeout_s": 30,
            "down_backoff_s": 600,
        },
    }
    config = tmp_path / "node.yaml"
    config.write_text(yaml.safe_dump(node))
    settings = load_settings(config)
    return (
        settings,
        Database(settings.database_url, audit=AuditContext.from_settings(settings)),
        pipeline,
    )


@dataclass(frozen=True)
class _PacsStub:
    """What ``pipeline_node`` reads of a PACS (its destination entry)."""

    dicom_port: int
    aet: str = "ORTHANC"


def ingest(settings: Settings, db: Database, folder: Path) -> None:
    """Store every instance under ``folder`` through the node's ingest path; mark series stable."""
    ingestor = Ingestor(db, InstanceFiles(settings.storage.root), min_free_mb=1)
    for path in sorted(folder.rglob("*.dcm")):
        ds = pydicom.dcmread(path)
        buf = DicomBytesIO()
        buf.is_little_endian, buf.is_implicit_VR = True, False
        write_dataset(buf, ds)
        ingestor.store(
            command_sop_class_uid=str(ds.SOPClassUID),
            command_sop_instance_uid=str(ds.SOPInstanceUID),
            file_meta=ds.file_meta,
            dataset=buf.getvalue(),
            peer=Peer(None, "SCANNER1", "127.0.0.1"),
        )
    mark_stable_series(db, 0)


def job_context(settings: Settings, pipeline: Path, study: Path) -> JobContext:
    loaded = load_pipeline(pipeline)
    folder = settings.storage.root / "jobs" / "1"
    folder.mkdir(parents=True)
    return JobContext(
        job_id=1,
        job_key="priors-test",
        folder=folder,
        study_instance_uid=_uid(study),
        inputs={},
        files={},
        primary="T2FS",
        segmentation_model=loaded.segmentation_model,
        signatures=loaded.signatures,
        destinations=(),
        database_url=settings.database_url,
        device="cpu",
        priors=prior_plan(settings, loaded),
    )


def audit_actions(db: Database) -> list[str]:
    with db.session() as s:
        return [e.action for e in s.scalars(select(AuditEvent).order_by(AuditEvent.seq))]


def test_no_prior_in_the_pacs_ends_the_stage_with_no_prior(
    studies: Studies,
    orthanc: Orthanc,  # noqa: F811
    tmp_path: Path,
) -> None:
    post_study(orthanc, studies.follow_up / "dicom" / "T2FS")  # the study itself is not its prior
    settings, db, pipeline = local_node(tmp_path, orthanc.dicom_port)
    ingest(settings, db, studies.follow_up / "dicom" / "T2FS")
    out = compare_stage(job_context(settings, pipeline, studies.follow_up), db)
    assert out["status"] == NO_PRIOR, out
    assert "no earlier study" in out["reason"]
    assert "priors.none" in audit_actions(db)


def test_a_pacs_that_is_down_is_asked_once_and_the_job_goes_on(
    studies: Studies, tmp_path: Path
) -> None:
    settings, db, pipeline = local_node(tmp_path, free_port())  # nobody listens there
    ingest(settings, db, studies.follow_up / "dicom" / "T2FS")
    ctx = job_context(settings, pipeline, studies.follow_up)
    started = time.monotonic()
    first = compare_stage(ctx, db)
    second = compare_stage(ctx, db)  # the next job: not asked again within the back-off
    assert time.monotonic() - started < 30
    assert first["status"] == second["status"] == NO_COMPARISON
    assert "prior source unavailable" in first["reason"]
    assert "not asked again until" in second["reason"]
    assert audit_actions(db).count("priors.source_unavailable") == 1


def test_a_prior_that_cannot_be_segmented_leaves_the_comparison_out_with_the_reason(
    studies: Studies,
    orthanc: Orthanc,  # noqa: F811
    tmp_path: Path,
) -> None:
    post_study(orthanc, studies.blank_prior)
    settings, db, pipeline = local_node(tmp_path, orthanc.dicom_port)
    ingest(settings, db, studies.follow_up / "dicom" / "T2FS")
    ingest(settings, db, studies.blank_prior)  # held already: no move needed
    out = compare_stage(job_context(settings, pipeline, studies.follow_up), db)
    assert out["status"] == NO_COMPARISON, out
    assert out["reason"].startswith("comparison omitted: prior")
    assert "cannot be analysed" in out["reason"]
    assert [f["verdict"] for f in out["found"]] == ["used"]
    assert "priors.omitted" in audit_actions(db)


@pytest.mark.slow
@pytest.mark.timeout(900)  # two studies segmented and scored on CPU
def test_a_shrunk_tumour_is_reported_as_a_decrease(
    studies: Studies,
    orthanc: Orthanc,  # noqa: F811
    tmp_path: Path,
) -> None:
    """-40 %: the job's stages, then the compare stage on a prior found in Orthanc, held here."""
    from node.stages import STAGE_FUNCTIONS

    shrunk = tmp_path / "shrunk"
    write_study(shrunk, SEED, follow_up_days=60, volume_change_pct=-40)
    post_study(orthanc, studies.baseline / "dicom" / "T2FS")
    settings, db, pipeline = local_node(tmp_path, orthanc.dicom_port)
    ingest(settings, db, studies.baseline / "dicom" / "T2FS")
    ingest(settings, db, shrunk / "dicom" / "T2FS")
    ctx = job_context(settings, pipeline, shrunk)
    files = sorted((shrunk / "dicom" / "T2FS").iterdir())
    series_uid = str(pydicom.dcmread(files[0]).SeriesInstanceUID)
    ctx = replace(ctx, inputs={"T2FS": series_uid}, files={"T2FS": files})
    for stage in ("segment", "radiomics", "score"):
        (ctx.folder / stage).mkdir(parents=True, exist_ok=True)
        outputs = STAGE_FUNCTIONS[stage](ctx)
        (ctx.folder / stage / "outputs.json").write_text(json.dumps(outputs))
    out = compare_stage(ctx, db)
    assert out["status"] == "compared", out
    assert out["days"] == 60
    truth = 100.0 * (
        _mask_ml(shrunk / "masks" / "T2FS_tumour.nii.gz")
        / _mask_ml(studies.baseline / "masks" / "T2FS_tumour.nii.gz")
        - 1
    )
    assert out["volume_pct"] < 0
    assert abs(out["volume_pct"] - truth) <= 10, (out, truth)
    assert "already held by the node; analysis: analysed now" in out["reason"]
    again = compare_stage(ctx, db)  # a later job: the prior is not analysed again
    assert "analysis: reused (analysed before)" in again["reason"]
    assert again["volume_pct"] == out["volume_pct"]


def _mask_ml(path: Path) -> float:
    mask = sitk.ReadImage(str(path))
    return float(sitk.GetArrayViewFromImage(mask).sum()) * float(np.prod(mask.GetSpacing()))


# -- through serve: storescu -> node -> C-FIND/C-MOVE from Orthanc -> SR back to Orthanc ------


def sr_volume_change(pacs: Orthanc, study_uid: str) -> tuple[float, str]:
    """(value, meaning) of the SR's volume-change NUM, read from what Orthanc holds."""
    for series in pacs.series_of_study(study_uid):
        if series["modality"] != "SR":
            continue
        query = {"Level": "Instance", "Query": {"SeriesInstanceUID": series["series_uid"]}}
        ids = json.loads(pacs.request("POST", "/tools/find", json.dumps(query).encode()))
        ds = pydicom.dcmread(DicomBytesIO(pacs.request("GET", f"/instances/{ids[0]}/file")))
        for item in _walk(ds):
            name = (
                item.ConceptNameCodeSequence[0].CodeMeaning
                if "ConceptNameCodeSequence" in item
                else ""
            )
            if item.get("ValueType") == "NUM" and str(name).startswith("Volume vs prior"):
                return float(item.MeasuredValueSequence[0].NumericValue), str(name)
    raise AssertionError(f"no SR with a volume change in Orthanc for {study_uid}")


def _walk(ds: Any) -> Any:
    for item in ds.get("ContentSequence", []):
        yield item
        yield from _walk(item)


@pytest.mark.slow
@pytest.mark.timeout(900)  # two studies segmented and scored on CPU
def test_the_node_moves_the_prior_from_orthanc_and_reports_the_change_in_its_sr(
    studies: Studies,
    node_factory: Any,
    orthanc: Orthanc,  # noqa: F811
    tmp_path: Path,
) -> None:
    settings = pipeline_node(tmp_path, orthanc)
    with_compare(tmp_path / "pipelines")
    settings["priors"] = {
        "sources": [
            {
                "name": "pacs",
                "ae_title": orthanc.aet,
                "host": "127.0.0.1",
                "port": orthanc.dicom_port,
            }
        ]
    }
    node: NodeProcess = node_factory(settings)
    orthanc.modalities["sarcnode"] = ("SARCNODE", "127.0.0.1", node.port)  # C-MOVE destination
    orthanc.stop()
    orthanc.start()
    post_study(orthanc, studies.baseline / "dicom")
    # The PACS's copy of the prior also holds an object the node's SCP refuses (as it would
    # the node's own SEG/SR/PDF of that study): the node moves the series it needs only.
    orthanc.post_instance(_secondary_capture(studies.baseline))
    node.start()
    started = time.monotonic()
    send(node, studies.follow_up / "dicom")
    follow_up = _uid(studies.follow_up)
    done = wait_for(
        node,
        "the follow-up's job",
        lambda: [
            j
            for j in node.json("jobs")
            if j["study_instance_uid"] == follow_up and j["state"] in ("done", "failed", "dead")
        ],
        timeout=840,
    )
    shown = json.loads(node.cli("jobs", "show", str(done[0]["id"]), "--json").stdout)
    assert done[0]["state"] == "done", shown
    compare = next(s for s in shown["stages"] if s["stage"] == "compare")["outputs"]
    assert compare["status"] == "compared", compare
    assert compare["prior"]["study_instance_uid"] == _uid(studies.baseline)
    assert compare["days"] == 120
    truth = truth_change_pct(studies)
    value, meaning = wait_for(
        node, "the SR in Orthanc", lambda: _sr_or_none(orthanc, follow_up), timeout=120
    )
    assert abs(value - truth) <= 10, (value, truth, compare)
    assert meaning.startswith("Volume vs prior 2026-01-01 (+120 d)")
    # sarcnode priors: what was found, what was used, why; audited with UIDs only.
    record = json.loads(node.cli("priors", follow_up, "--json").stdout)
    assert record["status"] == "compared"
    assert [f["verdict"] for f in record["found"]] == ["used"]
    actions = [e["action"] for e in record["audit"]]
    assert actions[:3] == ["priors.found", "priors.retrieved", "priors.compared"]
    assert "SYN000021" not in node.log()  # the synthetic PatientID stays out of the log
    # The moved prior is analysed by the compare stage only: no job of its own, so nothing of
    # it is analysed twice or delivered back to the PACS that holds it.
    baseline = _uid(studies.baseline)
    assert not [j for j in node.json("jobs") if j["study_instance_uid"] == baseline]
    print(f"prior found, moved and compared in {time.monotonic() - started:.0f} s; "
          f"SR volume change {value:+.1f} % (truth {truth:+.1f} %)")  # fmt: skip


def _secondary_capture(study: Path) -> bytes:
    """A Secondary Capture in ``study`` (a SOP class the node does not accept), as bytes."""
    from pydicom.uid import generate_uid

    ds = pydicom.dcmread(next((study / "dicom" / "T2FS").iterdir()))
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SeriesInstanceUID, ds.Modality, ds.SeriesNumber = generate_uid(), "OT", 99
    buffer = DicomBytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _sr_or_none(pacs: Orthanc, study_uid: str) -> tuple[float, str] | None:
    try:
        return sr_volume_change(pacs, study_uid)
    except AssertionError:
        return None
