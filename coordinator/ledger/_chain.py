"""The event chain: appending one chained event per state change (hashed by `_canonical`).

`LedgerCore` is the core of `Ledger`: its engine, sessions, transactions and schema migration.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar, cast

from sqlalchemy import (
    Column,
    Connection,
    Engine,
    Insert,
    MetaData,
    PrimaryKeyConstraint,
    Select,
    String,
    Table,
    Update,
    and_,
    bindparam,
    create_engine,
    event,
    select,
    text,
)
from sqlalchemy import inspect as sa_inspect
from sqlalchemy.orm import Session, configure_mappers, make_transient_to_detached, sessionmaker
from sqlalchemy.orm.attributes import instance_state, set_committed_value

from coordinator.ledger import _cursor
from coordinator.ledger._canonical import event_hash as event_hash  # the hash appends chain with
from coordinator.ledger._integrity import (
    STATE_COLUMNS,
    STATE_ROWS_KEY,
    RowMismatch,
    StoredEvent,
    VerifiedEvents,
    carry_forward,
    row_entry,
    row_key,
    stored_event,
    tracked,
)
from coordinator.ledger._migrations import _MIGRATIONS, script_heads
from coordinator.ledger._run_check import RunChecks
from coordinator.ledger.models import Base, EventRow

T = TypeVar("T", bound=Base)

GENESIS_HASH = "0" * 64
_CHAIN_LOCK = 0x6261746F6E  # "baton": the advisory lock key of the event chain
SCHEMA_LOCK = 0x6261746F6E7363  # "batonsc": the advisory lock key of changing the schema
# PostgreSQL's transaction-scoped advisory lock (the chain's, the schema's), built once.
_ADVISORY_LOCK_STATEMENT = text("SELECT pg_advisory_xact_lock(:key)")
# SQLite's write lock, taken before a transaction's first read (`hold_sqlite_write_lock`).
_BEGIN_IMMEDIATE = text("BEGIN IMMEDIATE")
# Alembic's version table exactly as Alembic creates it (alembic.ddl.impl.version_table_impl):
# a ledger created from the models is stamped as `alembic stamp head` would.
_ALEMBIC_VERSION = Table(
    "alembic_version",
    MetaData(),
    Column("version_num", String(32), nullable=False),
    PrimaryKeyConstraint("version_num", name="alembic_version_pkc"),
)
# Whether the current schema of a PostgreSQL database holds anything at all: a relation of any
# kind (table, view, sequence, index, foreign table...) or a type of its own.
_PG_SCHEMA_USED = text(
    "SELECT EXISTS (SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
    "WHERE n.nspname = current_schema()) OR EXISTS (SELECT 1 FROM pg_type t "
    "JOIN pg_namespace n ON n.oid = t.typnamespace WHERE n.nspname = current_schema())"
)
# A hop holds a lease in these states; uploads, heartbeats and results are accepted only then.
LIVE_HOP_STATES = ("leased", "training", "uploaded")
TERMINAL_RUN_STATES = ("completed", "failed", "aborted")


class TransitionRefused(Exception):
    """A state change whose precondition no longer holds (stale lease, double commit...)."""


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class ChainBreak:
    """Where the event chain stops verifying."""

    seq: int
    reason: str


@dataclass(frozen=True)
class LedgerVerification:
    """What `Ledger.verify` found: the chain, the state rows, and where the ledger ends."""

    chain_break: ChainBreak | None
    events: int
    last_seq: int  # 0 for an empty ledger
    head: str
    row_mismatches: list[RowMismatch]
    recorded_mismatches: list[tuple[int, str]]  # ledger.mismatch events: (seq, first finding)

    @property
    def ok(self) -> bool:
        """The chain verifies and every state row matches (recorded mismatches are history)."""
        return self.chain_break is None and not self.row_mismatches


# Called after a transaction that appended events commits: (seq, hash, kinds appended).
HeadObserver = Callable[[int, str, tuple[str, ...]], None]
# Called after a transaction commits with the state rows it wrote (as committed, detached).
RowObserver = Callable[[Sequence[Base]], None]
_TOUCHED = "ledger_touched"  # session.info: state rows written since the last event
_APPENDED = "ledger_appended"  # session.info: (seq, hash, kinds) of this transaction's events
_WRITTEN = "ledger_written"  # session.info: state rows this transaction's events recorded
# session.info: seq -> {(table, key): snapshot} of the events this transaction appended
_OWN_ENTRIES = "ledger_own_entries"
_LOCKED = "ledger_locked"  # session.info: (model, key) of the rows this transaction locked
_STAMPS = "ledger_stamps"  # session.info: model -> key -> the newest ledger_seq to write
_CONNECTION = "ledger_connection"  # session.info: the connection `LedgerCore.transaction` opened
# session.info: (seq, StoredEvent) of each event this transaction appended
_STORED = "ledger_stored"


def connection_of(session: Session) -> Connection:
    """The session's connection: the one `LedgerCore.transaction` opened its transaction on
    (a hand back's commit asks for it once a statement: the session's lookup each time was
    about 10 us), else the session's own."""
    connection: Connection | None = session.info.get(_CONNECTION)
    return connection if connection is not None else session.connection()


