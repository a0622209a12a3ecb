"""A card's applicability domain: whether a study lies inside what the model was fitted on.

A signature answers for studies like its training cases; far outside their
range a linear rad-score and a Cox model extrapolate without limit (a study
of random noise once got rad-score 4.32 against a training range of -2.13 to
3.16, and predicted PFS 1.6e-41). So every score carries a verdict:

- ``inside``: each card feature (its value as extracted, before
  harmonisation and z-scoring) and the rad-score lie within their training
  ranges (``applicability`` block of the card; a card without that block
  falls back to the rad-score range of its nomogram, ``nomogram.ranges``);
- ``outside``: at least one does not. Which one, and by how much (beyond the
  nearest bound, absolute and as a fraction of the training range's width),
  is part of the verdict, and the risk group is not given;
- ``unknown``: the card records no training range at all.

:func:`applicability_block` makes the block from the training cases' raw
feature values; :func:`reconstruct_block` is how a card fitted before the
block existed (the synthetic demo card) gets it after the fact
(``sarcnode card-applicability``, ``make pfs-applicability``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipelines.signature.card import ScoreError

INSIDE, OUTSIDE, UNKNOWN = "inside", "outside", "unknown"
OUTSIDE_WORDS = "outside the model's range"
INSIDE_WORDS = "within the model's range"
UNKNOWN_WORDS = "applicability domain unknown"
RADSCORE = "rad-score"


def _g(value: float) -> str:
    """Four significant figures, no exponent for ordinary magnitudes."""
    return f"{value:.4g}"


@dataclass(frozen=True)
class Excursion:
    """One value beyond its training range."""

    name: str
    value: float
    low: float
    high: float

    def __post_init__(self) -> None:
        """Refuse a value that is not outside ``[low, high]``."""
        if self.low <= self.value <= self.high:
            raise ValueError(f"{self.name}: {self.value} is inside [{self.low}, {self.high}]")

    @property
    def side(self) -> str:
        """``above`` or ``below`` the training range."""
        return "above" if self.value > self.high else "below"

    @property
    def by(self) -> float:
        """Distance beyond the nearest bound (positive)."""
        return self.value - self.high if self.value > self.high else self.low - self.value

    @property
    def by_fraction(self) -> float | None:
        """:attr:`by` in widths of the training range (None for a range of zero width)."""
        width = self.high - self.low
        return self.by / width if width > 0 else None

    def text(self) -> str:
        """``rad-score 4.32 above the training range -2.132 to 3.162 by 1.158 (22% of it)``."""
        share = "" if self.by_fraction is None else f" ({self.by_fraction:.0%} of its width)"
        return (
            f"{self.name} {_g(self.value)} {self.side} the training range "
            f"{_g(self.low)} to {_g(self.high)} by {_g(self.by)}{share}"
        )

    def as_dict(self) -> dict[str, Any]:
        """JSON-able: name, value, range, side, by, by_fraction."""
        return {
            "name": self.name,
            "value": self.value,
            "range": [self.low, self.high],
            "side": self.side,
            "by": self.by,
            "by_fraction": self.by_fraction,
        }


@dataclass(frozen=True)
class Verdict:
    """Whether a study lies inside a card's applicability domain, and why (not)."""

    status: str  # inside | outside | unknown
    source: str | None  # "applicability" | "nomogram.ranges" | None
    checked: tuple[str, ...] = ()
    outside: tuple[Excursion, ...] = ()
    unchecked: tuple[str, ...] = ()  # card features without a recorded range
    n_train: int | None = None

    def __post_init__(self) -> None:
        """A verdict agrees with its excursions."""
        if self.status not in (INSIDE, OUTSIDE, UNKNOWN):
            raise ValueError(f"unknown applicability status {self.status!r}")
        if (self.status == OUTSIDE) != bool(self.outside):
            raise ValueError("an 'outside' verdict needs its excursions, and only it has some")

    @property
    def confident(self) -> bool:
        """May a risk group be shown as such? Not outside the range."""
        return self.status != OUTSIDE

    def text(self) -> str:
        """One line for people: the verdict and, when outside, every excursion."""
        if self.status == UNKNOWN:
            return f"{UNKNOWN_WORDS} (the card records no training ranges)"
        if self.status == OUTSIDE:
            return f"{OUTSIDE_WORDS}: " + "; ".join(e.text() for e in self.outside)
        features = [c for c in self.checked if c != RADSCORE]
        what = " and ".join(
            part
            for part in (
                f"{len(features)} feature(s)" if features else "",
                "the rad-score" if RADSCORE in self.checked else "",
            )
            if part
        )
        cases = f" ({self.n_train} cases)" if self.n_train else ""
        gaps = f"; no range recorded for {', '.join(self.unchecked)}" if self.unchecked else ""
        if self.source != "applicability":
            gaps += "; the card records no feature ranges"
        return f"{INSIDE_WORDS}: {what} inside the training range{cases}{gaps}"

    def as_dict(self) -> dict[str, Any]:
        """JSON-able, with the line people read as ``text``."""
        return {
            "status": self.status,
            "text": self.text(),
            "source": self.source,
            "checked": list(self.checked),
            "outside": [e.as_dict() for e in self.outside],
            "unchecked": list(self.unchecked),
            "n_train": self.n_train,
        }


