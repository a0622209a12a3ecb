"""How the tumour changed since a prior study: one pure function over two time points.

A :class:`TimePoint` is what the chain knows of one study once it is scored:
its date, the tumour's volume and longest axial diameter (the measurements
the SR carries, :func:`pipelines.encode.sr.tumour_measurements`) and each
card's result (rad-score, predictions, the feature values it scored).
:func:`compare` gives the :class:`Comparison` the reports print:

- the days between the studies;
- the volume change (%);
- the longest axial diameter change (mm and %) with a RECIST 1.1-style
  single-lesion category: PR at -30 % or less, PD at +20 % or more *and*
  at least +5 mm, else SD. It is an approximation of RECIST: one automatic
  lesion, its diameter measured on the mask over every axial slice (not by
  a reader on one slice), no non-target or new lesions, and the prior as
  the reference (RECIST takes the nadir for PD);
- delta-radiomics: the relative change of each feature a card scored on
  both studies, and the change of each score (rad-score; survival or
  endpoint probability when both have one).

The prior's values are the reference: a relative change divides by the
prior's value and is None where that is zero.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date
from typing import Any

#: RECIST 1.1 single-lesion thresholds used by :func:`recist_like`.
PR_PCT = -30.0
PD_PCT = 20.0
PD_MIN_MM = 5.0
APPROXIMATION = "RECIST-like approx."
CATEGORIES = {"PR": "partial response", "SD": "stable disease", "PD": "progressive disease"}


def _relative_pct(now: float, before: float) -> float | None:
    """``(now - before) / |before|`` in %, None when ``before`` is zero."""
    return None if before == 0 else 100.0 * (now - before) / abs(before)


def recist_like(diameter_mm: float, prior_diameter_mm: float) -> str:
    """PR, SD or PD for one lesion's longest diameter against the prior's (an approximation).

    Raises
    ------
    ValueError
        When the prior diameter is not positive (no reference to compare with).
    """
    if prior_diameter_mm <= 0:
        raise ValueError(f"prior diameter must be > 0 mm, got {prior_diameter_mm}")
    change = 100.0 * (diameter_mm - prior_diameter_mm) / prior_diameter_mm
    if change <= PR_PCT:
        return "PR"
    if change >= PD_PCT and diameter_mm - prior_diameter_mm >= PD_MIN_MM:
        return "PD"
    return "SD"


@dataclass(frozen=True)
class TimePoint:
    """One study's date, tumour measurements and card results."""

    study_instance_uid: str
    study_date: date
    volume_ml: float
    longest_axial_diameter_mm: float
    scores: tuple[Mapping[str, Any], ...] = ()
    #: (series UID, SOP Class UID, SOP Instance UID) of the images measured, for references.
    evidence: tuple[tuple[str, str, str], ...] = ()

    def __post_init__(self) -> None:
        if self.volume_ml <= 0 or self.longest_axial_diameter_mm <= 0:
            raise ValueError(
                f"study {self.study_instance_uid}: a time point needs a tumour "
                f"(volume {self.volume_ml} ml, diameter {self.longest_axial_diameter_mm} mm)"
            )

    def scored(self) -> dict[str, Mapping[str, Any]]:
        """Card id -> result, for the cards that scored this study."""
        return {str(s["signature"]): s for s in self.scores if "skipped" not in s}

    def to_json(self) -> dict[str, Any]:
        """The time point as JSON (the date as ISO text)."""
        return {
            "study_instance_uid": self.study_instance_uid,
            "study_date": self.study_date.isoformat(),
            "volume_ml": self.volume_ml,
            "longest_axial_diameter_mm": self.longest_axial_diameter_mm,
            "scores": [dict(s) for s in self.scores],
            "evidence": [list(e) for e in self.evidence],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> TimePoint:
        """Inverse of :meth:`to_json`."""
        return cls(
            str(data["study_instance_uid"]),
            date.fromisoformat(str(data["study_date"])),
            float(data["volume_ml"]),
            float(data["longest_axial_diameter_mm"]),
            tuple(data.get("scores", [])),
            tuple((str(a), str(b), str(c)) for a, b, c in data.get("evidence", [])),
        )


@dataclass(frozen=True)
class ScoreChange:
    """One card's change between the studies: rad-score and, when both have one, probability."""

    signature: str
    radscore: float
    prior_radscore: float
    probability: float | None = None  # the first predicted probability (0..1) now
    prior_probability: float | None = None
    features_pct: Mapping[str, float | None] = field(default_factory=dict)

    @property
    def radscore_delta(self) -> float:
        """Rad-score now minus the prior's (rad-scores are on a log-odds or log-hazard scale)."""
        return self.radscore - self.prior_radscore


@dataclass(frozen=True)
class Comparison:
    """The current study against its prior (see the module docstring)."""

    current: TimePoint
    prior: TimePoint
    days: int
    volume_pct: float
    diameter_mm: float
    diameter_pct: float
    category: str
    scores: tuple[ScoreChange, ...]
    #: The patient's time points before the prior, oldest first (from the prior's own
    #: comparison, when the node compared it too): the PDF's table and trend show them all.
    earlier: tuple[TimePoint, ...] = ()

    @property
    def points(self) -> tuple[TimePoint, ...]:
        """Every time point, oldest first: the earlier ones, the prior, the current study."""
        return (*self.earlier, self.prior, self.current)

    def headline(self) -> str:
        """One line: ``vs prior 2026-01-01 (+120 d): volume +40 % (PD, RECIST-like approx.)``."""
        return (
            f"vs prior {self.prior.study_date.isoformat()} ({self.days:+d} d): "
            f"volume {self.volume_pct:+.0f} % ({self.category}, {APPROXIMATION})"
        )

    def lines(self) -> list[str]:
        """The comparison as the lines the PDF and ``jobs show`` print."""
        out = [
            self.headline(),
            f"volume {self.prior.volume_ml:.1f} -> {self.current.volume_ml:.1f} ml "
            f"({self.volume_pct:+.1f} %)",
            f"longest axial diameter {self.prior.longest_axial_diameter_mm:.1f} -> "
            f"{self.current.longest_axial_diameter_mm:.1f} mm ({self.diameter_mm:+.1f} mm, "
            f"{self.diameter_pct:+.1f} %): {CATEGORIES[self.category]} "
            f"({APPROXIMATION}: one automatic lesion, prior as reference)",
        ]
        for s in self.scores:
            line = f"{s.signature}: rad-score {s.prior_radscore:.3f} -> {s.radscore:.3f}"
            if s.probability is not None and s.prior_probability is not None:
                line += (
                    f", probability {100 * s.prior_probability:.0f} -> {100 * s.probability:.0f} %"
                )
            out.append(line)
        return out

    def to_json(self) -> dict[str, Any]:
        """Everything, the time points included, as JSON."""
        return {
            "current": self.current.to_json(),
            "prior": self.prior.to_json(),
            "earlier": [p.to_json() for p in self.earlier],
            "days": self.days,
            "volume_pct": self.volume_pct,
            "diameter_mm": self.diameter_mm,
            "diameter_pct": self.diameter_pct,
            "category": self.category,
            "approximation": APPROXIMATION,
            "headline": self.headline(),
            "scores": [
                {
                    "signature": s.signature,
                    "radscore": s.radscore,
                    "prior_radscore": s.prior_radscore,
                    "radscore_delta": s.radscore_delta,
                    "probability": s.probability,
                    "prior_probability": s.prior_probability,
                    "features_pct": dict(s.features_pct),
                }
                for s in self.scores
            ],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Comparison:
        """Inverse of :meth:`to_json`."""
        return cls(
            current=TimePoint.from_json(data["current"]),
            prior=TimePoint.from_json(data["prior"]),
            days=int(data["days"]),
            volume_pct=float(data["volume_pct"]),
            diameter_mm=float(data["diameter_mm"]),
            diameter_pct=float(data["diameter_pct"]),
            category=str(data["category"]),
            scores=tuple(
                ScoreChange(
                    signature=str(s["signature"]),
                    radscore=float(s["radscore"]),
                    prior_radscore=float(s["prior_radscore"]),
                    probability=s.get("probability"),
                    prior_probability=s.get("prior_probability"),
                    features_pct=dict(s.get("features_pct") or {}),
                )
                for s in data.get("scores", [])
            ),
            earlier=tuple(TimePoint.from_json(p) for p in data.get("earlier", [])),
        )


def _probability(result: Mapping[str, Any]) -> float | None:
    """The card's first predicted probability: an endpoint's, else survival at its first time."""
    from pipelines.scoring.text import survival_probabilities

    if result.get("probability") is not None:
        return float(result["probability"])
    survival = survival_probabilities(result)
    return survival[0][1] if survival else None


def _score_changes(current: TimePoint, prior: TimePoint) -> tuple[ScoreChange, ...]:
    """Per card scored on both studies: rad-score, probability and feature changes."""
    before = prior.scored()
    changes = []
    for signature, now in current.scored().items():
        if signature not in before:
            continue
        then = before[signature]
        features_now: Mapping[str, float] = now.get("features") or {}
        features_then: Mapping[str, float] = then.get("features") or {}
        changes.append(
            ScoreChange(
                signature=signature,
                radscore=float(now["radscore"]),
                prior_radscore=float(then["radscore"]),
                probability=_probability(now),
                prior_probability=_probability(then),
                features_pct={
                    name: _relative_pct(float(value), float(features_then[name]))
                    for name, value in sorted(features_now.items())
                    if name in features_then
                },
            )
        )
    return tuple(changes)


def compare(current: TimePoint, prior: TimePoint, earlier: Sequence[TimePoint] = ()) -> Comparison:
    """The change from ``prior`` to ``current``; ``earlier`` time points ride along.

    ``earlier`` (the patient's studies before the prior) only feed the table
    and trend over all time points; those not earlier than the prior are dropped.

    Raises
    ------
    ValueError
        When the prior is not earlier than the current study (same day
        included: a comparison needs time between them).
    """
    days = (current.study_date - prior.study_date).days
    if days <= 0:
        raise ValueError(
            f"prior {prior.study_instance_uid} ({prior.study_date}) is not earlier than "
            f"{current.study_instance_uid} ({current.study_date})"
        )
    d_now, d_then = current.longest_axial_diameter_mm, prior.longest_axial_diameter_mm
    return Comparison(
        current=current,
        prior=prior,
        days=days,
        volume_pct=100.0 * (current.volume_ml - prior.volume_ml) / prior.volume_ml,
        diameter_mm=d_now - d_then,
        diameter_pct=100.0 * (d_now - d_then) / d_then,
        category=recist_like(d_now, d_then),
        scores=_score_changes(current, prior),
        earlier=tuple(
            sorted(
                (p for p in earlier if p.study_date < prior.study_date),
                key=lambda p: p.study_date,
            )
        ),
    )


def trend(points: Sequence[TimePoint]) -> list[tuple[date, float, float]]:
    """(date, volume ml, diameter mm) over the time points, oldest first (the PDF's table)."""
    ordered = sorted(points, key=lambda p: p.study_date)
    return [(p.study_date, p.volume_ml, p.longest_axial_diameter_mm) for p in ordered]