@functools.cache
def _last_seq_query() -> Select[Any]:
    """The newest event's seq, built once."""
    return select(EventRow.__table__.c.seq).order_by(EventRow.__table__.c.seq.desc()).limit(1)


@functools.cache
def _head_hash_query() -> Select[Any]:
    """The newest event's hash, locked (where the database locks rows), built once (of the
    table's columns: a plain statement, no ORM execution)."""
    events = EventRow.__table__.c
    return select(events.hash).order_by(events.seq.desc()).limit(1).with_for_update()


@dataclass
class _Touched:
    row: Base
    deleted: bool = False
    assigned: set[str] | None = None  # columns this transaction set; None: all (a new row)
    # Written by the next event, with its seq as the row's ledger_seq: the row itself
    # (`insert_row`), or these columns of it (`write_columns`).
    insert: bool = False
    pending: dict[str, Any] | None = None


def _track_state_rows(session: Session, _context: Any, _instances: Any) -> None:
    """Remembers every state row a flush writes (and which columns), for the next event."""
    touched: dict[int, _Touched] = session.info.setdefault(_TOUCHED, {})
    for row in tracked(session.new):
        touched[id(row)] = _Touched(row)
    for row in tracked(session.dirty):
        if not session.is_modified(row):
            continue
        state = sa_inspect(row)
        changed = {c for c in STATE_COLUMNS[type(row)] if state.attrs[c].history.has_changes()}
        entry = touched.setdefault(id(row), _Touched(row, assigned=set()))
        if entry.assigned is not None:
            entry.assigned |= changed
        if entry.pending:
            # This flush writes these columns now, with values newer than the ones
            # `write_columns` left for the event to write: those must not overwrite them.
            for name in [n for n in entry.pending if state.attrs[n].history.has_changes()]:
                del entry.pending[name]
    for row in tracked(session.deleted):
        touched[id(row)] = _Touched(row, deleted=True)


class RecordedEntries:
    """The snapshot of each state row in the newest event this process committed for it, by
    (table, key): what a later write of the row carries forward is then taken from memory, not
    read back from that event. At most `limit` rows, the least recently written dropped first.
    """

    def __init__(self, limit: int = 16384) -> None:
        self._limit = limit
        self._entries: dict[tuple[str, str], tuple[int, dict[str, Any]]] = {}
        self._lock = threading.Lock()

    def get(self, table: str, key: str, seq: int) -> dict[str, Any] | None:
        """The row's snapshot in event `seq`, if that event is the one this process recorded."""
        with self._lock:
            found = self._entries.get((table, key))
        return found[1] if found is not None and found[0] == seq else None

    def committed(self, own: dict[int, dict[tuple[str, str], dict[str, Any]]]) -> None:
        """A transaction committed the events `own` holds (seq -> its rows' snapshots)."""
        with self._lock:
            for seq in sorted(own):
                for row, entry in own[seq].items():
                    self._entries.pop(row, None)
                    self._entries[row] = (seq, entry)
            while len(self._entries) > self._limit:
                del self._entries[next(iter(self._entries))]


