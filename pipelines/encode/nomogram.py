"""Nomograms and survival curves of the model that gave a card's printed numbers.

:func:`model_block` picks that model from the card: for a survival result
the nomogram with clinical factors when the result came from it (``model:
nomogram``), else the rad-score-only Cox model; for a logistic result the
rad-score itself (its log-odds). :func:`nomogram_axes` draws it the way
clinical nomograms are read: a points axis (0-100, the widest covariate
spans 100 points), one axis per covariate, total points, and one axis per
predicted probability, with the patient's values, total and probabilities
in red; it returns what it marked, so a test can check that the nomogram
reads off the printed numbers. :func:`at_risk` counts the training patients
still at risk on a card's Kaplan-Meier curve, when the curve can tell.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from matplotlib.ticker import MaxNLocator

from pipelines.encode.layout import RED
from pipelines.scoring import is_survival
from pipelines.scoring.text import endpoint_name, shown_times, survival_probabilities, years_text


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
        shown = shown_times([(t, 0.0) for t in shown])[:3]
        endpoint = endpoint_name(str(result.get("endpoint", "")))
        outcomes = tuple((f"{years_text(t)} {endpoint}", _survival_at(baseline[t])) for t in shown)
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
        ((f"probability of {endpoint}", logistic),),
    )


def _survival_at(s0: float) -> Callable[[float], float]:
    """``lp -> s0 ** exp(lp)``: survival at one time point of a Cox model."""
    return lambda lp: float(s0 ** math.exp(min(lp, 700.0)))  # no overflow far off the range


def logistic(lp: float) -> float:
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


LABEL_X = -4.0  # where axis labels end, in points


def nomogram_axes(ax: Any, model: Model, patient: Mapping[str, float]) -> dict[str, float]:
    """Draw the nomogram of ``model`` on ``ax``; return the patient's points and outcomes.

    Rows top-down: points (0-100), one axis per covariate (the widest spans
    100 points), total points, one axis per outcome. The patient's value on
    each covariate, total points and outcomes are marked in red; the
    outcomes read off the axes are the model's (the printed) numbers.
    """
    scale = _Scale.of(model)
    rows = len(model.covariates) + 2 + len(model.outcomes)
    y = float(rows)
    _axis(ax, y, "Points", [(p, f"{p:g}") for p in range(0, 101, 10)], 0, 100)
    marks: dict[str, float] = {}
    for c in model.covariates:
        y -= 1
        p = _covariate_row(ax, y, c, model, scale, patient.get(c), rows)
        if p is not None:
            marks[c] = p
    total = sum(marks.values())
    y -= 1
    per = 100.0 / scale.total_max if scale.total_max else 1.0
    step = _nice_step(scale.total_max)
    ticks = [(t * per, f"{t:g}") for t in np.arange(0, scale.total_max + 1e-9, step)]
    _axis(ax, y, "Total points", ticks, 0, 100)
    at = min(max(total * per, 0.0), 100.0)
    ax.plot([at], [y], "o", color=RED, markersize=5, zorder=5)
    marks["total_points"] = total
    lp = scale.offset + total / scale.scale
    for label, function in model.outcomes:
        y -= 1
        marks[label] = _outcome_row(ax, y, label, function, scale, per, lp, at)
    ax.plot([at, at], [y, y + len(model.outcomes) + 1], color=RED, linewidth=0.6, linestyle=":")
    ax.set_xlim(-45, 108)
    ax.set_ylim(y - 0.9, rows + 0.8)
    ax.axis("off")
    return marks


@dataclass(frozen=True)
class _Scale:
    """Points per unit of each covariate: the widest covariate spans 100 points."""

    coefficients: Mapping[str, float]
    zero: Mapping[str, float]  # each covariate's value at 0 points
    scale: float  # points per unit of linear predictor
    total_max: float  # the most total points
    offset: float  # the linear predictor at 0 total points

    @classmethod
    def of(cls, model: Model) -> _Scale:
        names = model.covariates
        zero = {
            c: model.ranges[c][0] if model.coefficients[c] > 0 else model.ranges[c][1]
            for c in names
        }
        spans = {
            c: abs(model.coefficients[c]) * (model.ranges[c][1] - model.ranges[c][0]) for c in names
        }
        scale = 100.0 / max(max(spans.values()), 1e-12)
        total_max = sum(scale * spans[c] for c in names)
        return cls(dict(model.coefficients), zero, scale, total_max, model.lp(zero))

    def points(self, c: str, v: float) -> float:
        """The points covariate ``c`` at value ``v`` adds."""
        return self.scale * self.coefficients[c] * (v - self.zero[c])


def _axis(
    ax: Any, y: float, label: str, ticks: Sequence[tuple[float, str]], lo: float, hi: float
) -> None:
    """A horizontal axis from ``lo`` to ``hi`` at height ``y`` with labelled ticks."""
    ax.plot([lo, hi], [y, y], color="black", linewidth=0.8)
    for x, text in ticks:
        ax.plot([x, x], [y, y + 0.12], color="black", linewidth=0.8)
        ax.text(x, y + 0.18, text, ha="center", va="bottom", fontsize=7)
    ax.text(LABEL_X, y, label, ha="right", va="center", fontsize=8.5)


def _covariate_row(
    ax: Any, y: float, c: str, model: Model, scale: _Scale, value: float | None, rows: int
) -> float | None:
    """Covariate ``c``'s axis, the patient's value marked; return its points (None: not given)."""
    lo, hi = model.ranges[c]
    ticks = MaxNLocator(nbins=6).tick_values(lo, hi)
    ticks = [t for t in ticks if lo - 1e-9 <= t <= hi + 1e-9]
    binary = (lo, hi) == (0.0, 1.0)
    labels = [(scale.points(c, t), ("yes" if t else "no") if binary else f"{t:g}") for t in ticks]
    ends = sorted([scale.points(c, lo), scale.points(c, hi)])
    _axis(ax, y, "Rad-score" if c == "radscore" else c.replace("_", " "), labels, *ends)
    if value is None:
        return None
    p = scale.points(c, value)
    shown = min(max(p, ends[0]), ends[1])  # a value off the axis is marked at its end
    ax.plot([shown], [y], "o", color=RED, markersize=5, zorder=5)
    ax.plot([shown, shown], [y, float(rows)], color=RED, linewidth=0.6, linestyle=":")
    if shown != p:
        ax.text(
            shown,
            y - 0.3,
            f"{value:.3g}: off the axis",
            color=RED,
            fontsize=7,
            ha="center",
            va="top",
        )
    return p


def _outcome_row(
    ax: Any,
    y: float,
    label: str,
    function: Callable[[float], float],
    scale: _Scale,
    per: float,
    lp: float,
    at: float,
) -> float:
    """One outcome's axis (probabilities at their total points), the patient's marked."""
    lp_lo, lp_hi = scale.offset, scale.offset + scale.total_max / scale.scale
    marked: list[tuple[float, str]] = []
    for prob in (0.01, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99):
        where = _inverse(function, prob, lp_lo, lp_hi)
        if where is not None:
            marked.append(((where - scale.offset) * scale.scale * per, f"{prob:g}"))
    if marked:
        xs = [x for x, _ in marked]
        _axis(ax, y, label, _spaced(marked), min(xs), max(xs))
    else:
        ax.text(LABEL_X, y, label, ha="right", va="center", fontsize=8.5)
    value = function(lp)
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
    return value


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
