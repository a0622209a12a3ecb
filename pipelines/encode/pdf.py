"""The report for people: a typeset PDF in the study, as an Encapsulated PDF object.

Written for the clinician who opens it from the PACS, one A4 page where it
fits:

- a header with the patient and the study as the source series names them
  (name, ID, birth date, sex; study date and description, accession
  number), and the clinical-use warning;
- the key slice (largest tumour area) with the tumour outline, named as the
  viewer names it: its InstanceNumber, slice location and series;
- the measurements with their units, the segmentation model and the
  quality of the mask (a red line with the reasons when it is flagged);
- per signature card: what it predicts, its result in words (rad-score,
  risk group and the cut-off that makes it, the predicted probability), or
  why there is none (outside the model's range, a red line; a card that
  could not score, with the reason), its validation performance and
  training cohort, and "not for clinical use";
- the models' ids and versions.

Text that does not fit goes on to a continuation page. Then a page per card
whose prediction is given: a nomogram of the model that gave the printed
numbers (the nomogram with clinical factors when they were all given, else
the rad-score-only model) with points, total points and probability axes
and this patient's values marked, and for a survival card the Kaplan-Meier
curves of its training risk groups with the numbers at risk and this
patient's predicted survival. Text is set in DejaVu Sans and embedded as
TrueType, so ``pdftotext`` reads it.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import SimpleITK as sitk
from matplotlib.backends.backend_pdf import PdfPages
from matplotlib.font_manager import FontProperties
from matplotlib.patches import Rectangle
from matplotlib.textpath import TextToPath
from matplotlib.ticker import MaxNLocator
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, ExplicitVRLittleEndian

from pipelines.encode.seg import MANUFACTURER, SOFTWARE_VERSION, WARNING, series_description
from pipelines.encode.sr import key_slice, outline
from pipelines.encode.uids import derived_uid
from pipelines.scoring import is_survival
from pipelines.scoring.cards import cohort_text
from pipelines.scoring.text import confident, endpoint_name, risk_text, survival_probabilities
from pipelines.scoring.text import verdict as verdict_text

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
TITLE = "Tumour and radiomics report"
# Page geometry (inches): A4 portrait.
PAGE_W, PAGE_H = 8.27, 11.69
MARGIN = 0.55
LEADING = 1.25  # line height, in font sizes
TEXT_W = PAGE_W - 2 * MARGIN
FONT = "DejaVu Sans"
RED = "#b00020"
GREY = "#555555"
# Text as TrueType (Type 42), not Type 3: pdftotext and screen readers get the words.
RC: Any = {"pdf.fonttype": 42, "font.family": FONT, "font.size": 9}
_MEASURE = TextToPath()


def _width(text: str, size: float, weight: str = "normal") -> float:
    """Width of ``text`` set in :data:`FONT` at ``size`` points, in inches."""
    props = FontProperties(family=FONT, size=size, weight=weight)
    width, _, _ = _MEASURE.get_text_width_height_descent(text, props, ismath=False)
    return float(width) / 72.0


def wrap(text: str, width: float, size: float, weight: str = "normal") -> list[str]:
    """``text`` broken into lines no wider than ``width`` inches (greedy, by words)."""
    lines: list[str] = []
    for paragraph in text.split("\n"):
        line = ""
        for word in paragraph.split(" "):
            candidate = f"{line} {word}" if line else word
            if line and _width(candidate, size, weight) > width:
                lines.append(line)
                line = word
            else:
                line = candidate
        lines.append(line)
    return lines


@dataclass
class _Layout:
    """Pages filled top-down: paragraphs wrap to the text width, a full page starts another."""

    pdf: Any  # PdfPages (its savefig is untyped)
    warning: str
    made: str
    figures: list[Any] = field(default_factory=list)
    y: float = 0.0
    side_x: float = MARGIN  # where the column beside the key slice starts
    side_bottom: float = PAGE_H  # where the key slice and its caption end
    heading: str = TITLE  # the heading a continuation page repeats

    @property
    def fig(self) -> Any:
        """The page being filled."""
        return self.figures[-1]

    def new_page(self, heading: str | None = None) -> None:
        """Start a page with ``heading`` (else the last one, continued) and the warning band."""
        if heading is None:
            heading = f"{self.heading} (continued)"
        else:
            self.heading = heading
        fig = plt.figure(figsize=(PAGE_W, PAGE_H))
        self.figures.append(fig)
        self.y = PAGE_H - MARGIN
        self.put(MARGIN, self.y, heading, size=15, weight="bold", va="top")
        self.put(PAGE_W - MARGIN, self.y, self.made, size=7.5, color=GREY, ha="right", va="top")
        self.y -= 0.38
        if self.warning:
            band = 0.3
            fig.add_artist(
                Rectangle(
                    (MARGIN / PAGE_W, (self.y - band) / PAGE_H),
                    TEXT_W / PAGE_W,
                    band / PAGE_H,
                    transform=fig.transFigure,
                    facecolor=RED,
                    edgecolor="none",
                )
            )
            self.put(
                PAGE_W / 2,
                self.y - band / 2,
                self.warning,
                size=10.5,
                weight="bold",
                color="white",
                ha="center",
                va="center",
            )
            self.y -= band + 0.15

    def put(self, x: float, y: float, text: str, size: float = 9, **kw: Any) -> None:
        """Text at (``x``, ``y``) inches from the page's lower left corner."""
        self.fig.text(x / PAGE_W, y / PAGE_H, text, fontsize=size, **kw)

    def room(self, needed: float) -> None:
        """Go on to a new page unless ``needed`` inches fit above the footer."""
        if self.y - needed < MARGIN + 0.1:
            self.new_page()

    def paragraph(
        self,
        text: str,
        *,
        x: float = MARGIN,
        width: float = TEXT_W,
        size: float = 9,
        weight: str = "normal",
        color: str = "black",
        indent: float = 0.0,
        after: float = 0.04,
    ) -> None:
        """``text`` wrapped at ``width`` from the current line down (hanging ``indent``)."""
        leading = size * LEADING / 72
        for i, line in enumerate(wrap(text, width - (indent if text else 0), size, weight)):
            self.room(leading)
            self.put(
                x + (indent if i else 0.0),
                self.y,
                line,
                size=size,
                weight=weight,
                color=color,
                va="top",
            )
            self.y -= leading
        self.y -= after

    def labelled(
        self, pairs: Sequence[tuple[str, str]], x: float, width: float, tab: float = 1.0
    ) -> float:
        """``label  value`` rows from the current line down at ``x``; returns the lowest y.

        Values start ``tab`` inches right of the labels and wrap within ``width``.
        """
        y = self.y
        for label, value in pairs:
            self.put(x, y, label, size=8, color=GREY, va="top")
            lines = wrap(value, width - tab, 9)
            for line in lines:
                self.put(x + tab, y, line, size=9, va="top")
                y -= 9 * LEADING / 72
            y -= 0.02
        return y

    def finish(self) -> None:
        """Number the pages, add the footer, write them."""
        for number, fig in enumerate(self.figures, start=1):
            fig.text(
                MARGIN / PAGE_W,
                (MARGIN - 0.15) / PAGE_H,
                f"sarcnode {SOFTWARE_VERSION}. {self.warning or 'Research software.'}",
                fontsize=7.5,
                color=GREY,
            )
            fig.text(
                (PAGE_W - MARGIN) / PAGE_W,
                (MARGIN - 0.15) / PAGE_H,
                f"page {number} of {len(self.figures)}",
                fontsize=7.5,
                color=GREY,
                ha="right",
            )
            self.pdf.savefig(fig)
            plt.close(fig)


