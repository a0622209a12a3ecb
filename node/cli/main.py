"""The ``sarcnode`` command: run the node and answer the admin's questions.

``--json`` follows one rule, and each command's help says which it prints:
a command that lists rows (``studies``, ``jobs``, ``audit`` ...) prints one
JSON array, even of one row or none; a command about one thing (``status``,
``jobs show``, ``audit verify``, ``config show``) prints one JSON object.
Tables print every character of a UID: on a terminal a long cell folds onto
the next line, anywhere else (a pipe, a file) each row stays on one line.

``--config`` goes before the command (``sarcnode --config node.yaml jobs``)
or after it; the one nearest the command wins. Commands that read the node's
database refuse to run when it does not exist (only ``serve`` and
``deliver`` create one), so a wrong config is an error, not an empty answer.
They read the database directly, so they work while ``serve`` runs (SQLite
in WAL mode, or PostgreSQL). Exit codes: 0 ok, 1 the answer is "no" (broken
audit chain, failed echo, node down), 2 bad usage, config or value.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, Literal

import typer
from rich.console import Console
from rich.markup import escape
from rich.measure import Measurement
from rich.table import Table
from sqlalchemy import func, inspect, or_, select
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError

from node import __version__
from node.audit.context import AuditConfig, AuditContext
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
from node.config import (
    ConfigError,
    Settings,
    load_settings,
    resolve_config_path,
    security_warnings,
)
from node.db.models import (
    DELIVERY_STATES,
    JOB_STATES,
    Association,
    AuditEvent,
    Delivery,
    DeliveryState,
    Instance,
    Job,
    JobState,
    Series,
    Study,
)
from node.db.session import Database, make_engine
from pipelines.share import config_dir, models_dir

app = typer.Typer(
    name="sarcnode",
    help="sarcnode: DICOM node for sarcoma-MRI AI. Not for clinical use with demo models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
audit_app = typer.Typer(
    help="The audit trail: list events, verify the keyed chain and its anchor, rotate the key."
)
config_app = typer.Typer(help="Check or show the node configuration.", no_args_is_help=True)
synth_app = typer.Typer(
    help="Synthetic sarcoma MRI (paired T1 / FS-T2 DICOM + truth masks). Not patient data.",
    no_args_is_help=True,
)
app.add_typer(audit_app, name="audit")
app.add_typer(synth_app, name="synth")
app.add_typer(config_app, name="config")
deliveries_app = typer.Typer(
    help="The delivery outbox: what was sent where, what is waiting, what is dead."
)
app.add_typer(deliveries_app, name="deliveries")
jobs_app = typer.Typer(help="Pipeline jobs: list, show one, retry, cancel.")
app.add_typer(jobs_app, name="jobs")
pipelines_app = typer.Typer(
    help="Pipeline definitions (config/pipelines): list them, dry-run one on a study folder.",
    no_args_is_help=True,
)
app.add_typer(pipelines_app, name="pipelines")
PIPELINES_DIR = config_dir() / "pipelines"
PipelinesOpt = Annotated[
    Path,
    typer.Option("--pipelines", envvar="SARCNODE_PIPELINES", help="Folder of pipeline YAML files."),
]

out = Console()
err = Console(stderr=True, soft_wrap=True)  # messages stay on one line for grep and tests


def _typed(ctx: Any, name: str) -> bool:
    """Whether the parameter ``name`` of ``ctx`` was typed on the command line."""
    source = ctx.get_parameter_source(name)
    return source is not None and source.name == "COMMANDLINE"


def _nearest_config(ctx: typer.Context, value: Path | None) -> Path | None:
    """``--config`` of a command: the one typed nearest the command, else ``$SARCNODE_CONFIG``.

    Typed after the command it wins; else one typed before it, on a group
    (``sarcnode jobs --config X show 1``) or on ``sarcnode`` itself
    (``sarcnode --config X jobs``); else the environment's (``value``).
    """
    if value is not None and _typed(ctx, "config"):
        return value
    outer: Any = ctx.parent  # typer's vendored click context (no public type)
    while outer is not None:
        given = outer.params.get("config")
        if given is not None and _typed(outer, "config"):
            return Path(given)
        outer = outer.parent
    return value


ConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--config",
        "-c",
        envvar="SARCNODE_CONFIG",
        callback=_nearest_config,
        help="YAML config file (default: embedded); may also come before the command.",
    ),
]
JsonOpt = Annotated[
    bool, typer.Option("--json", help="Print the rows as one JSON array on stdout.")
]
JsonObjectOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")]


def _settings(config: Path | None) -> Settings:
    """Load the settings from ``config`` (None: embedded defaults); exit 2 listing bad fields."""
    try:
        return load_settings(config)
    except ConfigError as exc:
        err.print(f"[red]config error[/red] in {exc.source}:")
        for problem in exc.problems:
            err.print(f"  - {problem}")
        raise typer.Exit(2) from exc


def _no_database(settings: Settings) -> tuple[str, int] | None:
    """Why the node's database cannot be read, and the exit code (None: it can).

    Exit 2 when there is no node database where the config says (a wrong or
    missing config), 1 when a PostgreSQL server does not answer.
    """
    url = make_url(settings.database_url)
    if url.get_backend_name() == "sqlite":
        path = Path(url.database or "")
        if url.database in (None, "", ":memory:") or path.is_file():
            return None
        return (
            f"no node database at {path} (storage.root {settings.storage.root.resolve()}): "
            "give the node's config (--config or $SARCNODE_CONFIG, or "
            "$SARCNODE_STORAGE__ROOT); `sarcnode serve` creates the database",
            2,
        )
    engine = make_engine(settings.database_url)
    try:
        with engine.connect() as conn:
            has_schema = inspect(conn).has_table("alembic_version")
    except OperationalError as exc:
        first = str(exc.orig or exc).strip().splitlines()[0]
        return f"cannot reach the database {_mask(settings.database_url)}: {first}", 1
    finally:
        engine.dispose()
    if has_schema:
        return None
    return (
        f"no node database at {_mask(settings.database_url)} (it has no sarcnode tables): "
        "give the node's config; `sarcnode serve` creates them",
        2,
    )


def _db(settings: Settings, *, create: bool = False) -> Database:
    """The node's database; exit 2 naming where it was looked for, unless ``create``."""
    if not create:
        problem = _no_database(settings)
        if problem is not None:
            err.print(f"[red]{escape(problem[0])}[/red]")
            raise typer.Exit(problem[1])
    return Database(
        settings.database_url,
        echo=settings.database.echo,
        audit=AuditContext.from_settings(settings),
    )


def _iso(value: datetime | None) -> str | None:
    return value.replace(tzinfo=UTC).isoformat().replace("+00:00", "Z") if value else None


def _print_table(table: Table) -> None:
    """Print a table without cutting a cell short.

    Every column folds (``overflow="fold"``), so on a terminal a long UID
    goes on over the next line rather than ending in "…"; printed to a pipe
    or a file, the table is as wide as its widest row, one line per row.
    """
    for column in table.columns:
        column.overflow = "fold"
    if out.is_terminal:
        out.print(table)
        return
    needed = Measurement.get(out, out.options.update_width(1_000_000), table).maximum
    Console(width=max(needed, out.width), soft_wrap=False).print(table)


def _emit(rows: list[dict[str, Any]], as_json: bool, title: str, columns: list[str]) -> None:
    """``rows`` as one JSON array (``--json``), or a table of ``columns``."""
    if as_json:
        sys.stdout.write(json.dumps(rows, default=str) + "\n")
        return
    table = Table(title=title)
    for col in columns:
        table.add_column(col)
    for row in rows:
        table.add_row(*("" if row.get(c) is None else escape(str(row.get(c))) for c in columns))
    _print_table(table)


def _newest(
    model: type[Job] | type[Delivery], limit: int, *, state: str | None, study: str | None
) -> Any:
    """The newest ``limit`` rows of jobs or deliveries, optionally of one state and study."""
    q = select(model).order_by(model.id.desc()).limit(limit)
    if state:
        q = q.where(model.state == state)
    if study:
        q = q.where(model.study_instance_uid == study)
    return q


_REL_RE = re.compile(r"^(\d+)\s*([smhd])$")


def parse_since(value: str) -> datetime:
    """``30m``, ``2h``, ``7d`` (ago) or an ISO date/time (UTC) to naive UTC."""
    m = _REL_RE.match(value.strip())
    if m:
        unit = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}[m[2]]
        return datetime.now(UTC).replace(tzinfo=None) - timedelta(**{unit: int(m[1])})
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError as exc:
        raise typer.BadParameter(f"{value!r}: use e.g. 30m, 2h, 7d or 2026-11-23T10:00") from exc
    if parsed.tzinfo is not None:
        parsed = parsed.astimezone(UTC).replace(tzinfo=None)
    return parsed


