"""Pipeline jobs for operators.

``jobs`` (list, show, retry, cancel), ``pipelines`` (list, test) and ``clinical set``.
"""

from __future__ import annotations

import json
import sys
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Literal

import typer
from rich.markup import escape
from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from node.audit.trail import os_actor, record
from node.cli.common import (
    PIPELINES_DIR,
    ConfigOpt,
    JsonObjectOpt,
    JsonOpt,
    PipelinesOpt,
    StudyOpt,
    emit,
    err,
    iso,
    list_rows,
    newest,
    open_db,
    out,
    settings_from,
)
from node.db.models import AuditEvent, Delivery, Job, JobState, Study

jobs_app = typer.Typer(help="Pipeline jobs: list, show one, retry, cancel.")

pipelines_app = typer.Typer(
    help="Pipeline definitions (config/pipelines): list them, dry-run one on a study folder.",
    no_args_is_help=True,
)

clinical_app = typer.Typer(
    help="Clinical factors of a study (the nomogram's inputs).", no_args_is_help=True
)


def _job_row(job: Job) -> dict[str, Any]:
    seconds = None
    if job.started_at and job.finished_at:
        seconds = round((job.finished_at - job.started_at).total_seconds(), 1)
    return {
        "id": job.id,
        "pipeline": job.pipeline,
        "study_instance_uid": job.study_instance_uid,
        "state": job.state,
        "stage": job.stage,
        "priority": job.priority,
        "attempts": job.attempts,
        "created_at": iso(job.created_at),
        "started_at": iso(job.started_at),
        "finished_at": iso(job.finished_at),
        "seconds": seconds,
        "superseded_by": job.superseded_by,
        "error": job.error,
    }


@jobs_app.callback(invoke_without_command=True)
def jobs(
    ctx: typer.Context,
    config: ConfigOpt = None,
    state: Annotated[
        JobState | None, typer.Option(help="Only jobs in this state (one of those shown).")
    ] = None,
    study: StudyOpt = None,
    limit: Annotated[int, typer.Option(min=1, help="Newest N jobs.")] = 100,
    as_json: JsonOpt = False,
) -> None:
    """List jobs, newest last: state, stage, timing, error."""
    list_rows(
        ctx,
        config,
        lambda: newest(Job, limit, state=state, study=study),
        _job_row,
        as_json=as_json,
        title="Jobs",
        columns=[
            "id",
            "pipeline",
            "study_instance_uid",
            "state",
            "stage",
            "attempts",
            "seconds",
            "created_at",
            "error",
        ],
    )


def quality_text(quality: dict[str, Any] | None) -> str:
    """One line on a segmentation's quality estimate, for ``jobs show``.

    ``segmentation quality 0.93 (review below 0.80) - review: no``, or, for a
    mask flagged for review, ``segmentation quality 0.42 - REVIEW: <reasons>``.
    """
    if quality is None:
        return "segmentation quality: not recorded (a model card or a job older than the estimate)"
    score = quality.get("score")
    figure = "n/a (one test-time view)" if score is None else f"{float(score):.2f}"
    if quality.get("review"):
        reasons = "; ".join(str(r) for r in quality.get("reasons") or []) or "no reason recorded"
        return f"segmentation quality {figure} - REVIEW: {reasons}"
    below = float(quality.get("threshold", 0))
    return f"segmentation quality {figure} (review below {below:.2f}) - review: no"


def _scores(outputs: dict[str, Any]) -> list[dict[str, Any]]:
    """The score stage's results; a job scored before several cards gives its one result."""
    if "scores" in outputs:
        return list(outputs["scores"])
    if "radscore" in outputs:
        return [outputs]
    return []


#: Stage outputs ``jobs show`` prints in their own lines above the stage outputs.
_SHOWN_APART = {"segment": ("quality",), "score": ("scores",)}