def _date(value: Any) -> str:
    """A DICOM DA (``20050618``) as ``2005-06-18``; ``not given`` when empty."""
    text = str(value or "").strip()
    if len(text) == 8 and text.isdigit():
        return f"{text[:4]}-{text[4:6]}-{text[6:]}"
    return text or "not given"


def _person(value: Any) -> str:
    """A DICOM PN as ``FAMILY, Given``; the raw value when it has one component."""
    text = str(value or "").strip()
    if not text:
        return "not given"
    family, _, rest = text.partition("^")
    given = " ".join(p for p in rest.split("^") if p)
    return f"{family.upper()}, {given}" if given else family


SEXES = {"M": "male", "F": "female", "O": "other"}


def _plain(value: Any) -> str:
    """A DICOM text value for reading: component separators as spaces, ``not given`` if empty."""
    text = " ".join(str(value or "").replace("^", " ").split())
    return text or "not given"


def header_rows(source: Dataset) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Patient and study as the source series names them: two columns of (label, value)."""
    sex = str(source.get("PatientSex") or "").strip()
    patient = [
        ("Patient", _person(source.get("PatientName"))),
        ("Patient ID", str(source.get("PatientID") or "not given")),
        ("Birth date", _date(source.get("PatientBirthDate"))),
        ("Sex", SEXES.get(sex, sex or "not given")),
    ]
    study = [
        ("Study date", _date(source.get("StudyDate"))),
        ("Study", _plain(source.get("StudyDescription"))),
        ("Accession no.", str(source.get("AccessionNumber") or "not given")),
        ("Referring", _person(source.get("ReferringPhysicianName"))),
    ]
    return patient, study


def key_slice_text(source: Dataset, role: str) -> str:
    """``image 18 (InstanceNumber), slice location 12.5 mm, series 3 T2W_SPAIR_TRA (T2FS)``."""
    number = source.get("InstanceNumber")
    parts = [f"image {number}" if number is not None else "image (no InstanceNumber)"]
    location = source.get("SliceLocation")
    if location is not None:
        parts.append(f"slice location {float(location):.1f} mm")
    series = " ".join(
        str(v) for v in (source.get("SeriesNumber"), source.get("SeriesDescription")) if v
    )
    parts.append(f"series {series} ({role})" if series else f"series {role}")
    return ", ".join(parts)


def quality_line(quality: Mapping[str, Any]) -> str:
    """``Segmentation quality: 0.93 (agreement of ensemble views), no review needed``."""
    score = quality.get("score")
    verdict_words = "REVIEW RECOMMENDED" if quality.get("review") else "no review needed"
    if score is None:  # one test-time view: nothing to agree with
        return f"Segmentation quality: not estimated (a single view), {verdict_words}"
    return (
        f"Segmentation quality: {float(score):.2f} (agreement of ensemble views), {verdict_words}"
    )


def quality_flag(quality: Mapping[str, Any] | None) -> str:
    """The banner of a mask flagged for review, with its reasons; empty when not flagged."""
    if not quality or not quality.get("review"):
        return ""
    reasons = "; ".join(str(r) for r in quality.get("reasons") or []) or "no reason recorded"
    return f"SEGMENTATION FLAGGED FOR REVIEW: {reasons}"


def _years(days: str) -> str:
    """``365`` -> ``1 year``, ``300`` -> ``300 days``."""
    d = float(days)
    years = d / 365
    if d >= 365 and abs(years - round(years)) < 0.01:
        return f"{round(years)} year{'s' if round(years) > 1 else ''}"
    return f"{d:g} days"


def cutoff_text(result: Mapping[str, Any], card: Mapping[str, Any] | None) -> str:
    """The rad-score cut-off that makes the risk group, and where it comes from."""
    block = (card or {}).get("radscore") or {}
    value = result.get("cutoff", block.get("cutoff"))
    if value is None:
        return "no cut-off on the card"
    if is_survival(card or {}) or survival_probabilities(result):
        rule = str(block.get("cutoff_rule") or "").split(";")[0].strip()
        where = f" ({rule})" if rule else ""
        return f"high risk above rad-score {float(value):.3f}{where}"
    probability = _logistic(float(value))
    return f"positive above rad-score {float(value):.3f} (predicted probability {probability:.0%})"


def _inputs(card: Mapping[str, Any] | None) -> str:
    """``T1 MRI (tumour and 10 mm ring)``: what the card's features are measured on."""
    sequences = " and ".join(str(s) for s in (card or {}).get("sequences") or []) or "MRI"
    names = {"tumour": "tumour", "ring": "10 mm ring"}
    listed = [str(r) for r in (card or {}).get("regions") or ["tumour"]]
    regions = [names.get(r, r) for r in sorted(listed, key=lambda r: r != "tumour")]
    return f"{sequences} radiomics ({' and '.join(regions)})"


