"""The OHIF viewer in front of a PACS: ``sarcnode viewer``.

A radiologist looks at the node's results (SEG overlay, SR, PDF) with the
source MR in OHIF. This module serves the pinned OHIF build (``@ohif/app``
:data:`OHIF_VERSION`, a prebuilt static app) and, on the same origin, a
read-only proxy to the PACS's DICOMweb:

- **Same origin**: Orthanc (and most PACS) send no CORS headers, so the
  browser must reach DICOMweb where it loaded the app. The proxy keeps the
  path (``/dicom-web/...`` locally is ``/dicom-web/...`` on the PACS) and the
  browser's ``Host`` header, so the BulkDataURIs the PACS writes into its
  metadata (built from ``Host``) point back at this server.
- **Read-only**: only GET and HEAD reach the PACS; every other method is
  answered 405 here. The browser's cookies and ``Authorization`` are not
  passed on; credentials come from the PACS URL (basic auth) and are never
  printed or logged.
- **No download at run time**: the OHIF build is fetched once by
  :func:`fetch_ohif` (``npm pack``, integrity checked against the pinned
  hash; ``make viewer`` or ``sarcnode viewer --fetch``). When it is absent,
  :func:`find_dist` raises :class:`MissingDistError` saying how to get it.
- ``app-config.js`` is generated per server (the DICOMweb root is the PACS
  URL's path) and served from memory; the fetched files are only read.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import logging
import mimetypes
import os
import shutil
import socket
import subprocess
import tarfile
import tempfile
import threading
import urllib.parse
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any

log = logging.getLogger(__name__)

OHIF_VERSION = "3.12.10"
#: ``npm view @ohif/app@3.12.10 dist.integrity``: the tarball ``npm pack`` must give.
OHIF_INTEGRITY = (
    "sha512-0kuF66Mq9c9dMD++bUsTjMrJpXJwaZhz9B4uS244DawAjSkTwIYFU"
    "93pxPuRUQixaRi7QAHlF3Fe1qudBlZrmA=="
)
#: Where the build lives unless ``--ohif`` / ``$SARCNODE_OHIF_DIR`` says otherwise.
OHIF_DIR_ENV = "SARCNODE_OHIF_DIR"
#: Orthanc's DICOMweb root, taken when the PACS URL has no path.
ORTHANC_DICOMWEB = "/dicom-web"
#: Orthanc's WADO-URI root, proxied as well for a PACS URL without a path (Orthanc).
ORTHANC_WADO_URI = "/wado"
#: What the proxy forwards; anything else gets 405.
READ_METHODS = ("GET", "HEAD")
HOW_TO_FETCH = (
    "run `make viewer` in the sarcnode checkout (or `sarcnode viewer --fetch`; "
    f"either needs npm and the network once: npm pack @ohif/app@{OHIF_VERSION})"
)


class ViewerError(Exception):
    """A problem the command reports in one line (exit 2), not a traceback."""


class MissingDistError(ViewerError):
    """The OHIF build is not where it should be."""


def _checkout_root() -> Path | None:
    root = Path(__file__).resolve().parents[1]
    return root if (root / "pyproject.toml").is_file() and (root / "node").is_dir() else None


def default_ohif_dir() -> Path:
    """Where the OHIF build is kept.

    ``$SARCNODE_OHIF_DIR``; else ``var/cache/ohif-<version>`` in a checkout;
    else the user's cache folder (``$XDG_CACHE_HOME/sarcnode/ohif-<version>``).
    """
    if os.environ.get(OHIF_DIR_ENV):
        return Path(os.environ[OHIF_DIR_ENV])
    root = _checkout_root()
    if root is not None:
        return root / "var" / "cache" / f"ohif-{OHIF_VERSION}"
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "sarcnode" / f"ohif-{OHIF_VERSION}"


def find_dist(ohif_dir: Path | None = None) -> Path:
    """The OHIF ``dist`` folder under ``ohif_dir``; :class:`MissingDistError` if absent.

    Never downloads. A folder holding another OHIF version counts as absent.
    """
    ohif_dir = Path(ohif_dir) if ohif_dir is not None else default_ohif_dir()
    dist = ohif_dir / "dist"
    version_file = ohif_dir / "VERSION"
    if not (dist / "index.html").is_file():
        raise MissingDistError(f"no OHIF {OHIF_VERSION} build in {ohif_dir}: {HOW_TO_FETCH}")
    if version_file.is_file() and version_file.read_text().strip() != OHIF_VERSION:
        found = version_file.read_text().strip()
        raise MissingDistError(
            f"{ohif_dir} holds OHIF {found}, not {OHIF_VERSION}: remove it and {HOW_TO_FETCH}"
        )
    return dist


def fetch_ohif(ohif_dir: Path | None = None, *, npm: str | None = None) -> Path:
    """Fetch ``@ohif/app`` once (``npm pack``) into ``ohif_dir``; return its ``dist``.

    An existing build is kept (no network). The tarball must match
    :data:`OHIF_INTEGRITY`; only ``package/dist`` is extracted, into a
    temporary folder renamed into place, with ``VERSION`` and a default
    ``app-config.js`` (Orthanc's ``/dicom-web`` on the page's origin).
    """
    ohif_dir = Path(ohif_dir) if ohif_dir is not None else default_ohif_dir()
    try:
        return find_dist(ohif_dir)
    except MissingDistError:
        pass
    npm = npm or shutil.which("npm")
    if npm is None:
        raise ViewerError(
            f"npm is not installed: cannot fetch @ohif/app@{OHIF_VERSION} "
            "(Debian: apt-get install npm)"
        )
    ohif_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".ohif-", dir=ohif_dir.parent) as tmp:
        work = Path(tmp)
        proc = subprocess.run(
            [npm, "pack", f"@ohif/app@{OHIF_VERSION}", "--pack-destination", str(work)],
            cwd=work,
            capture_output=True,
            text=True,
            timeout=900,
            check=False,
        )
        tarballs = list(work.glob("*.tgz"))
        if proc.returncode != 0 or len(tarballs) != 1:
            raise ViewerError(f"npm pack @ohif/app@{OHIF_VERSION} failed:\n{proc.stderr[-3000:]}")
        digest = hashlib.sha512(tarballs[0].read_bytes()).digest()
        integrity = "sha512-" + base64.b64encode(digest).decode()
        if integrity != OHIF_INTEGRITY:
            raise ViewerError(
                f"@ohif/app@{OHIF_VERSION} from npm has integrity {integrity}, "
                f"expected {OHIF_INTEGRITY}: not installed"
            )
        with tarfile.open(tarballs[0]) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith("package/dist/")]
            tar.extractall(work / "x", members=members, filter="data")
        staged = work / "staged"
        staged.mkdir()
        (work / "x" / "package" / "dist").rename(staged / "dist")
        (staged / "dist" / "app-config.js").write_text(app_config(ORTHANC_DICOMWEB))
        (staged / "VERSION").write_text(OHIF_VERSION + "\n")
        if ohif_dir.exists():
            shutil.rmtree(ohif_dir)
        staged.rename(ohif_dir)
    return find_dist(ohif_dir)


def app_config(dicomweb_root: str, wado_uri_root: str | None = None) -> str:
    """OHIF's ``app-config.js``: one DICOMweb source at ``dicomweb_root`` on the page's origin."""
    wado_uri = wado_uri_root or dicomweb_root
    return f"""\