def output_lines(outputs: Any, prefix: str = "") -> list[str]:
    """A stage's outputs as ``key: value`` lines, nested keys dotted, nothing cut.

    ``{"masks": {"T2FS": "/a.nii.gz"}, "volume_ml": 12.5}`` gives
    ``masks.T2FS: /a.nii.gz`` and ``volume_ml: 12.5``; a list of plain values
    is one comma-separated line, a list of objects one group per item
    (``extractions[0].features: ...``).
    """
    if isinstance(outputs, dict):
        if not outputs:
            return [f"{prefix}: (none)"] if prefix else []
        lines: list[str] = []
        for key, value in outputs.items():
            lines += output_lines(value, f"{prefix}.{key}" if prefix else str(key))
        return lines
    if isinstance(outputs, list):
        if all(not isinstance(v, dict | list) for v in outputs):
            return [f"{prefix}: {', '.join(map(str, outputs)) or '(none)'}"]
        return [line for i, v in enumerate(outputs) for line in output_lines(v, f"{prefix}[{i}]")]
    return [f"{prefix}: {'-' if outputs is None else outputs}"]


def _stage_rows(s: Session, job_id: int) -> list[dict[str, Any]]:
    """The job's stages, oldest first, with timing, outputs and error."""
    from node.db.models import JobStage

    return [
        {
            "stage": st.stage,
            "state": st.state,
            "attempts": st.attempts,
            "started_at": iso(st.started_at),
            "ended_at": iso(st.ended_at),
            "seconds": round((st.ended_at - st.started_at).total_seconds(), 2)
            if st.started_at and st.ended_at
            else None,
            "outputs": json.loads(st.outputs) if st.outputs else None,
            "error": st.error,
        }
        for st in s.scalars(select(JobStage).where(JobStage.job_id == job_id).order_by(JobStage.id))
    ]


def _job_audit(s: Session, job: Job, delivery_ids: set[int]) -> list[dict[str, Any]]:
    """The job's events (``job.*``) and its deliveries' (``delivery.*``), oldest first."""
    return [
        {
            "seq": e.seq,
            "ts": iso(e.ts),
            "action": e.action,
            "outcome": e.outcome,
            "detail": facts,
        }
        for e in s.scalars(
            select(AuditEvent)
            .where(
                AuditEvent.study_instance_uid == job.study_instance_uid,
                or_(
                    AuditEvent.action.startswith("job."),
                    AuditEvent.action.startswith("delivery."),
                ),
            )
            .order_by(AuditEvent.seq)
        )
        if (facts := json.loads(e.detail)).get("job") == job.id
        or (e.action.startswith("delivery.") and facts.get("delivery") in delivery_ids)
    ]


def _done_stage(detail: dict[str, Any], stage: str) -> dict[str, Any] | None:
    """The stage row named ``stage`` once it has outputs, else None."""
    return next((st for st in detail["stages"] if st["stage"] == stage and st["outputs"]), None)


def job_detail(s: Session, job: Job) -> dict[str, Any]:
    """What ``jobs show`` prints of ``job`` (its ``--json`` object; see the command's help)."""
    detail = _job_row(job) | {"inputs": json.loads(job.inputs or "{}"), "folder": job.folder}
    detail["stages"] = _stage_rows(s, job.id)
    segmented = _done_stage(detail, "segment")
    detail["segmentation_quality"] = segmented["outputs"].get("quality") if segmented else None
    scored = _done_stage(detail, "score")
    detail["scores"] = _scores(scored["outputs"]) if scored else None
    detail["deliveries"] = [
        {
            "id": d.id,
            "kind": d.kind,
            "destination": d.destination,
            "state": d.state,
            "attempts": d.attempts,
            "last_error": d.last_error,
        }
        for d in s.scalars(select(Delivery).where(Delivery.job_id == job.id))
    ]
    detail["audit"] = _job_audit(s, job, {d["id"] for d in detail["deliveries"]})
    return detail