def _print_version(value: bool) -> None:
    """``--version``: print ``sarcnode X.Y.Z`` and stop before any command runs."""
    if value:
        out.print(f"sarcnode {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            "-c",
            envvar="SARCNODE_CONFIG",
            help="YAML config file for the command that follows (one given after it wins).",
        ),
    ] = None,
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_print_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """sarcnode: DICOM node for sarcoma-MRI AI. Not for clinical use with demo models.

    ``--config`` here applies to the command that follows (which may take
    its own ``--config`` too: the one after the command wins).
    """


@app.command()
def serve(config: ConfigOpt = None) -> None:
    """Run the node: Storage SCP, storage, audit, scheduler tick (until SIGTERM)."""
    from node.logs import setup_logging
    from node.pipelines import PipelineError
    from node.service import Node

    settings = _settings(config)
    setup_logging(settings.logging.level, settings.logging.file)
    for warning in security_warnings(settings):
        logging.getLogger("node.config").warning("%s", warning)
    try:
        node = Node(settings)
    except PipelineError as exc:
        err.print(f"[red]pipeline error: {exc}[/red]")
        raise typer.Exit(2) from exc
    except (AuditBreakError, AuditKeyError) as exc:
        err.print(f"[red]refusing to start:[/red] {escape(str(exc))}")
        raise typer.Exit(1) from exc
    node.run_forever()


def _device(wanted: str) -> str:
    """The device jobs run on: what ``jobs.device`` asks and what this machine has."""
    try:
        import torch
    except ImportError:
        return "cpu (torch not installed)"
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        return f"cuda ({name}, {torch.cuda.device_count()} GPU)" if wanted != "cpu" else "cpu"
    return "cpu" + (" (no CUDA device visible)" if wanted == "cuda" else "")


def _by_state(counts: dict[str, int], order: tuple[str, ...]) -> str:
    """``{'done': 2, 'queued': 1}`` as ``1 queued, 2 done`` (states in lifecycle order)."""
    states = [s for s in order if counts.get(s)] + sorted(set(counts) - set(order))
    return ", ".join(f"{counts[s]} {s}" for s in states) or "none"


def status_lines(info: dict[str, Any]) -> list[tuple[str, str]]:
    """``status`` for a person: one labelled line per topic, no raw dict or None."""
    if info["pid"] is None:
        process = "no heartbeat (serve not running with this config)"
    else:
        process = f"pid {info['pid']}, heartbeat {info['heartbeat_at'] or 'unknown'}"
    if info["disk_free_mb"] is None:
        disk = f"{info['storage_root']} (does not exist)"
    else:
        disk = (
            f"{info['storage_root']}: {info['disk_free_mb']} MB free "
            f"(refuses instances below {info['disk_floor_mb']} MB)"
        )
    running = ", ".join(f"job {j.replace(':', ' at ', 1)}" for j in info["jobs_running"])
    return [
        ("node", f"{'UP' if info['scp_up'] else 'DOWN'}: {info['scp']}"),
        ("AE title", f"{info['ae_title']} on port {info['port']}"),
        ("process", process),
        ("database", str(info["database"])),
        ("storage", disk),
        ("device", str(info["device"])),
        (
            "received",
            f"{info['studies']} studies, {info['series']} series "
            f"({info['series_receiving']} receiving, {info['series_stable']} stable), "
            f"{info['instances']} instances; last "
            f"{info['last_received_at'] or 'never'}",
        ),
        ("associations", f"{info['associations_open']} open"),
        (
            "jobs",
            _by_state(info["jobs"], JOB_STATES) + (f" ({running})" if running else ""),
        ),
        ("deliveries", _by_state(info["deliveries"], DELIVERY_STATES)),
    ]


@app.command()
def status(config: ConfigOpt = None, as_json: JsonObjectOpt = False) -> None:
    """Is the node up, what does it hold, how much disk is left; exit 1 if the SCP is down.

    ``--json`` prints one object: ``scp_up``, ``scp``, ``ae_title``, ``port``,
    ``pid``, ``heartbeat_at``, ``database``, ``storage_root``,
    ``disk_free_mb``, ``disk_floor_mb``, ``device``, the counts, ``jobs`` and
    ``deliveries`` (state -> count), ``jobs_running`` (``id:stage``) and
    ``last_received_at``.
    """
    from node.dicom.echo import echo
    from node.service import heartbeat_path

    settings = _settings(config)
    db = _db(settings)
    hb_file = heartbeat_path(settings)
    heartbeat: dict[str, Any] = {}
    if hb_file.is_file():
        try:
            heartbeat = json.loads(hb_file.read_text())
        except (OSError, ValueError):
            heartbeat = {}
    scp_up = False
    scp_detail = "not running (no heartbeat)"
    if heartbeat and not settings.dicom.tls.enabled:
        wildcard = settings.dicom.bind in ("0.0.0.0", "::")  # noqa: S104 - reading, not binding
        host = "127.0.0.1" if wildcard else settings.dicom.bind
        res = echo(
            host,
            settings.dicom.port,
            settings.dicom.ae_title,
            calling_ae="SARCNODE-CLI",
            timeout_s=5,
        )
        scp_up, scp_detail = res.ok, res.detail
        if res.rejected:  # it answered: up, and refusing an AE it was not told about
            scp_up = True
            scp_detail = "up (refused C-ECHO from SARCNODE-CLI: not in dicom.allowed_calling_aes)"
    elif heartbeat:
        try:
            os.kill(int(heartbeat["pid"]), 0)
            scp_up, scp_detail = True, "process alive (TLS: C-ECHO not attempted)"
        except (OSError, KeyError, ValueError):
            scp_detail = "heartbeat file present but process is gone"
    with db.session() as s:
        counts = {
            "studies": s.scalar(select(func.count()).select_from(Study)),
            "series": s.scalar(select(func.count()).select_from(Series)),
            "instances": s.scalar(select(func.count()).select_from(Instance)),
            "series_receiving": s.scalar(
                select(func.count()).select_from(Series).where(Series.state == "receiving")
            ),
            "series_stable": s.scalar(
                select(func.count()).select_from(Series).where(Series.state == "stable")
            ),
            "associations_open": s.scalar(
                select(func.count()).select_from(Association).where(Association.state == "open")
            ),
            "jobs": dict(s.execute(select(Job.state, func.count()).group_by(Job.state)).all()),
            "jobs_running": [
                f"{j.id}:{j.stage}" for j in s.scalars(select(Job).where(Job.state == "running"))
            ],
            "deliveries": dict(
                s.execute(select(Delivery.state, func.count()).group_by(Delivery.state)).all()
            ),
            "last_received_at": _iso(s.scalar(select(func.max(Instance.received_at)))),
        }
    usage = shutil.disk_usage(settings.storage.root) if settings.storage.root.exists() else None
    info = {
        "scp_up": scp_up,
        "scp": scp_detail,
        "ae_title": settings.dicom.ae_title,
        "port": settings.dicom.port,
        "pid": heartbeat.get("pid"),
        "heartbeat_at": heartbeat.get("heartbeat_at"),
        "database": db.safe_url(),
        "storage_root": str(settings.storage.root.resolve()),
        "disk_free_mb": round(usage.free / 2**20) if usage else None,
        "disk_floor_mb": settings.storage.min_free_mb,
        "device": _device(settings.jobs.device),
        **counts,
    }
    db.dispose()
    if as_json:
        sys.stdout.write(json.dumps(info, default=str) + "\n")
    else:
        table = Table(title="sarcnode status", show_header=False)
        for label, text in status_lines(info):
            table.add_row(label, escape(text))
        _print_table(table)
    raise typer.Exit(0 if scp_up else 1)


@app.command()
def studies(config: ConfigOpt = None, as_json: JsonOpt = False) -> None:
    """List received studies with series and instance counts."""
    settings = _settings(config)
    db = _db(settings)
    with db.session() as s:
        q = (
            select(
                Study,
                func.count(func.distinct(Series.id)),
                func.coalesce(func.sum(Series.instance_count), 0),
            )
            .join(Series, Series.study_id == Study.id, isouter=True)
            .group_by(Study.id)
            .order_by(Study.last_received_at.desc())
        )
        rows = [
            {
                "study_instance_uid": st.study_instance_uid,
                "patient_id": st.patient_id,
                "patient_name": st.patient_name,
                "study_date": st.study_date,
                "accession_number": st.accession_number,
                "study_description": st.study_description,
                "series": n_series,
                "instances": int(n_inst),
                "first_received_at": _iso(st.first_received_at),
                "last_received_at": _iso(st.last_received_at),
            }
            for st, n_series, n_inst in s.execute(q).all()
        ]
    db.dispose()
    _emit(
        rows,
        as_json,
        "Studies",
        [
            "study_instance_uid",
            "patient_id",
            "study_date",
            "study_description",
            "series",
            "instances",
            "last_received_at",
        ],
    )


