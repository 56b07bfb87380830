"""State rows under the event chain: each write's row snapshot rides in its event; checks compare.

Every transaction that changes a state row (runs, hops, checkpoints, evaluations, sites,
revocations, statistics requests and answers) appends one chained event; that event's payload
carries, under ``state_rows``, a snapshot of each row it wrote (short columns verbatim, long ones
as a sha256), and the row stores the event's ``seq`` in ``ledger_seq``. A row that no longer
matches the newest snapshot of it in the chain was changed outside the ledger.
"""

from __future__ import annotations

import functools
import hashlib
import json
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from json.encoder import encode_basestring_ascii
from typing import Any, Protocol

import sqlalchemy as sa
from sqlalchemy import inspect, select
from sqlalchemy.orm import Session

from coordinator.ledger._canonical import snapshot_json
from coordinator.ledger.models import (
    Base,
    CheckpointRow,
    EvaluationRow,
    EventRow,
    HopRow,
    RevocationRow,
    RoundRow,
    RunRow,
    SiteRow,
    StatisticsAnswerRow,
    StatisticsRequestRow,
)

__all__ = [
    "MISMATCH_EVENT",
    "STATE_COLUMNS",
    "STATE_ROWS_KEY",
    "RowMismatch",
    "StateIndex",
    "StateRow",
    "StoredEvent",
    "VerifiedEvents",
    "append_baseline",
    "carry_forward",
    "compare_snapshot",
    "compare_with_events",
    "row_entry",
    "row_key",
    "state_mismatches",
    "state_rows",
    "stored_columns",
    "stored_event",
    "tracked",
    "values_entry",
]

STATE_ROWS_KEY = "state_rows"  # payload key of an event's row snapshots
MISMATCH_EVENT = "ledger.mismatch"  # the engine found rows that differ from their events
_VERBATIM_CHARS = 160  # longer column values are kept as their sha256
# A text's JSON as `snapshot_json` writes it (its encoder escapes text with this function).
_escaped = encode_basestring_ascii

# The columns each snapshot covers: every column the engine or an operator reads. A column
# added to a state table must be added here too, or edits to it go unnoticed.
STATE_COLUMNS: dict[type[Base], tuple[str, ...]] = {
    RunRow: ("name", "status", "plan", "base_model_sha256", "created_at", "finished_at",
             "final_sha256", "error"),
    HopRow: ("run_id", "index", "site", "hyperparameters", "status", "lease_token", "attempts",
             "leased_at", "input_sha256", "output_sha256", "metrics", "train_started_at_ns",
             "train_finished_at_ns", "committed_at", "error_code", "error"),
    CheckpointRow: ("size", "run_id", "hop_id", "producer_site", "parent_sha256", "manifest",
                    "tensors", "signature", "producer_certificate", "stored_at", "status"),
    EvaluationRow: ("run_id", "checkpoint_sha256", "site", "split", "status", "lease_token",
                    "metrics", "error", "created_at", "finished_at"),
    SiteRow: ("agent_version", "capabilities", "base_models", "datasets", "certificate_serial",
              "certificate_expires_at", "first_seen_at", "last_seen_at"),
    RevocationRow: ("reason", "revoked_by", "revoked_at"),
    StatisticsRequestRow: ("dataset", "task_type", "min_count", "noise_std", "sites", "status",
                           "combined", "error", "created_at", "finished_at", "expires_at",
                           "cv_folds"),
    StatisticsAnswerRow: ("status", "lease_token", "aggregates", "error_code", "error",
                          "finished_at"),
    RoundRow: ("run_id", "number", "status", "members", "input_sha256", "output_sha256",
               "server_state_sha256", "contributions", "dropped", "metrics", "started_at",
               "finished_at", "error"),
}  # fmt: skip


def _canonical(value: Any) -> Any:
    """A column value as the snapshot stores it (datetimes as UTC ISO-8601, whatever the driver).

    No column of the ledger holds bytes, so no snapshot does: bytes come back only from a value
    written behind the ledger's back (SQLite keeps a BLOB put in a text column). They become a
    value no snapshot holds, `{"$bytes": hex}`, so that the edit is named, not a crash."""
    if isinstance(value, bytes | bytearray | memoryview):
        return {"$bytes": bytes(value).hex()}
    if isinstance(value, datetime):
        if value.tzinfo is None:  # SQLite hands back naive UTC
            value = value.replace(tzinfo=UTC)
        return value.astimezone(UTC).isoformat(timespec="microseconds")
    return value


