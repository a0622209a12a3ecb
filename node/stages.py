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
from typing import TYPE_CHECKING, Any

import pandas as pd
import pydicom
import SimpleITK as sitk
import yaml

from pipelines.errors import BadInput as BadInput  # the family's base, raised by the stages
from pipelines.io.dicom import GeometryError, SeriesRef, load_series, series_attributes

if TYPE_CHECKING:
    from node.audit.context import AuditConfig
    from node.db.session import Database


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
    signatures: tuple[Path, ...]
    destinations: tuple[str, ...]
    database_url: str
    uid_root: str | None = None
    device: str = "auto"
    clinical: dict[str, Any] = field(default_factory=dict)
    audit: AuditConfig | None = None  # the node's audit key (no anchor: see for_worker)


def open_database(ctx: JobContext) -> Database:
    """The job's database, its audit events signed with the node's key (job workers)."""
    from node.audit.context import AuditContext
    from node.db.session import Database

    audit = AuditContext(ctx.audit.for_worker()) if ctx.audit else None
    return Database(ctx.database_url, migrate=False, audit=audit)


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


def _signatures(ctx: JobContext) -> tuple[list[Any], list[dict[str, Any]]]:
    """(the pipeline's cards that load, skip records of those that no longer do)."""
    from pipelines.scoring.cards import CardError, Signature

    loaded, broken = [], []
    for folder in ctx.signatures:
        try:
            loaded.append(Signature.load(folder))
        except CardError as exc:  # checked when the pipeline loaded; changed on disk since
            broken.append(
                {"signature": folder.name, "version": "", "endpoint": "?", "skipped": str(exc)}
            )
    return loaded, broken


def radiomics(ctx: JobContext) -> dict[str, Any]:
    """Features for each card that applies, extracted with the card's own parameter file.

    A card needing a sequence the study lacks is skipped with the reason (the
    SEG and the measurements still go out). Cards sharing parameters,
    sequences and regions share one extraction: ``features-<key>.csv``.
    """
    from pipelines.scoring.cards import card_facts, plan
    from pipelines.scoring.study import extract_all

    if not ctx.signatures:
        return {"skipped": "the pipeline has no signature", "extractions": [], "cards": []}
    out = ctx.folder / "radiomics"
    out.mkdir(parents=True, exist_ok=True)
    signatures, broken = _signatures(ctx)
    images = _images(ctx)
    masks = _masks(ctx, images)
    extractions, skipped = plan(signatures, set(images))
    tables, failed = extract_all(extractions, images, masks, study=ctx.study_instance_uid)
    skipped |= failed
    done = []
    for extraction in extractions:
        if extraction.key in tables:
            path = out / f"features-{extraction.key}.csv"
            tables[extraction.key].to_csv(path, index=False)
            done.append(extraction.as_dict() | {"features": str(path)})
    cards = [
        card_facts(s.card) | ({"skipped": skipped[s.id]} if s.id in skipped else {})
        for s in signatures
    ]
    return {"extractions": done, "cards": cards + broken}


def score(ctx: JobContext) -> dict[str, Any]:
    """Each card's rad-score, risk group, predictions and applicability; skipped cards say why.

    ``score.json`` holds every result (``scores``, in the pipeline's order,
    skipped cards with ``skipped``); the outputs repeat them without the
    feature values and, for readers of the one-card outputs, the first
    scored card's ``signature``, ``radscore``, ``risk_group``, ``model`` and
    ``pfs_probability``. A card that cannot score this study (a feature that
    could not be computed, a scanner its ComBat has not seen) is skipped with
    the reason; it never fails the job.
    """
    from pipelines.radiomics.study import wide
    from pipelines.scoring.study import first_scored, score_all

    if not ctx.signatures:
        return {"skipped": "the pipeline has no signature", "scores": []}
    manifest = ctx.folder / "radiomics" / "outputs.json"
    done = json.loads(manifest.read_text()) if manifest.is_file() else {}
    out = ctx.folder / "score"
    out.mkdir(parents=True, exist_ok=True)
    signatures, broken = _signatures(ctx)
    skipped = {c["signature"]: c["skipped"] for c in done.get("cards", []) if "skipped" in c}
    rows: dict[str, dict[str, float]] = {}
    for extraction in done.get("extractions", []):
        table = pd.read_csv(extraction["features"], dtype={"study": str})
        row = wide(table).iloc[0].to_dict()
        rows |= {card: row for card in extraction["cards"]}
    facts = dict(ctx.clinical)
    manufacturer = _series(ctx, ctx.primary).attributes.get("Manufacturer")
    if manufacturer and "batch" not in facts:
        facts["batch"] = str(manufacturer)
    results = score_all(signatures, rows, skipped, facts) + broken
    (out / "score.json").write_text(json.dumps({"scores": results}, indent=2))
    first = first_scored(results) or {}
    legacy = {k: first.get(k) for k in LEGACY_SCORE_KEYS} if first else {}
    return legacy | {"scores": [{k: v for k, v in r.items() if k != "features"} for r in results]}


# What the score stage's outputs held when a pipeline had one card (the first scored card's).
LEGACY_SCORE_KEYS = ("signature", "radscore", "risk_group", "model", "pfs_probability")


def encode(ctx: JobContext) -> dict[str, Any]:
    """SEG per series, TID 1500 SR and the PDF report, UIDs derived from the job key."""
    from pipelines.encode.results import write_results
    from pipelines.scoring.cards import CardError, Signature

    images = _images(ctx)
    masks = _masks(ctx, images)
    scores: list[dict[str, Any]] = []
    if (ctx.folder / "score" / "score.json").is_file():
        scores = json.loads((ctx.folder / "score" / "score.json").read_text()).get("scores", [])
    cards = {}
    for folder in ctx.signatures:  # for the PDF's nomogram and training curves
        try:
            signature = Signature.load(folder)
        except CardError:
            continue  # reported by the score stage
        cards[signature.id] = dict(signature.card)
    done = json.loads((ctx.folder / "segment" / "outputs.json").read_text())
    written = write_results(
        ctx.folder / "encode",
        series={role: _series(ctx, role) for role in ctx.inputs},
        images=images,
        masks=masks,
        primary=ctx.primary,
        segmentation_card=_card(ctx.segmentation_model),
        job_key=ctx.job_key,
        scores=scores,
        cards=cards,
        clinical=ctx.clinical,
        uid_root=ctx.uid_root,
        quality=done.get("quality"),  # absent in a segment stage run before quality existed
    )
    return {"files": {k: str(v) for k, v in written.items()}}


def deliver(ctx: JobContext) -> dict[str, Any]:
    """Queue the encoded objects for the destinations (the outbox sends them, once)."""
    from node.delivery import enqueue

    done = json.loads((ctx.folder / "encode" / "outputs.json").read_text())
    files = [Path(p) for p in done["files"].values()]
    db = open_database(ctx)
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
