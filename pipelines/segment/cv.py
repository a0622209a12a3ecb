"""Patient-level k-fold cross-validation of a segmentation recipe on the real cohort.

What ``sarcnode cv-seg`` runs, honest by construction:

- The real patients (minus ``STS_001``, the end-to-end case, which is never
  trained on) are dealt into ``k`` folds by a seeded permutation; the
  assignment is written to ``folds.json`` before anything trains.
- For fold *i*, the other folds' real patients are split again: a fifth is
  the *inner validation* set on which the checkpoint and the post-processing
  rule are chosen; the rest (plus every synthetic study when the recipe uses
  them; they are never evaluated) train the network. Fold *i*'s patients
  are touched only once, at the end, for the out-of-fold (OOF) figures.
- Each fold's weights (half precision) and results (``fold<i>.json``) are
  written when it finishes and an existing fold is not trained again, so a
  run can be stopped and resumed, fold by fold, on different days.
- The quality flag's threshold is chosen on OOF agreement; its reported
  sensitivity and false-flag rate are themselves out-of-fold (fold *i*'s
  cases judged with the threshold chosen on the other folds).

The HTML report is written by :mod:`.report`.

Evaluation is on the whole cropped image (the 5 cm box the fine model is
made for), at the image's native resolution, against the expert mask.
"""

from __future__ import annotations

import itertools
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch

from pipelines.segment import network
from pipelines.segment.data import CaseRef, discover
from pipelines.segment.infer import ensemble_probability, load_weights, pick_device, postprocess
from pipelines.segment.metrics import bootstrap_ci, dice, hd95
from pipelines.segment.prep import normalise, to_spacing
from pipelines.segment.report import write_report
from pipelines.segment.train import Sample, prepare, train_stage

#: Never trained on, in any fold: the end-to-end demonstration case.
ALWAYS_EXCLUDED = frozenset({"STS_001"})
#: Post-processing rules the inner validation chooses from (``keep_fraction``:
#: 0 keeps every component, 1 only the largest).
POSTPROCESS_CHOICES = (0.0, 0.1, 1.0)
#: Out-of-fold Dice below this is a failure the quality flag should catch.
FAILURE_DICE = 0.7


@dataclass
class Recipe:
    """One candidate: network, schedule, augmentation and test-time views."""

    name: str
    arch: dict[str, Any]
    steps: int
    batch: int
    lr: float = 1e-3
    augmentation: str = "heavy"
    schedule: str = "poly"
    synthetic: bool = True
    tta: list[str] = field(default_factory=lambda: ["none", "x", "y", "xy"])
    val_every: int = 250
    description: str = ""


CANDIDATES: dict[str, Recipe] = {
    "3d-light": Recipe(
        "3d-light",
        dict(network.FINE_ARCH),
        steps=6000,
        batch=2,
        augmentation="light",
        schedule="cosine",
        val_every=500,
        description="the first demo model's training recipe (3D U-Net at 1.5x1.5x3 mm, flips "
        "and intensity jitter, Adam + cosine, 6000 steps, real and synthetic cases drawn "
        "equally), scored with mirror test-time augmentation",
    ),
    "3d-heavy": Recipe(
        "3d-heavy",
        dict(network.FINE_ARCH),
        steps=2500,
        batch=2,
        description="3D U-Net at 1.5x1.5x3 mm, nnU-Net augmentation, Adam + poly, "
        "mirror test-time augmentation",
    ),
    "3d-real": Recipe(
        "3d-real",
        dict(network.FINE_ARCH),
        steps=2000,
        batch=2,
        synthetic=False,
        description="3d-heavy trained on the real patients only (no synthetic studies)",
    ),
    "25d-heavy": Recipe(
        "25d-heavy",
        dict(network.FINE_ARCH_25D),
        steps=1500,
        batch=12,
        description="2.5D: 2D U-Net on axial slices at 1 mm with the two neighbouring slices "
        "as channels, nnU-Net augmentation, Adam + poly, mirror test-time augmentation",
    ),
}

Log = Callable[[str], None]


def assign_folds(patients: list[str], k: int, seed: int) -> list[list[str]]:
    """``k`` disjoint folds of the sorted patient ids, by a seeded permutation."""
    if len(patients) < k:
        raise ValueError(f"{len(patients)} patients cannot fill {k} folds")
    order = np.random.default_rng(seed).permutation(sorted(patients))
    return [sorted(str(p) for p in order[i::k]) for i in range(k)]


