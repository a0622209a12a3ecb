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
from pathlib import Path
from typing import Any

import pydicom
import SimpleITK as sitk

from pipelines.encode.pdf import encode_pdf, report_pdf
from pipelines.encode.seg import (
    Algorithm,
    encode_seg,
    mask_array,
    series_description,
    source_datasets,
)
from pipelines.encode.sr import encode_sr, scores_key, tumour_measurements
from pipelines.io.dicom import SeriesRef

SEG_SERIES_BASE = 9100  # + 1, 2, ... per segmented sequence, by sequence name
SR_SERIES_NUMBER = 9190
PDF_SERIES_NUMBER = 9191


def write_results(
    out: Path,
    *,
    series: Mapping[str, SeriesRef],
    images: Mapping[str, sitk.Image],
    masks: Mapping[str, sitk.Image],
    primary: str,
    segmentation_card: Mapping[str, Any],
    job_key: str,
    scores: Sequence[Mapping[str, Any]] = (),
    cards: Mapping[str, Mapping[str, Any]] | None = None,
    clinical: Mapping[str, Any] | None = None,
    uid_root: str | None = None,
    quality: Mapping[str, Any] | None = None,
) -> dict[str, Path]:
    """Write the objects under ``out``; return kind -> path (``seg_<role>``, ``sr``, ``pdf``).

    ``primary`` is the sequence the tumour was segmented on: the SR and the
    PDF describe that series; each role in ``series`` with a mask gets a SEG.
    ``scores`` are :func:`pipelines.scoring.score` results, one per card,
    and the skip records of cards that did not score (``skipped``: why);
    ``cards`` (by id) give the PDF each survival card's nomogram and
    training curves. ``quality`` is the segmentation's quality estimate
    (:meth:`pipelines.segment.quality.Quality.as_dict`): the SR and the PDF
    show its score and whether a person should review the mask.
    """
    out.mkdir(parents=True, exist_ok=True)
    algorithm = Algorithm(
        str(segmentation_card.get("id", "segmentation")),
        str(segmentation_card.get("version", "0")),
    )
    not_clinical = "not for clinical use" in " ".join(
        str(c.get("clinical_use", "not for clinical use")).lower()
        for c in (segmentation_card, *[s for s in scores if "skipped" not in s])
    )
    scored = [s for s in scores if "skipped" not in s]
    written: dict[str, Path] = {}
    sources_by_role = {}
    for number, role in enumerate(sorted(series), start=1):
        if role not in masks:
            continue
        if SEG_SERIES_BASE + number >= SR_SERIES_NUMBER:
            raise ValueError(f"too many segmented series for distinct SeriesNumbers: {number}")
        sources = source_datasets(series[role].files)
        sources_by_role[role] = sources
        seg = encode_seg(
            sources,
            {"tumour": masks[role]},
            algorithm=algorithm,
            job_key=job_key,
            series_number=SEG_SERIES_BASE + number,
            uid_root=uid_root,
        )
        source = str(sources[0].get("SeriesDescription") or "").strip()
        seg.SeriesDescription = series_description(
            f"Tumour SEG on {role}" + (f" ({source})" if source else ""), not_clinical
        )
        path = out / f"seg_{role}.dcm"
        seg.save_as(path, enforce_file_format=True)
        written[f"seg_{role}"] = path
    if primary not in sources_by_role:
        return written
    sources = sources_by_role[primary]
    previous = pydicom.dcmread(out / "sr.dcm") if (out / "sr.dcm").is_file() else None
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
    )
    sr.save_as(out / "sr.dcm", enforce_file_format=True)
    written["sr"] = out / "sr.dcm"
    mask = mask_array(masks[primary], sources)
    facts = tumour_measurements(images[primary], mask)
    models = "; ".join(
        [f"{algorithm.name} {algorithm.version}"]
        + [f"{s['signature']} {s.get('version', '')}" for s in scored]
    )
    document = report_pdf(
        images[primary],
        mask,
        facts,
        sources=sources,
        role=primary,
        scores=scores,
        cards=cards or {},
        clinical=clinical,
        models=models,
        segmentation_model=f"{algorithm.name} {algorithm.version}",
        not_for_clinical_use=not_clinical,
        quality=quality,
    )
    (out / "report.pdf").write_bytes(document)
    version_key = algorithm.version + scores_key(scores)
    pdf = encode_pdf(
        sources,
        document,
        job_key=job_key,
        version_key=version_key,
        series_number=PDF_SERIES_NUMBER,
        uid_root=uid_root,
        not_for_clinical_use=not_clinical,
    )
    pdf.save_as(out / "report_pdf.dcm", enforce_file_format=True)
    written["pdf"] = out / "report_pdf.dcm"
    return written