def _print_job_head(detail: dict[str, Any]) -> None:
    """``jobs show`` for a person, first part: state, inputs, error, quality, scores."""
    from pipelines.scoring.text import confident, score_lines

    out.print(
        f"job {detail['id']}: {detail['state']} ({detail['pipeline']}), study "
        f"{detail['study_instance_uid']}",
        soft_wrap=True,
    )
    for role, uid in detail["inputs"].items():
        out.print(f"  input {escape(str(role))}: series {escape(str(uid))}", soft_wrap=True)
    out.print(f"  folder: {escape(str(detail['folder']))}", soft_wrap=True)
    if detail["error"]:
        out.print(f"  [red]error: {escape(detail['error'])}[/red]", soft_wrap=True)
    if _done_stage(detail, "segment") is not None:
        line = escape(quality_text(detail["segmentation_quality"]))
        flagged = (detail["segmentation_quality"] or {}).get("review")
        out.print(f"  [bold red]{line}[/bold red]" if flagged else f"  {line}", soft_wrap=True)
    for result in detail["scores"] or []:
        lines = [escape(line) for line in score_lines(result)]
        outside = "skipped" not in result and not confident(result)
        if outside:
            lines[1] = f"[bold red]{lines[1]}[/bold red]"
        out.print("\n".join(f"  {line}" for line in lines), soft_wrap=True)
    compared = _done_stage(detail, "compare")
    if compared is not None:  # the change since the prior study, or why there is none
        said = compared["outputs"].get("headline") or compared["outputs"].get("reason")
        out.print(f"  prior: {escape(str(said))}", soft_wrap=True)


def _print_job(detail: dict[str, Any]) -> None:
    """``jobs show`` for a person: the head, then stages, their outputs, deliveries, audit."""
    _print_job_head(detail)
    emit(
        detail["stages"],
        False,
        "Stages",
        ["stage", "state", "attempts", "started_at", "seconds", "error"],
    )
    for st in detail["stages"]:
        if st["outputs"] is None:
            continue
        apart = _SHOWN_APART.get(st["stage"], ())
        shown = {k: v for k, v in st["outputs"].items() if k not in apart}
        out.print(f"  outputs of {st['stage']}:")
        for line in output_lines(shown) or ["(none)"]:
            out.print(f"    {escape(line)}", soft_wrap=True)
    emit(
        detail["deliveries"],
        False,
        "Deliveries",
        ["id", "kind", "destination", "state", "attempts", "last_error"],
    )
    emit(
        [e | {"detail": json.dumps(e["detail"])} for e in detail["audit"]],
        False,
        "Audit",
        ["seq", "ts", "action", "outcome", "detail"],
    )


@jobs_app.command("show")
def jobs_show(
    ctx: typer.Context,
    job_id: Annotated[int, typer.Argument(metavar="ID")],
    config: ConfigOpt = None,
    as_json: JsonObjectOpt = False,
) -> None:
    """One job: inputs, quality, scores, stages with timing and outputs, deliveries, audit.

    The audit lists the job's events (``job.*``) and its deliveries' events
    (``delivery.*``), oldest first.

    ``--json`` prints one object: the row of ``jobs``, ``inputs``,
    ``folder``, ``stages`` (each with its ``outputs``), ``deliveries``,
    ``audit``, and the segment stage's quality estimate both in that stage's
    ``outputs`` and as ``segmentation_quality`` (None until the stage is done),
    and each signature card's result or skip record as ``scores`` (None until
    the score stage is done): rad-score, risk group (None outside the model's
    range), predictions, ``applicability`` (status and the line people read),
    training cohort, nested-CV headline, clinical use.
    """
    settings = settings_from(config or ctx.obj)
    db = open_db(settings)
    with db.session() as s:
        job = s.get(Job, job_id)
        if job is None:
            err.print(f"[red]no job with id {job_id}[/red]")
            raise typer.Exit(2)
        detail = job_detail(s, job)
    db.dispose()
    if as_json:
        sys.stdout.write(json.dumps(detail, default=str) + "\n")
        return
    _print_job(detail)


