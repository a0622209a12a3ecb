"""The cross-validation's HTML report: summary, every patient, the worst five on their key slice.

Split from :mod:`.cv` (which runs the folds) so that the CV module keeps to
training and scoring; :func:`write_report` is called once all folds end.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import SimpleITK as sitk

from pipelines.segment.data import CaseRef

if TYPE_CHECKING:
    from pipelines.segment.cv import Recipe


def key_slice_png(
    image: sitk.Image, truth: sitk.Image, pred: sitk.Image, path: Path, title: str
) -> None:
    """Truth (green) and prediction (orange) outlines on the axial slice with most tumour."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    img = sitk.GetArrayFromImage(image)
    t = sitk.GetArrayFromImage(truth) > 0
    p = sitk.GetArrayFromImage(pred) > 0
    k = int(np.argmax(t.sum(axis=(1, 2))))
    sx, sy = image.GetSpacing()[:2]
    fig, ax = plt.subplots(figsize=(4, 4 * img.shape[1] * sy / (img.shape[2] * sx)))
    ax.imshow(img[k], cmap="gray", aspect=sy / sx)
    if t[k].any():
        ax.contour(t[k], levels=[0.5], colors=["#2ca02c"], linewidths=1.5)
    if p[k].any():
        ax.contour(p[k], levels=[0.5], colors=["#ff7f0e"], linewidths=1.5)
    ax.set_title(title, fontsize=9)
    ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_report(
    out: Path,
    summary: dict[str, Any],
    recipe: Recipe,
    loaded: dict[str, tuple[sitk.Image, sitk.Image]],
    refs: dict[str, CaseRef],
) -> Path:
    """``report.html``: summary, every patient's figures, the worst five on their key slice."""
    worst = sorted(summary["rows"], key=lambda r: r["dice"])[:5]
    figures = []
    for r in worst:
        ref = refs[r["patient"]]
        image, truth = loaded[ref.case_id]
        pred = sitk.ReadImage(str(out / "oof" / f"{r['patient']}.nii.gz"))
        pred.CopyInformation(image)
        png = out / f"worst_{r['patient']}.png"
        key_slice_png(
            image,
            truth,
            pred,
            png,
            f"{r['patient']}: Dice {r['dice']:.2f} (green truth, orange model)",
        )
        figures.append(png.name)
    q = summary["quality_flag"]["out_of_fold"]
    lines = [
        "<!doctype html><meta charset='utf-8'><title>sarcnode segmentation CV</title>",
        "<style>body{font-family:sans-serif;max-width:60em}td,th{padding:2px 8px;text-align:right}"
        "</style>",
        f"<h1>Cross-validation: {html.escape(recipe.name)}</h1>",
        f"<p>{html.escape(recipe.description)}</p>",
        f"<p>{summary['n']} real patients, each scored by the fold model that neither trained "
        "nor selected on it. NOT FOR CLINICAL USE.</p>",
        f"<p><b>Dice {summary['dice_mean']:.3f} (95% CI {summary['dice_ci95'][0]:.3f}-"
        f"{summary['dice_ci95'][1]:.3f})</b>, median {summary['dice_median']:.3f}, "
        f"{summary['below_0.7']} below 0.7; HD95 {summary['hd95_mm_mean']:.1f} mm.</p>",
        f"<p>Quality flag (out-of-fold): {q['caught']} of {q['failures']} failures flagged, "
        f"{q['false_flags']} of {q['successes']} successes flagged.</p>",
        "<h2>Worst five</h2>",
        *(f"<img src='{html.escape(f)}' alt='{html.escape(f)}'>" for f in figures),
        "<h2>Every patient</h2><table><tr><th>patient</th><th>fold</th><th>Dice</th>"
        "<th>HD95 mm</th><th>agreement</th><th>ml</th><th>truth ml</th></tr>",
        *(
            f"<tr><td>{r['patient']}</td><td>{r['fold']}</td><td>{r['dice']:.3f}</td>"
            f"<td>{r['hd95_mm']}</td><td>{r['agreement']}</td><td>{r['volume_ml']}</td>"
            f"<td>{r['truth_ml']}</td></tr>"
            for r in summary["rows"]
        ),
        "</table>",
    ]
    path = out / "report.html"
    path.write_text("\n".join(lines) + "\n")
    return path
