"""Nested choice of the probability threshold for the shipped segmenter, on real T1 patients.

Question: does choosing the cut of the probability map (together with the
post-processing ``keep_fraction``) on each CV fold's inner validation improve
the out-of-fold Dice on the real patients? The typical failure of
``sarcnode-seg-demo`` 2.x is over-segmentation (masks spilling into muscle),
which a higher threshold might trim; nothing is trained here.

What it measures, fold by fold, with the card's five fine members (``fine_i.pt``
is fold *i*'s model of the patient-level 5-fold CV, recipe 3d-light, seed 0):

- the fold's test and inner-validation patients are rebuilt with
  :func:`pipelines.segment.cv.assign_folds` / :func:`~pipelines.segment.cv.inner_split`
  (asserted equal to the card's ``training.folds``; STS_001 is never used);
- each of those patients' probability map is computed exactly as
  :func:`~pipelines.segment.cv.evaluate_fold` does (``cv.probability`` with the
  fold model alone and the recipe's four mirror views);
- every (threshold, keep_fraction) in ``THRESHOLDS`` x ``cv.POSTPROCESS_CHOICES``
  is scored (Dice, volume) on the inner validation and on the test patients.

Rules compared on the same out-of-fold patients (paired):

- ``baseline``: the shipped rule, threshold 0.5 and keep_fraction chosen on the
  inner validation as ``evaluate_fold`` does; its per-patient Dice must
  reproduce ``cv/cv.json`` (the max abs difference is printed);
- ``nested``: per fold the (threshold, keep_fraction) with the best
  inner-validation mean Dice (rounded to 4 decimals as ``evaluate_fold`` does;
  ties go to the threshold nearer 0.5, then the smaller keep_fraction as in
  ``evaluate_fold``, then the lower threshold), applied to the fold's test
  patients.

Reported: OOF mean Dice with patient-bootstrap 95 % CI for both, the paired gain
(nested - baseline) with its bootstrap CI, the per-fold choices, how many
patients got better or worse, the median OOF volume error (predicted - truth,
ml), and, for information only and NOT out-of-sample, the OOF mean at each
fixed threshold (keep_fraction still chosen on the inner validation): picking
the best of those would look at the test patients.

Run (one torch thread, about 5 minutes on 2 shared CPU cores; the per-fold
scores are cached under ``var/cache/seg-threshold`` so a rerun takes seconds)::

    flock /tmp/notes/bench.lock .venv/bin/python bench/seg_threshold.py \\
        --out models/sarcnode-seg-demo/cv/t1_threshold.json

Not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipelines.segment import cv, network  # noqa: E402
from pipelines.segment.card import load_card, sha256  # noqa: E402
from pipelines.segment.data import CaseRef, discover  # noqa: E402
from pipelines.segment.infer import load_weights, postprocess  # noqa: E402
from pipelines.segment.metrics import bootstrap_ci, dice  # noqa: E402

#: Probability cuts tried; 0.5 is the shipped one.
THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7)
SHIPPED = 0.5
#: One grid cell: (threshold, keep_fraction).
Cell = tuple[float, float]
GRID: list[Cell] = [(t, kf) for t in THRESHOLDS for kf in cv.POSTPROCESS_CHOICES]


def cell_key(cell: Cell) -> str:
    """JSON key of a grid cell, e.g. ``0.5|0.1``."""
    return f"{cell[0]}|{cell[1]}"


def score_patient(
    prob: sitk.Image, truth: sitk.Image, voxel_ml: float
) -> dict[str, dict[str, float]]:
    """Dice and predicted volume (ml) of every grid cell for one probability map."""
    out: dict[str, dict[str, float]] = {}
    for t, kf in GRID:
        # cv._mask with the threshold as a parameter
        mask = postprocess(sitk.Cast(prob >= t, sitk.sitkUInt8), keep_fraction=kf)
        out[cell_key((t, kf))] = {
            "dice": float(dice(mask, truth)),
            "ml": float(sitk.GetArrayViewFromImage(mask).sum()) * voxel_ml,
        }
    return out


def fold_scores(
    fold: int,
    test: list[str],
    val: list[str],
    refs: dict[str, CaseRef],
    model: Path,
    arch: dict[str, Any],
    views: list[str],
    cache: Path,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """Grid scores of fold ``fold``'s inner-validation and test patients (cached by weights)."""
    weights = model / f"fine_{fold}.pt"
    digest = sha256(weights)
    cached = cache / f"fold{fold}.json"
    if cached.is_file():
        saved = json.loads(cached.read_text())
        if (
            saved["sha256"] == digest
            and saved["test"] == test
            and saved["inner_validation"] == val
            and saved["grid"] == [cell_key(c) for c in GRID]
            and saved["views"] == views
        ):
            log(f"fold {fold}: scores from {cached}")
            return dict(saved)
    device = torch.device("cpu")
    net = load_weights(network.build(arch), weights).to(device).eval()
    started = time.perf_counter()
    patients: dict[str, Any] = {}
    for pid in val + test:
        image, truth = refs[pid].load()
        prob = cv.probability([net], image, arch, views, device)[0]
        voxel_ml = float(np.prod(image.GetSpacing())) / 1000
        patients[pid] = {
            "role": "test" if pid in test else "inner_validation",
            "truth_ml": float(sitk.GetArrayViewFromImage(truth).sum()) * voxel_ml,
            "cells": score_patient(prob, truth, voxel_ml),
        }
    seconds = time.perf_counter() - started
    log(f"fold {fold}: {len(val)} inner-validation + {len(test)} test patients in {seconds:.0f} s")
    result = {
        "fold": fold,
        "sha256": digest,
        "test": test,
        "inner_validation": val,
        "grid": [cell_key(c) for c in GRID],
        "views": views,
        "seconds": round(seconds, 1),
        "patients": patients,
    }
    cache.mkdir(parents=True, exist_ok=True)
    cached.write_text(json.dumps(result))
    return result


