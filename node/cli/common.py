"""What every ``sarcnode`` command shares: options, config and database opening, output.

``--json`` follows one rule, and each command's help says which it prints:
a command that lists rows prints one JSON array (``emit``), a command about
one thing one JSON object. Tables print every character of a UID
(``print_table``). A command that reads the node's database opens it with
``open_db``, which exits 2 when there is none where the config says.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.measure import Measurement
from rich.table import Table
from sqlalchemy import inspect, select
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError

from node.audit.context import AuditContext
from node.config import ConfigError, Settings, load_settings
from node.db.models import Delivery, Job
from node.db.session import Database, make_engine
from pipelines.share import config_dir

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
StudyOpt = Annotated[str | None, typer.Option("--study", help="Study Instance UID.")]


def settings_from(config: Path | None) -> Settings:
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
        return f"cannot reach the database {mask_url(settings.database_url)}: {first}", 1
    finally:
        engine.dispose()
    if has_schema:
        return None
    return (
        f"no node database at {mask_url(settings.database_url)} (it has no sarcnode tables): "
        "give the node's config; `sarcnode serve` creates them",
        2,
    )


def open_db(settings: Settings, *, create: bool = False) -> Database:
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


def iso(value: datetime | None) -> str | None:
    return value.replace(tzinfo=UTC).isoformat().replace("+00:00", "Z") if value else None


def print_table(table: Table) -> None:
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


def emit(rows: list[dict[str, Any]], as_json: bool, title: str, columns: list[str]) -> None:
    """``rows`` as one JSON array (``--json``), or a table of ``columns``."""
    if as_json:
        sys.stdout.write(json.dumps(rows, default=str) + "\n")
        return
    table = Table(title=title)
    for col in columns:
        table.add_column(col)
    for row in rows:
        table.add_row(*("" if row.get(c) is None else escape(str(row.get(c))) for c in columns))
    print_table(table)


def list_rows(
    ctx: typer.Context,
    config: Path | None,
    query: Callable[[], Any],
    row: Callable[[Any], dict[str, Any]],
    *,
    as_json: bool,
    title: str,
    columns: list[str],
) -> None:
    """A listing group's callback (``jobs``, ``deliveries``, ``audit``): its rows, newest last.

    When a subcommand follows (``sarcnode jobs --config X show 1``) only the
    group's ``--config`` is handed on in ``ctx.obj`` and nothing is listed.
    Else ``query()`` (a select, newest first) runs on the node's database and
    each row, oldest first, is turned by ``row`` into what :func:`emit` prints.
    """
    if ctx.invoked_subcommand is not None:
        ctx.obj = config
        return
    settings = settings_from(config)
    db = open_db(settings)
    with db.session() as s:
        rows = [row(r) for r in reversed(s.scalars(query()).all())]
    db.dispose()
    emit(rows, as_json, title, columns)


def newest(
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


def mask_url(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)
