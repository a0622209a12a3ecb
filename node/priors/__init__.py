"""A patient's prior study from the PACS: find, retrieve, analyse (or reuse), compare.

The ``compare`` job stage (:func:`compare_stage`) does, for the job's study:

1. asks each query/retrieve source (``priors.sources`` in the node config)
   with C-FIND at study level for the same PatientID's studies of the
   pipeline's modality, dated before this one and within the pipeline's
   ``priors.max_age_days``; newest first, it asks at series level and takes
   the first study whose series include the pipeline's required roles (by
   the node's role rules on the attributes the PACS returns);
2. unless the node already holds them, C-MOVEs the series of the roles
   (series level: the PACS's copy of the study also holds the node's own
   SEG/SR/PDF, which the node's SCP does not accept) to the node's own AE:
   the instances arrive through the Storage SCP like any other and are
   indexed; it waits until those series are stable;
3. reuses the analysis of the prior when the node has one (a done job for
   that study, or an earlier ``compare`` that analysed it, kept under
   ``<storage root>/priors/<study UID>/``), else segments and scores it with
   the job's pipeline (no SEG/SR/PDF is written for the prior);
4. compares (:func:`pipelines.compare.compare`) and writes
   ``compare/comparison.json``; encode puts it in the SR and the PDF.

Nothing here fails the job: no prior is a result ("no prior"); a source that
refuses or does not answer is recorded once, audited once, and not asked
again for ``priors.down_backoff_s`` (no retry storm), and the job goes on
without a comparison; a prior that cannot be segmented leaves the
comparison out with the reason. Every step is audited with UIDs only: the
PatientID goes into the C-FIND identifier and nowhere else.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import date, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import select

from node.config.priors import PriorSource
from node.priors.marks import mark_retrieved
from node.priors.qr import SourceDown, StudyHit, _date, find_series, find_studies, move_series
from pipelines.compare import TimePoint, compare

if TYPE_CHECKING:
    from node.db.session import Database
    from node.pipelines import Pipeline
    from node.stages import JobContext

log = logging.getLogger("node.priors")

ACTOR = "node:priors"
NO_PRIOR = "no prior"
COMPARED = "compared"
NO_COMPARISON = "no comparison"


@dataclass(frozen=True)
class PriorPlan:
    """What the ``compare`` stage needs of the node's settings (picklable, in the context)."""

    sources: tuple[PriorSource, ...]
    calling_ae: str
    move_destination: str
    pipeline_path: Path
    storage_root: Path
    series_stable_s: float
    move_timeout_s: float = 900.0
    down_backoff_s: float = 300.0


@dataclass
class Search:
    """What the search saw and decided: the ``sarcnode priors`` record."""

    found: list[dict[str, Any]] = field(default_factory=list)
    chosen: StudyHit | None = None
    roles: dict[str, str] = field(default_factory=dict)
    reason: str = ""


# -- the search -------------------------------------------------------------------------


def _down_file(plan: PriorPlan, source: PriorSource) -> Path:
    return plan.storage_root / "priors" / f"source-{source.name}.down.json"


def down_until(plan: PriorPlan, source: PriorSource, now: float) -> tuple[float, str] | None:
    """(until when, why) while a source recorded as down is not to be asked; else None."""
    path = _down_file(plan, source)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    until = float(data.get("until", 0))
    return (until, str(data.get("reason", ""))) if until > now else None


def mark_down(plan: PriorPlan, source: PriorSource, reason: str, now: float) -> None:
    """Record that ``source`` failed: jobs skip it for ``down_backoff_s``."""
    path = _down_file(plan, source)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"until": now + plan.down_backoff_s, "reason": reason}))


