"""The commit transaction's statements (and the tamper check's reads), run on the driver's cursor
with their SQL rendered once.

A hand back's one transaction runs about fourteen small statements (locked reads, the chain's
head, four event INSERTs, the rows' writes). Through `Connection.execute` each pays for
SQLAlchemy's execution: the cache key, the compiled cache, an execution context and a result
object, about 25 us a statement on SQLite and 120 on PostgreSQL here, more than the database
takes to run most of them. `write` and `read` send the very SQL and parameters that execution
would send (the statement compiled once per dialect, each parameter through its type's bind
processor, each column read through its type's result processor) by `Connection._cursor_execute`,
the path SQLAlchemy's own out-of-context statements take: the engine's cursor events still see
each statement, echo still logs it, and a driver error is raised (and a lost connection
invalidated) as anywhere else. A statement this cannot reproduce exactly (a column default
computed at execution, an expanding parameter) goes through `Connection.execute`, and so does
every statement under an SQLAlchemy whose internals this leans on are not there
(`SQLALCHEMY_INTERNALS`): slower, never wrong.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

from sqlalchemy import ClauseElement, Connection, Dialect, Executable
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.types import TypeEngine

__all__ = ["JsonText", "json_text", "read", "result_processor", "write"]

_Processor = Callable[[Any], Any]

# SQLAlchemy's internals this module uses (pyproject allows any 2.x). Checked once: if one is
# missing, every statement goes through `Connection.execute`, as it did before this module.
SQLALCHEMY_INTERNALS = all(
    (
        hasattr(Connection, "_cursor_execute"),
        hasattr(Connection, "_handle_dbapi_exception"),
        hasattr(TypeEngine, "_cached_bind_processor"),
        hasattr(TypeEngine, "_cached_result_processor"),
    )
)


@dataclass(frozen=True, eq=False)  # one per statement and dialect (`_prepared`'s cache)
class _Prepared:
    """A statement compiled for one dialect, as `Connection.execute` would send it."""

    sql: str
    positions: tuple[str, ...] | None  # parameter names in order (a positional paramstyle)
    processors: tuple[tuple[str, _Processor], ...]  # the parameters a type processes
    literals: dict[str, Any]  # the statement's own parameters' values (a LIMIT), processed
    returning: bool  # RETURNING the primary key a database made (an INSERT on PostgreSQL)
    result_types: tuple[Any, ...]  # the selected columns' types (a SELECT)
    # Their result processors (None: not one has one), found from the driver's types of the
    # first rows read and kept, as SQLAlchemy keeps a compiled statement's result metadata: the
    # cursor's description (about 45 us a statement with psycopg) is not read again.
    read_as: list[tuple[_Processor | None, ...] | None] = field(default_factory=list)


def _compile(statement: Executable, dialect: Dialect, keys: tuple[str, ...] | None) -> Any:
    """`statement` compiled for `dialect` (once per process and dialect: `_prepared`'s cache; a
    start-up rehearsal on the ledger's dialect, `coordinator.engine.warm_up`, fills it)."""
    columns = list(keys) if keys else None
    return cast(ClauseElement, statement).compile(dialect=dialect, column_keys=columns)


@functools.lru_cache(maxsize=256)
def _prepared(
    statement: Executable, dialect: Dialect, keys: tuple[str, ...] | None
) -> _Prepared | None:
    """`statement` compiled for `dialect` with the parameters `keys` (an INSERT's columns: None
    for a statement whose parameters are its own bindparams), or None if its execution does more
    than send that SQL (a Python column default, an expanding IN, a schema translation...), or
    than this SQLAlchemy can be relied on for (`SQLALCHEMY_INTERNALS`, a compiler attribute)."""
    if not SQLALCHEMY_INTERNALS:
        return None
    try:
        return _prepare(_compile(statement, dialect, keys), dialect)
    except AttributeError:  # a compiler without one of the attributes read below
        return None


def _prepare(compiled: Any, dialect: Dialect) -> _Prepared | None:
    if not isinstance(compiled, SQLCompiler) or (
        compiled.insert_prefetch
        or compiled.update_prefetch
        or getattr(compiled, "postfetch", None)  # set by a DML statement's compilation
        or compiled.escaped_bind_names
        or any(bind.expanding or bind.callable is not None for bind in compiled.binds.values())
    ):
        return None
    processors: list[tuple[str, _Processor]] = []
    literals: dict[str, Any] = {}
    for name, bind in compiled.binds.items():
        process = bind.type._cached_bind_processor(dialect)
        if bind.required:
            if process is not None:
                processors.append((name, process))
        else:
            value = bind.effective_value
            literals[name] = process(value) if process is not None else value
    returning = bool(compiled.effective_returning)
    result_types = tuple(column[3] for column in compiled._result_columns)
    positions = tuple(compiled.positiontup) if compiled.positiontup is not None else None
    return _Prepared(
        compiled.string, positions, tuple(processors), literals, returning, result_types
    )


class JsonText(str):
    """A JSON parameter's text, made already by the serializer the dialect's JSON type uses
    (`json_text`): sent as is on the cursor, not encoded again. `value`: what it encodes (a
    statement that goes through `Connection.execute` instead is given that)."""

    value: Any


def json_text(dialect: Dialect, value: Any) -> JsonText | None:
    """`value` as the text a JSON column's parameter sends on `dialect` (SQLite: the JSON
    type's bind processor makes it; PostgreSQL: psycopg's JSON dumper, given the same
    serializer by SQLAlchemy), or None for another dialect."""
    if dialect.name not in ("sqlite", "postgresql"):
        return None
    serializer = getattr(dialect, "_json_serializer", None) or json.dumps
    text = JsonText(serializer(value))
    text.value = value
    return text


def _arguments(prepared: _Prepared, params: Mapping[str, Any]) -> Any:
    args = {**prepared.literals, **params} if prepared.literals else dict(params)
    for name, process in prepared.processors:
        value = args[name]
        if type(value) is JsonText:  # the text the processor would send (`json_text`)
            args[name] = str(value)
        else:
            args[name] = process(value)  # None too: a JSON column's None is JSON null
    if prepared.positions is not None:
        return tuple(args[name] for name in prepared.positions)
    return args


def result_processor(
    kind: TypeEngine[Any], dialect: Dialect, code: Any = None
) -> _Processor | None:
    """What turns a value of a column of type `kind`, as the driver returns it (its type `code`
    in the cursor's description), into the value `Connection.execute` gives (None: as is):
    SQLAlchemy's own memo of it, or under an SQLAlchemy without that (`SQLALCHEMY_INTERNALS`)
    made as the memo makes it, by the type's dialect implementation (public API, not memoized:
    callers cache what it gives)."""
    if SQLALCHEMY_INTERNALS:
        return kind._cached_result_processor(dialect, code)
    return kind.dialect_impl(dialect).result_processor(dialect, code)


def _result_processors(
    prepared: _Prepared, dialect: Dialect, codes: tuple[Any, ...]
) -> tuple[_Processor | None, ...] | None:
    """Each selected column's result processor for the driver's type `codes` of them, or None
    if not one has one."""
    processors = tuple(
        result_processor(kind, dialect, code)
        for kind, code in zip(prepared.result_types, codes, strict=True)
    )
    return processors if any(processors) else None


def write(
    connection: Connection,
    statement: Executable,
    params: Mapping[str, Any],
    *,
    keys: tuple[str, ...] | None = None,
) -> Any:
    """Runs an INSERT, UPDATE or DELETE in the connection's open transaction; for an INSERT
    (`keys`: the columns it is given, its parameters' names in a fixed order) returns the
    key the database made for the row (an autoincrement key; SQLite: the rowid)."""
    prepared = _prepared(statement, connection.dialect, keys)
    if prepared is None or not connection.in_transaction():
        given = {n: v.value if type(v) is JsonText else v for n, v in params.items()}
        result = connection.execute(statement, given)
        if keys is not None and result.inserted_primary_key is not None:
            return result.inserted_primary_key[0]
        return None
    cursor = connection.connection.cursor()
    try:
        connection._cursor_execute(cursor, prepared.sql, _arguments(prepared, params))
        if prepared.returning:
            row = cursor.fetchone()
            return row[0] if row is not None else None
        # The key the database made: the INSERT's rowid (SQLite); a driver without one
        # (psycopg) had the key RETURNING if the database makes one.
        return getattr(cursor, "lastrowid", None) if keys is not None else None
    finally:
        cursor.close()


def read(
    connection: Connection, statement: Executable, params: Mapping[str, Any]
) -> list[tuple[Any, ...]]:
    """The rows a SELECT returns (tuples, as the ledger's drivers fetch them), each column as
    `Connection.execute` would give it (a column with no result processor: as the driver
    returns it, which is what the tamper check reads, `_run_check`)."""
    prepared = _prepared(statement, connection.dialect, None)
    if prepared is None:
        return [tuple(row) for row in connection.execute(statement, dict(params))]
    cursor = connection.connection.cursor()
    try:
        args = _arguments(prepared, params)
        connection._cursor_execute(cursor, prepared.sql, args)
        try:
            rows = cursor.fetchall()
        except BaseException as exc:  # as SQLAlchemy's result raises it (a full disk...)
            connection._handle_dbapi_exception(exc, prepared.sql, args, cursor, None)
        if not rows or not prepared.result_types:
            return list(rows)
        if not prepared.read_as:  # two threads may both find them: the same, either kept
            codes = tuple(column[1] for column in cursor.description)
            prepared.read_as.append(_result_processors(prepared, connection.dialect, codes))
        processors = prepared.read_as[0]
        if processors is None:
            return list(rows)
        return [
            tuple(
                value if process is None else process(value)
                for process, value in zip(processors, row, strict=True)
            )
            for row in rows
        ]
    finally:
        cursor.close()
