"""One study through segment → radiomics → score → encode: the chain, written once.

Every step takes and returns frozen values: :class:`StudySeries` (roles →
series), :class:`Volumes` (roles → images), :class:`Masks` (roles → tumour
masks, with the mask's quality), :class:`Features` (the extractions and
each card's feature row or why it has none), :class:`Scores` (each card's
result or skip record) and :class:`Encoded` (the SEG, SR and PDF files).
``sarcnode analyze`` calls the steps one after the other in one process;
the node's stages (``node/stages.py``) call the same steps one per job
stage and checkpoint between them with each value's ``to_json`` /
``from_json``, whether a local worker or a Ray worker runs them.

A step raises a :class:`pipelines.errors.BadInput` subclass when the study
itself is the problem (a geometry it cannot trust, an image that is not
anatomy, no tumour found); anything else is a bug or the machine.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
import SimpleITK as sitk

from pipelines.errors import ImplausibleImageError, MissingSeriesError, NoTumourError
from pipelines.io.dicom import SeriesRef, load_series
from pipelines.scoring.cards import Extraction, SignatureCard, card_facts, plan
from pipelines.scoring.clinical import ClinicalFactors
from pipelines.segment.card import SegModelCard

if TYPE_CHECKING:
    from pipelines.compare import Comparison
    from pipelines.encode.results import Segs
    from pipelines.preprocess import Registration
    from pipelines.segment.infer import Segmenter

#: The clinical-factor key ComBat harmonisation reads the scanner batch from.
BATCH = "batch"


@dataclass(frozen=True)
class StudySeries:
    """The series a study is processed from: role → series, and the role segmented."""

    study_instance_uid: str
    primary: str
    refs: Mapping[str, SeriesRef]

    def __post_init__(self) -> None:
        if self.primary not in self.refs:
            has = ", ".join(sorted(self.refs)) or "none"
            raise MissingSeriesError(f"no {self.primary} series in the study (it has {has})")

    def harmonisation_batch(self) -> str | None:
        """The scanner batch ComBat harmonises by: the manufacturer of the series.

        The segmented series' Manufacturer, else the first other series that
        names one (in role order); None when no series does.
        """
        roles = [self.primary, *(r for r in self.refs if r != self.primary)]
        for role in roles:
            manufacturer = self.refs[role].attributes.get("Manufacturer")
            if manufacturer:
                return str(manufacturer)
        return None


@dataclass(frozen=True)
class Volumes:
    """Role → image volume, on each series' own grid; ``primary`` is the one segmented."""

    primary: str
    images: Mapping[str, sitk.Image] = field(repr=False)

    def __post_init__(self) -> None:
        if self.primary not in self.images:
            raise MissingSeriesError(f"no {self.primary} image among {sorted(self.images)}")


def load_volumes(series: StudySeries) -> Volumes:
    """Each series as a volume.

    Raises
    ------
    pipelines.errors.GeometryError
        When a series cannot be turned into a trustworthy volume.
    """
    return Volumes(series.primary, {role: load_series(ref) for role, ref in series.refs.items()})


@dataclass(frozen=True)
class Masks:
    """Tumour masks per role, the files they were written to, and how they were made.

    ``registration_accepted`` says, per carried role, whether the rigid
    registration passed its check; ``quality`` is
    :meth:`pipelines.segment.quality.Quality.as_dict` (None for a model
    without a quality estimate).
    """

    primary: str
    model: str
    volume_ml: float
    paths: Mapping[str, Path]
    registration_accepted: Mapping[str, bool]
    device: str
    quality: Mapping[str, Any] | None
    images: Mapping[str, sitk.Image] = field(repr=False, compare=False)

    def to_json(self) -> dict[str, Any]:
        """The checkpoint: everything but the images (they are in ``paths``)."""
        return {
            "primary": self.primary,
            "model": self.model,
            "volume_ml": self.volume_ml,
            "masks": {role: str(path) for role, path in self.paths.items()},
            "registration_accepted": dict(self.registration_accepted),
            "device": self.device,
            "quality": None if self.quality is None else dict(self.quality),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any], volumes: Volumes) -> Masks:
        """Read a checkpoint back; each mask is put on its volume's grid."""
        paths = {role: Path(path) for role, path in data["masks"].items()}
        images = {}
        for role, path in paths.items():
            mask = sitk.ReadImage(str(path))
            mask.CopyInformation(volumes.images[role])
            images[role] = mask
        return cls(
            primary=str(data.get("primary") or volumes.primary),
            model=str(data["model"]),
            volume_ml=float(data["volume_ml"]),
            paths=paths,
            registration_accepted={k: bool(v) for k, v in data["registration_accepted"].items()},
            device=str(data["device"]),
            quality=data.get("quality"),  # absent in a checkpoint from before quality existed
            images=images,
        )


