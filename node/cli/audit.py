"""Admin commands on the audit trail: list, verify, acknowledge a break, rotate the key."""

from __future__ import annotations

import json
import os
import sys
from typing import Annotated, Any

import typer
from rich.markup import escape
from sqlalchemy import select

from node.audit.context import AuditConfig
from node.audit.keys import ENV_KEY, AuditKeyError, add_key
from node.audit.trail import (
    ALG_LEGACY,
    AuditBreakError,
    VerifyResult,
    acknowledge_break,
    os_actor,
    record,
    verify,
)
from node.cli.common import (
    ConfigOpt,
    JsonObjectOpt,
    JsonOpt,
    StudyOpt,
    err,
    iso,
    list_rows,
    open_db,
    out,
    parse_since,
    settings_from,
)
from node.db.models import AuditEvent

audit_app = typer.Typer(
    help="The audit trail: list events, verify the keyed chain and its anchor, rotate the key."
)


@audit_app.callback(invoke_without_command=True)
def audit(
    ctx: typer.Context,
    config: ConfigOpt = None,
    since: Annotated[
        str | None, typer.Option(help="Only events after this: 30m, 2h, 7d or an ISO time.")
    ] = None,
    action: Annotated[str | None, typer.Option(help="Only this action (prefix match).")] = None,
    study: StudyOpt = None,
    limit: Annotated[int, typer.Option(min=1, help="Newest N events.")] = 200,
    as_json: JsonOpt = False,
) -> None:
    """List audit events, newest last."""

    def query() -> Any:
        q = select(AuditEvent).order_by(AuditEvent.seq.desc()).limit(limit)
        if since:
            q = q.where(AuditEvent.ts >= parse_since(since))
        if action:
            q = q.where(AuditEvent.action.startswith(action))
        if study:
            q = q.where(AuditEvent.study_instance_uid == study)
        return q

    list_rows(
        ctx,
        config,
        query,
        _event_row,
        as_json=as_json,
        title="Audit trail",
        columns=["seq", "ts", "actor", "action", "outcome", "series_instance_uid", "detail"],
    )


def _event_row(e: AuditEvent) -> dict[str, Any]:
    return {
        "seq": e.seq,
        "ts": iso(e.ts),
        "actor": e.actor,
        "actor_ip": e.actor_ip,
        "action": e.action,
        "outcome": e.outcome,
        "study_instance_uid": e.study_instance_uid,
        "series_instance_uid": e.series_instance_uid,
        "sop_instance_uid": e.sop_instance_uid,
        "detail": json.loads(e.detail),
    }


def _print_verify(result: VerifyResult) -> None:
    """What ``audit verify`` saw, for a person: segments by key, anchor, acknowledged breaks.

    One line each (never wrapped), so that they can be grepped and shipped.
    """
    lines = []
    for seg in result.segments:
        span = f"seq {seg.first_seq}" + (f"-{seg.last_seq}" if seg.last_seq > seg.first_seq else "")
        if seg.hash_alg == ALG_LEGACY:
            lines.append(
                f"  {span}: plain SHA-256 (legacy, written before audit keys: they show no "
                "edit, but cannot prove a database writer did not re-hash them)"
            )
        else:
            current = " (signs new events)" if result.keys and seg.key_id == result.keys[-1] else ""
            lines.append(f"  {span}: {seg.hash_alg}, key {seg.key_id}{current}")
    if result.anchor is not None:
        lines.append(
            f"  anchor {escape(str(result.anchor_path))}: seq {result.anchor.seq} "
            f"(written {result.anchor.written_at}); {result.beyond_anchor} event(s) after it"
        )
    elif result.anchor_path:
        lines.append(f"  anchor {escape(result.anchor_path)}: none")
    for ack in result.acknowledged:
        lines.append(
            f"  [yellow]acknowledged break[/yellow] at seq {ack['seq']} ({ack['ts']}, "
            f"{escape(str(ack['actor']))}; {', '.join(ack['findings'])}): "
            f"{escape(str(ack['reason']))}"
        )
    for line in lines:
        out.print(line, soft_wrap=True)


