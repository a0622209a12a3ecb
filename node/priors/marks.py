"""Which series the node fetched itself as a prior, so they get no job of their own.

A prior arrives through the ordinary receive path (the PACS's C-MOVE
sub-operations are C-STOREs to the node's SCP), and the scheduler would
otherwise see a new stable study, analyse it a second time and deliver its
SEG, SR and PDF back to the PACS that already holds the study. The compare
stage writes ``<root>/priors/<study>/retrieved.json`` before it asks for the
move; the scheduler leaves a study alone while every series it holds is named
there. A series that arrives otherwise (someone sends the study on purpose)
makes the study an ordinary candidate again.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path


def _mark(root: Path, study_uid: str) -> Path:
    return root / "priors" / study_uid / "retrieved.json"


def mark_retrieved(root: Path, study_uid: str, series: Iterable[str], source: str) -> None:
    """Record that the node is about to move these series of the study as a prior."""
    path = _mark(root, study_uid)
    path.parent.mkdir(parents=True, exist_ok=True)
    known = retrieved_series(root, study_uid)
    data = {
        "series": sorted(known | set(series)),
        "source": source,
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)


def retrieved_series(root: Path, study_uid: str) -> set[str]:
    """Series UIDs of the study the node moved in as a prior (empty when none or unreadable)."""
    try:
        data = json.loads(_mark(root, study_uid).read_text())
    except (OSError, ValueError):
        return set()
    series = data.get("series") if isinstance(data, dict) else None
    return {str(s) for s in series} if isinstance(series, list) else set()


def only_prior(root: Path, study_uid: str, held: Iterable[str]) -> bool:
    """Whether every series the node holds of the study was moved in as a prior."""
    held = set(held)
    return bool(held) and held <= retrieved_series(root, study_uid)