/** sarcnode viewer: OHIF {OHIF_VERSION} over a PACS's DICOMweb on the same origin (read-only). */
window.config = {{
  routerBasename: '/',
  extensions: [],
  modes: [],
  showStudyList: true,
  maxNumberOfWebWorkers: 2,
  showWarningMessageForCrossOrigin: false,
  showCPUFallbackMessage: false,
  showLoadingIndicator: true,
  strictZSpacingForVolumeViewport: true,
  // Load SEG overlays and SRs without asking; no investigational-use dialog or tour.
  disableConfirmationPrompts: true,
  investigationalUseDialog: {{ option: 'never' }},
  customizationService: {{
    'ohif.tours': {{ $set: [] }},
  }},
  showErrorDetails: 'always',
  defaultDataSourceName: 'pacs',
  dataSources: [
    {{
      namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
      sourceName: 'pacs',
      configuration: {{
        friendlyName: 'PACS (read-only, through sarcnode viewer)',
        name: 'pacs',
        qidoRoot: '{dicomweb_root}',
        wadoRoot: '{dicomweb_root}',
        wadoUriRoot: '{wado_uri}',
        qidoSupportsIncludeField: true,
        supportsReject: false,
        supportsStow: false,
        imageRendering: 'wadors',
        thumbnailRendering: 'wadors',
        enableStudyLazyLoad: true,
        supportsFuzzyMatching: false,
        supportsWildcard: true,
        omitQuotationForMultipartRequest: true,
        bulkDataURI: {{ enabled: true }},
      }},
    }},
  ],
}};
"""


# -- the PACS -------------------------------------------------------------------


@dataclass(frozen=True)
class Pacs:
    """A PACS's DICOMweb as the proxy reaches it; credentials kept out of ``str()``."""

    scheme: str
    host: str
    port: int
    #: The DICOMweb root path (``/dicom-web`` for Orthanc); also the local path.
    root: str
    #: Extra path prefixes proxied as they are (Orthanc's ``/wado``).
    extra: tuple[str, ...]
    authorization: str | None

    @classmethod
    def parse(cls, url: str) -> Pacs:
        """``http[s]://[user:password@]host[:port][/dicomweb-root]``.

        Without a path the PACS is taken for Orthanc: DICOMweb at ``/dicom-web``
        and WADO-URI at ``/wado``. Raises :class:`ViewerError` (without the
        credentials) for anything else.
        """
        parts = urllib.parse.urlsplit(url.strip())
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ViewerError(
                f"--pacs must be http(s)://host[:port][/dicomweb-root], got {_redact(url)!r}"
            )
        if parts.query or parts.fragment:
            raise ViewerError(f"--pacs takes no query or fragment: {_redact(url)!r}")
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError as exc:
            raise ViewerError(f"--pacs has a bad port: {_redact(url)!r}") from exc
        root = "/" + parts.path.strip("/") if parts.path.strip("/") else ""
        extra: tuple[str, ...] = ()
        if not root:
            root, extra = ORTHANC_DICOMWEB, (ORTHANC_WADO_URI,)
        auth = None
        if parts.username is not None:
            user = urllib.parse.unquote(parts.username)
            password = urllib.parse.unquote(parts.password or "")
            auth = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        return cls(parts.scheme, parts.hostname, port, root, extra, auth)

    def __str__(self) -> str:
        netloc = f"[{self.host}]" if ":" in self.host else self.host
        user = "***@" if self.authorization else ""
        return f"{self.scheme}://{user}{netloc}:{self.port}{self.root}"

    def proxies(self, path: str) -> bool:
        """Whether a request path goes to the PACS (else it is the OHIF app)."""
        return any(path == p or path.startswith(p + "/") for p in (self.root, *self.extra))

    def connect(self, timeout: float) -> http.client.HTTPConnection:
        """A new connection to the PACS."""
        if self.scheme == "https":
            return http.client.HTTPSConnection(self.host, self.port, timeout=timeout)
        return http.client.HTTPConnection(self.host, self.port, timeout=timeout)


