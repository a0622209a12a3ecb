"""Research commands on one study or a synthetic cohort: ``analyze`` and ``synth``."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from node.cli.common import PIPELINES_DIR, JsonObjectOpt, err, out
from node.cli.research.segment import (
    DEFAULT_SEG_MODEL,
    RULES_FILE,
    ModelOpt,
    RulesOpt,
    load_segmenter,
)

synth_app = typer.Typer(
    help="Synthetic sarcoma MRI (paired T1 / FS-T2 DICOM + truth masks). Not patient data.",
    no_args_is_help=True,
)


@synth_app.command("study")
def synth_study(
    folder: Annotated[Path, typer.Argument(metavar="OUT", help="Output folder.")],
    seed: Annotated[int, typer.Option(help="Random seed (same seed, same study).")] = 0,
    follow_up: Annotated[
        int, typer.Option(min=0, help="A later study of the same patient, this many days on.")
    ] = 0,
    volume_change: Annotated[
        float, typer.Option(min=-99.0, help="Tumour volume change of the follow-up, in %.")
    ] = 0.0,
) -> None:
    """Write one synthetic study: dicom/T1, dicom/T2FS, masks/*.nii.gz, truth.json."""
    from pipelines.synth.study import write_study

    truth = write_study(folder, seed, follow_up_days=follow_up, volume_change_pct=volume_change)
    out.print(f"{truth['case_id']}: {folder / 'dicom'} (T1, T2FS); masks in {folder / 'masks'}")


@synth_app.command("cohort")
def synth_cohort(
    folder: Annotated[Path, typer.Argument(metavar="OUT", help="Output folder.")],
    n: Annotated[int, typer.Option("--n", min=1, help="Number of studies.")] = 20,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    images: Annotated[bool, typer.Option(help="Write images (else only clinical.csv).")] = True,
    workers: Annotated[int, typer.Option(min=1, help="Processes rendering studies.")] = 1,
) -> None:
    """Write a cohort: cases/<id>/ studies, clinical.csv (PFS, covariates, oracle_lp)."""
    from pipelines.synth.cohort import write_cohort

    cases = write_cohort(folder, n, seed, images=images, workers=workers)
    events = sum(c.event for c in cases)
    out.print(f"{len(cases)} cases ({events} events) in {folder}; see {folder / 'clinical.csv'}")


SHIPPED_PIPELINE = PIPELINES_DIR / "sarcoma-mr.yaml"


def analyze_cmd(
    study: Annotated[
        Path, typer.Argument(metavar="STUDY_DIR", help="DICOM study folder (T2FS, T1).")
    ],
    out_dir: Annotated[Path, typer.Option("--out", help="Output folder.")],
    model: ModelOpt = DEFAULT_SEG_MODEL,
    signature: Annotated[
        list[Path] | None,
        typer.Option(
            envvar="SARCNODE_SIGNATURE",
            help="Signature folder (card.yaml); repeatable. Default: the shipped pipeline's cards.",
        ),
    ] = None,
    edema: Annotated[str | None, typer.Option(help="Peritumoral edema: yes/no.")] = None,
    metastasis: Annotated[str | None, typer.Option(help="Metastasis at diagnosis: yes/no.")] = None,
    grade: Annotated[int | None, typer.Option(min=1, max=3, help="Histological grade.")] = None,
    age: Annotated[int | None, typer.Option(min=0, max=120)] = None,
    sex: Annotated[str | None, typer.Option(help="M or F.")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    workers: Annotated[int | None, typer.Option(help="Extraction processes.")] = None,
    rules: RulesOpt = RULES_FILE,
    as_json: JsonObjectOpt = False,
) -> None:
    """Segment, extract radiomics and score one study with each card; write masks, scores, summary.

    A card the study cannot use (a sequence missing) is reported as skipped, with the reason.
    """
    from node.pipelines import PipelineError, load_pipeline
    from pipelines.analyze import analyze_study
    from pipelines.io.dicom import GeometryError
    from pipelines.io.roles import load_role_rules
    from pipelines.radiomics.extract import ExtractionError
    from pipelines.scoring.cards import CardError, load_signatures
    from pipelines.scoring.clinical import ClinicalFactors
    from pipelines.segment.study import InputError
    from pipelines.signature.card import ScoreError

    try:
        folders = signature or list(load_pipeline(SHIPPED_PIPELINE).signatures)
        signatures = load_signatures(folders)
    except (CardError, PipelineError) as exc:
        err.print(f"[red]analyze: {escape(str(exc))}[/red]")
        raise typer.Exit(2) from exc
    segmenter = load_segmenter(model, device)
    try:
        clinical = ClinicalFactors.from_options(
            edema=edema, metastasis=metastasis, grade=grade, age=age, sex=sex
        )
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    try:
        report = analyze_study(
            study,
            out_dir,
            segmenter=segmenter,
            signatures=signatures,
            rules=load_role_rules(rules),
            clinical=clinical,
            workers=workers,
        )
    except (InputError, GeometryError, ExtractionError, ScoreError, ValueError, OSError) as exc:
        err.print(f"[red]analyze: {study}: {exc}[/red]")
        raise typer.Exit(2) from exc
    if as_json:
        sys.stdout.write(json.dumps(report, indent=2) + "\n")
        return
    out.print((out_dir / "summary.txt").read_text().rstrip())
    out.print(f"outputs in {out_dir}: masks, features-*.csv, score.json, summary.txt")