def search(
    plan: PriorPlan,
    pipeline: Pipeline,
    *,
    patient_id: str,
    study_uid: str,
    study_date: date,
    sources: Sequence[PriorSource],
) -> Search:
    """The prior to use: the newest earlier study with the required roles, over ``sources``.

    Raises
    ------
    SourceDown
        A source failed (the caller records it; other sources are not asked
        after a failure, so a comparison never depends on which PACS answered).
    """
    result = Search()
    hits: list[StudyHit] = []
    for source in sources:
        try:
            hits += find_studies(
                source, plan.calling_ae, patient_id, study_date, pipeline.priors.max_age_days
            )
        except SourceDown as exc:
            exc.source = source.name
            raise
    by_name = {s.name: s for s in sources}
    seen: set[str] = set()
    for hit in sorted(hits, key=lambda h: h.study_date, reverse=True):
        if hit.study_instance_uid == study_uid or hit.study_instance_uid in seen:
            continue
        seen.add(hit.study_instance_uid)
        series = find_series(by_name[hit.source], plan.calling_ae, hit.study_instance_uid)
        roles: dict[str, str] = {}
        for attrs in series:
            if attrs.get("Modality") != pipeline.modality:
                continue
            role = pipeline.roles.classify(attrs)
            roles.setdefault(role, str(attrs["SeriesInstanceUID"]))
        missing = [r for r in pipeline.required if r not in roles]
        entry = {
            "source": hit.source,
            "study_instance_uid": hit.study_instance_uid,
            "study_date": hit.study_date.isoformat(),
            "series": len(series),
            "roles": sorted(r for r in roles if r in (*pipeline.required, *pipeline.optional)),
        }
        entry["verdict"] = f"no {'/'.join(missing)} series" if missing else "used"
        result.found.append(entry)
        if not missing and result.chosen is None:
            result.chosen, result.roles = hit, roles
            break
    if result.chosen is None:
        why = f"none with {'/'.join(pipeline.required)}" if result.found else "no earlier study"
        result.reason = (
            f"{NO_PRIOR}: {why} within {pipeline.priors.max_age_days} days "
            f"({len(result.found)} earlier studies found)"
        )
    return result


# -- retrieval and analysis -------------------------------------------------------------


class PriorUnusable(RuntimeError):
    """The prior was found but cannot be compared (not retrieved in time, not segmentable)."""


def held_series(db: Database, study_uid: str) -> dict[str, dict[str, Any]]:
    """Series UID -> state, instance count and files of the study in the node's index."""
    from node.db.models import Instance, Study

    out: dict[str, dict[str, Any]] = {}
    with db.session() as s:
        study = s.scalar(select(Study).where(Study.study_instance_uid == study_uid))
        for series in study.series if study else []:
            paths = s.scalars(select(Instance.path).where(Instance.series_id == series.id)).all()
            out[series.series_instance_uid] = {
                "state": series.state,
                "instances": series.instance_count,
                "files": list(paths),
            }
    return out


def retrieve(
    db: Database, plan: PriorPlan, source: PriorSource, search_: Search, pipeline: Pipeline
) -> str:
    """Make the chosen prior's role series stable in the node's index; say how.

    Raises
    ------
    SourceDown
        The C-MOVE failed.
    PriorUnusable
        The series did not arrive and settle within ``move_timeout_s``.
    """
    assert search_.chosen is not None
    uid = search_.chosen.study_instance_uid
    wanted = [search_.roles[r] for r in pipeline.required]
    wanted += [search_.roles[r] for r in pipeline.optional if r in search_.roles]

    def ready() -> bool:
        held = held_series(db, uid)
        return all(held.get(w, {}).get("state") == "stable" for w in wanted)

    if ready():
        return "already held by the node"
    mark_retrieved(plan.storage_root, uid, wanted, source.name)
    moved = move_series(
        source, plan.calling_ae, plan.move_destination, uid, wanted, plan.move_timeout_s
    )
    deadline = time.monotonic() + plan.move_timeout_s
    while not ready():
        if time.monotonic() > deadline:
            raise PriorUnusable(
                f"prior {uid}: its series were not stable {plan.move_timeout_s:.0f} s after "
                f"the C-MOVE ({moved} instances moved)"
            )
        time.sleep(min(1.0, plan.series_stable_s / 2))
    return f"moved from {source.name} ({moved} instances)"


