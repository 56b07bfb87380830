"""The engine's per-hand-back tamper check of one run, with little work per row of the run.

`EventLog.stored_run_mismatches` checks the run row, its hops and the checkpoint it hands out
against the events that wrote them before every lease. Decoding each row (result processing,
a `StateRow` and its `repr`) and comparing it with its event cost 28 ms a check at 300 hops. Here
the rows are read from SQL as the driver returns them and compared, value and type, with the same
rows as the last check found them sound; the events they name are read as stored (with whether
the next event links to each) and compared, value and type, with those events as their hashes
last verified (`VerifiedEvents.stored`). Only a row that differs
is decoded (from the values just read) and compared with its event (as just read) again; an
event that differs, a hop gone or added, or any finding sends the whole run through the full
check (`full`), which names what differs exactly as before and, when all is sound, renews what
is kept (`RunChecks`). Nothing is taken from memory but the values to compare with: rows and
events are read from SQL on every check, in three statements (run, hops, events; a fourth for
the checkpoint handed out), each sent on the driver's cursor as the commit's are (`_cursor.read`:
no column of theirs has a result processor, so the rows are the driver's).
"""

from __future__ import annotations

import functools
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa

from coordinator.ledger import _cursor
from coordinator.ledger._integrity import (
    _KEY_COLUMNS,
    STATE_COLUMNS,
    RowMismatch,
    StateRow,
    StoredEvent,
    VerifiedEvents,
    compare_with_events,
    stored_columns,
)
from coordinator.ledger.models import Base, CheckpointRow, EventRow, HopRow, RunRow

__all__ = ["RunChecks", "checked_run_mismatches"]

RowName = tuple[str, str]  # (table, key)
RowRead = tuple[tuple[Any, ...], tuple[type, ...]]  # a row's values as the driver returns them


def _raw(column: sa.ColumnElement[Any]) -> sa.ColumnElement[Any]:
    """The column as the driver returns it (JSON as its stored text): no result processing."""
    if isinstance(column.type, sa.JSON):
        return sa.cast(column, sa.Text)
    return sa.type_coerce(column, sa.types.NullType())


_ROWS: tuple[tuple[type[Base], str], ...] = (
    (RunRow, "id"),
    (HopRow, "run_id"),
    (CheckpointRow, "sha256"),
)
_MODELS: dict[str, type[Base]] = {model.__tablename__: model for model, _ in _ROWS}


@functools.cache
def _raw_rows_query(model: type[Base], column: str) -> sa.Select[Any]:
    """Key, ledger_seq and state columns of the rows whose `column` is ``value``, unprocessed."""
    table = model.__table__
    [key] = _KEY_COLUMNS[model]
    columns = (key, "ledger_seq", *STATE_COLUMNS[model])
    return sa.select(*(_raw(table.c[c]) for c in columns)).where(
        table.c[column] == sa.bindparam("value")
    )


@functools.lru_cache(maxsize=64)
def _state_processors(
    model: type[Base], dialect: sa.Dialect
) -> tuple[Callable[[Any], Any] | None, ...]:
    """What turns each of `model`'s state columns as `_raw_rows_query` reads them into the value
    `state_rows` reads (the column type's result processing, `_cursor.result_processor`; JSON
    stays its stored text)."""
    table = model.__table__
    return tuple(
        None
        if isinstance(table.c[c].type, sa.JSON)
        else _cursor.result_processor(table.c[c].type, dialect)
        for c in STATE_COLUMNS[model]
    )


def _state_row(model: type[Base], values: tuple[Any, ...], dialect: sa.Dialect) -> StateRow:
    """The `StateRow` (as `state_rows` reads it) of a row `_raw_rows_query` read as `values`."""
    processors = _state_processors(model, dialect)
    read = tuple(
        value if process is None or value is None else process(value)
        for process, value in zip(processors, values[2:], strict=True)
    )
    return StateRow(model, str(values[0]), values[1], read, True)


@functools.cache
def _events_query() -> sa.Select[Any]:
    """The events the run's rows and the checkpoint name, as stored (`StoredEvent`, after their
    seq), each with whether the next event links to it (True also when there is none)."""
    events = EventRow.__table__
    successor = events.alias("successor")
    named = sa.union(
        *(
            sa.select(model.__table__.c.ledger_seq).where(
                model.__table__.c[column] == sa.bindparam(f"{model.__tablename__}_value")
            )
            for model, column in _ROWS
        )
    )
    # Read as the driver returns it (SQLite: 0 or 1), as every other column: no row processed.
    linked = sa.or_(successor.c.prev_hash.is_(None), successor.c.prev_hash == events.c.hash)
    return (
        sa.select(events.c.seq, *stored_columns(), _raw(linked))
        .outerjoin(successor, successor.c.seq == events.c.seq + 1)
        .where(events.c.seq.in_(named))
    )


@dataclass
class _Known:
    """A run's rows as the last check found them sound, and its events' texts as verified."""

    rows: dict[RowName, RowRead] = field(default_factory=dict)  # values[1]: its ledger_seq
    events: dict[int, RowRead] = field(default_factory=dict)  # (StoredEvent, its types)


