"""What ``config check`` refuses before a node is started: pipelines and models.

A node without pipelines stores studies and never starts a job, and a model
whose card is malformed or whose weights do not match fails its first job:
``config check`` (which the systemd unit runs before ``serve``) says so with
one line that names the file and the field, and exits 2.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from node.pipelines import PipelineError, load_pipelines
from pipelines.share import config_dir, models_dir, share_root
from tests.conftest import run_cli

REPO = Path(__file__).resolve().parents[2]


def site(tmp_path: Path, edit_card: dict[str, object] | None = None) -> Path:
    """config/ and models/ copied under tmp_path (weights linked); the pipelines folder."""
    shutil.copytree(config_dir(), tmp_path / "config")
    seg = models_dir() / "sarcnode-seg-demo"
    for model in models_dir().iterdir():
        if model.is_dir() and model.name != "__pycache__":
            target = tmp_path / "models" / model.name
            if model == seg:
                target.mkdir(parents=True)
                for f in model.iterdir():
                    if f.is_file():
                        (target / f.name).symlink_to(f)
                (target / "card.yaml").unlink()
                shutil.copy(seg / "card.yaml", target / "card.yaml")
            else:
                shutil.copytree(model, target)
    card_path = tmp_path / "models" / "sarcnode-seg-demo" / "card.yaml"
    if edit_card:
        card = yaml.safe_load(card_path.read_text())
        for dotted, value in edit_card.items():
            *parents, last = dotted.split(".")
            node = card
            for key in parents:
                node = node[key]
            if value is None:
                del node[last]
            else:
                node[last] = value
        card_path.write_text(yaml.safe_dump(card))
    return tmp_path / "config" / "pipelines"


def config_for(tmp_path: Path, pipelines: Path) -> Path:
    path = tmp_path / "node.yaml"
    path.write_text(yaml.safe_dump({"jobs": {"pipelines_dir": str(pipelines)}}))
    return path


def test_the_checkout_is_the_share_root_here() -> None:
    assert share_root() == REPO
    assert (config_dir() / "pipelines" / "sarcoma-mr.yaml").is_file()


def test_shipped_pipelines_load_with_their_models_checked(tmp_path: Path) -> None:
    (pipeline,) = load_pipelines(site(tmp_path), required=True)
    assert pipeline.segmentation_model.name == "sarcnode-seg-demo"
    proc = run_cli(config_for(tmp_path, tmp_path / "config" / "pipelines"), "config", "check")
    assert "checksums OK" in proc.stdout


@pytest.mark.parametrize("kind", ["missing", "empty"])
def test_config_check_fails_without_pipelines(tmp_path: Path, kind: str) -> None:
    folder = tmp_path / "pipelines"
    if kind == "empty":
        folder.mkdir()
    proc = run_cli(config_for(tmp_path, folder), "config", "check", check=False)
    assert proc.returncode == 2
    assert str(folder) in proc.stderr and "jobs.pipelines_dir" in proc.stderr
    with pytest.raises(PipelineError):
        load_pipelines(folder, required=True)


def test_config_check_fails_when_a_named_model_is_absent(tmp_path: Path) -> None:
    pipelines = site(tmp_path)
    shutil.rmtree(tmp_path / "models" / "sarcnode-seg-demo")
    proc = run_cli(config_for(tmp_path, pipelines), "config", "check", check=False)
    assert proc.returncode == 2
    assert "sarcnode-seg-demo has no card.yaml" in proc.stderr


def test_config_check_fails_on_a_wrong_checksum(tmp_path: Path) -> None:
    pipelines = site(tmp_path, {"weights.fine_2.sha256": "0" * 64})
    proc = run_cli(config_for(tmp_path, pipelines), "config", "check", check=False)
    assert proc.returncode == 2
    assert "fine_2.pt have sha256" in proc.stderr and "refusing to load them" in proc.stderr


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        ({"architecture.fine.margin_mm": None}, "architecture.fine.margin_mm"),
        ({"architecture.coarse.channels": "sixteen"}, "architecture.coarse.channels"),
        ({"architecture": None}, "architecture"),
        ({"weights.fine_3": None}, "weights.fine_3"),
        ({"weights.coarse.file": None}, "weights.coarse.file"),
        ({"id": None}, "id"),
    ],
)
def test_a_malformed_model_card_is_one_line_naming_file_and_field(
    tmp_path: Path, edit: dict[str, object], field: str
) -> None:
    pipelines = site(tmp_path, edit)
    proc = run_cli(config_for(tmp_path, pipelines), "config", "check", check=False)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "KeyError" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if "pipeline error" in line]
    assert len(lines) == 1, proc.stderr
    assert "sarcnode-seg-demo/card.yaml" in lines[0] and f"'{field}'" in lines[0], lines[0]
