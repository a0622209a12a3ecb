"""The job stages: the one seam through which the node calls ``pipelines/``.

Each stage reads what earlier stages wrote in the job folder, writes its own
outputs under ``<job folder>/<stage>/`` and returns a JSON-able summary.
They hold no service state, so the same functions run in a local worker
process or on a Ray worker. A stage raises :class:`BadInput` when the study
itself is the problem (no retry helps); anything else is treated as
transient by the runner.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import pandas as pd
import pydicom
import SimpleITK as sitk
import yaml

from pipelines.io.dicom import GeometryError, SeriesRef, load_series, series_attributes


class BadInput(ValueError):
    """The study cannot be processed as it is (the message says why); retrying will not help."""


@dataclass(frozen=True)
class JobContext:
    """Everything a stage needs, picklable (sent to worker processes)."""

    job_id: int
    job_key: str
    folder: Path
    study_instance_uid: str
    inputs: dict[str, str]  # role -> series UID
    files: dict[str, list[Path]]  # role -> instance files
    primary: str  # the role segmented (the pipeline's first required role)
    segmentation_model: Path
    signature: Path | None
    destinations: tuple[str, ...]
    database_url: str
    uid_root: str | None = None
    device: str = "auto"
    clinical: dict[str, Any] = field(default_factory=dict)


def _series(ctx: JobContext, role: str) -> SeriesRef:
    files = sorted(ctx.files[role])
    ds = pydicom.dcmread(files[0], stop_before_pixels=True)
    attrs = series_attributes(ds)
    return SeriesRef(ctx.study_instance_uid, ctx.inputs[role], tuple(files), ds.SOPClassUID, attrs)


def _images(ctx: JobContext) -> dict[str, sitk.Image]:
    images = {}
    for role in ctx.inputs:
        try:
            images[role] = load_series(_series(ctx, role))
        except GeometryError as exc:
            raise BadInput(str(exc)) from exc
    return images


@cache
def _segmenter(model: Path, device: str) -> Any:
    from pipelines.segment.infer import Segmenter

    return Segmenter(model, device)


def _card(folder: Path) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((folder / "card.yaml").read_text())
    return data


def segment(ctx: JobContext) -> dict[str, Any]:
    """Tumour mask on the primary series; carried to the other roles by rigid registration.

    The outputs carry the mask's quality estimate (``quality``: agreement
    score, ``review`` flag and its reasons; None for a model card without
    one). A mask flagged for review is still encoded and delivered: the flag
    travels with it, in the SR, the PDF and ``jobs show``.

    Raises
    ------
    BadInput
        When the primary image fails the model's input checks (constant, or
        noise rather than anatomy), or no tumour is found.
    """
    from pipelines.preprocess import carry_mask, register_rigid
    from pipelines.segment.quality import InputRejected

    out = ctx.folder / "segment"
    out.mkdir(parents=True, exist_ok=True)
    images = _images(ctx)
    segmenter = _segmenter(ctx.segmentation_model, ctx.device)
    try:
        result = segmenter.segment(images[ctx.primary])
    except InputRejected as exc:
        raise BadInput(f"{ctx.primary} series: {exc}") from exc
    if not sitk.GetArrayViewFromImage(result.mask).any():
        raise BadInput(f"no tumour found on the {ctx.primary} series")
    masks = {ctx.primary: result.mask}
    accepted: dict[str, bool] = {}
    for role, image in images.items():
        if role != ctx.primary:
            registration = register_rigid(image, images[ctx.primary])
            masks[role] = carry_mask(result.mask, image, registration.transform)
            accepted[role] = registration.accepted
    paths = {}
    for role, mask in masks.items():
        path = out / f"{role}_tumour.nii.gz"
        sitk.WriteImage(mask, str(path), useCompression=True)
        paths[role] = str(path)
    return {
        "model": segmenter.model_id,
        "volume_ml": round(result.volume_ml, 2),
        "masks": paths,
        "registration_accepted": accepted,
        "device": str(segmenter.device),
        "quality": result.quality.as_dict() if result.quality else None,
    }


def _masks(ctx: JobContext, images: Mapping[str, sitk.Image]) -> dict[str, sitk.Image]:
    done = json.loads((ctx.folder / "segment" / "outputs.json").read_text())
    masks = {}
    for role, path in done["masks"].items():
        mask = sitk.ReadImage(path)
        mask.CopyInformation(images[role])
        masks[role] = mask
    return masks


def radiomics(ctx: JobContext) -> dict[str, Any]:
    """The signature's sequences and regions, extracted with its own parameter file."""
    from pipelines.radiomics.extract import load_params
    from pipelines.radiomics.study import study_features

    if ctx.signature is None:
        return {"skipped": "the pipeline has no signature"}
    out = ctx.folder / "radiomics"
    out.mkdir(parents=True, exist_ok=True)
    card = _card(ctx.signature)
    params = load_params(ctx.signature / card["extraction"]["params_file"])
    images = _images(ctx)
    masks = _masks(ctx, images)
    wanted = [r for r in card.get("sequences") or images if r in images]
    missing = [r for r in card.get("sequences") or [] if r not in images]
    if missing:  # the SEG and the measurements still go out; the score cannot
        return {"skipped": f"signature {card['id']} needs {', '.join(missing)}: not in the study"}
    table = study_features(
        {r: images[r] for r in wanted},
        {r: masks[r] for r in wanted},
        params,
        study=ctx.study_instance_uid,
        workers=1,
        regions_wanted=tuple(card.get("regions") or ("tumour",)),
    )
    table.to_csv(out / "features.csv", index=False)
    return {"features": str(out / "features.csv"), "rows": len(table)}


