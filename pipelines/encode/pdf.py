"""The report for people: a typeset PDF, put in the study by :mod:`pipelines.encode.document`.

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
patient's predicted survival (:mod:`pipelines.encode.nomogram`). Pages are
typeset by :mod:`pipelines.encode.layout`: DejaVu Sans embedded as TrueType,
so ``pdftotext`` reads the text.
"""

from __future__ import annotations

import io
import re
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import matplotlib

matplotlib.use("Agg")
import numpy as np
import SimpleITK as sitk
from matplotlib.backends.backend_pdf import PdfPages
from pydicom.dataset import Dataset

from pipelines.compare import Comparison
from pipelines.encode.document import TITLE
from pipelines.encode.layout import (
    GREY,
    LEADING,
    MARGIN,
    PAGE_H,
    PAGE_W,
    RC,
    RED,
    TEXT_W,
    Pages,
    wrap,
)
from pipelines.encode.nomogram import (
    Model,
    at_risk,
    logistic,
    model_block,
    nomogram_axes,
    patient_values,
)
from pipelines.encode.seg import SOFTWARE_VERSION, WARNING
from pipelines.encode.sr import key_slice, outline
from pipelines.encode.trend import comparison_block
from pipelines.scoring import is_survival
from pipelines.scoring.cards import cohort_text
from pipelines.scoring.text import (
    confident,
    endpoint_name,
    risk_text,
    shown_times,
    survival_probabilities,
    years_text,
)
from pipelines.scoring.text import verdict as verdict_text


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
    probability = logistic(float(value))
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
        return f"Cox model of {endpoint} on {_inputs(card)} (rad-score: weighted sum of features)."
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
        times = shown_times(probs)
        shown = ", ".join(f"{years_text(t)} {p:.0%}" for t, p in probs if t in times)
        words += f" Predicted {endpoint_name(str(result['endpoint']))} ({model}): {shown}."
    elif "probability" in result:
        words += (
            f" Predicted probability of {endpoint_name(str(result['endpoint']))}: "
            f"{float(result['probability']):.0%}."
        )
    return words


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
    comparison: Comparison | None = None,
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
    ``comparison`` adds the change since the prior study (table and trend).
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
        page = Pages(pdf, warning, made, heading=TITLE)
        page.new_page(TITLE)
        patient, study = header_rows(key)
        low = min(
            page.labelled(patient, MARGIN, TEXT_W / 2),
            page.labelled(study, MARGIN + TEXT_W / 2, TEXT_W / 2),
        )
        page.y = low - 0.06
        _key_slice(page, image, mask, k, key, role)
        _measurements(page, facts, segmentation_model, quality, models)
        page.y -= 0.1
        if comparison is not None:
            comparison_block(page, comparison)
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
    page: Pages, image: sitk.Image, mask: np.ndarray, k: int, key: Dataset, role: str
) -> None:
    """The key slice with the outline at the left; its name below it."""
    size = 2.35
    top = page.y
    ax = page.fig.add_axes((MARGIN / PAGE_W, (top - size) / PAGE_H, size / PAGE_W, size / PAGE_H))
    pixels = sitk.GetArrayViewFromImage(image)[k]
    low, high = np.percentile(pixels, [1, 99.5])
    ax.imshow(pixels, cmap="gray", vmin=low, vmax=high)
    xy = outline(mask[k]) - 0.5  # SCOORD pixel corners -> imshow pixel centres
    ax.plot(xy[:, 0], xy[:, 1], color="#ff3030", linewidth=1.2)
    ax.axis("off")
    caption = wrap(f"Key slice (largest tumour area): {key_slice_text(key, role)}", size, 7.5)
    y = top - size - 0.05
    for line in caption:
        page.put(MARGIN, y, line, size=7.5, color=GREY, va="top")
        y -= 7.5 * LEADING / 72
    page.side_bottom = y - 0.1
    page.side_x = MARGIN + size + 0.25


def _measurements(
    page: Pages,
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


def _card_block(page: Pages, score: Mapping[str, Any], card: Mapping[str, Any] | None) -> None:
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
    if score.get("missing_clinical") and confident(score):  # only predictions use them
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
    page.y -= 0.03


def _nomogram_height(model: Model) -> float:
    """Inches a nomogram of ``model`` takes: a row per axis."""
    return 0.38 * (len(model.covariates) + 2 + len(model.outcomes)) + 0.3


def _figure_height(card: Mapping[str, Any], model: Model) -> float:
    """Inches a card's figure block takes: heading, nomogram, KM curves with numbers at risk."""
    return 0.6 + _nomogram_height(model) + (3.75 if is_survival(card) else 0.0)


def _figure_block(
    page: Pages,
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


def _km_axes(page: Pages, score: Mapping[str, Any], card: Mapping[str, Any]) -> None:
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
