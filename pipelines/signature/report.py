"""The evaluation report: the tables and figures the source papers print, as PNG + HTML.

Survival (PFS): C-index with bootstrap CI for rad-score and nomogram,
time-dependent AUC over time, Kaplan-Meier by risk group with the log-rank p,
calibration at 600 days (predicted vs Kaplan-Meier observed, by quintile),
decision curve at 600 days, forest plot of the nomogram's hazard ratios, and
the nomogram as a points chart. Logistic: ROC with AUC (DeLong CI) and the
DeLong test, calibration by decile with Hosmer-Lemeshow, decision curve.
Every page says "not for clinical use" when the card does.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import pandas as pd
from lifelines import KaplanMeierFitter
from lifelines.statistics import logrank_test
from matplotlib import pyplot as plt
from sksurv.metrics import brier_score, cumulative_dynamic_auc, integrated_brier_score
from sksurv.util import Surv

from pipelines.signature.classify import delong, hosmer_lemeshow
from pipelines.signature.survival import bootstrap_c

matplotlib.use("Agg")  # files only: no display on a node
STYLE = (
    "body{font-family:sans-serif;max-width:960px;margin:auto} .warn{color:#a00;font-weight:bold}"
    " figure{display:inline-block;margin:8px} td{padding:2px 8px;vertical-align:top}"
)


def _save(fig: Any, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def net_benefit(event_by_t: np.ndarray, risk: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Net benefit of treating when risk >= threshold (Vickers & Elkin 2006)."""
    n = len(risk)
    out = []
    for pt in thresholds:
        treat = risk >= pt
        tp = np.sum(treat & (event_by_t == 1)) / n
        fp = np.sum(treat & (event_by_t == 0)) / n
        out.append(tp - fp * pt / (1 - pt))
    return np.array(out)


def decision_curve(events: np.ndarray, risk: np.ndarray, xlabel: str, path: Path) -> str:
    """Net benefit of the model against treat-all and treat-none, saved as ``path``."""
    thresholds = np.linspace(0.05, 0.8, 31)
    prevalence = float(events.mean())
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(thresholds, net_benefit(events, risk, thresholds), label="model")
    treat_all = prevalence - (1 - prevalence) * thresholds / (1 - thresholds)
    ax.plot(thresholds, treat_all, label="treat all")
    ax.axhline(0, c="k", lw=0.8, label="treat none")
    ax.set(xlabel=xlabel, ylabel="net benefit", ylim=(-0.05, max(0.05, prevalence) * 1.1))
    ax.legend()
    return _save(fig, path)


def _brier_curve(
    scores: pd.DataFrame, t: np.ndarray, e: np.ndarray
) -> tuple[np.ndarray, np.ndarray, float | None] | None:
    """Brier score (IPCW) at the card's time points inside follow-up, and their integral.

    The card predicts survival at fixed days (``pfs_<day>`` columns); the
    censoring distribution is estimated on this cohort. The integrated score
    (trapezoid over those days, divided by their span) needs two or more.
    """
    columns = {float(c[4:]): c for c in scores.columns if c.startswith("pfs_")}
    times = np.array(sorted(d for d in columns if t.min() < d < t.max()))
    if times.size == 0:
        return None
    y = Surv.from_arrays(e.astype(bool), t)
    survival = scores[[columns[d] for d in times]].to_numpy(float)
    _, values = brier_score(y, y, survival, times)
    ibs = None
    if times.size >= 2:
        ibs = float(integrated_brier_score(y, y, survival, times))
    return times, values, ibs


def survival_report(card: dict[str, Any], scores: pd.DataFrame, out: Path) -> dict[str, Any]:
    """Figures and metrics for a PFS card.

    ``scores`` holds per case: time, event, radscore, risk_group,
    linear_predictor and pfs_<day> (the card's predictions at its time points).
    """
    out.mkdir(parents=True, exist_ok=True)
    t, e = scores["time"].to_numpy(float), scores["event"].to_numpy(int)
    metrics: dict[str, Any] = {"n": len(scores), "events": int(e.sum())}
    for name in ("radscore", "linear_predictor"):
        c, lo, hi = bootstrap_c(t, e, scores[name].to_numpy(), n=1000)
        metrics[f"c_index_{name}"] = {"value": round(c, 4), "ci95": [round(lo, 4), round(hi, 4)]}
    figures: dict[str, str] = {}
    _td_auc(scores, t, e, out, metrics, figures)
    _brier(scores, t, e, out, metrics, figures)
    radscore = card["radscore"]
    metrics["risk_cutoff"] = {
        "value": radscore.get("cutoff"),
        "rule": radscore.get("cutoff_rule", "training median"),
    }
    _km(scores, t, e, out, metrics, figures)
    if "pfs_600" in scores:
        _calibration(scores, t, e, out, metrics, figures)
    nomogram = card["nomogram"]
    names = nomogram["covariates"]
    hr = np.array([nomogram["hazard_ratios"][c] for c in names])
    fig, ax = plt.subplots(figsize=(5, 0.6 * len(names) + 1.2))
    ax.scatter(hr, range(len(names)))
    ax.axvline(1, c="grey", ls="--")
    ax.set_yticks(range(len(names)), names)
    ax.set_xscale("log")
    ax.set(xlabel="hazard ratio (training fit)", title="Nomogram covariates")
    figures["forest"] = _save(fig, out / "forest.png")
    figures["nomogram"] = _save(nomogram_figure(card, None), out / "nomogram.png")
    return {"metrics": metrics, "figures": figures}