@app.command()
def series(
    config: ConfigOpt = None,
    study: Annotated[str | None, typer.Option("--study", help="Study Instance UID.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """List series with counts, arrival times and stability."""
    settings = _settings(config)
    db = _db(settings)
    with db.session() as s:
        q = select(Series, Study.study_instance_uid).join(Study).order_by(Series.first_received_at)
        if study:
            q = q.where(Study.study_instance_uid == study)
        rows = [
            {
                "series_instance_uid": se.series_instance_uid,
                "study_instance_uid": study_uid,
                "modality": se.modality,
                "series_number": se.series_number,
                "series_description": se.series_description,
                "instances": se.instance_count,
                "duplicates": se.duplicate_count,
                "state": se.state,
                "reopened": se.reopened_count,
                "first_received_at": _iso(se.first_received_at),
                "last_received_at": _iso(se.last_received_at),
                "stable_at": _iso(se.stable_at),
            }
            for se, study_uid in s.execute(q).all()
        ]
    db.dispose()
    _emit(
        rows,
        as_json,
        "Series",
        [
            "series_instance_uid",
            "modality",
            "series_description",
            "instances",
            "duplicates",
            "state",
            "reopened",
            "last_received_at",
        ],
    )


@app.command()
def instances(
    config: ConfigOpt = None,
    series_uid: Annotated[str | None, typer.Option("--series", help="Series Instance UID.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """List stored instances (file path, transfer syntax, size, checksum).

    ``conflicts`` counts re-sends of the SOP Instance UID with other content
    (the first copy kept); ``conflict_sha256`` lists what each re-send held.
    """
    settings = _settings(config)
    db = _db(settings)
    with db.session() as s:
        q = (
            select(Instance, Series.series_instance_uid)
            .join(Series)
            .order_by(Series.id, Instance.instance_number, Instance.id)
        )
        if series_uid:
            q = q.where(Series.series_instance_uid == series_uid)
        conflicts: dict[str, list[str]] = {}
        for uid, detail in s.execute(
            select(AuditEvent.sop_instance_uid, AuditEvent.detail)
            .where(AuditEvent.action == "instance.duplicate_conflict")
            .order_by(AuditEvent.seq)
        ):
            received = json.loads(detail or "{}").get("received_sha256")
            conflicts.setdefault(str(uid), []).append(str(received))
        rows = [
            {
                "sop_instance_uid": i.sop_instance_uid,
                "series_instance_uid": se_uid,
                "sop_class_uid": i.sop_class_uid,
                "instance_number": i.instance_number,
                "transfer_syntax_uid": i.transfer_syntax_uid,
                "path": i.path,
                "size_bytes": i.size_bytes,
                "sha256": i.sha256,
                "duplicates": i.duplicate_count,
                "conflicts": len(conflicts.get(i.sop_instance_uid, [])),
                "conflict_sha256": conflicts.get(i.sop_instance_uid, []),
                "received_at": _iso(i.received_at),
            }
            for i, se_uid in s.execute(q).all()
        ]
    db.dispose()
    _emit(
        rows,
        as_json,
        "Instances",
        [
            "sop_instance_uid",
            "instance_number",
            "transfer_syntax_uid",
            "size_bytes",
            "conflicts",
            "received_at",
        ],
    )


@app.command()
def associations(
    config: ConfigOpt = None,
    limit: Annotated[int, typer.Option(min=1, help="Newest N.")] = 50,
    as_json: JsonOpt = False,
) -> None:
    """List inbound associations: who, accepted or why rejected, what they brought."""
    settings = _settings(config)
    db = _db(settings)
    with db.session() as s:
        rows = [
            {
                "id": a.id,
                "calling_ae": a.calling_ae,
                "called_ae": a.called_ae,
                "peer": f"{a.peer_ip}:{a.peer_port}",
                "tls": a.tls,
                "tls_peer": a.tls_peer,
                "state": a.state,
                "reason": a.reason,
                "stored": a.instances_stored,
                "duplicates": a.duplicates,
                "failures": a.failures,
                "started_at": _iso(a.started_at),
                "ended_at": _iso(a.ended_at),
            }
            for a in s.scalars(select(Association).order_by(Association.id.desc()).limit(limit))
        ]
    db.dispose()
    _emit(
        rows,
        as_json,
        "Associations",
        [
            "id",
            "calling_ae",
            "peer",
            "tls",
            "state",
            "reason",
            "stored",
            "duplicates",
            "failures",
            "started_at",
        ],
    )


@audit_app.callback(invoke_without_command=True)
def audit(
    ctx: typer.Context,
    config: ConfigOpt = None,
    since: Annotated[
        str | None, typer.Option(help="Only events after this: 30m, 2h, 7d or an ISO time.")
    ] = None,
    action: Annotated[str | None, typer.Option(help="Only this action (prefix match).")] = None,
    study: Annotated[str | None, typer.Option("--study", help="Study Instance UID.")] = None,
    limit: Annotated[int, typer.Option(min=1, help="Newest N events.")] = 200,
    as_json: JsonOpt = False,
) -> None:
    """List audit events, newest last."""
    if ctx.invoked_subcommand is not None:
        ctx.obj = config
        return
    settings = _settings(config)
    db = _db(settings)
    with db.session() as s:
        q = select(AuditEvent).order_by(AuditEvent.seq.desc()).limit(limit)
        if since:
            q = q.where(AuditEvent.ts >= parse_since(since))
        if action:
            q = q.where(AuditEvent.action.startswith(action))
        if study:
            q = q.where(AuditEvent.study_instance_uid == study)
        rows = [
            {
                "seq": e.seq,
                "ts": _iso(e.ts),
                "actor": e.actor,
                "actor_ip": e.actor_ip,
                "action": e.action,
                "outcome": e.outcome,
                "study_instance_uid": e.study_instance_uid,
                "series_instance_uid": e.series_instance_uid,
                "sop_instance_uid": e.sop_instance_uid,
                "detail": json.loads(e.detail),
            }
            for e in reversed(s.scalars(q).all())
        ]
    db.dispose()
    _emit(
        rows,
        as_json,
        "Audit trail",
        ["seq", "ts", "actor", "action", "outcome", "series_instance_uid", "detail"],
    )


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
    settings = _settings(config or ctx.obj)
    db = _db(settings)
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
    settings = _settings(config or ctx.obj)
    db = _db(settings)
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
    settings = _settings(config or ctx.obj)
    if os.environ.get(ENV_KEY, "").strip():
        err.print(
            f"audit keys come from ${ENV_KEY}: append a new key at its end (e.g. "
            "`openssl rand -hex 32`, comma-separated), keep the old ones, restart the node"
        )
        raise typer.Exit(2)
    db = _db(settings)
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


@deliveries_app.callback(invoke_without_command=True)
def deliveries(
    ctx: typer.Context,
    config: ConfigOpt = None,
    state: Annotated[
        DeliveryState | None, typer.Option(help="Only rows in this state (one of those shown).")
    ] = None,
    study: Annotated[str | None, typer.Option("--study", help="Study Instance UID.")] = None,
    limit: Annotated[int, typer.Option(min=1, help="Newest N rows.")] = 200,
    as_json: JsonOpt = False,
) -> None:
    """List outbox rows (one per result object and destination), newest last."""
    if ctx.invoked_subcommand is not None:
        ctx.obj = config
        return
    settings = _settings(config)
    db = _db(settings)
    with db.session() as s:
        q = _newest(Delivery, limit, state=state, study=study)
        rows = [
            {
                "id": d.id,
                "job_id": d.job_id,
                "kind": d.kind,
                "destination": d.destination,
                "state": d.state,
                "attempts": d.attempts,
                "next_attempt_at": _iso(d.next_attempt_at),
                "delivered_at": _iso(d.delivered_at),
                "last_error": d.last_error,
                "study_instance_uid": d.study_instance_uid,
                "sop_instance_uid": d.sop_instance_uid,
                "path": d.path,
            }
            for d in reversed(s.scalars(q).all())
        ]
    db.dispose()
    _emit(
        rows,
        as_json,
        "Deliveries",
        ["id", "kind", "destination", "state", "attempts", "next_attempt_at", "last_error"],
    )


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
    settings = _settings(config or ctx.obj)
    db = _db(settings)
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

    settings = _settings(config or ctx.obj)
    db = _db(settings)
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


@app.command("deliver")
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

    settings = _settings(config)
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        err.print(f"[red]not found: {', '.join(missing)}[/red]")
        raise typer.Exit(2)
    db = _db(settings, create=True)  # the outbox may be used without a node (after analyze)
    try:
        created = enqueue(db, [f.resolve() for f in files], to, settings=settings)
    except KeyError as exc:
        err.print(f"[red]{exc.args[0]}[/red]")
        raise typer.Exit(2) from exc
    finally:
        db.dispose()
    out.print(f"queued {len(created)} delivery(ies)")


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
        "created_at": _iso(job.created_at),
        "started_at": _iso(job.started_at),
        "finished_at": _iso(job.finished_at),
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
    study: Annotated[str | None, typer.Option("--study", help="Study Instance UID.")] = None,
    limit: Annotated[int, typer.Option(min=1, help="Newest N jobs.")] = 100,
    as_json: JsonOpt = False,
) -> None:
    """List jobs, newest last: state, stage, timing, error."""
    if ctx.invoked_subcommand is not None:
        ctx.obj = config
        return
    settings = _settings(config)
    db = _db(settings)
    with db.session() as s:
        q = _newest(Job, limit, state=state, study=study)
        rows = [_job_row(j) for j in reversed(s.scalars(q).all())]
    db.dispose()
    _emit(
        rows,
        as_json,
        "Jobs",
        [
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
    from node.db.models import JobStage
    from pipelines.scoring.text import confident, score_lines

    settings = _settings(config or ctx.obj)
    db = _db(settings)
    with db.session() as s:
        job = s.get(Job, job_id)
        if job is None:
            err.print(f"[red]no job with id {job_id}[/red]")
            raise typer.Exit(2)
        detail = _job_row(job) | {"inputs": json.loads(job.inputs or "{}"), "folder": job.folder}
        detail["stages"] = [
            {
                "stage": st.stage,
                "state": st.state,
                "attempts": st.attempts,
                "started_at": _iso(st.started_at),
                "ended_at": _iso(st.ended_at),
                "seconds": round((st.ended_at - st.started_at).total_seconds(), 2)
                if st.started_at and st.ended_at
                else None,
                "outputs": json.loads(st.outputs) if st.outputs else None,
                "error": st.error,
            }
            for st in s.scalars(
                select(JobStage).where(JobStage.job_id == job_id).order_by(JobStage.id)
            )
        ]
        segmented = next(
            (st for st in detail["stages"] if st["stage"] == "segment" and st["outputs"]), None
        )
        detail["segmentation_quality"] = segmented["outputs"].get("quality") if segmented else None
        scored = next(
            (st for st in detail["stages"] if st["stage"] == "score" and st["outputs"]), None
        )
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
            for d in s.scalars(select(Delivery).where(Delivery.job_id == job_id))
        ]
        delivery_ids = {d["id"] for d in detail["deliveries"]}
        detail["audit"] = [
            {
                "seq": e.seq,
                "ts": _iso(e.ts),
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
            if (facts := json.loads(e.detail)).get("job") == job_id
            or (e.action.startswith("delivery.") and facts.get("delivery") in delivery_ids)
        ]
    db.dispose()
    if as_json:
        sys.stdout.write(json.dumps(detail, default=str) + "\n")
        return
    out.print(
        f"job {job_id}: {detail['state']} ({detail['pipeline']}), study "
        f"{detail['study_instance_uid']}",
        soft_wrap=True,
    )
    for role, uid in detail["inputs"].items():
        out.print(f"  input {escape(str(role))}: series {escape(str(uid))}", soft_wrap=True)
    out.print(f"  folder: {escape(str(detail['folder']))}", soft_wrap=True)
    if detail["error"]:
        out.print(f"  [red]error: {escape(detail['error'])}[/red]", soft_wrap=True)
    if segmented is not None:
        line = escape(quality_text(detail["segmentation_quality"]))
        flagged = (detail["segmentation_quality"] or {}).get("review")
        out.print(f"  [bold red]{line}[/bold red]" if flagged else f"  {line}", soft_wrap=True)
    for result in detail["scores"] or []:
        lines = [escape(line) for line in score_lines(result)]
        outside = "skipped" not in result and not confident(result)
        if outside:
            lines[1] = f"[bold red]{lines[1]}[/bold red]"
        out.print("\n".join(f"  {line}" for line in lines), soft_wrap=True)
    _emit(
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
    _emit(
        detail["deliveries"],
        False,
        "Deliveries",
        ["id", "kind", "destination", "state", "attempts", "last_error"],
    )
    _emit(
        [e | {"detail": json.dumps(e["detail"])} for e in detail["audit"]],
        False,
        "Audit",
        ["seq", "ts", "action", "outcome", "detail"],
    )


@jobs_app.command("retry")
def jobs_retry(
    ctx: typer.Context,
    job_id: Annotated[int, typer.Argument(metavar="ID")],
    config: ConfigOpt = None,
) -> None:
    """Queue a failed, dead or cancelled job again (finished stages are kept)."""
    settings = _settings(config or ctx.obj)
    db = _db(settings)
    with db.session() as s:
        job = s.get(Job, job_id)
        if job is None or job.state not in ("failed", "dead", "cancelled"):
            what = "no such job" if job is None else f"it is {job.state}"
            err.print(f"[red]job {job_id} cannot be retried: {what}[/red]")
            raise typer.Exit(2)
        job.state, job.attempts, job.error, job.finished_at = "queued", 0, None, None
        record(
            s,
            "job.retry",
            actor=os_actor(),
            study_instance_uid=job.study_instance_uid,
            detail={"job": job_id},
        )
    db.dispose()
    out.print(f"job {job_id} queued again")


@jobs_app.command("cancel")
def jobs_cancel(
    ctx: typer.Context,
    job_id: Annotated[int, typer.Argument(metavar="ID")],
    config: ConfigOpt = None,
) -> None:
    """Cancel a queued or running job (a running stage finishes; no further stage starts)."""
    settings = _settings(config or ctx.obj)
    db = _db(settings)
    with db.session() as s:
        job = s.get(Job, job_id)
        if job is None or job.state not in ("queued", "running"):
            what = "no such job" if job is None else f"it is {job.state}"
            err.print(f"[red]job {job_id} cannot be cancelled: {what}[/red]")
            raise typer.Exit(2)
        job.state = "cancelled"
        record(
            s,
            "job.cancelled",
            actor=os_actor(),
            study_instance_uid=job.study_instance_uid,
            detail={"job": job_id},
        )
    db.dispose()
    out.print(f"job {job_id} cancelled")


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
    _emit(rows, as_json, "Pipelines", list(rows[0]))


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


@app.command("echo")
def echo_cmd(
    host: Annotated[str, typer.Argument(help="Peer host or IP.")],
    port: Annotated[int, typer.Argument(help="Peer DICOM port.")],
    ae: Annotated[str, typer.Argument(help="Peer AE title (called AE).")],
    calling_ae: Annotated[str, typer.Option(help="Our AE title.")] = "SARCNODE",
    timeout: Annotated[float, typer.Option(help="Seconds.")] = 10.0,
    tls_ca: Annotated[Path | None, typer.Option(help="CA to trust (enables TLS).")] = None,
    tls_cert: Annotated[Path | None, typer.Option(help="Client certificate.")] = None,
    tls_key: Annotated[Path | None, typer.Option(help="Client key.")] = None,
) -> None:
    """C-ECHO a DICOM peer (is the PACS reachable, does it accept our AE title?)."""
    from node.dicom.echo import echo

    res = echo(
        host,
        port,
        ae,
        calling_ae=calling_ae,
        timeout_s=timeout,
        tls_ca=tls_ca,
        tls_cert=tls_cert,
        tls_key=tls_key,
    )
    (out if res.ok else err).print(f"{ae}@{host}:{port}: {res.detail}")
    raise typer.Exit(0 if res.ok else 1)


@config_app.command("check")
def config_check(
    path: Annotated[Path | None, typer.Argument(help="File to check (default: --config).")] = None,
    config: ConfigOpt = None,
) -> None:
    """Validate a config file and its pipelines (each signature card included).

    Lists every bad field by name, or the pipeline file and card that cannot
    be used, and exits 2 if any: also when ``jobs.pipelines_dir`` is missing
    or holds no pipeline, and when a model a pipeline names is absent, its
    card malformed or a weight file's checksum wrong. A usable config that
    leaves the node open
    (a network bind with neither ``allowed_peers`` nor TLS, every calling AE
    accepted) or refusing everyone gets a WARNING line per problem on stderr.
    """
    from node.pipelines import PipelineError, load_pipelines

    target = path or resolve_config_path(config)
    settings = _settings(target)
    folder = settings.jobs.pipelines_dir
    try:
        pipelines = load_pipelines(folder, required=True)
    except PipelineError as exc:
        err.print(f"[red]{target or 'embedded defaults'}: pipeline error: {escape(str(exc))}[/red]")
        raise typer.Exit(2) from exc
    out.print(f"{target or 'embedded defaults'}: OK")
    for warning in security_warnings(settings):
        err.print(f"[bold red]WARNING[/bold red] {escape(warning)}")
    out.print(
        f"  AE title {settings.dicom.ae_title} on {settings.dicom.bind}:{settings.dicom.port}"
        f"{' (TLS)' if settings.dicom.tls.enabled else ''}"
    )
    d = settings.dicom
    callers = (
        "any (accept_any_calling_ae)"
        if d.accept_any_calling_ae
        else (", ".join(d.allowed_calling_aes) or "none")
    )
    out.print(f"  calling AEs: {escape(callers)}; peers: {', '.join(d.allowed_peers) or 'any'}")
    out.print(
        f"  storage {settings.storage.root.resolve()}; database {_mask(settings.database_url)}"
    )
    for p in pipelines:
        cards = ", ".join(folder.name for folder in p.signatures) or "none"
        out.print(
            f"  pipeline {p.name}: model {p.segmentation_model.name} (checksums OK); "
            f"signature cards {cards}",
            soft_wrap=True,
        )


def _mask(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


@config_app.command("show")
def config_show(config: ConfigOpt = None) -> None:
    """Print the effective configuration (file + environment + defaults) as JSON."""
    settings = _settings(config)
    data = json.loads(settings.model_dump_json())
    data["database"]["effective_url"] = _mask(settings.database_url)
    if data["database"].get("url"):
        data["database"]["url"] = _mask(data["database"]["url"])
    sys.stdout.write(json.dumps(data, indent=2) + "\n")


@synth_app.command("study")
def synth_study(
    folder: Annotated[Path, typer.Argument(metavar="OUT", help="Output folder.")],
    seed: Annotated[int, typer.Option(help="Random seed (same seed, same study).")] = 0,
) -> None:
    """Write one synthetic study: dicom/T1, dicom/T2FS, masks/*.nii.gz, truth.json."""
    from pipelines.synth.study import write_study

    truth = write_study(folder, seed)
    out.print(f"{truth['case_id']}: {folder / 'dicom'} (T1, T2FS); masks in {folder / 'masks'}")


@synth_app.command("cohort")
def synth_cohort(
    folder: Annotated[Path, typer.Argument(metavar="OUT", help="Output folder.")],
    n: Annotated[int, typer.Option("--n", min=1, help="Number of studies.")] = 20,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    images: Annotated[bool, typer.Option(help="Write images (else only clinical.csv).")] = True,
    workers: Annotated[int, typer.Option(min=1, help="Processes rendering studies.")] = 1,
) -> None:
    """Write a cohort: cases/<id>/ studies, clinical.csv (PFS, covariates, oracle_lp)."""
    from pipelines.synth.cohort import write_cohort

    cases = write_cohort(folder, n, seed, images=images, workers=workers)
    events = sum(c.event for c in cases)
    out.print(f"{len(cases)} cases ({events} events) in {folder}; see {folder / 'clinical.csv'}")


DEFAULT_SEG_MODEL = models_dir() / "sarcnode-seg-demo"
ModelOpt = Annotated[
    Path,
    typer.Option(
        "--model",
        envvar="SARCNODE_SEG_MODEL",
        help="Segmentation model folder (card.yaml + weights).",
    ),
]


@app.command("train-seg")
def train_seg(
    data: Annotated[
        list[Path], typer.Argument(help="Folders of cases: synthetic studies, NIfTI pairs.")
    ],
    out_dir: Annotated[Path, typer.Option("--out", help="Model folder to write (models/<id>).")],
    exclude: Annotated[
        list[str], typer.Option("--exclude", help="Case/patient id never to train on (repeatable).")
    ] = [],  # noqa: B006 - typer needs a literal default
    val_fraction: Annotated[float, typer.Option(min=0.0, max=0.9)] = 0.2,
    seed: Annotated[int, typer.Option()] = 0,
    coarse_steps: Annotated[int, typer.Option(min=1)] = 600,
    fine_steps: Annotated[int, typer.Option(min=1)] = 2000,
    val_every: Annotated[int, typer.Option(min=1)] = 100,
    version: Annotated[str, typer.Option()] = "1.0.0",
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    coarse_source: Annotated[
        list[str],
        typer.Option(help="Sources the locator learns from: synthetic, real (repeatable)."),
    ] = ["synthetic"],  # noqa: B006
    stage: Annotated[
        list[str], typer.Option(help="Stage(s) to train: coarse, fine (default both).")
    ] = ["coarse", "fine"],  # noqa: B006
    reuse: Annotated[
        Path | None, typer.Option(help="Model to take the stage(s) not trained from.")
    ] = None,
) -> None:
    """Train the coarse locator and fine segmenter; write weights and card.yaml."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from pipelines.segment.card import ModelError
    from pipelines.segment.train import train

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TextColumn("{task.fields[info]}"),
        TimeRemainingColumn(),
        console=err,
    ) as bar:
        tasks: dict[str, Any] = {}

        def progress(stage: str, step: int, total: int, info: dict[str, float]) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total, info="")
            text = f"loss {info['loss']:.3f}  best val Dice {info['best_dice']:.3f}"
            bar.update(tasks[stage], completed=step, info=text)

        try:
            card = train(
                data,
                out_dir,
                model_id=out_dir.name,
                version=version,
                exclude=set(exclude),
                val_fraction=val_fraction,
                seed=seed,
                coarse_steps=coarse_steps,
                fine_steps=fine_steps,
                val_every=val_every,
                device=device,
                progress=progress,
                coarse_sources=tuple(coarse_source),
                stages_to_train=tuple(stage),
                reuse=reuse,
                log=lambda line: bar.console.print(line),
            )
        except (ValueError, FileNotFoundError, ModelError) as exc:
            err.print(f"[red]train-seg: {exc}[/red]")
            raise typer.Exit(2) from exc
    for source, row in card["validation"]["summary"].items():
        out.print(
            f"validation {source} (n={row['n']}): Dice {row['dice_mean']:.3f} "
            f"(95% CI {row['dice_ci95'][0]:.3f}-{row['dice_ci95'][1]:.3f}), "
            f"HD95 {row['hd95_mm_mean']:.1f} mm"
        )
    out.print(f"model card: {out_dir / 'card.yaml'}")


RULES_FILE = config_dir() / "sequence_roles.yaml"
RulesOpt = Annotated[Path, typer.Option("--rules", help="Sequence-role rules (YAML).")]


@app.command("cv-seg")
def cv_seg(
    data: Annotated[
        list[Path], typer.Argument(help="Folders of cases: the real NIfTI pairs (+ synthetic).")
    ],
    out_dir: Annotated[Path, typer.Option("--out", help="Folder for folds, weights and report.")],
    recipe: Annotated[str, typer.Option(help="Candidate recipe (see --help).")] = "3d-heavy",
    folds: Annotated[int, typer.Option("--folds", min=2)] = 5,
    fold: Annotated[
        list[int], typer.Option("--fold", help="Run only this fold (repeatable); resumable.")
    ] = [],  # noqa: B006
    seed: Annotated[int, typer.Option()] = 0,
    steps: Annotated[int | None, typer.Option(min=1, help="Override the recipe's steps.")] = None,
    synthetic: Annotated[
        bool, typer.Option(help="Train on the synthetic studies found too.")
    ] = True,
    exclude: Annotated[
        list[str], typer.Option("--exclude", help="Patient id never to use (repeatable).")
    ] = [],  # noqa: B006
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    threads: Annotated[int | None, typer.Option(min=1, help="torch threads.")] = None,
    rescore: Annotated[
        Path | None,
        typer.Option(
            "--rescore",
            help="A finished CV folder to score again with --inference (nothing is trained).",
        ),
    ] = None,
    inference: Annotated[
        str, typer.Option(help="Test-time inference: window (sliding) or whole.")
    ] = "window",
    as_json: JsonObjectOpt = False,
) -> None:
    """Patient-level k-fold CV of a segmentation recipe: out-of-fold Dice/HD95 per patient.

    Recipes: 3d-light (the first demo model's), 3d-heavy, 25d-heavy. STS_001
    is never used. Writes folds.json, fold<i>.pt/.json (a finished fold is
    not trained again), oof/ masks, cv.json and report.html.
    """
    import dataclasses

    import torch

    from pipelines.segment.card import ModelError
    from pipelines.segment.cv import CANDIDATES, cross_validate, rescore_cv

    if inference not in ("window", "whole"):
        err.print(f"[red]cv-seg: --inference must be window or whole, not {inference!r}[/red]")
        raise typer.Exit(2)
    if recipe not in CANDIDATES:
        err.print(f"[red]cv-seg: unknown recipe {recipe!r} ({', '.join(CANDIDATES)})[/red]")
        raise typer.Exit(2)
    chosen = CANDIDATES[recipe]
    changes: dict[str, Any] = {"synthetic": synthetic}
    if steps is not None:
        changes |= {"steps": steps, "val_every": max(1, min(chosen.val_every, steps))}
    chosen = dataclasses.replace(chosen, **changes)
    chosen.arch = dict(chosen.arch) | {"inference": inference}
    if threads:
        torch.set_num_threads(threads)
    try:
        if rescore is not None:
            summary = rescore_cv(
                rescore,
                out_dir,
                data,
                inference=inference,
                device=device,
                log=lambda line: err.print(line),
            )
        else:
            summary = cross_validate(
                data,
                out_dir,
                chosen,
                k=folds,
                seed=seed,
                exclude=set(exclude),
                only_folds=fold or None,
                device=device,
                log=lambda line: err.print(line),
            )
    except (ValueError, FileNotFoundError, ModelError) as exc:
        err.print(f"[red]cv-seg: {exc}[/red]")
        raise typer.Exit(2) from exc
    if as_json:
        sys.stdout.write(json.dumps(summary, indent=2) + "\n")
        return
    if "dice_mean" not in summary:
        out.print(f"{summary['folds_done']} of {summary['k']} folds done in {out_dir}")
        return
    q = summary["quality_flag"]["out_of_fold"]
    out.print(
        f"{chosen.name}: out-of-fold Dice {summary['dice_mean']:.3f} "
        f"(95% CI {summary['dice_ci95'][0]:.3f}-{summary['dice_ci95'][1]:.3f}) over "
        f"{summary['n']} patients; HD95 {summary['hd95_mm_mean']:.1f} mm; "
        f"quality flag caught {q['caught']}/{q['failures']} failures, "
        f"flagged {q['false_flags']}/{q['successes']} successes"
    )
    out.print(f"report: {out_dir / 'report.html'}")


@app.command("seg-ensemble")
def seg_ensemble(
    cv_dir: Annotated[Path, typer.Argument(metavar="CV_DIR", help="A finished cv-seg folder.")],
    locator: Annotated[Path, typer.Option(help="Model folder whose coarse locator to keep.")],
    out_dir: Annotated[Path, typer.Option("--out", help="Model folder to write.")],
    data: Annotated[
        list[Path], typer.Option("--data", help="The real training data (for input-check limits).")
    ],
    version: Annotated[str, typer.Option()] = "2.0.0",
    model_id: Annotated[
        str | None, typer.Option("--id", help="Model id (default: folder).")
    ] = None,
    check_study: Annotated[
        Path | None,
        typer.Option(help="DICOM study with an RTSTRUCT to score the ensemble on (STS_001)."),
    ] = None,
    rules: RulesOpt = RULES_FILE,
) -> None:
    """Ship a cross-validation's fold models as one ensemble, with its CV figures on the card.

    Candidates compared are the other finished CVs beside CV_DIR (their
    cv.json); the quality threshold is the one chosen on the out-of-fold cases.
    """
    from pipelines.segment.card import ModelError
    from pipelines.segment.ensemble import assemble

    try:
        card = assemble(
            cv_dir,
            locator,
            out_dir,
            model_id=model_id or out_dir.name,
            version=version,
            data=data,
            check_study=check_study,
            rules=rules,
        )
    except (ValueError, FileNotFoundError, KeyError, ModelError) as exc:
        err.print(f"[red]seg-ensemble: {exc}[/red]")
        raise typer.Exit(2) from exc
    out.print(card["validation"]["headline"])
    for row in card["validation"].get("end_to_end_case", {}).get("rows", []):
        out.print(f"{row['case']}: Dice {row['dice']:.3f}, HD95 {row['hd95_mm']} mm")
    out.print(f"model card: {out_dir / 'card.yaml'}")


def _segmenter(model: Path, device: str) -> Any:
    """Load a model folder, or exit 2 naming what is wrong with it (card, checksum, device)."""
    from pipelines.segment.card import ModelError
    from pipelines.segment.infer import Segmenter

    try:
        return Segmenter(model, device)
    except ModelError as exc:
        err.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from exc


@app.command("segment")
def segment_cmd(
    source: Annotated[
        Path, typer.Argument(metavar="INPUT", help="DICOM series/study folder or NIfTI/NRRD.")
    ],
    mask_out: Annotated[Path, typer.Option("--out", help="Tumour mask to write (.nii.gz).")],
    sequence: Annotated[str, typer.Option(help="Role to segment: T2FS or T1.")] = "T2FS",
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    model: ModelOpt = DEFAULT_SEG_MODEL,
    rules: RulesOpt = RULES_FILE,
    as_json: JsonObjectOpt = False,
) -> None:
    """Segment the tumour; in a study with both sequences, also carry the mask to the other one.

    The carried mask is written beside OUT as ``<OUT stem>_<ROLE>.nii.gz``.
    """
    import SimpleITK as sitk

    from pipelines.io.dicom import GeometryError
    from pipelines.io.roles import RuleError, load_role_rules
    from pipelines.segment.quality import InputRejected
    from pipelines.segment.study import InputError, segment_input

    if sequence not in ("T2FS", "T1"):
        err.print(f"[red]--sequence must be T2FS or T1, not {sequence!r}[/red]")
        raise typer.Exit(2)
    segmenter = _segmenter(model, device)
    try:
        seg = segment_input(source, segmenter, load_role_rules(rules), sequence)
    except (InputError, InputRejected, GeometryError, RuleError, OSError, RuntimeError) as exc:
        err.print(f"[red]segment: {source}: {exc}[/red]")
        raise typer.Exit(2) from exc
    mask_out.parent.mkdir(parents=True, exist_ok=True)
    stem = mask_out.name.removesuffix(".gz").removesuffix(".nii").removesuffix(".nrrd")
    written: dict[str, str] = {}
    for role, mask in seg.masks.items():
        path = mask_out if role == seg.sequence else mask_out.with_name(f"{stem}_{role}.nii.gz")
        sitk.WriteImage(mask, str(path), useCompression=True)
        written[role] = str(path)
    report = {
        "model": segmenter.model_id,
        "device": str(segmenter.device),
        "segmented": seg.sequence,
        "located": seg.result.located,
        "volume_ml": round(seg.result.volume_ml, 2),
        "seconds": {k: round(v, 2) for k, v in seg.result.seconds.items()},
        "quality": seg.result.quality.as_dict() if seg.result.quality else None,
        "masks": written,
        "registration": None
        if seg.registration is None
        else {
            "accepted": seg.registration.accepted,
            "reason": seg.registration.reason,
            "translation_mm": [round(v, 2) for v in seg.registration.translation_mm],
            "rotation_deg": [round(v, 2) for v in seg.registration.rotation_deg],
        },
        "note": segmenter.card.get("clinical_use", "not for clinical use"),
    }
    if as_json:
        sys.stdout.write(json.dumps(report, indent=2) + "\n")
        return
    out.print(
        f"{segmenter.model_id} on {segmenter.device}: {seg.sequence} segmented, "
        f"{report['volume_ml']} ml, {sum(seg.result.seconds.values()):.1f} s"
    )
    quality = seg.result.quality
    if quality is not None and quality.review:
        out.print(f"[yellow]REVIEW the mask: {'; '.join(quality.reasons)}[/yellow]")
    elif quality is not None and quality.score is not None:
        out.print(f"quality {quality.score:.2f} (review below {quality.threshold:.2f})")
    for role, where in written.items():
        how = "segmented" if role == seg.sequence else "carried"
        out.print(f"  {role} ({how}): {where}")
    if seg.registration is not None and not seg.registration.accepted:
        out.print(f"  registration not used ({seg.registration.reason}); scanner alignment kept")
    out.print(f"[bold]{report['note']}[/bold]")


@app.command("eval-seg")
def eval_seg(
    model: Annotated[Path, typer.Argument(metavar="MODEL", help="Model folder.")],
    data: Annotated[
        list[Path], typer.Argument(help="Case folders, or DICOM studies with RTSTRUCT.")
    ],
    roi: Annotated[str, typer.Option(help="RTSTRUCT ROI holding the truth.")] = "GTV_Mass",
    exclude: Annotated[list[str], typer.Option("--exclude", help="Case id to skip.")] = [],  # noqa: B006
    only: Annotated[
        list[str], typer.Option("--only", help="Score only these case ids (repeatable).")
    ] = [],  # noqa: B006
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    rules: RulesOpt = RULES_FILE,
    as_json: JsonObjectOpt = False,
) -> None:
    """Dice and HD95 per case, with mean and 95% bootstrap CI per source."""
    from pipelines.io.roles import load_role_rules
    from pipelines.segment.evaluate import iter_cases, score, summarise

    segmenter = _segmenter(model, device)
    try:
        cases = [
            c
            for c in iter_cases(data, load_role_rules(rules), roi, set(exclude))
            if not only or c.case_id.split("/")[0] in only
        ]
    except (ValueError, FileNotFoundError) as exc:
        err.print(f"[red]eval-seg: {exc}[/red]")
        raise typer.Exit(2) from exc
    if not cases:
        err.print("[red]eval-seg: no cases found[/red]")
        raise typer.Exit(2)
    rows = score(segmenter, cases)
    summary = summarise(rows)
    if as_json:
        sys.stdout.write(
            json.dumps({"model": segmenter.model_id, "cases": rows, "summary": summary}, indent=2)
            + "\n"
        )
        return
    table = Table("case", "source", "sequence", "Dice", "HD95 mm", "s")
    for r in rows:
        table.add_row(
            r["case"],
            r["source"],
            r["sequence"],
            f"{r['dice']:.3f}",
            f"{r['hd95_mm']:.1f}",
            f"{r['seconds']:.1f}",
        )
    out.print(table)
    for source, row in summary.items():
        out.print(
            f"{source} (n={row['n']}): Dice {row['dice_mean']:.3f} "
            f"(95% CI {row['dice_ci95'][0]:.3f}-{row['dice_ci95'][1]:.3f}); "
            f"HD95 {row['hd95_mm_mean']:.1f} mm "
            f"({row['hd95_mm_ci95'][0]:.1f}-{row['hd95_mm_ci95'][1]:.1f})"
        )


@app.command("radiomics")
def radiomics_cmd(
    image: Annotated[
        Path, typer.Argument(metavar="IMAGE", help="NIfTI/NRRD image or DICOM series folder.")
    ],
    mask: Annotated[
        Path, typer.Argument(metavar="MASK", help="Tumour mask (NIfTI/NRRD) on the image grid.")
    ],
    features_out: Annotated[Path, typer.Option("--out", help="Feature table to write (CSV).")],
    params: Annotated[
        Path | None, typer.Option("--params", help="PyRadiomics parameter file (YAML).")
    ] = None,
    ring_mm: Annotated[float, typer.Option(help="Peritumoral ring width (0: no ring).")] = 10.0,
    sequence: Annotated[str, typer.Option(help="Sequence name for the table.")] = "T2FS",
    study: Annotated[str, typer.Option(help="Study id for the table.")] = "",
    workers: Annotated[int | None, typer.Option(help="Processes (default: CPUs).")] = None,
) -> None:
    """Features of the tumour (and its ring): one row per region, PyRadiomics names."""
    import SimpleITK as sitk

    from pipelines.io.dicom import load_image, load_series, scan
    from pipelines.radiomics.extract import DEFAULT_PARAMS, ExtractionError, extract, load_params
    from pipelines.radiomics.regions import ring

    try:
        img = load_series(scan(image).series[0]) if image.is_dir() else load_image(image)
        msk = sitk.ReadImage(str(mask))
        if msk.GetSize() != img.GetSize():
            raise ExtractionError(f"mask {mask.name} is {msk.GetSize()}, image is {img.GetSize()}")
        msk = sitk.Cast(msk > 0, sitk.sitkUInt8)
        msk.CopyInformation(img)
        regions = {"tumour": msk}
        if ring_mm > 0:
            regions["ring"] = ring(msk, img, width_mm=ring_mm)
        table = extract(
            {sequence: img},
            {sequence: regions},
            load_params(params or DEFAULT_PARAMS),
            study=study or image.name,
            workers=workers,
        )
    except (ExtractionError, OSError, RuntimeError, IndexError) as exc:
        err.print(f"[red]radiomics: {exc}[/red]")
        raise typer.Exit(2) from exc
    features_out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(features_out, index=False)
    out.print(f"{len(table)} region(s) x {table.shape[1] - 4} features -> {features_out}")


@app.command("fit-signature")
def fit_signature_cmd(
    cohort: Annotated[
        Path, typer.Argument(metavar="COHORT", help="Studies + clinical.csv, or a feature table.")
    ],
    endpoint: Annotated[str, typer.Option(help="pfs, grade or metastasis.")],
    model_out: Annotated[Path, typer.Option("--out", help="Signature folder (models/<id>).")],
    clinical: Annotated[
        Path | None, typer.Option(help="Clinical CSV (default COHORT/clinical.csv).")
    ] = None,
    label: Annotated[
        str | None, typer.Option(help="Label column (grade: grade3, metastasis: metastasis).")
    ] = None,
    batch: Annotated[
        str | None, typer.Option(help="Batch column for ComBat (scanner, site).")
    ] = None,
    params: Annotated[
        Path | None, typer.Option("--params", help="PyRadiomics parameter file.")
    ] = None,
    val_fraction: Annotated[float, typer.Option(min=0.0, max=0.9)] = 0.3,
    seed: Annotated[int, typer.Option()] = 0,
    synthetic: Annotated[
        bool, typer.Option(help="Cohort is synthetic (said in the card).")
    ] = False,
    region: Annotated[
        list[str], typer.Option(help="Regions to extract: tumour, ring, habitat1-3 (repeatable).")
    ] = ["tumour", "ring", "habitat1", "habitat2", "habitat3"],  # noqa: B006
    cutoff: Annotated[
        str, typer.Option(help="PFS risk groups: median or optimal (max log-rank, training).")
    ] = "median",
    workers: Annotated[int | None, typer.Option(help="Extraction processes.")] = None,
    icc: Annotated[
        str | None,
        typer.Option(
            help="Robust features (ICC > --icc-threshold) from: 'perturb' (mask perturbations"
            " of --icc-cases studies; default for a studies folder), a second reader's"
            " feature CSV, or 'none' (default for a feature table)."
        ),
    ] = None,
    icc_cases: Annotated[int, typer.Option(min=2, help="Studies perturbed for the ICC.")] = 20,
    icc_threshold: Annotated[float, typer.Option(min=0.0, max=1.0)] = 0.75,
) -> None:
    """Fit a signature and nomogram for ENDPOINT; write card.yaml with validation figures."""
    import pandas as pd

    from pipelines.radiomics.extract import DEFAULT_PARAMS, load_params, params_hash
    from pipelines.signature.card import write_signature_card
    from pipelines.signature.cohort import (
        load_cohort,
        perturbation_icc,
        read_features,
        second_reader_icc,
    )
    from pipelines.signature.logistic import fit_logistic
    from pipelines.signature.pfs import FitError, fit_pfs

    if endpoint not in ("pfs", "grade", "metastasis"):
        err.print(f"[red]--endpoint must be pfs, grade or metastasis, not {endpoint!r}[/red]")
        raise typer.Exit(2)
    param_file = params or DEFAULT_PARAMS
    param_data = load_params(param_file)
    try:
        features, clin = load_cohort(
            cohort,
            clinical=clinical,
            params=param_data,
            cache=model_out / "features.csv",
            workers=workers,
            regions=tuple(region),
            progress=lambda i, n, case: err.print(f"extracted {case} ({i}/{n})"),
        )
        provenance = {
            "extraction": {
                "params_file": param_file.name,
                "params_sha256": params_hash(param_data),
            },
            "sequences": sorted({c.split(":")[0] for c in features.columns}),
            "regions": sorted({c.split(":")[1] for c in features.columns if c.count(":") >= 2}),
            "cohort": {"path": cohort.name, "n": len(features.index.intersection(clin.index))},
        }
        table_cohort = cohort.is_file() or (cohort / "features.csv").is_file()
        source = icc or ("none" if table_cohort else "perturb")
        icc_values: pd.Series | None = None
        cached = model_out / "icc.csv"
        if source == "perturb":
            if table_cohort:
                raise ValueError("--icc perturb needs a folder of studies, not a feature table")
            described = cached.with_suffix(".json")
            if cached.is_file() and described.is_file():  # a re-fit reuses the ICCs
                icc_values = pd.read_csv(cached, index_col=0).iloc[:, 0]
                summary = json.loads(described.read_text())
            else:
                icc_values, summary = perturbation_icc(
                    cohort,
                    param_data,
                    cases=icc_cases,
                    seed=seed,
                    workers=workers,
                    regions=tuple(region),
                    progress=lambda i, n, case: err.print(f"perturbed {case} ({i}/{n})"),
                )
                model_out.mkdir(parents=True, exist_ok=True)
                icc_values.to_csv(cached, header=["icc"])
                described.write_text(json.dumps(summary, indent=2))
        elif source != "none":
            icc_values = second_reader_icc(features, read_features(Path(source)))
            summary = {"method": f"second segmentation ({Path(source).name})", "kind": "ICC(2,1)"}
        if icc_values is not None:
            provenance["robustness"] = {
                **summary,
                "threshold": icc_threshold,
                "robust": int((icc_values > icc_threshold).sum()),
                "of": int(icc_values.size),
            }
        if endpoint == "pfs":
            card = fit_pfs(
                features,
                clin,
                signature_id=model_out.name,
                batch=batch,
                val_fraction=val_fraction,
                seed=seed,
                synthetic=synthetic,
                provenance=provenance,
                cutoff_rule=cutoff,
                icc=icc_values,
                icc_threshold=icc_threshold,
            ).card
        else:
            column = label or ("grade3" if endpoint == "grade" else "metastasis")
            card, _ = fit_logistic(
                features,
                clin,
                signature_id=model_out.name,
                endpoint=endpoint,
                label=column,
                batch=batch,
                val_fraction=val_fraction,
                seed=seed,
                synthetic=synthetic,
                provenance=provenance,
                icc=icc_values,
                icc_threshold=icc_threshold,
            )
    except (FitError, ValueError, OSError) as exc:
        err.print(f"[red]fit-signature: {exc}[/red]")
        raise typer.Exit(2) from exc
    path = write_signature_card(model_out, card)
    shutil.copyfile(param_file, model_out / param_file.name)  # the card travels with its settings
    val = card["validation"]
    key = "c_index_nomogram_lp" if endpoint == "pfs" else "auc_nomogram"
    if key in val:
        out.print(
            f"validation (n={val['n']}): {key} {val[key]['value']:.3f} "
            f"(95% CI {val[key]['ci95'][0]:.3f}-{val[key]['ci95'][1]:.3f})"
        )
    out.print(f"{len(card['features'])} feature(s); card: {path}")


@app.command("evaluate")
def evaluate_cmd(
    model: Annotated[Path, typer.Argument(metavar="MODEL", help="Signature folder (card.yaml).")],
    cohort: Annotated[
        Path, typer.Argument(metavar="COHORT", help="Studies + clinical.csv, or a feature table.")
    ],
    report_out: Annotated[Path, typer.Option("--out", help="Report folder.")],
    clinical: Annotated[
        Path | None, typer.Option(help="Clinical CSV (default COHORT/clinical.csv).")
    ] = None,
    workers: Annotated[int | None, typer.Option(help="Extraction processes.")] = None,
) -> None:
    """Score COHORT with MODEL; write the papers' figures, metrics.json and report.html."""
    from pipelines.radiomics.extract import DEFAULT_PARAMS, load_params
    from pipelines.signature.card import ScoreError, load_signature_card
    from pipelines.signature.cohort import load_cohort
    from pipelines.signature.evaluate import evaluate

    try:
        card = load_signature_card(model)
        params_file = model / card.get("extraction", {}).get("params_file", "")
        params = load_params(params_file if params_file.is_file() else DEFAULT_PARAMS)
        features, clin = load_cohort(
            cohort,
            clinical=clinical,
            params=params,
            cache=report_out / "features.csv",
            workers=workers,
        )
        result = evaluate(card, features, clin, report_out)
    except (ScoreError, ValueError, OSError) as exc:
        err.print(f"[red]evaluate: {exc}[/red]")
        raise typer.Exit(2) from exc
    for key, value in result["metrics"].items():
        if isinstance(value, dict) and "ci95" in value:
            out.print(
                f"{key}: {value['value']:.3f} "
                f"(95% CI {value['ci95'][0]:.3f}-{value['ci95'][1]:.3f})"
            )
    out.print(f"report: {result['html']}")
    out.print(f"[bold]{card.get('clinical_use', 'not for clinical use')}[/bold]")


@app.command("card-applicability")
def card_applicability_cmd(
    model: Annotated[Path, typer.Argument(metavar="MODEL", help="Signature folder (card.yaml).")],
    clinical: Annotated[
        Path, typer.Option(help="The cohort's clinical CSV the card was fitted with.")
    ],
    features: Annotated[
        Path | None, typer.Option(help="Feature CSV (default MODEL/features.csv, the fit's cache).")
    ] = None,
    val_fraction: Annotated[float, typer.Option(min=0.0, max=0.9)] = 0.3,
) -> None:
    """Add the training range of each card feature and of the rad-score (``applicability``).

    For a card fitted before cards carried it: the training cases are re-drawn
    as the fit drew them, and used only if they give back the card's training
    size, means and SDs. The card's version goes up a minor step (its outputs
    change: a study outside the range loses its risk group).
    """
    from pipelines.scoring.domain import reconstruct_block
    from pipelines.signature.card import ScoreError, load_signature_card, write_signature_card

    try:
        card = load_signature_card(model)
        block = reconstruct_block(
            card, features or model / "features.csv", clinical, val_fraction=val_fraction
        ).as_dict()
    except (ScoreError, ValueError, KeyError, OSError) as exc:
        err.print(f"[red]card-applicability: {escape(str(exc))}[/red]")
        raise typer.Exit(2) from exc
    if card.get("applicability") == block:
        out.print(f"{model}: applicability block already up to date")
        return
    major, minor, *_ = [*str(card.get("version", "1.0.0")).split("."), "0", "0"]
    card["version"] = f"{major}.{int(minor) + 1}.0"
    card["applicability"] = block
    path = write_signature_card(model, card)
    low, high = block["radscore"]
    out.print(
        f"{path}: version {card['version']}, training ranges of {len(block['features'])} "
        f"feature(s) and the rad-score ({low:.3f} to {high:.3f}) over {block['n_train']} cases"
    )


SHIPPED_PIPELINE = PIPELINES_DIR / "sarcoma-mr.yaml"


def _yes_no(value: str | None) -> int | None:
    if value is None:
        return None
    if value.lower() in ("yes", "y", "1", "true"):
        return 1
    if value.lower() in ("no", "n", "0", "false"):
        return 0
    raise typer.BadParameter(f"expected yes or no, not {value!r}")


@app.command("analyze")
def analyze_cmd(
    study: Annotated[
        Path, typer.Argument(metavar="STUDY_DIR", help="DICOM study folder (T2FS, T1).")
    ],
    out_dir: Annotated[Path, typer.Option("--out", help="Output folder.")],
    model: ModelOpt = DEFAULT_SEG_MODEL,
    signature: Annotated[
        list[Path] | None,
        typer.Option(
            envvar="SARCNODE_SIGNATURE",
            help="Signature folder (card.yaml); repeatable. Default: the shipped pipeline's cards.",
        ),
    ] = None,
    edema: Annotated[str | None, typer.Option(help="Peritumoral edema: yes/no.")] = None,
    metastasis: Annotated[str | None, typer.Option(help="Metastasis at diagnosis: yes/no.")] = None,
    grade: Annotated[int | None, typer.Option(min=1, max=3, help="Histological grade.")] = None,
    age: Annotated[int | None, typer.Option(min=0, max=120)] = None,
    sex: Annotated[str | None, typer.Option(help="M or F.")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    workers: Annotated[int | None, typer.Option(help="Extraction processes.")] = None,
    rules: RulesOpt = RULES_FILE,
    as_json: JsonObjectOpt = False,
) -> None:
    """Segment, extract radiomics and score one study with each card; write masks, scores, summary.

    A card the study cannot use (a sequence missing) is reported as skipped, with the reason.
    """
    from node.pipelines import PipelineError, load_pipeline
    from pipelines.analyze import analyze_study
    from pipelines.io.dicom import GeometryError
    from pipelines.io.roles import load_role_rules
    from pipelines.radiomics.extract import ExtractionError
    from pipelines.scoring.cards import CardError, load_signatures
    from pipelines.segment.study import InputError
    from pipelines.signature.card import ScoreError

    try:
        folders = signature or list(load_pipeline(SHIPPED_PIPELINE).signatures)
        signatures = load_signatures(folders)
    except (CardError, PipelineError) as exc:
        err.print(f"[red]analyze: {escape(str(exc))}[/red]")
        raise typer.Exit(2) from exc
    segmenter = _segmenter(model, device)
    clinical: dict[str, Any] = {
        "edema": _yes_no(edema),
        "metastasis": _yes_no(metastasis),
        "age": age,
        "grade3": None if grade is None else int(grade == 3),
        "sex_male": None if sex is None else int(sex.upper() == "M"),
    }
    try:
        report = analyze_study(
            study,
            out_dir,
            segmenter=segmenter,
            signatures=signatures,
            rules=load_role_rules(rules),
            clinical={k: v for k, v in clinical.items() if v is not None},
            workers=workers,
        )
    except (InputError, GeometryError, ExtractionError, ScoreError, ValueError, OSError) as exc:
        err.print(f"[red]analyze: {study}: {exc}[/red]")
        raise typer.Exit(2) from exc
    if as_json:
        sys.stdout.write(json.dumps(report, indent=2) + "\n")
        return
    out.print((out_dir / "summary.txt").read_text().rstrip())
    out.print(f"outputs in {out_dir}: masks, features-*.csv, score.json, summary.txt")


clinical_app = typer.Typer(
    help="Clinical factors of a study (the nomogram's inputs).", no_args_is_help=True
)
app.add_typer(clinical_app, name="clinical")

from node.cli.signature_cv import signature_cv_cmd  # noqa: E402

app.command("signature-cv")(signature_cv_cmd)


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

    given = {
        "edema": _yes_no(edema),
        "metastasis": _yes_no(metastasis),
        "age": age,
        "grade3": None if grade is None else int(grade == 3),
        "sex_male": None if sex is None else int(sex.upper() == "M"),
    }
    facts = {k: v for k, v in given.items() if v is not None}
    if not facts:
        err.print("[red]give at least one factor (--edema, --metastasis, --grade ...)[/red]")
        raise typer.Exit(2)
    settings = _settings(config)
    try:
        path = clinical_path(settings, study_uid)
    except ValueError as exc:
        err.print(f"[red]{escape(str(exc))}[/red]")
        raise typer.Exit(2) from exc
    db = _db(settings)
    with db.session() as s:
        held = s.scalar(select(Study.id).where(Study.study_instance_uid == study_uid))
    if held is None and not before_arrival:
        db.dispose()
        err.print(
            f"[red]the node holds no study {escape(study_uid)} (see `sarcnode studies`); "
            "give --before-arrival to record factors for a study still to come[/red]"
        )
        raise typer.Exit(2)
    known: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}
    known.update(facts)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(known, indent=2))
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
    listed = ", ".join(
        f"{k} {v}" if k == "age" else f"{k} {'yes' if v else 'no'}"
        for k, v in sorted(known.items())
    )
    out.print(f"clinical factors of {study_uid}: {listed}", soft_wrap=True)
    if job_id is None:
        out.print("no finished job for this study yet: the factors apply to its next job")
    else:
        out.print(f"job {job_id} queued again from its score stage")


def main() -> None:
    """Console-script entry point.

    An audit break or key problem met by any command that writes an audit
    event ends it with the reason (exit 1), not a traceback.
    """
    try:
        app()
    except (AuditBreakError, AuditKeyError) as exc:
        err.print(f"[red]audit:[/red] {escape(str(exc))}")
        sys.exit(1)


if __name__ == "__main__":
    main()