def _snapshot(
    session: Session,
    touched: _Touched,
    verified: VerifiedEvents | None = None,
    ours: RecordedEntries | None = None,
) -> dict[str, Any]:
    """The row's snapshot; columns this write did not set keep the value the ledger recorded.

    So an edit made outside the ledger is never adopted by a later, unrelated write to the row
    (pausing a run whose plan was edited must not make the edited plan look recorded). The
    recorded entry comes from `verified` when that event is stored exactly as it was verified
    (a run's first event holds every hop's snapshot: not decoded again per lease), or from
    `ours` when this process appended that event (not read at all).
    """
    entry = row_entry(touched.row, deleted=touched.deleted)
    seq = getattr(touched.row, "ledger_seq", None)
    if touched.deleted or touched.assigned is None or seq is None:
        return entry
    own = session.info.get(_OWN_ENTRIES)
    if own is not None and seq in own:
        # Written by this very transaction (a hop's upload, then its commit): the snapshot it
        # recorded is at hand, no read of the event it has not committed yet.
        return carry_forward(None, entry, touched.assigned, own[seq].get(_entry_key(entry)))
    if ours is not None and (known_entry := ours.get(*_entry_key(entry), seq)) is not None:
        # The newest event of the row is one this process appended and committed: its
        # snapshot as recorded then (an edit of that event since is the chain check's to find).
        return carry_forward(None, entry, touched.assigned, known_entry)
    if verified is not None:
        stored = stored_event(session, seq)
        known = verified.entries(seq, stored) if stored is not None else None
        if known is not None:
            recorded = known.get((entry["table"], entry["key"]))
            return carry_forward(None, entry, touched.assigned, recorded)
    previous = session.get(EventRow, seq)
    if previous is None:
        return entry
    return carry_forward(previous, entry, touched.assigned)


@functools.cache
def _stamp_statement(model: type[Base]) -> Update:
    """UPDATE of one `model` row's ledger_seq by its primary key, built once."""
    table = cast(Table, model.__table__)
    keys = [table.c[column.name] for column in sa_inspect(model).primary_key]
    condition = and_(*(column == bindparam(f"key_{column.name}") for column in keys))
    return table.update().where(condition).values(ledger_seq=bindparam("stamp_seq"))


def _row_params(row: Base) -> dict[str, object]:
    """The row's primary key as `_stamp_statement`'s and `_update_statement`'s parameters."""
    mapper = sa_inspect(row).mapper
    return {
        f"key_{column.name}": value
        for column, value in zip(
            mapper.primary_key, mapper.primary_key_from_instance(row), strict=True
        )
    }


def _stamp(session: Session, row: Base, seq: int) -> None:
    """Gives a state row the unit of work flushed the seq of the event that recorded it: the
    row object told it holds that value as committed at once, the database by `_write_stamps`
    before the commit (one UPDATE per table, each row once with its newest seq; no flush of
    the session). A row written by `write_columns` or `insert_row` needs none: its event's
    statement carries its seq (`_write_row`)."""
    mapper = sa_inspect(row).mapper
    params: dict[str, object] = {"stamp_seq": seq, **_row_params(row)}
    stamps: dict[type[Base], dict[tuple[object, ...], dict[str, object]]]
    stamps = session.info.setdefault(_STAMPS, {})
    stamps.setdefault(type(row), {})[tuple(mapper.primary_key_from_instance(row))] = params
    set_committed_value(row, "ledger_seq", seq)


@functools.cache
def _update_statement(model: type[Base], columns: tuple[str, ...]) -> Update:
    """UPDATE of `columns` of one `model` row by its primary key, built once per column set."""
    table = cast(Table, model.__table__)
    keys = [table.c[column.name] for column in sa_inspect(model).primary_key]
    condition = and_(*(column == bindparam(f"key_{column.name}") for column in keys))
    return table.update().where(condition).values({c: bindparam(f"set_{c}") for c in columns})


def write_columns(session: Session, row: Base, values: dict[str, Any]) -> None:
    """Sets `values` on a state row this transaction read (and locked), and the row object
    told it holds them as written. The transaction's next event records the row, as after a
    flush: the columns whose value changed count as assigned by this write
    (`_track_state_rows`), the others keep what the ledger recorded.

    The database is written by that event (`LedgerCore.append_event`), right after its INSERT:
    one UPDATE by primary key of these columns and the row's ledger_seq, not a unit-of-work
    flush, nor a second UPDATE for the stamp. Nothing may read the row with SQL in between
    (the caller appends its event next)."""
    state_columns = STATE_COLUMNS[type(row)]
    changed = {n for n in values if n in state_columns and getattr(row, n) != values[n]}
    for name, value in values.items():
        set_committed_value(row, name, value)
    touched: dict[int, _Touched] = session.info.setdefault(_TOUCHED, {})
    entry = touched.setdefault(id(row), _Touched(row, assigned=set()))
    if entry.assigned is not None:
        entry.assigned |= changed
    if not entry.insert:
        if entry.pending is None:
            entry.pending = {}
        entry.pending.update(values)


