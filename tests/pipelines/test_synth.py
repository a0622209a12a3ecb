"""The synthetic generator: deterministic, masks aligned with images, real contrasts,
and survival drawn from its documented model."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from pipelines.io.dicom import load_series, scan
from pipelines.io.roles import load_role_rules
from pipelines.synth.cohort import draw_case
from pipelines.synth.study import write_study
from tests.conftest import REPO, SARCNODE


def digest(folder: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.suffix in {".dcm", ".gz"}:
            h.update(path.relative_to(folder).as_posix().encode())
            h.update(
                path.read_bytes()
                if path.suffix == ".dcm"
                else sitk.GetArrayFromImage(sitk.ReadImage(str(path))).tobytes()
            )
    return h.hexdigest()


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "s11"
    write_study(out, 11)
    return out


def test_same_seed_same_study_other_seed_other_study(study: Path, tmp_path: Path) -> None:
    write_study(tmp_path / "again", 11)
    write_study(tmp_path / "other", 12)
    assert digest(tmp_path / "again") == digest(study)
    assert digest(tmp_path / "other") != digest(study)


def _by_role(study: Path) -> dict[str, sitk.Image]:
    rules = load_role_rules(REPO / "config" / "sequence_roles.yaml")
    refs = {rules.classify(r.attributes): r for r in scan(study / "dicom").series}
    assert set(refs) == {"T1", "T2FS"}  # the node's own rules recognise both series
    return {role: load_series(ref) for role, ref in refs.items()}


def test_masks_align_with_images_and_contrasts_are_those_of_the_sequences(study: Path) -> None:
    images = _by_role(study)
    means = {}
    for role, image in images.items():
        tumour = sitk.ReadImage(str(study / "masks" / f"{role}_tumour.nii.gz"))
        habitats = sitk.ReadImage(str(study / "masks" / f"{role}_habitats.nii.gz"))
        # Same grid in physical space as the DICOM series the loader builds.
        assert tumour.GetSize() == image.GetSize()
        assert np.allclose(tumour.GetOrigin(), image.GetOrigin(), atol=1e-3)
        assert np.allclose(tumour.GetSpacing(), image.GetSpacing(), atol=1e-4)
        assert np.allclose(tumour.GetDirection(), image.GetDirection(), atol=1e-6)
        pix = sitk.GetArrayFromImage(image)
        t = sitk.GetArrayFromImage(tumour).astype(bool)
        h = sitk.GetArrayFromImage(habitats)
        assert t.sum() > 1000 and np.array_equal(t, h > 0)
        edema = sitk.ReadImage(str(study / "masks" / f"{role}_edema.nii.gz"))
        lesion = sitk.Or(tumour, edema)  # edema is bright on FS-T2 too: look beyond it
        ring = (sitk.GetArrayFromImage(sitk.BinaryDilate(lesion, [6, 6, 1])) > 0) & ~(
            sitk.GetArrayFromImage(lesion) > 0
        )
        body = pix > 0.15 * np.percentile(pix, 99)
        means[role] = (pix[t].mean(), pix[ring & body].mean(), np.percentile(pix[body], 95))
    t1_tumour, _, t1_bright = means["T1"]
    t2_tumour, t2_around, _ = means["T2FS"]
    assert t2_tumour > 1.8 * t2_around  # tumour bright on FS-T2 against its surroundings
    assert t1_tumour < 0.8 * t1_bright  # on T1 the brightest tissue (fat) is not tumour


def test_fat_is_bright_on_t1_and_dark_on_fs_t2(study: Path) -> None:
    images = _by_role(study)
    t1 = sitk.GetArrayFromImage(images["T1"])
    t2 = sitk.GetArrayFromImage(images["T2FS"])
    # The subcutaneous fat ring: the outermost body tissue, sampled on the middle slice.
    for arr, bright in ((t1, True), (t2, False)):
        mid = arr[arr.shape[0] // 2]
        body = mid > 0.1 * mid.max()
        inner = (
            sitk.GetArrayFromImage(
                sitk.BinaryErode(sitk.GetImageFromArray(body.astype(np.uint8)), [12, 12])
            )
            > 0
        )
        shell = body & ~inner
        ratio = np.median(mid[shell]) / np.median(mid[inner])
        assert (ratio > 1.3) if bright else (ratio < 0.9), ratio


def test_survival_follows_the_documented_cox_model() -> None:
    import pandas as pd
    from lifelines import CoxPHFitter

    cases = [draw_case(900_000 + i) for i in range(600)]
    frame = pd.DataFrame(
        {
            "T": [c.time_days for c in cases],
            "E": [c.event for c in cases],
            "lp": [c.oracle_lp for c in cases],
        }
    )
    assert 0.3 < frame.E.mean() < 0.9
    fit = CoxPHFitter().fit(frame, "T", "E")
    assert fit.params_["lp"] == pytest.approx(1.0, abs=0.2)  # the oracle has unit log-HR
    assert fit.concordance_index_ > 0.65


def test_cli_writes_a_cohort_with_clinical_table(tmp_path: Path) -> None:
    proc = subprocess.run(
        [SARCNODE, "synth", "cohort", str(tmp_path / "c"), "--n", "2", "--seed", "4"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    lines = (tmp_path / "c" / "clinical.csv").read_text().splitlines()
    assert lines[0].startswith("id,time,event,age,sex,edema,metastasis,grade,batch,oracle_lp")
    assert len(lines) == 3
    assert len(list((tmp_path / "c" / "cases").iterdir())) == 2


def test_parallel_cohort_rendering_writes_the_same_files(tmp_path: Path) -> None:
    """--workers 2 renders in processes; each study depends on its seed only."""
    import hashlib

    from pipelines.synth.cohort import write_cohort

    write_cohort(tmp_path / "one", 2, 9, workers=1)
    write_cohort(tmp_path / "two", 2, 9, workers=2)

    def digest(root: Path) -> dict[str, str]:
        return {
            str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted((root / "cases").rglob("*"))
            if p.is_file()
        }

    assert digest(tmp_path / "one") == digest(tmp_path / "two")
    assert (tmp_path / "one" / "clinical.csv").read_text() == (
        tmp_path / "two" / "clinical.csv"
    ).read_text()


def test_follow_up_is_a_later_study_of_the_same_patient_with_the_tumour_grown(
    study: Path, tmp_path: Path
) -> None:
    out = tmp_path / "fu"
    args = ["--seed", "11", "--follow-up", "90", "--volume-change", "40"]
    proc = subprocess.run(
        [SARCNODE, "synth", "study", str(out), *args],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    base = pydicom.dcmread(next((study / "dicom" / "T2FS").iterdir()))
    later = pydicom.dcmread(next((out / "dicom" / "T2FS").iterdir()))
    assert later.PatientID == base.PatientID
    assert later.StudyInstanceUID != base.StudyInstanceUID
    assert later.SeriesInstanceUID != base.SeriesInstanceUID
    assert later.FrameOfReferenceUID != base.FrameOfReferenceUID
    assert (later.StudyDate, base.StudyDate) == ("20260401", "20260101")

    def tumour_ml(folder: Path) -> float:
        mask = sitk.ReadImage(str(folder / "masks" / "T2FS_tumour.nii.gz"))
        voxel_ml = float(np.prod(mask.GetSpacing())) / 1000
        return float(sitk.GetArrayViewFromImage(mask).sum()) * voxel_ml

    change = tumour_ml(out) / tumour_ml(study) - 1
    assert 0.25 < change < 0.5  # nominal +40 %; the bone and the voxel grid clip a little
