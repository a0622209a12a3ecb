"""Which jobs exist and which runs next: creation from stable studies, claim order, recovery.

A job's idempotency key is (study, pipeline, the chosen series and their
instance counts): the same study sent again makes the same key and no new
job; a new series, or a re-opened one that grew, makes a new key and the new
job supersedes the older ones of that study and pipeline (a queued one is
cancelled). Queued jobs are claimed by priority (urgent, normal, off-peak
only inside the off-peak window), then age; a job that failed waits out the
retry policy's back-off first (:func:`next_job`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pydicom
from sqlalchemy import select

from node.audit.context import AuditConfig
from node.audit.trail import record
from node.config import Settings
from node.db.models import Instance, Job, JobStage, Series, Study, utcnow
from node.db.session import Database
from node.jobs import state
from node.pipelines import Decision, Pipeline, SeriesInfo, decide
from node.priors.marks import only_prior
from node.stages import JobContext

if TYPE_CHECKING:
    from node.priors import PriorPlan
from pipelines.errors import MissingSeriesError
from pipelines.io.dicom import series_attributes

log = logging.getLogger("node.jobs")

PRIORITY_ORDER = {"urgent": 0, "normal": 1, "offpeak": 2}


def job_key(study_uid: str, pipeline: str, chosen: Mapping[str, tuple[str, int]]) -> str:
    """SHA-256 of study, pipeline and (role, series UID, instance count) of the chosen series."""
    parts = [study_uid, pipeline] + [f"{r}={u}:{n}" for r, (u, n) in sorted(chosen.items())]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()


class Scheduler:
    """Turns stable studies into jobs (called on every tick of ``serve``)."""

    def __init__(self, db: Database, settings: Settings, pipelines: Sequence[Pipeline]) -> None:
        """Keep the pipelines and a cache of series headers (read once per series)."""
        self.db, self.settings, self.pipelines = db, settings, list(pipelines)
        self._headers: dict[str, dict[str, Any]] = {}
        # study UID -> (series UID, instance count) pairs already decided on
        self._settled: dict[str, tuple[tuple[str, int], ...]] = {}
        #: The earliest moment a pipeline said it would decide again (waiting for an
        #: optional series), as of the last tick; None when none waits.
        self.retry_at: datetime | None = None

    def _attributes(self, root: Path, series_uid: str, path: str, modality: str | None) -> Any:
        if series_uid not in self._headers:
            try:
                ds = pydicom.dcmread(root / path, stop_before_pixels=True)
                self._headers[series_uid] = series_attributes(ds)
            except Exception as exc:
                # An accepted instance may still hold a value pydicom cannot convert
                # (the fuzz suite found ScanningSequence re-typed FL with 2 bytes:
                # BytesLengthException). Unhandled, it ended every scheduler tick, so
                # no study got a job; the series falls back to its modality instead.
                log.warning(
                    "series %s: header not readable for the pipeline rules (%s); "
                    "using its modality only",
                    series_uid,
                    type(exc).__name__,
                )
                self._headers[series_uid] = {"Modality": modality}
        return self._headers[series_uid]

    def tick(self, now: datetime | None = None) -> list[int]:
        """Create the jobs that are due; return their ids."""
        moment = now or utcnow()
        created = []
        retry: list[datetime] = []
        for study_uid, infos, counts, signature in self._candidates(moment):
            waiting = False
            for pipeline in self.pipelines:
                decision = decide(pipeline, infos, now=moment)
                waiting |= decision.retry_at is not None
                retry += [decision.retry_at] if decision.retry_at is not None else []
                if decision.start:
                    job_id = self._create(study_uid, pipeline, decision, counts)
                    if job_id is not None:
                        created.append(job_id)
            if not waiting:  # final for these series until one changes or a new one comes
                self._settled[study_uid] = signature
        self.retry_at = min(retry, default=None)
        return created

    def _candidates(
        self, moment: datetime
    ) -> list[tuple[str, list[SeriesInfo], dict[str, int], tuple[tuple[str, int], ...]]]:
        """Recent studies whose series are all stable and changed since last decided on."""
        root = self.settings.storage.root
        candidates = []
        with self.db.session() as s:
            recent = moment - timedelta(days=7)
            studies = s.scalars(select(Study).where(Study.last_received_at >= recent)).all()
            for study in studies:
                if not study.series or any(x.state != "stable" for x in study.series):
                    continue
                signature = tuple(
                    sorted((x.series_instance_uid, x.instance_count) for x in study.series)
                )
                if self._settled.get(study.study_instance_uid) == signature:
                    continue  # decided before with these very series: nothing new
                if only_prior(root, study.study_instance_uid, (u for u, _ in signature)):
                    # fetched by a compare stage: analysed there, no job and no delivery
                    self._settled[study.study_instance_uid] = signature
                    continue
                infos = []
                for x in study.series:
                    first = s.scalar(
                        select(Instance.path).where(Instance.series_id == x.id).limit(1)
                    )
                    if first is None:
                        continue
                    attrs = dict(self._attributes(root, x.series_instance_uid, first, x.modality))
                    attrs.setdefault("Modality", x.modality)
                    infos.append(
                        SeriesInfo(
                            x.series_instance_uid, attrs, x.instance_count, True, x.stable_at
                        )
                    )
                counts = {x.series_instance_uid: x.instance_count for x in study.series}
                candidates.append((study.study_instance_uid, infos, counts, signature))
        return candidates

    def _create(
        self, study_uid: str, pipeline: Pipeline, decision: Decision, counts: Mapping[str, int]
    ) -> int | None:
        chosen = {r: (u, counts.get(u, 0)) for r, u in decision.roles.items()}
        key = job_key(study_uid, pipeline.name, chosen)
        now = utcnow()
        with self.db.session() as s:
            if s.scalar(select(Job.id).where(Job.idempotency_key == key)) is not None:
                return None
            job = Job(
                idempotency_key=key,
                study_instance_uid=study_uid,
                pipeline=pipeline.name,
                state=state.QUEUED,
                priority=pipeline.priority,
                attempts=0,
                created_at=now,
                updated_at=now,
                inputs=json.dumps(decision.roles),
            )
            s.add(job)
            s.flush()
            job.folder = str(self.settings.storage.root / "jobs" / str(job.id))
            for stage in pipeline.stages:
                s.add(JobStage(job_id=job.id, stage=stage, state=state.PENDING, attempts=0))
            older = s.scalars(
                select(Job).where(
                    Job.study_instance_uid == study_uid,
                    Job.pipeline == pipeline.name,
                    Job.id != job.id,
                    Job.superseded_by.is_(None),
                )
            ).all()
            record(
                s,
                "job.created",
                actor=state.ACTOR,
                study_instance_uid=study_uid,
                detail={
                    "job": job.id,
                    "pipeline": pipeline.name,
                    "roles": decision.roles,
                    "reason": decision.reason,
                    "supersedes": [o.id for o in older],
                },
            )
            for old in older:
                old.superseded_by = job.id
                if state.allowed(old.state, "supersede"):
                    state.transition(s, old, "supersede", detail={"by": job.id}, now=now)
            return job.id


def next_job(
    queued: Iterable[Job],
    *,
    now: datetime,
    policy: state.RetryPolicy,
    in_offpeak: Callable[[datetime], bool],
    skip: Collection[int] = (),
    pipelines: Collection[str] | None = None,
) -> Job | None:
    """The queued job to run next, or None when none is due.

    Due: not in ``skip`` (already running here), of a known pipeline, past its
    retry back-off, and for ``offpeak`` priority inside the off-peak window.
    Among those: urgent before normal before off-peak, then oldest, then id.
    """
    due = [
        j
        for j in queued
        if j.state == state.QUEUED
        and j.id not in skip
        and (pipelines is None or j.pipeline in pipelines)
        and policy.due_at(j) <= now
        and (j.priority != "offpeak" or in_offpeak(now))
    ]
    if not due:
        return None
    return min(due, key=lambda j: (PRIORITY_ORDER.get(j.priority, 1), j.created_at, j.id))


def recover(db: Database) -> list[int]:
    """At start-up: jobs left ``running`` by a crash go back to ``queued`` (they resume)."""
    with db.session() as s:
        rows = s.scalars(select(Job).where(Job.state == state.RUNNING)).all()
        for job in rows:
            state.transition(s, job, "recover", stage=job.stage)
        return [j.id for j in rows]


def rescore(db: Database, study_uid: str, *, actor: str) -> int | None:
    """Queue the study's latest finished job again from its score stage; return its id."""
    later = ("score", "encode", "deliver")
    with db.session() as s:
        job = s.scalars(
            select(Job)
            .where(
                Job.study_instance_uid == study_uid,
                Job.superseded_by.is_(None),
                Job.state.in_(state.find("rescore").sources),
            )
            .order_by(Job.id.desc())
        ).first()
        if job is None:
            return None
        for row in s.scalars(select(JobStage).where(JobStage.job_id == job.id)):
            if row.stage in later:
                state.stage_reset(row)
                (Path(str(job.folder)) / row.stage / "outputs.json").unlink(missing_ok=True)
        state.transition(s, job, "rescore", actor=actor)
        return job.id