def _redact(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urllib.parse.urlunsplit(parts._replace(netloc="***@" + parts.netloc.rsplit("@", 1)[1]))


# -- the server -------------------------------------------------------------------

_HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "trailers",
    "transfer-encoding",
    "upgrade",
    "content-length",
}
#: Browser headers the PACS never sees (its credentials come from the PACS URL).
_NOT_FORWARDED = _HOP_BY_HOP | {"authorization", "cookie"}
#: PACS headers the browser never sees: a 401's challenge would make it prompt
#: for the PACS's password on this origin; cookies would be set on this origin.
_NOT_RETURNED = _HOP_BY_HOP | {"www-authenticate", "set-cookie"}
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
_CHUNK = 1 << 16


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        return

    def do_GET(self) -> None:
        self._dispatch()

    def do_HEAD(self) -> None:
        self._dispatch()

    def _refuse(self) -> None:
        self.close_connection = True  # any request body is left unread
        self._send(
            405, b"read-only viewer: GET and HEAD only\n", "text/plain", {"Allow": "GET, HEAD"}
        )

    def do_POST(self) -> None:
        self._refuse()

    def do_PUT(self) -> None:
        self._refuse()

    def do_DELETE(self) -> None:
        self._refuse()

    def do_PATCH(self) -> None:
        self._refuse()

    def do_OPTIONS(self) -> None:
        self._refuse()

    def _dispatch(self) -> None:
        path = urllib.parse.urlsplit(self.path).path
        try:
            if self.server.pacs.proxies(path):
                self._proxy()
            elif path == "/app-config.js":
                self._send(
                    200, self.server.config_js, "text/javascript", {"Cache-Control": "no-cache"}
                )
            else:
                self._static(path)
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
        cache = "no-cache" if target.name == "index.html" else "max-age=3600"
        self._send(200, target.read_bytes(), ctype, {"Cache-Control": cache})

    def _proxy(self) -> None:
        pacs = self.server.pacs
        upstream = pacs.connect(self.server.timeout_s)
        try:
            try:
                upstream.putrequest(
                    self.command, self.path, skip_host=True, skip_accept_encoding=True
                )
                for key, value in self.headers.items():
                    if key.lower() not in _NOT_FORWARDED:
                        # Host included: the PACS builds its BulkDataURIs from it.
                        upstream.putheader(key, value)
                if pacs.authorization:
                    upstream.putheader("Authorization", pacs.authorization)
                upstream.endheaders()
                resp = upstream.getresponse()
            except (OSError, http.client.HTTPException) as exc:
                self.server.note(f"{self.command} {self.path} -> PACS unreachable ({exc})")
                self._send(502, f"PACS {pacs} unreachable\n".encode(), "text/plain")
                return
            if resp.status >= 400:
                hint = (
                    " (check the credentials in the PACS URL)" if resp.status in (401, 403) else ""
                )
                self.server.note(f"{self.command} {self.path} -> HTTP {resp.status}{hint}")
            headers = [(k, v) for k, v in resp.getheaders() if k.lower() not in _NOT_RETURNED]
            # Streamed when the PACS says how long; else (chunked) read whole to say it.
            length = resp.getheader("Content-Length")
            body = b"" if length is not None else resp.read()
            self.send_response(resp.status)
            for key, value in [*headers, *_ISOLATION.items()]:
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)) if length is None else length)
            self.end_headers()
            if self.command == "HEAD":
                return
            self.wfile.write(body)
            while length is not None and (chunk := resp.read(_CHUNK)):
                self.wfile.write(chunk)
        finally:
            upstream.close()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], dist: Path, pacs: Pacs, timeout_s: float) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        super().__init__(address, _Handler)
        self.dist = dist.resolve()
        self.pacs = pacs
        self.timeout_s = timeout_s
        wado = pacs.extra[0] if pacs.extra else None
        self.config_js = app_config(pacs.root, wado).encode()
        self.errors: list[str] = []
        self._lock = threading.Lock()

    def note(self, line: str) -> None:
        """A proxied request that failed: kept (for tests) and logged (no credentials)."""
        with self._lock:
            if len(self.errors) < 1000:
                self.errors.append(line)
        log.warning("viewer proxy: %s", line)


