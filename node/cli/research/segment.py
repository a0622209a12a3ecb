"""Research commands on segmentation models.

``train-seg``, ``cv-seg``, ``seg-ensemble``, ``segment`` and ``eval-seg``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from node.cli.common import JsonObjectOpt, err, out
from pipelines.share import config_dir, models_dir

if TYPE_CHECKING:
    from pipelines.segment.cv import Recipe

DEFAULT_SEG_MODEL = models_dir() / "sarcnode-seg-demo"
ModelOpt = Annotated[
    Path,
    typer.Option(
        "--model",
        envvar="SARCNODE_SEG_MODEL",
        help="Segmentation model folder (card.yaml + weights).",
    ),
]


def train_seg(
    data: Annotated[
        list[Path], typer.Argument(help="Folders of cases: synthetic studies, NIfTI pairs.")
    ],
    out_dir: Annotated[Path, typer.Option("--out", help="Model folder to write (models/<id>).")],
    exclude: Annotated[
        list[str], typer.Option("--exclude", help="Case/patient id never to train on (repeatable).")
    ] = [],  # noqa: B006 - typer needs a literal default
    val_fraction: Annotated[float, typer.Option(min=0.0, max=0.9)] = 0.2,
    seed: Annotated[int, typer.Option()] = 0,
    coarse_steps: Annotated[int, typer.Option(min=1)] = 600,
    fine_steps: Annotated[int, typer.Option(min=1)] = 2000,
    val_every: Annotated[int, typer.Option(min=1)] = 100,
    version: Annotated[str, typer.Option()] = "1.0.0",
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    coarse_source: Annotated[
        list[str],
        typer.Option(help="Sources the locator learns from: synthetic, real (repeatable)."),
    ] = ["synthetic"],  # noqa: B006
    stage: Annotated[
        list[str], typer.Option(help="Stage(s) to train: coarse, fine (default both).")
    ] = ["coarse", "fine"],  # noqa: B006
    reuse: Annotated[
        Path | None, typer.Option(help="Model to take the stage(s) not trained from.")
    ] = None,
) -> None:
    """Train the coarse locator and fine segmenter; write weights and card.yaml."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from pipelines.segment.card import ModelError
    from pipelines.segment.train import train

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TextColumn("{task.fields[info]}"),
        TimeRemainingColumn(),
        console=err,
    ) as bar:
        tasks: dict[str, Any] = {}

        def progress(stage: str, step: int, total: int, info: dict[str, float]) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total, info="")
            text = f"loss {info['loss']:.3f}  best val Dice {info['best_dice']:.3f}"
            bar.update(tasks[stage], completed=step, info=text)

        try:
            card = train(
                data,
                out_dir,
                model_id=out_dir.name,
                version=version,
                exclude=set(exclude),
                val_fraction=val_fraction,
                seed=seed,
                coarse_steps=coarse_steps,
                fine_steps=fine_steps,
                val_every=val_every,
                device=device,
                progress=progress,
                coarse_sources=tuple(coarse_source),
                stages_to_train=tuple(stage),
                reuse=reuse,
                log=lambda line: bar.console.print(line),
            )
        except (ValueError, FileNotFoundError, ModelError) as exc:
            err.print(f"[red]train-seg: {exc}[/red]")
            raise typer.Exit(2) from exc
    for source, row in card["validation"]["summary"].items():
        out.print(
            f"validation {source} (n={row['n']}): Dice {row['dice_mean']:.3f} "
            f"(95% CI {row['dice_ci95'][0]:.3f}-{row['dice_ci95'][1]:.3f}), "
            f"HD95 {row['hd95_mm_mean']:.1f} mm"
        )
    out.print(f"model card: {out_dir / 'card.yaml'}")


RULES_FILE = config_dir() / "sequence_roles.yaml"
RulesOpt = Annotated[Path, typer.Option("--rules", help="Sequence-role rules (YAML).")]