def inner_split(
    patients: list[str], seed: int, fraction: float = 0.2
) -> tuple[list[str], list[str]]:
    """(train, inner validation) of a training fold's patients, by a seeded permutation."""
    order = [str(p) for p in np.random.default_rng(seed).permutation(sorted(patients))]
    n_val = max(1, round(len(order) * fraction))
    return sorted(order[n_val:]), sorted(order[:n_val])


def probability(
    nets: list[torch.nn.Module],
    image: sitk.Image,
    arch: dict[str, Any],
    views: list[str],
    device: torch.device,
) -> tuple[sitk.Image, float | None]:
    """:func:`~.infer.ensemble_probability` of ``image`` at the fine spacing, back on its grid."""
    fine = to_spacing(sitk.Cast(image, sitk.sitkFloat32), arch["spacing_mm"])
    array = normalise(sitk.GetArrayFromImage(fine))
    mean, agreed = ensemble_probability(nets, array, arch, device, views)
    prob = sitk.GetImageFromArray(mean.astype(np.float32))
    prob.CopyInformation(fine)
    prob = sitk.Resample(prob, image, sitk.Transform(), sitk.sitkLinear, 0.0)
    return prob, agreed


def _mask(prob: sitk.Image, keep_fraction: float) -> sitk.Image:
    return postprocess(sitk.Cast(prob >= 0.5, sitk.sitkUInt8), keep_fraction=keep_fraction)


def _save_half(state: dict[str, torch.Tensor], path: Path) -> None:
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in state.items()}, path)


def run_fold(
    fold: int,
    folds: list[list[str]],
    cases: list[CaseRef],
    loaded: dict[str, tuple[sitk.Image, sitk.Image]],
    recipe: Recipe,
    out: Path,
    *,
    seed: int,
    device: torch.device,
    log: Log,
) -> dict[str, Any]:
    """Train fold ``fold``'s model (checkpoint by inner validation), then :func:`evaluate_fold`."""
    started = time.perf_counter()
    test_ids = folds[fold]
    rest = sorted(p for i, f in enumerate(folds) if i != fold for p in f)
    train_ids, val_ids = inner_split(rest, seed + fold)
    arch = recipe.arch
    train_refs = [c for c in cases if c.source == "real" and c.group in train_ids]
    if recipe.synthetic:
        train_refs += [c for c in cases if c.source == "synthetic"]
    val_refs = [c for c in cases if c.source == "real" and c.group in val_ids]
    assert not ALWAYS_EXCLUDED & {c.group for c in train_refs + val_refs}
    assert not set(test_ids) & {c.group for c in train_refs + val_refs}
    tr = [prepare(r, *loaded[r.case_id], "fine", arch) for r in train_refs]
    va: list[Sample] = [prepare(r, *loaded[r.case_id], "fine", arch) for r in val_refs]
    log(
        f"fold {fold}: {len(train_ids)} real patients training"
        f" (+{len(train_refs) - len(train_ids)} synthetic cases),"
        f" {len(val_ids)} inner validation, {len(test_ids)} test"
    )
    state, summary = train_stage(
        "fine",
        arch,
        tr,
        va,
        steps=recipe.steps,
        batch=recipe.batch,
        lr=recipe.lr,
        val_every=recipe.val_every,
        seed=seed + fold,
        device=device,
        augmentation=recipe.augmentation,
        schedule_name=recipe.schedule,
    )
    trained = time.perf_counter() - started
    weights = out / f"fold{fold}.pt"
    _save_half(state, weights)
    info = {
        "fold": fold,
        "recipe": recipe.name,
        "test": test_ids,
        "train": train_ids,
        "inner_validation": val_ids,
        "synthetic_cases": len(train_refs) - len(train_ids),
        "checkpoint": summary,
        "weights": weights.name,
        "train_seconds": round(trained, 1),
        "device": str(device),
    }
    result = evaluate_fold(info, cases, loaded, recipe, out, device=device)
    log(
        f"fold {fold}: trained in {trained / 60:.1f} min, inner-val Dice "
        f"{summary['best_val_dice']:.3f} at step {summary['best_step']}, "
        f"test Dice {np.mean([r['dice'] for r in result['rows']]):.3f}"
    )
    return result


