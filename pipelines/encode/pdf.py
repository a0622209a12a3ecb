"""The report for people: a PDF in the study, as an Encapsulated PDF object.

Page 1: the key slice with the tumour outline, the measurements and scores,
the segmentation's quality (a red banner with the reasons when the mask is
flagged for review), and the warning when a model is not for clinical use.
Page 2: the nomogram with this patient's points and the Kaplan-Meier curves
of the signature's training risk groups (stored in the card) with this
patient's predicted PFS.
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


def report_pdf(
    image: sitk.Image,
    mask: np.ndarray,
    facts: Mapping[str, float],
    *,
    score: Mapping[str, Any] | None,
    card: Mapping[str, Any] | None,
    clinical: Mapping[str, Any] | None = None,
    models: str = "",
    not_for_clinical_use: bool = True,
    quality: Mapping[str, Any] | None = None,
) -> bytes:
    """The PDF's bytes. ``mask`` is (frames, rows, cols) on ``image``'s grid.

    ``quality`` is the segmentation's quality estimate
    (:meth:`pipelines.segment.quality.Quality.as_dict`); None leaves it out.
    """
    buffer = io.BytesIO()
    warning = "NOT FOR CLINICAL USE: research models" if not_for_clinical_use else ""
    with PdfPages(
        buffer, metadata={"Title": "sarcnode tumour report", "Creator": "sarcnode"}
    ) as pdf:
        fig = plt.figure(figsize=(8.27, 11.69))
        fig.suptitle("sarcnode tumour report", fontsize=16, y=0.97)
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
        k = key_slice(mask)
        pixels = sitk.GetArrayViewFromImage(image)[k]
        ax = fig.add_axes((0.1, 0.42, 0.8, 0.48))
        low, high = np.percentile(pixels, [1, 99.5])
        ax.imshow(pixels, cmap="gray", vmin=low, vmax=high)
        xy = outline(mask[k]) - 0.5  # SCOORD pixel corners -> imshow pixel centres
        ax.plot(xy[:, 0], xy[:, 1], color="#ff3030", linewidth=1.5)
        ax.set_title(f"key slice {k + 1} of {mask.shape[0]} (largest tumour area)", fontsize=10)
        ax.axis("off")
        lines = [
            f"Tumour volume: {facts['volume_ml']:.1f} ml",
            f"Longest axial diameter: {facts['longest_axial_diameter_mm']:.1f} mm",
            f"Area on key slice: {facts['key_slice_area_mm2']:.0f} mm²",
            f"Intensity inside the tumour: mean {facts['mean_intensity']:.1f}, "
            f"SD {facts['sd_intensity']:.1f}",
        ]
        flagged = quality_flag(quality)
        if quality is not None:
            lines.append(quality_line(quality))
        if score is not None:
            lines += [
                "",
                f"Signature {score['signature']} v{score.get('version', '')} ({score['endpoint']})",
                f"Rad-score {score['radscore']:.3f}: {str(score['risk_group']).upper()} risk",
            ]
            for days, p in sorted(
                (score.get("pfs_probability") or {}).items(), key=lambda kv: float(kv[0])
            ):
                lines.append(f"  predicted PFS at {days} days: {100 * float(p):.0f} %")
            if score.get("model"):
                lines.append(f"  ({score['model']} model)")
        lines += ["", f"Models: {models}", f"Made {datetime.now().isoformat(timespec='minutes')}"]
        top = 0.38
        if flagged:
            banner = textwrap.wrap(flagged, 78)
            fig.text(
                0.1,
                top,
                "\n".join(banner),
                va="top",
                color="white",
                fontsize=10,
                fontweight="bold",
                bbox={"facecolor": "#b00020", "edgecolor": "none", "pad": 4},
            )
            top -= 0.018 * len(banner) + 0.02
        fig.text(0.1, top, "\n".join(lines), va="top", family="monospace", fontsize=9)
        pdf.savefig(fig)
        plt.close(fig)
        if score is not None and card is not None and card.get("endpoint") == "pfs":
            pdf.savefig(_page_two(score, card, clinical, warning))
            plt.close("all")
    return buffer.getvalue()


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
    fig.suptitle("Nomogram and risk groups", fontsize=14, y=0.97)
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
    probs = sorted((float(d), float(p)) for d, p in (score.get("pfs_probability") or {}).items())
    if probs:
        ax.plot(
            [0, *[d for d, _ in probs]],
            [1, *[p for _, p in probs]],
            "ko--",
            label="this patient (predicted)",
        )
    ax.set(
        xlabel="days",
        ylabel="progression-free survival",
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