def _cv_recipe(recipe: str, *, steps: int | None, synthetic: bool, inference: str) -> Recipe:
    """The candidate recipe ``cv-seg`` runs, with the options' changes; exit 2 if unknown."""
    import dataclasses

    from pipelines.segment.cv import CANDIDATES

    if inference not in ("window", "whole"):
        err.print(f"[red]cv-seg: --inference must be window or whole, not {inference!r}[/red]")
        raise typer.Exit(2)
    if recipe not in CANDIDATES:
        err.print(f"[red]cv-seg: unknown recipe {recipe!r} ({', '.join(CANDIDATES)})[/red]")
        raise typer.Exit(2)
    chosen = CANDIDATES[recipe]
    changes: dict[str, Any] = {"synthetic": synthetic}
    if chosen.synthetic and not synthetic:  # its own name in the card's candidates table
        changes["name"] = f"{recipe}+real-only"
    if steps is not None:
        changes |= {"steps": steps, "val_every": max(1, min(chosen.val_every, steps))}
    chosen = dataclasses.replace(chosen, **changes)
    chosen.arch = dict(chosen.arch) | {"inference": inference}
    return chosen


def _print_cv(summary: dict[str, Any], name: str, out_dir: Path) -> None:
    """The finished CV's headline for a person: Dice, HD95, the quality flag, the report."""
    q = summary["quality_flag"]["out_of_fold"]
    out.print(
        f"{name}: out-of-fold Dice {summary['dice_mean']:.3f} "
        f"(95% CI {summary['dice_ci95'][0]:.3f}-{summary['dice_ci95'][1]:.3f}) over "
        f"{summary['n']} patients; HD95 {summary['hd95_mm_mean']:.1f} mm; "
        f"quality flag caught {q['caught']}/{q['failures']} failures, "
        f"flagged {q['false_flags']}/{q['successes']} successes"
    )
    out.print(f"report: {out_dir / 'report.html'}")


def cv_seg(
    data: Annotated[
        list[Path], typer.Argument(help="Folders of cases: the real NIfTI pairs (+ synthetic).")
    ],
    out_dir: Annotated[Path, typer.Option("--out", help="Folder for folds, weights and report.")],
    recipe: Annotated[str, typer.Option(help="Candidate recipe (see --help).")] = "3d-heavy",
    folds: Annotated[int, typer.Option("--folds", min=2)] = 5,
    fold: Annotated[
        list[int], typer.Option("--fold", help="Run only this fold (repeatable); resumable.")
    ] = [],  # noqa: B006
    seed: Annotated[int, typer.Option()] = 0,
    steps: Annotated[int | None, typer.Option(min=1, help="Override the recipe's steps.")] = None,
    synthetic: Annotated[
        bool, typer.Option(help="Train on the synthetic studies found too.")
    ] = True,
    exclude: Annotated[
        list[str], typer.Option("--exclude", help="Patient id never to use (repeatable).")
    ] = [],  # noqa: B006
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    threads: Annotated[int | None, typer.Option(min=1, help="torch threads.")] = None,
    rescore: Annotated[
        Path | None,
        typer.Option(
            "--rescore",
            help="A finished CV folder to score again with --inference (nothing is trained).",
        ),
    ] = None,
    inference: Annotated[
        str, typer.Option(help="Test-time inference: window (sliding) or whole.")
    ] = "window",
    as_json: JsonObjectOpt = False,
) -> None:
    """Patient-level k-fold CV of a segmentation recipe: out-of-fold Dice/HD95 per patient.

    Recipes: 3d-light (the first demo model's), 3d-heavy, 25d-heavy. STS_001
    is never used. Writes folds.json, fold<i>.pt/.json (a finished fold is
    not trained again), oof/ masks, cv.json and report.html.
    """
    import torch

    from pipelines.segment.card import ModelError
    from pipelines.segment.cv import cross_validate, rescore_cv

    chosen = _cv_recipe(recipe, steps=steps, synthetic=synthetic, inference=inference)
    if threads:
        torch.set_num_threads(threads)
    try:
        if rescore is not None:
            summary = rescore_cv(
                rescore,
                out_dir,
                data,
                inference=inference,
                device=device,
                log=lambda line: err.print(line),
            )
        else:
            summary = cross_validate(
                data,
                out_dir,
                chosen,
                k=folds,
                seed=seed,
                exclude=set(exclude),
                only_folds=fold or None,
                device=device,
                log=lambda line: err.print(line),
            )
    except (ValueError, FileNotFoundError, ModelError) as exc:
        err.print(f"[red]cv-seg: {exc}[/red]")
        raise typer.Exit(2) from exc
    if as_json:
        sys.stdout.write(json.dumps(summary, indent=2) + "\n")
        return
    if "dice_mean" not in summary:
        out.print(f"{summary['folds_done']} of {summary['k']} folds done in {out_dir}")
        return
    _print_cv(summary, chosen.name, out_dir)


