"""DICOM query/retrieve against a prior source: C-FIND (study, series) and C-MOVE.

Every failure (no association, no answer, a failure status) is a
:class:`SourceDown` with a message an admin can act on.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any

from pydicom.dataset import Dataset

from node.config.priors import PriorSource


class SourceDown(RuntimeError):
    """A query/retrieve source refused, did not answer, or answered with a failure."""

    source = ""  # the source's name, set by :func:`node.priors.search`


@dataclass(frozen=True)
class StudyHit:
    """One study a source's C-FIND returned."""

    source: str
    study_instance_uid: str
    study_date: date


def _date(value: Any) -> date | None:
    try:
        return datetime.strptime(str(value or "")[:8], "%Y%m%d").date()
    except ValueError:
        return None


@contextmanager
def _association(
    source: PriorSource, calling_ae: str, context: str, dimse_timeout: float | None = None
) -> Iterator[Any]:
    """An association with ``source`` for one SOP class, released at the end.

    Raises
    ------
    SourceDown
        The source is unreachable, rejects or aborts the association.
    """
    from pynetdicom import AE

    from node.dicom.tls import client_tls

    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = source.timeout_s
    if dimse_timeout is not None:  # a move answers when its sub-operations are done
        ae.dimse_timeout = ae.network_timeout = dimse_timeout
    ae.add_requested_context(context)
    tls_args = client_tls(source.tls, source.host)
    where = f"{source.name} ({source.ae_title}@{source.host}:{source.port})"
    try:
        assoc = ae.associate(source.host, source.port, ae_title=source.ae_title, tls_args=tls_args)
    except OSError as exc:
        raise SourceDown(f"{where}: {exc}") from exc
    if not assoc.is_established:
        why = "rejected" if assoc.is_rejected else "aborted" if assoc.is_aborted else "no answer"
        raise SourceDown(f"{where}: association {why}")
    try:
        yield assoc
    finally:
        if assoc.is_established:
            assoc.release()


def _find(source: PriorSource, calling_ae: str, query: Dataset) -> list[Dataset]:
    """The C-FIND matches of ``query`` (Study Root), or SourceDown on a failure status."""
    from pynetdicom.sop_class import (  # type: ignore[attr-defined]
        StudyRootQueryRetrieveInformationModelFind as Find,
    )

    matches = []
    with _association(source, calling_ae, Find) as assoc:
        for status, identifier in assoc.send_c_find(query, Find):
            if not status or "Status" not in status:
                raise SourceDown(f"{source.name}: no C-FIND response (timed out)")
            code = int(status.Status)
            if code in (0xFF00, 0xFF01) and identifier is not None:
                matches.append(identifier)
            elif code != 0x0000:
                raise SourceDown(f"{source.name}: C-FIND failed with status 0x{code:04X}")
    return matches


def find_studies(
    source: PriorSource, calling_ae: str, patient_id: str, before: date, max_age_days: int
) -> list[StudyHit]:
    """The patient's studies dated in [before - max_age_days, before), newest first."""
    earliest = before - timedelta(days=max_age_days)
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.PatientID = patient_id
    query.StudyInstanceUID = ""
    query.StudyDate = f"{earliest:%Y%m%d}-{before - timedelta(days=1):%Y%m%d}"
    query.ModalitiesInStudy = ""
    hits = []
    for ds in _find(source, calling_ae, query):
        when = _date(ds.get("StudyDate"))
        uid = str(ds.get("StudyInstanceUID") or "")
        if uid and when is not None and earliest <= when < before:  # the PACS is not trusted
            hits.append(StudyHit(source.name, uid, when))
    return sorted(hits, key=lambda h: (h.study_date, h.study_instance_uid), reverse=True)


#: Series-level return keys: what the role rules read, as far as a PACS returns them.
SERIES_KEYS = (
    "Modality",
    "SeriesDescription",
    "SeriesNumber",
    "NumberOfSeriesRelatedInstances",
    "ScanOptions",
    "ScanningSequence",
    "EchoTime",
    "RepetitionTime",
    "InversionTime",
)


def find_series(source: PriorSource, calling_ae: str, study_uid: str) -> list[dict[str, Any]]:
    """The study's series as attribute dicts (``SeriesInstanceUID`` and :data:`SERIES_KEYS`)."""
    from pipelines.io.dicom import _value

    query = Dataset()
    query.QueryRetrieveLevel = "SERIES"
    query.StudyInstanceUID = study_uid
    query.SeriesInstanceUID = ""
    for key in SERIES_KEYS:
        setattr(query, key, "")
    out = []
    for ds in _find(source, calling_ae, query):
        attrs = {k: _value(ds, k) for k in ("SeriesInstanceUID", *SERIES_KEYS)}
        if attrs["SeriesInstanceUID"]:
            out.append(attrs)
    return out


def move_series(
    source: PriorSource,
    calling_ae: str,
    destination: str,
    study_uid: str,
    series_uids: Sequence[str],
    timeout_s: float = 900,
) -> int:
    """C-MOVE each series (series level) to ``destination``; the number of instances moved.

    Only the series the comparison needs: a prior study in the PACS also
    holds objects the node's SCP refuses (its own SEG, SR and PDF of that
    study), and a study-level move would end in failed sub-operations.

    Raises
    ------
    SourceDown
        No association, no answer, or a final status other than success.
    """
    from pynetdicom.sop_class import (  # type: ignore[attr-defined]
        StudyRootQueryRetrieveInformationModelMove as Move,
    )

    completed = 0
    with _association(source, calling_ae, Move, timeout_s) as assoc:
        for series_uid in series_uids:
            query = Dataset()
            query.QueryRetrieveLevel = "SERIES"
            query.StudyInstanceUID = study_uid
            query.SeriesInstanceUID = series_uid
            code, done = None, 0
            for status, _ in assoc.send_c_move(query, destination, Move):
                if not status or "Status" not in status:
                    raise SourceDown(f"{source.name}: no C-MOVE response (timed out)")
                code = int(status.Status)
                done = int(status.get("NumberOfCompletedSuboperations", done) or done)
            if code != 0x0000:
                shown = "none" if code is None else f"0x{code:04X}"
                raise SourceDown(
                    f"{source.name}: C-MOVE of series {series_uid} to {destination} ended with "
                    f"status {shown} (does the PACS know {destination} as a modality, and does "
                    f"the node accept the PACS as a sender?)"
                )
            completed += done
    return completed
