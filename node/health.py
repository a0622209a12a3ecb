"""The node's HTTP monitoring endpoint: ``/health`` and ``/metrics``.

``GET /health`` answers 200 with ``{"status": "ok", "checks": {...}}`` when
every check passes, else 503 with ``"status": "unhealthy"`` and the failing
check's detail; ``GET /metrics`` is the Prometheus text format of
:class:`node.metrics.NodeMetrics`. The checks:

``scp``
    the Storage SCP answers a C-ECHO on its own address (calling AE
    ``SARCNODE-CLI``; an A-ASSOCIATE-RJ still proves it answers). With DICOM
    TLS a TCP connect stands in for it (the node holds no client certificate).
    Cached for ``monitoring.echo_interval_s`` so that scrapes do not flood
    the audit trail with associations.
``database``
    a ``SELECT 1`` on the node's database.
``disk``
    free space under ``storage.root`` is above ``storage.min_free_mb`` (below
    it the SCP refuses instances with 0xA700).
``scheduler``
    the tick ran within ``monitoring.tick_stale_s``.
``outbox``
    no pending delivery has been overdue for more than ``monitoring.outbox_stuck_s``.

The server listens on ``monitoring.bind:monitoring.port`` (127.0.0.1:9180 by
default: loopback, as it has no authentication), in a daemon thread.
"""

from __future__ import annotations

import json
import logging
import shutil
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from sqlalchemy import func, select, text

from node.config import Settings
from node.db.models import Delivery, utcnow
from node.db.session import Database
from node.metrics import NodeMetrics

log = logging.getLogger(__name__)

HEALTH_CALLING_AE = "SARCNODE-CLI"


@dataclass(frozen=True)
class Check:
    """One check's verdict and a short reason (no PHI)."""

    ok: bool
    detail: str