def seg_ensemble(
    cv_dir: Annotated[Path, typer.Argument(metavar="CV_DIR", help="A finished cv-seg folder.")],
    locator: Annotated[Path, typer.Option(help="Model folder whose coarse locator to keep.")],
    out_dir: Annotated[Path, typer.Option("--out", help="Model folder to write.")],
    data: Annotated[
        list[Path], typer.Option("--data", help="The real training data (for input-check limits).")
    ],
    version: Annotated[str, typer.Option()] = "2.0.0",
    model_id: Annotated[
        str | None, typer.Option("--id", help="Model id (default: folder).")
    ] = None,
    check_study: Annotated[
        Path | None,
        typer.Option(help="DICOM study with an RTSTRUCT to score the ensemble on (STS_001)."),
    ] = None,
    rules: RulesOpt = RULES_FILE,
) -> None:
    """Ship a cross-validation's fold models as one ensemble, with its CV figures on the card.

    Candidates compared are the other finished CVs beside CV_DIR (their
    cv.json); the quality threshold is the one chosen on the out-of-fold cases.
    """
    from pipelines.segment.card import ModelError
    from pipelines.segment.ensemble import assemble

    try:
        card = assemble(
            cv_dir,
            locator,
            out_dir,
            model_id=model_id or out_dir.name,
            version=version,
            data=data,
            check_study=check_study,
            rules=rules,
        )
    except (ValueError, FileNotFoundError, KeyError, ModelError) as exc:
        err.print(f"[red]seg-ensemble: {exc}[/red]")
        raise typer.Exit(2) from exc
    out.print(card["validation"]["headline"])
    for row in card["validation"].get("end_to_end_case", {}).get("rows", []):
        out.print(f"{row['case']}: Dice {row['dice']:.3f}, HD95 {row['hd95_mm']} mm")
    out.print(f"model card: {out_dir / 'card.yaml'}")


def load_segmenter(model: Path, device: str) -> Any:
    """Load a model folder, or exit 2 naming what is wrong with it (card, checksum, device)."""
    from pipelines.segment.card import ModelError
    from pipelines.segment.infer import Segmenter

    try:
        return Segmenter(model, device)
    except ModelError as exc:
        err.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from exc


def segment_cmd(
    source: Annotated[
        Path, typer.Argument(metavar="INPUT", help="DICOM series/study folder or NIfTI/NRRD.")
    ],
    mask_out: Annotated[Path, typer.Option("--out", help="Tumour mask to write (.nii.gz).")],
    sequence: Annotated[str, typer.Option(help="Role to segment: T2FS or T1.")] = "T2FS",
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    model: ModelOpt = DEFAULT_SEG_MODEL,
    rules: RulesOpt = RULES_FILE,
    as_json: JsonObjectOpt = False,
) -> None:
    """Segment the tumour; in a study with both sequences, also carry the mask to the other one.

    The carried mask is written beside OUT as ``<OUT stem>_<ROLE>.nii.gz``.
    """
    import SimpleITK as sitk

    from pipelines.io.dicom import GeometryError
    from pipelines.io.roles import RuleError, load_role_rules
    from pipelines.segment.quality import InputRejected
    from pipelines.segment.study import InputError, segment_input

    if sequence not in ("T2FS", "T1"):
        err.print(f"[red]--sequence must be T2FS or T1, not {sequence!r}[/red]")
        raise typer.Exit(2)
    segmenter = load_segmenter(model, device)
    try:
        seg = segment_input(source, segmenter, load_role_rules(rules), sequence)
    except (InputError, InputRejected, GeometryError, RuleError, OSError, RuntimeError) as exc:
        err.print(f"[red]segment: {source}: {exc}[/red]")
        raise typer.Exit(2) from exc
    mask_out.parent.mkdir(parents=True, exist_ok=True)
    stem = mask_out.name.removesuffix(".gz").removesuffix(".nii").removesuffix(".nrrd")
    written: dict[str, str] = {}
    for role, mask in seg.masks.items():
        path = mask_out if role == seg.sequence else mask_out.with_name(f"{stem}_{role}.nii.gz")
        sitk.WriteImage(mask, str(path), useCompression=True)
        written[role] = str(path)
    report = {
        "model": segmenter.model_id,
        "device": str(segmenter.device),
        "segmented": seg.sequence,
        "members": list(seg.result.members),
        "located": seg.result.located,
        "volume_ml": round(seg.result.volume_ml, 2),
        "seconds": {k: round(v, 2) for k, v in seg.result.seconds.items()},
        "quality": seg.result.quality.as_dict() if seg.result.quality else None,
        "masks": written,
        "registration": None
        if seg.registration is None
        else {
            "accepted": seg.registration.accepted,
            "reason": seg.registration.reason,
            "translation_mm": [round(v, 2) for v in seg.registration.translation_mm],
            "rotation_deg": [round(v, 2) for v in seg.registration.rotation_deg],
        },
        "note": segmenter.card.get("clinical_use", "not for clinical use"),
    }
    if as_json:
        sys.stdout.write(json.dumps(report, indent=2) + "\n")
        return
    out.print(
        f"{segmenter.model_id} on {segmenter.device}: {seg.sequence} segmented, "
        f"{report['volume_ml']} ml, {sum(seg.result.seconds.values()):.1f} s"
    )
    quality = seg.result.quality
    if quality is not None and quality.review:
        out.print(f"[yellow]REVIEW the mask: {'; '.join(quality.reasons)}[/yellow]")
    elif quality is not None and quality.score is not None:
        out.print(f"quality {quality.score:.2f} (review below {quality.threshold:.2f})")
    for role, where in written.items():
        how = "segmented" if role == seg.sequence else "carried"
        out.print(f"  {role} ({how}): {where}")
    if seg.registration is not None and not seg.registration.accepted:
        out.print(f"  registration not used ({seg.registration.reason}); scanner alignment kept")
    out.print(f"[bold]{report['note']}[/bold]")