def _range(value: Any, where: str) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in value)
    except (TypeError, ValueError) as exc:
        raise ScoreError(f"{where}: a range is [min, max], not {value!r}") from exc
    if not (math.isfinite(low) and math.isfinite(high)) or low > high:
        raise ScoreError(f"{where}: bad range [{low}, {high}]")
    return low, high


def check_block(card: Mapping[str, Any]) -> None:
    """Raise :class:`ScoreError` when a card's ``applicability`` block is malformed."""
    block = card.get("applicability")
    if block is None:
        return
    where = f"signature {card.get('id')}: applicability"
    if not isinstance(block, Mapping):
        raise ScoreError(f"{where} must be a mapping")
    features = block.get("features") or {}
    if not isinstance(features, Mapping):
        raise ScoreError(f"{where}.features maps feature names to [min, max]")
    for name, value in features.items():
        _range(value, f"{where}.features[{name}]")
    if "radscore" in block:
        _range(block["radscore"], f"{where}.radscore")
    n = block.get("n_train")
    if n is not None and (not isinstance(n, int) or n < 1):
        raise ScoreError(f"{where}.n_train must be a positive whole number")


def judge(card: Mapping[str, Any], features: Mapping[str, float], radscore: float) -> Verdict:
    """The verdict for one study: its card features' raw values and its rad-score."""
    check_block(card)
    block = card.get("applicability")
    ranges: dict[str, tuple[float, float]] = {}
    unchecked: list[str] = []
    source: str | None
    if block:
        source = "applicability"
        known = block.get("features") or {}
        for f in card["features"]:
            if f["name"] in known:
                ranges[f["name"]] = _range(known[f["name"]], f["name"])
            else:
                unchecked.append(f["name"])
        if "radscore" in block:
            ranges[RADSCORE] = _range(block["radscore"], RADSCORE)
        n_train = block.get("n_train")
    else:
        fallback = ((card.get("nomogram") or {}).get("ranges") or {}).get("radscore")
        if fallback is None:
            return Verdict(UNKNOWN, None)
        source = "nomogram.ranges"
        ranges[RADSCORE] = _range(fallback, "nomogram.ranges.radscore")
        n_train = (card.get("training") or {}).get("n")
    if not ranges:
        return Verdict(UNKNOWN, None, unchecked=tuple(unchecked))
    values = {name: float(features[name]) for name in ranges if name != RADSCORE}
    values[RADSCORE] = float(radscore)
    outside = tuple(
        Excursion(name, values[name], low, high)
        for name, (low, high) in ranges.items()
        if not low <= values[name] <= high
    )
    return Verdict(
        OUTSIDE if outside else INSIDE,
        source,
        checked=tuple(ranges),
        outside=outside,
        unchecked=tuple(unchecked),
        n_train=int(n_train) if n_train else None,
    )


