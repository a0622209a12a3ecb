"""Typesetting A4 pages with matplotlib: measured text, wrapped paragraphs, page breaks.

The report is drawn with matplotlib (no other PDF library in the node's
dependencies). :class:`Pages` fills pages top-down in inches: paragraphs
wrap at the text width by the real width of each word in DejaVu Sans, a
paragraph that reaches the footer continues on a new page with the heading
and the warning band, and :meth:`Pages.finish` numbers the pages. Text is
embedded as TrueType (``pdf.fonttype`` 42), so ``pdftotext`` and screen
readers get the words.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.font_manager import FontProperties
from matplotlib.patches import Rectangle
from matplotlib.textpath import TextToPath

from pipelines.encode.seg import SOFTWARE_VERSION

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


def text_width(text: str, size: float, weight: str = "normal") -> float:
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
            if line and text_width(candidate, size, weight) > width:
                lines.append(line)
                line = word
            else:
                line = candidate
        lines.append(line)
    return lines


@dataclass
class Pages:
    """Pages filled top-down: paragraphs wrap to the text width, a full page starts another."""

    pdf: Any  # PdfPages (its savefig is untyped)
    warning: str
    made: str
    figures: list[Any] = field(default_factory=list)
    y: float = 0.0
    side_x: float = MARGIN  # where the column beside the key slice starts
    side_bottom: float = PAGE_H  # where the key slice and its caption end
    heading: str = ""  # the heading a continuation page repeats

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