def meaning_text(result: Mapping[str, Any], card: Mapping[str, Any] | None) -> str:
    """What the card predicts and how, in a sentence."""
    endpoint = endpoint_name(str(result.get("endpoint", "")))
    if is_survival(card or {}) or survival_probabilities(result):
        return (
            f"Cox model of {endpoint} on {_inputs(card)}; the rad-score is a weighted sum "
            "of the features."
        )
    return f"logistic model of {endpoint} on {_inputs(card)} (rad-score: its log-odds)."


def result_text(result: Mapping[str, Any], card: Mapping[str, Any] | None = None) -> str:
    """The result in a sentence: rad-score, risk group, predictions; or why none."""
    if "skipped" in result:
        return f"Not scored: {result['skipped']}."
    radscore = f"Rad-score {float(result['radscore']):.3f}"
    if not confident(result):
        return (
            f"{radscore}; no risk group and no prediction: the study lies outside the range "
            "of the patients the model was fitted on, where its numbers would be extrapolations."
        )
    cutoff = result.get("cutoff", ((card or {}).get("radscore") or {}).get("cutoff"))
    group = result.get("risk_group")
    if group is None or cutoff is None:
        words = f"{radscore}, {risk_text(result)}."
    else:
        side = "above" if float(result["radscore"]) > float(cutoff) else "at or below"
        named = f"{group}-risk group" if group in ("high", "low") else str(group)
        words = f"{radscore}, {side} the cut-off: {named}."
    probs = survival_probabilities(result)
    if probs:
        model = (
            "nomogram with clinical factors"
            if result.get("model") == "nomogram"
            else "rad-score-only model"
        )
        shown = ", ".join(f"{_years(t)} {p:.0%}" for t, p in probs if _keep_time(t, probs))
        words += f" Predicted {endpoint_name(str(result['endpoint']))} ({model}): {shown}."
    elif "probability" in result:
        words += (
            f" Predicted probability of {endpoint_name(str(result['endpoint']))}: "
            f"{float(result['probability']):.0%}."
        )
    return words


def _keep_time(days: str, probs: Sequence[tuple[str, float]]) -> bool:
    """Print whole years when the card has them (1, 3, 5 years), else every time point."""
    years = [t for t, _ in probs if float(t) >= 365 and float(t) % 365 == 0]
    return not years or days in years


