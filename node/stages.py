"""The job stages: the node's checkpointing adapter over :mod:`pipelines.chain`.

The chain (series → volumes → masks → features → scores → encoded objects)
is written once, in ``pipelines/``; each stage here runs one step of it
for a job, reading the earlier steps' typed outputs back from their
checkpoints (``<job folder>/<stage>/outputs.json``, each value's
``from_json``) and returning its own as ``to_json`` for the runner to
write. Each series' header is read and its volume decoded once per job,
by the first stage that needs it, and cached under ``<job folder>/inputs/``
for the later ones. A local job worker keeps a warm extraction pool over
the cores (:func:`radiomics_pool`) and its segmentation models across jobs;
otherwise the stages hold no service state, so the same functions run in a
local worker process or on a Ray worker. A stage raises a
:class:`pipelines.errors.BadInput` subclass when the study itself is the
problem (no retry helps); anything else is an internal error for the
runner's retry policy.
"""

from __future__ import annotations

import io
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.uid import UID

from pipelines import chain
from pipelines.errors import BadInput as BadInput  # the family's base, raised by the stages
from pipelines.errors import MissingSeriesError
from pipelines.io.dicom import SeriesRef, series_attributes
from pipelines.scoring.cards import SignatureCard
from pipelines.scoring.clinical import ClinicalFactors

if TYPE_CHECKING:
    from node.audit.context import AuditConfig
    from node.db.session import Database
    from node.priors import PriorPlan
    from pipelines.compare import Comparison
    from pipelines.encode.results import Segs
    from pipelines.segment.infer import Segmenter

log = logging.getLogger("node.jobs")


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
    radiomics_workers: int = 1  # the warm extraction pool's processes (1: the job's own process)
    clinical: Mapping[str, Any] = field(default_factory=dict)  # stored factors (covariates)
    audit: AuditConfig | None = None  # the node's audit key (no anchor: see for_worker)
    priors: PriorPlan | None = None  # where the compare stage looks for a prior (None: nowhere)

    def factors(self) -> ClinicalFactors:
        """The study's clinical factors, as ``sarcnode clinical set`` stored them."""
        return ClinicalFactors.from_json(self.clinical)


def open_database(ctx: JobContext) -> Database:
    """The job's database, its audit events signed with the node's key (job workers)."""
    from node.audit.context import AuditContext
    from node.db.session import Database

    audit = AuditContext(ctx.audit.for_worker()) if ctx.audit else None
    return Database(ctx.database_url, migrate=False, audit=audit)


#: The job folder's cache of its inputs: each series' header read once (``series.json``)
#: and its volume decoded once (``<role>.npy`` and ``volumes.json``), for every stage.
INPUTS = "inputs"


def _write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.part")
    temp.write_bytes(data)
    temp.replace(path)


def _series(ctx: JobContext) -> chain.StudySeries:
    """The job's series by role, the primary one segmented; headers from the job's cache.

    The first stage to ask reads each series' first header and writes
    ``inputs/series.json``; the later ones read that (it is rebuilt when the
    job's files differ from the ones it names).

    Raises
    ------
    MissingSeriesError
        When a role of the job has no instance files.
    """
    files = {role: sorted(ctx.files.get(role) or []) for role in ctx.inputs}
    for role, uid in ctx.inputs.items():
        if not files[role]:
            raise MissingSeriesError(f"series {uid} ({role}) has no instance files")
    path = ctx.folder / INPUTS / "series.json"
    named = {role: [str(f) for f in paths] for role, paths in files.items()}
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):
        cached = {}
    if cached.get("inputs") != ctx.inputs or cached.get("files") != named:
        heads = {role: pydicom.dcmread(files[role][0], stop_before_pixels=True) for role in files}
        cached = {
            "inputs": ctx.inputs,
            "files": named,
            "sop_class_uid": {role: str(ds.SOPClassUID) for role, ds in heads.items()},
            "attributes": {role: series_attributes(ds) for role, ds in heads.items()},
        }
        _write_atomic(path, json.dumps(cached).encode())
    refs = {
        role: SeriesRef(
            ctx.study_instance_uid,
            uid,
            tuple(files[role]),
            UID(cached["sop_class_uid"][role]),
            cached["attributes"][role],
        )
        for role, uid in ctx.inputs.items()
    }
    return chain.StudySeries(ctx.study_instance_uid, ctx.primary, refs)