def val_means(scores: dict[str, Any]) -> dict[str, float]:
    """Inner-validation mean Dice of every grid cell (unrounded)."""
    val = scores["inner_validation"]
    return {
        cell_key(c): float(
            np.mean([scores["patients"][p]["cells"][cell_key(c)]["dice"] for p in val])
        )
        for c in GRID
    }


def choose_keep(means: dict[str, float], threshold: float) -> float:
    """``evaluate_fold``'s rule at one threshold: best rounded mean, ties to the smaller kf."""
    return max(
        cv.POSTPROCESS_CHOICES,
        key=lambda kf: (round(means[cell_key((threshold, kf))], 4), -kf),
    )


def choose_nested(means: dict[str, float]) -> Cell:
    """Best rounded inner-validation mean over the grid; ties near 0.5, small kf, low threshold."""
    return max(
        GRID,
        key=lambda c: (round(means[cell_key(c)], 4), -abs(c[0] - SHIPPED), -c[1], -c[0]),
    )


def summary(rows: list[dict[str, Any]], rule: str) -> dict[str, Any]:
    """Mean Dice with patient-bootstrap CI, median, failures and volume error of one rule."""
    d = [r[rule]["dice"] for r in rows]
    err = [r[rule]["ml"] - r["truth_ml"] for r in rows]
    mean, lo, hi = bootstrap_ci(d)
    return {
        "dice_mean": round(mean, 4),
        "dice_ci95": [round(lo, 4), round(hi, 4)],
        "dice_median": round(float(np.median(d)), 4),
        "below_0.7": sum(x < cv.FAILURE_DICE for x in d),
        "volume_error_ml_median": round(float(np.median(err)), 1),
        "abs_volume_error_ml_median": round(float(np.median(np.abs(err))), 1),
    }


def paired(rows: list[dict[str, Any]], rule: str, base: str = "baseline") -> dict[str, Any]:
    """Paired Dice gain of ``rule`` over ``base``: mean, bootstrap CI, patients better/worse."""
    diff = [round(r[rule]["dice"], 4) - round(r[base]["dice"], 4) for r in rows]
    mean, lo, hi = bootstrap_ci(diff)
    return {
        "gain": round(mean, 4),
        "gain_ci95": [round(lo, 4), round(hi, 4)],
        "ci_above_0": lo > 0,
        "improved": sum(x > 0 for x in diff),
        "worse": sum(x < 0 for x in diff),
        "same": sum(x == 0 for x in diff),
    }


