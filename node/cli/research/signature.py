"""Research commands on radiomics signatures.

``radiomics``, ``fit-signature``, ``evaluate`` and ``card-applicability``;
``signature-cv`` (the real cohort) is in :mod:`node.cli.research.signature_cv`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from node.cli.common import err, out

CohortArg = Annotated[
    Path, typer.Argument(metavar="COHORT", help="Studies + clinical.csv, or a feature table.")
]
ClinicalOpt = Annotated[
    Path | None, typer.Option(help="Clinical CSV (default COHORT/clinical.csv).")
]
RegionOpt = Annotated[
    list[str], typer.Option(help="Regions to extract: tumour, ring, habitat1-3 (repeatable).")
]
CutoffOpt = Annotated[
    str, typer.Option(help="PFS risk groups: median or optimal (max log-rank, training).")
]
IccOpt = Annotated[
    str | None,
    typer.Option(
        help="Robust features (ICC > --icc-threshold) from: 'perturb' (mask perturbations"
        " of --icc-cases studies; default for a studies folder), a second reader's"
        " feature CSV, or 'none' (default for a feature table)."
    ),
]


def radiomics_cmd(
    image: Annotated[
        Path, typer.Argument(metavar="IMAGE", help="NIfTI/NRRD image or DICOM series folder.")
    ],
    mask: Annotated[
        Path, typer.Argument(metavar="MASK", help="Tumour mask (NIfTI/NRRD) on the image grid.")
    ],
    features_out: Annotated[Path, typer.Option("--out", help="Feature table to write (CSV).")],
    params: Annotated[
        Path | None, typer.Option("--params", help="PyRadiomics parameter file (YAML).")
    ] = None,
    ring_mm: Annotated[float, typer.Option(help="Peritumoral ring width (0: no ring).")] = 10.0,
    sequence: Annotated[str, typer.Option(help="Sequence name for the table.")] = "T2FS",
    study: Annotated[str, typer.Option(help="Study id for the table.")] = "",
    workers: Annotated[int | None, typer.Option(help="Processes (default: CPUs).")] = None,
) -> None:
    """Features of the tumour (and its ring): one row per region, PyRadiomics names."""
    import SimpleITK as sitk

    from pipelines.io.dicom import load_image, load_series, scan
    from pipelines.radiomics.extract import DEFAULT_PARAMS, ExtractionError, extract, load_params
    from pipelines.radiomics.regions import ring

    try:
        img = load_series(scan(image).series[0]) if image.is_dir() else load_image(image)
        msk = sitk.ReadImage(str(mask))
        if msk.GetSize() != img.GetSize():
            raise ExtractionError(f"mask {mask.name} is {msk.GetSize()}, image is {img.GetSize()}")
        msk = sitk.Cast(msk > 0, sitk.sitkUInt8)
        msk.CopyInformation(img)
        regions = {"tumour": msk}
        if ring_mm > 0:
            regions["ring"] = ring(msk, img, width_mm=ring_mm)
        table = extract(
            {sequence: img},
            {sequence: regions},
            load_params(params or DEFAULT_PARAMS),
            study=study or image.name,
            workers=workers,
        )
    except (ExtractionError, OSError, RuntimeError, IndexError) as exc:
        err.print(f"[red]radiomics: {exc}[/red]")
        raise typer.Exit(2) from exc
    features_out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(features_out, index=False)
    out.print(f"{len(table)} region(s) x {table.shape[1] - 4} features -> {features_out}")


def fit_signature_cmd(
    cohort: CohortArg,
    endpoint: Annotated[str, typer.Option(help="pfs, grade or metastasis.")],
    model_out: Annotated[Path, typer.Option("--out", help="Signature folder (models/<id>).")],
    clinical: ClinicalOpt = None,
    label: Annotated[
        str | None, typer.Option(help="Label column (grade: grade3, metastasis: metastasis).")
    ] = None,
    batch: Annotated[
        str | None, typer.Option(help="Batch column for ComBat (scanner, site).")
    ] = None,
    params: Annotated[
        Path | None, typer.Option("--params", help="PyRadiomics parameter file.")
    ] = None,
    val_fraction: Annotated[float, typer.Option(min=0.0, max=0.9)] = 0.3,
    seed: Annotated[int, typer.Option()] = 0,
    synthetic: Annotated[
        bool, typer.Option(help="Cohort is synthetic (said in the card).")
    ] = False,
    region: RegionOpt = ["tumour", "ring", "habitat1", "habitat2", "habitat3"],  # noqa: B006
    cutoff: CutoffOpt = "median",
    workers: Annotated[int | None, typer.Option(help="Extraction processes.")] = None,
    icc: IccOpt = None,
    icc_cases: Annotated[int, typer.Option(min=2, help="Studies perturbed for the ICC.")] = 20,
    icc_threshold: Annotated[float, typer.Option(min=0.0, max=1.0)] = 0.75,
) -> None:
    """Fit a signature and nomogram for ENDPOINT; write card.yaml with validation figures."""
    from pipelines.radiomics.extract import DEFAULT_PARAMS, load_params
    from pipelines.signature.fit import FitOptions, fit_signature, save_signature
    from pipelines.signature.pfs import FitError

    try:
        options = FitOptions(
            endpoint=endpoint,
            label=label,
            batch=batch,
            val_fraction=val_fraction,
            seed=seed,
            synthetic=synthetic,
            regions=tuple(region),
            cutoff=cutoff,
            workers=workers,
            icc=icc,
            icc_cases=icc_cases,
            icc_threshold=icc_threshold,
        )
    except ValueError as exc:
        err.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from exc
    param_file = params or DEFAULT_PARAMS
    param_data = load_params(param_file)
    try:
        card = fit_signature(
            cohort,
            model_out,
            options,
            params_file=param_file,
            params=param_data,
            clinical=clinical,
            progress=err.print,
        )
    except (FitError, ValueError, OSError) as exc:
        err.print(f"[red]fit-signature: {exc}[/red]")
        raise typer.Exit(2) from exc
    path = save_signature(model_out, card, param_file)
    val = card["validation"]
    key = "c_index_nomogram_lp" if endpoint == "pfs" else "auc_nomogram"
    if key in val:
        out.print(
            f"validation (n={val['n']}): {key} {val[key]['value']:.3f} "
            f"(95% CI {val[key]['ci95'][0]:.3f}-{val[key]['ci95'][1]:.3f})"
        )
    out.print(f"{len(card['features'])} feature(s); card: {path}")


def evaluate_cmd(
    model: Annotated[Path, typer.Argument(metavar="MODEL", help="Signature folder (card.yaml).")],
    cohort: CohortArg,
    report_out: Annotated[Path, typer.Option("--out", help="Report folder.")],
    clinical: ClinicalOpt = None,
    workers: Annotated[int | None, typer.Option(help="Extraction processes.")] = None,
) -> None:
    """Score COHORT with MODEL; write the papers' figures, metrics.json and report.html."""
    from pipelines.radiomics.extract import DEFAULT_PARAMS, load_params
    from pipelines.signature.card import ScoreError, load_signature_card
    from pipelines.signature.cohort import load_cohort
    from pipelines.signature.evaluate import evaluate

    try:
        card = load_signature_card(model)
        params_file = model / card.get("extraction", {}).get("params_file", "")
        params = load_params(params_file if params_file.is_file() else DEFAULT_PARAMS)
        features, clin = load_cohort(
            cohort,
            clinical=clinical,
            params=params,
            cache=report_out / "features.csv",
            workers=workers,
        )
        result = evaluate(card, features, clin, report_out)
    except (ScoreError, ValueError, OSError) as exc:
        err.print(f"[red]evaluate: {exc}[/red]")
        raise typer.Exit(2) from exc
    for key, value in result["metrics"].items():
        if isinstance(value, dict) and "ci95" in value:
            out.print(
                f"{key}: {value['value']:.3f} "
                f"(95% CI {value['ci95'][0]:.3f}-{value['ci95'][1]:.3f})"
            )
    out.print(f"report: {result['html']}")
    out.print(f"[bold]{card.get('clinical_use', 'not for clinical use')}[/bold]")


