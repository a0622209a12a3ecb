"""Fit a signature card from a cohort: features, robustness (ICC), provenance, the fit.

What ``sarcnode fit-signature`` runs. A cohort is a folder of studies with
``clinical.csv`` (features extracted and cached in the card folder) or a
feature table. Robust features come from mask perturbations of the studies
(the ICCs are cached beside the card, so a re-fit reuses them), from a
second reader's feature table, or not at all. The provenance block names
the extraction settings, the sequences and regions, the cohort and the
robustness filter, so a card says what it was made from.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from pipelines.radiomics.extract import params_hash
from pipelines.signature.card import write_signature_card
from pipelines.signature.cohort import (
    load_cohort,
    perturbation_icc,
    read_features,
    second_reader_icc,
)
from pipelines.signature.logistic import fit_logistic
from pipelines.signature.pfs import fit_pfs

#: Endpoints ``fit_signature`` fits: a LASSO-Cox survival model or a logistic one.
ENDPOINTS = ("pfs", "grade", "metastasis")
#: Regions extracted by default: tumour, peritumoral ring and three habitats.
REGIONS = ("tumour", "ring", "habitat1", "habitat2", "habitat3")


@dataclass(frozen=True)
class FitOptions:
    """How to fit: endpoint, label and batch columns, split, regions, robustness filter.

    ``icc`` is ``"perturb"``, a second reader's feature CSV, ``"none"``, or
    None for the default (``"perturb"`` for a studies folder, ``"none"`` for
    a feature table).
    """

    endpoint: str
    label: str | None = None
    batch: str | None = None
    val_fraction: float = 0.3
    seed: int = 0
    synthetic: bool = False
    regions: tuple[str, ...] = REGIONS
    cutoff: str = "median"
    workers: int | None = None
    icc: str | None = None
    icc_cases: int = 20
    icc_threshold: float = 0.75

    def __post_init__(self) -> None:
        """Refuse an endpoint that cannot be fitted, naming the valid ones."""
        if self.endpoint not in ENDPOINTS:
            raise ValueError(f"--endpoint must be pfs, grade or metastasis, not {self.endpoint!r}")


def _no_progress(line: str) -> None:
    """Default progress sink: say nothing."""


def robust_features(
    cohort: Path,
    features: pd.DataFrame,
    params: Mapping[str, Any],
    options: FitOptions,
    cache: Path,
    progress: Callable[[str], None] = _no_progress,
) -> tuple[pd.Series | None, dict[str, Any] | None]:
    """(ICC per feature column, the card's robustness block), or (None, None) without a filter.

    Mask perturbations are computed once per card folder: ``cache``
    (``icc.csv`` and ``icc.json`` beside it) is read back by a re-fit.
    Raises ValueError for perturbations asked of a feature table.
    """
    table_cohort = cohort.is_file() or (cohort / "features.csv").is_file()
    source = options.icc or ("none" if table_cohort else "perturb")
    if source == "none":
        return None, None
    if source == "perturb":
        if table_cohort:
            raise ValueError("--icc perturb needs a folder of studies, not a feature table")
        described = cache.with_suffix(".json")
        if cache.is_file() and described.is_file():  # a re-fit reuses the ICCs
            icc_values = pd.read_csv(cache, index_col=0).iloc[:, 0]
            summary = json.loads(described.read_text())
        else:
            icc_values, summary = perturbation_icc(
                cohort,
                params,
                cases=options.icc_cases,
                seed=options.seed,
                workers=options.workers,
                regions=options.regions,
                progress=lambda i, n, case: progress(f"perturbed {case} ({i}/{n})"),
            )
            cache.parent.mkdir(parents=True, exist_ok=True)
            icc_values.to_csv(cache, header=["icc"])
            described.write_text(json.dumps(summary, indent=2))
    else:
        icc_values = second_reader_icc(features, read_features(Path(source)))
        summary = {"method": f"second segmentation ({Path(source).name})", "kind": "ICC(2,1)"}
    block = {
        **summary,
        "threshold": options.icc_threshold,
        "robust": int((icc_values > options.icc_threshold).sum()),
        "of": int(icc_values.size),
    }
    return icc_values, block


def provenance(
    cohort: Path,
    features: pd.DataFrame,
    clinical: pd.DataFrame,
    params_file: Path,
    params: Mapping[str, Any],
) -> dict[str, Any]:
    """The card's provenance: extraction settings, sequences, regions, the cohort and its size."""
    return {
        "extraction": {
            "params_file": params_file.name,
            "params_sha256": params_hash(params),
        },
        "sequences": sorted({c.split(":")[0] for c in features.columns}),
        "regions": sorted({c.split(":")[1] for c in features.columns if c.count(":") >= 2}),
        "cohort": {"path": cohort.name, "n": len(features.index.intersection(clinical.index))},
    }


def fit_signature(
    cohort: Path,
    model_out: Path,
    options: FitOptions,
    *,
    params_file: Path,
    params: Mapping[str, Any],
    clinical: Path | None = None,
    progress: Callable[[str], None] = _no_progress,
) -> dict[str, Any]:
    """Fit the card of ``options.endpoint`` on ``cohort``; the card is not written yet.

    Features of a studies folder are cached in ``model_out/features.csv`` and
    mask-perturbation ICCs in ``model_out/icc.csv``. Raises FitError or
    ValueError for a cohort that cannot be fitted, OSError for one that
    cannot be read.
    """
    features, clin = load_cohort(
        cohort,
        clinical=clinical,
        params=params,
        cache=model_out / "features.csv",
        workers=options.workers,
        regions=options.regions,
        progress=lambda i, n, case: progress(f"extracted {case} ({i}/{n})"),
    )
    facts = provenance(cohort, features, clin, params_file, params)
    icc_values, robustness = robust_features(
        cohort, features, params, options, model_out / "icc.csv", progress
    )
    if robustness is not None:
        facts["robustness"] = robustness
    common: dict[str, Any] = {
        "signature_id": model_out.name,
        "batch": options.batch,
        "val_fraction": options.val_fraction,
        "seed": options.seed,
        "synthetic": options.synthetic,
        "provenance": facts,
        "icc": icc_values,
        "icc_threshold": options.icc_threshold,
    }
    if options.endpoint == "pfs":
        return fit_pfs(features, clin, cutoff_rule=options.cutoff, **common).card
    column = options.label or ("grade3" if options.endpoint == "grade" else "metastasis")
    card, _ = fit_logistic(features, clin, endpoint=options.endpoint, label=column, **common)
    return card


def save_signature(model_out: Path, card: dict[str, Any], params_file: Path) -> Path:
    """Write ``card.yaml`` and a copy of the extraction settings beside it; the card's path."""
    path = write_signature_card(model_out, card)
    shutil.copyfile(params_file, model_out / params_file.name)  # the card travels with them
    return path
