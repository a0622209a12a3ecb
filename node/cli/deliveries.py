"""The delivery outbox for admins: ``deliveries`` (list, retry, run) and ``deliver``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from sqlalchemy import func, select

from node.audit.trail import os_actor
from node.cli.common import (
    ConfigOpt,
    JsonOpt,
    StudyOpt,
    err,
    iso,
    list_rows,
    newest,
    open_db,
    out,
    settings_from,
)
from node.db.models import Delivery, DeliveryState

deliveries_app = typer.Typer(
    help="The delivery outbox: what was sent where, what is waiting, what is dead."
)


@deliveries_app.callback(invoke_without_command=True)
def deliveries(
    ctx: typer.Context,
    config: ConfigOpt = None,
    state: Annotated[
        DeliveryState | None, typer.Option(help="Only rows in this state (one of those shown).")
    ] = None,
    study: StudyOpt = None,
    limit: Annotated[int, typer.Option(min=1, help="Newest N rows.")] = 200,
    as_json: JsonOpt = False,
) -> None:
    """List outbox rows (one per result object and destination), newest last."""
    list_rows(
        ctx,
        config,
        lambda: newest(Delivery, limit, state=state, study=study),
        _delivery_row,
        as_json=as_json,
        title="Deliveries",
        columns=["id", "kind", "destination", "state", "attempts", "next_attempt_at", "last_error"],
    )


def _delivery_row(d: Delivery) -> dict[str, Any]:
    return {
        "id": d.id,
        "job_id": d.job_id,
        "kind": d.kind,
        "destination": d.destination,
        "state": d.state,
        "attempts": d.attempts,
        "next_attempt_at": iso(d.next_attempt_at),
        "delivered_at": iso(d.delivered_at),
        "last_error": d.last_error,
        "study_instance_uid": d.study_instance_uid,
        "sop_instance_uid": d.sop_instance_uid,
        "path": d.path,
    }


@deliveries_app.command("retry")
def deliveries_retry(
    ctx: typer.Context,
    ids: Annotated[list[int] | None, typer.Argument(metavar="[ID]...")] = None,
    all_dead: Annotated[bool, typer.Option("--all-dead", help="Every dead row.")] = False,
    config: ConfigOpt = None,
) -> None:
    """Make dead rows (or the given ones) due again now, with a fresh attempt count."""
    from node.delivery import retry

    if not ids and not all_dead:
        err.print("[red]give delivery ID(s) or --all-dead[/red]")
        raise typer.Exit(2)
    settings = settings_from(config or ctx.obj)
    db = open_db(settings)
    try:
        done = retry(db, ids or [], all_dead=all_dead, actor=os_actor())
    except (KeyError, ValueError) as exc:
        err.print(f"[red]{exc.args[0]}[/red]")
        raise typer.Exit(2) from exc
    finally:
        db.dispose()
    out.print(f"{len(done)} delivery(ies) due again: {', '.join(map(str, done)) or '-'}")


@deliveries_app.command("run")
def deliveries_run(
    ctx: typer.Context,
    config: ConfigOpt = None,
    wait: Annotated[
        float, typer.Option(help="Keep going until nothing is pending or N seconds passed.")
    ] = 0.0,
) -> None:
    """Send what is due now (``serve`` does this on every tick); exit 1 if any row is dead."""
    import time

    from node.delivery import deliver_due

    settings = settings_from(config or ctx.obj)
    db = open_db(settings)
    deadline = time.monotonic() + wait
    try:
        while True:
            for o in deliver_due(db, settings):
                line = f"delivery {o.delivery_id} -> {o.destination}: {o.state}"
                (out if o.ok else err).print(line + (f" ({o.error})" if o.error else ""))
            with db.session() as s:
                pending = s.scalar(
                    select(func.count()).select_from(Delivery).where(Delivery.state == "pending")
                )
                dead = s.scalar(
                    select(func.count()).select_from(Delivery).where(Delivery.state == "dead")
                )
            if not pending or time.monotonic() >= deadline:
                break
            time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
    finally:
        db.dispose()
    if dead:
        raise typer.Exit(1)


def deliver_cmd(
    files: Annotated[list[Path], typer.Argument(metavar="FILE...", help="DICOM result files.")],
    to: Annotated[list[str], typer.Option("--to", help="Destination name (repeatable).")],
    config: ConfigOpt = None,
) -> None:
    """Queue result files for destinations (the outbox sends them; see `deliveries run`).

    Creates the database when there is none yet: the outbox also serves
    results made without a node (``sarcnode analyze``).
    """
    from node.delivery import enqueue

    settings = settings_from(config)
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        err.print(f"[red]not found: {', '.join(missing)}[/red]")
        raise typer.Exit(2)
    db = open_db(settings, create=True)  # the outbox may be used without a node (after analyze)
    try:
        created = enqueue(db, [f.resolve() for f in files], to, settings=settings)
    except KeyError as exc:
        err.print(f"[red]{exc.args[0]}[/red]")
        raise typer.Exit(2) from exc
    finally:
        db.dispose()
    out.print(f"queued {len(created)} delivery(ies)")
