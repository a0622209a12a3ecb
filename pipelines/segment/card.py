"""Model cards: what a set of weights is, how it was made, and its checksums.

A model folder holds ``card.yaml`` plus the weight files it names. The card
records the sha256 of every weight file; :func:`load_card` refuses a folder
whose files are missing or do not match, so a node never runs weights that
are not the ones the card (and its validation figures) describe.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
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
        if not isinstance(entry, dict) or not isinstance(entry.get("file"), str):
            raise ModelError(f"model card {path}: field 'weights.{stage}.file' is missing")
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


_ARCH_FIELDS: dict[str, tuple[type | tuple[type, ...], int | None]] = {
    # field: (type of the value or of each item, items for a list; None = a scalar)
    "name": (str, None),
    "channels": (int, 0),
    "strides": (int, 0),
    "num_res_units": (int, None),
    "norm": (str, None),
    "spacing_mm": ((int, float), 3),
    "patch": (int, 0),
}


def _field_problem(value: Any, kind: type | tuple[type, ...], items: int | None) -> str | None:
    """Why ``value`` is not of ``kind`` (a list of ``items`` of it when ``items`` is not None)."""
    if items is None:
        ok = isinstance(value, kind) and not isinstance(value, bool)
        return None if ok else f"must be {_kind_name(kind)}, not {value!r:.40}"
    if not isinstance(value, list) or not value or (items and len(value) != items):
        size = f"{items} " if items else ""
        return f"must be a list of {size}{_kind_name(kind)}s, not {value!r:.40}"
    if any(not isinstance(v, kind) or isinstance(v, bool) for v in value):
        return f"must hold {_kind_name(kind)}s only, not {value!r:.40}"
    return None


def _kind_name(kind: type | tuple[type, ...]) -> str:
    return "number" if isinstance(kind, tuple) else {"int": "integer", "str": "text"}[kind.__name__]


def check_inference_card(card: dict[str, Any], where: Path) -> None:
    """Refuse a card :class:`~pipelines.segment.infer.Segmenter` cannot run, naming the field.

    Checks what inference reads: ``id`` and ``version``, both architectures
    (``architecture.coarse`` and ``.fine``: name, channels, strides,
    num_res_units, norm, spacing_mm, patch; ``fine.margin_mm``), and that the
    locator and every ensemble member (``ensemble.by_sequence``'s too) have a
    ``weights`` entry. One line per problem, so ``config check`` and ``serve``
    print it instead of a traceback.

    Raises
    ------
    ModelError
        ``model card <where>: field '<dotted.name>' ...``.
    """

    def fail(field: str, why: str) -> ModelError:
        return ModelError(f"model card {where}: field '{field}' {why}")

    for key in ("id", "version"):
        if not isinstance(card.get(key), str | int | float) or not str(card.get(key)).strip():
            raise fail(key, "is missing")
    arch = card.get("architecture")
    if not isinstance(arch, dict):
        raise fail("architecture", "is missing (a mapping with 'coarse' and 'fine')")
    for stage in ("coarse", "fine"):
        section = arch.get(stage)
        if not isinstance(section, dict):
            raise fail(f"architecture.{stage}", "is missing")
        fields = dict(_ARCH_FIELDS)
        if stage == "fine":
            fields["margin_mm"] = ((int, float), None)
        for name, (kind, items) in fields.items():
            if name not in section:
                raise fail(f"architecture.{stage}.{name}", "is missing")
            why = _field_problem(section[name], kind, items)
            if why:
                raise fail(f"architecture.{stage}.{name}", why)
    ensemble = card.get("ensemble") or {}
    if not isinstance(ensemble, dict):
        raise fail("ensemble", "must be a mapping")
    listed = ensemble.get("members")
    if listed is not None and (not isinstance(listed, list) or not listed):
        raise fail("ensemble.members", "must be a non-empty list of weights entries")
    named = ["coarse", *(str(m) for m in listed or ["fine"])]
    by_sequence = ensemble.get("by_sequence") or {}
    if not isinstance(by_sequence, dict):
        raise fail("ensemble.by_sequence", "must be a mapping of sequence to its own members")
    for sequence, own in by_sequence.items():
        own_members = own.get("members") if isinstance(own, dict) else None
        if not isinstance(own_members, list) or not own_members:
            raise fail(
                f"ensemble.by_sequence.{sequence}.members",
                "must be a non-empty list of weights entries",
            )
        named += [str(m) for m in own_members]
    weights = card.get("weights") or {}
    for member in named:
        if member not in weights:
            raise fail(f"weights.{member}", "is missing (named by the architecture or ensemble)")


def write_card(folder: Path, card: dict[str, Any]) -> Path:
    """Write ``card`` as ``folder/card.yaml`` with the weights' checksums filled in."""
    for entry in card["weights"].values():
        entry["sha256"] = sha256(folder / entry["file"])
    path = folder / CARD_FILE
    path.write_text(yaml.safe_dump(card, sort_keys=False, width=100))
    return path


@dataclass(frozen=True)
class SegModelCard:
    """A segmentation model's card, checked: what every result names as its algorithm.

    Built by :meth:`from_folder` (weights checksummed, inference fields
    checked) or :meth:`from_checked` for a card a
    :class:`~pipelines.segment.infer.Segmenter` has already loaded. ``id``
    and ``version`` are required: a result never names a model
    "segmentation 0".
    """

    folder: Path
    id: str
    version: str
    clinical_use: str
    card: Mapping[str, Any] = field(repr=False, compare=False)

    def __post_init__(self) -> None:
        for key in ("id", "version"):
            if not str(getattr(self, key)).strip():
                raise ModelError(f"model card {self.folder / CARD_FILE}: field {key!r} is missing")

    @classmethod
    def from_checked(cls, card: Mapping[str, Any], folder: Path) -> SegModelCard:
        """From a card already read by :func:`load_card` (``folder`` is where it lives).

        Raises
        ------
        ModelError
            ``model card <folder>/card.yaml: field 'id' is missing`` (or version).
        """
        for key in ("id", "version"):
            if card.get(key) is None:
                raise ModelError(f"model card {folder / CARD_FILE}: field {key!r} is missing")
        return cls(
            folder=folder,
            id=str(card["id"]),
            version=str(card["version"]),
            clinical_use=str(card.get("clinical_use") or NOT_CLINICAL),
            card=card,
        )

    @classmethod
    def from_folder(cls, folder: Path) -> SegModelCard:
        """Read ``folder/card.yaml``, check its weights' checksums and inference fields.

        Raises
        ------
        ModelError
            Naming the folder or the card's field and the problem.
        """
        card = load_card(folder)
        check_inference_card(card, folder / CARD_FILE)
        return cls.from_checked(card, folder)

    @property
    def name(self) -> str:
        """``<id> <version>``, as the SR, the PDF and the job outputs name the model."""
        return f"{self.id} {self.version}"
