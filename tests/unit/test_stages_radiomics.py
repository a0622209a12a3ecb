"""The radiomics stage in a job worker: a warm pool over the cores, the same values as one process.

A small two-series phantom (T1 and FS-T2 of one study, a bright sphere in a
body on air) is scored by the four shipped cards, whose two extractions share
their T1 regions. The stage runs with a two-process pool kept by the worker,
the sequences' N4 correction started ahead as the segment stage does; its
tables must equal, value for value, the one-process extraction of the same
volumes and masks. The job folder's input cache is checked on the same case:
a later stage reads headers and voxels from it, not from the instance files.
"""

from __future__ import annotations

import json
import re
import shutil
from concurrent.futures import Future
from dataclasses import replace
from datetime import datetime
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.uid import generate_uid

from node import stages
from node.stages import JobContext
from pipelines import chain
from pipelines.encode.results import Segs
from pipelines.scoring.cards import SignatureCard
from pipelines.segment.card import SegModelCard
from tests.dicomgen import mr_dataset
from tests.pipelines.test_encode import pdf_pages, pdf_text

REPO = Path(__file__).resolve().parents[2]
CARDS = tuple(
    REPO / "models" / f"sarcnode-{name}"
    for name in ("lungmets-t1", "grade-t1", "efs-t1", "pfs-demo")
)


def _phantom(size: int, slices: int, spacing: float, step: float) -> tuple[np.ndarray, np.ndarray]:
    """(image, tumour mask) as (z, y, x): an elliptic body with a bright sphere, air around."""
    z, y, x = np.meshgrid(
        np.arange(slices) * step,
        np.arange(size) * spacing,
        np.arange(size) * spacing,
        indexing="ij",
    )
    middle = (size - 1) * spacing / 2
    body = ((x - middle) / (0.38 * size * spacing)) ** 2 + (
        (y - middle) / (0.3 * size * spacing)
    ) ** 2
    tumour = (x - middle) ** 2 + (y - middle) ** 2 + (z - (slices - 1) * step / 2) ** 2 <= 10.0**2
    rng = np.random.default_rng(size)
    image = np.where(body <= 1, 900 + 80 * np.sin(x / 6.0) + 60 * (y / size), 20.0)
    image = image + np.where(tumour, 700 + 150 * np.cos(z / 4.0 + x / 5.0), 0)
    image = image + rng.normal(0, 25, image.shape)
    return np.clip(image, 0, 4095).astype(np.uint16), tumour.astype(np.uint8)


def _series(
    folder: Path, study: str, role: str, size: int, slices: int, spacing: float, step: float
) -> tuple[str, list[Path], np.ndarray]:
    """Write one phantom series; return its files and its tumour mask's voxels."""
    image, tumour = _phantom(size, slices, spacing, step)
    series, frame = generate_uid(), "1.2.826.0.1.3680043.8.498.77"
    files = []
    for k in range(slices):
        ds = mr_dataset(study, series, k, size=size)
        ds.SeriesDescription = role
        ds.FrameOfReferenceUID = frame
        ds.PixelSpacing = [spacing, spacing]
        ds.SliceThickness = step
        ds.ImagePositionPatient = [0.0, 0.0, k * step]
        ds.PixelData = image[k].tobytes()
        path = folder / role / f"{k:03d}.dcm"
        path.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return str(series), files, tumour