def timepoint_of(
    folder: Path, study_uid: str, study_date: date, primary: str, scores_file: Path
) -> TimePoint:
    """A study's :class:`TimePoint` from an analysis folder (``segment/`` and a score.json)."""
    import SimpleITK as sitk

    from pipelines.encode.sr import longest_axial_diameter_mm

    segment = json.loads((folder / "segment" / "outputs.json").read_text())
    mask = sitk.ReadImage(str(segment["masks"][primary]))
    sx, sy, _ = mask.GetSpacing()
    diameter = longest_axial_diameter_mm(sitk.GetArrayViewFromImage(mask) > 0, (sx, sy))
    scores = json.loads(scores_file.read_text()).get("scores", []) if scores_file.is_file() else []
    return TimePoint(study_uid, study_date, float(segment["volume_ml"]), diameter, tuple(scores))


def _done_job_folder(db: Database, study_uid: str, pipeline: str) -> tuple[int, Path] | None:
    """The newest done job of ``pipeline`` on the study whose segment finished."""
    from node.db.models import Job
    from node.jobs import state

    with db.session() as s:
        jobs = s.scalars(
            select(Job)
            .where(Job.study_instance_uid == study_uid, Job.pipeline == pipeline)
            .where(Job.state == state.DONE)
            .order_by(Job.id.desc())
        ).all()
        for job in jobs:
            folder = Path(str(job.folder))
            if (folder / "segment" / "outputs.json").is_file():
                return job.id, folder
    return None


def analyse_prior(
    ctx: JobContext, db: Database, plan: PriorPlan, pipeline: Pipeline, search_: Search
) -> tuple[TimePoint, str]:
    """The prior's time point and where it came from: a done job, a cached analysis, or now.

    Raises
    ------
    PriorUnusable
        The prior cannot be segmented (the reason from the chain's BadInput).
    """
    from pipelines.errors import BadInput

    hit = search_.chosen
    assert hit is not None
    uid, primary = hit.study_instance_uid, pipeline.required[0]
    done = _done_job_folder(db, uid, pipeline.name)
    if done is not None:
        job_id, folder = done
        tp = timepoint_of(folder, uid, hit.study_date, primary, folder / "score" / "score.json")
        return tp, f"reused job {job_id}"
    cache = plan.storage_root / "priors" / uid
    if (cache / "timepoint.json").is_file():
        return TimePoint.from_json(
            json.loads((cache / "timepoint.json").read_text())
        ), "reused (analysed before)"
    try:
        _analyse(ctx, db, plan, pipeline, search_, cache)
    except BadInput as exc:
        raise PriorUnusable(f"prior {uid} cannot be analysed: {exc}") from exc
    tp = timepoint_of(cache, uid, hit.study_date, primary, cache / "score.json")
    (cache / "timepoint.json").write_text(json.dumps(tp.to_json(), indent=2))
    return tp, "analysed now"


def _analyse(
    ctx: JobContext, db: Database, plan: PriorPlan, pipeline: Pipeline, search_: Search, out: Path
) -> None:
    """Segment and score the prior with the job's pipeline into ``out`` (no SEG/SR/PDF).

    The job's clinical factors are the nomogram's covariates for both studies,
    so a change in the predictions is the images' change.
    """
    import pydicom

    from node.stages import _segmenter, _signatures
    from pipelines import chain
    from pipelines.io.dicom import SeriesRef, series_attributes

    assert search_.chosen is not None
    uid = search_.chosen.study_instance_uid
    held = held_series(db, uid)
    refs = {}
    for role, series_uid in search_.roles.items():
        if role not in (*pipeline.required, *pipeline.optional) or series_uid not in held:
            continue
        files = tuple(sorted(plan.storage_root / p for p in held[series_uid]["files"]))
        ds = pydicom.dcmread(files[0], stop_before_pixels=True)
        refs[role] = SeriesRef(uid, series_uid, files, ds.SOPClassUID, series_attributes(ds))
    series = chain.StudySeries(uid, pipeline.required[0], refs)
    volumes = chain.load_volumes(series)
    masks = chain.segment(volumes, _segmenter(ctx.segmentation_model, ctx.device), out / "segment")
    (out / "segment" / "outputs.json").write_text(json.dumps(masks.to_json(), indent=2))
    signatures, _ = _signatures(ctx)
    features = chain.extract(signatures, volumes, masks, out / "radiomics", study=uid)
    scores = chain.score(signatures, features, ctx.factors(), series)
    (out / "score.json").write_text(json.dumps(scores.to_json(), indent=2))


