"""The report for people: a PDF in the study, as an Encapsulated PDF object.

Page 1: the key slice with the tumour outline, the measurements, the
segmentation's quality (a red banner with the reasons when the mask is
flagged for review), the warning when a model is not for clinical use, and
each signature card's lines (:func:`pipelines.scoring.text.score_lines`:
rad-score, risk group or why none is given, predictions, applicability,
training cohort, nested-CV headline; skipped cards with the reason). A card
outside its range gets a red banner naming it. Lines that do not fit go on
to a continuation page. Then, per survival card inside its range with a
nomogram: the nomogram with this patient's points and the Kaplan-Meier
curves of the card's training risk groups with this patient's prediction.
"""

from __future__ import annotations

import io
import textwrap
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import SimpleITK as sitk
from matplotlib.backends.backend_pdf import PdfPages
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, ExplicitVRLittleEndian

from pipelines.encode.seg import MANUFACTURER, SOFTWARE_VERSION
from pipelines.encode.sr import key_slice, outline
from pipelines.encode.uids import derived_uid
from pipelines.scoring import is_survival
from pipelines.scoring.text import confident, endpoint_name, score_lines, survival_probabilities

ENCAPSULATED_PDF = UID("1.2.840.10008.5.1.4.1.1.104.1")
_COPIED = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "ReferringPhysicianName",
    "AccessionNumber",
)


LINE_HEIGHT = 0.0125  # of the page, at 8.5 pt monospace
WRAP = 100  # characters per line at 8.5 pt monospace across the text block


def _wrap(lines: Sequence[str]) -> list[str]:
    """Lines cut to :data:`WRAP` characters, continuations indented under their line."""
    out: list[str] = []
    for line in lines:
        indent = " " * (len(line) - len(line.lstrip()) + 2)
        out += textwrap.wrap(line, WRAP, subsequent_indent=indent, break_on_hyphens=False) or [""]
    return out


def _banner_height(text: str) -> float:
    """The page height a :func:`_banner` of ``text`` takes, gap included."""
    return 0.018 * len(textwrap.wrap(text, 78)) + 0.02


def _banner(fig: Any, top: float, text: str) -> float:
    """A red banner from ``top`` down; returns where the next thing starts."""
    wrapped = textwrap.wrap(text, 78)
    fig.text(
        0.1,
        top,
        "\n".join(wrapped),
        va="top",
        color="white",
        fontsize=10,
        fontweight="bold",
        bbox={"facecolor": "#b00020", "edgecolor": "none", "pad": 4},
    )
    return top - _banner_height(text)


