"""How far to trust a mask: input checks before segmentation, agreement after it.

Two guards, because a network always draws *something*:

- :func:`check_input` refuses an image that is not a plausible MR before any
  network runs: a constant image, or one whose neighbouring voxels are no
  more alike than random noise (real MR, smooth at the scale of a voxel,
  has an in-plane neighbour correlation above 0.8 in every training image;
  white noise has about 0). The limits come from the model card
  (``input_checks``), which records what the training images showed.
- :class:`Quality` turns the agreement between the test-time views of the
  ensemble (mean pairwise Dice of the binarised mirror views, averaged over
  members) into a ``review`` flag, with the threshold chosen on the
  out-of-fold predictions of the card's cross-validation (``quality``).
  Low agreement means the network's answer depends on which way the image
  is flipped: the boundary, or the tumour itself, is a guess.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import SimpleITK as sitk

#: Used when a card predates input checks: far below any real MR, far above noise.
DEFAULT_MIN_CORRELATION = 0.5
#: Used when a card has no calibrated quality threshold.
DEFAULT_REVIEW_BELOW = 0.8


class InputRejected(ValueError):
    """The image is not something the model can segment; the message says what was measured."""


def neighbour_correlation(array: np.ndarray) -> float:
    """Pearson correlation between in-plane neighbours (x and y), over the tissue.

    Tissue: voxels above a tenth of the 99th percentile, so that air (zero in
    many scans, and perfectly correlated) does not inflate the figure.
    """
    x = np.asarray(array, dtype=np.float64)
    top = float(np.percentile(x, 99))
    pairs_a, pairs_b = [], []
    for axis in (-1, -2):
        n = x.shape[axis]
        if n < 2:
            continue
        a = np.take(x, np.arange(n - 1), axis=axis)
        b = np.take(x, np.arange(1, n), axis=axis)
        keep = (a > 0.1 * top) & (b > 0.1 * top) if top > 0 else np.ones_like(a, bool)
        pairs_a.append(a[keep])
        pairs_b.append(b[keep])
    if not pairs_a:
        return 0.0
    a, b = np.concatenate(pairs_a), np.concatenate(pairs_b)
    if a.size < 100 or a.std() == 0 or b.std() == 0:
        return 0.0
    return float(np.corrcoef(a, b)[0, 1])


def input_stats(image: sitk.Image) -> dict[str, float]:
    """What :func:`check_input` measures: intensity spread and neighbour correlation."""
    arr = sitk.GetArrayViewFromImage(image)
    return {
        "std": float(np.std(arr)),
        "neighbour_correlation": round(neighbour_correlation(arr), 4),
    }


def check_input(image: sitk.Image, checks: dict[str, Any]) -> dict[str, float]:
    """The measured statistics, or :class:`InputRejected` naming the failed check and its limit."""
    stats = input_stats(image)
    if stats["std"] == 0:
        raise InputRejected("the image is constant: no anatomy to segment")
    low = float(checks.get("min_neighbour_correlation", DEFAULT_MIN_CORRELATION))
    if stats["neighbour_correlation"] < low:
        raise InputRejected(
            "the image looks like noise, not MR anatomy: neighbouring voxels correlate "
            f"{stats['neighbour_correlation']:.2f}, below {low:.2f} "
            f"(training images: {checks.get('training_range', 'n/a')})"
        )
    return stats


def dice_arrays(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two boolean arrays; 1.0 when both are empty."""
    total = int(a.sum()) + int(b.sum())
    return 2.0 * float(np.logical_and(a, b).sum()) / total if total else 1.0


def agreement(probabilities: list[np.ndarray], cut: float = 0.5) -> float:
    """Mean pairwise Dice between the views' masks (probability cut at ``cut``)."""
    masks = [p >= cut for p in probabilities]
    pairs = list(itertools.combinations(range(len(masks)), 2))
    if not pairs:
        return 1.0
    return float(np.mean([dice_arrays(masks[i], masks[j]) for i, j in pairs]))


@dataclass
class Quality:
    """A mask's quality estimate and whether a person should review it before trusting numbers."""

    score: float | None
    review: bool
    threshold: float
    reasons: list[str] = field(default_factory=list)
    method: str = "mean pairwise Dice between mirror test-time views"

    @classmethod
    def judge(
        cls, score: float | None, calibration: dict[str, Any], *, located: bool = True
    ) -> Quality:
        """Flag for review below the card's threshold, or when the locator found nothing."""
        threshold = float(calibration.get("review_below", DEFAULT_REVIEW_BELOW))
        reasons = []
        if score is not None and score < threshold:
            reasons.append(
                f"views of the ensemble disagree: agreement {score:.2f} < {threshold:.2f}"
            )
        if not located:
            reasons.append("the locator found no tumour; the whole image was searched")
        return cls(
            None if score is None else round(score, 4),
            bool(reasons),
            threshold,
            reasons,
            str(calibration.get("method", cls.method)),
        )

    def as_dict(self) -> dict[str, Any]:
        """JSON-able form for job outputs, ``jobs show`` and the encoders."""
        return asdict(self)