def report_pdf(
    image: sitk.Image,
    mask: np.ndarray,
    facts: Mapping[str, float],
    *,
    sources: Sequence[Dataset] = (),
    role: str = "",
    scores: Sequence[Mapping[str, Any]] = (),
    cards: Mapping[str, Mapping[str, Any]] | None = None,
    clinical: Mapping[str, Any] | None = None,
    models: str = "",
    segmentation_model: str = "",
    not_for_clinical_use: bool = True,
    quality: Mapping[str, Any] | None = None,
) -> bytes:
    """The PDF's bytes. ``mask`` is (frames, rows, cols) on ``image``'s grid.

    ``sources`` are the series' datasets in frame order (the header and the
    key slice's InstanceNumber come from them; without them the header says
    "not given"); ``role`` the series' sequence role. ``scores`` are
    :func:`pipelines.scoring.score` results and skip records; ``cards`` the
    cards by id (meaning, cut-off rule, nomogram and training curves);
    ``clinical`` the clinical factors given. ``quality`` is the
    segmentation's quality estimate
    (:meth:`pipelines.segment.quality.Quality.as_dict`); None leaves it out.
    """
    cards = cards or {}
    buffer = io.BytesIO()
    warning = (
        f"{WARNING}: research models, not for decisions about patients"
        if (not_for_clinical_use)
        else ""
    )
    made = f"made {datetime.now().strftime('%Y-%m-%d %H:%M')}"
    k = key_slice(mask)
    key = sources[k] if len(sources) > k else Dataset()
    metadata = {"Title": TITLE, "Creator": f"sarcnode {SOFTWARE_VERSION}"}
    with matplotlib.rc_context(RC), PdfPages(buffer, metadata=metadata) as pdf:
        page = _Layout(pdf, warning, made)
        page.new_page(TITLE)
        patient, study = header_rows(key)
        low = min(
            page.labelled(patient, MARGIN, TEXT_W / 2),
            page.labelled(study, MARGIN + TEXT_W / 2, TEXT_W / 2),
        )
        page.y = low - 0.12
        _key_slice(page, image, mask, k, key, role)
        _measurements(page, facts, segmentation_model, quality, models)
        page.y -= 0.1
        page.paragraph("Radiomics signatures", size=11.5, weight="bold", after=0.06)
        if not scores:
            page.paragraph("No signature card scored this study.")
        for score in scores:
            _card_block(page, score, cards.get(str(score.get("signature"))))
        drawn = [
            (score, card, model)
            for score in scores
            if "skipped" not in score and confident(score)
            for card in [cards.get(str(score.get("signature")))]
            if card is not None
            for model in [model_block(score, card)]
            if model is not None
        ]
        for i, (score, card, model) in enumerate(drawn):
            needed = _figure_height(card, model)
            if i == 0 and page.y - needed - 0.4 >= MARGIN + 0.1:  # fits under the text
                page.y -= 0.1
                page.paragraph("Nomograms and risk groups", size=11.5, weight="bold")
            elif i == 0 or page.y - needed < MARGIN + 0.1:
                page.new_page("Nomograms and risk groups")
            _figure_block(page, score, card, model, clinical)
        page.finish()
    return buffer.getvalue()


def _key_slice(
    page: _Layout, image: sitk.Image, mask: np.ndarray, k: int, key: Dataset, role: str
) -> None:
    """The key slice with the outline at the left; its name below it."""
    size = 2.5
    top = page.y
    ax = page.fig.add_axes((MARGIN / PAGE_W, (top - size) / PAGE_H, size / PAGE_W, size / PAGE_H))
    pixels = sitk.GetArrayViewFromImage(image)[k]
    low, high = np.percentile(pixels, [1, 99.5])
    ax.imshow(pixels, cmap="gray", vmin=low, vmax=high)
    xy = outline(mask[k]) - 0.5  # SCOORD pixel corners -> imshow pixel centres
    ax.plot(xy[:, 0], xy[:, 1], color="#ff3030", linewidth=1.2)
    ax.axis("off")
    caption = wrap(f"Key slice (largest tumour area): {key_slice_text(key, role)}", size, 8)
    y = top - size - 0.05
    for line in caption:
        page.put(MARGIN, y, line, size=8, color=GREY, va="top")
        y -= 8 * LEADING / 72
    page.side_bottom = y - 0.1
    page.side_x = MARGIN + size + 0.25


def _measurements(
    page: _Layout,
    facts: Mapping[str, float],
    segmentation_model: str,
    quality: Mapping[str, Any] | None,
    models: str,
) -> None:
    """Measurements with units beside the key slice; the quality and its flag; the models."""
    x = page.side_x
    width = PAGE_W - MARGIN - x
    page.put(x, page.y, "Tumour", size=11.5, weight="bold", va="top")
    page.y -= 0.25
    rows = [
        ("Volume", f"{facts['volume_ml']:.1f} ml"),
        ("Longest axial diameter", f"{facts['longest_axial_diameter_mm']:.1f} mm"),
        ("Area on key slice", f"{facts['key_slice_area_mm2']:.0f} mm²"),
        (
            "Signal intensity",
            f"mean {facts['mean_intensity']:.1f}, SD {facts['sd_intensity']:.1f} "
            "(arbitrary units of the MR signal)",
        ),
    ]
    if segmentation_model:
        rows.append(("Segmented by", f"{segmentation_model} (automatic)"))
    page.y = page.labelled(rows, x, width, tab=1.5) - 0.05
    if quality is not None:
        flag = quality_flag(quality)
        page.paragraph(
            quality_line(quality), x=x, width=width, size=9, weight="bold" if flag else "normal"
        )
        if flag:
            page.paragraph(flag, x=x, width=width, size=9, weight="bold", color=RED)
    if models:
        page.paragraph(f"Models (id version): {models}", x=x, width=width, size=7.5, color=GREY)
    page.y = min(page.y, page.side_bottom)