def register_ahead(volumes: Volumes, pool: Executor) -> dict[str, Future[Registration]]:
    """Each other role's registration onto the primary volume, submitted to ``pool``.

    A registration needs no mask, so it can run while the network segments
    (:func:`segment` takes these futures).
    """
    from pipelines.preprocess import register_rigid

    primary = volumes.images[volumes.primary]
    return {
        role: pool.submit(register_rigid, image, primary)
        for role, image in volumes.images.items()
        if role != volumes.primary
    }


def segment(
    volumes: Volumes,
    segmenter: Segmenter,
    out: Path,
    *,
    registrations: Mapping[str, Future[Registration]] | None = None,
) -> Masks:
    """Tumour mask on the primary volume, carried to the others by rigid registration.

    Masks are written as ``out/<role>_tumour.nii.gz``. ``registrations``
    (from :func:`register_ahead`) are used instead of registering here.

    Raises
    ------
    pipelines.errors.ImplausibleImageError
        When the primary image fails the model's input checks (constant, or
        noise rather than anatomy).
    pipelines.errors.NoTumourError
        When the mask is empty.
    """
    from pipelines.preprocess import carry_mask, register_rigid
    from pipelines.segment.quality import InputRejected

    primary = volumes.images[volumes.primary]
    ahead = registrations or {}
    try:
        result = segmenter.segment(primary, volumes.primary)
    except InputRejected as exc:
        raise ImplausibleImageError(f"{volumes.primary} series: {exc}") from exc
    if not sitk.GetArrayViewFromImage(result.mask).any():
        raise NoTumourError(f"no tumour found on the {volumes.primary} series")
    masks = {volumes.primary: result.mask}
    accepted: dict[str, bool] = {}
    for role, image in volumes.images.items():
        if role != volumes.primary:
            registration = ahead[role].result() if role in ahead else register_rigid(image, primary)
            masks[role] = carry_mask(result.mask, image, registration.transform)
            accepted[role] = bool(registration.accepted)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for role, mask in masks.items():
        paths[role] = out / f"{role}_tumour.nii.gz"
        sitk.WriteImage(mask, str(paths[role]), useCompression=True)
    return Masks(
        primary=volumes.primary,
        model=segmenter.model_id,
        volume_ml=round(result.volume_ml, 2),
        paths=paths,
        registration_accepted=accepted,
        device=str(segmenter.device),
        quality=result.quality.as_dict() if result.quality else None,
        images=masks,
    )


