"""Cards a pipeline scores with: checked on load, planned per study, judged against their range.

Real parts: the shipped demo card and its parameter file, card folders
written here with plausible numbers (a T1-only logistic card of the shape
the real-cohort cards have: ``sequences: [T1]``, ``cohort.source: real``,
``validation.nested_cv``, ``applicability``), :func:`pipelines.scoring.score`
and the synthetic cohort's clinical table, re-made without images.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipelines.radiomics.extract import load_params, params_hash
from pipelines.scoring import is_survival, score
from pipelines.scoring.cards import CardError, SignatureCard, load_signatures, plan
from pipelines.scoring.domain import judge, reconstruct_block
from pipelines.scoring.text import score_lines
from pipelines.signature.card import load_signature_card
from pipelines.synth.cohort import write_cohort

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "models" / "sarcnode-pfs-demo"
PARAMS = REPO / "config" / "radiomics" / "mr-demo.yaml"
SPHERICITY = "T1:tumour:original_shape_Sphericity"
ELONGATION = "T1:tumour:original_shape_Elongation"
RING_MEAN = "T1:ring:original_firstorder_Mean"


def t1_card(
    folder: Path,
    card_id: str = "sarcnode-lungmets-test",
    *,
    endpoint: str = "lung_metastasis",
    sphericity: tuple[float, float] = (0.0, 1.0),
    radscore: tuple[float, float] = (-1e6, 1e6),
    **changes: Any,
) -> Path:
    """A T1-only logistic card (tumour + ring) as the real-cohort cards are written.

    Its features are bounded by definition (sphericity and elongation lie in
    [0, 1]), so a test can choose a training range that every study is
    inside, or one that none is.
    """
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(PARAMS, folder / PARAMS.name)
    card: dict[str, Any] = {
        "id": card_id,
        "version": "1.0.0",
        "kind": "radiomics signature",
        "endpoint": endpoint,
        "label": endpoint,
        "intended_use": f"Research on {endpoint} of soft-tissue sarcoma: not for clinical use.",
        "clinical_use": "not for clinical use",
        "extraction": {
            "params_file": PARAMS.name,
            "params_sha256": params_hash(load_params(PARAMS)),
            "mode": "pyradiomics",
        },
        "sequences": ["T1"],
        "regions": ["tumour", "ring"],
        "cohort": {"source": "real", "n": 38},
        "features": [
            {"name": SPHERICITY, "mean": 0.62, "sd": 0.09, "coefficient": -0.81},
            {"name": ELONGATION, "mean": 0.71, "sd": 0.12, "coefficient": 0.44},
        ],
        "intercept": -0.35,
        "combat": None,
        "radscore": {"formula": "intercept + sum(coefficient * z) (log-odds)", "cutoff": 0.0},
        "nomogram": {"covariates": ["radscore"], "coefficients": {"const": -0.3, "radscore": 1.0}},
        "training": {"n": 37, "positives": 14},
        "validation": {
            "nested_cv": {
                "headline": "nested-CV AUC 0.71 (95% CI 0.55-0.85), permutation p 0.03",
                "auc": {"value": 0.71, "ci95": [0.55, 0.85]},
            }
        },
        "applicability": {
            "features": {SPHERICITY: list(sphericity), ELONGATION: [0.0, 1.0]},
            "radscore": list(radscore),
            "n_train": 37,
        },
    } | changes
    (folder / "card.yaml").write_text(yaml.safe_dump(card, sort_keys=False))
    return folder


def test_the_demo_card_knows_its_range_and_says_it_is_the_synthetic_demo() -> None:
    card = SignatureCard.from_folder(DEMO).card
    inside = {f["name"]: f["mean"] for f in card["features"]}
    result = score(card, inside)
    assert result["applicability"]["status"] == "inside"
    assert result["risk_group"] in ("high", "low")
    assert result["training_cohort"] == {"n": 140, "source": "synthetic"}
    assert result["demo"] is True and result["nested_cv"] is None
    assert result["survival_probability"] == result["pfs_probability"]
    text = "\n".join(score_lines(result))
    assert "fitted on 140 SYNTHETIC patients: the plumbing demo" in text
    assert "NOT FOR CLINICAL USE" in text

    # The noise study of issue 12: rad-score far above the training range.
    energy = card["features"][0]["name"]
    far = inside | {energy: 20 * inside[energy]}
    result = score(card, far)
    assert result["risk_group"] is None
    assert result["risk_group_withheld"] == "outside the model's range"
    verdict = result["applicability"]
    assert verdict["status"] == "outside"
    assert {e["name"] for e in verdict["outside"]} == {energy, "rad-score"}
    assert f"{energy} 5.109e+11 above the training range 6.112e+09 to 7.521e+10" in verdict["text"]
    lines = score_lines(result)
    assert lines[1].endswith("no risk group: outside the model's range")
    assert "predictions withheld: outside the model's range" in lines[2]


def test_the_demo_block_is_reconstructed_from_the_training_cases(tmp_path: Path) -> None:
    """``make pfs-applicability``: the training cases re-drawn give the shipped block."""
    write_cohort(tmp_path, 200, 11, images=False)
    card = load_signature_card(DEMO)
    block = reconstruct_block(card, DEMO / "features.csv", tmp_path / "clinical.csv")
    assert block.as_dict() == card["applicability"]
    assert block.radscore == card["nomogram"]["ranges"]["radscore"]  # the fit's own range
    with pytest.raises(ValueError, match=r"not the cases the card was fitted on|re-drew"):
        reconstruct_block(card, DEMO / "features.csv", tmp_path / "clinical.csv", val_fraction=0.2)


def test_a_feature_outside_its_training_range_withholds_the_risk_group(tmp_path: Path) -> None:
    card = SignatureCard.from_folder(t1_card(tmp_path / "c", sphericity=(0.35, 0.9))).card
    inside = score(card, {SPHERICITY: 0.6, ELONGATION: 0.7})
    assert inside["applicability"]["status"] == "inside"
    assert inside["risk_group"] in ("positive", "negative") and "probability" in inside
    assert inside["training_cohort"] == {"n": 37, "source": "real"} and not inside["demo"]
    assert inside["nested_cv"].startswith("nested-CV AUC 0.71")
    assert (
        "within the model's range: 2 feature(s) and the rad-score"
        in (inside["applicability"]["text"])
    )

    outside = score(card, {SPHERICITY: 0.15, ELONGATION: 0.7})
    assert outside["risk_group"] is None
    (excursion,) = outside["applicability"]["outside"]
    assert excursion["name"] == SPHERICITY and excursion["side"] == "below"
    assert excursion["by"] == pytest.approx(0.2) and excursion["by_fraction"] == pytest.approx(
        0.2 / 0.55
    )
    assert outside["applicability"]["text"] == (
        "outside the model's range: T1:tumour:original_shape_Sphericity 0.15 below the "
        "training range 0.35 to 0.9 by 0.2 (36% of its width)"
    )
    text = "\n".join(score_lines(outside))
    assert "fitted on 37 real patients; nested CV: nested-CV AUC 0.71" in text

    # A final fit that kept no feature: the card says so, and so does every output.
    empty = SignatureCard.from_folder(
        t1_card(
            tmp_path / "e",
            features=[],
            applicability={"features": {}, "radscore": [-0.35, -0.35], "n_train": 37},
            warning="the LASSO kept no feature on the full cohort: the score is constant",
        )
    ).card
    constant = score(empty, {})
    assert constant["radscore"] == pytest.approx(-0.35)
    assert constant["applicability"]["status"] == "inside"
    assert "CARD WARNING: the LASSO kept no feature" in "\n".join(score_lines(constant))


def test_without_a_block_the_nomogram_range_serves_else_the_domain_is_unknown() -> None:
    card = dict(load_signature_card(DEMO))
    del card["applicability"]
    names = [f["name"] for f in card["features"]]
    verdict = judge(card, dict.fromkeys(names, 0.0), radscore=0.0)
    assert verdict.status == "inside" and verdict.source == "nomogram.ranges"
    assert "the card records no feature ranges" in verdict.text()
    card["nomogram"] = {k: v for k, v in card["nomogram"].items() if k != "ranges"}
    unknown = judge(card, dict.fromkeys(names, 0.0), radscore=9.0)
    assert unknown.status == "unknown" and unknown.confident
    assert unknown.text().startswith("applicability domain unknown")


def test_an_efs_card_is_a_survival_card(tmp_path: Path) -> None:
    """Survival is the Cox block, not the endpoint's name: EFS gives survival probabilities."""
    card = dict(load_signature_card(DEMO)) | {"id": "efs-test", "endpoint": "efs"}
    assert is_survival(card)
    result = score(card, {f["name"]: f["mean"] for f in card["features"]})
    assert set(result["survival_probability"]) == {str(t) for t in card["time_points_days"]}
    assert "pfs_probability" not in result and result["risk_group"] in ("high", "low")
    assert "predicted event-free survival (radscore model): 300 d" in "\n".join(score_lines(result))