def validation_text(result: Mapping[str, Any]) -> str:
    """The card's validation in a sentence: nested-CV figure, baselines, cohort; or why none."""
    nested = str(result.get("nested_cv") or "")
    cohort = cohort_text(result)
    if not nested:
        return f"no nested cross-validation on the card; {cohort}"
    figure = nested.split("nested CV ", 1)[-1].strip()
    chance = " (0.5 = chance)" if re.search(r"\b(AUC|C)\b", figure) else ""
    said = "" if "patients" in figure else f"; {cohort}"
    return f"nested cross-validation{chance}: {figure}{said}"


def _card_block(page: _Layout, score: Mapping[str, Any], card: Mapping[str, Any] | None) -> None:
    """One card: its name, result in words, meaning and cut-off, validation, clinical use."""
    page.room(1.0)
    version = f" {score['version']}" if score.get("version") else ""
    page.paragraph(
        f"{endpoint_name(str(score.get('endpoint', ''))).capitalize()}: "
        f"{score.get('signature')}{version}",
        size=9.5,
        weight="bold",
        after=0.01,
    )
    lines: list[tuple[str, str]] = []
    if "skipped" not in score and not confident(score):
        page.paragraph(
            f"{score['signature']}: OUTSIDE THE MODEL'S RANGE - no risk group, no prediction",
            size=8.5,
            weight="bold",
            color=RED,
            after=0.01,
        )
        why = verdict_text(score).removeprefix("outside the model's range: ")
        radscore = float(score["radscore"])
        lines.append(("Result", f"rad-score {radscore:.3f}; {risk_text(score)}. {why}"))
    else:
        lines.append(("Result", result_text(score, card)))
    if score.get("missing_clinical"):
        lines.append(
            (
                "Clinical factors",
                f"not given ({', '.join(score['missing_clinical'])}): "
                "the rad-score-only model answers",
            )
        )
    meaning = meaning_text(score, card)
    if "skipped" not in score:
        meaning += f" Risk cut-off: {cutoff_text(score, card)}."
    lines.append(("Meaning", meaning[0].upper() + meaning[1:]))
    use = str(score.get("clinical_use") or "not for clinical use").upper()
    warning = f" CARD WARNING: {score['warning']}." if score.get("warning") else ""
    lines.append(("Validation", f"{validation_text(score)}. {use}.{warning}"))
    for label, text in lines:
        page.paragraph(
            f"{label}: {text}",
            x=MARGIN + 0.15,
            width=TEXT_W - 0.15,
            indent=0.15,
            size=8,
            after=0.015,
        )
    page.y -= 0.06


# -- nomogram and survival curves ---------------------------------------------------------


@dataclass(frozen=True)
class Model:
    """The model that gave a card's printed numbers, as a nomogram draws it.

    ``coefficients`` and ``means`` define the linear predictor
    ``lp = sum(coefficient * (value - mean))``; ``ranges`` the axis of each
    covariate; ``outcomes`` map a linear predictor to each printed
    probability (label, function).
    """

    name: str
    covariates: tuple[str, ...]
    coefficients: Mapping[str, float]
    means: Mapping[str, float]
    ranges: Mapping[str, tuple[float, float]]
    outcomes: tuple[tuple[str, Callable[[float], float]], ...]

    def lp(self, values: Mapping[str, float]) -> float:
        """The linear predictor of ``values``."""
        return sum(self.coefficients[c] * (values[c] - self.means[c]) for c in self.covariates)


def _radscore_range(card: Mapping[str, Any]) -> tuple[float, float] | None:
    """The training range of the rad-score (applicability block, else nomogram.ranges)."""
    for found in (
        (card.get("applicability") or {}).get("radscore"),
        ((card.get("nomogram") or {}).get("ranges") or {}).get("radscore"),
    ):
        if found:
            return float(found[0]), float(found[1])
    return None