def insert_row(session: Session, row: Base) -> bool:
    """Has the transaction's next event INSERT a new state row with one plain statement that
    carries its ledger_seq (no unit-of-work flush, no stamp UPDATE). Every column the object
    leaves unset gets its default, as a flush would give it. False (nothing done; the caller
    adds the row to the session) for a row that is not new or whose model has a column
    default computed by the database.

    The row object stays out of the session, as an appended event's does: it keeps every
    value, ledger_seq included, whether the transaction commits or rolls back (a flushed row
    would be expired by a rollback, and a caller that records the row again after a failed
    commit reads it). Nothing may read the row with SQL before that event (the caller
    appends it next)."""
    state = sa_inspect(row)
    if not state.transient or None in state.mapper.primary_key_from_instance(row):
        return False
    defaults = _column_defaults(type(row))
    if defaults is None:
        return False
    for name, default in defaults.items():
        if name not in state.dict:
            set_committed_value(row, name, default() if callable(default) else default)
    touched: dict[int, _Touched] = session.info.setdefault(_TOUCHED, {})
    touched[id(row)] = _Touched(row, insert=True)
    return True


@functools.cache
def _column_defaults(model: type[Base]) -> dict[str, Any] | None:
    """Each column's value in a row that leaves it unset (None; a scalar default; a callable
    of no argument for a Python-side callable default), or None if a column's default is the
    database's (a server default alone, a sequence) or not of one column of the table."""
    table = cast(Table, model.__table__)
    defaults: dict[str, Any] = {}
    for attr in sa_inspect(model).column_attrs:
        [column] = attr.columns
        if column.table is not table or attr.key != column.key:
            return None
        default = column.default
        if default is None:
            if column.server_default is not None:
                return None
            defaults[attr.key] = None
        elif default.is_scalar:
            defaults[attr.key] = default.arg  # type: ignore[attr-defined]
        elif default.is_callable:
            call = default.arg  # type: ignore[attr-defined]
            defaults[attr.key] = functools.partial(call, None)
        else:
            return None
    return defaults


@functools.cache
def _insert_statement(model: type[Base]) -> Insert:
    """The INSERT of one `model` row, every column given (`insert_row`), built once."""
    return cast(Table, model.__table__).insert()


def _write_row(session: Session, touched: _Touched, seq: int) -> bool:
    """Writes what `insert_row` or `write_columns` left for event `seq` with the row's
    ledger_seq; False if they left nothing (a row the unit of work flushed: stamped later)."""
    row = touched.row
    if touched.insert:
        values = {c.key: getattr(row, c.key) for c in sa_inspect(row).mapper.column_attrs}
        values["ledger_seq"] = seq
        _cursor.write(
            connection_of(session), _insert_statement(type(row)), values, keys=tuple(values)
        )
        set_committed_value(row, "ledger_seq", seq)
        return True
    if touched.pending is None:
        return False
    values = {**touched.pending, "ledger_seq": seq}
    names = tuple(sorted(values))
    params = {f"set_{name}": values[name] for name in names}
    params.update(_row_params(row))
    _cursor.write(connection_of(session), _update_statement(type(row), names), params)
    set_committed_value(row, "ledger_seq", seq)
    stamps = session.info.get(_STAMPS)
    if stamps is not None and type(row) in stamps:
        # An older stamp of the row, from a flush earlier in the transaction: superseded.
        stamps[type(row)].pop(tuple(sa_inspect(row).mapper.primary_key_from_instance(row)), None)
    return True


def _write_stamps(session: Session) -> None:
    """Writes the stamps `_stamp` noted: one executemany UPDATE per table."""
    stamps: dict[type[Base], dict[tuple[object, ...], dict[str, object]]] | None
    stamps = session.info.pop(_STAMPS, None)
    if not stamps:
        return
    connection = connection_of(session)
    for model, rows in stamps.items():
        if rows:  # none when each row's write carried its newest seq (`_write_row`)
            connection.execute(_stamp_statement(model), list(rows.values()))