def test_cards_apply_by_sequence_and_share_extractions(tmp_path: Path) -> None:
    demo = SignatureCard.from_folder(DEMO)
    metastasis = SignatureCard.from_folder(t1_card(tmp_path / "m"))
    grade = SignatureCard.from_folder(
        t1_card(tmp_path / "g", "sarcnode-grade-test", endpoint="high_grade")
    )
    extractions, skipped = plan([demo, metastasis, grade], {"T2FS"})
    assert extractions == []
    assert skipped["sarcnode-grade-test"] == "needs T1: not in the study (it has T2FS)"
    assert skipped["sarcnode-pfs-demo"] == "needs T1: not in the study (it has T2FS)"
    extractions, skipped = plan([demo, metastasis, grade], {"T2FS", "T1"})
    assert not skipped
    # The same parameter file twice: one extraction for the two T1 cards, one for the demo's
    # two sequences.
    assert sorted(e.cards for e in extractions) == [
        ("sarcnode-lungmets-test", "sarcnode-grade-test"),
        ("sarcnode-pfs-demo",),
    ]
    assert len({e.key for e in extractions}) == 2


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"extraction": {"params_file": "gone.yaml"}}, "gone.yaml"),
        ({"extraction": {"params_file": PARAMS.name, "params_sha256": "0" * 64}}, "fitted with"),
        (
            {"extraction": {"params_file": PARAMS.name, "mode": "ibsi"}},
            "extraction mode 'ibsi', its parameter file mr-demo.yaml extracts in mode "
            "'pyradiomics'",
        ),
        ({"regions": ["tumour", "halo"]}, "'regions' must be some of"),
        ({"sequences": ["T2FS"]}, "is not <sequence>:<region>:<feature> of its sequences"),
        ({"applicability": {"radscore": [3, 1]}}, "bad range [3.0, 1.0]"),
    ],
)
def test_a_broken_card_is_refused_naming_its_file(
    tmp_path: Path, change: dict[str, Any], message: str
) -> None:
    folder = t1_card(tmp_path / "bad", **change)
    with pytest.raises(CardError, match=str(folder / "card.yaml")) as info:
        SignatureCard.from_folder(folder)
    assert message in str(info.value)


def test_unreadable_missing_and_twice_listed_cards_are_refused(tmp_path: Path) -> None:
    folder = t1_card(tmp_path / "c")
    (folder / "card.yaml").write_text("id: [unclosed\n")
    with pytest.raises(CardError, match="not valid YAML"):
        SignatureCard.from_folder(folder)
    with pytest.raises(CardError, match=str(tmp_path / "none")):
        SignatureCard.from_folder(tmp_path / "none")
    with pytest.raises(CardError, match="listed twice: sarcnode-pfs-demo"):
        load_signatures([DEMO, DEMO])
