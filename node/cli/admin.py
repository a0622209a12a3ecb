"""Admin commands: run the node, its status, what it received, peers, config.

``serve``, ``status``, ``studies``, ``series``, ``instances``,
``associations``, ``echo`` and the ``config`` group (``check``, ``show``).
They read the node's database directly, so they work while ``serve`` runs.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from node.audit.keys import AuditKeyError
from node.audit.trail import AuditBreakError
from node.cli.common import (
    ConfigOpt,
    JsonObjectOpt,
    JsonOpt,
    StudyOpt,
    emit,
    err,
    iso,
    mask_url,
    open_db,
    out,
    print_table,
    settings_from,
)
from node.config import Settings, resolve_config_path, security_warnings
from node.db.models import (
    DELIVERY_STATES,
    JOB_STATES,
    Association,
    AuditEvent,
    Delivery,
    Instance,
    Job,
    Series,
    Study,
)

config_app = typer.Typer(help="Check or show the node configuration.", no_args_is_help=True)


def serve(config: ConfigOpt = None) -> None:
    """Run the node: Storage SCP, storage, audit, scheduler tick (until SIGTERM)."""
    from node.logs import setup_logging
    from node.pipelines import PipelineError
    from node.service import Node

    settings = settings_from(config)
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


def _probe_scp(settings: Settings) -> tuple[dict[str, Any], bool, str]:
    """(the heartbeat ``serve`` writes, is the SCP up, how we know).

    Without TLS the SCP is asked for a C-ECHO (a rejection of our AE title
    still says it is up); with TLS only the heartbeat's process is checked.
    """
    from node.dicom.echo import echo
    from node.service import heartbeat_path

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
    return heartbeat, scp_up, scp_detail


def _counts(s: Session) -> dict[str, Any]:
    """What the node holds: studies, series, instances, associations, jobs, deliveries."""
    return {
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
        "last_received_at": iso(s.scalar(select(func.max(Instance.received_at)))),
    }


def status(config: ConfigOpt = None, as_json: JsonObjectOpt = False) -> None:
    """Is the node up, what does it hold, how much disk is left; exit 1 if the SCP is down.

    ``--json`` prints one object: ``scp_up``, ``scp``, ``ae_title``, ``port``,
    ``pid``, ``heartbeat_at``, ``database``, ``storage_root``,
    ``disk_free_mb``, ``disk_floor_mb``, ``device``, the counts, ``jobs`` and
    ``deliveries`` (state -> count), ``jobs_running`` (``id:stage``) and
    ``last_received_at``.
    """
    settings = settings_from(config)
    db = open_db(settings)
    heartbeat, scp_up, scp_detail = _probe_scp(settings)
    with db.session() as s:
        counts = _counts(s)
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
        print_table(table)
    raise typer.Exit(0 if scp_up else 1)


def studies(config: ConfigOpt = None, as_json: JsonOpt = False) -> None:
    """List received studies with series and instance counts."""
    settings = settings_from(config)
    db = open_db(settings)
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
                "first_received_at": iso(st.first_received_at),
                "last_received_at": iso(st.last_received_at),
            }
            for st, n_series, n_inst in s.execute(q).all()
        ]
    db.dispose()
    emit(
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


def series(
    config: ConfigOpt = None,
    study: StudyOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """List series with counts, arrival times and stability."""
    settings = settings_from(config)
    db = open_db(settings)
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
                "first_received_at": iso(se.first_received_at),
                "last_received_at": iso(se.last_received_at),
                "stable_at": iso(se.stable_at),
            }
            for se, study_uid in s.execute(q).all()
        ]
    db.dispose()
    emit(
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


def instances(
    config: ConfigOpt = None,
    series_uid: Annotated[str | None, typer.Option("--series", help="Series Instance UID.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """List stored instances (file path, transfer syntax, size, checksum).

    ``conflicts`` counts re-sends of the SOP Instance UID with other content
    (the first copy kept); ``conflict_sha256`` lists what each re-send held.
    """
    settings = settings_from(config)
    db = open_db(settings)
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
                "received_at": iso(i.received_at),
            }
            for i, se_uid in s.execute(q).all()
        ]
    db.dispose()
    emit(
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


def associations(
    config: ConfigOpt = None,
    limit: Annotated[int, typer.Option(min=1, help="Newest N.")] = 50,
    as_json: JsonOpt = False,
) -> None:
    """List inbound associations: who, accepted or why rejected, what they brought."""
    settings = settings_from(config)
    db = open_db(settings)
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
                "started_at": iso(a.started_at),
                "ended_at": iso(a.ended_at),
            }
            for a in s.scalars(select(Association).order_by(Association.id.desc()).limit(limit))
        ]
    db.dispose()
    emit(
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
    settings = settings_from(target)
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
        f"  storage {settings.storage.root.resolve()}; database {mask_url(settings.database_url)}"
    )
    for p in pipelines:
        cards = ", ".join(folder.name for folder in p.signatures) or "none"
        out.print(
            f"  pipeline {p.name}: model {p.segmentation_model.name} (checksums OK); "
            f"signature cards {cards}",
            soft_wrap=True,
        )


@config_app.command("show")
def config_show(config: ConfigOpt = None) -> None:
    """Print the effective configuration (file + environment + defaults) as JSON."""
    settings = settings_from(config)
    data = json.loads(settings.model_dump_json())
    data["database"]["effective_url"] = mask_url(settings.database_url)
    if data["database"].get("url"):
        data["database"]["url"] = mask_url(data["database"]["url"])
    sys.stdout.write(json.dumps(data, indent=2) + "\n")
