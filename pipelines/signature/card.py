"""Signature cards on disk.

A card (``models/<id>/card.yaml``) holds everything needed to score a study
(:mod:`pipelines.scoring`): feature names with training means and SDs,
ComBat parameters, coefficients, the cut-off, the nomogram and its baseline
survival, and the sha256 of the radiomics parameters the features must be
extracted with.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import yaml

CARD_FILE = "card.yaml"


class ScoreError(ValueError):
    """A study cannot be scored with this card; the message says why."""


def write_signature_card(folder: Path, card: dict[str, Any]) -> Path:
    """Write ``folder/card.yaml`` (plain YAML: numbers, strings, lists, maps)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / CARD_FILE
    path.write_text(yaml.safe_dump(_plain(card), sort_keys=False, width=100))
    return path


def load_signature_card(folder: Path) -> dict[str, Any]:
    """Read a signature card, checking it has what :func:`score` needs."""
    path = folder / CARD_FILE if folder.is_dir() else folder
    if not path.is_file():
        raise ScoreError(f"signature {folder}: no {CARD_FILE}")
    card = yaml.safe_load(path.read_text())
    if not isinstance(card, dict):
        raise ScoreError(f"signature {folder}: {CARD_FILE} is not a mapping")
    for key in ("id", "endpoint", "features", "radscore"):
        if key not in card:
            raise ScoreError(f"signature {folder}: card has no {key!r}")
    out: dict[str, Any] = card
    return out


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value