def _td_auc(
    scores: pd.DataFrame,
    t: np.ndarray,
    e: np.ndarray,
    out: Path,
    metrics: dict[str, Any],
    figures: dict[str, str],
) -> None:
    """Time-dependent AUC of the rad-score: a curve over the event times, and at 300/600/900 d."""
    y = Surv.from_arrays(e.astype(bool), t)
    grid = np.linspace(np.percentile(t[e == 1], 10), np.percentile(t[e == 1], 90), 12)
    auc, mean_auc = cumulative_dynamic_auc(y, y, scores["radscore"].to_numpy(), grid)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(grid, auc, marker="o")
    ax.axhline(mean_auc, ls="--", c="grey", label=f"mean {mean_auc:.3f}")
    ax.set(
        xlabel="days", ylabel="time-dependent AUC", ylim=(0.4, 1.0), title="td-AUC of the rad-score"
    )
    ax.legend()
    figures["td_auc"] = _save(fig, out / "td_auc.png")
    horizon = [d for d in (300, 600, 900) if t.min() < d < t[e == 1].max()]
    if horizon:
        at, _ = cumulative_dynamic_auc(y, y, scores["radscore"].to_numpy(), horizon)
        metrics["td_auc"] = {str(d): round(float(a), 4) for d, a in zip(horizon, at, strict=True)}


def _brier(
    scores: pd.DataFrame,
    t: np.ndarray,
    e: np.ndarray,
    out: Path,
    metrics: dict[str, Any],
    figures: dict[str, str],
) -> None:
    """Brier score of the card's predictions at its time points, and its integral."""
    brier = _brier_curve(scores, t, e)
    if brier is None:
        return
    times, values, ibs = brier
    metrics["brier"] = {str(int(d)): round(float(b), 4) for d, b in zip(times, values, strict=True)}
    if ibs is not None:
        metrics["integrated_brier"] = round(ibs, 4)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(times, values, marker="o", label="card's predictions")
    ax.axhline(0.25, c="grey", ls="--", label="uninformative (0.25)")
    title = "Brier score" + (f", integrated {ibs:.3f}" if ibs is not None else "")
    ax.set(xlabel="days", ylabel="Brier score (IPCW)", ylim=(0, 0.4), title=title)
    ax.legend()
    figures["brier"] = _save(fig, out / "brier.png")


def _km(
    scores: pd.DataFrame,
    t: np.ndarray,
    e: np.ndarray,
    out: Path,
    metrics: dict[str, Any],
    figures: dict[str, str],
) -> None:
    """Kaplan-Meier curves of the two risk groups, with the log-rank p."""
    high = (scores["risk_group"] == "high").to_numpy()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for label, mask in (("low risk", ~high), ("high risk", high)):
        if mask.any():
            KaplanMeierFitter().fit(
                t[mask], e[mask], label=f"{label} (n={mask.sum()})"
            ).plot_survival_function(ax=ax)
    if high.any() and (~high).any():
        p = logrank_test(t[high], t[~high], e[high], e[~high]).p_value
        metrics["logrank_p"] = float(p)
        ax.set_title(f"PFS by rad-score group, log-rank p = {p:.2g}")
    ax.set(xlabel="days", ylabel="progression-free survival")
    figures["km"] = _save(fig, out / "km.png")


def _calibration(
    scores: pd.DataFrame,
    t: np.ndarray,
    e: np.ndarray,
    out: Path,
    metrics: dict[str, Any],
    figures: dict[str, str],
) -> None:
    """Calibration at 600 days by quintile of predicted PFS, and the decision curve."""
    predicted = scores["pfs_600"].to_numpy(float)
    groups = pd.qcut(predicted, 5, labels=False, duplicates="drop")
    rows = []
    for g in np.unique(groups):
        m = groups == g
        km = KaplanMeierFitter().fit(t[m], e[m])
        rows.append((predicted[m].mean(), float(km.survival_function_at_times(600).iloc[0])))
    cal = np.array(rows)
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.plot([0, 1], [0, 1], c="grey", ls="--")
    ax.plot(cal[:, 0], cal[:, 1], marker="o")
    ax.set(
        xlabel="predicted PFS at 600 d",
        ylabel="observed (Kaplan-Meier)",
        title="Calibration, 600 days",
    )
    figures["calibration"] = _save(fig, out / "calibration.png")
    metrics["calibration_600"] = [[round(a, 4), round(b, 4)] for a, b in rows]
    known = (t > 600) | (e == 1)
    event_by = ((t <= 600) & (e == 1)).astype(int)[known]
    figures["decision_curve"] = decision_curve(
        event_by,
        1 - predicted[known],
        "threshold probability (progression by 600 d)",
        out / "decision_curve.png",
    )