def context(db: Database, settings: Settings, job: Job, pipeline: Pipeline) -> JobContext:
    """The picklable context of ``job`` (instance files per role from the index).

    Raises
    ------
    MissingSeriesError
        A series the job was made for is no longer in the index.
    """
    inputs: dict[str, str] = json.loads(job.inputs or "{}")
    root = settings.storage.root
    files: dict[str, list[Path]] = {}
    with db.session() as s:
        for role, uid in inputs.items():
            series = s.scalar(select(Series).where(Series.series_instance_uid == uid))
            if series is None:
                raise MissingSeriesError(f"series {uid} ({role}) is no longer in the index")
            paths = s.scalars(select(Instance.path).where(Instance.series_id == series.id)).all()
            files[role] = [root / p for p in paths]
    clinical_file = clinical_path(settings, job.study_instance_uid)
    clinical = json.loads(clinical_file.read_text()) if clinical_file.is_file() else {}
    return JobContext(
        job_id=job.id,
        job_key=job.idempotency_key,
        folder=Path(str(job.folder)),
        study_instance_uid=job.study_instance_uid,
        inputs=inputs,
        files=files,
        primary=pipeline.required[0],
        segmentation_model=pipeline.segmentation_model,
        signatures=pipeline.signatures,
        destinations=pipeline.destinations or tuple(d.name for d in settings.destinations),
        database_url=settings.database_url,
        audit=AuditConfig.from_settings(settings),
        uid_root=settings.uids.root,
        device=settings.jobs.device,
        radiomics_workers=radiomics_workers(settings),
        clinical=clinical,
        priors=prior_plan(settings, pipeline) if "compare" in pipeline.stages else None,
    )