@dataclass(frozen=True)
class Block:
    """An ``applicability`` block, made from the training cases."""

    features: dict[str, list[float]] = field(default_factory=dict)
    radscore: list[float] = field(default_factory=list)
    n_train: int = 0

    def as_dict(self) -> dict[str, Any]:
        """What goes in the card."""
        return {"features": self.features, "radscore": self.radscore, "n_train": self.n_train}


def applicability_block(card: Mapping[str, Any], training: pd.DataFrame) -> Block:
    """Training range of each card feature and of the rad-score, from the training cases.

    ``training`` holds the raw (as extracted) values of the card's features,
    one row per training case. The rad-score is recomputed with the card's
    own means, SDs and coefficients. A card fitted with ComBat is refused:
    its rad-score is computed on harmonised values, which this function does
    not reproduce.

    Raises
    ------
    ScoreError
        When a card feature is missing from ``training`` or has missing values,
        or the card has a ComBat block.
    """
    if card.get("combat"):
        raise ScoreError(f"signature {card.get('id')}: ComBat cards are not supported here")
    names = [f["name"] for f in card["features"]]
    missing = [n for n in names if n not in training.columns]
    if missing:
        raise ScoreError(f"training table lacks card feature(s) {', '.join(missing)}")
    x = training[names].astype(float)
    if x.isna().any().any():
        raise ScoreError("training table has missing values in the card's features")
    means = np.array([f["mean"] for f in card["features"]])
    sds = np.array([f["sd"] for f in card["features"]])
    coefficients = np.array([f["coefficient"] for f in card["features"]])
    radscore = float(card.get("intercept", 0.0)) + ((x.to_numpy() - means) / sds) @ coefficients
    return Block(
        features={n: [float(x[n].min()), float(x[n].max())] for n in names},
        radscore=[float(radscore.min()), float(radscore.max())],
        n_train=len(x),
    )


def reconstruct_block(
    card: Mapping[str, Any], features_csv: Path, clinical_csv: Path, *, val_fraction: float = 0.3
) -> Block:
    """The block of a card ``fit-signature`` wrote, from its feature cache and clinical table.

    The card does not list its training cases; they are re-drawn as the fit
    drew them (the same split function: the clinical table's ``split``
    column, else a random ``val_fraction`` with seed ``training.lasso.seed``,
    stratified by the event or the label) and accepted only if they give
    back the card's training size and every feature's training mean and SD
    (relative 1e-9): proof that they are the cases the card was fitted on.

    Raises
    ------
    ScoreError
        When the re-drawn cases do not reproduce the card.
    """
    from pipelines.signature.cohort import read_clinical, read_features
    from pipelines.signature.pfs import _split, derive_clinical

    features = read_features(features_csv)
    clinical = read_clinical(clinical_csv)
    ids = features.index.intersection(clinical.index)
    clinical = derive_clinical(clinical.loc[ids])
    seed = int(card["training"]["lasso"]["seed"])
    strata = "event" if "radscore_cox" in card else str(card.get("label"))
    split = _split(clinical, strata, val_fraction, seed)
    training = features.loc[ids][split == "train"]
    if len(training) != int(card["training"]["n"]):
        raise ScoreError(
            f"re-drew {len(training)} training cases, the card says {card['training']['n']}"
        )
    for f in card["features"]:
        column = training[f["name"]].astype(float)
        mean, sd = float(column.mean()), float(column.std(ddof=0))
        if not (
            math.isclose(mean, f["mean"], rel_tol=1e-9) and math.isclose(sd, f["sd"], rel_tol=1e-9)
        ):
            raise ScoreError(
                f"{f['name']}: re-drawn training mean/SD {mean}/{sd} differ from the card's "
                f"{f['mean']}/{f['sd']}: not the cases the card was fitted on"
            )
    return applicability_block(card, training)