def model_block(result: Mapping[str, Any], card: Mapping[str, Any]) -> Model | None:
    """The model behind ``result``'s printed numbers, or None when it cannot be drawn.

    A survival result from the nomogram (``model: nomogram``) is drawn with
    the card's nomogram; otherwise with its rad-score-only Cox model; a
    logistic result with its rad-score (the log-odds). Outcomes are the
    printed survival time points (whole years when the card has them) or
    the logistic probability.
    """
    span = _radscore_range(card)
    if is_survival(card):
        block = card["nomogram"] if result.get("model") == "nomogram" else card["radscore_cox"]
        names = tuple(str(c) for c in block["covariates"])
        known = (card.get("nomogram") or {}).get("ranges") or {}
        ranges: dict[str, tuple[float, float]] = {}
        for c in names:
            if c == "radscore" and span is not None:
                ranges[c] = span
            elif c in known:
                ranges[c] = (float(known[c][0]), float(known[c][1]))
            else:
                ranges[c] = (0.0, 1.0)
        baseline = {str(t): float(s) for t, s in block["baseline_survival"].items()}
        shown = [t for t, _ in survival_probabilities(result) if t in baseline]
        shown = [t for t in shown if _keep_time(t, [(s, 0.0) for s in shown])][:3]
        endpoint = endpoint_name(str(result.get("endpoint", "")))
        outcomes = tuple((f"{_years(t)} {endpoint}", _survival_at(baseline[t])) for t in shown)
        kind = (
            "nomogram with clinical factors"
            if result.get("model") == "nomogram"
            else ("rad-score-only Cox model")
        )
        return Model(
            kind,
            names,
            {c: float(block["coefficients"][c]) for c in names},
            {c: float(block["means"][c]) for c in names},
            ranges,
            outcomes,
        )
    if "probability" not in result or span is None:
        return None
    endpoint = endpoint_name(str(result.get("endpoint", "")))
    return Model(
        "logistic model",
        ("radscore",),
        {"radscore": 1.0},
        {"radscore": 0.0},
        {"radscore": span},
        ((f"probability of {endpoint}", _logistic),),
    )


def _survival_at(s0: float) -> Callable[[float], float]:
    """``lp -> s0 ** exp(lp)``: survival at one time point of a Cox model."""
    return lambda lp: float(s0 ** math.exp(min(lp, 700.0)))  # no overflow far off the range


def _logistic(lp: float) -> float:
    """The logistic function (probability from log-odds), without overflow at any ``lp``."""
    if lp >= 0:
        return 1.0 / (1.0 + math.exp(-lp))
    odds = math.exp(max(lp, -745.0))
    return odds / (1.0 + odds)


def patient_values(
    result: Mapping[str, Any], clinical: Mapping[str, Any] | None
) -> dict[str, float]:
    """The patient's covariates: the rad-score and the numeric clinical factors given."""
    values = {"radscore": float(result["radscore"])}
    for name, value in (clinical or {}).items():
        if isinstance(value, (int, float)):  # bool included: a yes/no factor is 1/0
            values[name] = float(value)
    return values


def nomogram_axes(ax: Any, model: Model, patient: Mapping[str, float]) -> dict[str, float]:
    """Draw the nomogram of ``model`` on ``ax``; return the patient's points and outcomes.

    Rows top-down: points (0-100), one axis per covariate (the widest spans
    100 points), total points, one axis per outcome. The patient's value on
    each covariate, total points and outcomes are marked in red; the
    outcomes read off the axes are the model's (the printed) numbers.
    """
    names = model.covariates
    zero = {
        c: model.ranges[c][0] if model.coefficients[c] > 0 else model.ranges[c][1] for c in names
    }
    spans = {
        c: abs(model.coefficients[c]) * (model.ranges[c][1] - model.ranges[c][0]) for c in names
    }
    scale = 100.0 / max(max(spans.values()), 1e-12)

    def points(c: str, v: float) -> float:
        return scale * model.coefficients[c] * (v - zero[c])

    total_max = sum(scale * spans[c] for c in names)
    offset = model.lp(zero)  # the linear predictor at 0 total points
    rows = len(names) + 2 + len(model.outcomes)
    y = float(rows)
    label_x = -4.0

    def axis(
        yy: float, label: str, ticks: Sequence[tuple[float, str]], lo: float, hi: float
    ) -> None:
        ax.plot([lo, hi], [yy, yy], color="black", linewidth=0.8)
        for x, text in ticks:
            ax.plot([x, x], [yy, yy + 0.12], color="black", linewidth=0.8)
            ax.text(x, yy + 0.18, text, ha="center", va="bottom", fontsize=7)
        ax.text(label_x, yy, label, ha="right", va="center", fontsize=8.5)

    axis(
        y,
        "Points",
        [(p, f"{p:g}") for p in range(0, 101, 10)],
        0,
        100,
    )
    marks: dict[str, float] = {}
    total = 0.0
    for c in names:
        y -= 1
        lo, hi = model.ranges[c]
        ticks = MaxNLocator(nbins=6).tick_values(lo, hi)
        ticks = [t for t in ticks if lo - 1e-9 <= t <= hi + 1e-9]
        binary = (lo, hi) == (0.0, 1.0)
        labels = [(points(c, t), ("yes" if t else "no") if binary else f"{t:g}") for t in ticks]
        ends = sorted([points(c, lo), points(c, hi)])
        axis(y, "Rad-score" if c == "radscore" else c.replace("_", " "), labels, *ends)
        if c in patient:
            p = points(c, patient[c])
            total += p
            marks[c] = p
            shown = min(max(p, ends[0]), ends[1])  # a value off the axis is marked at its end
            ax.plot([shown], [y], "o", color=RED, markersize=5, zorder=5)
            ax.plot([shown, shown], [y, float(rows)], color=RED, linewidth=0.6, linestyle=":")
            if shown != p:
                ax.text(
                    shown,
                    y - 0.3,
                    f"{patient[c]:.3g}: off the axis",
                    color=RED,
                    fontsize=7,
                    ha="center",
                    va="top",
                )
    y -= 1
    per = 100.0 / total_max if total_max else 1.0
    step = _nice_step(total_max)
    axis(
        y,
        "Total points",
        [(t * per, f"{t:g}") for t in np.arange(0, total_max + 1e-9, step)],
        0,
        100,
    )
    at = min(max(total * per, 0.0), 100.0)
    ax.plot([at], [y], "o", color=RED, markersize=5, zorder=5)
    marks["total_points"] = total
    lp = offset + total / scale
    for label, function in model.outcomes:
        y -= 1
        lp_lo, lp_hi = offset, offset + total_max / scale
        marked: list[tuple[float, str]] = []
        for prob in (0.01, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99):
            where = _inverse(function, prob, lp_lo, lp_hi)
            if where is not None:
                marked.append(((where - offset) * scale * per, f"{prob:g}"))
        if marked:
            xs = [x for x, _ in marked]
            axis(y, label, _spaced(marked), min(xs), max(xs))
        else:
            ax.text(label_x, y, label, ha="right", va="center", fontsize=8.5)
        value = function(lp)
        marks[label] = value
        ax.plot([at], [y], "o", color=RED, markersize=5, zorder=5)
        ax.text(
            at + 1.2,
            y - 0.08,
            f"{value:.0%}",
            color=RED,
            fontsize=8,
            va="top",
            bbox={"facecolor": "white", "edgecolor": "none", "pad": 0.5},
            zorder=6,
        )
    ax.plot(
        [at, at],
        [y, y + len(model.outcomes) + 1],
        color=RED,
        linewidth=0.6,
        linestyle=":",
    )
    ax.set_xlim(-45, 108)
    ax.set_ylim(y - 0.9, rows + 0.8)
    ax.axis("off")
    return marks