@pytest.fixture
def job(tmp_path: Path) -> JobContext:
    """A job over the phantom with its segment checkpoint written from the phantom's masks."""
    study = generate_uid()
    t1 = _series(tmp_path / "dicom", study, "T1", 72, 14, 0.9, 4.0)
    t2 = _series(tmp_path / "dicom", study, "T2FS", 60, 11, 1.1, 5.0)
    ctx = JobContext(
        job_id=1,
        job_key="radiomics-pool-test",
        folder=tmp_path / "jobs" / "1",
        study_instance_uid=study,
        inputs={"T1": t1[0], "T2FS": t2[0]},
        files={"T1": t1[1], "T2FS": t2[1]},
        primary="T2FS",
        segmentation_model=REPO / "models" / "sarcnode-seg-demo",
        signatures=CARDS,
        destinations=(),
        database_url="sqlite://",
        device="cpu",
        radiomics_workers=2,
    )
    volumes = stages._volumes(ctx, stages._series(ctx))
    out = ctx.folder / "segment"
    out.mkdir(parents=True)
    paths = {}
    for role, (_, _, tumour) in {"T1": t1, "T2FS": t2}.items():
        mask = sitk.GetImageFromArray(tumour)
        mask.CopyInformation(volumes.images[role])
        paths[role] = out / f"{role}_tumour.nii.gz"
        sitk.WriteImage(mask, str(paths[role]), useCompression=True)
    checkpoint = {
        "primary": "T2FS",
        "model": "phantom",
        "volume_ml": 4.2,
        "masks": {role: str(path) for role, path in paths.items()},
        "registration_accepted": {"T1": True},
        "device": "cpu",
        "quality": None,
    }
    (out / "outputs.json").write_text(json.dumps(checkpoint))
    return ctx


def test_the_stage_on_a_warm_pool_equals_one_process_value_for_value(
    job: JobContext, tmp_path: Path
) -> None:
    pool = stages.radiomics_pool(2)
    assert pool is not None
    # What the segment stage starts ahead: each sequence's outline and N4, in the pool.
    stages._AHEAD[job.folder] = stages._prepare_ahead(
        job, stages._volumes(job, stages._series(job)), pool
    )
    outputs = stages.radiomics(job)
    assert job.folder not in stages._AHEAD  # taken by the stage
    assert stages.radiomics_pool(2) is pool  # kept for the next job
    tables = {t["key"]: Path(t["features"]) for t in outputs["extractions"]}
    assert len(tables) == 2  # the T1 cards' extraction and the demo card's (T1 + FS-T2)
    assert not [c for c in outputs["cards"] if "skipped" in c]

    series = stages._series(job)
    volumes = chain.load_volumes(series)  # decoded again from the files, in this process
    masks = chain.Masks.from_json(
        json.loads((job.folder / "segment/outputs.json").read_text()), volumes
    )
    signatures = [SignatureCard.from_folder(card) for card in CARDS]
    alone = chain.extract(
        signatures, volumes, masks, tmp_path / "alone", study=job.study_instance_uid
    )
    assert {t.key for t in alone.tables} == set(tables)
    for table in alone.tables:
        expected = table.path.read_text()
        assert expected.count("\n") >= 3  # a header, then tumour and ring rows
        assert tables[table.key].read_text() == expected  # every value, to the last digit


def test_later_stages_read_the_series_from_the_job_folder_not_the_files(job: JobContext) -> None:
    decoded = chain.load_volumes(stages._series(job))
    shutil.rmtree(job.files["T1"][0].parents[1])  # the instance files are gone

    series = stages._series(job)
    volumes = stages._volumes(job, series)
    assert series.refs["T1"].attributes["SeriesDescription"] == "T1"
    assert series.refs["T2FS"].files == tuple(sorted(job.files["T2FS"]))
    for role, image in decoded.images.items():
        cached = volumes.images[role]
        assert np.array_equal(sitk.GetArrayViewFromImage(cached), sitk.GetArrayViewFromImage(image))
        assert cached.GetSpacing() == image.GetSpacing()
        assert cached.GetOrigin() == image.GetOrigin()
        assert cached.GetDirection() == image.GetDirection()

    stages.drop_volumes(job)  # a finished job keeps its headers, not its decoded voxels
    assert sorted(p.name for p in (job.folder / stages.INPUTS).iterdir()) == ["series.json"]


#: What differs between two SEGs of the same inputs made at different moments: when they
#: were made, and the DimensionOrganizationUID (highdicom draws a new one for each SEG).
VARIES = {
    "ContentDate",
    "ContentTime",
    "InstanceCreationDate",
    "InstanceCreationTime",
    "ContributionDateTime",
    "DimensionOrganizationUID",
}


