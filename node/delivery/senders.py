"""How one file reaches one destination: C-STORE, STOW-RS or a folder.

Each sender returns only when the destination has accepted the object and
raises :class:`DeliveryError` with a message an admin can act on otherwise
(refused association, failure status, HTTP error, unreachable host).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import ssl
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pydicom
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from node.config import DestinationSettings


class DeliveryError(RuntimeError):
    """A destination did not accept an object; the message says what happened."""


def send(path: Path, destination: DestinationSettings, *, calling_ae: str = "SARCNODE") -> None:
    """Deliver the DICOM file at ``path`` to ``destination`` (raises DeliveryError)."""
    if not path.is_file():
        raise DeliveryError(f"result file {path} is missing")
    if destination.kind == "dicom":
        c_store(path, destination, calling_ae)
    elif destination.kind == "stow":
        stow(path, destination)
    else:
        to_folder(path, destination)


def c_store(path: Path, destination: DestinationSettings, calling_ae: str) -> None:
    """One association, one C-STORE; success or warning statuses count as stored."""
    from pynetdicom import AE

    from node.dicom.tls import client_tls

    ds = pydicom.dcmread(path)
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = destination.timeout_s
    syntax = ds.file_meta.TransferSyntaxUID
    ae.add_requested_context(
        ds.SOPClassUID,
        list(dict.fromkeys([syntax, ExplicitVRLittleEndian, ImplicitVRLittleEndian])),
    )
    tls_args = client_tls(destination.tls, str(destination.host))
    where = f"{destination.ae_title}@{destination.host}:{destination.port}"
    try:
        assoc = ae.associate(
            str(destination.host),
            int(destination.port or 0),
            ae_title=str(destination.ae_title),
            tls_args=tls_args,
        )
    except OSError as exc:
        raise DeliveryError(f"{where}: {exc}") from exc
    if not assoc.is_established:
        why = "rejected" if assoc.is_rejected else "aborted" if assoc.is_aborted else "no answer"
        raise DeliveryError(f"{where}: association {why}")
    try:
        status = assoc.send_c_store(ds)
    finally:
        if assoc.is_established:
            assoc.release()
    if not status or "Status" not in status:
        raise DeliveryError(f"{where}: no C-STORE response (connection lost or timed out)")
    code = int(status.Status)
    if code != 0x0000 and not 0xB000 <= code <= 0xBFFF:
        raise DeliveryError(f"{where}: C-STORE failed with status 0x{code:04X}")


def request_commitment(
    path: Path, destination: DestinationSettings, calling_ae: str, transaction_uid: str
) -> None:
    """Storage Commitment Push Model N-ACTION for the object at ``path`` (PS3.4 J.3).

    The destination answers later, with an N-EVENT-REPORT to this node's
    SCP (``serve`` must be running and known to the destination as
    ``calling_ae``); :func:`node.delivery.commitment_report` records it.
    """
    from pydicom.dataset import Dataset
    from pynetdicom import AE
    from pynetdicom.sop_class import StorageCommitmentPushModel  # type: ignore[attr-defined]

    ds = pydicom.dcmread(path, stop_before_pixels=True)
    request = Dataset()
    request.TransactionUID = transaction_uid
    item = Dataset()
    item.ReferencedSOPClassUID = ds.SOPClassUID
    item.ReferencedSOPInstanceUID = ds.SOPInstanceUID
    request.ReferencedSOPSequence = [item]
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = destination.timeout_s
    ae.add_requested_context(StorageCommitmentPushModel)
    where = f"{destination.ae_title}@{destination.host}:{destination.port}"
    try:
        assoc = ae.associate(
            str(destination.host), int(destination.port or 0), ae_title=str(destination.ae_title)
        )
    except OSError as exc:
        raise DeliveryError(f"{where}: storage commitment: {exc}") from exc
    if not assoc.is_established:
        raise DeliveryError(f"{where}: storage commitment: association not accepted")
    try:
        status, _ = assoc.send_n_action(
            request, 1, StorageCommitmentPushModel, "1.2.840.10008.1.20.1.1"
        )
    finally:
        if assoc.is_established:
            assoc.release()
    if not status or int(status.get("Status", 0xFFFF)) != 0:
        code = int(status.get("Status", 0xFFFF)) if status else None
        if code is None:
            raise DeliveryError(
                f"{where}: storage commitment got no answer (does the destination know "
                f"{calling_ae} as a modality, with this node's host and port?)"
            )
        raise DeliveryError(f"{where}: storage commitment refused (status 0x{code:04X})")


def stow(path: Path, destination: DestinationSettings) -> None:
    """STOW-RS: POST the file as multipart/related to ``<url>/studies``."""
    boundary = uuid.uuid4().hex
    body = (
        f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        + path.read_bytes()
        + f"\r\n--{boundary}--\r\n".encode()
    )
    url = str(destination.url).rstrip("/")
    if not url.endswith("/studies"):
        url += "/studies"
    request = urllib.request.Request(url, data=body, method="POST")  # noqa: S310 (http(s) only)
    request.add_header(
        "Content-Type", f'multipart/related; type="application/dicom"; boundary={boundary}'
    )
    request.add_header("Accept", "application/dicom+json")
    auth = destination.auth
    if auth.kind == "basic":
        password = os.environ.get(str(auth.password_env), "")
        token = base64.b64encode(f"{auth.username}:{password}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    elif auth.kind == "bearer":
        request.add_header("Authorization", f"Bearer {os.environ.get(str(auth.token_env), '')}")
    context = ssl.create_default_context(cafile=str(destination.ca)) if destination.ca else None
    try:
        with urllib.request.urlopen(  # noqa: S310 (the config admits http(s) URLs only)
            request, timeout=destination.timeout_s, context=context
        ) as r:
            answer = r.read()
            code = r.status
    except urllib.error.HTTPError as exc:
        raise DeliveryError(f"STOW-RS {url}: HTTP {exc.code} {exc.reason}") from exc
    except (urllib.error.URLError, OSError) as exc:
        raise DeliveryError(f"STOW-RS {url}: {getattr(exc, 'reason', exc)}") from exc
    if code not in (200, 202):
        raise DeliveryError(f"STOW-RS {url}: HTTP {code}")
    _check_stow_answer(
        url, answer, str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
    )


def _check_stow_answer(url: str, answer: bytes, sop_uid: str) -> None:
    """The Store Instances Response must list the instance as stored, not as failed.

    PS3.18 10.5.3: FailedSOPSequence (0008,1198) items name refused
    instances with a FailureReason (0008,1197); ReferencedSOPSequence
    (0008,1199) the stored ones.
    """
    try:
        response = json.loads(answer or b"{}")
    except ValueError as exc:
        raise DeliveryError(f"STOW-RS {url}: unreadable response ({exc})") from exc
    if isinstance(response, list):
        response = response[0] if response else {}
    for item in (response.get("00081198") or {}).get("Value") or []:
        if (item.get("00081155") or {}).get("Value", [None])[0] == sop_uid:
            reason = (item.get("00081197") or {}).get("Value", ["?"])[0]
            raise DeliveryError(f"STOW-RS {url}: refused, failure reason {reason}")
    stored = [
        (item.get("00081155") or {}).get("Value", [None])[0]
        for item in (response.get("00081199") or {}).get("Value") or []
    ]
    if response and sop_uid not in stored:
        raise DeliveryError(f"STOW-RS {url}: the response does not list the instance as stored")


def to_folder(path: Path, destination: DestinationSettings) -> None:
    """Copy into ``<path>/<study>/<series>/<sop>.dcm`` atomically (temp file, fsync, rename)."""
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    target = Path(str(destination.path)) / ds.StudyInstanceUID / ds.SeriesInstanceUID
    try:
        target.mkdir(parents=True, exist_ok=True)
        final = target / f"{ds.SOPInstanceUID}.dcm"
        temp = target / f".{ds.SOPInstanceUID}.part"
        with path.open("rb") as src, temp.open("wb") as out:
            shutil.copyfileobj(src, out)
            out.flush()
            os.fsync(out.fileno())
        temp.replace(final)
    except OSError as exc:
        raise DeliveryError(f"folder {destination.path}: {exc}") from exc