def _volumes(ctx: JobContext, series: chain.StudySeries) -> chain.Volumes:
    """Each series' volume, decoded once per job: read from the job's cache when there.

    The voxels are kept as ``inputs/<role>.npy`` and the geometry in
    ``inputs/volumes.json`` (exact floats), so a later stage gets the very
    image :func:`pipelines.chain.load_volumes` gave the first one.
    """
    folder = ctx.folder / INPUTS
    try:
        geometry = json.loads((folder / "volumes.json").read_text())
        images = {}
        for role in series.refs:
            image = sitk.GetImageFromArray(np.load(folder / f"{role}.npy"))
            image.SetSpacing(geometry[role]["spacing"])
            image.SetOrigin(geometry[role]["origin"])
            image.SetDirection(geometry[role]["direction"])
            images[role] = image
        return chain.Volumes(series.primary, images)
    except (OSError, ValueError, KeyError):
        pass  # not cached yet (or cut short): decode, then cache
    volumes = chain.load_volumes(series)
    geometry = {}
    for role, image in volumes.images.items():
        buffer = io.BytesIO()
        np.save(buffer, sitk.GetArrayViewFromImage(image))
        _write_atomic(folder / f"{role}.npy", buffer.getvalue())
        geometry[role] = {
            "spacing": list(image.GetSpacing()),
            "origin": list(image.GetOrigin()),
            "direction": list(image.GetDirection()),
        }
    _write_atomic(folder / "volumes.json", json.dumps(geometry).encode())
    return volumes


def drop_volumes(ctx: JobContext) -> None:
    """Remove the job's decoded volumes (a finished job keeps only its results and headers)."""
    for path in (ctx.folder / INPUTS).glob("*.npy"):
        path.unlink(missing_ok=True)
    (ctx.folder / INPUTS / "volumes.json").unlink(missing_ok=True)


def _checkpoint(ctx: JobContext, stage: str) -> dict[str, Any]:
    """What ``stage`` returned (its ``outputs.json``), for a later stage to read back."""
    data: dict[str, Any] = json.loads((ctx.folder / stage / "outputs.json").read_text())
    return data


@cache
def _segmenter(model: Path, device: str) -> Segmenter:
    from pipelines.segment.infer import Segmenter

    return Segmenter(model, device)


def segment(ctx: JobContext) -> dict[str, Any]:
    """Tumour mask on the primary series; carried to the other roles by rigid registration.

    Outputs: :meth:`pipelines.chain.Masks.to_json` (model, volume, mask files,
    registration check per carried role, device, and ``quality``: agreement
    score, ``review`` flag and its reasons; None for a model card without
    one). A mask flagged for review is still encoded and delivered: the flag
    travels with it, in the SR, the PDF and ``jobs show``.

    Raises
    ------
    BadInput
        A series' geometry cannot be trusted, the primary image fails the
        model's input checks (constant, or noise rather than anatomy), or no
        tumour is found.
    """
    volumes = _volumes(ctx, _series(ctx))
    segmenter = _segmenter(ctx.segmentation_model, ctx.device)
    _AHEAD.clear()  # one job at a time in a worker: no other job's is still wanted
    pool = radiomics_pool(ctx.radiomics_workers)
    registrations = None
    # On a GPU the network leaves the CPUs idle: the registrations and the radiomics
    # stage's N4 corrections run in the pool meanwhile. On CPU the network fills the
    # cores, and running them alongside it was slower (bench/README.md, e2e).
    if pool is not None and segmenter.device.type != "cpu":
        registrations = chain.register_ahead(volumes, pool)
        _AHEAD[ctx.folder] = _prepare_ahead(ctx, volumes, pool)  # queued behind those
    out = ctx.folder / "segment"
    return chain.segment(volumes, segmenter, out, registrations=registrations).to_json()