def eval_seg(
    model: Annotated[Path, typer.Argument(metavar="MODEL", help="Model folder.")],
    data: Annotated[
        list[Path], typer.Argument(help="Case folders, or DICOM studies with RTSTRUCT.")
    ],
    roi: Annotated[str, typer.Option(help="RTSTRUCT ROI holding the truth.")] = "GTV_Mass",
    exclude: Annotated[list[str], typer.Option("--exclude", help="Case id to skip.")] = [],  # noqa: B006
    only: Annotated[
        list[str], typer.Option("--only", help="Score only these case ids (repeatable).")
    ] = [],  # noqa: B006
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    rules: RulesOpt = RULES_FILE,
    as_json: JsonObjectOpt = False,
) -> None:
    """Dice and HD95 per case, with mean and 95% bootstrap CI per source."""
    from pipelines.io.roles import load_role_rules
    from pipelines.segment.evaluate import iter_cases, score, summarise

    segmenter = load_segmenter(model, device)
    try:
        cases = [
            c
            for c in iter_cases(data, load_role_rules(rules), roi, set(exclude))
            if not only or c.case_id.split("/")[0] in only
        ]
    except (ValueError, FileNotFoundError) as exc:
        err.print(f"[red]eval-seg: {exc}[/red]")
        raise typer.Exit(2) from exc
    if not cases:
        err.print("[red]eval-seg: no cases found[/red]")
        raise typer.Exit(2)
    rows = score(segmenter, cases)
    summary = summarise(rows)
    if as_json:
        sys.stdout.write(
            json.dumps({"model": segmenter.model_id, "cases": rows, "summary": summary}, indent=2)
            + "\n"
        )
        return
    table = Table("case", "source", "sequence", "Dice", "HD95 mm", "s")
    for r in rows:
        table.add_row(
            r["case"],
            r["source"],
            r["sequence"],
            f"{r['dice']:.3f}",
            f"{r['hd95_mm']:.1f}",
            f"{r['seconds']:.1f}",
        )
    out.print(table)
    for source, row in summary.items():
        out.print(
            f"{source} (n={row['n']}): Dice {row['dice_mean']:.3f} "
            f"(95% CI {row['dice_ci95'][0]:.3f}-{row['dice_ci95'][1]:.3f}); "
            f"HD95 {row['hd95_mm_mean']:.1f} mm "
            f"({row['hd95_mm_ci95'][0]:.1f}-{row['hd95_mm_ci95'][1]:.1f})"
        )
