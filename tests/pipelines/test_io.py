"""Loading DICOM series into volumes, refusing bad geometry, and sequence roles."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid

from pipelines.io.dicom import GeometryError, load_image, load_series, scan
from pipelines.io.roles import RuleError, load_role_rules
from tests.conftest import REPO, shared_data
from tests.dicomgen import write_series

RULES = REPO / "config" / "sequence_roles.yaml"


def only_series(folder: Path):
    [ref] = scan(folder).series
    return ref


def test_sts001_pair_is_found_loaded_and_classified_without_tr_te() -> None:
    result = scan(shared_data("sts-raw", "STS_001"))
    assert len(result.series) == 2 and len(result.rtstructs) == 2
    rules = load_role_rules(RULES)
    roles = {rules.classify(s.attributes): s for s in result.series}
    assert set(roles) == {"T1", "T2FS"}
    assert roles["T1"].attributes["EchoTime"] is None  # empty in these files
    t1, t2 = load_series(roles["T1"]), load_series(roles["T2FS"])
    assert t1.GetSize() == (512, 512, 40) and t2.GetSize() == (384, 384, 40)
    assert t1.GetSpacing()[0] == pytest.approx(0.390625)
    assert t1.GetSpacing()[2] == pytest.approx(5.2, abs=0.01)  # 4 mm slices + 1.2 mm gap
    direction = np.array(t1.GetDirection()).reshape(3, 3)
    assert np.allclose(direction.T @ direction, np.eye(3), atol=1e-5)
    # Same patient, same frame: the two volumes overlap in physical space.
    assert np.allclose(t1.GetOrigin(), t2.GetOrigin(), atol=1.0)


def test_slices_are_ordered_by_position_not_by_file_name(tmp_path: Path) -> None:
    datasets = write_series(tmp_path / "s", 6)
    for path in (tmp_path / "s").iterdir():  # scramble names against positions
        path.rename(path.with_name(f"x{hash(path.name) % 997:03d}-{path.name}"))
    image = load_series(only_series(tmp_path / "s"))
    assert image.GetOrigin()[2] == pytest.approx(0.0)
    assert image.GetSpacing()[2] == pytest.approx(5.0)
    first = np.frombuffer(datasets[0].PixelData, np.uint16).reshape(64, 64)
    from SimpleITK import GetArrayFromImage

    assert np.array_equal(GetArrayFromImage(image)[0], first.astype(np.float32))


def _broken(tmp_path: Path, change) -> Path:
    folder = tmp_path / "broken"
    write_series(folder, 6)
    change(sorted(folder.iterdir()))
    return folder


def _edit(path: Path, **values) -> None:
    ds = pydicom.dcmread(path)
    for key, value in values.items():
        if value is None:
            del ds[key]
        else:
            setattr(ds, key, value)
    ds.save_as(path)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda f: f[3].unlink(), "1 missing slice gap"),
        (lambda f: _edit(f[2], ImageOrientationPatient=[1, 0, 0, 0, 0, 1]), "mixed orientations"),
        (lambda f: [p.unlink() for p in f[2:]], "2 slice(s), at least 3 needed"),
        (lambda f: _edit(f[4], PixelData=None), "no pixel data"),
        (lambda f: _edit(f[4], ImagePositionPatient=[0.0, 0.0, 15.0]), "same position"),
        (lambda f: _edit(f[3], ImagePositionPatient=[0.0, 0.0, 16.5]), "non-uniform"),
        (
            lambda f: _edit(f[3], ImagePositionPatient=[30.0, 0.0, 15.0]),
            "not along the slice normal",
        ),
        (lambda f: _edit(f[1], Rows=32, PixelData=b"\0" * 32 * 64 * 2), "mixed matrix sizes"),
    ],
)
def test_broken_geometry_is_refused_naming_the_series(tmp_path: Path, change, message) -> None:
    ref = only_series(_broken(tmp_path, change))
    with pytest.raises(GeometryError) as info:
        load_series(ref)
    assert message in str(info.value)
    assert ref.series_instance_uid in str(info.value)


def test_enhanced_mr_without_plane_positions_is_refused() -> None:
    ref = scan(shared_data("dicom", "enhanced-mr")).series[0]
    with pytest.raises(GeometryError, match="multi-frame image without per-frame plane"):
        load_series(ref)


def test_enhanced_mr_is_split_into_its_frames(tmp_path: Path) -> None:
    from pydicom.uid import EnhancedMRImageStorage

    base = write_series(tmp_path / "src", 1)[0]
    ds = Dataset()
    ds.file_meta = base.file_meta
    ds.file_meta.MediaStorageSOPClassUID = EnhancedMRImageStorage
    for key in (
        "StudyInstanceUID",
        "SeriesInstanceUID",
        "Modality",
        "Rows",
        "Columns",
        "SamplesPerPixel",
        "PhotometricInterpretation",
        "BitsAllocated",
        "BitsStored",
        "HighBit",
        "PixelRepresentation",
    ):
        setattr(ds, key, getattr(base, key))
    ds.SOPClassUID, ds.SOPInstanceUID = EnhancedMRImageStorage, generate_uid()
    ds.NumberOfFrames = 4
    frames = [np.full((64, 64), k * 10, np.uint16) for k in range(4)]
    ds.PixelData = b"".join(f.tobytes() for f in reversed(frames))  # stored top-down
    shared = Dataset()
    orient, measures = Dataset(), Dataset()
    orient.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    measures.PixelSpacing, measures.SliceThickness = [0.5, 0.5], 3.0
    shared.PlaneOrientationSequence = Sequence([orient])
    shared.PixelMeasuresSequence = Sequence([measures])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    per_frame = []
    for k in reversed(range(4)):
        item, pos = Dataset(), Dataset()
        pos.ImagePositionPatient = [0.0, 0.0, 3.0 * k]
        item.PlanePositionSequence = Sequence([pos])
        per_frame.append(item)
    ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)
    (tmp_path / "emr").mkdir()
    ds.save_as(tmp_path / "emr" / "e.dcm", enforce_file_format=True)
    from SimpleITK import GetArrayFromImage

    image = load_series(only_series(tmp_path / "emr"))
    assert image.GetSize() == (64, 64, 4)
    assert image.GetSpacing() == pytest.approx((0.5, 0.5, 3.0))
    assert [float(GetArrayFromImage(image)[k, 0, 0]) for k in range(4)] == [0, 10, 20, 30]


def test_every_transfer_syntax_decodes_to_the_same_pixels(tmp_path: Path) -> None:
    from SimpleITK import GetArrayFromImage

    source = shared_data("dicom", "transfer-syntaxes", "files")
    arrays = []
    for name in sorted(p.name for p in source.glob("*.dcm")):
        folder = tmp_path / name
        folder.mkdir()
        shutil.copy(source / name, folder / name)
        arrays.append(GetArrayFromImage(load_series(only_series(folder), min_slices=1)))
    assert len(arrays) == 9
    assert all(np.array_equal(a, arrays[0]) for a in arrays[1:])


def test_nifti_research_input_loads() -> None:
    case = shared_data("sts-t1-cropped", "STS_001")
    image = load_image(case / "MR_T1_image.nii.gz")
    mask = load_image(case / "MR_T1_mask.nii.gz")
    assert image.GetSize() == mask.GetSize()
    assert image.GetSize()[2] > 1


def test_role_rules_are_validated_when_loaded(tmp_path: Path) -> None:
    bad = tmp_path / "roles.yaml"
    bad.write_text("roles:\n  - role: T1\n    rule: {attribute: EchoTime, max: short}\n")
    with pytest.raises(RuleError, match=r"roles\[0\].rule: max must be a number"):
        load_role_rules(bad)
    bad.write_text("roles:\n  - role: T1\n    rule: {any: [{attribute: X, regex: '(('}]}\n")
    with pytest.raises(RuleError, match=r"roles\[0\].rule.any\[0\]: bad regex"):
        load_role_rules(bad)


@pytest.mark.parametrize(
    ("attrs", "role"),
    [
        ({"SeriesDescription": "t2_tse_fs_tra"}, "T2FS"),
        ({"SeriesDescription": "COR STIR"}, "T2FS"),
        ({"SeriesDescription": "Ax T2 TSE"}, "other"),  # T2 without fat suppression
        ({"SeriesDescription": "t1_se_tra"}, "T1"),
        ({"SeriesDescription": "SERIES 5", "ScanOptions": ["FS"], "EchoTime": 85.0}, "T2FS"),
        ({"SeriesDescription": "SERIES 6", "EchoTime": 12.0, "RepetitionTime": 550.0}, "T1"),
        ({"SeriesDescription": "DWI b800"}, "other"),
    ],
)
def test_default_rules_on_common_protocol_names(attrs: dict, role: str) -> None:
    assert load_role_rules(RULES).classify(attrs) == role


def test_rtstruct_gtv_matches_the_ibsi_voxel_mask_volume_on_both_sequences() -> None:
    """The IBSI set ships STS_001's GTV_Mass as a voxel mask: an independent reference."""
    import SimpleITK as sitk

    from pipelines.io.rtstruct import ContourError, rtstruct_mask

    reference = sitk.ReadImage(str(shared_data("sts-t1-cropped", "STS_001", "MR_T1_mask.nii.gz")))
    ref_ml = sitk.GetArrayFromImage(reference).sum() * np.prod(reference.GetSpacing()) / 1000
    base = shared_data("sts-raw", "STS_001")
    rules = load_role_rules(RULES)
    for ref in scan(base).series:
        folder = "MR_T1" if rules.classify(ref.attributes) == "T1" else "MR_T2FS"
        image = load_series(ref)
        mask = rtstruct_mask(base / folder / "mask" / "1-1.dcm", image, "GTV_Mass")
        array = sitk.GetArrayFromImage(mask)
        ml = array.sum() * np.prod(image.GetSpacing()) / 1000
        assert ml == pytest.approx(ref_ml, rel=0.05), folder
        assert mask.GetSize() == image.GetSize()
        assert len(np.unique(np.nonzero(array)[0])) == 20  # 20 contoured slices
        with pytest.raises(ContourError, match="no ROI named 'GTV_Tumour'"):
            rtstruct_mask(base / folder / "mask" / "1-1.dcm", image, "GTV_Tumour")
