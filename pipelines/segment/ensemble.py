"""A shipped model from a finished cross-validation: the fold models become the ensemble.

nnU-Net's practice: the k models of the cross-validation are the ensemble
that is shipped, so the out-of-fold figures are the honest estimate of what
one of its members does on a new patient (the ensemble of all k is at least
as good on average; it is never scored on the patients it trained on).

:func:`assemble` writes a model folder: the locator (coarse stage) copied
from an existing model, ``fine_<i>.pt`` from the CV folder, and a card that
states the data, the CV method and figures, every candidate compared, the
post-processing rule, the quality-flag threshold with its out-of-fold
sensitivity, and the input-check limits measured on the training images.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from pipelines.segment.card import (
    NOT_CLINICAL,
    intended_use,
    load_card,
    software_versions,
    write_card,
)
from pipelines.segment.cv import ALWAYS_EXCLUDED, FAILURE_DICE
from pipelines.segment.data import discover
from pipelines.segment.quality import DEFAULT_MIN_CORRELATION, neighbour_correlation

#: The CV figures a card and its candidates table carry (``cv.json`` keys).
CV_FIGURES = ("n", "dice_mean", "dice_ci95", "dice_median", "below_0.7", "hd95_mm_mean")


def candidate_table(cv_root: Path, chosen: Path) -> list[dict[str, Any]]:
    """Every CV under ``cv_root``, finished or stopped early, against the chosen one.

    A finished CV (``cv.json``) gives its mean Dice with CI over all
    patients; one stopped early gives the mean over the folds it finished,
    beside the chosen recipe's mean on exactly those patients (same folds,
    same patients: the only fair comparison of a partial run).
    """
    chosen_rows = {r["patient"]: r for r in json.loads((chosen / "cv.json").read_text())["rows"]}
    rows = []
    for folds_file in sorted(cv_root.glob("*/folds.json")):
        folder = folds_file.parent
        settings = json.loads(folds_file.read_text()).get("recipe_settings", {})
        done = sorted(folder.glob("fold[0-9]*.json"))
        entry: dict[str, Any] = {
            "recipe": settings.get("name", folder.name),
            "description": settings.get("description", ""),
            "steps": settings.get("steps"),
            "synthetic": settings.get("synthetic"),
            "augmentation": settings.get("augmentation"),
            "inference": settings.get("arch", {}).get("inference", "window"),
        }
        if not done:
            entry |= {"folds_done": [], "stopped": "stopped before its first fold finished"}
        elif (folder / "cv.json").is_file():
            cv = json.loads((folder / "cv.json").read_text())
            entry |= {key: cv[key] for key in (*CV_FIGURES, "train_minutes_per_fold")}
            entry["folds_done"] = cv["k"]
        else:
            fold_rows = [r for f in done for r in json.loads(f.read_text())["rows"]]
            same = [
                chosen_rows[r["patient"]]["dice"] for r in fold_rows if r["patient"] in chosen_rows
            ]
            entry |= {
                "folds_done": [json.loads(f.read_text())["fold"] for f in done],
                "n": len(fold_rows),
                "dice_mean": round(float(np.mean([r["dice"] for r in fold_rows])), 4),
                "chosen_recipe_on_same_patients": round(float(np.mean(same)), 4) if same else None,
                "stopped": "stopped after the folds listed: behind the chosen recipe on the same "
                "patients, and its remaining folds did not fit the CPU budget",
            }
        rows.append(entry)
    return rows


def previous_model(locator_card: dict[str, Any]) -> dict[str, Any]:
    """The model this one replaces, on the real patients it held out (not the CV's folds)."""
    real = locator_card.get("validation", {}).get("summary", {}).get("real", {})
    return {
        "model": f"{locator_card.get('id')} {locator_card.get('version')}",
        "held_out_real": real,
        "note": "its own validation split (8 real patients it did not train on), not the CV "
        "folds: retraining its exact recipe on the folds is the 3d-light candidate",
    }


def training_correlation(data: list[Path]) -> list[float]:
    """Lowest and highest in-plane neighbour correlation over the real training images."""
    values = [
        neighbour_correlation(sitk.GetArrayFromImage(sitk.ReadImage(str(c.image_path))))
        for c in discover(data, set(ALWAYS_EXCLUDED))
        if c.source == "real"
    ]
    return [round(min(values), 3), round(max(values), 3)] if values else []


def copy_weights(cv_dir: Path, locator: Path, out: Path, k: int) -> dict[str, Any]:
    """The locator's ``coarse.pt`` and each fold's weights as ``fine_<i>.pt`` into ``out``.

    Returns the card's ``weights`` entries (checksums are added by the card writer).
    """
    loc = load_card(locator)
    if locator.resolve() != out.resolve():
        shutil.copyfile(locator / loc["weights"]["coarse"]["file"], out / "coarse.pt")
    weights: dict[str, Any] = {"coarse": {"file": "coarse.pt"}}
    for i in range(k):
        shutil.copyfile(cv_dir / f"fold{i}.pt", out / f"fine_{i}.pt")
        weights[f"fine_{i}"] = {"file": f"fine_{i}.pt"}
    for stale in out.glob("fine.pt"):
        stale.unlink()
    return weights


def quality_block(cv: dict[str, Any]) -> dict[str, Any]:
    """The card's quality flag: its threshold and out-of-fold figures from ``cv.json``."""
    flag = cv["quality_flag"]
    return {
        "method": "mean pairwise Dice between mirror test-time views, averaged over members",
        "review_below": flag["threshold_all_folds"],
        "failure_definition": f"out-of-fold Dice < {FAILURE_DICE}",
        "threshold_chosen_by": "maximal sensitivity + specificity on all out-of-fold cases",
        "out_of_fold": flag["out_of_fold"],
        "note": "sensitivity and false-flag rate are out-of-fold: each fold's cases are "
        "judged by the threshold chosen on the other folds",
    }


def training_block(
    cv: dict[str, Any],
    folds: dict[str, Any],
    fold_results: list[dict[str, Any]],
    loc: dict[str, Any],
    data: list[Path],
) -> dict[str, Any]:
    """The card's training block: data, recipe, folds, the locator's origin, time and versions."""
    return {
        "data": [p.name for p in data],
        "excluded": folds["excluded"],
        "recipe": folds["recipe_settings"],
        "folds": folds["folds"],
        "locator": {
            "from": f"{loc.get('id')} {loc.get('version')}",
            "training": loc.get("training", {}).get("stages", {}).get("coarse", {}),
        },
        "minutes_per_fold": cv["train_minutes_per_fold"],
        "device": fold_results[0].get("device"),
        "versions": software_versions(),
    }


def validation_block(cv: dict[str, Any], cv_dir: Path, loc: dict[str, Any]) -> dict[str, Any]:
    """The card's validation block: CV method, headline, summary, candidates and every case."""
    return {
        "method": cv["method"],
        "headline": (
            f"out-of-fold Dice {cv['dice_mean']:.3f} "
            f"(95% CI {cv['dice_ci95'][0]:.3f}-{cv['dice_ci95'][1]:.3f}), "
            f"{cv['n']} real T1 patients"
        ),
        "summary": {"real": {key: cv[key] for key in (*CV_FIGURES, "hd95_mm_ci95", "hd95_missed")}},
        "candidates": candidate_table(cv_dir.parent, cv_dir),
        "previous_model": previous_model(locator_card=loc),
        "cases": cv["rows"],
    }


def end_to_end(model: Path, check_study: Path, rules: Path) -> dict[str, Any]:
    """``check_study`` (a DICOM study with an RTSTRUCT) scored by the written model ``model``.

    Each series on its full field of view and the FS-T2 mask carried to T1,
    against ``GTV_Mass``: the card's ``end_to_end_case``.
    """
    from pipelines.io.roles import load_role_rules
    from pipelines.segment.evaluate import dicom_cases, score
    from pipelines.segment.infer import Segmenter

    cases = dicom_cases(check_study, load_role_rules(rules), "GTV_Mass")
    return {
        "study": check_study.name,
        "what": "full field of view, locator + each sequence's fine path (the ensemble, or "
        "its own in ensemble.by_sequence), against the expert GTV_Mass; never trained on",
        "rows": score(Segmenter(model, "cpu"), cases),
    }


def add_sequence_path(
    model: Path,
    sequence: str,
    weights: Path,
    *,
    views: list[str],
    source: str,
    chosen_by: str,
) -> dict[str, Any]:
    """Give ``sequence`` its own fine path in the model folder ``model``; returns the card.

    ``weights`` (a state dict of the card's fine architecture) is stored in
    half precision as ``fine_<sequence>.pt`` and named in ``weights`` and in
    ``ensemble.by_sequence.<sequence>`` with its test-time ``views`` (the
    first view set's agreement is that path's quality estimate), where it
    came from (``source``) and the rule that chose it (``chosen_by``).
    :class:`~pipelines.segment.infer.Segmenter` then segments that sequence
    with it; every other sequence keeps the default ensemble.
    """
    import torch

    from pipelines.segment import network
    from pipelines.segment.infer import TTA_VIEWS, load_weights

    card = load_card(model)
    unknown = [v for v in views if v not in TTA_VIEWS]
    if unknown or not views:
        raise ValueError(f"unknown or no test-time views {unknown or views}")
    net = load_weights(network.build(card["architecture"]["fine"]), weights)  # refuses a mismatch
    name = f"fine_{sequence.lower()}"
    state = {k: v.half() if v.is_floating_point() else v for k, v in net.state_dict().items()}
    torch.save(state, model / f"{name}.pt")
    card["weights"][name] = {"file": f"{name}.pt"}
    ensemble = card.setdefault("ensemble", {})
    ensemble.setdefault("by_sequence", {})[sequence] = {
        "members": [name],
        "tta": list(views),
        "source": source,
        "chosen_by": chosen_by,
    }
    write_card(model, card)
    return card


def assemble(
    cv_dir: Path,
    locator: Path,
    out: Path,
    *,
    model_id: str,
    version: str,
    data: list[Path],
    extra_validation: dict[str, Any] | None = None,
    check_study: Path | None = None,
    rules: Path | None = None,
) -> dict[str, Any]:
    """Write the model folder ``out`` from the CV in ``cv_dir`` and the locator of ``locator``.

    ``check_study``: a DICOM study with an RTSTRUCT (the raw STS_001, which no
    fold trained on) scored with the finished ensemble on its full field of
    view, each series and the FS-T2 mask carried to T1, into the card.
    """
    cv = json.loads((cv_dir / "cv.json").read_text())
    folds = json.loads((cv_dir / "folds.json").read_text())
    settings = folds["recipe_settings"]
    loc = load_card(locator)
    out.mkdir(parents=True, exist_ok=True)
    weights = copy_weights(cv_dir, locator, out, folds["k"])
    fold_results = [json.loads((cv_dir / f"fold{i}.json").read_text()) for i in range(folds["k"])]
    keep = Counter(f["postprocess"]["keep_fraction"] for f in fold_results).most_common(1)[0][0]
    card: dict[str, Any] = {
        "id": model_id,
        "version": version,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "task": "tumour segmentation (soft-tissue sarcoma), MR",
        "intended_use": intended_use(),
        "clinical_use": NOT_CLINICAL,
        "input": {
            "sequences": ["T1", "T2FS"],
            "channels": 1,
            "normalisation": "tissue mean-variance (pipelines.segment.prep.normalise), "
            "on raw and N4-corrected images alike; bias-field augmentation in training",
            "orientation": "any (resampled along the image axes)",
        },
        "architecture": {
            "coarse": loc["architecture"]["coarse"],
            "fine": settings["arch"],
            "design": "coarse-to-fine: 5 mm locator, fine ensemble in a 5 cm box around it "
            "(the whole image when the locator finds nothing)",
        },
        "weights": weights,
        "ensemble": {
            "members": [f"fine_{i}" for i in range(folds["k"])],
            "tta": list(settings["tta"]),
            "combine": "mean of the sigmoid probabilities of every member and view, cut at 0.5",
        },
        "postprocess": {
            "keep_fraction": keep,
            "chosen_by": "inner validation of each CV fold (most frequent choice); "
            "0 keeps every component, 1 only the largest; holes filled",
            "by_fold": [f["postprocess"] for f in fold_results],
        },
        "quality": quality_block(cv),
        "input_checks": {
            "min_neighbour_correlation": DEFAULT_MIN_CORRELATION,
            "training_range": training_correlation(data),
            "what": "in-plane neighbour correlation over the tissue; random noise is ~0",
        },
        "training": training_block(cv, folds, fold_results, loc, data),
        "validation": validation_block(cv, cv_dir, loc) | (extra_validation or {}),
    }
    write_card(out, card)
    if check_study is not None and rules is not None:
        card["validation"]["end_to_end_case"] = end_to_end(out, check_study, rules)
        write_card(out, card)
    return card