def _lifecycle_event(
    ctx: typer.Context, config: Path | None, job_id: int, event: str, refused: str, done: str
) -> None:
    """Apply ``event`` (retry, cancel) to one job through :mod:`node.jobs.state`, audited.

    A missing job, or one whose state does not allow ``event``, exits 2 with
    ``job ID cannot be <refused>: <why>``; otherwise ``job ID <done>`` is printed.
    """
    settings = settings_from(config or ctx.obj)
    db = open_db(settings)
    from node.jobs import state as lifecycle

    with db.session() as s:
        job = s.get(Job, job_id)
        if job is None or not lifecycle.allowed(job.state, event):
            what = "no such job" if job is None else f"it is {job.state}"
            err.print(f"[red]job {job_id} cannot be {refused}: {what}[/red]")
            raise typer.Exit(2)
        lifecycle.transition(s, job, event, actor=os_actor())
    db.dispose()
    out.print(f"job {job_id} {done}")


@jobs_app.command("retry")
def jobs_retry(
    ctx: typer.Context,
    job_id: Annotated[int, typer.Argument(metavar="ID")],
    config: ConfigOpt = None,
) -> None:
    """Queue a failed, dead or cancelled job again (finished stages are kept)."""
    _lifecycle_event(ctx, config, job_id, "retry", "retried", "queued again")


@jobs_app.command("cancel")
def jobs_cancel(
    ctx: typer.Context,
    job_id: Annotated[int, typer.Argument(metavar="ID")],
    config: ConfigOpt = None,
) -> None:
    """Cancel a queued or running job (a running stage finishes; no further stage starts)."""
    _lifecycle_event(ctx, config, job_id, "cancel", "cancelled", "cancelled")


def _pipelines(folder: Path) -> list[Any]:
    from node.pipelines import PipelineError, load_pipelines

    try:
        found = load_pipelines(folder)
    except PipelineError as exc:
        err.print(f"[red]pipeline error: {exc}[/red]")
        raise typer.Exit(2) from exc
    if not found:
        err.print(f"[red]no pipeline files (*.yaml) in {folder}[/red]")
        raise typer.Exit(2)
    return found


@pipelines_app.command("list")
def pipelines_list(pipelines: PipelinesOpt = PIPELINES_DIR, as_json: JsonOpt = False) -> None:
    """The pipelines, their trigger roles, stages and models."""
    rows = [
        {
            "name": p.name,
            "modality": p.modality,
            "required": ",".join(p.required),
            "optional": ",".join(p.optional),
            "stages": ",".join(p.stages),
            "segmentation_model": p.segmentation_model.name,
            "signatures": ",".join(folder.name for folder in p.signatures) or None,
            "priority": p.priority,
        }
        for p in _pipelines(pipelines)
    ]
    emit(rows, as_json, "Pipelines", list(rows[0]))


@pipelines_app.command("test")
def pipelines_test(
    study: Annotated[Path, typer.Argument(metavar="STUDY_DIR", help="A folder of DICOM files.")],
    pipelines: PipelinesOpt = PIPELINES_DIR,
    as_json: JsonOpt = False,
) -> None:
    """Dry run: which series play which role, would a job start, and why (not). Exit 1 if none."""
    from node.pipelines import SeriesInfo, decide
    from pipelines.io.dicom import scan

    if not study.is_dir():
        err.print(f"[red]{study}: not a folder[/red]")
        raise typer.Exit(2)
    found = scan(study)
    studies = found.studies()
    infos = {
        uid: [
            SeriesInfo(
                ref.series_instance_uid,
                ref.attributes,
                len(ref.files),
                stable=True,
                stable_at=datetime.min,
            )
            for ref in refs
        ]
        for uid, refs in studies.items()
    }
    descriptions = {ref.series_instance_uid: ref.description for ref in found.series}
    results: list[dict[str, Any]] = []
    for p in _pipelines(pipelines):
        for uid, series in infos.items():
            d = decide(p, series)
            results.append(
                {
                    "pipeline": d.pipeline,
                    "study_instance_uid": uid,
                    "start": d.start,
                    "reason": d.reason,
                    "roles": d.roles,
                    "series": {
                        s: {"role": why, "description": descriptions.get(s, "")}
                        for s, why in d.classified.items()
                    },
                }
            )
    if as_json:
        sys.stdout.write(json.dumps(results) + "\n")
    else:
        if not studies:
            out.print(f"no DICOM image series under {study}")
        for r in results:
            verdict = "[green]job would start[/green]" if r["start"] else "[yellow]no job[/yellow]"
            out.print(
                f"{r['pipeline']} / study {r['study_instance_uid']}: {verdict}: {r['reason']}"
            )
            for uid, s in r["series"].items():
                out.print(f"  {s['role']:<10} {s['description'] or '(no description)'}  {uid}")
        for path, why in found.skipped[:10]:
            out.print(f"  skipped {path.name}: {why}")
    if not any(r["start"] for r in results):
        raise typer.Exit(1)


