"""Statements run directly on a session's DBAPI connection: the store path's hot statements.

Why: SQLAlchemy Core builds, caches and executes a statement through several
layers; for the handful of small statements each received instance runs
(look-ups, upserts, a counter, the audit head and its insert) that cost more
than the statements themselves (~0.3 ms each, ~4 ms per instance). Here the
SQL is plain text, written once with ``?`` placeholders (turned into ``%s``
for psycopg), and executed on the DBAPI cursor of the session's own
connection, so it runs inside the session's transaction and savepoints
(``BEGIN IMMEDIATE`` on SQLite, as every transaction). The drivers keep the
statements prepared: sqlite3 caches them per connection, psycopg prepares a
statement after its fifth execution.

Values go through the same conversions SQLAlchemy applies (datetimes as
SQLAlchemy stores them on SQLite), and a DBAPI error is raised as the
SQLAlchemy exception the ORM path would raise (``OperationalError``,
``IntegrityError``...), so callers map failures the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import DateTime
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

_Processor = Callable[[Any], Any]

#: (paramstyle, SQL as written) -> SQL for the driver.
_STATEMENTS: dict[tuple[str, str], str] = {}
#: dialect name -> (datetime to the driver, from the driver).
_DATETIME: dict[str, tuple[_Processor | None, _Processor | None]] = {}


def _statement(dialect: Dialect, sql: str) -> str:
    key = (dialect.paramstyle, sql)
    stmt = _STATEMENTS.get(key)
    if stmt is None:
        stmt = sql if dialect.paramstyle == "qmark" else sql.replace("?", "%s")
        _STATEMENTS[key] = stmt
    return stmt


def _datetime(dialect: Dialect) -> tuple[_Processor | None, _Processor | None]:
    found = _DATETIME.get(dialect.name)
    if found is None:
        kind = DateTime().dialect_impl(dialect)
        found = (kind.bind_processor(dialect), kind.result_processor(dialect, None))
        _DATETIME[dialect.name] = found
    return found


#: session.info key: (the transaction it was made in, its Direct).
_INFO_KEY = "sarcnode.direct"


def direct(session: Session) -> Direct:
    """The :class:`Direct` of ``session``'s innermost transaction (made once per transaction).

    Made again inside each savepoint: asking the session for its connection
    there is what makes SQLAlchemy emit the ``SAVEPOINT``, so a savepoint
    rolled back undoes the statements run in it.
    """
    current = session.get_nested_transaction() or session.get_transaction()
    cached = session.info.get(_INFO_KEY)
    if cached is not None and current is not None and cached[0] is current:
        return cached[1]  # type: ignore[no-any-return]
    made = Direct(session)  # begins the transaction (or emits the savepoint) when due
    session.info[_INFO_KEY] = (session.get_nested_transaction() or session.get_transaction(), made)
    return made


class Direct:
    """The DBAPI cursor of ``session``'s connection, for one unit of work in its transaction.

    Create it inside the transaction (it begins it when not begun yet) and
    use it only there: a later transaction of the same session may run on
    another connection. :func:`direct` keeps one per transaction and savepoint.
    """

    def __init__(self, session: Session) -> None:
        connection = session.connection()
        self.dialect = connection.dialect
        self.postgresql = self.dialect.name == "postgresql"
        self._cursor = connection.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
        self._error: type[Exception] = self.dialect.loaded_dbapi.Error
        self._to_db, self._from_db = _datetime(self.dialect)

    def run(self, sql: str, params: Sequence[Any] = ()) -> Any:
        """Execute ``sql`` (``?`` placeholders); returns the cursor for fetching.

        Raises
        ------
        sqlalchemy.exc.DBAPIError
            The driver's error, wrapped as SQLAlchemy wraps it
            (``OperationalError`` for a locked, read-only or full database...).
        """
        stmt = _statement(self.dialect, sql)
        try:
            self._cursor.execute(stmt, params)
        except self._error as exc:
            # Parameters hidden: they hold patient attributes, never for a log line.
            raise DBAPIError.instance(
                stmt, params, exc, self._error, hide_parameters=True, dialect=self.dialect
            ) from exc
        return self._cursor

    def one(self, sql: str, params: Sequence[Any] = ()) -> tuple[Any, ...] | None:
        """The first row of ``sql``'s result, or None."""
        row = self.run(sql, params).fetchone()
        return tuple(row) if row is not None else None

    def scalar(self, sql: str, params: Sequence[Any] = ()) -> Any:
        """The first column of the first row, or None."""
        row = self.one(sql, params)
        return row[0] if row is not None else None

    def insert(self, sql: str, params: Sequence[Any]) -> int:
        """Run an ``INSERT ... RETURNING id`` and return the new row's id."""
        return int(self.run(sql, params).fetchone()[0])

    def when(self, value: datetime | None) -> Any:
        """A datetime as the driver takes it (SQLAlchemy's storage format on SQLite)."""
        if value is None or self._to_db is None:
            return value
        return self._to_db(value)

    def datetime_of(self, value: Any) -> datetime | None:
        """A datetime column's value as SQLAlchemy returns it."""
        if value is None or self._from_db is None:
            return value  # type: ignore[no-any-return]
        return self._from_db(value)  # type: ignore[no-any-return]