def evaluate_fold(
    info: dict[str, Any],
    cases: list[CaseRef],
    loaded: dict[str, tuple[sitk.Image, sitk.Image]],
    recipe: Recipe,
    out: Path,
    *,
    device: torch.device,
) -> dict[str, Any]:
    """Choose the fold's post-processing on its inner validation, then score its test patients.

    Writes ``out/fold<i>.json`` (``info`` + post-processing + rows) and the
    out-of-fold masks under ``out/oof``.
    """
    arch = recipe.arch
    net = load_weights(network.build(arch), out / info["weights"]).to(device).eval()
    val_refs = [c for c in cases if c.source == "real" and c.group in info["inner_validation"]]
    val_probs = {
        r.group: probability([net], loaded[r.case_id][0], arch, recipe.tta, device)[0]
        for r in val_refs
    }
    by_rule = {
        kf: float(
            np.mean([dice(_mask(val_probs[r.group], kf), loaded[r.case_id][1]) for r in val_refs])
        )
        for kf in POSTPROCESS_CHOICES
    }
    keep_fraction = max(POSTPROCESS_CHOICES, key=lambda kf: (round(by_rule[kf], 4), -kf))
    rows = []
    oof = out / "oof"
    oof.mkdir(exist_ok=True)
    for ref in (c for c in cases if c.source == "real" and c.group in info["test"]):
        t0 = time.perf_counter()
        image, truth = loaded[ref.case_id]
        prob, agreed = probability([net], image, arch, recipe.tta, device)
        mask = _mask(prob, keep_fraction)
        sitk.WriteImage(mask, str(oof / f"{ref.group}.nii.gz"), useCompression=True)
        voxel_ml = float(np.prod(image.GetSpacing())) / 1000
        rows.append(
            {
                "patient": ref.group,
                "fold": info["fold"],
                "dice": round(dice(mask, truth), 4),
                "hd95_mm": round(hd95(mask, truth), 2),
                "agreement": None if agreed is None else round(agreed, 4),
                "volume_ml": round(float(sitk.GetArrayViewFromImage(mask).sum()) * voxel_ml, 1),
                "truth_ml": round(float(sitk.GetArrayViewFromImage(truth).sum()) * voxel_ml, 1),
                "seconds": round(time.perf_counter() - t0, 2),
            }
        )
    result = info | {
        "recipe": recipe.name,
        "inference": arch.get("inference", "window"),
        "postprocess": {
            "inner_validation_dice": {str(k): round(v, 4) for k, v in by_rule.items()},
            "keep_fraction": keep_fraction,
        },
        "rows": rows,
    }
    (out / f"fold{info['fold']}.json").write_text(json.dumps(result, indent=2))
    return result


def flag_threshold(rows: list[dict[str, Any]]) -> float:
    """The agreement below which to flag: maximises sensitivity + specificity for Dice < 0.7.

    Candidates are the midpoints between neighbouring observed agreements (a
    case is flagged when its agreement is below the threshold); ties go to
    the lower threshold, which flags fewer cases. With no failure among
    ``rows`` the lowest observed agreement is kept, so only cases less sure
    than any seen are flagged.
    """
    scored = [r for r in rows if r.get("agreement") is not None]
    if not scored:
        return 0.0
    values = sorted({float(r["agreement"]) for r in scored})
    fails = [r for r in scored if r["dice"] < FAILURE_DICE]
    goods = [r for r in scored if r["dice"] >= FAILURE_DICE]
    if not fails or not goods:
        return values[0]
    best, best_j = values[0], -1.0
    for t in [(a + b) / 2 for a, b in itertools.pairwise(values)]:
        sens = sum(r["agreement"] < t for r in fails) / len(fails)
        spec = sum(r["agreement"] >= t for r in goods) / len(goods)
        if sens + spec > best_j + 1e-9:
            best, best_j = t, sens + spec
    return round(best, 4)


def wilson_ci(k: int, n: int, z: float = 1.96) -> list[float] | None:
    """95 % Wilson score interval of the proportion ``k``/``n`` (None when ``n`` is 0)."""
    if n == 0:
        return None
    p = k / n
    centre = p + z * z / (2 * n)
    half = z * float(np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)))
    scale = 1 + z * z / n
    return [round((centre - half) / scale, 3), round((centre + half) / scale, 3)]


