"""``sarcnode signature-cv``: a radiomics signature on the real sarcoma cohort, honestly judged.

Registered on the main app in :mod:`node.cli.main`; the work is
:mod:`pipelines.signature.fit_real`'s. Extraction (features of the expert
masks and of their perturbations) is cached in ``--cache`` so the three
endpoints extract once.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Annotated

import typer

from node.cli.common import err, out

ROOT = Path(__file__).resolve().parents[3]
DATA = ROOT.parent / "shared" / "data"


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

    from pipelines.signature.fit_real import CvOptions, fit_real, save_real
    from pipelines.signature.nested import Recipe
    from pipelines.signature.sts import ENDPOINTS

    # Thousands of fits on shuffled outcomes: an all-zero LASSO or a solver's early
    # stop is expected there and judged by the figures, not worth a line each.
    # (Set before the process pool forks, so the workers inherit it.)
    warnings.filterwarnings("ignore", message="all coefficients are zero")
    warnings.filterwarnings("ignore", category=ConvergenceWarning)
    if endpoint not in ENDPOINTS:
        err.print(f"[red]ENDPOINT must be one of {', '.join(ENDPOINTS)}, not {endpoint!r}[/red]")
        raise typer.Exit(2)
    options = CvOptions(
        folds=folds,
        repeats=repeats,
        permutations=permutations,
        permutation_repeats=permutation_repeats,
        icc=icc,
        recipe=Recipe(mrmr_k=mrmr_k, univariate_p=univariate_p),
        seed=seed,
        workers=workers,
    )
    try:
        fit = fit_real(
            endpoint,
            model_out.name,
            clinical=clinical,
            images=images,
            params_file=params,
            cache=cache,
            options=options,
            progress=err.print,
        )
    except (ValueError, OSError, KeyError) as exc:
        err.print(f"[red]signature-cv: {exc}[/red]")
        raise typer.Exit(2) from exc
    save_real(model_out, fit, params)
    out.print(fit.cv["headline"])
    out.print(f"{len(fit.features)} feature(s) in the shipped card -> {model_out / 'card.yaml'}")