def _spaced(ticks: Sequence[tuple[float, str]], gap: float = 4.5) -> list[tuple[float, str]]:
    """Ticks at least ``gap`` points apart (left to right), so their labels do not collide."""
    kept: list[tuple[float, str]] = []
    for x, text in sorted(ticks):
        if not kept or x - kept[-1][0] >= gap:
            kept.append((x, text))
    return kept


def _nice_step(span: float) -> float:
    """A round tick step giving about 5-10 ticks over ``span``."""
    if span <= 0:
        return 1.0
    raw = span / 8
    power = 10 ** math.floor(math.log10(raw))
    return float(min((s * power for s in (1, 2, 5, 10) if s * power >= raw), default=power))


def _inverse(function: Callable[[float], float], prob: float, lo: float, hi: float) -> float | None:
    """The linear predictor in [lo, hi] where the monotone ``function`` equals ``prob``."""
    a, b = function(lo), function(hi)
    if not min(a, b) <= prob <= max(a, b):
        return None
    for _ in range(80):
        mid = (lo + hi) / 2
        if (function(mid) - prob) * (a - prob) > 0:
            lo, a = mid, function(mid)
        else:
            hi = mid
    return (lo + hi) / 2


def at_risk(curve: Mapping[str, Any], days: float) -> int | None:
    """Patients still at risk at ``days`` in a training Kaplan-Meier curve, when it can tell.

    A curve that lists every patient's time (``n`` times after 0: no ties, no
    thinning) gives it exactly; any other gives None rather than a guess.
    """
    times = [float(t) for t in curve.get("days", [])]
    n = curve.get("n")
    if not times or times[0] != 0 or not isinstance(n, int) or len(times) - 1 != n:
        return None
    return sum(1 for t in times[1:] if t >= days)


def _nomogram_height(model: Model) -> float:
    """Inches a nomogram of ``model`` takes: a row per axis."""
    return 0.38 * (len(model.covariates) + 2 + len(model.outcomes)) + 0.3


def _figure_height(card: Mapping[str, Any], model: Model) -> float:
    """Inches a card's figure block takes: heading, nomogram, KM curves with numbers at risk."""
    return 0.6 + _nomogram_height(model) + (3.75 if is_survival(card) else 0.0)


