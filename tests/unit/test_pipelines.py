"""Pipeline files and the trigger decision: which studies start a job, and why not."""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from node.pipelines import PipelineError, SeriesInfo, decide, load_pipeline
from pipelines.io.dicom import orientation_label
from tests.pipelines.test_scoring_domain import t1_card

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "config" / "pipelines" / "sarcoma-mr.yaml"
AXIAL = ["1", "0", "0", "0", "1", "0"]
SAGITTAL = ["0", "1", "0", "0", "0", "-1"]
T2FS = {"Modality": "MR", "SeriesDescription": "T2 FS TRA", "Orientation": "AXIAL"}
T1 = {"Modality": "MR", "SeriesDescription": "T1 TSE TRA", "Orientation": "AXIAL"}
NOW = datetime(2026, 11, 24, 12, 0, 0)


def info(
    uid: str, attrs: dict[str, object], *, stable: bool = True, ago_s: float = 600
) -> SeriesInfo:
    return SeriesInfo(uid, attrs, 20, stable, NOW - timedelta(seconds=ago_s))


def test_orientation_labels() -> None:
    assert orientation_label(AXIAL) == "AXIAL"
    assert orientation_label(SAGITTAL) == "SAGITTAL"
    assert orientation_label(["1", "0", "0", "0", "0", "-1"]) == "CORONAL"
    assert orientation_label(["1", "0", "0", "0", "0.7071", "0.7071"]) == "OBLIQUE"  # 45 degrees
    assert orientation_label(None) is None


def test_the_shipped_pipeline_decides_and_says_why() -> None:
    p = load_pipeline(SHIPPED)
    assert p.required == ("T2FS",) and p.optional == ("T1",)
    both = decide(p, [info("1", T2FS), info("2", T1)], now=NOW)
    assert both.start and both.roles == {"T2FS": "1", "T1": "2"}
    only_t1 = decide(p, [info("2", T1)], now=NOW)
    assert not only_t1.start and "no T2FS series" in only_t1.reason
    receiving = decide(p, [info("1", T2FS, stable=False), info("2", T1)], now=NOW)
    assert not receiving.start and "still receiving" in receiving.reason
    # T1 missing: wait for it up to wait_for_optional_s after FS-T2 became stable.
    early = decide(p, [info("1", T2FS, ago_s=10)], now=NOW)
    assert not early.start and "waiting for optional T1" in early.reason and early.retry_at
    late = decide(p, [info("1", T2FS, ago_s=p.wait_for_optional_s + 1)], now=NOW)
    assert late.start and late.roles == {"T2FS": "1"}
    # A sagittal FS-T2 and a localizer are left out by trigger.series.
    sag = decide(p, [info("3", T2FS | {"Orientation": "SAGITTAL"}), info("2", T1)], now=NOW)
    assert not sag.start and sag.classified["3"] == "excluded by trigger.series"
    scout = decide(p, [info("4", T2FS | {"SeriesDescription": "localizer T2 FS"})], now=NOW)
    assert not scout.start
    ct = decide(p, [info("5", T2FS | {"Modality": "CT"})], now=NOW)
    assert not ct.start and ct.classified["5"] == "modality CT"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"stages": ["segment", "paint"]}, "unknown stage(s) paint"),
        ({"priority": "asap"}, "priority must be one of"),
        ({"colour": "red"}, "unknown key(s) colour"),
        ({"segmentation_model": "../../models/none"}, "has no card.yaml"),
        ({"stages": ["segment", "compare", "score"]}, "stages must keep the order"),
        ({"priors": {"max_age_days": 0}}, "max_age_days must be >= 1"),
        ({"priors": {"newest": True}}, "'priors' takes max_age_days and sources"),
    ],
)
def test_a_bad_pipeline_file_is_named(
    tmp_path: Path, change: dict[str, object], message: str
) -> None:
    data = shipped_absolute()
    data |= change
    if "segmentation_model" in change:
        data["segmentation_model"] = str(tmp_path / "none")
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(PipelineError, match=r"bad\.yaml") as info_:
        load_pipeline(path)
    assert message in str(info_.value)


def shipped_absolute() -> dict[str, Any]:
    """The shipped pipeline with its relative paths made absolute (to be written elsewhere)."""
    data: dict[str, Any] = yaml.safe_load(SHIPPED.read_text())
    data["trigger"]["roles_file"] = str(REPO / "config" / "sequence_roles.yaml")
    data["segmentation_model"] = str((SHIPPED.parent / data["segmentation_model"]).resolve())
    data["signatures"] = [str((SHIPPED.parent / s).resolve()) for s in data["signatures"]]
    return data


def test_the_shipped_pipeline_lists_its_cards_and_one_card_still_works(tmp_path: Path) -> None:
    demo = (REPO / "models" / "sarcnode-pfs-demo").resolve()
    real = ("sarcnode-lungmets-t1", "sarcnode-grade-t1", "sarcnode-efs-t1")
    assert load_pipeline(SHIPPED).signatures == (*(REPO / "models" / r for r in real), demo)
    data = shipped_absolute()
    data.pop("signatures")
    data["signature"] = str(demo)  # the one-card form of before
    (tmp_path / "one.yaml").write_text(yaml.safe_dump(data))
    assert load_pipeline(tmp_path / "one.yaml").signatures == (demo,)
    data["signatures"] = [data["signature"]]
    (tmp_path / "both.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(PipelineError, match="not both"):
        load_pipeline(tmp_path / "both.yaml")


def test_a_missing_or_broken_card_is_a_config_error_naming_its_path(tmp_path: Path) -> None:
    """Each card is checked when the pipeline loads: ``serve`` and ``config check`` refuse it."""
    from tests.conftest import run_cli

    broken = tmp_path / "models" / "broken"
    t1_card(broken, extraction={"params_file": "mr-demo.yaml", "params_sha256": "0" * 64})
    folder = tmp_path / "pipelines"
    folder.mkdir()
    data = shipped_absolute()
    data["signatures"] += [str(tmp_path / "models" / "missing")]
    (folder / "p.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(PipelineError, match=str(tmp_path / "models" / "missing" / "card.yaml")):
        load_pipeline(folder / "p.yaml")
    data["signatures"][-1] = str(broken)
    (folder / "p.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(PipelineError, match=r"p\.yaml: signature card .*broken/card\.yaml"):
        load_pipeline(folder / "p.yaml")

    config = tmp_path / "node.yaml"
    config.write_text(yaml.safe_dump({"jobs": {"pipelines_dir": str(folder)}}))
    proc = run_cli(config, "config", "check", check=False)
    assert proc.returncode == 2
    assert f"{broken / 'card.yaml'}: mr-demo.yaml has sha256" in proc.stderr
    data["signatures"][-1] = str(t1_card(tmp_path / "models" / "fine"))
    (folder / "p.yaml").write_text(yaml.safe_dump(data))
    proc = run_cli(config, "config", "check")
    assert (
        "signature cards sarcnode-lungmets-t1, sarcnode-grade-t1, "
        "sarcnode-efs-t1, sarcnode-pfs-demo, fine\n" in proc.stdout
    )


def test_a_role_without_a_rule_is_refused(tmp_path: Path) -> None:
    data = yaml.safe_load(SHIPPED.read_text())
    data["trigger"]["roles_file"] = str(REPO / "config" / "sequence_roles.yaml")
    data["trigger"]["optional"] = ["DWI"]
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(PipelineError, match="role 'DWI' has no rule"):
        load_pipeline(path)