@functools.cache
def _event_class_manager() -> Any:
    """EventRow's class manager (what builds an instance with its ORM state), its mappers
    configured (a constructor would configure them; `new_instance` does not)."""
    configure_mappers()
    return sa_inspect(EventRow).class_manager


# The columns an appended event's INSERT gives, in order (`LedgerCore.append_event`).
_EVENT_KEYS = ("at", "kind", "run_id", "hop_id", "site", "payload", "prev_hash", "hash")


@functools.cache
def _event_insert() -> Insert:
    """The INSERT of one event row (Core: no unit-of-work flush per event), built once."""
    return cast(Table, EventRow.__table__).insert()


def _entry_key(entry: dict[str, Any]) -> tuple[str, str]:
    return entry["table"], entry["key"]


def locked_get(session: Session, model: type[T], key: object) -> T | None:
    """`session.get(model, key, with_for_update=True)`: the row, locked for the transaction
    (on SQLite, which has no row locks, by the database's write lock, taken before the read).
    A row this transaction locked already is its own (it holds the lock until it commits):
    taken as held, without a second SELECT."""
    locked: set[tuple[type[Base], object]] = session.info.setdefault(_LOCKED, set())
    if (model, key) in locked:
        held = session.get(model, key)  # the identity map's: no SQL
        if held is not None:
            return held
    hold_sqlite_write_lock(session)
    read = _locked_read(model)
    identity = key if isinstance(key, tuple) else (key,)
    mapper = sa_inspect(model)
    if len(identity) != len(read.keys) or (
        mapper.identity_key_from_primary_key(identity) in session.identity_map
    ):
        # An object the session holds already keeps its attributes, as `session.get` does.
        row = session.get(model, key, with_for_update=True)
    else:
        # One plain SELECT ... FOR UPDATE, the object built from its columns and put in the
        # session as loaded: a third of `session.get`'s CPU (no ORM query, no loading context).
        params = dict(zip(read.keys, identity, strict=True))
        rows = _cursor.read(connection_of(session), read.query, params)
        if not rows:
            return None
        found = rows[0]
        row = cast(T, mapper.class_manager.new_instance())
        instance_state(row).dict.update(zip(read.names, found, strict=True))
        make_transient_to_detached(row)
        session.add(row)  # persistent, no SQL
    if row is not None:
        locked.add((model, key))
    return row


@dataclass(frozen=True)
class _LockedRead:
    query: Select[Any]  # SELECT every column of one row by its key, FOR UPDATE
    names: tuple[str, ...]  # the attributes its columns load, in their order
    keys: tuple[str, ...]  # its parameters: the primary key's parts, in their order


@functools.cache
def _locked_read(model: type[Base]) -> _LockedRead:
    """`locked_get`'s statement for `model`, built once (the mappers configured: the rows it
    builds are not built by a constructor, which would configure them)."""
    configure_mappers()
    mapper = sa_inspect(model)
    attrs = list(mapper.column_attrs)
    keys = tuple(f"key_{column.name}" for column in mapper.primary_key)
    condition = and_(
        *(column == bindparam(name) for column, name in zip(mapper.primary_key, keys, strict=True))
    )
    columns = [attr.columns[0] for attr in attrs]
    query = select(*columns).where(condition).with_for_update()
    return _LockedRead(query, tuple(attr.key for attr in attrs), keys)


def hold_sqlite_write_lock(session: Session) -> None:
    """On SQLite, takes the database's write lock for the session's transaction (unless it
    holds it already), before a read the transaction writes on; elsewhere does nothing.

    SQLite ignores FOR UPDATE, and the sqlite3 driver opens a transaction only at the first
    INSERT, UPDATE or DELETE: what a transaction reads before (a transition's compare, the
    chain's head) is read outside any lock, and another thread or process could write and
    commit in between: two writers both moving a row out of one state, two events chained to
    one predecessor. `BEGIN IMMEDIATE` takes the lock first (waiting out the busy timeout), as
    FOR UPDATE and the chain's advisory lock do on PostgreSQL.
    """
    connection = connection_of(session)
    if connection.dialect.name != "sqlite":
        return
    driver = connection.connection.driver_connection
    if driver is not None and not driver.in_transaction:
        _cursor.write(connection, _BEGIN_IMMEDIATE, {})