def report_pdf(
    image: sitk.Image,
    mask: np.ndarray,
    facts: Mapping[str, float],
    *,
    scores: Sequence[Mapping[str, Any]] = (),
    cards: Mapping[str, Mapping[str, Any]] | None = None,
    clinical: Mapping[str, Any] | None = None,
    models: str = "",
    not_for_clinical_use: bool = True,
    quality: Mapping[str, Any] | None = None,
) -> bytes:
    """The PDF's bytes. ``mask`` is (frames, rows, cols) on ``image``'s grid.

    ``scores`` are :func:`pipelines.scoring.score` results and skip records;
    ``cards`` the cards by id (for the nomogram pages). ``quality`` is the
    segmentation's quality estimate
    (:meth:`pipelines.segment.quality.Quality.as_dict`); None leaves it out.
    """
    buffer = io.BytesIO()
    warning = "NOT FOR CLINICAL USE: research models" if not_for_clinical_use else ""
    lines = [
        f"Tumour volume: {facts['volume_ml']:.1f} ml",
        f"Longest axial diameter: {facts['longest_axial_diameter_mm']:.1f} mm",
        f"Area on key slice: {facts['key_slice_area_mm2']:.0f} mm²",
        f"Intensity inside the tumour: mean {facts['mean_intensity']:.1f}, "
        f"SD {facts['sd_intensity']:.1f}",
    ]
    if quality is not None:
        lines.append(quality_line(quality))
    for score in scores:
        lines += ["", *score_lines(score)]
    lines += ["", f"Models: {models}", f"Made {datetime.now().isoformat(timespec='minutes')}"]
    lines = _wrap(lines)
    banners = [quality_flag(quality)] + [
        f"{s['signature']}: OUTSIDE THE MODEL'S RANGE - no risk group, no prediction"
        for s in scores
        if "skipped" not in s and not confident(s)
    ]
    banners = [b for b in banners if b]
    with PdfPages(
        buffer, metadata={"Title": "sarcnode tumour report", "Creator": "sarcnode"}
    ) as pdf:
        fig = _page(warning, "sarcnode tumour report")
        # The text block goes under the image; the image shrinks (to 0.18 of the page at
        # least) to make room for it, and what still does not fit goes on a further page.
        needed = LINE_HEIGHT * len(lines) + sum(_banner_height(b) for b in banners) + 0.03
        extra = min(max(0.0, needed - 0.38), 0.3)
        k = key_slice(mask)
        pixels = sitk.GetArrayViewFromImage(image)[k]
        ax = fig.add_axes((0.1, 0.42 + extra, 0.8, 0.48 - extra))
        low, high = np.percentile(pixels, [1, 99.5])
        ax.imshow(pixels, cmap="gray", vmin=low, vmax=high)
        xy = outline(mask[k]) - 0.5  # SCOORD pixel corners -> imshow pixel centres
        ax.plot(xy[:, 0], xy[:, 1], color="#ff3030", linewidth=1.5)
        ax.set_title(f"key slice {k + 1} of {mask.shape[0]} (largest tumour area)", fontsize=10)
        ax.axis("off")
        top = 0.38 + extra
        for banner in banners:
            top = _banner(fig, top, banner)
        fits = max(1, int((top - 0.03) / LINE_HEIGHT))
        fig.text(0.1, top, "\n".join(lines[:fits]), va="top", family="monospace", fontsize=8.5)
        pdf.savefig(fig)
        plt.close(fig)
        rest = lines[fits:]
        while rest:
            fig = _page(warning, "sarcnode tumour report (continued)")
            fits = int(0.86 / LINE_HEIGHT)
            fig.text(0.1, 0.9, "\n".join(rest[:fits]), va="top", family="monospace", fontsize=8.5)
            pdf.savefig(fig)
            plt.close(fig)
            rest = rest[fits:]
        for score in scores:
            card = (cards or {}).get(str(score.get("signature")))
            if (
                card is not None
                and "skipped" not in score
                and is_survival(card)
                and card.get("nomogram")
                and confident(score)
            ):
                pdf.savefig(_page_two(score, card, clinical, warning))
                plt.close("all")
    return buffer.getvalue()


def _page(warning: str, heading: str) -> Any:
    """An A4 page with its heading and the clinical-use warning."""
    fig = plt.figure(figsize=(8.27, 11.69))
    fig.suptitle(heading, fontsize=16, y=0.97)
    if warning:
        fig.text(
            0.5,
            0.93,
            warning,
            ha="center",
            color="white",
            fontsize=13,
            bbox={"facecolor": "#b00020", "edgecolor": "none", "pad": 6},
        )
    return fig


def quality_line(quality: Mapping[str, Any]) -> str:
    """``Segmentation quality: 0.93 (agreement of ensemble views), no review needed``."""
    score = quality.get("score")
    verdict = "REVIEW RECOMMENDED" if quality.get("review") else "no review needed"
    if score is None:  # one test-time view: nothing to agree with
        return f"Segmentation quality: not estimated (a single view), {verdict}"
    return f"Segmentation quality: {float(score):.2f} (agreement of ensemble views), {verdict}"


def quality_flag(quality: Mapping[str, Any] | None) -> str:
    """The banner of a mask flagged for review, with its reasons; empty when not flagged."""
    if not quality or not quality.get("review"):
        return ""
    reasons = "; ".join(str(r) for r in quality.get("reasons") or []) or "no reason recorded"
    return f"SEGMENTATION FLAGGED FOR REVIEW: {reasons}"