def radiomics_workers(settings: Settings) -> int:
    """Processes in each job worker's warm extraction pool: the CPUs shared by parallel jobs.

    1 (extraction in the job's own process) when jobs run as Ray tasks,
    which Ray gives one CPU each.
    """
    if settings.jobs.executor.kind == "ray":
        return 1
    return max(1, len(os.sched_getaffinity(0)) // settings.jobs.max_parallel)


def prior_plan(settings: Settings, pipeline: Pipeline) -> PriorPlan:
    """What the compare stage needs of the settings (:mod:`node.priors`)."""
    from node.priors import PriorPlan

    return PriorPlan(
        sources=tuple(settings.priors.sources),
        calling_ae=settings.dicom.ae_title,
        move_destination=settings.dicom.ae_title,
        pipeline_path=pipeline.path,
        storage_root=settings.storage.root,
        series_stable_s=settings.scheduler.series_stable_seconds,
        move_timeout_s=settings.priors.move_timeout_s,
        down_backoff_s=settings.priors.down_backoff_s,
    )


def clinical_path(settings: Settings, study_uid: str) -> Path:
    """Where ``sarcnode clinical set`` keeps a study's clinical factors (JSON)."""
    from node.dicom.validate import validate_uid

    ok, reason = validate_uid(study_uid)
    if not ok:
        raise ValueError(f"Study Instance UID {study_uid!r}: {reason}")
    return settings.storage.root / "clinical" / f"{study_uid}.json"
