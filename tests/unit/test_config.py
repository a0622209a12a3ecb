"""Configuration: defaults, file, environment overrides, and named errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from node.config import ConfigError, load_settings
from tests.conftest import SARCNODE, run_cli


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "node.yaml"
    path.write_text(text)
    return path


def test_embedded_defaults_use_sqlite_under_the_storage_root(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("SARCNODE_CONFIG", raising=False)
    settings = load_settings(None)
    # Safe by default: no calling AE is accepted until the admin lists it.
    assert settings.dicom.allowed_calling_aes == []
    assert settings.dicom.accept_any_calling_ae is False
    assert 4096 <= settings.dicom.max_pdu_size <= 64 * 2**20
    assert settings.dicom.max_connections_per_ip < settings.dicom.max_associations
    assert settings.database_url.startswith("sqlite:///")
    assert settings.database_url.endswith(str(Path("var/sarcnode/sarcnode.db")))


def test_env_override_beats_the_file_and_keeps_the_rest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path, "dicom:\n  port: 11112\n  ae_title: FILEAE\n")
    monkeypatch.setenv("SARCNODE_DICOM__PORT", "11113")
    settings = load_settings(path)
    assert settings.dicom.port == 11113
    assert settings.dicom.ae_title == "FILEAE"


def test_config_env_var_selects_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, "dicom:\n  ae_title: FROMENV\n")
    monkeypatch.setenv("SARCNODE_CONFIG", str(path))
    assert load_settings(None).dicom.ae_title == "FROMENV"


def test_every_bad_field_is_named(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "dicom:\n  port: 70000\n  ae_title: THIS_AE_TITLE_IS_TOO_LONG\n"
        "  allowed_calling_aes: ['OK', 'BAD\\\\AE']\n  prot: 1\n"
        "database:\n  url: mysql://x\n",
    )
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    text = "\n".join(info.value.problems)
    for field in (
        "dicom.port",
        "dicom.ae_title",
        "dicom.allowed_calling_aes",
        "dicom.prot",
        "database.url",
    ):
        assert field in text, text
    assert "unknown key" in text


def test_bad_yaml_and_missing_file_are_clear(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_settings(write(tmp_path, "dicom: [unclosed"))
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_settings(tmp_path / "nope.yaml")


def test_tls_enabled_without_files_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"dicom\.tls"):
        load_settings(write(tmp_path, "dicom:\n  tls:\n    enabled: true\n"))


def test_config_check_cli_exit_codes(tmp_path: Path) -> None:
    good = write(tmp_path, "dicom:\n  port: 11150\n")
    assert run_cli(good, "config", "check").returncode == 0
    bad = tmp_path / "bad.yaml"
    bad.write_text("dicom:\n  port: -1\nstorage:\n  min_free_mb: lots\n")
    proc = run_cli(bad, "config", "check", check=False)
    assert proc.returncode == 2
    assert "dicom.port" in proc.stderr and "storage.min_free_mb" in proc.stderr
    assert Path(SARCNODE).exists()


def test_destinations_are_checked_by_kind_and_named(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "destinations:\n"
        "  - {name: pacs, kind: dicom, host: 127.0.0.1, port: 4242}\n"  # no AE title
        "  - {name: web, kind: stow, url: ftp://pacs/dicom-web}\n"
        "  - {name: box, kind: folder, path: /tmp/x, storage_commitment: true}\n"
        "  - {name: box, kind: folder, path: /tmp/y}\n"
        "uids:\n  root: '1.2.3'\n",  # no trailing dot
    )
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    text = "\n".join(info.value.problems)
    assert "'pacs' (dicom) needs ae_title" in text
    assert "'web': url must be http(s)" in text
    assert "storage commitment is DICOM only" in text
    assert "uids.root" in text


def test_destination_names_must_be_unique(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "destinations:\n  - {name: box, kind: folder, path: a}\n"
        "  - {name: box, kind: folder, path: b}\n",
    )
    with pytest.raises(ConfigError, match="box"):
        load_settings(path)
    good = write(tmp_path, "destinations:\n  - {name: box, kind: folder, path: a}\n")
    assert load_settings(good).destination("box").path == Path("a")
    with pytest.raises(KeyError, match="no destination 'pacs'"):
        load_settings(good).destination("pacs")


def test_unlimited_pdu_size_is_refused_with_the_range(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"dicom\.max_pdu_size: 0 \(unlimited\) is not allowed"):
        load_settings(write(tmp_path, "dicom:\n  max_pdu_size: 0\n"))


def test_security_warnings_name_what_is_open(tmp_path: Path) -> None:
    from node.config import security_warnings

    open_bind = load_settings(
        write(tmp_path, "dicom:\n  bind: 0.0.0.0\n  allowed_calling_aes: [MR1]\n")
    )
    [warning] = security_warnings(open_bind)
    assert (
        "dicom.bind 0.0.0.0" in warning and "neither dicom.allowed_peers nor dicom.tls" in warning
    )
    fenced = load_settings(
        write(
            tmp_path,
            "dicom:\n  bind: 0.0.0.0\n  allowed_calling_aes: [MR1]\n"
            "  allowed_peers: [10.1.0.0/16]\n",
        )
    )
    assert security_warnings(fenced) == []
    anyone = load_settings(
        write(tmp_path, "dicom:\n  bind: 10.1.2.3\n  accept_any_calling_ae: true\n")
    )
    assert len(security_warnings(anyone)) == 2
    assert "every association will be refused" in security_warnings(load_settings(None))[0]


def test_config_check_warns_loudly_for_an_open_network_bind(tmp_path: Path) -> None:
    path = write(tmp_path, "dicom:\n  bind: 0.0.0.0\n  allowed_calling_aes: [MR1]\n")
    proc = run_cli(path, "config", "check")
    assert proc.returncode == 0  # usable, but said out loud
    assert "WARNING dicom.bind 0.0.0.0 is reachable from the network" in proc.stderr
    quiet = write(tmp_path, "dicom:\n  allowed_calling_aes: [MR1]\n")
    assert "WARNING" not in run_cli(quiet, "config", "check").stderr