# -- the stage --------------------------------------------------------------------------


def _audit(
    db: Database, action: str, study_uid: str, detail: Mapping[str, Any], outcome: str = "ok"
) -> None:
    from node.audit.trail import record

    with db.session() as s:
        record(
            s,
            action,
            actor=ACTOR,
            outcome=outcome,
            study_instance_uid=study_uid,
            detail=dict(detail),
        )


def _current_study(db: Database, study_uid: str) -> tuple[str | None, date | None]:
    """(PatientID, StudyDate) of the job's study from the index."""
    from node.db.models import Study

    with db.session() as s:
        study = s.scalar(select(Study).where(Study.study_instance_uid == study_uid))
        return (study.patient_id, _date(study.study_date)) if study else (None, None)


def _sources(plan: PriorPlan, pipeline: Pipeline) -> Any:
    """The sources to ask, or the outputs saying why none is asked."""
    named = [
        s for s in plan.sources if not pipeline.priors.sources or s.name in pipeline.priors.sources
    ]
    if not named:
        return {"status": NO_COMPARISON, "reason": "no query/retrieve source configured (priors)"}
    now = time.time()
    for source in named:
        down = down_until(plan, source, now)
        if down is not None:  # recorded and audited when it failed: not asked, not audited again
            until = datetime.fromtimestamp(down[0]).strftime("%H:%M:%S")
            return {
                "status": NO_COMPARISON,
                "reason": f"prior source {source.name} unavailable ({down[1]}); "
                f"not asked again until {until}",
            }
    return named


def _unavailable(
    db: Database, plan: PriorPlan, source: PriorSource, exc: Exception, study_uid: str
) -> dict[str, Any]:
    """Record a failed source once (back-off file, one audit event, one log line)."""
    mark_down(plan, source, str(exc), time.time())
    _audit(
        db,
        "priors.source_unavailable",
        study_uid,
        {"source": source.name, "error": str(exc)},
        "error",
    )
    log.warning(
        "prior source %s unavailable: %s; not asked for %.0f s",
        source.name,
        exc,
        plan.down_backoff_s,
    )
    return {"status": NO_COMPARISON, "reason": f"prior source unavailable: {exc}"}


