"""One study from files to scores: segment, extract, score — what ``sarcnode analyze`` runs.

The steps are :mod:`pipelines.chain`'s, which the node's jobs run as
separate, resumable stages (``node/stages.py``); this is the
single-process path for a researcher or an admin checking a study.
Every card given scores the study when the study has its sequences; the
others are reported as skipped, with the reason. Outputs in OUT:
``<role>_tumour.nii.gz`` per sequence, ``features-<key>.csv`` (tidy) per
extraction (cards sharing parameters, sequences and regions share one),
``score.json`` and ``summary.txt``, each saying "not for clinical use" when
the models do; for a DICOM study also ``dicom/`` with a SEG per segmented
series, the TID 1500 SR and the Encapsulated PDF report
(:mod:`pipelines.encode.results`), ready for ``sarcnode deliver``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipelines import chain
from pipelines.io.dicom import load_image
from pipelines.io.roles import RoleRules
from pipelines.scoring.cards import SignatureCard
from pipelines.scoring.clinical import ClinicalFactors
from pipelines.scoring.text import score_lines
from pipelines.segment.card import SegModelCard
from pipelines.segment.infer import Segmenter
from pipelines.segment.study import ROLES, is_volume_file, study_roles

#: The sequence segmented (the mask is carried to the others).
PRIMARY = "T2FS"


def study_series(path: Path, rules: RoleRules, sequence: str = PRIMARY) -> chain.StudySeries:
    """The roles of the (single) study under ``path``: ``sequence`` segmented, T1/T2FS carried.

    A lone series of no known role is segmented as it is (role ``unknown``).

    Raises
    ------
    pipelines.segment.study.InputError
        When ``path`` is no folder, or holds several studies, or no series to segment.
    """
    role, chosen = study_roles(path, rules, sequence)
    refs = {role: chosen[role]} | {r: chosen[r] for r in ROLES if r != role and r in chosen}
    return chain.StudySeries(chosen[role].study_instance_uid, role, refs)


def analyze_study(
    study: Path,
    out: Path,
    *,
    segmenter: Segmenter,
    signatures: Sequence[SignatureCard],
    rules: RoleRules,
    clinical: ClinicalFactors | None = None,
    workers: int | None = None,
    uid_root: str | None = None,
) -> dict[str, Any]:
    """Run the chain (:mod:`pipelines.chain`) on ``study``, write its outputs under ``out``.

    Returns the report: ``scores`` hold every card's result or skip record,
    in the order given; ``score`` is the first card that scored (what the
    one-card report held), None when none did.

    Raises
    ------
    pipelines.errors.BadInput
        A geometry the node cannot trust, an image that is not anatomy, no tumour.
    pipelines.segment.study.InputError
        When ``study`` is not a study, series or volume the chain can take.
    """
    out.mkdir(parents=True, exist_ok=True)
    if is_volume_file(study):  # research input: a volume, no series to encode against
        series = None
        volumes = chain.Volumes(PRIMARY, {PRIMARY: load_image(study)})
    else:
        series = study_series(study, rules)
        volumes = chain.load_volumes(series)
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    masks = chain.segment(volumes, segmenter, out)
    seconds["segment"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    features = chain.extract(signatures, volumes, masks, out, study=study.name, workers=workers)
    seconds["radiomics"] = time.perf_counter() - t1
    scores = chain.score(signatures, features, clinical, series)
    encoded = None
    if series is not None:  # DICOM input: the objects a PACS receives
        t2 = time.perf_counter()
        encoded = chain.encode(
            out / "dicom",
            series=series,
            volumes=volumes,
            masks=masks,
            scores=scores,
            signatures=signatures,
            model=SegModelCard.from_checked(segmenter.card, segmenter.model_dir),
            clinical=clinical,
            job_key=f"analyze:{study.name}",
            uid_root=uid_root,
        )
        seconds["encode"] = time.perf_counter() - t2
    report = _report(study, masks, features, scores, encoded, seconds)
    (out / "score.json").write_text(json.dumps(report, indent=2))
    (out / "summary.txt").write_text(summary(report))
    return report


def _report(
    study: Path,
    masks: chain.Masks,
    features: chain.Features,
    scores: chain.Scores,
    encoded: chain.Encoded | None,
    seconds: dict[str, float],
) -> dict[str, Any]:
    """The JSON report ``analyze`` prints and writes as ``score.json``."""
    return {
        "study": study.name,
        "segmentation": {
            "model": masks.model,
            "sequence": masks.primary,
            "volume_ml": masks.volume_ml,
            "masks": {role: str(path) for role, path in masks.paths.items()},
            "registration_accepted": dict(masks.registration_accepted),
            "quality": masks.quality,
        },
        "extractions": features.to_json()["extractions"],
        "scores": scores.to_json()["scores"],
        "score": scores.first(),
        "dicom": encoded.to_json()["files"] if encoded else {},
        "seconds": {k: round(v, 2) for k, v in seconds.items()},
        "clinical_use": "not for clinical use",
    }


def summary(report: dict[str, Any]) -> str:
    """Lines a person reads: tumour, mask quality, each card's score or why none, warning."""
    seg = report["segmentation"]
    lines = [
        f"Study {report['study']}: tumour {seg['volume_ml']} ml segmented on {seg['sequence']} "
        f"({seg['model']}).",
    ]
    quality = seg.get("quality")
    if quality and quality.get("review"):
        reasons = "; ".join(quality.get("reasons") or []) or "no reason recorded"
        lines.append(f"Segmentation flagged for review: {reasons}.")
    elif quality and quality.get("score") is not None:
        lines.append(
            f"Segmentation quality {quality['score']:.2f} (agreement of ensemble views, "
            f"review below {quality['threshold']:.2f}): no review needed."
        )
    scores = report.get("scores")
    if scores is None:  # a report from before several cards
        scores = [report["score"]] if report.get("score") else []
    for result in scores:
        lines += score_lines(result)
    if report.get("dicom"):
        lines.append("DICOM results: " + ", ".join(sorted(report["dicom"].values())))
    lines.append(
        "NOT FOR CLINICAL USE: research models; the synthetic-cohort card is the plumbing demo."
    )
    return "\n".join(lines) + "\n"