def _seg_content(path: Path) -> dict[str, object]:
    """A written SEG's elements and pixel data, save for what :data:`VARIES` names."""
    ds = pydicom.dcmread(path)

    def blank(dataset: pydicom.Dataset, element: pydicom.DataElement) -> None:
        if element.keyword in VARIES:
            element.value = None

    ds.walk(blank)
    return {"file_meta": ds.file_meta.to_json_dict(), "dataset": ds.to_json_dict()}


def test_the_segs_made_beside_the_radiomics_stage_are_the_ones_the_encode_stage_makes(
    job: JobContext, tmp_path: Path
) -> None:
    series = stages._series(job)
    masks = chain.Masks.from_json(stages._checkpoint(job, "segment"), stages._volumes(job, series))
    stages._segs_ahead(job, series, masks)  # what the radiomics stage starts in its thread
    ahead = stages._SEGS[job.folder].result()
    assert sorted(ahead.segs) == ["T1", "T2FS"]

    early = stages.encode(job)["files"]
    assert job.folder not in stages._SEGS  # taken by the encode stage
    # The datasets made ahead are the ones written: the stage named them after their series.
    assert ahead.segs["T2FS"].SeriesDescription == "Tumour SEG on T2FS (T2FS) NOT FOR CLINICAL USE"
    kept = {kind: _seg_content(Path(path)) for kind, path in early.items() if "seg_" in kind}
    assert sorted(kept) == ["seg_T1", "seg_T2FS"]

    late = stages.encode(job)["files"]  # nothing made ahead: the stage makes them itself
    assert late == early  # the same files, overwritten
    for kind, content in kept.items():
        assert _seg_content(Path(late[kind])) == content


def test_segs_made_ahead_for_other_inputs_are_not_written(job: JobContext) -> None:
    series = stages._series(job)
    masks = chain.Masks.from_json(stages._checkpoint(job, "segment"), stages._volumes(job, series))
    model = SegModelCard.from_folder(job.segmentation_model)
    wrong = chain.make_segs(series, masks, model, "another-job", job.uid_root)
    future: Future[Segs] = Future()
    future.set_result(wrong)
    stages._SEGS[job.folder] = future

    files = stages.encode(job)["files"]
    written = pydicom.dcmread(files["seg_T2FS"])
    assert written.SOPInstanceUID != wrong.segs["T2FS"].SOPInstanceUID  # this job's UIDs
    again = chain.make_segs(series, masks, model, job.job_key, job.uid_root)
    assert written.SOPInstanceUID == again.segs["T2FS"].SOPInstanceUID


def test_segs_that_failed_ahead_are_made_by_the_encode_stage(job: JobContext) -> None:
    future: Future[Segs] = Future()
    future.set_exception(OSError("the thread could not read a source file"))
    stages._SEGS[job.folder] = future

    files = stages.encode(job)["files"]
    assert sorted(files) == ["pdf", "seg_T1", "seg_T2FS", "sr"]
    assert pydicom.dcmread(files["seg_T1"]).Modality == "SEG"


def _without_date(document: bytes) -> bytes:
    """A PDF's bytes without its creation date (matplotlib writes the moment it was made)."""
    return re.sub(rb"/CreationDate \(D:[0-9Z+'-]+\)", b"", document)


def test_the_report_made_in_the_pool_is_the_one_made_in_the_stage(
    job: JobContext, tmp_path: Path
) -> None:
    assert job.radiomics_workers == 2  # the stage makes the PDF in the warm pool
    began = datetime.now().strftime("%H:%M")
    pooled = stages.encode(job)["files"]
    document = (job.folder / "encode" / "report.pdf").read_bytes()
    wrapped = pydicom.dcmread(pooled["pdf"])
    assert wrapped.EncapsulatedDocument[: len(document)] == document

    alone = stages.encode(replace(job, radiomics_workers=1))["files"]  # made in this process
    assert alone == pooled
    again = (job.folder / "encode" / "report.pdf").read_bytes()
    assert pdf_text(again) == pdf_text(document)
    assert pdf_pages(again) == pdf_pages(document)
    if datetime.now().strftime("%H:%M") == began:  # the header prints the minute it was made
        assert _without_date(again) == _without_date(document)  # byte for byte