def _page_two(
    score: Mapping[str, Any],
    card: Mapping[str, Any],
    clinical: Mapping[str, Any] | None,
    warning: str,
) -> Any:
    """Nomogram with this patient's points; training KM curves by risk group + this patient."""
    from pipelines.signature.report import nomogram_figure

    patient = {
        "radscore": float(score["radscore"]),
        **{k: float(v) for k, v in (clinical or {}).items() if isinstance(v, (int, float))},
    }
    fig = nomogram_figure(dict(card), patient)
    fig.set_size_inches(8.27, 11.69)
    fig.axes[0].set_position((0.15, 0.58, 0.75, 0.32))
    fig.suptitle(
        f"Nomogram and risk groups: {score['signature']} {score.get('version', '')}",
        fontsize=14,
        y=0.97,
    )
    if warning:
        fig.text(0.5, 0.93, warning, ha="center", color="#b00020", fontsize=11)
    ax = fig.add_axes((0.12, 0.08, 0.8, 0.4))
    curves = card.get("training", {}).get("km_by_risk_group", {})
    for group, colour in (("low", "#2a7fff"), ("high", "#d62728")):
        if group in curves:
            c = curves[group]
            ax.step(
                c["days"],
                c["survival"],
                where="post",
                color=colour,
                label=f"training {group} risk (n={c.get('n', '?')})",
            )
    probs = [(float(d), p) for d, p in survival_probabilities(score)]
    if probs:
        ax.plot(
            [0, *[d for d, _ in probs]],
            [1, *[p for _, p in probs]],
            "ko--",
            label="this patient (predicted)",
        )
    ax.set(
        xlabel="days",
        ylabel=endpoint_name(str(score["endpoint"])),
        ylim=(0, 1.02),
        title="Kaplan-Meier by rad-score group (training cohort)",
    )
    ax.legend(loc="lower left", fontsize=8)
    return fig


def encode_pdf(
    sources: Sequence[Dataset],
    document: bytes,
    *,
    job_key: str,
    version_key: str,
    series_number: int = 9103,
    uid_root: str | None = None,
    title: str = "sarcnode tumour report",
) -> FileDataset:
    """An Encapsulated PDF instance in the source study (UIDs derived like the SEG's and SR's)."""
    first = sources[0]
    kind_of = "PDF " + str(first.SeriesInstanceUID)
    sop_uid = derived_uid("instance", kind_of, version_key, job_key, root=uid_root)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ENCAPSULATED_PDF
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = FileDataset("", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SpecificCharacterSet = first.get("SpecificCharacterSet", "ISO_IR 192")
    for keyword in _COPIED:
        setattr(ds, keyword, first.get(keyword))
    now = datetime.now()
    ds.SOPClassUID = ENCAPSULATED_PDF
    ds.SOPInstanceUID = sop_uid
    ds.Modality = "DOC"
    ds.SeriesInstanceUID = derived_uid("series", kind_of, version_key, job_key, root=uid_root)
    ds.SeriesNumber = series_number
    ds.SeriesDescription = title[:64]
    ds.Manufacturer = MANUFACTURER
    ds.SoftwareVersions = SOFTWARE_VERSION
    ds.ConversionType = "WSD"
    ds.InstanceNumber = 1
    ds.ContentDate = now.strftime("%Y%m%d")
    ds.ContentTime = now.strftime("%H%M%S")
    ds.AcquisitionDateTime = now.strftime("%Y%m%d%H%M%S")
    ds.BurnedInAnnotation = "YES"  # the PDF shows the study's images and numbers
    ds.DocumentTitle = title[:64]
    ds.ConceptNameCodeSequence = []
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    ds.EncapsulatedDocumentLength = len(document)
    ds.EncapsulatedDocument = document + (b"\0" if len(document) % 2 else b"")
    reference = Dataset()
    reference.ReferencedSOPClassUID = first.SOPClassUID
    reference.ReferencedSOPInstanceUID = first.SOPInstanceUID
    ds.SourceInstanceSequence = [reference]
    return ds
