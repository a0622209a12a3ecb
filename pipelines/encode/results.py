"""All DICOM results of one analysed study: SEG per segmented series, SR and PDF report.

Used by ``sarcnode analyze`` and by the node's encode stage. Files are
named by kind and sequence (``seg_T2FS.dcm``, ``seg_T1.dcm``, ``sr.dcm``,
``report_pdf.dcm``, plus the PDF itself as ``report.pdf``) so a re-run
overwrites them, and their UIDs are derived (see :mod:`pipelines.encode.uids`)
so the PACS sees the same objects again, not new ones.

Each result series has its own SeriesNumber, the same in every study so a
PACS lists them in one place after the source series: the SEGs from 9101 in
the order of their sequence names, the SR 9190, the PDF 9191. Their
SeriesDescriptions say what they hold first (a viewer's series list shows
the first 25 characters or so) and end with the clinical-use warning.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from concurrent.futures import BrokenExecutor, Executor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.dataset import Dataset

from pipelines.compare import Comparison
from pipelines.encode.document import encode_pdf
from pipelines.encode.pdf import report_pdf
from pipelines.encode.seg import (
    Algorithm,
    encode_seg,
    mask_array,
    series_description,
    source_datasets,
)
from pipelines.encode.sr import encode_sr, prior_key, scores_key, tumour_measurements
from pipelines.io.dicom import SeriesRef
from pipelines.scoring.clinical import ClinicalFactors
from pipelines.segment.card import SegModelCard

SEG_SERIES_BASE = 9100  # + 1, 2, ... per segmented sequence, by sequence name
SR_SERIES_NUMBER = 9190
PDF_SERIES_NUMBER = 9191


def warm(tables: bool = True) -> None:
    """Load what the encoders read from disk on their first use in a process.

    Nothing here depends on a study: highdicom's tables of the standard
    (JSON files it parses on first use; 0.5-0.8 s; only the SEG and the SR
    need them, and they take ~0.1 GiB: ``tables=False`` leaves them out for
    a process that only makes PDFs), and the report's fonts (matplotlib loads
    and caches each face when it first measures text). With the imports of
    this module that comes to 1.5-2 s a job worker would otherwise spend
    inside its first job's encode stage.
    """
    if tables:
        from highdicom import _standard_utils as standard  # private: missing ones are skipped

        for name in ("get_sop_class_iod_map", "get_iod_module_map", "get_module_attribute_map"):
            load = getattr(standard, name, None)
            if callable(load):
                load()
    from pipelines.encode.layout import text_width

    for weight in ("normal", "bold"):
        text_width("sarcnode", 9, weight)


def write_results(
    out: Path,
    *,
    series: Mapping[str, SeriesRef],
    images: Mapping[str, sitk.Image],
    masks: Mapping[str, sitk.Image],
    primary: str,
    segmentation_card: SegModelCard,
    job_key: str,
    scores: Sequence[Mapping[str, Any]] = (),
    cards: Mapping[str, Mapping[str, Any]] | None = None,
    clinical: ClinicalFactors | None = None,
    uid_root: str | None = None,
    quality: Mapping[str, Any] | None = None,
    comparison: Comparison | None = None,
    segs: Segs | None = None,
    pool: Executor | None = None,
) -> dict[str, Path]:
    """Write the objects under ``out``; return kind -> path (``seg_<role>``, ``sr``, ``pdf``).

    ``primary`` is the sequence the tumour was segmented on: the SR and the
    PDF describe that series; each role in ``series`` with a mask gets a SEG.
    ``segmentation_card`` names the algorithm in every object (its id and
    version; the card type refuses a card without them). ``scores`` are
    :func:`pipelines.scoring.score` results, one per card, and the skip
    records of cards that did not score (``skipped``: why); ``cards`` (by
    id) give the PDF each survival card's nomogram and training curves.
    ``quality`` is the segmentation's quality estimate
    (:meth:`pipelines.segment.quality.Quality.as_dict`): the SR and the PDF
    show its score and whether a person should review the mask.
    ``comparison`` (the study against its prior) adds the change to both.
    ``segs`` are the SEGs made ahead (:func:`make_segs`, same inputs): only
    written here; without them (or made from other inputs) they are made here.
    ``pool`` (processes that ran :func:`warm`, tables or not) makes the PDF while this
    process makes the SR; the same files as without it.
    """
    out.mkdir(parents=True, exist_ok=True)
    algorithm = Algorithm(segmentation_card.id, segmentation_card.version)
    not_clinical = "not for clinical use" in " ".join(
        str(c.get("clinical_use", "not for clinical use")).lower()
        for c in ({"clinical_use": segmentation_card.clinical_use}, *_scored(scores))
    )
    written, sources_by_role = _write_segs(
        out, series, masks, algorithm, job_key, uid_root, not_clinical, segs
    )
    if primary not in sources_by_role:
        return written
    sources = sources_by_role[primary]
    previous = pydicom.dcmread(out / "sr.dcm") if (out / "sr.dcm").is_file() else None
    pdf_args = (out, images[primary], mask_array(masks[primary], sources), sources)
    pdf_options: dict[str, Any] = {
        "role": primary,
        "algorithm": algorithm,
        "job_key": job_key,
        "scores": scores,
        "cards": cards or {},
        "clinical": clinical,
        "uid_root": uid_root,
        "not_clinical": not_clinical,
        "quality": quality,
        "comparison": comparison,
    }
    # The PDF (the longer of the two) in a pool process while this one makes the SR.
    pdf = pool.submit(_write_pdf, *pdf_args, **pdf_options) if pool is not None else None
    sr = encode_sr(
        sources,
        images[primary],
        masks[primary],
        segmentation_model=algorithm,
        job_key=job_key,
        scores=scores,
        not_for_clinical_use=not_clinical,
        series_number=SR_SERIES_NUMBER,
        uid_root=uid_root,
        previous=previous,
        quality=quality,
        comparison=comparison,
    )
    sr.save_as(out / "sr.dcm", enforce_file_format=True)
    written["sr"] = out / "sr.dcm"
    try:
        written["pdf"] = pdf.result() if pdf is not None else _write_pdf(*pdf_args, **pdf_options)
    except BrokenExecutor:  # the pool lost a process: the PDF is made here
        written["pdf"] = _write_pdf(*pdf_args, **pdf_options)
    return written


def _write_pdf(
    out: Path,
    image: sitk.Image,
    mask: np.ndarray,
    sources: list[Dataset],
    *,
    role: str,
    algorithm: Algorithm,
    job_key: str,
    scores: Sequence[Mapping[str, Any]],
    cards: Mapping[str, Mapping[str, Any]],
    clinical: ClinicalFactors | None,
    uid_root: str | None,
    not_clinical: bool,
    quality: Mapping[str, Any] | None,
    comparison: Comparison | None = None,
) -> Path:
    """The PDF report as ``report.pdf`` and as an Encapsulated PDF (``report_pdf.dcm``)."""
    models = "; ".join(
        [f"{algorithm.name} {algorithm.version}"]
        + [f"{s['signature']} {s.get('version', '')}" for s in _scored(scores)]
    )
    document = report_pdf(
        image,
        mask,
        tumour_measurements(image, mask),
        sources=sources,
        role=role,
        scores=scores,
        cards=cards,
        clinical=clinical.to_json() if clinical else None,
        models=models,
        segmentation_model=f"{algorithm.name} {algorithm.version}",
        not_for_clinical_use=not_clinical,
        quality=quality,
        comparison=comparison,
    )
    (out / "report.pdf").write_bytes(document)
    pdf = encode_pdf(
        sources,
        document,
        job_key=job_key,
        version_key=algorithm.version + scores_key(scores) + prior_key(comparison),
        series_number=PDF_SERIES_NUMBER,
        uid_root=uid_root,
        not_for_clinical_use=not_clinical,
    )
    pdf.save_as(out / "report_pdf.dcm", enforce_file_format=True)
    return out / "report_pdf.dcm"


def _scored(scores: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The results of cards that scored (not the skip records)."""
    return [s for s in scores if "skipped" not in s]


