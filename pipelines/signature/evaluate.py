"""``sarcnode evaluate``: score a cohort with a card and write the report."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from pipelines.scoring import score
from pipelines.signature.pfs import derive_clinical
from pipelines.signature.report import logistic_report, survival_report, write_html


def score_cohort(
    card: dict[str, Any], features: pd.DataFrame, clinical: pd.DataFrame
) -> pd.DataFrame:
    """One row per case with both features and clinical data: the card's outputs."""
    rows = {}
    clin = derive_clinical(clinical)
    for case in features.index.intersection(clin.index):
        result = score(card, features.loc[case].to_dict(), clin.loc[case].to_dict())
        row: dict[str, Any] = {"radscore": result["radscore"], "risk_group": result["risk_group"]}
        if card["endpoint"] == "pfs":
            row |= {
                "time": clin.loc[case, "time"],
                "event": clin.loc[case, "event"],
                "linear_predictor": result["linear_predictor"],
                "model": result["model"],
            }
            row |= {f"pfs_{t}": p for t, p in result["pfs_probability"].items()}
        else:
            row |= {"label": clin.loc[case, card["label"]], "probability": result["probability"]}
        rows[case] = row
    return pd.DataFrame.from_dict(rows, orient="index")


def evaluate(
    card: dict[str, Any], features: pd.DataFrame, clinical: pd.DataFrame, out: Path
) -> dict[str, Any]:
    """Score every case, draw the figures; write report.html, metrics.json and scores.csv."""
    scores = score_cohort(card, features, clinical)
    if scores.empty:
        raise ValueError("no case has both features and clinical data")
    if card["endpoint"] == "pfs":
        result = survival_report(card, scores, out)
    else:
        result = logistic_report(card, scores, out)
    scores.to_csv(out / "scores.csv", index_label="id")
    result["html"] = str(write_html(card, result, out))
    return result