def score(ctx: JobContext) -> dict[str, Any]:
    """Rad-score, risk group, predictions (nomogram when clinical factors are known)."""
    from pipelines.radiomics.extract import load_params, params_hash
    from pipelines.radiomics.study import wide
    from pipelines.scoring import score as score_card

    if ctx.signature is None:
        return {"skipped": "the pipeline has no signature"}
    if not (ctx.folder / "radiomics" / "features.csv").is_file():
        return {"skipped": "no radiomics features (see the radiomics stage)"}
    out = ctx.folder / "score"
    out.mkdir(parents=True, exist_ok=True)
    card = _card(ctx.signature)
    params = load_params(ctx.signature / card["extraction"]["params_file"])
    table = pd.read_csv(ctx.folder / "radiomics" / "features.csv", dtype={"study": str})
    row = wide(table).iloc[0].to_dict()
    facts = dict(ctx.clinical)
    manufacturer = _series(ctx, ctx.primary).attributes.get("Manufacturer")
    if manufacturer and "batch" not in facts:
        facts["batch"] = str(manufacturer)
    result = score_card(card, row, facts, params_sha256=params_hash(params))
    (out / "score.json").write_text(json.dumps(result, indent=2))
    (out / "features.json").write_text(json.dumps(row))
    return {k: result[k] for k in ("signature", "radscore", "risk_group") if k in result} | {
        "model": result.get("model"),
        "pfs_probability": result.get("pfs_probability"),
    }


def encode(ctx: JobContext) -> dict[str, Any]:
    """SEG per series, TID 1500 SR and the PDF report, UIDs derived from the job key."""
    from pipelines.encode.results import write_results

    images = _images(ctx)
    masks = _masks(ctx, images)
    result = card = features = None
    if (ctx.folder / "score" / "score.json").is_file():
        result = json.loads((ctx.folder / "score" / "score.json").read_text())
        features = json.loads((ctx.folder / "score" / "features.json").read_text())
        card = _card(ctx.signature) if ctx.signature else None
    done = json.loads((ctx.folder / "segment" / "outputs.json").read_text())
    written = write_results(
        ctx.folder / "encode",
        series={role: _series(ctx, role) for role in ctx.inputs},
        images=images,
        masks=masks,
        primary=ctx.primary,
        segmentation_card=_card(ctx.segmentation_model),
        job_key=ctx.job_key,
        score=result,
        signature_card=card,
        features=features,
        clinical=ctx.clinical,
        uid_root=ctx.uid_root,
        quality=done.get("quality"),  # absent in a segment stage run before quality existed
    )
    return {"files": {k: str(v) for k, v in written.items()}}


def deliver(ctx: JobContext) -> dict[str, Any]:
    """Queue the encoded objects for the destinations (the outbox sends them, once)."""
    from node.db.session import Database
    from node.delivery import enqueue

    done = json.loads((ctx.folder / "encode" / "outputs.json").read_text())
    files = [Path(p) for p in done["files"].values()]
    db = Database(ctx.database_url, migrate=False)
    try:
        created = enqueue(db, files, list(ctx.destinations), job_id=ctx.job_id)
    finally:
        db.dispose()
    return {"queued": len(created), "destinations": list(ctx.destinations)}


STAGE_FUNCTIONS: dict[str, Callable[[JobContext], dict[str, Any]]] = {
    "segment": segment,
    "radiomics": radiomics,
    "score": score,
    "encode": encode,
    "deliver": deliver,
}
GPU_STAGES = frozenset({"segment"})