@dataclass(frozen=True)
class Segs:
    """A study's SEGs made ahead: role -> SEG and its source datasets, before they are written.

    Only the SEG's SeriesDescription waits for the scores (the clinical-use
    warning follows the cards that scored), so the SEGs can be made while the
    features are extracted and written by :func:`write_results` later.
    ``made_for`` says from what (:func:`segs_key`): ``write_results`` makes
    them again rather than write SEGs of other inputs.
    """

    made_for: tuple[str, ...]
    segs: dict[str, Dataset]
    sources: dict[str, list[Dataset]]


def segs_key(
    series: Mapping[str, SeriesRef],
    masks: Mapping[str, sitk.Image],
    algorithm: Algorithm,
    job_key: str,
    uid_root: str | None,
) -> tuple[str, ...]:
    """What a study's SEGs are made from, short of the masks' voxels (their roles, sizes)."""
    roles = [r for r in sorted(series) if r in masks]
    shapes = [f"{r}:{series[r].series_instance_uid}:{masks[r].GetSize()}" for r in roles]
    return (algorithm.name, algorithm.version, job_key, uid_root or "", *shapes)


def make_segs(
    series: Mapping[str, SeriesRef],
    masks: Mapping[str, sitk.Image],
    algorithm: Algorithm,
    job_key: str,
    uid_root: str | None = None,
) -> Segs:
    """A SEG per role in ``series`` with a mask, numbered by role name; not written yet.

    Raises
    ------
    pipelines.encode.seg.EncodeError
        A source series the SEG cannot describe (multi-frame), a mask off its grid.
    ValueError
        More segmented series than SeriesNumbers below the SR's.
    """
    segs: dict[str, Dataset] = {}
    sources_by_role = {}
    for number, role in enumerate(sorted(series), start=1):
        if role not in masks:
            continue
        if SEG_SERIES_BASE + number >= SR_SERIES_NUMBER:
            raise ValueError(f"too many segmented series for distinct SeriesNumbers: {number}")
        sources = source_datasets(series[role].files)
        sources_by_role[role] = sources
        segs[role] = encode_seg(
            sources,
            {"tumour": masks[role]},
            algorithm=algorithm,
            job_key=job_key,
            series_number=SEG_SERIES_BASE + number,
            uid_root=uid_root,
        )
    return Segs(segs_key(series, masks, algorithm, job_key, uid_root), segs, sources_by_role)


def _write_segs(
    out: Path,
    series: Mapping[str, SeriesRef],
    masks: Mapping[str, sitk.Image],
    algorithm: Algorithm,
    job_key: str,
    uid_root: str | None,
    not_clinical: bool,
    ahead: Segs | None = None,
) -> tuple[dict[str, Path], dict[str, list[Dataset]]]:
    """Each role's SEG written (``ahead``'s if made from these inputs): (kind -> path, sources)."""
    if ahead is None or ahead.made_for != segs_key(series, masks, algorithm, job_key, uid_root):
        ahead = make_segs(series, masks, algorithm, job_key, uid_root)
    written: dict[str, Path] = {}
    for role, seg in ahead.segs.items():
        source = str(ahead.sources[role][0].get("SeriesDescription") or "").strip()
        seg.SeriesDescription = series_description(
            f"Tumour SEG on {role}" + (f" ({source})" if source else ""), not_clinical
        )
        path = out / f"seg_{role}.dcm"
        seg.save_as(path, enforce_file_format=True)
        written[f"seg_{role}"] = path
    return written, ahead.sources