def load_avg() -> str:
    """The 1/5/15-minute load averages, as ``uptime`` prints them."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def git(*args: str) -> str:
    """Output of one ``git`` command in the repository (the code measured)."""
    return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.strip()


def main() -> int:
    """Score every fold's grid, apply both rules, print the table and write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=REPO / "models" / "sarcnode-seg-demo")
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared/data/sts-t1-cropped")
    parser.add_argument("--cache", type=Path, default=REPO / "var/cache/seg-threshold")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    started, load_start = time.perf_counter(), load_avg()

    card = load_card(args.model)
    shipped_cv = json.loads((args.model / "cv" / "cv.json").read_text())
    arch = card["architecture"]["fine"]
    recipe = cv.CANDIDATES[card["training"]["recipe"]["name"]]
    views = list(recipe.tta)
    assert views == list(card["training"]["recipe"]["tta"])
    k, seed = int(shipped_cv["k"]), int(shipped_cv["seed"])

    cases = discover([args.data], set(cv.ALWAYS_EXCLUDED))
    refs = {c.group: c for c in cases if c.source == "real"}
    real = sorted(refs)
    assert not cv.ALWAYS_EXCLUDED & set(real)
    folds = cv.assign_folds(real, k, seed)
    assert folds == card["training"]["folds"], "folds differ from the card's training.folds"

    scored, choices, rows = [], [], []
    cv_rows = {r["patient"]: r for r in shipped_cv["rows"]}
    for i in range(k):
        test = folds[i]
        rest = sorted(p for j, f in enumerate(folds) if j != i for p in f)
        _, val = cv.inner_split(rest, seed + i)
        assert not cv.ALWAYS_EXCLUDED & set(test + val)
        assert not set(test) & set(val)
        s = fold_scores(i, test, val, refs, args.model, arch, views, args.cache, print)
        scored.append(s)
        means = val_means(s)
        base_kf = choose_keep(means, SHIPPED)
        nested = choose_nested(means)
        fixed = {t: choose_keep(means, t) for t in THRESHOLDS}
        card_pp = card["postprocess"]["by_fold"][i]
        choices.append(
            {
                "fold": i,
                "inner_validation": val,
                "baseline_keep_fraction": base_kf,
                "card_keep_fraction": card_pp["keep_fraction"],
                "nested_threshold": nested[0],
                "nested_keep_fraction": nested[1],
                "inner_validation_dice_baseline": round(means[cell_key((SHIPPED, base_kf))], 4),
                "inner_validation_dice_nested": round(means[cell_key(nested)], 4),
                "inner_validation_dice_grid": {key: round(v, 4) for key, v in means.items()},
                "tied_best_cells": [
                    cell_key(c)
                    for c in GRID
                    if round(means[cell_key(c)], 4) == round(means[cell_key(nested)], 4)
                ],
                "card_inner_validation_dice_max_abs_diff": round(
                    max(
                        abs(round(means[cell_key((SHIPPED, float(kf)))], 4) - v)
                        for kf, v in card_pp["inner_validation_dice"].items()
                    ),
                    4,
                ),
                "fixed_threshold_keep_fraction": {str(t): kf for t, kf in fixed.items()},
                "seconds": s["seconds"],
            }
        )
        for pid in test:
            p = s["patients"][pid]
            cells = p["cells"]
            row: dict[str, Any] = {
                "patient": pid,
                "fold": i,
                "truth_ml": p["truth_ml"],
                "baseline": cells[cell_key((SHIPPED, base_kf))],
                "nested": cells[cell_key(nested)],
                "cv_json_dice": cv_rows[pid]["dice"],
                "cv_json_volume_ml": cv_rows[pid]["volume_ml"],
            }
            for t in THRESHOLDS:
                row[f"fixed@{t}"] = cells[cell_key((t, fixed[t]))]
            rows.append(row)
    rows.sort(key=lambda r: r["patient"])
    assert sorted(cv_rows) == [r["patient"] for r in rows]

    repro = max(abs(round(r["baseline"]["dice"], 4) - r["cv_json_dice"]) for r in rows)
    repro_ml = max(abs(round(r["baseline"]["ml"], 1) - r["cv_json_volume_ml"]) for r in rows)
    for c in choices:
        fold_rows = [r for r in rows if r["fold"] == c["fold"]]
        for rule in ("baseline", "nested"):
            c[f"test_dice_{rule}"] = round(float(np.mean([r[rule]["dice"] for r in fold_rows])), 4)
    votes = Counter(c["nested_threshold"] for c in choices)
    mode = max(votes, key=lambda t: (votes[t], -abs(t - SHIPPED)))
    kf_match = all(c["baseline_keep_fraction"] == c["card_keep_fraction"] for c in choices)
    wall = time.perf_counter() - started
    result: dict[str, Any] = {
        "what": "nested choice of the probability threshold (with keep_fraction) on each CV "
        "fold's inner validation, scored out-of-fold on the real T1 patients "
        "(bench/seg_threshold.py)",
        "model": card["id"] + " " + str(card["version"]),
        "code": git("rev-parse", "--short", "HEAD"),
        "code_uncommitted": git("status", "--porcelain", "--", "pipelines", "bench").splitlines(),
        "grid": {"thresholds": list(THRESHOLDS), "keep_fraction": list(cv.POSTPROCESS_CHOICES)},
        "tie_rule": "best inner-validation mean Dice rounded to 4 decimals; ties to the threshold "
        "nearer 0.5, then the smaller keep_fraction, then the lower threshold",
        "n": len(rows),
        "reproduction": {
            "baseline_vs_cv_json_dice_max_abs_diff": round(repro, 4),
            "baseline_vs_cv_json_volume_ml_max_abs_diff": round(repro_ml, 1),
            "baseline_keep_fraction_equals_card": kf_match,
        },
        "baseline": summary(rows, "baseline"),
        "nested": summary(rows, "nested"),
        "nested_vs_baseline": paired(rows, "nested"),
        "fixed_thresholds_NOT_out_of_sample": {
            "note": "for information only: choosing among these looks at the test patients",
            "most_frequent_nested_threshold": mode,
            "most_frequent_note": "one cut for the whole ensemble would be chosen as the card "
            "chooses keep_fraction (most frequent fold choice); the folds' inner validations "
            "overlap the other folds' test patients, so this is not out-of-sample either",
            **{
                str(t): {
                    "dice_mean": round(float(np.mean([r[f"fixed@{t}"]["dice"] for r in rows])), 4),
                    "vs_baseline": paired(rows, f"fixed@{t}"),
                    "volume_error_ml_median": round(
                        float(np.median([r[f"fixed@{t}"]["ml"] - r["truth_ml"] for r in rows])), 1
                    ),
                }
                for t in THRESHOLDS
            },
        },
        "per_fold": choices,
        "rows": [
            {
                "patient": r["patient"],
                "fold": r["fold"],
                "truth_ml": round(r["truth_ml"], 1),
                "cv_json_dice": r["cv_json_dice"],
                "baseline_dice": round(r["baseline"]["dice"], 4),
                "baseline_ml": round(r["baseline"]["ml"], 1),
                "nested_dice": round(r["nested"]["dice"], 4),
                "nested_ml": round(r["nested"]["ml"], 1),
                **{f"dice@{t}": round(r[f"fixed@{t}"]["dice"], 4) for t in THRESHOLDS},
            }
            for r in rows
        ],
        "run": {
            "seconds": round(wall, 1),
            "inference_seconds": round(sum(s["seconds"] for s in scored), 1),
            "load_start": load_start,
            "load_end": load_avg(),
            "torch_threads": torch.get_num_threads(),
            "device": "cpu",
            "torch": torch.__version__,
        },
    }

    print(
        f"baseline vs cv.json: max |Dice diff| {repro:.4f}, max |ml diff| {repro_ml:.1f}, "
        f"keep_fraction as card: {kf_match}"
    )
    print(
        f"{'fold':>4} {'base kf':>7} {'nested t|kf':>12} {'val base':>8} {'val nested':>10} "
        f"{'test base':>9} {'test nested':>11}  tied best cells"
    )
    for c in choices:
        print(
            f"{c['fold']:>4} {c['baseline_keep_fraction']:>7} "
            f"{c['nested_threshold']:>6}|{c['nested_keep_fraction']:<5} "
            f"{c['inner_validation_dice_baseline']:>8.4f} "
            f"{c['inner_validation_dice_nested']:>10.4f} "
            f"{c['test_dice_baseline']:>9.4f} {c['test_dice_nested']:>11.4f}  "
            f"{' '.join(c['tied_best_cells'])}"
        )
    for rule in ("baseline", "nested"):
        s = result[rule]
        print(
            f"{rule:<9} OOF Dice {s['dice_mean']:.4f} [{s['dice_ci95'][0]:.4f}, "
            f"{s['dice_ci95'][1]:.4f}], median {s['dice_median']:.4f}, <0.7: {s['below_0.7']}, "
            f"median volume error {s['volume_error_ml_median']:+.1f} ml"
        )
    g = result["nested_vs_baseline"]
    print(
        f"paired gain {g['gain']:+.4f} [{g['gain_ci95'][0]:+.4f}, {g['gain_ci95'][1]:+.4f}], "
        f"improved {g['improved']}, worse {g['worse']}, same {g['same']}"
    )
    print("fixed thresholds (NOT out-of-sample):")
    for t in THRESHOLDS:
        f = result["fixed_thresholds_NOT_out_of_sample"][str(t)]
        print(
            f"  {t}: OOF Dice {f['dice_mean']:.4f} ({f['vs_baseline']['gain']:+.4f} "
            f"[{f['vs_baseline']['gain_ci95'][0]:+.4f}, {f['vs_baseline']['gain_ci95'][1]:+.4f}]), "
            f"median volume error {f['volume_error_ml_median']:+.1f} ml"
        )
    print(f"wall {wall:.0f} s, load {load_start} -> {load_avg()}")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