@dataclass(frozen=True)
class FeatureTable:
    """One extraction's tidy feature table on disk, and the cards it serves."""

    key: str
    params_sha256: str
    mode: str
    sequences: tuple[str, ...]
    regions: tuple[str, ...]
    cards: tuple[str, ...]
    path: Path

    @classmethod
    def of(cls, extraction: Extraction, path: Path) -> FeatureTable:
        """The table ``extraction`` was written to at ``path``."""
        return cls(
            extraction.key,
            extraction.params_sha256,
            extraction.mode,
            extraction.sequences,
            extraction.regions,
            extraction.cards,
            path,
        )

    def to_json(self) -> dict[str, Any]:
        """The description (key, parameters hash, mode, sequences, regions, cards), ``features``."""
        return {
            "key": self.key,
            "params_sha256": self.params_sha256,
            "mode": self.mode,
            "sequences": list(self.sequences),
            "regions": list(self.regions),
            "cards": list(self.cards),
            "features": str(self.path),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> FeatureTable:
        """Inverse of :meth:`to_json`."""
        return cls(
            str(data["key"]),
            str(data["params_sha256"]),
            str(data["mode"]),
            tuple(data["sequences"]),
            tuple(data["regions"]),
            tuple(data["cards"]),
            Path(data["features"]),
        )

    def row(self) -> dict[str, float]:
        """The study's features as ``<sequence>:<region>:<feature>`` -> value."""
        from pipelines.radiomics.study import wide

        table = pd.read_csv(self.path, dtype={"study": str})
        row: dict[str, float] = wide(table).iloc[0].to_dict()
        return row


@dataclass(frozen=True)
class Features:
    """The study's extractions, and for each card its facts and, when it has none, why."""

    tables: tuple[FeatureTable, ...]
    cards: tuple[Mapping[str, Any], ...]

    @property
    def skipped(self) -> dict[str, str]:
        """Card id -> why it has no features (a sequence missing, the extraction failed)."""
        return {str(c["signature"]): str(c["skipped"]) for c in self.cards if "skipped" in c}

    def rows(self) -> dict[str, dict[str, float]]:
        """Card id -> its wide feature row (read from the tables)."""
        rows: dict[str, dict[str, float]] = {}
        for table in self.tables:
            row = table.row()
            rows |= {card: row for card in table.cards}
        return rows

    def to_json(self) -> dict[str, Any]:
        """``extractions`` (each table) and ``cards`` (facts, ``skipped`` when skipped)."""
        return {
            "extractions": [t.to_json() for t in self.tables],
            "cards": [dict(c) for c in self.cards],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Features:
        """Inverse of :meth:`to_json`; a checkpoint without extractions gives none."""
        return cls(
            tuple(FeatureTable.from_json(e) for e in data.get("extractions", [])),
            tuple(data.get("cards", [])),
        )


def extract(
    signatures: Sequence[SignatureCard],
    volumes: Volumes,
    masks: Masks,
    out: Path,
    *,
    study: str,
    workers: int | None = 1,
    pool: ProcessPoolExecutor | None = None,
    prepared: Mapping[str, Future[tuple[sitk.Image, sitk.Image]]] | None = None,
) -> Features:
    """Features for each card that applies, one extraction per distinct parameter set.

    A card needing a sequence the study lacks, or whose extraction failed,
    is skipped with the reason; tables are written as
    ``out/features-<key>.csv``. ``study`` labels the tables' rows. ``pool``
    (:func:`pipelines.radiomics.extract.worker_pool`, kept warm by the
    caller) runs the work in its processes; without one, ``workers``
    processes are started for the call (1: this process). ``prepared`` holds
    sequences' mask-independent preparation already under way
    (:func:`pipelines.radiomics.study.prepare_role` submitted to ``pool``).
    The values depend on none of these.
    """
    from pipelines.scoring.study import extract_all

    extractions, skipped = plan(signatures, set(volumes.images))
    tables, failed = extract_all(
        extractions,
        volumes.images,
        masks.images,
        study=study,
        workers=workers,
        pool=pool,
        prepared=prepared,
    )
    skipped |= failed
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for extraction in extractions:
        if extraction.key in tables:
            path = out / f"features-{extraction.key}.csv"
            tables[extraction.key].to_csv(path, index=False)
            written.append(FeatureTable.of(extraction, path))
    cards = tuple(
        card_facts(s.card) | ({"skipped": skipped[s.id]} if s.id in skipped else {})
        for s in signatures
    )
    return Features(tuple(written), cards)


#: The keys the score stage's outputs held when a pipeline had one card (the first scored).
LEGACY_SCORE_KEYS = ("signature", "radscore", "risk_group", "model", "pfs_probability")


@dataclass(frozen=True)
class Scores:
    """Each card's result (:func:`pipelines.scoring.score`) or skip record, in card order."""

    results: tuple[Mapping[str, Any], ...]

    def first(self) -> dict[str, Any] | None:
        """The first card that scored: what readers of the one-card outputs get."""
        return next((dict(r) for r in self.results if "skipped" not in r), None)

    def to_json(self) -> dict[str, Any]:
        """``scores``: every result with its feature values."""
        return {"scores": [dict(r) for r in self.results]}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Scores:
        """Inverse of :meth:`to_json`."""
        return cls(tuple(data.get("scores", [])))

    def outputs(self) -> dict[str, Any]:
        """What ``jobs show`` lists: the results without feature values, the first one's keys."""
        first = self.first()
        legacy = {k: first.get(k) for k in LEGACY_SCORE_KEYS} if first else {}
        return legacy | {
            "scores": [{k: v for k, v in r.items() if k != "features"} for r in self.results]
        }


def score(
    signatures: Sequence[SignatureCard],
    features: Features,
    clinical: ClinicalFactors | None,
    series: StudySeries | None,
) -> Scores:
    """Each card's rad-score, risk group, predictions and applicability, or why not.

    The clinical factors are the nomogram's covariates; ComBat's batch is
    the study's scanner manufacturer (:meth:`StudySeries.harmonisation_batch`).
    A card that cannot score the study is skipped with the reason, never fatal.
    """
    from pipelines.scoring.study import score_all

    facts: dict[str, Any] = clinical.to_json() if clinical else {}
    batch = series.harmonisation_batch() if series else None
    if batch:
        facts[BATCH] = batch
    return Scores(tuple(score_all(signatures, features.rows(), features.skipped, facts)))


@dataclass(frozen=True)
class Encoded:
    """The DICOM objects written for the PACS: kind (``seg_<role>``, ``sr``, ``pdf``) -> file."""

    files: Mapping[str, Path]

    def to_json(self) -> dict[str, Any]:
        """``files``: kind -> path."""
        return {"files": {kind: str(path) for kind, path in self.files.items()}}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Encoded:
        """Inverse of :meth:`to_json`."""
        return cls({kind: Path(path) for kind, path in data["files"].items()})


def encode(
    out: Path,
    *,
    series: StudySeries,
    volumes: Volumes,
    masks: Masks,
    scores: Scores,
    signatures: Sequence[SignatureCard],
    model: SegModelCard,
    clinical: ClinicalFactors | None,
    job_key: str,
    uid_root: str | None = None,
    comparison: Comparison | None = None,
    segs: Segs | None = None,
    pool: Executor | None = None,
) -> Encoded:
    """A SEG per segmented series, the TID 1500 SR and the PDF report, UIDs from ``job_key``.

    ``comparison`` (the study against its prior, :mod:`pipelines.compare`)
    adds the change to the SR and the PDF. ``segs``: the SEGs made ahead by
    :func:`make_segs` (they need no scores), only written here. ``pool``
    makes the PDF while this process makes the SR (its processes warm:
    :func:`pipelines.encode.results.warm`).
    """
    from pipelines.encode.results import write_results

    written = write_results(
        out,
        series=series.refs,
        images=volumes.images,
        masks=masks.images,
        primary=masks.primary,
        segmentation_card=model,
        job_key=job_key,
        scores=scores.results,
        cards={s.id: s.card for s in signatures},
        clinical=clinical,
        uid_root=uid_root,
        quality=masks.quality,
        comparison=comparison,
        segs=segs,
        pool=pool,
    )
    return Encoded(written)


def make_segs(
    series: StudySeries, masks: Masks, model: SegModelCard, job_key: str, uid_root: str | None
) -> Segs:
    """The study's SEGs, made before the scores exist, for :func:`encode` to write."""
    from pipelines.encode.results import make_segs as make
    from pipelines.encode.seg import Algorithm

    return make(series.refs, masks.images, Algorithm(model.id, model.version), job_key, uid_root)
