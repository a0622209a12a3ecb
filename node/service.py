"""``sarcnode serve``: the long-running node, wired in one place.

Start-up order: database (migrated), storage root (partial files from a crash
removed, and the instance tree reconciled with the index: a file a crash left
unindexed is removed, or re-indexed if it was acknowledged), pipelines
(``jobs.pipelines_dir``), jobs interrupted by a crash re-queued, Storage SCP,
then the tick that marks quiet series stable, turns stable studies into jobs
and hands queued jobs to the local executor, and refreshes the heartbeat file
the CLI's ``status`` reads; the delivery outbox runs on its own tick. The
monitoring endpoint (``/health``, ``/metrics``: :mod:`node.health`) starts last.

SIGTERM and SIGINT stop it within ``dicom.shutdown_grace_s`` (plus a second
or two): the listener closes, every C-STORE from then on is refused with
0xA700 (the sender retries later), open associations get the grace period to
release and are then aborted, running job stages get the same period and are
then ended and re-queued (they resume at their last checkpoint on the next
start), and the stop is audited with those counts. ``kill -9`` loses nothing
that was answered Success either, because the SCP answers only after the
file and its row are committed.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType

from apscheduler.schedulers.background import BackgroundScheduler

from node.audit.context import AuditContext
from node.audit.trail import AuditBreakError, check_head, head_line, record
from node.config import Settings
from node.db.session import Database
from node.dicom.receivers import ReceiverPool, receiver_count
from node.dicom.scp import StorageSCP
from node.health import Health, MonitoringServer
from node.jobs import Runner, make_runner, recover
from node.jobs import Scheduler as JobScheduler
from node.jobs.wake import Wake
from node.metrics import JobEnd, NodeMetrics
from node.pipelines import load_pipelines
from node.store.files import InstanceFiles
from node.store.ingest import Ingestor, IngestPolicy, mark_stable_series
from node.store.reconcile import reconcile

log = logging.getLogger(__name__)

HEARTBEAT = "run/serve.json"


def heartbeat_path(settings: Settings) -> Path:
    """Where ``serve`` writes its heartbeat (pid, ports, last tick)."""
    return settings.storage.root / HEARTBEAT


class Node:
    """The running service: SCP, storage, database and the tick."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.db = Database(
            settings.database_url,
            echo=settings.database.echo,
            audit=AuditContext.from_settings(settings),
        )
        self._check_audit()
        self.files = InstanceFiles(settings.storage.root, fsync=settings.storage.fsync)
        self.ingestor = Ingestor(
            self.db,
            self.files,
            min_free_mb=settings.storage.min_free_mb,
            policy=IngestPolicy.from_settings(settings),
        )
        self.scp = StorageSCP(
            settings.dicom, self.db, self.ingestor, on_commitment=self._commitment_report
        )
        count = receiver_count(settings.dicom.receivers)
        #: Receiver processes behind the port (dicom.receivers > 1); else self.scp receives.
        self.receivers = ReceiverPool(settings, count, self._audit) if count > 1 else None
        self.scheduler = BackgroundScheduler(timezone="UTC")
        self.wake = Wake(self.db, self.scheduler, settings.scheduler.series_stable_seconds)
        self.started_at = datetime.now(UTC)
        self._stop = threading.Event()
        folder = settings.jobs.pipelines_dir
        self.pipelines = load_pipelines(folder) if folder.is_dir() else []
        if not self.pipelines:
            log.warning("no pipeline files in %s: studies are stored but start no job", folder)
        self.job_scheduler = JobScheduler(self.db, settings, self.pipelines)
        self.runner: Runner | None = None
        self.last_tick: float | None = None  # time.monotonic() at the end of the last tick
        self.metrics = NodeMetrics(self.db, settings.storage.root, last_tick=lambda: self.last_tick)
        self.health = Health(settings, self.db, last_tick=lambda: self.last_tick)
        if self.receivers is not None:
            self.health.receivers = self.receivers.alive
        self.monitoring: MonitoringServer | None = None

    def _check_audit(self) -> None:
        """Load the audit key (creating it on first start) and refuse a broken chain head.

        Raises
        ------
        AuditBreakError
            The database's chain is shorter than its anchor (truncated, wiped),
            rewritten at the anchored event, or the anchor is missing: appending
            to it would hide that, so the node does not start until an admin
            runs ``sarcnode audit acknowledge-break``.
        node.audit.keys.AuditKeyError
            No usable key (unreadable, malformed, readable by others).
        """
        audit = self.db.audit
        assert audit is not None and audit.anchor is not None
        with self.db.session() as s:
            findings = check_head(s)
            line = head_line(s)
        if findings:
            self.db.dispose()
            raise AuditBreakError(findings)
        key = audit.keyring
        log.info(
            "%s; new events signed with key %s (%s); anchor %s",
            line,
            key.current.key_id,
            key.source,
            audit.anchor.path,
        )

    def log_audit_head(self) -> None:
        """Log the chain head (seq and hash): an anchor outside the database and this host."""
        try:
            with self.db.session() as s:
                log.info("%s", head_line(s))
        except Exception:
            log.exception("audit head not logged")

    def start(self) -> None:
        """Recover, open the SCP, start the tick, and audit the start."""
        removed = self.files.clean_tmp()
        reconciled = reconcile(self.ingestor)
        if reconciled.removed or reconciled.reindexed or reconciled.quarantined:
            log.warning(
                "instance tree reconciled: %d file(s), %d orphan(s) removed, %d re-indexed, "
                "%d quarantined",
                reconciled.files,
                len(reconciled.removed),
                len(reconciled.reindexed),
                len(reconciled.quarantined),
            )
        with self.db.session() as s:
            record(
                s,
                "node.started",
                actor="node",
                detail={
                    "pid": os.getpid(),
                    "ae_title": self.settings.dicom.ae_title,
                    "port": self.settings.dicom.port,
                    "tls": self.settings.dicom.tls.enabled,
                    "partial_files_removed": removed,
                    "orphans_removed": len(reconciled.removed),
                    "reindexed": len(reconciled.reindexed),
                    "quarantined": len(reconciled.quarantined),
                },
            )
        recovered = recover(self.db)
        if recovered:
            log.info("re-queued %d job(s) interrupted by a stop: %s", len(recovered), recovered)
        if self.pipelines:
            self.runner = make_runner(self.db, self.settings, self.pipelines, self.wake.delivery)
        if self.receivers is not None:
            self.receivers.start()
        else:
            self.scp.start()
        self.scheduler.add_job(
            self.tick,
            "interval",
            seconds=self.settings.scheduler.tick_seconds,
            id="tick",
            max_instances=1,
            coalesce=True,
        )
        if self.settings.destinations:
            self.scheduler.add_job(
                self.deliver,
                "interval",
                seconds=self.settings.scheduler.tick_seconds,
                id="deliver",
                max_instances=1,  # a slow peer delays the next round, never doubles a send
                coalesce=True,
            )
        if self.settings.audit.head_log_minutes > 0:
            self.scheduler.add_job(
                self.log_audit_head,
                "interval",
                minutes=self.settings.audit.head_log_minutes,
                id="audit-head",
                max_instances=1,
                coalesce=True,
            )
        self.scheduler.start()
        self.tick()
        m = self.settings.monitoring
        if m.enabled:
            try:
                self.monitoring = MonitoringServer(m.bind, m.port, self.health, self.metrics)
            except OSError as exc:
                # DICOM reception matters more than the endpoint; its absence is visible
                # (the health check fails), and this line says why.
                log.error(
                    "monitoring endpoint not started: cannot listen on %s:%d (%s)",
                    m.bind,
                    m.port,
                    exc.strerror or exc,
                )
            else:
                self.monitoring.start()
                log.info("monitoring on http://%s:%d (/health, /metrics)", m.bind, m.port)

    def _audit(self, action: str, outcome: str, detail: dict[str, object]) -> None:
        """An audit event of the node itself (a receiver process started or died)."""
        try:
            with self.db.session() as s:
                record(s, action, actor="node", outcome=outcome, detail=detail)
        except Exception:
            log.exception("cannot audit %s", action)

    def _commitment_report(
        self, transaction: str, committed: list[str], failed: dict[str, int], actor: str
    ) -> int:
        from node.delivery import commitment_report

        return commitment_report(
            self.db, transaction, committed, failed, actor=actor, policy=self.settings.delivery
        )

    def deliver(self) -> None:
        """One outbox round: send what is due (its own job, so a slow peer never blocks ticks)."""
        from node.delivery import deliver_due

        try:
            for outcome in deliver_due(self.db, self.settings):
                if outcome.ok:
                    log.info("delivery %s to %s done", outcome.delivery_id, outcome.destination)
                else:
                    log.warning(
                        "delivery %s to %s: %s (%s)",
                        outcome.delivery_id,
                        outcome.destination,
                        outcome.error,
                        outcome.state,
                    )
        except Exception:
            log.exception("delivery round failed")

    def tick(self) -> None:
        """One scheduler tick: mark stable series, refresh the heartbeat."""
        try:
            stable = mark_stable_series(self.db, self.settings.scheduler.series_stable_seconds)
            for uid in stable:
                log.info("series %s is stable", uid)
            for job_id in self.job_scheduler.tick():
                log.info("job %d created", job_id)
            if self.runner is not None:
                for job_id in self.runner.tick():
                    log.info("job %d started", job_id)
            self.wake.after_tick(self.job_scheduler.retry_at)  # the next tick when due
        except Exception:
            log.exception("scheduler tick failed")
        for end in self.metrics.follow():
            _log_job_end(end)
        self._write_heartbeat()
        self.last_tick = time.monotonic()

    def _write_heartbeat(self) -> None:
        path = heartbeat_path(self.settings)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(
            json.dumps(
                {
                    "pid": os.getpid(),
                    "started_at": self.started_at.isoformat(),
                    "heartbeat_at": datetime.now(UTC).isoformat(),
                    "ae_title": self.settings.dicom.ae_title,
                    "bind": self.settings.dicom.bind,
                    "port": self.settings.dicom.port,
                    "tls": self.settings.dicom.tls.enabled,
                    "tick_seconds": self.settings.scheduler.tick_seconds,
                }
            )
        )
        tmp.replace(path)

    def stop(self) -> None:
        """Stop within ``dicom.shutdown_grace_s``: refuse, drain, end jobs, audit, close.

        New C-STOREs are refused (0xA700) from the first moment; associations
        and running stages share one grace period; what is still open then is
        aborted (associations) or ended and re-queued (jobs).
        """
        started = time.monotonic()
        grace = self.settings.dicom.shutdown_grace_s
        self.ingestor.closing.set()
        if self.scheduler.running:
            self.scheduler.shutdown(wait=False)
        log.info("stopping: no new associations or instances; grace %.1f s", grace)
        if self.receivers is not None:
            # Each receiver drains as the in-process SCP does and audits receiver.stopped.
            stopped, killed = self.receivers.stop(grace)
            open_assocs, aborted = 0, 0  # counted per receiver in its receiver.stopped event
            extra: dict[str, int] = {"receivers_stopped": stopped, "receivers_killed": killed}
            log.info("%d receiver(s) stopped, %d killed after the grace", stopped, killed)
        else:
            extra = {}
            open_assocs, aborted = self.scp.drain(grace)
        interrupted: list[int] = []
        if self.runner is not None:
            left = max(0.0, grace - (time.monotonic() - started))
            interrupted = self.runner.stop(left)
            if interrupted:
                recover(self.db)
                log.warning(
                    "job(s) %s interrupted: re-queued, they resume at their last finished stage",
                    interrupted,
                )
        for end in self.metrics.follow():
            _log_job_end(end)
        if self.monitoring is not None:
            self.monitoring.stop()
        seconds = time.monotonic() - started
        with self.db.session() as s:
            record(
                s,
                "node.stopped",
                actor="node",
                detail={
                    "pid": os.getpid(),
                    "grace_s": grace,
                    "associations_open": open_assocs,
                    "associations_aborted": aborted,
                    "jobs_interrupted": interrupted,
                    "seconds": round(seconds, 2),
                    **extra,
                },
            )
        log.info(
            "stopped in %.1f s: %d association(s) open at SIGTERM, %d aborted, %d job(s) re-queued",
            seconds,
            open_assocs,
            aborted,
            len(interrupted),
        )
        self.log_audit_head()
        heartbeat_path(self.settings).unlink(missing_ok=True)
        self.db.dispose()

    def run_forever(self) -> None:
        """Start, then block until SIGTERM/SIGINT, then stop."""

        def _signal(signum: int, _frame: FrameType | None) -> None:
            log.info("signal %d: stopping", signum)
            self._stop.set()

        signal.signal(signal.SIGTERM, _signal)
        signal.signal(signal.SIGINT, _signal)
        self.start()
        try:
            while not self._stop.wait(1.0):
                pass
        finally:
            self.stop()


def _log_job_end(end: JobEnd) -> None:
    """One line per finished job: id, outcome, duration, pipeline (and where it failed)."""
    took = f"{end.seconds:.1f} s" if end.seconds is not None else "unknown time"
    if end.state == "done":
        log.info("job %d done in %s (%s)", end.job_id, took, end.pipeline)
    else:
        why = f" at {end.stage}: {end.error[:200]}" if end.error and end.stage else ""
        log.warning("job %d %s after %s (%s)%s", end.job_id, end.state, took, end.pipeline, why)
