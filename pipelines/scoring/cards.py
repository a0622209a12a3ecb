"""The signature cards a pipeline scores with, checked once, and what to extract for them.

A pipeline lists several cards (``signatures:``). :meth:`SignatureCard.from_folder`
refuses, naming the file, a card that cannot be used: unreadable YAML, a
missing or altered parameter file, an extraction mode its parameter file
does not give, an unknown region, feature names outside its own sequences and regions, a malformed
applicability block. :func:`plan` then says, for the sequences a study has,
which cards apply (the others are skipped with the reason) and which
extractions serve them: one per distinct parameter set, mode, sequences and
regions, so cards that share a parameter file share the work.
:func:`card_facts` is what every output says about a card: id, version,
endpoint, intended use, the training cohort (size, real or synthetic) and
the nested cross-validation headline when there is one.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipelines.scoring.domain import check_block
from pipelines.signature.card import CARD_FILE, ScoreError, load_signature_card

# The extraction mode (PyRadiomics' definitions, or IBSI's) travels in the
# parameter file's own section, ``sarcnode: {mode: ...}``, and is part of its
# hash; the card records it as ``extraction.mode``. The two must agree.
PARAMS_SECTION = "sarcnode"
DEFAULT_MODE = "pyradiomics"
# The regions pipelines.radiomics.study makes (kept here, not imported: that
# module pulls in SimpleITK and PyRadiomics, and a config check should not).
REGIONS = ("tumour", "ring", "habitat1", "habitat2", "habitat3")
SYNTHETIC_DEMO = "SYNTHETIC patients: the plumbing demo, says nothing about real tumours"


class CardError(ValueError):
    """A card cannot be used at all (the message names its file and what is wrong)."""


@dataclass(frozen=True)
class SignatureCard:
    """A signature card checked for use: its folder, the card, its radiomics parameters.

    Built only by :meth:`from_folder`, which refuses a card that cannot be
    used; ``card`` is the whole mapping (what the scorer and the PDF read),
    the other fields the facts every stage needs.
    """

    folder: Path
    card: Mapping[str, Any] = field(repr=False)
    params: Mapping[str, Any] = field(repr=False)
    params_sha256: str
    mode: str
    sequences: tuple[str, ...]
    regions: tuple[str, ...]

    def __post_init__(self) -> None:
        where = self.folder / CARD_FILE
        for key in ("id", "version", "endpoint"):
            if not str(self.card.get(key) or "").strip():
                raise CardError(f"{where}: field {key!r} is missing")

    @property
    def id(self) -> str:
        """The card's id (its folder name, by convention)."""
        return str(self.card["id"])

    @property
    def version(self) -> str:
        """The card's version, as every result names it."""
        return str(self.card["version"])

    @property
    def endpoint(self) -> str:
        """What the card predicts (``pfs``, ``efs``, ``lung_metastasis``, ``high_grade`` ...)."""
        return str(self.card["endpoint"])

    @classmethod
    def from_folder(cls, folder: Path) -> SignatureCard:
        """Read and check the card in ``folder``.

        Raises
        ------
        CardError
            Naming ``folder``'s card file and the problem.
        """
        where = folder / CARD_FILE
        try:
            card = load_signature_card(folder)
        except yaml.YAMLError as exc:
            raise CardError(f"{where}: not valid YAML: {exc}") from exc
        except (ScoreError, OSError) as exc:
            raise CardError(f"{where}: {exc}") from exc
        params, digest, mode = _checked_params(card, folder)
        sequences = card.get("sequences")
        if (
            not isinstance(sequences, list)
            or not sequences
            or not all(isinstance(s, str) for s in sequences)
        ):
            raise CardError(f"{where}: 'sequences' must list the sequence roles it needs")
        regions = card.get("regions") or ["tumour"]
        if not isinstance(regions, list) or any(r not in REGIONS for r in regions):
            raise CardError(f"{where}: 'regions' must be some of {', '.join(REGIONS)}")
        _check_features(card, where, sequences, regions)
        _check_models(card, where)
        return cls(
            folder=folder,
            card=card,
            params=params,
            params_sha256=digest,
            mode=mode,
            sequences=tuple(sequences),
            regions=tuple(regions),
        )


