"""Typed cards and clinical factors: refused with their name when unusable, never defaulted."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from pipelines.scoring import score
from pipelines.scoring.cards import CardError, SignatureCard
from pipelines.scoring.clinical import ClinicalFactors, Sex
from pipelines.segment.card import ModelError, SegModelCard

REPO = Path(__file__).resolve().parents[2]
SEG = REPO / "models" / "sarcnode-seg-demo"
PFS = REPO / "models" / "sarcnode-pfs-demo"


@pytest.mark.parametrize("word", ["M", "m", "male", "Male", " MALE "])
def test_every_spelling_of_male_is_male(word: str) -> None:
    factors = ClinicalFactors.from_options(sex=word)
    assert factors.sex is Sex.MALE and factors.to_json() == {"sex_male": 1}


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"sex": "X"}, "sex 'X'"),
        ({"sex": "mal"}, "sex 'mal'"),
        ({"edema": "maybe"}, "edema 'maybe': expected yes or no"),
        ({"grade": 4}, "grade 4"),
        ({"age": 130}, "age 130"),
    ],
)
def test_a_factor_nobody_can_read_is_refused_by_name(
    options: dict[str, object], named: str
) -> None:
    with pytest.raises(ValueError, match=named):
        ClinicalFactors.from_options(**options)  # type: ignore[arg-type]


def test_stored_factors_read_back_and_merge_as_clinical_set_keeps_them() -> None:
    first = ClinicalFactors.from_options(edema="yes", grade=3, sex="F")
    stored = first.to_json()
    assert stored == {"edema": 1, "grade3": 1, "sex_male": 0}
    assert ClinicalFactors.from_json(stored) == first
    later = ClinicalFactors.from_json(stored).updated(ClinicalFactors.from_options(age=60, grade=2))
    assert later.to_json() == {"edema": 1, "grade3": 0, "age": 60, "sex_male": 0}
    assert later.words() == "age 60, edema yes, grade3 no, sex_male no"
    with pytest.raises(ValueError, match="not clinical factors: sex"):
        ClinicalFactors.from_json({"sex": "M"})


def test_male_and_female_give_different_nomogram_predictions() -> None:
    """The bug the value object removes: ``--sex male`` scored as female."""
    card = yaml.safe_load((PFS / "card.yaml").read_text())
    card["nomogram"] = card["nomogram"] | {
        "covariates": ["radscore", "sex_male"],
        "coefficients": {"radscore": 1.0, "sex_male": 0.8},
        "means": {"radscore": 0.0, "sex_male": 0.5},
    }
    card.pop("applicability", None)
    features = {f["name"]: f["mean"] for f in card["features"]}
    batch = {"batch": next(iter(card["combat"]["batches"]))} if card.get("combat") else {}
    predicted = {
        word: score(card, features, ClinicalFactors.from_options(sex=word).covariates() | batch)[
            "survival_probability"
        ]
        for word in ("male", "M", "female")
    }
    assert predicted["male"] == predicted["M"] != predicted["female"]


def _copy_card(source: Path, folder: Path, **changes: object) -> Path:
    shutil.copytree(source, folder)
    card = yaml.safe_load((folder / "card.yaml").read_text())
    for key, value in changes.items():
        if value is None:
            card.pop(key)
        else:
            card[key] = value
    (folder / "card.yaml").write_text(yaml.safe_dump(card, sort_keys=False))
    return folder


def test_a_model_card_without_a_version_is_refused_naming_the_card(tmp_path: Path) -> None:
    assert SegModelCard.from_folder(SEG).name == "sarcnode-seg-demo 2.1.0"
    folder = _copy_card(SEG, tmp_path / "seg", version=None)
    with pytest.raises(ModelError, match=r"seg/card.yaml: field 'version' is missing"):
        SegModelCard.from_folder(folder)
    card = yaml.safe_load((SEG / "card.yaml").read_text())
    card.pop("id")
    with pytest.raises(ModelError, match="field 'id' is missing"):
        SegModelCard.from_checked(card, SEG)


def test_a_signature_card_without_a_version_is_refused_naming_the_card(tmp_path: Path) -> None:
    loaded = SignatureCard.from_folder(PFS)
    assert (loaded.id, loaded.version, loaded.endpoint) == ("sarcnode-pfs-demo", "1.1.0", "pfs")
    folder = _copy_card(PFS, tmp_path / "pfs", version=None)
    with pytest.raises(CardError, match=r"pfs/card.yaml: field 'version' is missing"):
        SignatureCard.from_folder(folder)