def values_entry(table: str, key: str, values: Mapping[str, Any]) -> dict[str, Any]:
    """The snapshot of one row from its column values."""
    verbatim: dict[str, Any] = {}
    digests: dict[str, str] = {}
    for column, raw in values.items():
        value = _canonical(raw)
        kind = type(value)
        if value is None or kind is bool or kind is float:
            verbatim[column] = value  # its JSON is at most a few characters: never a digest
            continue
        # A text's or an integer's JSON without the encoder's call (the same text it makes).
        text = _escaped(value) if kind is str else int.__repr__(value) if kind is int else None
        if text is None:
            text = snapshot_json(value)
        if len(text) > _VERBATIM_CHARS:
            digests[column] = hashlib.sha256(text.encode("ascii")).hexdigest()
        else:
            verbatim[column] = value
    return {"table": table, "key": key, "values": verbatim, "digests": digests}


def row_key(row: Base) -> str:
    """The row's primary key as one string ("/" between the parts of a composite key)."""
    return "/".join(str(part) for part in inspect(row).mapper.primary_key_from_instance(row))


def row_entry(row: Base, *, deleted: bool = False) -> dict[str, Any]:
    """The snapshot of one ORM row (or the record that it was deleted)."""
    table = type(row).__tablename__
    if deleted:
        return {"table": table, "key": row_key(row), "deleted": True}
    columns = STATE_COLUMNS[type(row)]
    return values_entry(table, row_key(row), {c: getattr(row, c) for c in columns})


def _short(value: Any) -> str:
    text = value if isinstance(value, str) else snapshot_json(value)
    return text if len(text) <= 80 else text[:77] + "..."


@dataclass(frozen=True)
class RowMismatch:
    """A state row that differs from the ledger event that last wrote it."""

    table: str
    key: str
    column: str  # "" when the whole row is missing on one side
    message: str

    def to_json(self) -> dict[str, str]:
        return {
            "table": self.table,
            "key": self.key,
            "column": self.column,
            "message": self.message,
        }


def compare_snapshot(
    table: str, key: str, seq: int, entry: Mapping[str, Any], current: Mapping[str, Any]
) -> list[RowMismatch]:
    """Names every column where the current row (its snapshot entry) differs from event `seq`'s."""
    recorded_values, recorded_digests = entry.get("values", {}), entry.get("digests", {})
    if current["digests"] == recorded_digests and snapshot_json(current["values"]) == snapshot_json(
        recorded_values
    ):
        return []  # the same canonical text column for column: nothing to name
    found: list[RowMismatch] = []
    prefix = f"{table} row {key}"
    for column, value in entry.get("values", {}).items():
        now = current["values"].get(column, current["digests"].get(column))
        if column not in current["values"] or snapshot_json(now) != snapshot_json(value):
            found.append(
                RowMismatch(
                    table,
                    key,
                    column,
                    f"{prefix} column {column}: ledger event #{seq} says {_short(value)!r}, "
                    f"table says {_short(now)!r}",
                )
            )
    for column, digest in entry.get("digests", {}).items():
        now = current["digests"].get(column)
        if now != digest:
            shown = now if now is not None else _short(current["values"].get(column))
            found.append(
                RowMismatch(
                    table,
                    key,
                    column,
                    f"{prefix} column {column}: ledger event #{seq} holds a value of sha256 "
                    f"{digest[:12]}..., the table's differs ({str(shown)[:12]}...)",
                )
            )
    return found


class _Event(Protocol):
    """An event as stored: an `EventRow`, or a plain result row with the same columns."""

    @property
    def seq(self) -> int: ...
    @property
    def kind(self) -> str: ...
    @property
    def payload(self) -> dict[str, Any]: ...


def _entries(event: _Event) -> Iterator[Mapping[str, Any]]:
    entries = event.payload.get(STATE_ROWS_KEY) if isinstance(event.payload, dict) else None
    if isinstance(entries, list):
        yield from (e for e in entries if isinstance(e, dict))


