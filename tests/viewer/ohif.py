"""The OHIF viewer (prebuilt ``@ohif/app`` dist) served in front of a test Orthanc.

``ensure_ohif`` fetches the npm package once (``npm pack``) into a cache folder
under ``var/cache`` and writes our ``app-config.js`` into it; ``ViewerServer``
serves that dist on a free loopback port and proxies DICOMweb to Orthanc on
the same origin (Orthanc sends no CORS headers), keeping the browser's Host
header so that the BulkDataURIs Orthanc writes come back same-origin.
"""

from __future__ import annotations

import http.client
import mimetypes
import shutil
import subprocess
import tarfile
import tempfile
import threading
import urllib.parse
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest

OHIF_VERSION = "3.12.10"
REPO = Path(__file__).resolve().parents[2]
DEFAULT_CACHE = REPO / "var" / "cache" / f"ohif-{OHIF_VERSION}"

#: Paths proxied to Orthanc; everything else is the OHIF dist.
PROXIED = ("/dicom-web", "/wado")

APP_CONFIG = """\
/** sarcnode test harness: OHIF against a same-origin Orthanc (tests/viewer/ohif.py). */
window.config = {
  routerBasename: '/',
  extensions: [],
  modes: [],
  showStudyList: true,
  maxNumberOfWebWorkers: 2,
  showWarningMessageForCrossOrigin: false,
  showCPUFallbackMessage: false,
  showLoadingIndicator: true,
  strictZSpacingForVolumeViewport: true,
  disableConfirmationPrompts: true,
  investigationalUseDialog: { option: 'never' },
  customizationService: {
    'ohif.tours': { $set: [] },
  },
  showErrorDetails: 'always',
  defaultDataSourceName: 'orthanc',
  dataSources: [
    {
      namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
      sourceName: 'orthanc',
      configuration: {
        friendlyName: 'test Orthanc (same-origin proxy)',
        name: 'orthanc',
        qidoRoot: '/dicom-web',
        wadoRoot: '/dicom-web',
        wadoUriRoot: '/wado',
        qidoSupportsIncludeField: true,
        supportsReject: false,
        supportsStow: false,
        imageRendering: 'wadors',
        thumbnailRendering: 'wadors',
        enableStudyLazyLoad: true,
        supportsFuzzyMatching: false,
        supportsWildcard: true,
        omitQuotationForMultipartRequest: true,
        bulkDataURI: { enabled: true },
      },
    },
  ],
};
"""


def ensure_ohif(cache: Path = DEFAULT_CACHE) -> Path:
    """Return the OHIF ``dist`` folder under ``cache``, fetching it once with ``npm pack``.

    A cached dist is reused as is (no network); only ``app-config.js`` is
    (re)written, so the config follows this file.
    """
    cache = Path(cache)
    dist = cache / "dist"
    if not (dist / "index.html").is_file():
        _fetch(cache)
    config = dist / "app-config.js"
    if not config.is_file() or config.read_text() != APP_CONFIG:
        config.write_text(APP_CONFIG)
    return dist


def _fetch(cache: Path) -> None:
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError("npm is not installed: cannot fetch @ohif/app")
    cache.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".ohif-", dir=cache.parent) as tmp:
        work = Path(tmp)
        proc = subprocess.run(
            [npm, "pack", f"@ohif/app@{OHIF_VERSION}", "--pack-destination", str(work)],
            cwd=work,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        tarballs = list(work.glob("*.tgz"))
        if proc.returncode != 0 or len(tarballs) != 1:
            raise RuntimeError(f"npm pack @ohif/app@{OHIF_VERSION} failed:\n{proc.stderr[-3000:]}")
        with tarfile.open(tarballs[0]) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith("package/dist/")]
            tar.extractall(work / "x", members=members, filter="data")
        staged = work / "staged"
        staged.mkdir()
        (work / "x" / "package" / "dist").rename(staged / "dist")
        (staged / "VERSION").write_text(OHIF_VERSION + "\n")
        if cache.exists():
            shutil.rmtree(cache)
        staged.rename(cache)


# -- the server ------------------------------------------------------------------

_HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "trailers",
    "transfer-encoding",
    "upgrade",
    "content-length",
}
_TYPES = {
    ".wasm": "application/wasm",
    ".js": "text/javascript",
    ".mjs": "text/javascript",
    ".css": "text/css",
    ".json": "application/json",
    ".svg": "image/svg+xml",
    ".html": "text/html; charset=utf-8",
    ".woff2": "font/woff2",
}
# Cross-origin isolation (SharedArrayBuffer for cornerstone's volume loading);
# every resource is same-origin, so COEP require-corp costs nothing.
_ISOLATION = {
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Embedder-Policy": "require-corp",
}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        return

    def do_GET(self) -> None:
        self._dispatch()

    def do_HEAD(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def do_PUT(self) -> None:
        self._dispatch()

    def do_DELETE(self) -> None:
        self._dispatch()

    def _dispatch(self) -> None:
        path = urllib.parse.urlsplit(self.path).path
        try:
            if any(path == p or path.startswith(p + "/") for p in PROXIED):
                self._proxy()
            elif self.command in ("GET", "HEAD"):
                self._static(path)
            else:
                self._send(405, b"method not allowed\n", "text/plain")
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _send(
        self, status: int, body: bytes, ctype: str, headers: dict[str, str] | None = None
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for key, value in {**_ISOLATION, **(headers or {})}.items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _static(self, path: str) -> None:
        root = self.server.dist
        rel = urllib.parse.unquote(path).lstrip("/")
        target = (root / rel).resolve() if rel else root / "index.html"
        if not target.is_relative_to(root) or not target.is_file():
            # SPA fallback: /viewer, /segmentation, ... are client-side routes.
            target = root / "index.html"
        ctype = _TYPES.get(target.suffix) or (
            mimetypes.guess_type(target.name)[0] or "application/octet-stream"
        )
        cache = "no-cache" if target.name in ("index.html", "app-config.js") else "max-age=3600"
        self._send(200, target.read_bytes(), ctype, {"Cache-Control": cache})

    def _proxy(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        upstream = http.client.HTTPConnection(
            self.server.upstream_host, self.server.upstream_port, timeout=60
        )
        try:
            upstream.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
            for key, value in self.headers.items():
                if key.lower() not in _HOP_BY_HOP:
                    upstream.putheader(key, value)  # Host included: Orthanc builds URLs from it
            if body is not None:
                upstream.putheader("Content-Length", str(len(body)))
            upstream.endheaders(body)
            resp = upstream.getresponse()
            data = resp.read()
            headers = [(k, v) for k, v in resp.getheaders() if k.lower() not in _HOP_BY_HOP]
        finally:
            upstream.close()
        if resp.status >= 400:
            self.server.errors.append(f"{self.command} {self.path} -> {resp.status}")
        self.send_response(resp.status)
        for key, value in headers:
            self.send_header(key, value)
        for key, value in _ISOLATION.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = False

    def __init__(self, dist: Path, upstream: urllib.parse.SplitResult) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.dist = dist.resolve()
        self.upstream_host = upstream.hostname or "127.0.0.1"
        self.upstream_port = upstream.port or 80
        self.errors: list[str] = []


class ViewerServer:
    """OHIF's dist at ``/`` and Orthanc's ``/dicom-web`` and ``/wado`` on one loopback origin.

    Binds a free port at ``start()`` (or on entering ``with``); ``url`` is the
    origin, e.g. ``http://127.0.0.1:41234``.
    """

    def __init__(self, dist: Path, orthanc_http_url: str) -> None:
        self.dist = Path(dist)
        self.orthanc_http_url = orthanc_http_url.rstrip("/")
        upstream = urllib.parse.urlsplit(self.orthanc_http_url)
        if upstream.scheme != "http" or upstream.path not in ("", "/"):
            raise ValueError(f"expected http://host:port for Orthanc, got {orthanc_http_url!r}")
        self._upstream = upstream
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """The viewer's origin (no trailing slash)."""
        if self._server is None:
            raise RuntimeError("ViewerServer is not started")
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    @property
    def proxy_errors(self) -> list[str]:
        """Proxied requests Orthanc answered with HTTP >= 400 (for failure messages)."""
        return list(self._server.errors) if self._server else []

    def start(self) -> ViewerServer:
        """Bind a free port on 127.0.0.1 and serve in a daemon thread."""
        if not (self.dist / "index.html").is_file():
            raise FileNotFoundError(f"no OHIF dist at {self.dist} (see ensure_ohif)")
        self._server = _Server(self.dist, self._upstream)
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="ohif-viewer-server", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket."""
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    def __enter__(self) -> ViewerServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


@pytest.fixture
def ohif_viewer(orthanc: Any) -> Iterator[ViewerServer]:
    """OHIF in front of the ``orthanc`` fixture (import both fixtures into the test module)."""
    from tests.peers import require

    require("/usr/bin/chromium", "Chromium (Debian chromium)")
    require("node", "Node.js (Debian nodejs)")
    if not (DEFAULT_CACHE / "dist" / "index.html").is_file():
        require("npm", "npm (to fetch @ohif/app once)")
    dist = ensure_ohif(DEFAULT_CACHE)
    with ViewerServer(dist, orthanc.http_url) as server:
        yield server


def main() -> int:
    """Serve OHIF in front of an Orthanc until Ctrl-C: ``python -m tests.viewer.ohif URL``."""
    import sys
    import time

    if len(sys.argv) != 2 or not sys.argv[1].startswith("http"):
        print("usage: python -m tests.viewer.ohif http://127.0.0.1:8042", file=sys.stderr)
        return 2
    with ViewerServer(ensure_ohif(DEFAULT_CACHE), sys.argv[1].rstrip("/")) as server:
        print(f"OHIF {OHIF_VERSION} at {server.url}/ (Orthanc {sys.argv[1]}); Ctrl-C stops it")
        try:
            while True:
                time.sleep(1)
        except KeyboardInterrupt:
            return 0


if __name__ == "__main__":
    raise SystemExit(main())