def card_applicability_cmd(
    model: Annotated[Path, typer.Argument(metavar="MODEL", help="Signature folder (card.yaml).")],
    clinical: Annotated[
        Path, typer.Option(help="The cohort's clinical CSV the card was fitted with.")
    ],
    features: Annotated[
        Path | None, typer.Option(help="Feature CSV (default MODEL/features.csv, the fit's cache).")
    ] = None,
    val_fraction: Annotated[float, typer.Option(min=0.0, max=0.9)] = 0.3,
) -> None:
    """Add the training range of each card feature and of the rad-score (``applicability``).

    For a card fitted before cards carried it: the training cases are re-drawn
    as the fit drew them, and used only if they give back the card's training
    size, means and SDs. The card's version goes up a minor step (its outputs
    change: a study outside the range loses its risk group).
    """
    from pipelines.scoring.domain import reconstruct_block
    from pipelines.signature.card import ScoreError, load_signature_card, write_signature_card

    try:
        card = load_signature_card(model)
        block = reconstruct_block(
            card, features or model / "features.csv", clinical, val_fraction=val_fraction
        ).as_dict()
    except (ScoreError, ValueError, KeyError, OSError) as exc:
        err.print(f"[red]card-applicability: {escape(str(exc))}[/red]")
        raise typer.Exit(2) from exc
    if card.get("applicability") == block:
        out.print(f"{model}: applicability block already up to date")
        return
    major, minor, *_ = [*str(card.get("version", "1.0.0")).split("."), "0", "0"]
    card["version"] = f"{major}.{int(minor) + 1}.0"
    card["applicability"] = block
    path = write_signature_card(model, card)
    low, high = block["radscore"]
    out.print(
        f"{path}: version {card['version']}, training ranges of {len(block['features'])} "
        f"feature(s) and the rad-score ({low:.3f} to {high:.3f}) over {block['n_train']} cases"
    )