def hold_schema_lock(connection: Connection) -> None:
    """Takes the ledger's schema lock for the connection's transaction: whatever changes the
    schema (`LedgerCore.create_if_empty`, every Alembic migration: coordinator/migrations/env.py)
    takes it before it reads what is there, so two never decide on one state and both change it.

    PostgreSQL: a transaction-scoped advisory lock, released at commit or rollback. SQLite: the
    database's write lock (`BEGIN IMMEDIATE`, waiting out the busy timeout) unless the
    connection's driver holds a transaction already; the sqlite3 driver opens none before DDL,
    so this is also what makes the schema changes after it one transaction.
    """
    dialect = connection.dialect.name
    if dialect == "postgresql":
        connection.execute(_ADVISORY_LOCK_STATEMENT, {"key": SCHEMA_LOCK})
    elif dialect == "sqlite":
        driver = connection.connection.driver_connection
        if driver is not None and not driver.in_transaction:
            connection.execute(text("BEGIN IMMEDIATE"))


def _holds_anything(connection: Connection) -> bool:
    """Whether the database (PostgreSQL: its current schema) holds any object at all."""
    if connection.dialect.name == "postgresql":
        return bool(connection.execute(_PG_SCHEMA_USED).scalar())
    # Any table, index, view or trigger; SQLite's own (sqlite_sequence) would be in it too.
    return connection.execute(text("SELECT 1 FROM sqlite_master LIMIT 1")).first() is not None


def sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    """Every SQLite connection to a ledger (a `LedgerCore`'s, the Alembic environment's own):
    an engine's "connect" listener."""
    cursor = dbapi_connection.cursor()
    # WAL keeps readers (CLI, dashboard) off the writer's back; FULL makes each commit durable.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.close()


