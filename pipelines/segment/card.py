"""Model cards: what a set of weights is, how it was made, and its checksums.

A model folder holds ``card.yaml`` plus the weight files it names. The card
records the sha256 of every weight file; :func:`load_card` refuses a folder
whose files are missing or do not match, so a node never runs weights that
are not the ones the card (and its validation figures) describe.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import yaml

CARD_FILE = "card.yaml"
NOT_CLINICAL = "not for clinical use"


class ModelError(ValueError):
    """A model folder cannot be used; the message names the folder and the problem."""


def sha256(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def software_versions() -> dict[str, str]:
    """torch, MONAI and Python versions, as a card records what made its weights."""
    import platform

    import monai
    import torch

    return {
        "torch": str(torch.__version__),
        "monai": str(monai.__version__),
        "python": platform.python_version(),
    }


def intended_use(*, synthetic_only: bool = False) -> str:
    """The card's ``intended_use`` sentence: research only, never clinical."""
    return (
        "Research and demonstration of the sarcnode pipeline. "
        + ("Trained on synthetic data only. " if synthetic_only else "")
        + "Not a medical device: "
        + NOT_CLINICAL
        + "."
    )


def load_card(folder: Path) -> dict[str, Any]:
    """Read ``folder/card.yaml`` and check every weight file against its sha256."""
    path = folder / CARD_FILE
    if not path.is_file():
        raise ModelError(f"model {folder}: no {CARD_FILE}")
    try:
        card = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ModelError(f"model {folder}: {CARD_FILE} is not valid YAML: {exc}") from exc
    if not isinstance(card, dict) or not isinstance(card.get("weights"), dict):
        raise ModelError(f"model {folder}: {CARD_FILE} has no 'weights' section")
    for stage, entry in card["weights"].items():
        file = folder / str(entry.get("file", ""))
        if not file.is_file():
            raise ModelError(f"model {folder}: {stage} weights {file.name!r} are missing")
        found = sha256(file)
        if found != entry.get("sha256"):
            raise ModelError(
                f"model {folder}: {stage} weights {file.name} have sha256 {found[:12]}..., "
                f"the card says {str(entry.get('sha256'))[:12]}...: refusing to load them"
            )
    return card


def write_card(folder: Path, card: dict[str, Any]) -> Path:
    """Write ``card`` as ``folder/card.yaml`` with the weights' checksums filled in."""
    for entry in card["weights"].values():
        entry["sha256"] = sha256(folder / entry["file"])
    path = folder / CARD_FILE
    path.write_text(yaml.safe_dump(card, sort_keys=False, width=100))
    return path
