"""Start-up reconciliation: every file in the instance tree is indexed, or it goes.

An instance's file is renamed into ``<root>/dicom/...`` inside the transaction
that indexes it, and the sender hears Success only after that commit. A kill
between the rename and the commit therefore leaves a complete file, holding
patient data, that the index does not know and that no sender was told was
stored. :func:`reconcile` runs before the SCP opens and walks the tree:

* a file the index knows (same path) is left alone;
* a file the index does not know, never acknowledged (no ``instance.stored``
  event for its SOP Instance UID), is removed: ``storage.orphan_removed``;
* a file whose ``instance.stored`` event exists (it was acknowledged, and its
  row was lost since, e.g. an index restored from an older backup) is read
  again with the same checks as on receipt and re-indexed: ``instance.reindexed``;
  if it cannot be (unreadable, or its UIDs now collide), it is moved to
  ``<root>/quarantine/`` for an admin: ``storage.orphan_quarantined``.

Lookups go by SOP Instance UID (indexed) in batches, so the walk costs one
directory listing per series and one query per few hundred files.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import mmap
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info
from sqlalchemy import exists, select
from sqlalchemy.orm import Session

from node.audit.trail import record
from node.db.models import AuditEvent, Instance, utcnow
from node.dicom.status import ServiceError
from node.dicom.validate import validate_uid
from node.store.index import NODE_PEER, check_series, index_instance
from node.store.ingest import Ingestor
from node.store.reader import read_dataset

log = logging.getLogger(__name__)

#: Files looked up per query.
_BATCH = 500


@dataclass
class ReconcileReport:
    """What the walk found: files seen, and the paths removed, re-indexed, quarantined."""

    files: int = 0
    removed: list[str] = field(default_factory=list)
    reindexed: list[str] = field(default_factory=list)
    quarantined: list[str] = field(default_factory=list)


class _Unindexable(Exception):
    """An acknowledged file that cannot be indexed again (the reason is audited)."""


def _tree(dicom_dir: Path) -> Iterator[Path]:
    """Every non-directory entry under ``dicom_dir`` (links are not followed)."""
    for folder, _dirs, names in os.walk(dicom_dir):
        for name in names:
            yield Path(folder) / name


def _uids(rel: Path) -> tuple[str, str, str] | None:
    """(study, series, SOP instance) UIDs of a path shaped as the layout, else None."""
    parts = rel.parts
    if len(parts) != 4 or parts[0] != "dicom" or not parts[3].endswith(".dcm"):
        return None
    study, series, sop = parts[1], parts[2], parts[3].removesuffix(".dcm")
    if not all(validate_uid(u)[0] for u in (study, series, sop)):
        return None
    return study, series, sop


def reconcile(ingestor: Ingestor) -> ReconcileReport:
    """Make the instance tree and the index agree; run before the SCP accepts anything.

    Every removal, re-index and quarantine is audited (actor ``node``).
    """
    files = ingestor.files
    report = ReconcileReport()
    pending: list[Path] = []
    for path in _tree(files.dicom_dir):
        report.files += 1
        pending.append(path.relative_to(files.root))
        if len(pending) >= _BATCH:
            _settle(ingestor, pending, report)
            pending = []
    if pending:
        _settle(ingestor, pending, report)
    _remove_empty_folders(files.dicom_dir)
    return report


def _settle(ingestor: Ingestor, batch: list[Path], report: ReconcileReport) -> None:
    """Look a batch up in the index and deal with each file it does not know."""
    stems = [p.name.removesuffix(".dcm") for p in batch]
    with ingestor.db.session() as s:
        known = set(s.scalars(select(Instance.path).where(Instance.sop_instance_uid.in_(stems))))
    for rel in batch:
        if rel.as_posix() not in known:
            _orphan(ingestor, rel, report)


def _acknowledged(s: Session, study: str, sop: str) -> bool:
    """Whether an ``instance.stored`` event names this instance (its sender heard Success)."""
    return bool(
        s.scalar(
            select(
                exists().where(
                    AuditEvent.action == "instance.stored",
                    AuditEvent.study_instance_uid == study,
                    AuditEvent.sop_instance_uid == sop,
                )
            )
        )
    )


def _orphan(ingestor: Ingestor, rel: Path, report: ReconcileReport) -> None:
    """Remove a never-acknowledged file; re-index or quarantine an acknowledged one."""
    uids = _uids(rel)
    with ingestor.db.session() as s:
        acknowledged = uids is not None and _acknowledged(s, uids[0], uids[2])
    if not acknowledged:
        size = _size(ingestor.files.root / rel)
        (ingestor.files.root / rel).unlink(missing_ok=True)
        _audit(ingestor, "storage.orphan_removed", rel, {"path": rel.as_posix(), "bytes": size})
        log.warning("removed %s: in the instance tree but never indexed", rel.as_posix())
        report.removed.append(rel.as_posix())
        return
    try:
        _reindex(ingestor, rel)
    except (
        _Unindexable,
        ServiceError,
        OSError,
        InvalidDicomError,
        ValueError,
        AttributeError,
    ) as exc:
        reason = exc.reason if isinstance(exc, ServiceError) else str(exc) or type(exc).__name__
        target = ingestor.files.root / "quarantine" / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        (ingestor.files.root / rel).replace(target)
        _audit(
            ingestor,
            "storage.orphan_quarantined",
            rel,
            {
                "path": rel.as_posix(),
                "moved_to": target.relative_to(ingestor.files.root).as_posix(),
                "reason": reason[:200],
            },
        )
        log.warning("quarantined %s: acknowledged but cannot be re-indexed", rel.as_posix())
        report.quarantined.append(rel.as_posix())
        return
    log.warning("re-indexed %s: acknowledged, its row was missing", rel.as_posix())
    report.reindexed.append(rel.as_posix())


def _reindex(ingestor: Ingestor, rel: Path) -> None:
    """Read an acknowledged file again (same checks as on receipt) and index it."""
    path = ingestor.files.root / rel
    meta = read_file_meta_info(path)
    offset = 128 + 4 + 12 + int(meta.FileMetaInformationGroupLength)
    ts_uid = str(meta.TransferSyntaxUID)
    refused: str | None = None
    with path.open("rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        try:
            parsed = read_dataset(memoryview(mm)[offset:], ts_uid, ingestor.policy.limits)
        except ServiceError as exc:  # kept as text: its traceback pins views of the map
            refused = exc.reason
        digest = hashlib.sha256(mm).hexdigest()
        size = len(mm)
    if refused is not None:
        raise _Unindexable(refused)
    header = parsed.header
    expected = ingestor.files.relative_path(
        header.study_instance_uid, header.series_instance_uid, header.sop_instance_uid
    )
    if expected != rel:
        raise _Unindexable(f"its UIDs name another path ({expected.as_posix()})")
    with ingestor.db.session() as s:
        if s.scalar(
            select(Instance.path).where(Instance.sop_instance_uid == header.sop_instance_uid)
        ):
            raise _Unindexable("its SOP Instance UID is indexed under another path")
        check_series(s, header)
        index_instance(s, header, rel, size, digest, ts_uid, NODE_PEER, utcnow())
        record(
            s,
            "instance.reindexed",
            actor="node",
            study_instance_uid=header.study_instance_uid,
            series_instance_uid=header.series_instance_uid,
            sop_instance_uid=header.sop_instance_uid,
            outcome="warning",
            detail={"path": rel.as_posix(), "bytes": size, "sha256": digest},
        )


def _audit(ingestor: Ingestor, action: str, rel: Path, detail: dict[str, object]) -> None:
    uids = _uids(rel)
    with ingestor.db.session() as s:
        record(
            s,
            action,
            actor="node",
            outcome="warning",
            study_instance_uid=uids[0] if uids else None,
            series_instance_uid=uids[1] if uids else None,
            sop_instance_uid=uids[2] if uids else None,
            detail=detail,
        )


def _size(path: Path) -> int | None:
    try:
        return path.lstat().st_size
    except OSError:
        return None


def _remove_empty_folders(dicom_dir: Path) -> None:
    """Remove series and study folders left empty (never ``dicom/`` itself)."""
    for folder, _dirs, _names in os.walk(dicom_dir, topdown=False):
        if Path(folder) != dicom_dir:
            with contextlib.suppress(OSError):  # not empty: rmdir refuses, as wanted
                Path(folder).rmdir()