def _figure_block(
    page: _Layout,
    score: Mapping[str, Any],
    card: Mapping[str, Any],
    model: Model,
    clinical: Mapping[str, Any] | None,
) -> None:
    """A card's nomogram (the model that gave the numbers); for survival, KM curves below."""
    survival = is_survival(card)
    height = _nomogram_height(model)
    version = f" {score['version']}" if score.get("version") else ""
    page.paragraph(
        f"{endpoint_name(str(score.get('endpoint', ''))).capitalize()}: "
        f"{score.get('signature')}{version}, {model.name}",
        size=10.5,
        weight="bold",
        after=0.02,
    )
    page.paragraph(
        "The model that gave the printed numbers. Red: this patient. Read each factor's "
        "points on the top axis, add them up on the total points axis and read the "
        "probabilities below it.",
        size=8,
        color=GREY,
    )
    ax = page.fig.add_axes(
        (MARGIN / PAGE_W, (page.y - height) / PAGE_H, TEXT_W / PAGE_W, height / PAGE_H)
    )
    marks = nomogram_axes(ax, model, patient_values(score, clinical))
    page.y -= height + 0.15
    printed = dict(survival_probabilities(score))
    if "probability" in score:
        printed = {"p": float(score["probability"])}
    read = [v for label, v in marks.items() if label in {lb for lb, _ in model.outcomes}]
    if any(all(abs(v - p) > 0.005 for p in printed.values()) for v in read):
        page.paragraph(
            "The probabilities read off this nomogram differ from the printed ones: "
            "the result was not made by this card's model as it is now.",
            size=8.5,
            weight="bold",
            color=RED,
        )
    if survival:
        _km_axes(page, score, card)
    page.y -= 0.2


def _km_axes(page: _Layout, score: Mapping[str, Any], card: Mapping[str, Any]) -> None:
    """Training KM curves by risk group, this patient's prediction, numbers at risk below."""
    fig = page.fig
    curves = (card.get("training") or {}).get("km_by_risk_group") or {}
    height = 2.5
    left = MARGIN + 0.7
    width = TEXT_W - 0.9
    top = page.y - 0.25
    ax = fig.add_axes((left / PAGE_W, (top - height) / PAGE_H, width / PAGE_W, height / PAGE_H))
    colours = {"low": "#2a7fff", "high": "#d62728"}
    last = 0.0
    for group in ("low", "high"):
        if group in curves:
            c = curves[group]
            ax.step(
                c["days"],
                c["survival"],
                where="post",
                color=colours[group],
                label=f"training {group} risk (n={c.get('n', '?')})",
            )
            last = max(last, float(c["days"][-1]))
    probs = [(float(d), p) for d, p in survival_probabilities(score)]
    if probs:
        ax.plot(
            [0, *[d for d, _ in probs]],
            [1, *[p for _, p in probs]],
            "o--",
            color="black",
            markersize=4,
            label="this patient (predicted)",
        )
        last = max(last, max(d for d, _ in probs))
    span = max(last, 365) * 1.02
    ticks = np.arange(0, span, 365.0)
    ax.set_xticks(ticks, [f"{t / 365:g}" for t in ticks])
    ax.set_xlim(0, span)
    ax.set(xlabel="years", ylabel=endpoint_name(str(score["endpoint"])), ylim=(0, 1.02))
    ax.set_title("Kaplan-Meier curves of the training cohort by rad-score risk group", fontsize=9.5)
    ax.grid(alpha=0.25)
    ax.legend(loc="lower left", fontsize=8)
    # Numbers at risk, one row per group, under the tick marks.
    page.y = top - height - 0.5
    page.put(MARGIN, page.y, "Number at risk", size=8.5, weight="bold", va="top")
    for group in (g for g in ("low", "high") if g in curves):
        page.y -= 0.17
        page.put(MARGIN, page.y, f"{group} risk", size=8, color=colours[group], va="top")
        counts = [at_risk(curves[group], float(t)) for t in ticks]
        if any(c is None for c in counts):
            page.put(
                left,
                page.y,
                "not recorded on the card (its curve is thinned or has ties)",
                size=8,
                color=GREY,
                va="top",
            )
            continue
        for t, count in zip(ticks, counts, strict=True):
            x = left + width * float(t) / span
            page.put(x, page.y, str(count), size=8, ha="center", va="top")
    page.y -= 0.2


def encode_pdf(
    sources: Sequence[Dataset],
    document: bytes,
    *,
    job_key: str,
    version_key: str,
    series_number: int = 9191,
    uid_root: str | None = None,
    title: str = TITLE,
    not_for_clinical_use: bool = True,
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
    ds.SeriesDescription = series_description(f"{title} (PDF)", not_for_clinical_use)
    ds.Manufacturer = MANUFACTURER
    ds.SoftwareVersions = SOFTWARE_VERSION
    ds.ConversionType = "WSD"
    ds.InstanceNumber = 1
    ds.ContentDate = now.strftime("%Y%m%d")
    ds.ContentTime = now.strftime("%H%M%S")
    ds.AcquisitionDateTime = now.strftime("%Y%m%d%H%M%S")
    ds.BurnedInAnnotation = "YES"  # the PDF shows the patient's name, images and numbers
    ds.DocumentTitle = series_description(title, not_for_clinical_use)
    ds.ConceptNameCodeSequence = []
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    ds.EncapsulatedDocumentLength = len(document)
    ds.EncapsulatedDocument = document + (b"\0" if len(document) % 2 else b"")
    reference = Dataset()
    reference.ReferencedSOPClassUID = first.SOPClassUID
    reference.ReferencedSOPInstanceUID = first.SOPInstanceUID
    ds.SourceInstanceSequence = [reference]
    return ds
