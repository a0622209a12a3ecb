"""A radiomics signature on the real sarcoma cohort, judged by nested cross-validation.

What ``sarcnode signature-cv`` runs: the T1 features of the expert masks
(and of their perturbations, for the ICC filter) are extracted once into a
cache folder that the three endpoints share; the nested CV, its baselines,
the permutation test and the final fit are :func:`pipelines.signature.real.run_endpoint`;
the card is :func:`pipelines.signature.real.build_card`'s, with the
extraction settings it was made with.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from pipelines.radiomics.extract import extraction_mode, load_params, params_hash
from pipelines.signature.card import write_signature_card
from pipelines.signature.nested import Recipe
from pipelines.signature.real import build_card, run_endpoint
from pipelines.signature.sts import extract_sts, load_sts, read_cache, write_cache


def _no_progress(line: str) -> None:
    """Default progress sink: say nothing."""


def cached_features(
    cache: Path,
    images: Path,
    params_file: Path,
    patients: list[str],
    *,
    icc: bool,
    workers: int,
    progress: Callable[[str], None] = _no_progress,
) -> tuple[pd.DataFrame, list[pd.DataFrame] | None]:
    """(features, perturbation raters) of ``patients``: cached in ``cache``, else extracted.

    The cache is used when its stamp (parameter hash, image folder, ICC or
    not) matches and it holds every patient; else the features are extracted
    again and the cache and stamp rewritten.
    """
    params = load_params(params_file)
    stamp = {"params_sha256": params_hash(params), "images": str(images.resolve()), "icc": icc}
    stamp_file = cache / "stamp.json"
    fresh = stamp_file.is_file() and json.loads(stamp_file.read_text()) == stamp
    cached = (cache / "features.csv").is_file() and ((cache / "raters.csv").is_file() or not icc)
    if fresh and cached:
        features, raters = read_cache(cache, raters=icc)
        if set(patients) <= set(features.index):
            return features, raters
    progress(f"extracting T1 tumour + ring of {len(patients)} patients into {cache}")
    features, perturbed = extract_sts(
        images,
        params,
        patients,
        perturb=icc,
        workers=workers,
        progress=lambda i, n, p: progress(f"extracted {p} ({i}/{n})"),
    )
    write_cache(cache, features, perturbed if icc else None)
    stamp_file.write_text(json.dumps(stamp))
    return features, list(perturbed.values()) if icc else None


@dataclass(frozen=True)
class RealFit:
    """A fitted real-cohort card: the card, its CV block, out-of-fold scores, its features."""

    card: dict[str, Any]
    cv: dict[str, Any]
    oof: pd.DataFrame
    features: list[str]


@dataclass(frozen=True)
class CvOptions:
    """The nested CV: folds, repeats, permutation test, ICC filter and selection recipe."""

    folds: int = 5
    repeats: int = 10
    permutations: int = 100
    permutation_repeats: int = 2
    icc: bool = True
    recipe: Recipe = field(default_factory=Recipe)
    seed: int = 0
    workers: int = 2


def fit_real(
    endpoint: str,
    card_id: str,
    *,
    clinical: Path,
    images: Path,
    params_file: Path,
    cache: Path,
    options: CvOptions,
    progress: Callable[[str], None] = _no_progress,
) -> RealFit:
    """Nested-CV and fit ``endpoint`` on the real cohort; the card is not written yet.

    Raises ValueError, KeyError or OSError for a cohort or settings that
    cannot be used.
    """
    cohort = load_sts(clinical, images)
    features, raters = cached_features(
        cache,
        images,
        params_file,
        list(cohort.clinical.index),
        icc=options.icc,
        workers=options.workers,
        progress=progress,
    )
    cv, result, final = run_endpoint(
        cohort,
        features,
        raters,
        endpoint,
        recipe=options.recipe,
        folds=options.folds,
        repeats=options.repeats,
        permutations=options.permutations,
        permutation_repeats=options.permutation_repeats,
        seed=options.seed,
        workers=options.workers,
        progress=progress,
    )
    param_data = load_params(params_file)
    card = build_card(
        card_id,
        endpoint,
        cohort,
        features,
        final,
        cv,
        extraction={
            "params_file": params_file.name,
            "params_sha256": params_hash(param_data),
            "mode": extraction_mode(param_data),
        },
    )
    ids = list(cohort.endpoint(endpoint).index)
    columns = [f"repeat{r}" for r in range(options.repeats)]
    oof = pd.DataFrame(result.oof.T, index=ids, columns=columns)
    return RealFit(card=card, cv=cv, oof=oof, features=list(final.names))


def save_real(model_out: Path, fit: RealFit, params_file: Path) -> Path:
    """Write the card, its extraction settings and ``oof.csv``; the card's path."""
    path = write_signature_card(model_out, fit.card)
    shutil.copyfile(params_file, model_out / params_file.name)
    fit.oof.to_csv(model_out / "oof.csv", index_label="id")
    return path
