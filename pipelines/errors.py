"""Bad input: the study itself is the problem, so no retry can help.

One small exception family, raised by the stages (``pipelines/``) and the
node's stage adapter alike, and caught by the job executor as its one
"fail at once, with the reason" class. Anything else a stage raises is an
internal error: the executor logs it with its traceback and retries it
under the node's retry policy.

Each class is a ``ValueError`` (bad input is a bad value), and its message
is the reason shown to the admin (``jobs show``, the audit detail), so it
names the series or the measurement, never patient data.
"""

from __future__ import annotations


class BadInput(ValueError):
    """The study cannot be processed as it is; the message says why."""

    @property
    def reason(self) -> str:
        """The message, or the class name when the message is empty."""
        return str(self) or type(self).__name__


class GeometryError(BadInput):
    """A series cannot be turned into a trustworthy volume (oblique mix, gaps, mixed sizes)."""


class MissingSeriesError(BadInput):
    """A series the job was created for is no longer there, or lacks its files."""


class ImplausibleImageError(BadInput):
    """The image is not something the model can segment (constant, noise, not anatomy)."""


class NoTumourError(BadInput):
    """The segmentation found no tumour on the series it was asked to segment."""


__all__ = [
    "BadInput",
    "GeometryError",
    "ImplausibleImageError",
    "MissingSeriesError",
    "NoTumourError",
]