class RunChecks:
    """Per run, its rows as last found sound and the texts of the events they name.

    Kept for the `limit` runs checked last. Only ever a shortcut: a difference sends the row
    (or the whole run) through the full comparison, which renews what is kept.
    """

    def __init__(self, limit: int = 64) -> None:
        self._limit = limit
        self._runs: OrderedDict[str, _Known] = OrderedDict()
        self._lock = threading.Lock()
        self.full_checks = 0  # checks that compared the whole run (for tests and profiles)
        self.rows_compared = 0  # rows compared with their events by the short check

    def get(self, run_id: str) -> _Known | None:
        with self._lock:
            known = self._runs.get(run_id)
            if known is not None:
                self._runs.move_to_end(run_id)
            return known

    def put(self, run_id: str, known: _Known | None) -> None:
        with self._lock:
            self._runs.pop(run_id, None)
            if known is not None:
                self._runs[run_id] = known
                while len(self._runs) > self._limit:
                    self._runs.popitem(last=False)


def _read_rows(
    connection: sa.Connection, run_id: str, checkpoint_sha256: str | None
) -> dict[RowName, RowRead]:
    found: dict[RowName, RowRead] = {}
    for model, column in _ROWS:
        value = checkpoint_sha256 if model is CheckpointRow else run_id
        if value is None:
            continue
        for values in _cursor.read(connection, _raw_rows_query(model, column), {"value": value}):
            found[(model.__tablename__, str(values[0]))] = (values, tuple(map(type, values)))
    return found


def _read_events(
    connection: sa.Connection, run_id: str, checkpoint_sha256: str | None
) -> dict[int, RowRead] | None:
    """The events the run's rows name, as stored (None if one does not link to the next)."""
    values = {"runs_value": run_id, "hops_value": run_id, "checkpoints_value": checkpoint_sha256}
    found: dict[int, RowRead] = {}
    for seq, *stored, linked in _cursor.read(connection, _events_query(), values):
        if not linked:
            return None
        found[seq] = (tuple(stored), tuple(map(type, stored)))
    return found


def _events_match(
    seqs: set[int],
    known: dict[int, RowRead],
    verified: VerifiedEvents,
    read: dict[int, RowRead] | None,
) -> dict[int, RowRead] | None:
    """The events as verified if those read are exactly those, value and type (else None)."""
    if read is None or len(read) != len(seqs):
        return None
    for seq in seqs:
        expected = known.get(seq)
        if expected is None:
            stored = verified.stored(seq)
            if stored is None:
                return None
            expected = (stored, tuple(map(type, stored)))
        if read.get(seq) != expected:
            return None
    return read


def checked_run_mismatches(
    engine: sa.Engine,
    checks: RunChecks,
    verified: VerifiedEvents,
    run_id: str,
    checkpoint_sha256: str | None,
    full: Callable[[], list[RowMismatch]],
) -> list[RowMismatch]:
    """`full()`'s findings, found by comparing with what was sound before where it can.

    Raises:
        KeyError: The run has no row (from `full`).
    """
    known = checks.get(run_id)
    if known is not None:
        with engine.connect() as connection:
            if _sound_as_known(connection, checks, verified, known, run_id, checkpoint_sha256):
                return []
    checks.put(run_id, None)
    checks.full_checks += 1
    with engine.connect() as connection:
        rows = _read_rows(connection, run_id, checkpoint_sha256)
        events = _read_events(connection, run_id, checkpoint_sha256)
    found = full()
    if found:
        return found
    with engine.connect() as connection:  # the same before and after: what `full` compared
        if _read_rows(connection, run_id, checkpoint_sha256) != rows or events != _read_events(
            connection, run_id, checkpoint_sha256
        ):
            return found
    seqs = {name: values[1] for name, (values, _) in rows.items()}
    if all(isinstance(seq, int) for seq in seqs.values()):
        expected = _events_match(set(seqs.values()), {}, verified, events)
        if expected is not None:
            checks.put(run_id, _Known(rows=rows, events=expected))
    return found


def _sound_as_known(
    connection: sa.Connection,
    checks: RunChecks,
    verified: VerifiedEvents,
    known: _Known,
    run_id: str,
    checkpoint_sha256: str | None,
) -> bool:
    """Whether the rows read are as last found sound or compare sound with their events now,
    and the events they name are exactly as verified; updates `known` if so. False sends the
    run through the full check."""
    rows = _read_rows(connection, run_id, checkpoint_sha256)
    if ("runs", run_id) not in rows:
        return False
    if checkpoint_sha256 is not None and ("checkpoints", checkpoint_sha256) not in rows:
        return False
    if {n for n in rows if n[0] != "checkpoints"} != {
        n for n in known.rows if n[0] != "checkpoints"
    }:
        return False  # a hop gone or added behind the ledger's back (or by another writer)
    changed = {name for name, read in rows.items() if known.rows.get(name) != read}
    events = _read_events(connection, run_id, checkpoint_sha256)
    if events is None:
        return False
    seqs = {name: known.rows[name][0][1] for name in rows if name not in changed}
    if changed:
        # Compared with their events as just read (one read for the rows and one for the
        # events they name, no statement per changed row).
        states: list[StateRow] = []
        for name in changed:
            values = rows[name][0]
            if not isinstance(values[1], int):
                return False  # names no event: the full check says so
            seqs[name] = values[1]
            states.append(_state_row(_MODELS[name[0]], values, connection.dialect))
        checks.rows_compared += len(states)
        # Every event read links to the next (else `events` is None, above).
        named: dict[int, tuple[StoredEvent, bool]] = {
            seq: (read[0], True) for seq, read in events.items()
        }
        if compare_with_events(states, named, verified):
            return False  # the full check names them, with the rest of the run's findings
    expected = _events_match(set(seqs.values()), known.events, verified, events)
    if expected is None:
        return False
    # What was read, and nothing else: a checkpoint handed out before is not kept on.
    known.rows = dict(rows)
    known.events = expected
    return True