def _checked_params(card: Mapping[str, Any], folder: Path) -> tuple[dict[str, Any], str, str]:
    """(radiomics parameters, their sha256, extraction mode), checked against the card."""
    from pipelines.radiomics.extract import ExtractionError, load_params, params_hash

    where = folder / CARD_FILE
    extraction = card.get("extraction")
    if not isinstance(extraction, Mapping) or not extraction.get("params_file"):
        raise CardError(f"{where}: needs extraction.params_file")
    try:
        params = load_params(folder / str(extraction["params_file"]))
    except ExtractionError as exc:
        raise CardError(f"{where}: {exc}") from exc
    digest = params_hash(params)
    pinned = extraction.get("params_sha256")
    if pinned and pinned != digest:
        raise CardError(
            f"{where}: {extraction['params_file']} has sha256 {digest[:12]}..., "
            f"the card was fitted with {str(pinned)[:12]}..."
        )
    mode = str(extraction.get("mode") or DEFAULT_MODE)
    section = params.get(PARAMS_SECTION) or {}
    extracts = str(section.get("mode") or DEFAULT_MODE) if isinstance(section, Mapping) else "?"
    if mode != extracts:
        raise CardError(
            f"{where}: the card was fitted in extraction mode {mode!r}, its parameter file "
            f"{extraction['params_file']} extracts in mode {extracts!r}"
        )
    return params, digest, mode


def _check_features(
    card: Mapping[str, Any], where: Path, sequences: list[str], regions: list[str]
) -> None:
    """Every feature is ``<sequence>:<region>:<feature>`` of the card's own, with its numbers."""
    if not isinstance(card["features"], list) or not all(
        isinstance(f, Mapping) for f in card["features"]
    ):
        raise CardError(f"{where}: 'features' must be a list of mappings")
    for feature in card["features"]:
        name = str(feature.get("name", ""))
        parts = name.split(":")
        if len(parts) < 3 or parts[0] not in sequences or parts[1] not in regions:
            raise CardError(
                f"{where}: feature {name!r} is not <sequence>:<region>:<feature> "
                f"of its sequences {sequences} and regions {regions}"
            )
        if not all(k in feature for k in ("mean", "sd", "coefficient")):
            raise CardError(f"{where}: feature {name!r} needs mean, sd and coefficient")


def _check_models(card: Mapping[str, Any], where: Path) -> None:
    """The rad-score Cox block, when there is one, and the applicability block."""
    if "radscore_cox" in card:
        cox = card["radscore_cox"]
        if not isinstance(cox, Mapping) or not all(
            k in cox for k in ("covariates", "coefficients", "means", "baseline_survival")
        ):
            raise CardError(
                f"{where}: radscore_cox needs covariates, coefficients, means, baseline_survival"
            )
    try:
        check_block(card)
    except ScoreError as exc:
        raise CardError(f"{where}: {exc}") from exc


def load_signatures(folders: Sequence[Path]) -> list[SignatureCard]:
    """Each card in ``folders``, in order; an id used twice is an error."""
    found = [SignatureCard.from_folder(folder) for folder in folders]
    ids = [s.id for s in found]
    twice = sorted({i for i in ids if ids.count(i) > 1})
    if twice:
        raise CardError(f"card id(s) listed twice: {', '.join(twice)}")
    return found


@dataclass(frozen=True)
class Extraction:
    """One radiomics extraction serving one or more cards."""

    params_sha256: str
    mode: str
    sequences: tuple[str, ...]
    regions: tuple[str, ...]
    cards: tuple[str, ...]
    params: Mapping[str, Any] = field(repr=False, compare=False, hash=False)

    @property
    def key(self) -> str:
        """12 hex digits naming this extraction (its file, its entry in the outputs)."""
        text = "|".join(
            [self.params_sha256, self.mode, ",".join(self.sequences), ",".join(self.regions)]
        )
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    def as_dict(self) -> dict[str, Any]:
        """JSON-able description (without the parameters themselves)."""
        return {
            "key": self.key,
            "params_sha256": self.params_sha256,
            "mode": self.mode,
            "sequences": list(self.sequences),
            "regions": list(self.regions),
            "cards": list(self.cards),
        }