@audit_app.command("verify")
def audit_verify(
    ctx: typer.Context, config: ConfigOpt = None, as_json: JsonObjectOpt = False
) -> None:
    """Check the chain against the audit keys and the anchor; exit 1 naming every finding.

    Findings: rehashed (HMAC mismatch), forged (bad HMAC beyond the anchor, or a
    plain event after keyed ones), edited (legacy event), link, gap (deleted or
    renumbered), truncated (shorter than the anchor), wiped, anchor (missing or
    untrustworthy), unverifiable (a key that is not configured).
    """
    settings = settings_from(config or ctx.obj)
    db = open_db(settings)
    with db.session() as s:
        result = verify(s)
    try:
        with db.session() as s:
            if result.ok:
                record(s, "audit.verified", actor=os_actor(), detail={"events": result.checked})
            else:
                record(
                    s,
                    "audit.verify_failed",
                    actor=os_actor(),
                    outcome="failed",
                    detail={
                        "findings": [f.as_dict() for f in result.findings[:10]],
                        "count": len(result.findings) + result.more_findings,
                    },
                )
        recorded = ""
    except (AuditBreakError, AuditKeyError) as exc:
        recorded = f"(this verification is not recorded in the trail: {exc})"
    db.dispose()
    if as_json:
        sys.stdout.write(json.dumps(result.as_dict(), default=str) + "\n")
    elif result.ok:
        out.print(f"audit chain intact: {result.checked} events verified")
        _print_verify(result)
    else:
        total = len(result.findings) + result.more_findings
        err.print(
            f"[red]audit chain BROKEN[/red]: {total} finding(s), {result.checked} events checked"
        )
        for f in result.findings:
            where = f"seq {f.seq}" if f.seq is not None else "chain"
            err.print(f"  \\[{f.kind}] {where}: {escape(f.message)}")
        if result.more_findings:
            err.print(f"  ... and {result.more_findings} more")
        _print_verify(result)
    if recorded:
        err.print(escape(recorded))
    if not result.ok:
        raise typer.Exit(1)


@audit_app.command("acknowledge-break")
def audit_acknowledge_break(
    ctx: typer.Context,
    reason: Annotated[
        str, typer.Option("--reason", help="Why the break is understood (kept in the trail).")
    ],
    config: ConfigOpt = None,
) -> None:
    """Continue after a chain break (truncated, wiped, anchor lost): audited, listed by verify.

    The event names the reason, the findings and what the anchor said, and the
    anchor moves to it, so the node appends again from the database's newest
    event. Events that were deleted stay lost; edited events stay findings.
    """
    settings = settings_from(config or ctx.obj)
    db = open_db(settings)
    try:
        with db.session() as s:
            seq, findings = acknowledge_break(s, reason, actor=os_actor())
    except ValueError as exc:
        err.print(f"[red]{escape(str(exc))}[/red]")
        raise typer.Exit(2) from exc
    finally:
        db.dispose()
    if not findings:
        out.print("no break to acknowledge: the chain's head agrees with its anchor")
        return
    out.print(f"break acknowledged as audit event seq {seq}; the chain continues from it:")
    for f in findings:
        out.print(f"  \\[{f.kind}] {escape(f.message)}")


@audit_app.command("rotate-key")
def audit_rotate_key(ctx: typer.Context, config: ConfigOpt = None) -> None:
    """Add a new audit key to the key file: it signs from now on, old keys still verify.

    Restart ``serve`` afterwards so it signs with the new key. With
    ``$SARCNODE_AUDIT_KEY`` the keys are not in a file: append the new key to
    the variable instead (``openssl rand -hex 32``), keeping the old ones.
    """
    settings = settings_from(config or ctx.obj)
    if os.environ.get(ENV_KEY, "").strip():
        err.print(
            f"audit keys come from ${ENV_KEY}: append a new key at its end (e.g. "
            "`openssl rand -hex 32`, comma-separated), keep the old ones, restart the node"
        )
        raise typer.Exit(2)
    db = open_db(settings)
    assert db.audit is not None
    old = db.audit.keyring
    new = add_key(AuditConfig.from_settings(settings).key_file)
    db.audit.reload()
    with db.session() as s:
        record(
            s,
            "audit.key_rotated",
            actor=os_actor(),
            detail={"old_key_id": old.current.key_id, "new_key_id": new.key_id},
        )
    db.dispose()
    out.print(
        f"new audit key {new.key_id} signs from now on (old: {', '.join(old.key_ids)}, kept "
        "to verify older events); restart `sarcnode serve` so it uses the new key"
    )