@clinical_app.command("set")
def clinical_set(
    study_uid: Annotated[str, typer.Argument(metavar="STUDY_UID")],
    config: ConfigOpt = None,
    edema: Annotated[str | None, typer.Option(help="Peritumoral edema: yes/no.")] = None,
    metastasis: Annotated[str | None, typer.Option(help="Metastasis at diagnosis: yes/no.")] = None,
    grade: Annotated[int | None, typer.Option(min=1, max=3, help="Histological grade.")] = None,
    age: Annotated[int | None, typer.Option(min=0, max=120)] = None,
    sex: Annotated[Literal["M", "F"] | None, typer.Option(help="M or F.")] = None,
    before_arrival: Annotated[
        bool,
        typer.Option(
            "--before-arrival",
            help="Record the factors for a study the node has not received yet "
            "(its first job uses them).",
        ),
    ] = False,
) -> None:
    """Record clinical factors and re-score the study's latest job (new SR and PDF).

    The job is queued again from its score stage; segmentation and radiomics
    are kept. The new SR (nomogram) names the radiomics-only one as its
    predecessor. A study the node never received is refused (exit 2; a
    mistyped UID would keep factors no job ever reads) unless
    ``--before-arrival`` says the study is still to come.
    """
    from node.jobs import clinical_path, rescore
    from pipelines.scoring.clinical import ClinicalFactors

    try:
        given = ClinicalFactors.from_options(
            edema=edema, metastasis=metastasis, grade=grade, age=age, sex=sex
        )
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    facts = given.to_json()
    if not facts:
        err.print("[red]give at least one factor (--edema, --metastasis, --grade ...)[/red]")
        raise typer.Exit(2)
    settings = settings_from(config)
    try:
        path = clinical_path(settings, study_uid)
    except ValueError as exc:
        err.print(f"[red]{escape(str(exc))}[/red]")
        raise typer.Exit(2) from exc
    db = open_db(settings)
    with db.session() as s:
        held = s.scalar(select(Study.id).where(Study.study_instance_uid == study_uid))
    if held is None and not before_arrival:
        db.dispose()
        err.print(
            f"[red]the node holds no study {escape(study_uid)} (see `sarcnode studies`); "
            "give --before-arrival to record factors for a study still to come[/red]"
        )
        raise typer.Exit(2)
    stored = ClinicalFactors.from_json(json.loads(path.read_text())) if path.is_file() else None
    known = stored.updated(given) if stored else given
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(known.to_json(), indent=2))
    try:
        with db.session() as s:
            record(
                s,
                "clinical.set",
                actor=os_actor(),
                study_instance_uid=study_uid,
                detail={"factors": sorted(facts)},
            )
        job_id = rescore(db, study_uid, actor=os_actor())
    finally:
        db.dispose()
    out.print(f"clinical factors of {study_uid}: {known.words()}", soft_wrap=True)
    if job_id is None:
        out.print("no finished job for this study yet: the factors apply to its next job")
    else:
        out.print(f"job {job_id} queued again from its score stage")