def compare_stage(ctx: JobContext, db: Database) -> dict[str, Any]:
    """Find, retrieve and analyse the prior, and compare; the stage's outputs.

    ``status`` is ``compared`` (with ``headline``, ``prior`` and the figures),
    ``no prior`` or ``no comparison``, with the ``reason`` either way;
    ``found`` lists the earlier studies the search saw and its verdict on each.
    """
    from node.pipelines import load_pipeline

    plan = ctx.priors
    if plan is None:
        return {"status": NO_COMPARISON, "reason": "no query/retrieve source configured (priors)"}
    pipeline = load_pipeline(plan.pipeline_path)
    uid = ctx.study_instance_uid
    patient_id, study_date = _current_study(db, uid)
    if not patient_id or study_date is None:
        reason = "the study has no PatientID or StudyDate to look for a prior by"
        _audit(db, "priors.omitted", uid, {"reason": reason})
        return {"status": NO_COMPARISON, "reason": reason}
    sources = _sources(plan, pipeline)
    if isinstance(sources, dict):
        return sources
    try:
        found = search(
            plan, pipeline, patient_id=patient_id, study_uid=uid, study_date=study_date,
            sources=sources,
        )  # fmt: skip
    except SourceDown as exc:
        failed = next((s for s in sources if s.name == exc.source), sources[0])
        return _unavailable(db, plan, failed, exc, uid)
    outputs: dict[str, Any] = {"found": found.found}
    if found.chosen is None:
        _audit(db, "priors.none", uid, {"found": len(found.found), "reason": found.reason})
        return outputs | {"status": NO_PRIOR, "reason": found.reason}
    hit = found.chosen
    source = next(s for s in sources if s.name == hit.source)
    detail = {"prior": hit.study_instance_uid, "source": hit.source, "roles": found.roles}
    _audit(db, "priors.found", uid, detail)
    try:
        how = retrieve(db, plan, source, found, pipeline)
        _audit(db, "priors.retrieved", uid, {"prior": hit.study_instance_uid, "how": how})
        prior, analysis = analyse_prior(ctx, db, plan, pipeline, found)
    except SourceDown as exc:
        return outputs | _unavailable(db, plan, source, exc, uid)
    except PriorUnusable as exc:
        _audit(db, "priors.omitted", uid, {"prior": hit.study_instance_uid, "reason": str(exc)})
        return outputs | {"status": NO_COMPARISON, "reason": f"comparison omitted: {exc}"}
    prior = replace(prior, evidence=_evidence(db, hit.study_instance_uid, found, pipeline))
    current = timepoint_of(
        ctx.folder, uid, study_date, pipeline.required[0], ctx.folder / "score" / "score.json"
    )
    result = compare(current, prior, _earlier(db, hit.study_instance_uid, pipeline.name))
    out = ctx.folder / "compare"
    out.mkdir(parents=True, exist_ok=True)
    (out / "comparison.json").write_text(json.dumps(result.to_json(), indent=2))
    detail = {"prior": hit.study_instance_uid, "analysis": analysis, "headline": result.headline()}
    _audit(db, "priors.compared", uid, detail)
    log.info(
        "job %s compared with prior %s: %s", ctx.job_id, hit.study_instance_uid, detail["headline"]
    )
    return outputs | {
        "status": COMPARED,
        "reason": f"prior {hit.study_instance_uid} ({how}; analysis: {analysis})",
        "headline": result.headline(),
        "lines": result.lines(),
        "prior": {"study_instance_uid": hit.study_instance_uid,
                  "study_date": hit.study_date.isoformat(), "source": hit.source},
        "days": result.days,
        "volume_pct": round(result.volume_pct, 1),
        "diameter_pct": round(result.diameter_pct, 1),
        "category": result.category,
        "comparison": str(out / "comparison.json"),
    }  # fmt: skip


def _earlier(db: Database, prior_uid: str, pipeline: str) -> tuple[TimePoint, ...]:
    """The time points before the prior, from the prior's own done comparison (if any)."""
    from pipelines.compare import Comparison

    done = _done_job_folder(db, prior_uid, pipeline)
    if done is None:
        return ()
    path = done[1] / "compare" / "comparison.json"
    try:
        theirs = Comparison.from_json(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        return ()
    return (*theirs.earlier, theirs.prior)


def _evidence(
    db: Database, study_uid: str, found: Search, pipeline: Pipeline
) -> tuple[tuple[str, str, str], ...]:
    """(series, SOP class, SOP instance) of the prior's primary series, for the SR's references."""
    from node.db.models import Instance, Series

    series_uid = found.roles.get(pipeline.required[0])
    with db.session() as s:
        rows = s.execute(
            select(Instance.sop_class_uid, Instance.sop_instance_uid)
            .join(Series, Instance.series_id == Series.id)
            .where(Series.series_instance_uid == series_uid)
            .order_by(Instance.instance_number)
        ).all()
    return tuple((str(series_uid), str(c), str(i)) for c, i in rows)
