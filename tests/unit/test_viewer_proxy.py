"""``sarcnode viewer``: the read-only same-origin proxy in front of a PACS (node/viewer.py).

A stand-in PACS (a stdlib HTTP server that records what reaches it) behind
the real :class:`ViewerServer`, and the console script on a stand-in OHIF
build: reads are forwarded with the browser's Host and the URL's credentials,
writes are refused here, a missing build exits 2 saying how to get it, and
the credentials are never printed. And ``make demo`` says exactly how to get
its PACS when it cannot install it.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import tarfile
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from node.viewer import (
    OHIF_VERSION,
    MissingDistError,
    Pacs,
    ViewerError,
    ViewerServer,
    fetch_ohif,
    find_dist,
)
from tests.conftest import SARCNODE

STUDIES = [{"0020000D": {"vr": "UI", "Value": ["1.2.3"]}}]


class _PacsHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Pacs

    def log_message(self, format: str, *args: Any) -> None:
        return

    def _answer(self) -> None:
        self.server.seen.append((self.command, self.path, dict(self.headers.items())))
        if self.path.startswith("/dicom-web/secret"):
            body = b"unauthorized"
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Basic realm="pacs"')
        elif self.path.startswith("/dicom-web/chunked"):
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for part in (b"x" * 70_000, b"y" * 3):
                self.wfile.write(f"{len(part):x}\r\n".encode() + part + b"\r\n")
            self.wfile.write(b"0\r\n\r\n")
            return
        else:
            body = json.dumps(STUDIES).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/dicom+json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_GET(self) -> None:
        self._answer()

    def do_HEAD(self) -> None:
        self._answer()

    def do_POST(self) -> None:
        self._answer()

    def do_DELETE(self) -> None:
        self._answer()


class _Pacs(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _PacsHandler)
        self.seen: list[tuple[str, str, dict[str, str]]] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


@pytest.fixture
def pacs() -> Iterator[_Pacs]:
    server = _Pacs()
    thread = threading.Thread(target=server.serve_forever, args=(0.1,), daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def fake_ohif(folder: Path) -> Path:
    """A stand-in OHIF build: index.html, one bundle, VERSION."""
    (folder / "dist").mkdir(parents=True)
    (folder / "dist" / "index.html").write_text("<html>OHIF stand-in</html>")
    (folder / "dist" / "app.bundle.js").write_text("console.log('bundle')")
    (folder / "VERSION").write_text(OHIF_VERSION + "\n")
    (folder / "secret.txt").write_text("outside dist")
    return folder


def call(
    url: str, method: str = "GET", headers: dict[str, str] | None = None, data: bytes | None = None
) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, method=method, headers=headers or {}, data=data)  # noqa: S310
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:  # noqa: S310 (loopback)
            return resp.status, dict(resp.headers.items()), resp.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers.items()), err.read()


@pytest.fixture
def viewer(tmp_path: Path, pacs: _Pacs) -> Iterator[ViewerServer]:
    dist = find_dist(fake_ohif(tmp_path / "ohif"))
    pacs_url = pacs.url.replace("http://", "http://reader:p%40ss@")
    with ViewerServer(dist, pacs_url) as server:
        yield server


def test_a_get_reaches_the_pacs_with_the_browsers_host_and_the_urls_credentials(
    viewer: ViewerServer, pacs: _Pacs
) -> None:
    status, headers, body = call(
        f"{viewer.url}/dicom-web/studies?PatientID=X&includefield=all",
        headers={"Cookie": "session=browser", "Authorization": "Bearer from-browser"},
    )
    assert status == 200 and json.loads(body) == STUDIES
    assert headers["Cross-Origin-Embedder-Policy"] == "require-corp"
    ((method, path, sent),) = pacs.seen
    assert (method, path) == ("GET", "/dicom-web/studies?PatientID=X&includefield=all")
    # Host kept: the PACS writes BulkDataURIs on the viewer's origin.
    assert sent["Host"] == viewer.url.removeprefix("http://")
    assert sent["Authorization"] == "Basic " + base64.b64encode(b"reader:p@ss").decode()
    assert "Cookie" not in sent
    # HEAD too; Orthanc's WADO-URI root (a PACS URL without a path is Orthanc).
    assert call(f"{viewer.url}/dicom-web/studies", "HEAD")[0] == 200
    assert call(f"{viewer.url}/wado?requestType=WADO")[0] == 200
    assert [(m, p) for m, p, _ in pacs.seen[1:]] == [
        ("HEAD", "/dicom-web/studies"),
        ("GET", "/wado?requestType=WADO"),
    ]


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH", "OPTIONS"])
def test_anything_but_a_read_is_refused_before_the_pacs(
    viewer: ViewerServer, pacs: _Pacs, method: str
) -> None:
    for path in ("/dicom-web/studies", "/dicom-web/studies/1.2.3", "/wado", "/", "/viewer"):
        status, headers, _ = call(f"{viewer.url}{path}", method, data=b"{}")
        assert status == 405 and headers["Allow"] == "GET, HEAD", (method, path)
    assert pacs.seen == []


def test_the_app_its_routes_and_config_are_served_and_nothing_outside_dist(
    viewer: ViewerServer, pacs: _Pacs
) -> None:
    assert call(f"{viewer.url}/")[2] == b"<html>OHIF stand-in</html>"
    assert call(viewer.study_url("1.2.3"))[2] == b"<html>OHIF stand-in</html>"  # SPA route
    _, headers, body = call(f"{viewer.url}/app.bundle.js")
    assert body == b"console.log('bundle')" and headers["Content-Type"] == "text/javascript"
    for escape in ("/%2e%2e/secret.txt", "/..%2fsecret.txt", "/../secret.txt"):
        assert call(f"{viewer.url}{escape}")[2] == b"<html>OHIF stand-in</html>", escape
    config = call(f"{viewer.url}/app-config.js")[2].decode()
    assert "qidoRoot: '/dicom-web'" in config and "wadoUriRoot: '/wado'" in config
    assert "p@ss" not in config and "reader" not in config
    assert pacs.seen == []


def test_pacs_refusals_and_absence_reach_the_browser_without_a_password_prompt(
    tmp_path: Path, viewer: ViewerServer, pacs: _Pacs
) -> None:
    status, headers, _ = call(f"{viewer.url}/dicom-web/secret")
    assert status == 401 and "WWW-Authenticate" not in headers
    assert any("HTTP 401 (check the credentials" in e for e in viewer.proxy_errors)
    # A chunked answer (no Content-Length) arrives whole.
    status, _, body = call(f"{viewer.url}/dicom-web/chunked")
    assert status == 200 and body == b"x" * 70_000 + b"yyy"
    # No PACS at all: 502, not a hang or a traceback.
    dead = ViewerServer(find_dist(tmp_path / "ohif"), "http://127.0.0.1:9/dicom-web")
    with dead:
        assert call(f"{dead.url}/dicom-web/studies")[0] == 502


def test_pacs_urls() -> None:
    orthanc = Pacs.parse("http://reader:p%40ss@127.0.0.1:8042/")
    assert (orthanc.root, orthanc.extra, orthanc.port) == ("/dicom-web", ("/wado",), 8042)
    assert str(orthanc) == "http://***@127.0.0.1:8042/dicom-web"
    other = Pacs.parse("https://pacs.example.org/dcm4chee-arc/aets/DCM4CHEE/rs/")
    assert (other.root, other.extra, other.port) == ("/dcm4chee-arc/aets/DCM4CHEE/rs", (), 443)
    assert other.authorization is None and other.proxies("/dcm4chee-arc/aets/DCM4CHEE/rs/studies")
    assert not other.proxies("/dicom-web/studies") and not other.proxies("/dcm4chee-arcx")
    for bad in ("ftp://u:hunter2@pacs/x", "http://u:hunter2@pacs/x?q=1", "pacs:8042"):
        with pytest.raises(ViewerError) as caught:
            Pacs.parse(bad)
        assert "hunter2" not in str(caught.value)


def test_a_missing_or_foreign_build_is_never_fetched_at_run_time(tmp_path: Path) -> None:
    with pytest.raises(MissingDistError, match="make viewer"):
        find_dist(tmp_path / "none")
    other = fake_ohif(tmp_path / "other")
    (other / "VERSION").write_text("3.9.0\n")
    with pytest.raises(MissingDistError, match=re.escape("holds OHIF 3.9.0")):
        find_dist(other)
    # fetch keeps a build that is there (no npm called) ...
    present = fake_ohif(tmp_path / "present")
    assert fetch_ohif(present, npm="/nonexistent/npm") == present / "dist"
    # ... and refuses a tarball that is not the pinned one.
    npm = tmp_path / "npm"
    tarball = io.BytesIO()
    with tarfile.open(fileobj=tarball, mode="w:gz") as tar:
        data = b"<html>not OHIF</html>"
        info = tarfile.TarInfo("package/dist/index.html")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    (tmp_path / "forged.tgz").write_bytes(tarball.getvalue())
    npm.write_text(f'#!/bin/sh\ncp {tmp_path / "forged.tgz"} "$4/ohif-app-{OHIF_VERSION}.tgz"\n')
    npm.chmod(0o755)
    forged = "sha512-" + base64.b64encode(hashlib.sha512(tarball.getvalue()).digest()).decode()
    with pytest.raises(ViewerError, match=re.escape(f"integrity {forged}")):
        fetch_ohif(tmp_path / "fetched", npm=str(npm))
    assert not (tmp_path / "fetched").exists()


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("SARCNODE_")}


def test_the_command_without_a_build_exits_2_saying_how_to_get_it(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            SARCNODE,
            "viewer",
            "--pacs",
            "http://reader:hunter2@127.0.0.1:8042",
            "--ohif",
            str(tmp_path / "none"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=_env(),
    )
    assert proc.returncode == 2, proc.stderr
    assert "make viewer" in proc.stderr and proc.stdout == ""
    assert "hunter2" not in proc.stderr
    no_pacs = subprocess.run(
        [SARCNODE, "viewer"], capture_output=True, text=True, timeout=60, env=_env()
    )
    assert no_pacs.returncode == 2 and "--pacs" in no_pacs.stderr


def test_the_command_prints_the_study_address_and_serves_until_sigterm(
    tmp_path: Path, pacs: _Pacs
) -> None:
    fake_ohif(tmp_path / "ohif")
    pacs_url = pacs.url.replace("http://", "http://reader:hunter2@")
    proc = subprocess.Popen(
        [SARCNODE, "viewer", "--port", "0", "--study", "1.2.3", "--ohif", str(tmp_path / "ohif")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env() | {"SARCNODE_VIEWER_PACS": pacs_url},
    )
    try:
        assert proc.stdout is not None
        lines = [proc.stdout.readline() for _ in range(3)]
        first, opened, _ = lines
        assert first.startswith(f"OHIF {OHIF_VERSION} on http://127.0.0.1:")
        assert f"PACS http://***@127.0.0.1:{pacs.server_address[1]}/dicom-web" in first
        assert opened.startswith("open http://127.0.0.1:")
        address = opened.split()[1]
        assert address.endswith("/viewer?StudyInstanceUIDs=1.2.3")
        origin = address.split("/viewer")[0]
        assert call(address)[2] == b"<html>OHIF stand-in</html>"
        assert json.loads(call(f"{origin}/dicom-web/studies")[2]) == STUDIES
        assert call(f"{origin}/dicom-web/secret")[0] == 401
        assert call(f"{origin}/dicom-web/studies", "DELETE")[0] == 405
        assert [m for m, _, _ in pacs.seen] == ["GET", "GET"]
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert "HTTP 401" in err  # the refusal is logged ...
    assert "hunter2" not in out + err + "".join(lines)  # ... the password never


def test_the_demo_says_exactly_how_to_get_orthanc_when_it_cannot_install_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from node import demo

    monkeypatch.setattr(demo, "ORTHANC_BIN", tmp_path / "Orthanc")
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setattr(shutil, "which", lambda name: f"/usr/bin/{name}")
    said = demo.ensure_orthanc()
    assert said is not None and "sudo apt-get install -y orthanc orthanc-dicomweb" in said
    monkeypatch.setattr(shutil, "which", lambda name: None)
    said = demo.ensure_orthanc()
    assert said is not None and "not a Debian system" in said