def carry_forward(
    previous: EventRow | None,
    entry: dict[str, Any],
    assigned: set[str],
    recorded: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """`entry` with every column not in `assigned` as `previous` recorded it for the same row
    (or as `recorded`, that row's entry in it, when the caller found it already)."""
    if previous is not None:
        recorded = next(
            (
                e
                for e in _entries(previous)
                if (e.get("table"), e.get("key")) == (entry["table"], entry["key"])
            ),
            None,
        )
    if recorded is None or recorded.get("deleted"):
        return entry
    values, digests = dict(entry["values"]), dict(entry["digests"])
    for column in set(values) | set(digests):
        if column in assigned:
            continue
        values.pop(column, None)
        digests.pop(column, None)
        if column in recorded.get("values", {}):
            values[column] = recorded["values"][column]
        elif column in recorded.get("digests", {}):
            digests[column] = recorded["digests"][column]
    return {**entry, "values": values, "digests": digests}


# One event as stored: every column its hash covers, the payload as its stored text, and the hash.
StoredEvent = tuple[str, str, str | None, str | None, str | None, str | None, str, str]


class VerifiedEvents:
    """Events whose hash this process recomputed from their stored columns and found sound.

    The engine checks a run's rows against the events that wrote them before each commit, and
    most of those events are the same from one commit to the next. An event whose stored columns
    (the payload compared as its stored text) are exactly those verified before verifies again
    without its hash being recomputed; any difference in any column recomputes it. Row snapshots
    are read from the event as verified. Likewise a row read holding exactly the values that
    matched that same (still identical) event before is not compared column by column again.
    At most `limit` events (and four times as many rows) are kept, oldest dropped first.
    """

    def __init__(self, limit: int = 4096) -> None:
        self._limit = limit
        # seq -> (the event as stored, its row snapshots; None: not decoded yet, `appended`)
        self._events: dict[
            int, tuple[StoredEvent, dict[tuple[str, str], Mapping[str, Any]] | None]
        ] = {}
        # (table, key) -> (seq, StateRow.exact()) of a row found matching that event's snapshot
        self._rows: dict[tuple[str, str], tuple[int, str]] = {}
        self._lock = threading.Lock()

    def entries(
        self, seq: int, stored: StoredEvent
    ) -> dict[tuple[str, str], Mapping[str, Any]] | None:
        """Event `seq`'s row snapshots if it was verified stored exactly as `stored`, else None."""
        with self._lock:
            known = self._events.get(seq)
        if known is None or known[0] != stored:
            return None
        if known[1] is None:  # appended here (`appended`): its snapshots read once, now
            entries = _snapshots(json.loads(stored[5])) if stored[5] is not None else {}
            self.add(seq, stored, entries)
            return entries
        return known[1]

    def appended(self, seq: int, stored: StoredEvent) -> None:
        """Event `seq`, which this process appended and committed, stored as `stored`: its
        hash is the one computed over its payload as appended, whose stored text `stored`
        holds (one JSON encoding, the one its INSERT sent): a check that reads it back
        exactly so does not hash it again (an edit of any column does)."""
        with self._lock:
            self._put(seq, stored, None)

    def add(
        self, seq: int, stored: StoredEvent, entries: dict[tuple[str, str], Mapping[str, Any]]
    ) -> None:
        with self._lock:
            self._put(seq, stored, entries)

    def _put(
        self,
        seq: int,
        stored: StoredEvent,
        entries: dict[tuple[str, str], Mapping[str, Any]] | None,
    ) -> None:
        self._events.pop(seq, None)
        self._events[seq] = (stored, entries)
        while len(self._events) > self._limit:
            del self._events[next(iter(self._events))]

    def stored(self, seq: int) -> StoredEvent | None:
        """Event `seq` as stored when it was last verified (None if it is not kept)."""
        with self._lock:
            known = self._events.get(seq)
        return known[0] if known is not None else None

    def __contains__(self, seq: object) -> bool:
        return seq in self._events

    def row_matched(self, table: str, key: str, seq: int, values: str) -> bool:
        """Whether the row, holding exactly `values` (`StateRow.exact`), matched event `seq`."""
        with self._lock:
            return self._rows.get((table, key)) == (seq, values)

    def add_row(self, table: str, key: str, seq: int, values: str) -> None:
        """Notes that the row, holding exactly `values`, matched its snapshot in event `seq`."""
        with self._lock:
            self._rows.pop((table, key), None)
            self._rows[(table, key)] = (seq, values)
            while len(self._rows) > 4 * self._limit:
                del self._rows[next(iter(self._rows))]


def _json_positions(model: type[Base]) -> frozenset[int]:
    """Where `model`'s JSON columns are among its `STATE_COLUMNS`."""
    table = model.__table__
    return frozenset(
        i for i, c in enumerate(STATE_COLUMNS[model]) if isinstance(table.c[c].type, sa.JSON)
    )


_JSON_POSITIONS = {model: _json_positions(model) for model in STATE_COLUMNS}
# Each state table's primary key columns, in their order (`row_key` joins them with "/").
_KEY_COLUMNS = {
    model: tuple(str(column.name) for column in inspect(model).primary_key)
    for model in STATE_COLUMNS
}
_AS_STORED = "stored:"  # `StateRow.exact` of a row read with its JSON columns as stored text


@dataclass(frozen=True)
class StateRow:
    """A state row as the engine's check reads it: its snapshotted columns (`STATE_COLUMNS`
    order) and the event it names, read as plain values (no ORM object is built).

    `state_rows` reads the JSON columns as their stored text, decoded only for a row that has
    to be compared column by column (one that did not match exactly so before).
    """

    model: type[Base]
    key: str
    ledger_seq: int | None
    read: tuple[Any, ...]  # the columns as read
    json_as_text: bool = False  # the JSON columns in `read` are their stored text

    @classmethod
    def of(cls, row: Base) -> StateRow:
        columns = STATE_COLUMNS[type(row)]
        return cls(type(row), row_key(row), getattr(row, "ledger_seq", None),
                   tuple(getattr(row, column) for column in columns))  # fmt: skip

    def exact(self) -> str:
        """The columns as one exact text: `repr` tells 1, 1.0 and True apart, -0.0 from 0.0,
        '5' from 5 and a naive from an aware datetime, and a row read with its JSON as text is
        told apart by a prefix, so equal texts give equal snapshots."""
        text = repr(self.read)
        return _AS_STORED + text if self.json_as_text else text

    def entry(self) -> dict[str, Any]:
        """The row's snapshot (as `row_entry`)."""
        values = self.read
        if self.json_as_text:
            positions = _JSON_POSITIONS[self.model]
            values = tuple(
                json.loads(v) if i in positions and v is not None else v
                for i, v in enumerate(values)
            )
        named = dict(zip(STATE_COLUMNS[self.model], values, strict=True))
        return values_entry(self.model.__tablename__, self.key, named)


@functools.cache
def _state_rows_query(model: type[Base], column: str, order_by: str | None) -> sa.Select[Any]:
    """`state_rows`' query, built once: keys, ``ledger_seq``, then the state columns (JSON ones
    cast to text) of the rows whose `column` equals the bound parameter ``value``."""
    table = model.__table__
    positions = _JSON_POSITIONS[model]
    columns = [
        sa.cast(table.c[c], sa.Text) if i in positions else table.c[c]
        for i, c in enumerate(STATE_COLUMNS[model])
    ]
    keys = [table.c[k] for k in _KEY_COLUMNS[model]]
    query = select(*keys, table.c.ledger_seq, *columns).where(
        table.c[column] == sa.bindparam("value")
    )
    return query.order_by(table.c[order_by]) if order_by is not None else query


def state_rows(
    connection: Session | sa.Connection,
    model: type[Base],
    column: str,
    value: object,
    order_by: str | None = None,
) -> list[StateRow]:
    """The `model` rows whose `column` equals `value` (ordered by column `order_by`) as
    `StateRow`s, in one query of plain columns, the JSON ones as their stored text."""
    keys = len(_KEY_COLUMNS[model])
    found: list[StateRow] = []
    for row in connection.execute(_state_rows_query(model, column, order_by), {"value": value}):
        key = "/".join(str(part) for part in row[:keys])
        found.append(StateRow(model, key, row[keys], tuple(row[keys + 1 :]), True))
    return found


def stored_columns() -> list[sa.ColumnElement[Any]]:
    """The columns of a `StoredEvent`, in its order (the payload as its stored text)."""
    columns = EventRow.__table__.c
    return [columns.at, columns.kind, columns.run_id, columns.hop_id, columns.site,
            sa.cast(columns.payload, sa.Text), columns.prev_hash, columns.hash]  # fmt: skip


@functools.cache
def _stored_event_query() -> sa.Select[Any]:
    """`stored_event`'s query, built once (the seq a bound parameter)."""
    return select(*stored_columns()).where(EventRow.__table__.c.seq == sa.bindparam("seq"))


def stored_event(session: Session, seq: int) -> StoredEvent | None:
    """Event `seq` as stored (`StoredEvent`), or None if there is none."""
    found = session.execute(_stored_event_query(), {"seq": seq}).first()
    return tuple(found) if found is not None else None  # type: ignore[return-value]


def _snapshots(payload: Any) -> dict[tuple[str, str], Mapping[str, Any]]:
    """A decoded event payload's row snapshots by (table, key)."""
    entries: dict[tuple[str, str], Mapping[str, Any]] = {}
    if isinstance(payload, dict) and isinstance(found := payload.get(STATE_ROWS_KEY), list):
        for entry in found:
            if isinstance(entry, dict):  # the first entry for a row within one event counts
                entries.setdefault((entry.get("table"), entry.get("key")), entry)  # type: ignore[arg-type]
    return entries


def _sound_entries(
    seq: int, stored: StoredEvent, verified: VerifiedEvents | None
) -> dict[tuple[str, str], Mapping[str, Any]] | None:
    """The row snapshots of an event whose content matches its hash (None if it does not)."""
    from coordinator.ledger._chain import event_hash

    if verified is not None and (known := verified.entries(seq, stored)) is not None:
        return known
    at, kind, run_id, hop_id, site, text, prev_hash, digest = stored
    try:
        payload = json.loads(text) if text is not None else None
    except ValueError:
        return None  # not even JSON any more: altered
    if event_hash(prev_hash, at, kind, run_id, hop_id, site, payload) != digest:  # type: ignore[arg-type]
        return None
    entries = _snapshots(payload)
    if verified is not None:
        verified.add(seq, stored, entries)
    return entries


@functools.cache
def _linked_events_query() -> sa.Select[Any]:
    """Events ``seqs`` as stored (`StoredEvent`), each with its successor's ``prev_hash``."""
    columns = EventRow.__table__.c
    successor = EventRow.__table__.alias("successor")
    return (
        select(columns.seq, *stored_columns(), successor.c.prev_hash)
        .outerjoin(successor, successor.c.seq == columns.seq + 1)
        .where(columns.seq.in_(sa.bindparam("seqs", expanding=True)))
    )


def state_mismatches(
    session: Session | sa.Connection,
    rows: Sequence[Base | StateRow],
    verified: VerifiedEvents | None = None,
) -> list[RowMismatch]:
    """Checks rows against the events their ``ledger_seq`` names (the engine's check).

    Each event is also checked against its own hash and its successor's link, so an event
    edited to match an edited row is caught here too, not only by a full verify. With
    `verified`, an event stored exactly as when its hash was last recomputed is not hashed again
    (the rows are always read and compared, and every successor's link is always read).
    """
    states = [row if isinstance(row, StateRow) else StateRow.of(row) for row in rows]
    seqs: set[int] = {s.ledger_seq for s in states if s.ledger_seq is not None}
    events: dict[int, tuple[StoredEvent, bool]] = {}
    for number, *stored, link in session.execute(_linked_events_query(), {"seqs": list(seqs)}):
        events[number] = (tuple(stored), link is None or link == stored[7])  # type: ignore[assignment]
    return compare_with_events(states, events, verified)


def compare_with_events(
    states: Sequence[StateRow],
    events: Mapping[int, tuple[StoredEvent, bool]],
    verified: VerifiedEvents | None = None,
) -> list[RowMismatch]:
    """`state_mismatches` of rows already read, against their events as read (seq -> the
    event as stored, and whether the next event links to it); `events` may hold others too."""
    sound: dict[int, dict[tuple[str, str], Mapping[str, Any]] | None] = {}
    for named in {s.ledger_seq for s in states if s.ledger_seq is not None}:
        if named in events:
            stored, linked = events[named]
            sound[named] = _sound_entries(named, stored, verified) if linked else None
    found: list[RowMismatch] = []
    for state in states:
        table, key, seq = state.model.__tablename__, state.key, state.ledger_seq
        if seq is None or seq not in sound:
            found.append(
                RowMismatch(
                    table, key, "", f"{table} row {key} names no ledger event (ledger_seq {seq})"
                )
            )
            continue
        entries = sound[seq]
        if entries is None:
            found.append(
                RowMismatch(
                    table,
                    key,
                    "",
                    f"{table} row {key}: its ledger event #{seq} does not verify (event altered)",
                )
            )
            continue
        values = state.exact() if verified is not None else ""
        if verified is not None and verified.row_matched(table, key, seq, values):
            continue  # the same values against the same sound event: it matched then
        entry = entries.get((table, key))
        if entry is None or entry.get("deleted"):
            found.append(
                RowMismatch(
                    table,
                    key,
                    "",
                    f"{table} row {key}: ledger event #{seq} does not record it",
                )
            )
            continue
        differences = compare_snapshot(table, key, seq, entry, state.entry())
        if differences:
            found.extend(differences)
        elif verified is not None:
            verified.add_row(table, key, seq, values)
    return found


class StateIndex:
    """The seq of the newest event that wrote (or deleted) each row in the chain: small per row.

    The chain walk only notes which event last touched each row; `compare_tables` then reads
    those events' snapshots back, one batch of rows at a time, and compares them with the rows.
    """

    def __init__(self) -> None:
        # (table, key) -> seq of the newest event recording the row; negative: it deleted it
        self._newest: dict[tuple[str, str], int] = {}
        self.mismatch_events: list[tuple[int, str]] = []  # (seq, first finding) recorded

    def add(self, seq: int, kind: str, payload: Any) -> None:
        """Notes one event of the chain walk (its seq, kind and decoded payload)."""
        if not isinstance(payload, dict):
            return
        if kind == MISMATCH_EVENT:
            findings = payload.get("mismatches") or [{"message": "(no detail)"}]
            self.mismatch_events.append((seq, str(findings[0].get("message", ""))))
        entries = payload.get(STATE_ROWS_KEY)
        if not isinstance(entries, list):
            return
        newest = self._newest
        for entry in entries:
            if isinstance(entry, dict):
                name = (str(entry.get("table")), str(entry.get("key")))
                newest[name] = -seq if entry.get("deleted") else seq

    def absorb(self, later: StateIndex) -> None:
        """Takes over the notes of the walk of the events right after this index's own (a
        chain walked in parts): later events win, as in one walk; a row first seen later keeps
        its place in the order."""
        self._newest.update(later._newest)
        self.mismatch_events.extend(later.mismatch_events)

    def compare_tables(self, session: Session, chunk: int = 1000) -> Iterator[RowMismatch]:
        """Every row against its newest snapshot, and every snapshot against its row."""
        seen: set[tuple[str, str]] = set()
        for model in STATE_COLUMNS:
            table = model.__tablename__
            batch: list[Base] = []
            for row in session.scalars(select(model).execution_options(yield_per=chunk)):
                batch.append(row)
                if len(batch) == chunk:
                    yield from self._compare_batch(session, table, batch, seen)
                    batch = []
            yield from self._compare_batch(session, table, batch, seen)
        for (table, key), seq in self._newest.items():
            if seq > 0 and (table, key) not in seen:
                yield RowMismatch(
                    table,
                    key,
                    "",
                    f"{table} row {key}: ledger event #{seq} wrote it, "
                    "the table has no such row (deleted)",
                )

    def _compare_batch(
        self, session: Session, table: str, rows: list[Base], seen: set[tuple[str, str]]
    ) -> Iterator[RowMismatch]:
        keyed = [(row, row_key(row)) for row in rows]
        seqs = {s for _, key in keyed if (s := self._newest.get((table, key), 0)) > 0}
        recorded = _recorded_entries(session, table, seqs)
        for row, key in keyed:
            seen.add((table, key))
            newest = self._newest.get((table, key))
            if newest is None or newest < 0:
                yield RowMismatch(
                    table,
                    key,
                    "",
                    f"{table} row {key} has no ledger event that wrote it"
                    + (f" (event #{-newest} deleted it)" if newest else ""),
                )
                continue
            entry = recorded.get((newest, key))
            assert entry is not None  # the chain walk saw it in that very event
            found = compare_snapshot(table, key, newest, entry, row_entry(row))
            seq_column = getattr(row, "ledger_seq", None)
            if found:
                yield from found
            elif seq_column != newest:
                yield RowMismatch(
                    table,
                    key,
                    "ledger_seq",
                    f"{table} row {key} column ledger_seq: ledger event #{newest} last "
                    f"wrote it, table says {seq_column}",
                )
        for row, _ in keyed:
            session.expunge(row)


def _recorded_entries(
    session: Session, table: str, seqs: set[int]
) -> dict[tuple[int, str], Mapping[str, Any]]:
    """The snapshots of `table`'s rows that events `seqs` carry, by (seq, key)."""
    found: dict[tuple[int, str], Mapping[str, Any]] = {}
    if not seqs:
        return found
    query = select(EventRow.seq, EventRow.payload).where(EventRow.seq.in_(seqs))
    for seq, payload in session.execute(query):
        if not isinstance(payload, dict):
            continue
        entries = payload.get(STATE_ROWS_KEY)
        for entry in entries if isinstance(entries, list) else ():
            if isinstance(entry, dict) and entry.get("table") == table:
                # The last entry for a row within one event wins, as in the chain walk.
                found[(seq, str(entry.get("key")))] = entry
    return found


def tracked(objects: Iterable[object]) -> Iterator[Base]:
    """The state rows among a session's new, changed or deleted objects."""
    return (o for o in objects if isinstance(o, Base) and type(o) in STATE_COLUMNS)


def append_baseline(
    connection: sa.Connection,
    tables: Mapping[str, tuple[tuple[str, ...], tuple[str, ...]]],
    per_event: int = 200,
) -> None:
    """Appends ``ledger.baseline`` events snapshotting every row of `tables` as it is now.

    For migrations: rows written before a revision that adds a state column (or before row
    snapshots existed) have no snapshot of that column in any event. `tables` maps each table to
    (key columns, snapshot columns) frozen as of the calling revision. A baseline vouches only for
    what the rows hold at migration time.
    """
    from alembic import context, op

    from coordinator.ledger._chain import GENESIS_HASH, event_hash

    if context.is_offline_mode():  # --sql: no rows to read; say what the DBA's script lacks
        op.execute(
            f"-- ledger.baseline of {', '.join(tables)} is not written in offline mode: rows "
            "that exist now will have no snapshot event (`baton ledger verify` names them); "
            "run `baton db upgrade` online to write it"
        )
        return
    metadata = sa.MetaData()
    events = sa.Table("events", metadata, autoload_with=connection)
    last = connection.execute(
        sa.select(events.c.hash).order_by(events.c.seq.desc()).limit(1)
    ).first()
    prev = last[0] if last else GENESIS_HASH
    for name, (keys, columns) in tables.items():
        table = sa.Table(name, metadata, autoload_with=connection)
        rows = connection.execute(
            sa.select(*(table.c[c] for c in (*keys, *columns))).order_by(
                *(table.c[k] for k in keys)
            )
        ).all()
        for start in range(0, len(rows), per_event):
            batch = rows[start : start + per_event]
            entries = [
                values_entry(
                    name,
                    "/".join(str(row._mapping[k]) for k in keys),
                    {c: row._mapping[c] for c in columns},
                )
                for row in batch
            ]
            payload = {"table": name, "rows": len(entries), STATE_ROWS_KEY: entries}
            at = datetime.now(UTC).isoformat(timespec="microseconds")
            digest = event_hash(prev, at, "ledger.baseline", None, None, None, payload)
            result = connection.execute(
                events.insert().values(at=at, kind="ledger.baseline", run_id=None, hop_id=None,
                                       site=None, payload=payload, prev_hash=prev, hash=digest)
            )  # fmt: skip
            seq = result.inserted_primary_key[0]  # type: ignore[index]
            prev = digest
            for row in batch:
                condition = sa.and_(*(table.c[k] == row._mapping[k] for k in keys))
                connection.execute(table.update().where(condition).values(ledger_seq=seq))