class ViewerServer:
    """OHIF's build at ``/`` and the PACS's DICOMweb (GET/HEAD only) on one origin.

    ``port=0`` binds a free port; :attr:`url` is the origin, e.g.
    ``http://127.0.0.1:3000``. Serves in a daemon thread between
    :meth:`start` and :meth:`stop` (or inside ``with``).
    """

    def __init__(
        self,
        dist: Path,
        pacs: Pacs | str,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        timeout_s: float = 120.0,
    ) -> None:
        self.dist = Path(dist)
        self.pacs = pacs if isinstance(pacs, Pacs) else Pacs.parse(pacs)
        self.host = host
        self.port = port
        self.timeout_s = timeout_s
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """The viewer's origin (no trailing slash); a wildcard bind is shown as loopback."""
        if self._server is None:
            raise RuntimeError("ViewerServer is not started")
        port = self._server.server_address[1]
        wildcard = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}  # noqa: S104
        host = wildcard.get(self.host, self.host)
        return f"http://{f'[{host}]' if ':' in host else host}:{port}"

    def study_url(self, study_uid: str) -> str:
        """The address that opens ``study_uid`` in the viewer."""
        return f"{self.url}/viewer?StudyInstanceUIDs={urllib.parse.quote(study_uid, safe='')}"

    @property
    def proxy_errors(self) -> list[str]:
        """Proxied requests the PACS refused or did not answer (for failure messages)."""
        return list(self._server.errors) if self._server else []

    def start(self) -> ViewerServer:
        """Bind and serve in a daemon thread; :class:`ViewerError` if the port is taken."""
        if not (self.dist / "index.html").is_file():
            raise MissingDistError(f"no OHIF build at {self.dist}: {HOW_TO_FETCH}")
        try:
            self._server = _Server((self.host, self.port), self.dist, self.pacs, self.timeout_s)
        except OSError as exc:
            raise ViewerError(
                f"cannot listen on {self.host}:{self.port} ({exc.strerror}): try another --port"
            ) from exc
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.1,), name="sarcnode-viewer", daemon=True
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


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a bind address) is reachable from this machine only."""
    return host in ("localhost", "::1") or host.startswith("127.")