class Health:
    """The checks behind ``/health``; each is a method, all run by :meth:`report`."""

    def __init__(
        self,
        settings: Settings,
        db: Database,
        *,
        last_tick: Callable[[], float | None],
    ) -> None:
        """``last_tick`` returns the ``time.monotonic()`` of the scheduler's last tick."""
        self.settings = settings
        self.db = db
        self.last_tick = last_tick
        self.started = time.monotonic()
        self._echo: tuple[float, Check] | None = None
        self._echo_lock = threading.Lock()
        #: (alive, configured) receiver processes, when the SCP runs in several.
        self.receivers: Callable[[], tuple[int, int]] | None = None

    def report(self) -> tuple[bool, dict[str, Any]]:
        """(healthy, body) with every check's verdict."""
        checks = {
            "scp": self.scp(),
            "database": self.database(),
            "disk": self.disk(),
            "scheduler": self.scheduler(),
            "outbox": self.outbox(),
        }
        if self.receivers is not None:
            alive, configured = self.receivers()
            checks["receivers"] = Check(
                alive == configured, f"{alive} of {configured} receiver processes alive"
            )
        healthy = all(c.ok for c in checks.values())
        body = {
            "status": "ok" if healthy else "unhealthy",
            "checks": {k: {"ok": c.ok, "detail": c.detail} for k, c in checks.items()},
        }
        return healthy, body

    def scp(self) -> Check:
        """The SCP answers on its own address (cached ``echo_interval_s``)."""
        with self._echo_lock:
            now = time.monotonic()
            interval = self.settings.monitoring.echo_interval_s
            if self._echo is not None and now - self._echo[0] < interval:
                return self._echo[1]
            check = self._probe_scp()
            self._echo = (now, check)
            return check

    def _probe_scp(self) -> Check:
        d = self.settings.dicom
        host = "127.0.0.1" if d.bind in ("0.0.0.0", "::") else d.bind  # noqa: S104
        if d.tls.enabled:
            try:
                socket.create_connection((host, d.port), timeout=3).close()
            except OSError as exc:
                return Check(False, f"TLS port {d.port} not accepting: {exc.strerror or exc}")
            return Check(True, f"TLS port {d.port} accepting (C-ECHO needs a client certificate)")
        from node.dicom.echo import echo

        res = echo(host, d.port, d.ae_title, calling_ae=HEALTH_CALLING_AE, timeout_s=3)
        if res.ok:
            return Check(True, "C-ECHO success")
        if res.rejected:
            return Check(True, f"answered (A-ASSOCIATE-RJ to {HEALTH_CALLING_AE})")
        return Check(False, f"no C-ECHO answer on port {d.port}: {res.detail}")

    def database(self) -> Check:
        """A ``SELECT 1`` on the node's database."""
        try:
            with self.db.session() as s:
                s.execute(text("SELECT 1"))
        except Exception as exc:
            return Check(False, f"unreachable: {type(exc).__name__}")
        return Check(True, "reachable")

    def disk(self) -> Check:
        """Free space under the storage root above ``storage.min_free_mb``."""
        root = self.settings.storage.root
        try:
            free_mb = shutil.disk_usage(root).free // 2**20
        except OSError as exc:
            return Check(False, f"storage root unreadable: {exc.strerror or exc}")
        floor = self.settings.storage.min_free_mb
        return Check(free_mb >= floor, f"{free_mb} MB free (floor {floor} MB)")

    def scheduler(self) -> Check:
        """The tick ran recently (``monitoring.tick_stale_s``)."""
        stale = self.settings.monitoring.tick_stale_s
        tick = self.last_tick()
        if tick is None:
            age = time.monotonic() - self.started
            return Check(age < stale, f"no tick yet ({age:.0f} s since start)")
        age = time.monotonic() - tick
        return Check(age < stale, f"last tick {age:.1f} s ago (stale after {stale:g} s)")

    def outbox(self) -> Check:
        """No pending delivery overdue longer than ``monitoring.outbox_stuck_s``."""
        try:
            with self.db.session() as s:
                oldest = s.scalar(
                    select(func.min(Delivery.next_attempt_at)).where(Delivery.state == "pending")
                )
        except Exception as exc:
            return Check(False, f"cannot read the outbox: {type(exc).__name__}")
        if oldest is None:
            return Check(True, "nothing overdue")
        overdue = (utcnow() - oldest).total_seconds()
        limit = self.settings.monitoring.outbox_stuck_s
        if overdue > limit:
            return Check(False, f"a delivery has been due for {overdue:.0f} s (limit {limit:g} s)")
        return Check(True, f"oldest due {max(0.0, overdue):.0f} s ago")


class MonitoringServer:
    """``/health`` and ``/metrics`` over HTTP, in a daemon thread."""

    def __init__(self, bind: str, port: int, health: Health, metrics: NodeMetrics) -> None:
        """Bind now (so a taken port fails ``serve`` at start); serve after :meth:`start`."""
        handler = _handler(health, metrics)
        self.httpd = ThreadingHTTPServer((bind, port), handler)
        self.httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The bound port (useful with port 0)."""
        return int(self.httpd.server_address[1])

    def start(self) -> None:
        """Serve in a daemon thread."""
        self._thread = threading.Thread(
            target=self.httpd.serve_forever, name="sarcnode-monitoring", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop serving and close the socket."""
        if self._thread is not None:
            self.httpd.shutdown()
            self._thread = None
        self.httpd.server_close()


def _handler(health: Health, metrics: NodeMetrics) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "sarcnode"

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            try:
                if path == "/health":
                    healthy, body = health.report()
                    self._send(200 if healthy else 503, "application/json", json.dumps(body))
                elif path == "/metrics":
                    from prometheus_client import CONTENT_TYPE_LATEST

                    self._send(200, CONTENT_TYPE_LATEST, metrics.exposition())
                else:
                    self._send(404, "text/plain", "try /health or /metrics\n")
            except Exception:
                log.exception("monitoring endpoint %s failed", path)
                self._send(500, "text/plain", "internal error\n")

        def _send(self, code: int, ctype: str, body: str | bytes) -> None:
            data = body.encode() if isinstance(body, str) else body
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            """Scrapes are not logged (one line per scrape would drown the log)."""

    return Handler