#: The radiomics stage's mask-independent preparation, started by the segment stage of the
#: job (its folder) this worker runs: role -> future of (body mask, N4-corrected image).
_AHEAD: dict[Path, dict[str, Future[tuple[sitk.Image, sitk.Image]]]] = {}


def _prepare_ahead(
    ctx: JobContext, volumes: chain.Volumes, pool: ProcessPoolExecutor
) -> dict[str, Future[tuple[sitk.Image, sitk.Image]]]:
    """Submit each extracted sequence's outline and N4 correction, which need no mask.

    They run in the pool while the network segments on a GPU; the radiomics
    stage of the same job in this process takes the results
    (:func:`pipelines.radiomics.study.prepare_roles`, same values).
    """
    from pipelines.radiomics.study import prepare_role
    from pipelines.scoring.cards import plan

    signatures, _ = _signatures(ctx)
    extractions, _ = plan(signatures, set(volumes.images))
    roles = [r for r in volumes.images if any(r in e.sequences for e in extractions)]
    return {role: pool.submit(prepare_role, volumes.images[role]) for role in roles}


def _signatures(ctx: JobContext) -> tuple[list[SignatureCard], list[dict[str, Any]]]:
    """(the pipeline's cards that load, skip records of those that no longer do)."""
    from pipelines.scoring.cards import CardError

    loaded, broken = [], []
    for folder in ctx.signatures:
        try:
            loaded.append(SignatureCard.from_folder(folder))
        except CardError as exc:  # checked when the pipeline loaded; changed on disk since
            broken.append(
                {"signature": folder.name, "version": "", "endpoint": "?", "skipped": str(exc)}
            )
    return loaded, broken


NO_SIGNATURE = "the pipeline has no signature"


def radiomics(ctx: JobContext) -> dict[str, Any]:
    """Features for each card that applies, extracted with the card's own parameter file.

    A card needing a sequence the study lacks is skipped with the reason (the
    SEG and the measurements still go out). Cards sharing parameters,
    sequences and regions share one extraction: ``features-<key>.csv``.
    Outputs: :meth:`pipelines.chain.Features.to_json`.
    """
    if not ctx.signatures:
        return {"skipped": NO_SIGNATURE, "extractions": [], "cards": []}
    signatures, broken = _signatures(ctx)
    series = _series(ctx)
    volumes = _volumes(ctx, series)
    masks = chain.Masks.from_json(_checkpoint(ctx, "segment"), volumes)
    _segs_ahead(ctx, series, masks)
    pool = radiomics_pool(ctx.radiomics_workers)
    try:
        features = chain.extract(
            signatures,
            volumes,
            masks,
            ctx.folder / "radiomics",
            study=ctx.study_instance_uid,
            pool=pool,
            prepared=_AHEAD.pop(ctx.folder, None) if pool is not None else None,
        )
    except BrokenProcessPool:  # a worker died (memory?): the next attempt starts a new pool
        _POOLS.pop(ctx.radiomics_workers, None)
        raise
    return chain.Features(features.tables, features.cards + tuple(broken)).to_json()


#: The SEGs of the job (its folder) whose radiomics stage this worker runs, being made in
#: :func:`_seg_thread` meanwhile for its encode stage (one job at a time in a worker).
_SEGS: dict[Path, Future[Segs]] = {}
_SEG_THREADS: dict[int, ThreadPoolExecutor] = {}  # by process id


def _seg_thread() -> ThreadPoolExecutor:
    """The SEGs' thread of this process (made anew in a forked child: the parent's is not there)."""
    pid = os.getpid()
    if pid not in _SEG_THREADS:
        _SEG_THREADS.clear()
        _SEGS.clear()  # a parent's futures would never complete here
        _SEG_THREADS[pid] = ThreadPoolExecutor(max_workers=1, thread_name_prefix="segs-ahead")
    return _SEG_THREADS[pid]