def nomogram_figure(card: dict[str, Any], patient: dict[str, float] | None) -> Any:
    """The Cox nomogram as a points chart (widest covariate = 100 points), patient marked."""
    nomogram = card["nomogram"]
    names = nomogram["covariates"]
    ranges = nomogram.get("ranges") or {c: [0.0, 1.0] for c in names}
    spans = {c: abs(nomogram["coefficients"][c]) * (ranges[c][1] - ranges[c][0]) for c in names}
    scale = 100 / max(max(spans.values()), 1e-9)
    fig, ax = plt.subplots(figsize=(6, 0.7 * len(names) + 1.5))
    for i, c in enumerate(names):
        y = len(names) - i
        lo, hi = ranges[c]
        ax.plot([0, spans[c] * scale], [y, y], c="k")
        ax.text(-2, y, c, ha="right", va="center")
        ax.text(
            0, y + 0.15, f"{lo:g}" if nomogram["coefficients"][c] > 0 else f"{hi:g}", fontsize=7
        )
        ax.text(
            spans[c] * scale,
            y + 0.15,
            f"{hi:g}" if nomogram["coefficients"][c] > 0 else f"{lo:g}",
            fontsize=7,
        )
        if patient and c in patient:
            v = (patient[c] - lo) if nomogram["coefficients"][c] > 0 else (hi - patient[c])
            ax.plot([abs(nomogram["coefficients"][c]) * v * scale], [y], "ro")
    ax.set(xlim=(-30, 110), ylim=(0, len(names) + 1), xlabel="points", title="Nomogram (Cox)")
    ax.set_yticks([])
    return fig


def logistic_report(card: dict[str, Any], scores: pd.DataFrame, out: Path) -> dict[str, Any]:
    """ROC (DeLong CI), calibration with Hosmer-Lemeshow, decision curve for a logistic card."""
    from sklearn.metrics import roc_curve

    out.mkdir(parents=True, exist_ok=True)
    y = scores["label"].to_numpy(int)
    p = scores["probability"].to_numpy(float)
    auc = delong(y, p)
    chi2, hl_p = hosmer_lemeshow(y, p)
    metrics = {
        "n": len(y),
        "positives": int(y.sum()),
        "auc": {
            "value": round(auc["auc"], 4),
            "ci95": [round(auc["ci_low"], 4), round(auc["ci_high"], 4)],
        },
        "hosmer_lemeshow": {"chi2": round(chi2, 3), "p": round(hl_p, 4)},
    }
    figures = {}
    fpr, tpr, _ = roc_curve(y, p)
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.plot(fpr, tpr, label=f"AUC {auc['auc']:.3f} ({auc['ci_low']:.3f}-{auc['ci_high']:.3f})")
    ax.plot([0, 1], [0, 1], c="grey", ls="--")
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title="ROC")
    ax.legend(loc="lower right")
    figures["roc"] = _save(fig, out / "roc.png")
    groups = pd.qcut(p, 10, labels=False, duplicates="drop")
    cal = np.array([(p[groups == g].mean(), y[groups == g].mean()) for g in np.unique(groups)])
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.plot([0, 1], [0, 1], c="grey", ls="--")
    ax.plot(cal[:, 0], cal[:, 1], marker="o")
    ax.set(xlabel="predicted", ylabel="observed", title=f"Calibration (HL p = {hl_p:.2g})")
    figures["calibration"] = _save(fig, out / "calibration.png")
    figures["decision_curve"] = decision_curve(
        y, p, "threshold probability", out / "decision_curve.png"
    )
    return {"metrics": metrics, "figures": figures}


def write_html(card: dict[str, Any], result: dict[str, Any], out: Path) -> Path:
    """``report.html``: the card's identity, the metrics table, every figure."""
    warning = card.get("clinical_use", "not for clinical use")
    rows = "".join(
        f"<tr><td>{html.escape(k)}</td><td><code>{html.escape(json.dumps(v))}</code></td></tr>"
        for k, v in result["metrics"].items()
    )
    images = "".join(
        f'<figure><img src="{html.escape(f)}" alt="{html.escape(k)}">'
        f"<figcaption>{html.escape(k)}</figcaption></figure>"
        for k, f in result["figures"].items()
    )
    title = html.escape(f"{card['id']}: {card['endpoint']} signature")
    page = (
        f'<!doctype html><html><head><meta charset="utf-8"><title>{title}</title>'
        f"<style>{STYLE}</style></head><body><h1>{title}</h1>"
        f'<p class="warn">{html.escape(warning.upper())}</p>'
        f"<p>{html.escape(card.get('intended_use', ''))}</p>"
        f"<table>{rows}</table>{images}</body></html>"
    )
    path = out / "report.html"
    path.write_text(page)
    (out / "metrics.json").write_text(json.dumps(result["metrics"], indent=2))
    return path
