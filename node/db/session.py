"""Engine and session factory, created from settings in ``main()``.

SQLite runs in WAL mode (the CLI reads while ``serve`` writes) and every
transaction starts with ``BEGIN IMMEDIATE``, so writers queue on the database
lock instead of failing half-way with "database is locked". PostgreSQL
serialises audit appends with a transaction-scoped advisory lock (see
:mod:`node.audit.trail`), whose commit hooks a ``Database`` built with an
audit context installs. Schema changes go through Alembic only.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

if TYPE_CHECKING:
    from node.audit.context import AuditContext


def make_engine(url: str, *, echo: bool = False) -> Engine:
    """Create the engine for ``url`` with the per-backend settings described above."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            url, echo=echo, connect_args={"timeout": 60, "check_same_thread": False}
        )

        @event.listens_for(engine, "connect")
        def _sqlite_connect(dbapi_connection: Any, _record: Any) -> None:
            dbapi_connection.isolation_level = None  # we issue BEGIN ourselves
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=FULL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA busy_timeout=60000")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(connection: Any) -> None:
            connection.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    return create_engine(url, echo=echo, pool_pre_ping=True, pool_size=10, max_overflow=20)


def alembic_config(url: str) -> Config:
    """An Alembic config pointing at the packaged migrations and ``url``."""
    cfg = Config()
    migrations = Path(__file__).with_name("migrations")  # packaged beside this module
    cfg.set_main_option("script_location", str(migrations))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def upgrade(engine: Engine) -> None:
    """Bring the schema to the newest migration (idempotent)."""
    cfg = alembic_config(engine.url.render_as_string(hide_password=False))
    with engine.begin() as connection:
        cfg.attributes["connection"] = connection
        command.upgrade(cfg, "head")


class Database:
    """The engine plus a session factory; one per process, built from settings.

    ``audit`` (the node's audit key and anchor) makes every session's audit
    events keyed and anchored; without it events are plain SHA-256, which
    :func:`node.audit.trail.record` refuses once the chain is keyed.
    """

    def __init__(
        self,
        url: str,
        *,
        echo: bool = False,
        migrate: bool = True,
        audit: AuditContext | None = None,
    ) -> None:
        self.url = url
        self.engine = make_engine(url, echo=echo)
        if migrate:
            upgrade(self.engine)
        self.audit = audit
        if audit is None:
            self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        else:
            from node.audit.trail import SESSION_KEY, attach

            self._sessions = sessionmaker(
                self.engine, expire_on_commit=False, info={SESSION_KEY: audit}
            )
            attach(self._sessions)

    @property
    def dialect(self) -> str:
        """``sqlite`` or ``postgresql``."""
        return self.engine.dialect.name

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session whose transaction commits on success and rolls back on error."""
        with self._sessions() as session, session.begin():
            yield session

    def dispose(self) -> None:
        """Write any pending audit anchor, then close all pooled connections."""
        if self.audit is not None:
            self.audit.close()
        self.engine.dispose()

    def safe_url(self) -> str:
        """The URL with any password masked, for status output."""
        return make_url(self.url).render_as_string(hide_password=True)