def _segs_ahead(ctx: JobContext, series: chain.StudySeries, masks: chain.Masks) -> None:
    """Start making the job's SEGs in a thread, for the encode stage to write.

    The SEGs need only the masks and the source images, not the scores: made
    while the features are extracted (the cores are not all busy then), they
    leave the SR and the PDF to the encode stage. A job whose encode stage
    runs elsewhere (a restart, another worker) makes them there, as before.
    """
    from pipelines.segment.card import SegModelCard

    def make() -> Segs:
        model = SegModelCard.from_folder(ctx.segmentation_model)  # checks the weights: 0.1 s
        return chain.make_segs(series, masks, model, ctx.job_key, ctx.uid_root)

    thread = _seg_thread()
    _SEGS.clear()
    _SEGS[ctx.folder] = thread.submit(make)


def _segs_made(ctx: JobContext) -> Segs | None:
    """The job's SEGs made during its radiomics stage in this worker, if they were made."""
    future = _SEGS.pop(ctx.folder, None)
    if future is None or os.getpid() not in _SEG_THREADS:  # none, or a parent's (forked)
        return None
    try:
        return future.result()
    except Exception:  # the encode stage makes them again, and raises what it raises
        log.warning("job %d: the SEGs made ahead failed; made again", ctx.job_id, exc_info=True)
        return None


#: This process's warm extraction pools by size (a job worker keeps its pool across jobs).
_POOLS: dict[int, ProcessPoolExecutor] = {}


def radiomics_pool(workers: int) -> ProcessPoolExecutor | None:
    """The warm extraction pool of ``workers`` processes in this process; None for one.

    Started on first use (or by :func:`warm_up`) and kept: the next job's
    radiomics stage finds PyRadiomics imported and its processes running,
    and its encode stage the encoders loaded (the PDF is made in the pool).
    """
    if workers <= 1:
        return None
    if workers not in _POOLS:
        from pipelines.radiomics.extract import worker_pool

        _POOLS[workers] = worker_pool(workers, also=_warm_report)  # encode makes its PDF there
    return _POOLS[workers]


@dataclass(frozen=True)
class Warm:
    """What a job worker loads before its first job."""

    radiomics_workers: int
    models: tuple[tuple[Path, str], ...]  # (segmentation model folder, device)


def warm_up(warm: Warm) -> None:
    """Load the segmentation models, start the extraction pool's processes, load the encoders.

    The first stage needs the models, so they come first; the pool's
    processes import PyRadiomics while that stage runs (this returns without
    waiting for them), and this process loads the encode stage's libraries
    meanwhile. A job then finds all ready instead of paying for them on its
    clock. Each part logs when it is ready.
    """
    began = time.monotonic()
    for model, device in warm.models:
        _segmenter(model, device)
    log.info(
        "job worker %d: %d model(s) loaded in %.1f s",
        os.getpid(),
        len(warm.models),
        time.monotonic() - began,
    )
    pool = radiomics_pool(warm.radiomics_workers)
    started = [pool.submit(os.getpid) for _ in range(warm.radiomics_workers)] if pool else []
    _warm_encoders()  # while the pool's processes import PyRadiomics
    if not started:
        return
    pid = os.getpid()

    def ready() -> None:
        wait(started)
        seconds = time.monotonic() - began
        log.info("job worker %d: extraction pool of %d warm in %.1f s", pid, len(started), seconds)

    threading.Thread(target=ready, name="pool-warm", daemon=True).start()


def _warm_encoders(tables: bool = True) -> None:
    """Load the encode stage's libraries and tables now, not in the first job's encode stage.

    Measured on STS_001 (2026-12-03, 2-core VM): a job worker's first encode
    took 2.7 s against 1.6-1.9 s once warm (:func:`pipelines.encode.results.warm`).
    A failure is logged and left to the first job.
    """
    began = time.monotonic()
    try:
        from pipelines.encode.results import warm

        warm(tables)
    except Exception:
        log.exception("job worker %d: encoders not warmed: the first job loads them", os.getpid())
        return
    log.info("job worker %d: encoders loaded in %.1f s", os.getpid(), time.monotonic() - began)


def _warm_report() -> None:
    """What a pool process needs to make PDFs (not highdicom's tables: +0.14 GiB RSS each)."""
    _warm_encoders(tables=False)