def plan(
    signatures: Sequence[SignatureCard], available: Collection[str]
) -> tuple[list[Extraction], dict[str, str]]:
    """(extractions to run, card id -> why it is skipped) for a study with ``available`` roles.

    A card applies when the study has every sequence it needs; regions are
    made from the tumour mask, so any study gives them.
    """
    skipped: dict[str, str] = {}
    groups: dict[tuple[str, str, tuple[str, ...], tuple[str, ...]], list[SignatureCard]] = {}
    for s in signatures:
        missing = [r for r in s.sequences if r not in available]
        if missing:
            has = ", ".join(sorted(available)) or "none"
            skipped[s.id] = f"needs {', '.join(missing)}: not in the study (it has {has})"
            continue
        key = (s.params_sha256, s.mode, tuple(sorted(s.sequences)), tuple(sorted(s.regions)))
        groups.setdefault(key, []).append(s)
    extractions = [
        Extraction(digest, mode, seqs, regions, tuple(s.id for s in members), members[0].params)
        for (digest, mode, seqs, regions), members in groups.items()
    ]
    return extractions, skipped


def cohort_source(card: Mapping[str, Any]) -> str:
    """``real``, ``synthetic`` or ``unknown``: what the card was fitted on."""
    declared = str((card.get("cohort") or {}).get("source") or "").lower()
    if declared in ("real", "synthetic"):
        return declared
    if "synthetic" in str(card.get("intended_use", "")).lower():
        return "synthetic"
    return "unknown"


def training_size(card: Mapping[str, Any]) -> int | None:
    """Cases the final model was fitted on (applicability, training, or cohort size)."""
    for value in (
        (card.get("applicability") or {}).get("n_train"),
        (card.get("training") or {}).get("n"),
        (card.get("cohort") or {}).get("n"),
    ):
        if isinstance(value, int) and value > 0:
            return value
    return None


def nested_cv_headline(card: Mapping[str, Any]) -> str | None:
    """``validation.nested_cv.headline``, or one made from its first metric with a CI."""
    nested = (card.get("validation") or {}).get("nested_cv")
    if not isinstance(nested, Mapping):
        return None
    if isinstance(nested.get("headline"), str):
        return str(nested["headline"])
    for name, value in nested.items():
        if isinstance(value, Mapping) and "value" in value and "ci95" in value:
            low, high = value["ci95"]
            text = f"nested-CV {name} {float(value['value']):.3f} (95% CI {low:.3f}-{high:.3f})"
            p = value.get("permutation_p", nested.get("permutation_p"))
            return text + (f", permutation p {float(p):.3g}" if p is not None else "")
    return None


def card_facts(card: Mapping[str, Any]) -> dict[str, Any]:
    """What every output says about a card, whether it scored the study or not.

    ``warning`` is the card's own (a final fit that kept no feature, say).
    """
    source = cohort_source(card)
    return {
        "signature": str(card["id"]),
        "version": str(card.get("version", "")),
        "endpoint": str(card["endpoint"]),
        "clinical_use": str(card.get("clinical_use", "not for clinical use")),
        "training_cohort": {"n": training_size(card), "source": source},
        "demo": source == "synthetic",
        "nested_cv": nested_cv_headline(card),
        "warning": str(card["warning"]) if card.get("warning") else None,
    }


def cohort_text(facts: Mapping[str, Any]) -> str:
    """``fitted on 37 real patients`` / ``fitted on 140 SYNTHETIC patients: the plumbing demo``."""
    cohort = facts.get("training_cohort") or {}
    n = cohort.get("n")
    size = f"{n} " if n else ""
    if cohort.get("source") == "synthetic":
        return f"fitted on {size}{SYNTHETIC_DEMO}"
    if cohort.get("source") == "real":
        return f"fitted on {size}real patients"
    return f"fitted on {size}patients of unstated origin"
