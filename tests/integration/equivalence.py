"""``sarcnode analyze`` and a node job give the same outputs for the same study.

Both run :mod:`pipelines.chain`; the node checkpoints between stages, so
this catches a value that does not survive ``to_json``/``from_json``, a
stage that reads its inputs differently from ``analyze``, or a rule (the
ComBat batch, the clinical factors) applied on one path only. Compared:
every card's score record (rad-score, risk group, predictions,
applicability and the feature values it scored), the feature tables (all
but the row label), and the SR's content items with UIDs, dates and times
left out (they name the job, not the result).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
import pydicom

from pipelines.analyze import analyze_study
from pipelines.io.roles import load_role_rules
from pipelines.scoring.cards import load_signatures
from pipelines.scoring.clinical import ClinicalFactors
from pipelines.segment.infer import Segmenter
from tests.pipelines.test_encode import sr_items

REPO = Path(__file__).resolve().parents[2]
#: Content items that name the run rather than the result.
RUN_VALUE_TYPES = {"UIDREF", "DATETIME", "DATE", "TIME"}


def sr_content(path: Path) -> list[tuple[Any, ...]]:
    """The SR's content items in document order: type, concept, value, unit (UIDs left out)."""
    ds = pydicom.dcmread(path)
    out = []
    for item in sr_items(ds.ContentSequence):
        if item.ValueType in RUN_VALUE_TYPES:
            continue
        concept = item.ConceptNameCodeSequence[0]
        name = concept.get("CodeValue") or concept.get("LongCodeValue")
        value: Any = None
        if item.ValueType == "NUM":
            measured = item.MeasuredValueSequence[0]
            unit = measured.MeasurementUnitsCodeSequence[0].CodeValue
            value = (str(measured.NumericValue), unit)
        elif item.ValueType == "CODE":
            value = item.ConceptCodeSequence[0].CodeValue
        elif item.ValueType == "TEXT":
            value = item.TextValue
        elif item.ValueType == "SCOORD":
            value = tuple(float(v) for v in item.GraphicData)
        out.append((item.ValueType, name, item.get("RelationshipType"), value))
    return out


def feature_tables(folder: Path) -> dict[str, pd.DataFrame]:
    """``features-<key>.csv`` in ``folder`` by name (the key names the extraction), no label."""
    return {
        path.name: pd.read_csv(path).drop(columns=["study"])
        for path in sorted(folder.glob("features-*.csv"))
    }


def assert_analyze_matches_job(
    study: Path,
    job_folder: Path,
    out: Path,
    *,
    model: Path,
    signatures: list[Path],
    clinical: ClinicalFactors | None,
) -> dict[str, Any]:
    """Run ``analyze`` on ``study`` into ``out``; assert its outputs equal the job's."""
    report = analyze_study(
        study,
        out,
        segmenter=Segmenter(model, "cpu"),
        signatures=load_signatures(signatures),
        rules=load_role_rules(REPO / "config" / "sequence_roles.yaml"),
        clinical=clinical,
    )
    job_scores = json.loads((job_folder / "score" / "score.json").read_text())["scores"]
    assert report["scores"] == job_scores
    analyzed, jobbed = feature_tables(out), feature_tables(job_folder / "radiomics")
    assert analyzed.keys() == jobbed.keys() and analyzed
    for name, table in analyzed.items():
        pd.testing.assert_frame_equal(table, jobbed[name], check_exact=True)
    ours = sr_content(Path(report["dicom"]["sr"]))
    theirs = sr_content(job_folder / "encode" / "sr.dcm")
    assert len(ours) > 20 and ours == theirs
    return report
