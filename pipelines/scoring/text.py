"""The words people read about a score: one place for ``jobs show``, ``analyze``, SR and PDF.

Every card gets the same lines, scored or skipped: id, version and
endpoint; the rad-score and the risk group (or why none is given); the
predictions (withheld outside the model's range: there they are
extrapolations); the applicability verdict; the training cohort (size, real
or synthetic), the nested-CV headline, and "not for clinical use".
:func:`headline` says the same in one line of at most 64 characters, for a
viewer that prints one label per number (OHIF and the SR).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from pipelines.scoring.cards import cohort_text

SURVIVAL_NAMES = {
    "pfs": "progression-free survival",
    "efs": "event-free survival",
    "os": "overall survival",
}


def endpoint_name(endpoint: str) -> str:
    """``progression-free survival`` for ``pfs``; other endpoints as they are."""
    return SURVIVAL_NAMES.get(endpoint, endpoint.replace("_", " "))


def survival_probabilities(result: Mapping[str, Any]) -> list[tuple[str, float]]:
    """(days, probability) pairs, by days; from ``survival_probability`` or the older key."""
    probs = result.get("survival_probability") or result.get("pfs_probability") or {}
    return sorted(((str(t), float(p)) for t, p in probs.items()), key=lambda kv: float(kv[0]))


def confident(result: Mapping[str, Any]) -> bool:
    """Whether the study is inside the model's range (or the range is unknown)."""
    return (result.get("applicability") or {}).get("status") != "outside"


def title(result: Mapping[str, Any]) -> str:
    """``sarcnode-pfs-demo 1.0.0 (pfs)``."""
    version = f" {result['version']}" if result.get("version") else ""
    return f"{result['signature']}{version} ({result.get('endpoint', '?')})"


def verdict(result: Mapping[str, Any]) -> str:
    """The applicability line; results from before applicability existed say so."""
    block = result.get("applicability")
    if not block:
        return "applicability domain unknown (scored before the node checked it)"
    return str(block["text"])


def risk_text(result: Mapping[str, Any]) -> str:
    """``risk group high`` or ``no risk group: outside the model's range``."""
    if result.get("risk_group") is None:
        why = result.get("risk_group_withheld") or "not computed"
        return f"no risk group: {why}"
    return f"risk group {result['risk_group']}"


def prediction_text(result: Mapping[str, Any]) -> str | None:
    """The predictions in one line, or why they are withheld; None when there are none."""
    probs = survival_probabilities(result)
    if not probs and "probability" not in result:
        return None
    if not confident(result):
        return "predictions withheld: outside the model's range (they would be extrapolations)"
    if probs:
        model = f" ({result['model']} model)" if result.get("model") else ""
        shown = ", ".join(f"{t} d {p:.0%}" for t, p in probs)
        return f"predicted {endpoint_name(str(result.get('endpoint', '')))}{model}: {shown}"
    return (
        f"predicted probability of {endpoint_name(str(result.get('endpoint', '')))}: "
        f"{float(result['probability']):.0%}"
    )


def provenance_text(result: Mapping[str, Any]) -> str:
    """Training cohort, nested-CV headline, clinical use."""
    nested = result.get("nested_cv")
    validation = f"nested CV: {nested}" if nested else "no nested cross-validation on the card"
    use = str(result.get("clinical_use") or "not for clinical use").upper()
    warning = f"; CARD WARNING: {result['warning']}" if result.get("warning") else ""
    return f"{cohort_text(result)}; {validation}; {use}{warning}"


def score_lines(result: Mapping[str, Any]) -> list[str]:
    """The lines about one card's result (or skip record): the card, then indented facts."""
    lines = [title(result)]
    if "skipped" in result:
        lines.append(f"  not scored: {result['skipped']}")
    else:
        lines.append(f"  rad-score {float(result['radscore']):.3f}, {risk_text(result)}")
        predicted = prediction_text(result)
        if predicted:
            lines.append(f"  {predicted}")
        if result.get("missing_clinical"):
            lines.append(f"  clinical factors not given: {', '.join(result['missing_clinical'])}")
        said = verdict(result)
        lines.append(
            f"  {said}" if said.startswith("applicability") else f"  applicability: {said}"
        )
    lines.append(f"  {provenance_text(result)}")
    return lines


def short_id(result: Mapping[str, Any]) -> str:
    """The card id without the project's ``sarcnode-`` prefix: ``lungmets-t1``."""
    card = str(result.get("signature", "?"))
    return card.removeprefix("sarcnode-")


def validation_short(result: Mapping[str, Any]) -> str:
    """The nested-CV figure in a few characters (``AUC 0.55``, ``C 0.55``) or why none.

    Read from the card's headline (:func:`pipelines.scoring.cards.nested_cv_headline`);
    a card fitted on synthetic data says so, one without a headline says
    ``no CV``.
    """
    nested = str(result.get("nested_cv") or "")
    found = re.search(r"nested[- ]CV (AUC|Harrell's C|C-index|C)\s+([0-9]*\.[0-9]+)", nested)
    if found:
        metric = "AUC" if found.group(1) == "AUC" else "C"
        return f"{metric} {float(found.group(2)):.2f}"
    if (result.get("training_cohort") or {}).get("source") == "synthetic":
        return "synthetic"
    return "no CV"


def verdict_short(result: Mapping[str, Any]) -> str:
    """The result in a few words: ``OUTSIDE range``, ``high risk``, ``positive``, ``not scored``."""
    if "skipped" in result:
        return "not scored"
    if not confident(result):
        return "OUTSIDE range"
    group = result.get("risk_group")
    if group is None:
        words = "no risk group"
    else:
        words = f"{group} risk" if group in ("high", "low") else str(group)
    if (result.get("applicability") or {}).get("status", "unknown") == "unknown":
        return f"{words}, range unknown"
    return words


def headline(result: Mapping[str, Any], limit: int = 64) -> str:
    """One line naming card, version, validation and result, within ``limit`` characters.

    ``lungmets-t1 1.0.0 AUC 0.55, OUTSIDE range (NOT FOR CLINICAL USE)``: what
    a viewer that shows one label per number (OHIF) prints beside the
    rad-score. The warning is dropped, then the validation, when the line
    would not fit (a DICOM code meaning holds 64 characters).
    """
    version = f" {result['version']}" if result.get("version") else ""
    name = f"{short_id(result)}{version}"
    warning = (
        " (NOT FOR CLINICAL USE)"
        if "not for clinical use" in str(result.get("clinical_use") or "not for clinical use")
        else ""
    )
    verdict = verdict_short(result)
    for line in (
        f"{name} {validation_short(result)}, {verdict}{warning}",
        f"{name}, {verdict}{warning}",
        f"{name} {validation_short(result)}, {verdict}",
        f"{name}, {verdict}",
    ):
        if len(line) <= limit:
            return line
    return f"{name}, {verdict}"[:limit]


def years_text(days: str) -> str:
    """``365`` -> ``1 year``, ``1095`` -> ``3 years``, ``300`` -> ``300 days``."""
    d = float(days)
    years = d / 365
    if d >= 365 and abs(years - round(years)) < 0.01:
        return f"{round(years)} year{'s' if round(years) > 1 else ''}"
    return f"{d:g} days"


def shown_times(probs: Sequence[tuple[str, float]]) -> list[str]:
    """The time points to print: whole years when the card has them (1, 3, 5), else all."""
    years = [t for t, _ in probs if float(t) >= 365 and float(t) % 365 == 0]
    return years or [t for t, _ in probs]
