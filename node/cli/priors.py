"""``sarcnode priors STUDY_UID``: which prior studies a job saw, which it used, and why.

Read from the study's newest job that ran the ``compare`` stage (its
outputs, :func:`node.priors.compare_stage`) and the ``priors.*`` audit
events of the study. UIDs and dates only: no patient name or ID.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from rich.markup import escape
from sqlalchemy import select

from node.cli.common import ConfigOpt, JsonObjectOpt, err, open_db, out, settings_from
from node.db.models import AuditEvent, Job, JobStage


def prior_record(study_uid: str, stages: list[tuple[int, str, str | None]]) -> dict[str, Any]:
    """The answer for a study from (job id, stage state, outputs JSON) of its compare stages."""
    for job_id, state, outputs in stages:
        if outputs:
            head: dict[str, Any] = {"study_instance_uid": study_uid, "job": job_id}
            return head | {"stage_state": state} | dict(json.loads(outputs))
    return {
        "study_instance_uid": study_uid,
        "job": None,
        "status": "not compared",
        "reason": "no job of this study has run the compare stage",
    }


def priors_cmd(
    ctx: typer.Context,
    study_uid: Annotated[str, typer.Argument(metavar="STUDY_UID")],
    config: ConfigOpt = None,
    as_json: JsonObjectOpt = False,
) -> None:
    """What the compare stage found for a study: earlier studies, the one used, and why.

    ``--json`` prints one object: ``status`` (compared, no prior, no
    comparison, not compared), ``reason``, ``found`` (each earlier study:
    source, UID, date, roles, verdict), ``prior`` and ``headline`` when
    compared, and ``audit`` (the study's ``priors.*`` events).
    """
    settings = settings_from(config or ctx.obj)
    db = open_db(settings)
    with db.session() as s:
        rows = s.execute(
            select(Job.id, JobStage.state, JobStage.outputs)
            .join(JobStage, JobStage.job_id == Job.id)
            .where(Job.study_instance_uid == study_uid, JobStage.stage == "compare")
            .order_by(Job.id.desc())
        ).all()
        record = prior_record(study_uid, [(r[0], r[1], r[2]) for r in rows])
        events = s.scalars(
            select(AuditEvent)
            .where(AuditEvent.study_instance_uid == study_uid, AuditEvent.action.like("priors.%"))
            .order_by(AuditEvent.seq)
        ).all()
        record["audit"] = [
            {"ts": e.ts.isoformat(), "action": e.action, "outcome": e.outcome} for e in events
        ]
    if as_json:
        print(json.dumps(record, indent=2, default=str))
        return
    if record["job"] is None:
        err.print(f"study {escape(study_uid)}: {record['reason']}")
        raise typer.Exit(1)
    out.print(f"study {escape(study_uid)}, job {record['job']}: {escape(str(record['status']))}")
    out.print(f"  {escape(str(record.get('headline') or record.get('reason')))}", soft_wrap=True)
    for found in record.get("found", []):
        out.print(
            f"  found {found['study_date']} {escape(found['study_instance_uid'])} on "
            f"{escape(found['source'])}: roles {', '.join(found['roles']) or 'none'} -> "
            f"{escape(found['verdict'])}",
            soft_wrap=True,
        )
    for event in record["audit"]:
        out.print(f"  audit {event['ts']} {event['action']} ({event['outcome']})")
