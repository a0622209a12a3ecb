"""The PDF's comparison with the prior study: the change, a table of time points, a trend.

Drawn by :func:`pipelines.encode.pdf.report_pdf` under the tumour's
measurements when the job compared the study with a prior
(:class:`pipelines.compare.Comparison`).
"""

from __future__ import annotations

from datetime import date

from pipelines.compare import APPROXIMATION, CATEGORIES, Comparison, trend
from pipelines.encode.layout import GREY, MARGIN, PAGE_H, PAGE_W, TEXT_W, Pages

PLOT_H = 1.5  # inches


def comparison_block(page: Pages, comparison: Comparison) -> None:
    """Heading, the one-line change, a table over the time points and a volume trend plot."""
    page.room(1.2 + PLOT_H)
    page.paragraph("Change since the prior study", size=11.5, weight="bold", after=0.06)
    page.paragraph(comparison.headline(), weight="bold")
    page.paragraph(
        f"Diameter {comparison.diameter_mm:+.1f} mm ({comparison.diameter_pct:+.1f} %): "
        f"{CATEGORIES[comparison.category]}. {APPROXIMATION}: one automatic lesion measured "
        "on every axial slice, the prior as reference (not a reader's RECIST 1.1).",
        size=8,
        color=GREY,
    )
    rows = [("Date", "Volume (ml)", "Longest axial diameter (mm)", "Study")]
    uids = {p.study_date: p.study_instance_uid for p in comparison.points}
    points = trend(comparison.points)
    for day, volume, diameter in points:
        rows.append((day.isoformat(), f"{volume:.1f}", f"{diameter:.1f}", uids[day][-24:]))
    columns = (0.0, 1.1, 2.2, 4.3)
    for i, row in enumerate(rows):
        for x, text in zip(columns, row, strict=True):
            page.put(
                MARGIN + x,
                page.y,
                text,
                size=8 if i == 0 else 9,
                color=GREY if i == 0 else "black",
                va="top",
            )
        page.y -= 0.18
    for s in comparison.scores:
        line = f"{s.signature}: rad-score {s.prior_radscore:.3f} -> {s.radscore:.3f}"
        if s.probability is not None and s.prior_probability is not None:
            before, now = 100 * s.prior_probability, 100 * s.probability
            line += f"; predicted probability {before:.0f} -> {now:.0f} %"
        changed = sorted(
            ((abs(v), k, v) for k, v in s.features_pct.items() if v is not None), reverse=True
        )[:3]
        if changed:
            line += "; largest feature changes " + ", ".join(
                f"{k} {v:+.0f} %" for _, k, v in changed
            )
        page.paragraph(line, size=8)
    _plot(page, points)


def _plot(page: Pages, points: list[tuple[date, float, float]]) -> None:
    """Volume over the days since the first time point."""
    first = points[0][0]
    days = [(p[0] - first).days for p in points]
    top = page.y - 0.1
    ax = page.fig.add_axes(
        ((MARGIN + 0.6) / PAGE_W, (top - PLOT_H) / PAGE_H, (TEXT_W / 2) / PAGE_W, PLOT_H / PAGE_H)
    )
    ax.plot(days, [p[1] for p in points], "o-", color="black")
    ax.set(xlabel="days since the first study", ylabel="tumour volume (ml)")
    ax.set_ylim(0, max(p[1] for p in points) * 1.2)
    page.y = top - PLOT_H - 0.45
