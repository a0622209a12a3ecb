"""A real Orthanc (Debian ``orthanc`` + ``orthanc-dicomweb``) as a PACS peer for tests.

Orthanc runs as a plain process on a folder of JSON config, with its storage
and index under the same folder. It has no bind-address option and listens on
all interfaces, so it gets private free ports and ``RemoteAccessAllowed:
false``. HTTP is stdlib ``urllib`` only.

Usage::

    from tests.orthanc import Orthanc, orthanc  # noqa: F401  (the fixture)

    def test_x(orthanc: Orthanc) -> None:
        orthanc.post_instance(path.read_bytes())
        assert orthanc.instance_count() == 1
"""

from __future__ import annotations

import json
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest

from tests.peers import free_port, require

ORTHANC_BIN = "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"

# DICOM JSON (PS3.18 F.2) tags the QIDO helpers read.
_MODALITY = "00080060"
_SERIES_UID = "0020000E"
_SERIES_DESCRIPTION = "0008103E"
_SERIES_NUMBER = "00200011"
_NUM_INSTANCES = "00201209"


def _dicom_json_value(item: dict[str, Any], tag: str) -> Any:
    values = item.get(tag, {}).get("Value") or [None]
    return values[0]


class Orthanc:
    """One Orthanc process on loopback with its config, storage and log in ``folder``.

    Ports are chosen once (at construction) and kept across ``stop()`` /
    ``start()``, so a restarted Orthanc is the same peer on the same storage.
    ``modalities`` maps a symbolic name to ``(aet, host, port)`` for Orthanc's
    ``DicomModalities`` (the peers it may C-STORE / C-MOVE to).
    """

    def __init__(
        self,
        folder: Path,
        *,
        aet: str = "ORTHANC",
        modalities: dict[str, tuple[str, str, int]] | None = None,
    ) -> None:
        self.folder = Path(folder)
        self._aet = aet
        self.modalities = dict(modalities or {})
        self.http_port = free_port()
        self._dicom_port = free_port()
        while self._dicom_port == self.http_port:
            self._dicom_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.folder / "orthanc.log"

    # -- lifecycle ---------------------------------------------------------------

    @property
    def http_url(self) -> str:
        """Base URL of the REST API (and of ``/dicom-web``, ``/wado``), no trailing slash."""
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicom_port(self) -> int:
        """The DICOM (DIMSE) port on 127.0.0.1."""
        return self._dicom_port

    @property
    def aet(self) -> str:
        """Orthanc's own AE title."""
        return self._aet

    def config(self) -> dict[str, Any]:
        """The configuration Orthanc is started with."""
        return {
            "Name": f"sarcnode-test-{self._aet}",
            "HttpPort": self.http_port,
            "DicomPort": self._dicom_port,
            "DicomAet": self._aet,
            "StorageDirectory": str(self.folder / "storage"),
            "IndexDirectory": str(self.folder / "index"),
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "HttpServerEnabled": True,
            "WebDavEnabled": False,  # its upload thread adds ~2 s to every stop
            "DicomServerEnabled": True,
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowFind": True,
            "DicomAlwaysAllowMove": True,
            "DicomAlwaysAllowGet": True,
            "UnknownSopClassAccepted": True,
            "StorageCommitmentReportsSize": 100,
            "DicomModalities": {
                name: [aet, host, port] for name, (aet, host, port) in self.modalities.items()
            },
            "DicomModalitiesInDatabase": False,
            "HttpThreadsCount": 8,
            "ConcurrentJobs": 1,
            "StableAge": 2,
            "SaveJobs": False,
            "Plugins": [DICOMWEB_PLUGIN],
            "DicomWeb": {
                "Enable": True,
                "Root": "/dicom-web/",
                "EnableWado": True,
                "WadoRoot": "/wado",
                "Ssl": False,
                "StudiesMetadata": "Full",
                "SeriesMetadata": "Full",
            },
        }

    def start(self, timeout: float = 20.0) -> None:
        """Write the config, start Orthanc and wait until ``GET /system`` answers."""
        if self.proc is not None and self.proc.poll() is None:
            return
        conf_dir = self.folder / "config"
        conf_dir.mkdir(parents=True, exist_ok=True)
        (conf_dir / "orthanc.json").write_text(json.dumps(self.config(), indent=2))
        log = self.log_path.open("ab")
        try:
            self.proc = subprocess.Popen(
                [ORTHANC_BIN, "--verbose", f"{conf_dir}/"],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.folder,
            )
        finally:
            log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"Orthanc exited {self.proc.returncode} while starting:\n{self.log_tail()}"
                )
            try:
                if self.get("/system").get("DicomAet") == self._aet:
                    return
            except (OSError, ValueError):
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"Orthanc did not answer GET /system in {timeout} s:\n{self.log_tail()}")

    def stop(self, timeout: float = 15.0, *, kill: bool = False) -> None:
        """SIGTERM and wait for the process to exit (SIGKILL after ``timeout``).

        Waiting matters: a new Orthanc on the same index fails with "SQLite
        database is locked" while the old one is still alive. A clean stop
        takes about 3.5 s (Orthanc's HTTP and DICOM servers wind down);
        ``kill=True`` sends SIGKILL at once, for storage about to be thrown away.
        """
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        if kill:
            proc.kill()
            proc.wait(10)
            return
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)

    def __enter__(self) -> Orthanc:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def log_tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines Orthanc logged."""
        if not self.log_path.exists():
            return "(no log)"
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    # -- HTTP --------------------------------------------------------------------

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        *,
        headers: dict[str, str] | None = None,
        timeout: float = 30.0,
    ) -> bytes:
        """One HTTP request to Orthanc; return the response body (raise on HTTP errors)."""
        req = urllib.request.Request(  # noqa: S310 (always http://127.0.0.1)
            self.http_url + path, data=body, method=method, headers=headers or {}
        )
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310
                return bytes(resp.read())
        except urllib.error.HTTPError as err:
            detail = err.read().decode(errors="replace")[:2000]
            raise RuntimeError(f"Orthanc {method} {path}: HTTP {err.code}\n{detail}") from err

    def get(self, path: str, *, accept: str = "application/json") -> Any:
        """GET ``path`` and parse its JSON (``None`` for an empty body)."""
        data = self.request("GET", path, headers={"Accept": accept})
        return json.loads(data) if data.strip() else None

    def post_instance(self, dicom: bytes) -> dict[str, Any]:
        """Store one DICOM file through REST ``POST /instances``; return Orthanc's answer."""
        answer = json.loads(
            self.request("POST", "/instances", dicom, headers={"Content-Type": "application/dicom"})
        )
        assert isinstance(answer, dict)
        return answer

    def instances(self) -> list[str]:
        """Orthanc IDs of every stored instance."""
        return list(self.get("/instances"))

    def instance_count(self) -> int:
        """How many instances are stored."""
        return int(self.get("/statistics")["CountInstances"])

    def series_of_study(self, study_uid: str) -> list[dict[str, Any]]:
        """QIDO-RS ``/dicom-web/studies/{uid}/series``: one dict per series.

        Keys: ``modality``, ``series_uid``, ``description``, ``number``,
        ``instances``. An unknown study gives ``[]``.
        """
        quoted = urllib.parse.quote(study_uid, safe="")
        found = self.get(
            f"/dicom-web/studies/{quoted}/series?includefield=00201209",
            accept="application/dicom+json",
        )
        return [
            {
                "modality": _dicom_json_value(item, _MODALITY),
                "series_uid": _dicom_json_value(item, _SERIES_UID),
                "description": _dicom_json_value(item, _SERIES_DESCRIPTION),
                "number": _dicom_json_value(item, _SERIES_NUMBER),
                "instances": _dicom_json_value(item, _NUM_INSTANCES),
            }
            for item in found or []
        ]


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[Orthanc]:
    """A started Orthanc with DICOMweb under ``tmp_path/orthanc``; killed afterwards.

    The storage is the test's own, so teardown uses SIGKILL (no 3.5 s clean stop).
    """
    require(ORTHANC_BIN, "Orthanc (Debian orthanc)")
    require(DICOMWEB_PLUGIN, "Orthanc DICOMweb plugin (Debian orthanc-dicomweb)")
    server = Orthanc(tmp_path / "orthanc")
    server.start()
    try:
        yield server
    finally:
        server.stop(kill=True)