class LedgerCore:
    """The ledger's engine, sessions and event chain; `Ledger` adds one mixin per job."""

    def __init__(self, url: str, *, engine: Engine | None = None) -> None:
        """`engine`: used instead of one made from `url` (a rehearsal's scratch database,
        `coordinator.engine.warm_up`), as given: no listener is added to it."""
        self.url = url
        if engine is not None:
            self.engine: Engine = engine
        else:
            self.engine = create_engine(url, future=True)
            if self.engine.dialect.name == "sqlite":
                event.listen(self.engine, "connect", sqlite_pragmas)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        event.listen(self._sessions, "before_flush", _track_state_rows)
        # The advisory lock appending an event takes on PostgreSQL: the chain's, unless a
        # rehearsal on temporary tables (`coordinator.engine.warm_up`) takes one of its own.
        self.chain_lock_key = _CHAIN_LOCK
        self.head_observers: list[HeadObserver] = []
        self.row_observers: list[RowObserver] = []
        self._open = threading.local()  # .session: the transaction this thread has open
        # (seq, hash) of the newest event this object committed (`known_head`).
        self._newest: tuple[int, str] | None = None
        self._newest_lock = threading.Lock()
        # Events the engine's row checks found sound, as stored then: not hashed again unchanged.
        self.verified_events = VerifiedEvents()
        # Per run, its rows' and events' texts as the engine's last check found them sound.
        self.run_checks = RunChecks()
        # Each row's snapshot in the newest event this object committed for it.
        self.recorded_entries = RecordedEntries()

    def migrate(self) -> None:
        """Brings the schema to the newest Alembic revision.

        A ledger already at the head is recognised from its ``alembic_version`` row alone, so a
        coordinator restart does not import Alembic (a quarter of its start-up time); a database
        that holds nothing yet gets the schema from the models (`create_if_empty`). Anything
        else goes through the Alembic migrations, in one transaction on this connection that
        holds the schema lock, as `create_if_empty` does (coordinator/migrations/env.py).
        """
        if self.current_without_alembic():
            return
        from alembic import command
        from alembic.config import Config

        config = Config()
        config.set_main_option("script_location", str(_MIGRATIONS))
        with self.engine.begin() as connection:
            config.attributes["connection"] = connection
            command.upgrade(config, "head")

    def at_head(self) -> bool:
        """Whether the database's Alembic revision is the one head of the migration scripts."""
        heads = script_heads()
        if heads is None or len(heads) != 1:
            return False  # let Alembic read the scripts and say what is wrong
        with self.engine.connect() as connection:
            if not sa_inspect(connection).has_table("alembic_version"):
                return False
            current = connection.execute(text("SELECT version_num FROM alembic_version"))
            return {row[0] for row in current} == heads

    def current_without_alembic(self) -> bool:
        """Whether the schema is at the newest revision with no migration to run: at the head
        already (`at_head`, a restart), or new and made here from the models
        (`create_if_empty`, a first start)."""
        return self.at_head() or self.create_if_empty()

    def create_if_empty(self) -> bool:
        """On a database that holds nothing at all, creates the schema from the models and
        stamps it with the migrations' head revision, without Alembic: Alembic's "create_all,
        then stamp head" recipe, in one transaction. Returns whether it did.

        A brand-new ledger has nothing to migrate, and the chain of migrations costs over a
        second of CPU on a first start; the schema the models make is the one the
        migrations make (tests/coordinator_tests/test_ledger_create.py compares them), and no
        migration writes a row on an empty database. A database holding anything (an older
        revision, a partial schema, a table of its own) returns False: it is Alembic's, as are
        scripts whose heads cannot be read without Alembic, or more than one head.

        Two processes creating at once do not both create, nor does an Alembic upgrade run
        meanwhile (`baton db upgrade`, say): each holds the schema lock (`hold_schema_lock`:
        PostgreSQL's advisory lock, SQLite's write lock) from before it reads the database;
        the second then finds the schema made.
        """
        heads = script_heads()
        if heads is None or len(heads) != 1:
            return False
        dialect = self.engine.dialect.name
        if dialect not in ("sqlite", "postgresql"):
            return False
        with self.engine.connect() as connection:
            hold_schema_lock(connection)
            if _holds_anything(connection):
                connection.rollback()
                return False
            Base.metadata.create_all(connection, checkfirst=False)
            _ALEMBIC_VERSION.create(connection, checkfirst=False)
            connection.execute(_ALEMBIC_VERSION.insert(), [{"version_num": v} for v in heads])
            connection.commit()
        return True

    def covers_state_rows(self) -> bool:
        """Whether the schema has the state rows' ledger_seq (revision 0007 or later)."""
        inspector = sa_inspect(self.engine)
        if not inspector.has_table("hops"):
            return False
        return any(column["name"] == "ledger_seq" for column in inspector.get_columns("hops"))

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        """One database transaction (one commit); a transaction opened inside it joins it.

        So several state changes, each with its own chained event, commit together or not at
        all (a hop's commit and the next hop's lease: one fsync per handoff).
        """
        outer: Session | None = getattr(self._open, "session", None)
        if outer is not None:
            yield outer
            return
        with self._sessions.begin() as session:
            self._open.session = session
            # Its one connection, for the whole transaction (the session binds one engine).
            session.info[_CONNECTION] = session.connection()
            try:
                yield session
                session.flush()
                _write_stamps(session)
            finally:
                self._open.session = None
            unrecorded: dict[int, _Touched] = session.info.get(_TOUCHED, {})
            if unrecorded:
                # Every state row write must ride with an event, or verify would flag it later.
                names = sorted(
                    f"{type(t.row).__tablename__} {row_key(t.row)}" for t in unrecorded.values()
                )
                raise RuntimeError(f"state rows written without a ledger event: {', '.join(names)}")
            appended = session.info.pop(_APPENDED, None)
            written: list[Base] = session.info.pop(_WRITTEN, [])
            own = session.info.pop(_OWN_ENTRIES, None)
            stored: list[tuple[int, StoredEvent]] = session.info.pop(_STORED, [])
        for seq, as_stored in stored:  # committed: sound as stored, not to be hashed again
            self.verified_events.appended(seq, as_stored)
        if own:
            self.recorded_entries.committed(own)
        if written:
            for row_observer in self.row_observers:
                row_observer(written)
        if appended is not None:
            with self._newest_lock:
                if self._newest is None or appended[0] > self._newest[0]:
                    self._newest = (appended[0], appended[1])
            for observer in self.head_observers:
                observer(*appended)

    # ---- events -------------------------------------------------------------------------------

    def append_event(
        self,
        session: Session,
        kind: str,
        *,
        run_id: str | None = None,
        hop_id: str | None = None,
        site: str | None = None,
        payload: dict[str, Any] | None = None,
    ) -> EventRow:
        """Appends one chained event inside the caller's transaction.

        The event's payload also records (under ``state_rows``) a snapshot of every state row
        the transaction wrote since its previous event; those rows get the event's seq.
        """
        payload = payload or {}
        session.flush()  # every pending state row passes _track_state_rows
        touched: dict[int, _Touched] = session.info.pop(_TOUCHED, {})
        if touched:
            entries = [
                _snapshot(session, t, self.verified_events, self.recorded_entries)
                for t in touched.values()
            ]
            payload = {**payload, STATE_ROWS_KEY: entries}
        ours = session.info.get(_APPENDED)
        if ours is not None:
            # This transaction appended the newest event and holds the chain (PostgreSQL: the
            # advisory lock; SQLite: the write lock) until it commits: that event is the head.
            prev = ours[1]
        else:
            dialect = session.get_bind().dialect.name if session.bind is not None else None
            if dialect == "postgresql":
                # Serialise appenders across processes: row locks cannot stop two transactions
                # from chaining to the same predecessor, a transaction-scoped advisory lock can.
                _cursor.write(
                    connection_of(session), _ADVISORY_LOCK_STATEMENT, {"key": self.chain_lock_key}
                )
            elif dialect == "sqlite":
                hold_sqlite_write_lock(session)
            last = _cursor.read(connection_of(session), _head_hash_query(), {})
            prev = last[0][0] if last and last[0][0] else GENESIS_HASH
        at = utcnow().isoformat(timespec="microseconds")
        values: dict[str, Any] = {
            "at": at, "kind": kind, "run_id": run_id, "hop_id": hop_id, "site": site,
            "payload": payload, "prev_hash": prev,
            "hash": event_hash(prev, at, kind, run_id, hop_id, site, payload),
        }  # fmt: skip
        # Inserted as a plain statement, not added to the session: an event is never updated,
        # and a flush of the unit of work per event was a third of a commit's CPU. The
        # payload's text is made once, here: the INSERT sends it, and once committed the
        # event is known sound as stored with it (`VerifiedEvents.appended`).
        connection = connection_of(session)
        text = _cursor.json_text(connection.dialect, payload)
        inserted = values if text is None else {**values, "payload": text}
        key = _cursor.write(connection, _event_insert(), inserted, keys=_EVENT_KEYS)
        assert key is not None
        if text is not None:
            stored = (at, kind, run_id, hop_id, site, str(text), prev, values["hash"])
            session.info.setdefault(_STORED, []).append((int(key), stored))
        # The row object returned is not in the session: its columns set as they are stored,
        # without the attribute events of a constructor (an event is never written again).
        row = cast(EventRow, _event_class_manager().new_instance())
        instance_state(row).dict.update(values, seq=int(key))
        if touched:
            own: dict[tuple[str, str], dict[str, Any]] = {}
            for snapshot in payload[STATE_ROWS_KEY]:
                own.setdefault(_entry_key(snapshot), snapshot)  # the first one counts
            session.info.setdefault(_OWN_ENTRIES, {})[row.seq] = own
            for written in touched.values():
                if not written.deleted and not _write_row(session, written, row.seq):
                    _stamp(session, written.row, row.seq)
            if session is not getattr(self._open, "session", None):
                _write_stamps(session)  # not `transaction()`'s session: nothing writes them later
        rows: list[Base] = session.info.setdefault(_WRITTEN, [])
        rows.extend(t.row for t in touched.values() if not t.deleted)
        _, _, kinds = session.info.get(_APPENDED, (0, "", ()))
        session.info[_APPENDED] = (row.seq, row.hash, (*kinds, kind))
        return row

    def record_event(self, kind: str, **fields: Any) -> None:
        with self.transaction() as session:
            self.append_event(session, kind, **fields)

    def last_seq(self) -> int:
        """The newest event's seq (0 for an empty ledger): one indexed read of one integer,
        for a caller that only asks whether the chain grew (no event row is built)."""
        with self.engine.connect() as connection:
            return int(connection.execute(_last_seq_query()).scalar() or 0)

    def known_head(self) -> str | None:
        """The hash of the newest event this `Ledger` committed, from memory (None before its
        first commit): an event the ledger holds, answered without a query. Another process
        may have appended since; `head` reads the database's newest."""
        newest = self._newest
        return newest[1] if newest is not None else None
