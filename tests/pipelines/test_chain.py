"""The chain's values: the one batch rule, refusals as bad input, checkpoints that read back."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipelines.chain import Encoded, Features, FeatureTable, Scores, StudySeries
from pipelines.errors import BadInput, MissingSeriesError
from pipelines.io.dicom import SeriesRef

MR = "1.2.840.10008.5.1.4.1.1.4"


def _ref(series: str, **attributes: str) -> SeriesRef:
    return SeriesRef("1.2.3", series, (Path(f"{series}.dcm"),), MR, dict(attributes))


@pytest.mark.parametrize(
    ("t2fs", "t1", "batch"),
    [
        ({"Manufacturer": "GE"}, {"Manufacturer": "SIEMENS"}, "GE"),  # the segmented series'
        ({}, {"Manufacturer": "SIEMENS"}, "SIEMENS"),  # else another series that names one
        ({}, {}, None),  # else none: a card with ComBat then says it needs the batch
    ],
)
def test_the_combat_batch_is_the_segmented_series_manufacturer_first(
    t2fs: dict[str, str], t1: dict[str, str], batch: str | None
) -> None:
    series = StudySeries("1.2.3", "T2FS", {"T1": _ref("1.1", **t1), "T2FS": _ref("1.2", **t2fs)})
    assert series.harmonisation_batch() == batch


def test_a_study_without_the_series_to_segment_is_bad_input() -> None:
    with pytest.raises(MissingSeriesError, match=r"no T2FS series in the study \(it has T1\)"):
        StudySeries("1.2.3", "T2FS", {"T1": _ref("1.1")})
    assert issubclass(MissingSeriesError, BadInput)


def test_checkpoints_read_back_as_the_values_written(tmp_path: Path) -> None:
    table = FeatureTable("abc", "0" * 64, "pyradiomics", ("T1",), ("tumour",), ("a", "b"), tmp_path)
    features = Features(
        (table,),
        ({"signature": "a"}, {"signature": "c", "skipped": "needs T2FS: not in the study"}),
    )
    back = Features.from_json(features.to_json())
    assert back == features and back.skipped == {"c": "needs T2FS: not in the study"}
    scores = Scores(({"signature": "a", "radscore": 0.5, "features": {"x": 1.0}},))
    assert Scores.from_json(scores.to_json()) == scores
    assert scores.outputs()["scores"] == [{"signature": "a", "radscore": 0.5}]  # no values
    assert scores.outputs()["radscore"] == 0.5  # the first scored card's, as before
    encoded = Encoded({"sr": tmp_path / "sr.dcm"})
    assert Encoded.from_json(encoded.to_json()) == encoded