def score(ctx: JobContext) -> dict[str, Any]:
    """Each card's rad-score, risk group, predictions and applicability; skipped cards say why.

    ``score.json`` holds every result (:meth:`pipelines.chain.Scores.to_json`:
    ``scores``, in the pipeline's order, skipped cards with ``skipped``);
    the outputs are :meth:`pipelines.chain.Scores.outputs` (the results
    without feature values, and the first scored card's ``signature``,
    ``radscore``, ``risk_group``, ``model`` and ``pfs_probability``). A card
    that cannot score this study (a feature that could not be computed, a
    scanner its ComBat has not seen) is skipped with the reason; it never
    fails the job.
    """
    if not ctx.signatures:
        return {"skipped": NO_SIGNATURE, "scores": []}
    manifest = ctx.folder / "radiomics" / "outputs.json"
    features = chain.Features.from_json(_checkpoint(ctx, "radiomics") if manifest.is_file() else {})
    signatures, broken = _signatures(ctx)
    scores = chain.score(signatures, features, ctx.factors(), _series(ctx))
    scores = chain.Scores(scores.results + tuple(broken))
    out = ctx.folder / "score"
    out.mkdir(parents=True, exist_ok=True)
    (out / "score.json").write_text(json.dumps(scores.to_json(), indent=2))
    return scores.outputs()


def compare(ctx: JobContext) -> dict[str, Any]:
    """The patient's prior study from the PACS, analysed or reused, compared with this one.

    Never fails the job: no prior, a PACS that refuses and a prior that cannot
    be segmented each end the stage with the reason (:mod:`node.priors`).
    Outputs: ``status`` (compared, no prior, no comparison), ``reason``, the
    earlier studies ``found`` and, when compared, the ``headline`` and figures;
    ``compare/comparison.json`` holds :class:`pipelines.compare.Comparison`.
    """
    from node.priors import compare_stage

    db = open_database(ctx)
    try:
        return compare_stage(ctx, db)
    finally:
        db.dispose()


def _comparison(ctx: JobContext) -> Comparison | None:
    """The compare stage's comparison, when it made one."""
    from pipelines.compare import Comparison

    path = ctx.folder / "compare" / "comparison.json"
    return Comparison.from_json(json.loads(path.read_text())) if path.is_file() else None


def encode(ctx: JobContext) -> dict[str, Any]:
    """SEG per series, TID 1500 SR and the PDF report, UIDs derived from the job key.

    The SEGs made during the radiomics stage in this worker are written as
    they are; the PDF is made in the warm pool while this process makes the SR.

    Outputs: :meth:`pipelines.chain.Encoded.to_json`.
    """
    from pipelines.segment.card import SegModelCard

    series = _series(ctx)
    volumes = _volumes(ctx, series)
    scored = ctx.folder / "score" / "score.json"
    scores = chain.Scores.from_json(json.loads(scored.read_text()) if scored.is_file() else {})
    signatures, _ = _signatures(ctx)  # a card that no longer loads is reported by score
    return chain.encode(
        ctx.folder / "encode",
        series=series,
        volumes=volumes,
        masks=chain.Masks.from_json(_checkpoint(ctx, "segment"), volumes),
        scores=scores,
        signatures=signatures,
        model=SegModelCard.from_folder(ctx.segmentation_model),
        clinical=ctx.factors(),
        job_key=ctx.job_key,
        uid_root=ctx.uid_root,
        comparison=_comparison(ctx),
        segs=_segs_made(ctx),
        pool=radiomics_pool(ctx.radiomics_workers),
    ).to_json()


def deliver(ctx: JobContext) -> dict[str, Any]:
    """Queue the encoded objects for the destinations (the outbox sends them, once)."""
    from node.delivery import enqueue

    files = list(chain.Encoded.from_json(_checkpoint(ctx, "encode")).files.values())
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
    "compare": compare,
    "encode": encode,
    "deliver": deliver,
}
# compare segments the prior when the node has not analysed it: it holds the GPU lock too.
GPU_STAGES = frozenset({"segment", "compare"})
