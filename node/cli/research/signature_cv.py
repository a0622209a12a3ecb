"""``sarcnode signature-cv``: a radiomics signature on the real sarcoma cohort, honestly judged.

Registered on the main app in :mod:`node.cli.main`. Extraction (features of
the expert masks and of their perturbations) is cached in ``--cache`` so
the three endpoints extract once.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from typing import Annotated

import pandas as pd
import typer
from rich.console import Console

out = Console()
err = Console(stderr=True, soft_wrap=True)

ROOT = Path(__file__).resolve().parents[3]
DATA = ROOT.parent / "shared" / "data"


def load_or_extract(
    cache: Path, images: Path, params_file: Path, patients: list[str], *, icc: bool, workers: int
) -> tuple[pd.DataFrame, list[pd.DataFrame] | None]:
    """(features, perturbation raters) of ``patients``: cached in ``cache``, else extracted."""
    from pipelines.radiomics.extract import load_params, params_hash
    from pipelines.signature.sts import extract_sts, read_cache, write_cache

    params = load_params(params_file)
    stamp = {"params_sha256": params_hash(params), "images": str(images.resolve()), "icc": icc}
    stamp_file = cache / "stamp.json"
    fresh = stamp_file.is_file() and json.loads(stamp_file.read_text()) == stamp
    cached = (cache / "features.csv").is_file() and ((cache / "raters.csv").is_file() or not icc)
    if fresh and cached:
        features, raters = read_cache(cache, raters=icc)
        if set(patients) <= set(features.index):
            return features, raters
    err.print(f"extracting T1 tumour + ring of {len(patients)} patients into {cache}")
    features, perturbed = extract_sts(
        images,
        params,
        patients,
        perturb=icc,
        workers=workers,
        progress=lambda i, n, p: err.print(f"extracted {p} ({i}/{n})"),
    )
    write_cache(cache, features, perturbed if icc else None)
    stamp_file.write_text(json.dumps(stamp))
    return features, list(perturbed.values()) if icc else None


def signature_cv_cmd(
    endpoint: Annotated[str, typer.Argument(help="lung_metastasis, high_grade or efs.")],
    model_out: Annotated[Path, typer.Option("--out", help="Card folder (models/<id>).")],
    clinical: Annotated[Path, typer.Option(help="clinical.csv of the cohort.")] = DATA
    / "sts-clinical"
    / "clinical.csv",
    images: Annotated[Path, typer.Option(help="T1 crops with expert masks.")] = DATA
    / "sts-t1-cropped",
    params: Annotated[Path, typer.Option(help="PyRadiomics parameter file.")] = ROOT
    / "config"
    / "radiomics"
    / "mr-demo.yaml",
    cache: Annotated[Path, typer.Option(help="Feature cache folder.")] = Path("var/sts"),
    folds: Annotated[int, typer.Option(min=2)] = 5,
    repeats: Annotated[int, typer.Option(min=1)] = 10,
    permutations: Annotated[int, typer.Option(min=0, help="0: no permutation test.")] = 100,
    permutation_repeats: Annotated[int, typer.Option(min=1)] = 2,
    icc: Annotated[bool, typer.Option(help="ICC filter on mask perturbations.")] = True,
    mrmr_k: Annotated[int, typer.Option(min=1)] = 10,
    univariate_p: Annotated[float, typer.Option(min=0.0, max=1.0)] = 0.10,
    seed: Annotated[int, typer.Option()] = 0,
    workers: Annotated[int, typer.Option(min=1)] = 2,
) -> None:
    """Nested-CV a T1 radiomics signature for ENDPOINT on the real cohort; write its card."""
    from sklearn.exceptions import ConvergenceWarning

    from pipelines.radiomics.extract import extraction_mode, load_params, params_hash
    from pipelines.signature.card import write_signature_card
    from pipelines.signature.nested import Recipe
    from pipelines.signature.real import build_card, run_endpoint
    from pipelines.signature.sts import ENDPOINTS, load_sts

    # Thousands of fits on shuffled outcomes: an all-zero LASSO or a solver's early
    # stop is expected there and judged by the figures, not worth a line each.
    # (Set before the process pool forks, so the workers inherit it.)
    warnings.filterwarnings("ignore", message="all coefficients are zero")
    warnings.filterwarnings("ignore", category=ConvergenceWarning)
    if endpoint not in ENDPOINTS:
        err.print(f"[red]ENDPOINT must be one of {', '.join(ENDPOINTS)}, not {endpoint!r}[/red]")
        raise typer.Exit(2)
    try:
        cohort = load_sts(clinical, images)
        features, raters = load_or_extract(
            cache, images, params, list(cohort.clinical.index), icc=icc, workers=workers
        )
        recipe = Recipe(mrmr_k=mrmr_k, univariate_p=univariate_p)
        cv, result, final = run_endpoint(
            cohort,
            features,
            raters,
            endpoint,
            recipe=recipe,
            folds=folds,
            repeats=repeats,
            permutations=permutations,
            permutation_repeats=permutation_repeats,
            seed=seed,
            workers=workers,
            progress=err.print,
        )
        param_data = load_params(params)
        card = build_card(
            model_out.name,
            endpoint,
            cohort,
            features,
            final,
            cv,
            extraction={
                "params_file": params.name,
                "params_sha256": params_hash(param_data),
                "mode": extraction_mode(param_data),
            },
        )
    except (ValueError, OSError, KeyError) as exc:
        err.print(f"[red]signature-cv: {exc}[/red]")
        raise typer.Exit(2) from exc
    write_signature_card(model_out, card)
    shutil.copyfile(params, model_out / params.name)
    ids = list(cohort.endpoint(endpoint).index)
    oof = pd.DataFrame(result.oof.T, index=ids, columns=[f"repeat{r}" for r in range(repeats)])
    oof.to_csv(model_out / "oof.csv", index_label="id")
    out.print(cv["headline"])
    out.print(f"{len(final.names)} feature(s) in the shipped card -> {model_out / 'card.yaml'}")
