"""DICOM TLS: a self-signed CA made here, dcmtk's storescu +tls as the scanner."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.conftest import NodeProcess, shared_data
from tests.peers import OPENSSL, require

pytestmark = pytest.mark.integration


def openssl(*args: str) -> None:
    subprocess.run(
        [require(OPENSSL, "openssl"), *args], check=True, capture_output=True, timeout=60
    )


def make_pki(folder: Path) -> dict[str, Path]:
    """A CA, a server certificate and two client certificates (one from a rogue CA)."""
    folder.mkdir()
    p = {
        name: folder / name
        for name in (
            "ca.key",
            "ca.pem",
            "server.key",
            "server.pem",
            "client.key",
            "client.pem",
            "rogue-ca.key",
            "rogue-ca.pem",
            "rogue.key",
            "rogue.pem",
        )
    }
    for ca in ("ca", "rogue-ca"):
        openssl(
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            f"/CN=sarcnode test {ca}",
            "-keyout",
            str(p[f"{ca}.key"]),
            "-out",
            str(p[f"{ca}.pem"]),
        )
    for name, ca, cn in (
        ("server", "ca", "127.0.0.1"),
        ("client", "ca", "SCANNER1"),
        ("rogue", "rogue-ca", "ROGUE"),
    ):
        csr = folder / f"{name}.csr"
        openssl(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            f"/CN={cn}",
            "-keyout",
            str(p[f"{name}.key"]),
            "-out",
            str(csr),
        )
        openssl(
            "x509",
            "-req",
            "-in",
            str(csr),
            "-CA",
            str(p[f"{ca}.pem"]),
            "-CAkey",
            str(p[f"{ca}.key"]),
            "-CAcreateserial",
            "-days",
            "2",
            "-out",
            str(p[f"{name}.pem"]),
        )
    return p


def tls_node(node_factory, pki: dict[str, Path], **dicom: object) -> NodeProcess:
    """A started node that requires TLS with client certificates from the test CA."""
    tls = {
        "enabled": True,
        "cert": str(pki["server.pem"]),
        "key": str(pki["server.key"]),
        "ca": str(pki["ca.pem"]),
        "require_client_cert": True,
    }
    node: NodeProcess = node_factory({"dicom": {**dicom, "tls": tls}})
    node.start()
    return node


def client_tls(pki: dict[str, Path], who: str = "client") -> tuple[str, ...]:
    """storescu options: present ``who``'s certificate, trust the test CA."""
    return ("+tls", str(pki[f"{who}.key"]), str(pki[f"{who}.pem"]), "+cf", str(pki["ca.pem"]))


def send(node: NodeProcess, file: Path, *tls: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*node.storescu_cmd(*tls), str(file)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_tls_association_works_and_plain_or_untrusted_ones_are_refused(
    node_factory, tmp_path: Path
) -> None:
    pki = make_pki(tmp_path / "pki")
    node = tls_node(node_factory, pki)
    files = sorted(shared_data("sts-raw", "STS_001", "MR_T1", "image").iterdir())

    ok = send(node, files[0], *client_tls(pki))
    assert ok.returncode == 0, ok.stderr
    plain = send(node, files[1])
    assert plain.returncode != 0
    rogue = send(node, files[2], *client_tls(pki, "rogue"))
    assert rogue.returncode != 0

    [series] = node.json("series")
    assert series["instances"] == 1  # only the TLS-authenticated instance got in
    accepted = [a for a in node.json("associations") if a["state"] != "rejected"]
    assert [(a["tls"], a["tls_peer"]) for a in accepted] == [(True, "SCANNER1")]
    failed = node.json("audit", "--action", "association.tls_failed")
    assert len(failed) == 2  # the plain connection and the rogue certificate
    assert all(e["outcome"] == "refused" and e["actor_ip"] == "127.0.0.1" for e in failed)
    assert any("CERTIFICATE" in e["detail"]["reason"].upper() for e in failed)


def test_an_idle_connection_does_not_block_tls_senders(node_factory, tmp_path: Path) -> None:
    """A client that connects and never starts TLS must not hold up the accept loop."""
    import socket
    import time

    pki = make_pki(tmp_path / "pki")
    node = tls_node(node_factory, pki, acse_timeout_s=5)
    first = sorted(shared_data("sts-raw", "STS_001", "MR_T1", "image").iterdir())[0]
    with socket.create_connection(("127.0.0.1", node.port)):  # says nothing
        time.sleep(0.5)
        started = time.monotonic()
        ok = send(node, first, *client_tls(pki))
        elapsed = time.monotonic() - started
    assert ok.returncode == 0, ok.stderr
    assert elapsed < 4, f"TLS sender waited {elapsed:.1f} s behind an idle connection"