def flag_figures(rows: list[dict[str, Any]], threshold_by_fold: dict[int, float]) -> dict[str, Any]:
    """Sensitivity for failures and false-flag rate of successes.

    Each row is judged by its own fold's threshold (chosen without that fold).
    """
    scored = [r for r in rows if r.get("agreement") is not None]
    flagged = [r for r in scored if r["agreement"] < threshold_by_fold[r["fold"]]]
    fails = [r for r in scored if r["dice"] < FAILURE_DICE]
    goods = [r for r in scored if r["dice"] >= FAILURE_DICE]
    caught = [r for r in fails if r in flagged]
    false = [r for r in goods if r in flagged]
    return {
        "failures": len(fails),
        "caught": len(caught),
        "sensitivity": round(len(caught) / len(fails), 3) if fails else None,
        "sensitivity_ci95": wilson_ci(len(caught), len(fails)),
        "successes": len(goods),
        "false_flags": len(false),
        "false_flag_rate": round(len(false) / len(goods), 3) if goods else None,
        "false_flag_rate_ci95": wilson_ci(len(false), len(goods)),
        "flagged_patients": sorted(r["patient"] for r in flagged),
    }


def summarise_cv(folds_done: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-patient rows, Dice/HD95 mean with bootstrap CI, and the quality flag's OOF figures."""
    rows = sorted((r for f in folds_done for r in f["rows"]), key=lambda r: r["patient"])
    d = bootstrap_ci([r["dice"] for r in rows])
    finite = [r["hd95_mm"] for r in rows if np.isfinite(r["hd95_mm"])]
    h = bootstrap_ci(finite) if finite else (float("nan"),) * 3
    per_fold = {
        f["fold"]: flag_threshold(
            [r for g in folds_done if g["fold"] != f["fold"] for r in g["rows"]]
        )
        for f in folds_done
    }
    return {
        "n": len(rows),
        "dice_mean": round(d[0], 4),
        "dice_ci95": [round(d[1], 4), round(d[2], 4)],
        "dice_median": round(float(np.median([r["dice"] for r in rows])), 4),
        "below_0.7": sum(r["dice"] < FAILURE_DICE for r in rows),
        "hd95_mm_mean": round(h[0], 2),
        "hd95_mm_ci95": [round(h[1], 2), round(h[2], 2)],
        "hd95_missed": len(rows) - len(finite),
        "quality_flag": {
            "threshold_all_folds": flag_threshold(rows),
            "out_of_fold": flag_figures(rows, per_fold),
            "thresholds_by_fold": per_fold,
        },
        "rows": rows,
    }


def cross_validate(
    data: list[Path],
    out: Path,
    recipe: Recipe,
    *,
    k: int = 5,
    seed: int = 0,
    exclude: set[str] | None = None,
    only_folds: list[int] | None = None,
    device: str = "auto",
    log: Log = print,
) -> dict[str, Any]:
    """Run (or resume) the CV of ``recipe``; ``cv.json`` and ``report.html`` once all folds end."""
    excluded = set(exclude or ()) | ALWAYS_EXCLUDED
    cases = discover(data, excluded)
    real = sorted({c.group for c in cases if c.source == "real"})
    if not real:
        raise ValueError(f"no real patients under {', '.join(map(str, data))}")
    out.mkdir(parents=True, exist_ok=True)
    folds_file = out / "folds.json"
    folds = assign_folds(real, k, seed)
    if folds_file.is_file():  # resume: the folds must be the ones already trained on
        saved = json.loads(folds_file.read_text())
        if saved["folds"] != folds or saved["recipe"] != recipe.name:
            raise ValueError(f"{folds_file} holds other folds or another recipe: use a new --out")
    else:
        folds_file.write_text(
            json.dumps(
                {
                    "recipe": recipe.name,
                    "seed": seed,
                    "k": k,
                    "excluded": sorted(excluded),
                    "folds": folds,
                    "recipe_settings": asdict(recipe),
                },
                indent=2,
            )
        )
    dev = pick_device(device)
    loaded: dict[str, tuple[sitk.Image, sitk.Image]] = {}
    wanted = [c for c in cases if c.source == "real" or recipe.synthetic]
    todo = [i for i in range(k) if (only_folds is None or i in only_folds)]
    todo = [i for i in todo if not (out / f"fold{i}.json").is_file()]
    if todo:
        log(f"{len(real)} real patients in {k} folds; loading {len(wanted)} cases; device {dev}")
        loaded = {c.case_id: c.load() for c in wanted}
    for i in todo:
        run_fold(i, folds, cases, loaded, recipe, out, seed=seed, device=dev, log=log)
    done = [
        json.loads((out / f"fold{i}.json").read_text())
        for i in range(k)
        if (out / f"fold{i}.json").is_file()
    ]
    if len(done) < k:
        log(f"{len(done)} of {k} folds done; run again to continue")
        return {"recipe": recipe.name, "folds_done": len(done), "k": k}
    if not loaded:
        loaded = {c.case_id: c.load() for c in cases if c.source == "real"}
    return _finish(out, done, recipe, k, seed, loaded, cases)


def _finish(
    out: Path,
    done: list[dict[str, Any]],
    recipe: Recipe,
    k: int,
    seed: int,
    loaded: dict[str, tuple[sitk.Image, sitk.Image]],
    cases: list[CaseRef],
) -> dict[str, Any]:
    """``cv.json`` and ``report.html`` from the finished folds."""
    summary = summarise_cv(done)
    summary |= {
        "recipe": recipe.name,
        "description": recipe.description,
        "inference": recipe.arch.get("inference", "window"),
        "k": k,
        "seed": seed,
        "train_minutes_per_fold": round(float(np.mean([f["train_seconds"] for f in done])) / 60, 1),
        "postprocess_by_fold": [f["postprocess"]["keep_fraction"] for f in done],
        "method": (
            f"patient-level {k}-fold CV over the real patients (STS_001 never used); checkpoint "
            "and post-processing chosen on an inner validation fifth of each training fold; "
            "Dice/HD95 at native resolution on the whole crop; 95% CI by bootstrap over patients"
        ),
    }
    (out / "cv.json").write_text(json.dumps(summary, indent=2))
    refs = {c.group: c for c in cases if c.source == "real"}
    write_report(out, summary, recipe, loaded, refs)
    return summary


def rescore_cv(
    source: Path,
    out: Path,
    data: list[Path],
    *,
    inference: str,
    device: str = "auto",
    log: Log = print,
) -> dict[str, Any]:
    """The finished CV in ``source`` scored again with another test-time ``inference`` mode.

    Nothing is trained: each fold's weights are reused, its post-processing is
    chosen again on its inner validation patients, and its test patients are
    scored, into ``out`` (a recipe named ``<recipe>-<inference>``), so that a
    card can adopt a faster inference only with its own out-of-fold figures.
    """
    folds = json.loads((source / "folds.json").read_text())
    settings = dict(folds["recipe_settings"])
    settings["arch"] = dict(settings["arch"]) | {"inference": inference}
    base = str(settings["name"]).split("+")[0]
    settings["name"] = f"{base}+{inference}"
    recipe = Recipe(**settings)
    out.mkdir(parents=True, exist_ok=True)
    (out / "folds.json").write_text(
        json.dumps(folds | {"recipe": recipe.name, "recipe_settings": asdict(recipe)}, indent=2)
    )
    cases = discover(data, set(folds["excluded"]))
    loaded = {c.case_id: c.load() for c in cases if c.source == "real"}
    dev = pick_device(device)
    done = []
    for i in range(int(folds["k"])):
        info = json.loads((source / f"fold{i}.json").read_text())
        keep = (
            "fold",
            "test",
            "train",
            "inner_validation",
            "synthetic_cases",
            "checkpoint",
            "weights",
            "train_seconds",
            "device",
        )
        shutil.copyfile(source / info["weights"], out / info["weights"])
        done.append(
            evaluate_fold({key: info[key] for key in keep}, cases, loaded, recipe, out, device=dev)
        )
        log(f"fold {i}: test Dice {np.mean([r['dice'] for r in done[-1]['rows']]):.3f}")
    return _finish(out, done, recipe, int(folds["k"]), int(folds["seed"]), loaded, cases)
