"""The ledger's repository: every state change is one transaction that also appends one event."""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, Text, cast, create_engine, event, func, select, text
from sqlalchemy import inspect as sa_inspect
from sqlalchemy.orm import Session, selectinload, sessionmaker

from coordinator.ledger._integrity import (
    MISMATCH_EVENT,
    STATE_COLUMNS,
    STATE_ROWS_KEY,
    RowMismatch,
    StateIndex,
    carry_forward,
    row_entry,
    row_key,
    state_mismatches,
    tracked,
)
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
    "GENESIS_HASH",
    "LIVE_HOP_STATES",
    "TERMINAL_RUN_STATES",
    "ChainBreak",
    "HeadObserver",
    "Ledger",
    "LedgerVerification",
    "TransitionRefused",
    "event_hash",
]

logger = logging.getLogger(__name__)

GENESIS_HASH = "0" * 64
_CHAIN_LOCK = 0x6261746F6E  # "baton": the advisory lock key of the event chain
# A hop holds a lease in these states; uploads, heartbeats and results are accepted only then.
LIVE_HOP_STATES = ("leased", "training", "uploaded")
TERMINAL_RUN_STATES = ("completed", "failed", "aborted")


class TransitionRefused(Exception):
    """A state change whose precondition no longer holds (stale lease, double commit...)."""


_MIGRATIONS = Path(__file__).resolve().parent.parent / "migrations"


# One encoder, built once (json.dumps with keywords builds a new one per call): verify hashes
# every event with it.
_CANONICAL = json.JSONEncoder(
    sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
).encode


# `revision = "0015"` / `down_revision = "0011"` (or None) in a migration script.
_REVISION_LINE = re.compile(
    r"^(revision|down_revision)\s*(?::[^=\n]*)?=\s*(?:['\"]([\w-]+)['\"]|(None))\s*(?:#.*)?$",
    re.MULTILINE,
)


def script_heads() -> set[str] | None:
    """The head revisions of the migration scripts, read from the files without Alembic.

    None when a script does not name its revisions in the plain form (a merge revision's tuple,
    say): the caller then asks Alembic itself.
    """
    revisions: set[str] = set()
    parents: set[str] = set()
    for path in (_MIGRATIONS / "versions").glob("*.py"):
        found = {name: value or None for name, value, _ in _REVISION_LINE.findall(path.read_text())}
        if "revision" not in found or "down_revision" not in found:
            return None
        revision, parent = found["revision"], found["down_revision"]
        assert revision is not None
        revisions.add(revision)
        if parent is not None:
            parents.add(parent)
    return revisions - parents


def utcnow() -> datetime:
    return datetime.now(UTC)


def event_hash(
    prev_hash: str,
    at: str,
    kind: str,
    run_id: str | None,
    hop_id: str | None,
    site: str | None,
    payload: dict[str, Any],
) -> str:
    """Hash of one event over a canonical JSON encoding, chained to the previous event's hash."""
    body = _CANONICAL(
        {
            "prev": prev_hash,
            "at": at,
            "kind": kind,
            "run_id": run_id,
            "hop_id": hop_id,
            "site": site,
            "payload": payload,
        }
    )
    return hashlib.sha256(body.encode("ascii")).hexdigest()


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
_TOUCHED = "ledger_touched"  # session.info: state rows written since the last event
_STAMPING = "ledger_stamping"  # session.info: True while rows get their ledger_seq
_APPENDED = "ledger_appended"  # session.info: (seq, hash, kinds) of this transaction's events


@dataclass
class _Touched:
    row: Base
    deleted: bool = False
    assigned: set[str] | None = None  # columns this transaction set; None: all (a new row)


def _track_state_rows(session: Session, _context: Any, _instances: Any) -> None:
    """Remembers every state row a flush writes (and which columns), for the next event."""
    if session.info.get(_STAMPING):
        return
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
    for row in tracked(session.deleted):
        touched[id(row)] = _Touched(row, deleted=True)


def _snapshot(session: Session, touched: _Touched) -> dict[str, Any]:
    """The row's snapshot; columns this write did not set keep the value the ledger recorded.

    So an edit made outside the ledger is never adopted by a later, unrelated write to the row
    (pausing a run whose plan was edited must not make the edited plan look recorded).
    """
    entry = row_entry(touched.row, deleted=touched.deleted)
    seq = getattr(touched.row, "ledger_seq", None)
    if touched.deleted or touched.assigned is None or seq is None:
        return entry
    previous = session.get(EventRow, seq)
    if previous is None:
        return entry
    return carry_forward(previous, entry, touched.assigned)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    # WAL keeps readers (CLI, dashboard) off the writer's back; FULL makes each commit durable.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.close()


class Ledger:
    """SQL ledger of sites, runs, hops, checkpoints and events (SQLite or PostgreSQL)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine: Engine = create_engine(url, future=True)
        if self.engine.dialect.name == "sqlite":
            event.listen(self.engine, "connect", _sqlite_pragmas)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        event.listen(self._sessions, "before_flush", _track_state_rows)
        self.head_observers: list[HeadObserver] = []

    def migrate(self) -> None:
        """Brings the schema to the newest Alembic revision.

        A ledger already at the head is recognised from its ``alembic_version`` row alone, so a
        coordinator restart does not import Alembic (a quarter of its start-up time).
        """
        if self.at_head():
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
        with self._sessions.begin() as session:
            yield session
            session.flush()
            unrecorded: dict[int, _Touched] = session.info.get(_TOUCHED, {})
            if unrecorded:
                # Every state row write must ride with an event, or verify would flag it later.
                names = sorted(
                    f"{type(t.row).__tablename__} {row_key(t.row)}" for t in unrecorded.values()
                )
                raise RuntimeError(f"state rows written without a ledger event: {', '.join(names)}")
            appended = session.info.pop(_APPENDED, None)
        if appended is not None:
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
            entries = [_snapshot(session, t) for t in touched.values()]
            payload = {**payload, STATE_ROWS_KEY: entries}
        if session.bind is not None and session.get_bind().dialect.name == "postgresql":
            # Serialise appenders across processes: row locks cannot stop two transactions
            # from chaining to the same predecessor, a transaction-scoped advisory lock can.
            session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _CHAIN_LOCK})
        last = session.scalars(
            select(EventRow).order_by(EventRow.seq.desc()).limit(1).with_for_update()
        ).first()
        prev = last.hash if last else GENESIS_HASH
        at = utcnow().isoformat(timespec="microseconds")
        row = EventRow(
            at=at,
            kind=kind,
            run_id=run_id,
            hop_id=hop_id,
            site=site,
            payload=payload,
            prev_hash=prev,
            hash=event_hash(prev, at, kind, run_id, hop_id, site, payload),
        )
        session.add(row)
        session.flush()
        if touched:
            session.info[_STAMPING] = True
            try:
                for written in touched.values():
                    if not written.deleted:
                        written.row.ledger_seq = row.seq  # type: ignore[attr-defined]
                session.flush()
            finally:
                session.info[_STAMPING] = False
        _, _, kinds = session.info.get(_APPENDED, (0, "", ()))
        session.info[_APPENDED] = (row.seq, row.hash, (*kinds, kind))
        return row

    def record_event(self, kind: str, **fields: Any) -> None:
        with self.transaction() as session:
            self.append_event(session, kind, **fields)

    def events(self, run_id: str | None = None) -> list[EventRow]:
        with self._sessions() as session:
            query = select(EventRow).order_by(EventRow.seq)
            if run_id is not None:
                query = query.where(EventRow.run_id == run_id)
            return list(session.scalars(query))

    def head(self) -> str:
        """Hash of the newest event (the genesis hash for an empty ledger)."""
        with self._sessions() as session:
            last = session.scalars(select(EventRow.hash).order_by(EventRow.seq.desc()).limit(1))
            return last.first() or GENESIS_HASH

    def head_problem(self, seq: int, head_hash: str) -> str | None:
        """Why the ledger does not reach event `seq` with hash `head_hash` (None if it does)."""
        event = self.event_at(seq)
        if event is None:
            last = self.last_event()
            return (
                f"the ledger ends at #{last.seq if last else 0}, short of event #{seq}"
                if last is None or last.seq < seq
                else f"the ledger has no event #{seq}"
            )
        if event.hash != head_hash:
            return (
                f"the ledger's event #{seq} has hash {event.hash[:12]}..., not {head_hash[:12]}..."
            )
        return None

    def has_event(self, event_hash: str) -> bool:
        with self._sessions() as session:
            found = session.scalars(select(EventRow.seq).where(EventRow.hash == event_hash))
            return found.first() is not None

    def verify_chain(self) -> ChainBreak | None:
        """Walks the event log; returns the first event that does not verify, or None."""
        return self.verify(rows=False).chain_break

    def verify(self, *, rows: bool = True, chunk: int = 1000) -> LedgerVerification:
        """Streams the event chain, then (with `rows`) checks every state row against it.

        Events are read `chunk` at a time as plain tuples with the payload as its stored text
        (decoded once here, not by the ORM), and only the newest seq per state row is kept, so
        memory does not grow with the number of events.
        """
        prev, count, last_seq, broken = GENESIS_HASH, 0, 0, None
        index = StateIndex()
        events = EventRow.__table__.c
        query = select(
            events.seq,
            events.at,
            events.kind,
            events.run_id,
            events.hop_id,
            events.site,
            cast(events.payload, Text),
            events.prev_hash,
            events.hash,
        ).order_by(events.seq)
        decode, note = json.loads, index.add
        with self._sessions() as session:
            result = session.execute(query, execution_options={"yield_per": chunk})
            for seq, at, kind, run_id, hop_id, site, text, prev_hash, digest in result:
                payload = decode(text)
                if broken is None:
                    if prev_hash != prev:
                        broken = ChainBreak(
                            seq, "previous-hash link broken (event deleted or inserted)"
                        )
                    elif digest != event_hash(prev, at, kind, run_id, hop_id, site, payload):
                        broken = ChainBreak(seq, "content does not match its hash (event altered)")
                prev = digest
                if rows:
                    note(seq, kind, payload)
                count, last_seq = count + 1, seq
            mismatches = list(index.compare_tables(session, chunk)) if rows else []
        return LedgerVerification(
            chain_break=broken,
            events=count,
            last_seq=last_seq,
            head=prev,
            row_mismatches=mismatches,
            recorded_mismatches=index.mismatch_events,
        )

    def event_at(self, seq: int) -> EventRow | None:
        with self._sessions() as session:
            return session.get(EventRow, seq)

    def last_event(self) -> EventRow | None:
        with self._sessions() as session:
            return session.scalars(select(EventRow).order_by(EventRow.seq.desc()).limit(1)).first()

    def row_mismatches(self, rows: Sequence[Base]) -> list[RowMismatch]:
        """The rows (as read) that differ from the ledger event that last wrote each."""
        with self._sessions() as session:
            return state_mismatches(session, rows)

    def run_mismatches(self, run: RunRow, checkpoint_sha256: str | None) -> list[RowMismatch]:
        """The engine's check before it acts on a run: the run, its hops and the checkpoint
        it is about to hand out (a hop's input or the final adapter) against their events."""
        rows: list[Base] = [run, *run.hops]
        found: list[RowMismatch] = []
        if checkpoint_sha256 is not None:
            checkpoint = self.checkpoint(checkpoint_sha256)
            if checkpoint is None:
                found.append(
                    RowMismatch(
                        "checkpoints",
                        checkpoint_sha256,
                        "",
                        f"checkpoints row {checkpoint_sha256} is missing",
                    )
                )
            else:
                rows.append(checkpoint)
        return self.row_mismatches(rows) + found

    def pause_for_mismatch(self, run_id: str, mismatches: Sequence[RowMismatch]) -> RunRow:
        """Pauses a running run whose rows differ from their events; one `ledger.mismatch` event.

        Raises:
            TransitionRefused: The run is not running any more.
        """
        error = "ledger mismatch: " + "; ".join(m.message for m in mismatches[:3])
        if len(mismatches) > 3:
            error += f"; and {len(mismatches) - 3} more"
        with self.transaction() as session:
            run = session.get(RunRow, run_id, with_for_update=True)
            if run is None:
                raise KeyError(run_id)
            if run.status != "running":
                raise TransitionRefused(f"run {run_id} is {run.status}; cannot pause it")
            run.status = "paused"
            run.error = error
            self.append_event(
                session,
                MISMATCH_EVENT,
                run_id=run_id,
                payload={"status": "paused", "mismatches": [m.to_json() for m in mismatches]},
            )
            return run

    # ---- sites --------------------------------------------------------------------------------

    def register_site(
        self,
        name: str,
        *,
        agent_version: str,
        capabilities: list[str],
        base_models: list[dict[str, str]],
        datasets: list[dict[str, Any]],
        certificate_serial: str,
        certificate_expires_at: datetime | None = None,
    ) -> None:
        now = utcnow()
        with self.transaction() as session:
            row = session.get(SiteRow, name)
            if row is None:
                row = SiteRow(name=name, first_seen_at=now)
                session.add(row)
            row.agent_version = agent_version
            row.capabilities = capabilities
            row.base_models = base_models
            row.datasets = datasets
            row.certificate_serial = certificate_serial
            row.certificate_expires_at = certificate_expires_at
            row.last_seen_at = now
            self.append_event(
                session,
                "site.hello",
                site=name,
                payload={
                    "agent_version": agent_version,
                    "capabilities": capabilities,
                    "base_models": base_models,
                    "certificate_serial": certificate_serial,
                },
            )

    def sites(self) -> list[SiteRow]:
        with self._sessions() as session:
            return list(session.scalars(select(SiteRow).order_by(SiteRow.name)))

    # ---- runs and hops --------------------------------------------------------------------------

    def create_run(
        self,
        run_id: str,
        name: str,
        plan: dict[str, Any],
        hops: list[HopRow],
        pinned: str | None,
        *,
        by: str | None = None,
        rounds: Sequence[RoundRow] = (),
    ) -> RunRow:
        with self.transaction() as session:
            run = RunRow(
                id=run_id,
                name=name,
                status="running",
                plan=plan,
                base_model_sha256=pinned,
                created_at=utcnow(),
            )
            run.hops = hops
            session.add(run)
            if rounds:
                session.flush()  # rounds refer to the run; no relationship orders the inserts
                session.add_all(rounds)
            self.append_event(
                session,
                "run.created",
                run_id=run_id,
                payload={
                    "name": name,
                    "plan": plan,
                    "hops": [h.id for h in hops],
                    **({"rounds": [r.id for r in rounds]} if rounds else {}),
                    **({"by": by} if by else {}),
                },
            )
        return self.run(run_id)

    def run(self, run_id: str) -> RunRow:
        with self._sessions() as session:
            run = session.scalars(
                select(RunRow)
                .where(RunRow.id == run_id)
                .options(selectinload(RunRow.hops), selectinload(RunRow.evaluations))
            ).first()
            if run is None:
                raise KeyError(run_id)
            return run

    def runs(self) -> list[RunRow]:
        with self._sessions() as session:
            query = (
                select(RunRow)
                .options(selectinload(RunRow.hops), selectinload(RunRow.evaluations))
                .order_by(RunRow.created_at)
            )
            return list(session.scalars(query))

    def active_runs(self) -> list[RunRow]:
        """The running runs with their hops and evaluations; finished runs are never read."""
        with self._sessions() as session:
            query = (
                select(RunRow)
                .where(RunRow.status == "running")
                .options(selectinload(RunRow.hops), selectinload(RunRow.evaluations))
                .order_by(RunRow.created_at)
            )
            return list(session.scalars(query))

    def live_hop_needs(self, site: str, sha256: str) -> bool:
        """Whether a live hop of a running run, leased to `site`, has input `sha256` (indexed)."""
        with self._sessions() as session:
            query = (
                select(HopRow.id)
                .join(RunRow, RunRow.id == HopRow.run_id)
                .where(
                    HopRow.input_sha256 == sha256,
                    HopRow.site == site,
                    HopRow.status.in_(LIVE_HOP_STATES),
                    RunRow.status == "running",
                )
                .limit(1)
            )
            return session.scalars(query).first() is not None

    def pending_evaluation_needs(self, site: str, sha256: str) -> bool:
        """Whether a pending evaluation at `site` scores checkpoint `sha256` (indexed)."""
        with self._sessions() as session:
            query = (
                select(EvaluationRow.id)
                .where(
                    EvaluationRow.checkpoint_sha256 == sha256,
                    EvaluationRow.site == site,
                    EvaluationRow.status == "pending",
                )
                .limit(1)
            )
            return session.scalars(query).first() is not None

    def hop(self, hop_id: str) -> HopRow | None:
        if not hop_id:  # no hop has an empty id (a site's beat between tasks): no query
            return None
        with self._sessions() as session:
            return session.get(HopRow, hop_id)

    def transition_hop(
        self,
        hop_id: str,
        *,
        expected: Collection[str],
        status: str,
        event: str,
        payload: dict[str, Any] | None = None,
        **fields: Any,
    ) -> HopRow:
        """Moves a hop to `status` if it is in one of the `expected` states (compare-and-set).

        One transaction: the row update and one chained event. Field values may be callables
        of the row (e.g. to increment a counter).

        Raises:
            TransitionRefused: The hop is not in an expected state (e.g. committed already).
        """
        with self.transaction() as session:
            hop = session.get(HopRow, hop_id, with_for_update=True)
            if hop is None:
                raise KeyError(hop_id)
            if hop.status not in expected:
                raise TransitionRefused(f"hop {hop_id} is {hop.status}; cannot move to {status}")
            for name, value in fields.items():
                setattr(hop, name, value(hop) if callable(value) else value)
            hop.status = status
            self.append_event(
                session,
                event,
                run_id=hop.run_id,
                hop_id=hop.id,
                site=hop.site,
                payload={
                    "index": hop.index,
                    "status": status,
                    "attempts": hop.attempts,
                    **(payload or {}),
                },
            )
            return hop

    def lease_hop(self, hop_id: str, token: str, input_sha256: str | None) -> HopRow:
        return self.transition_hop(
            hop_id,
            expected=("pending",),
            status="leased",
            event="hop.leased",
            payload={"input_sha256": input_sha256},
            lease_token=token,
            leased_at=utcnow(),
            input_sha256=input_sha256,
            attempts=lambda hop: hop.attempts + 1,
        )

    def record_checkpoint(self, row: CheckpointRow) -> None:
        with self.transaction() as session:
            existing = session.get(CheckpointRow, row.sha256, with_for_update=True)
            if existing is not None and existing.status == "stored":
                return  # content-addressed: the same bytes are already recorded
            if existing is not None:
                existing.status = "stored"  # the same bytes stored again after a deletion
            else:
                session.add(row)
            self.append_event(
                session,
                "checkpoint.stored",
                run_id=row.run_id,
                hop_id=row.hop_id,
                site=row.producer_site,
                payload={"sha256": row.sha256, "size": row.size, "parent": row.parent_sha256},
            )

    def checkpoint(self, sha256: str) -> CheckpointRow | None:
        with self._sessions() as session:
            return session.get(CheckpointRow, sha256)

    def commit_hop(
        self,
        hop_id: str,
        *,
        lease_token: str,
        output_sha256: str,
        metrics: dict[str, float],
        train_started_at_ns: int,
        train_finished_at_ns: int,
        base_model_sha256: str,
    ) -> HopRow:
        """Commits a hop exactly once: only from a live lease with the same token."""
        with self.transaction() as session:
            hop = session.get(HopRow, hop_id, with_for_update=True)
            if hop is None:
                raise KeyError(hop_id)
            if hop.status not in LIVE_HOP_STATES or hop.lease_token != lease_token:
                raise TransitionRefused(f"hop {hop_id} is {hop.status}; cannot commit it")
            run = session.get(RunRow, hop.run_id)
            assert run is not None
            hop.status = "committed"
            hop.output_sha256 = output_sha256
            hop.metrics = metrics
            hop.train_started_at_ns = train_started_at_ns
            hop.train_finished_at_ns = train_finished_at_ns
            hop.committed_at = utcnow()
            hop.lease_token = None
            if run.base_model_sha256 is None:
                run.base_model_sha256 = base_model_sha256
            self.append_event(
                session,
                "hop.committed",
                run_id=hop.run_id,
                hop_id=hop.id,
                site=hop.site,
                payload={
                    "index": hop.index,
                    "status": "committed",
                    "input_sha256": hop.input_sha256,
                    "output_sha256": output_sha256,
                    "metrics": metrics,
                    "train_started_at_ns": train_started_at_ns,
                    "train_finished_at_ns": train_finished_at_ns,
                },
            )
            return hop

    def record_hop_validation(
        self, hop_id: str, *, site: str, ok: bool, metrics: dict[str, float], error: str
    ) -> HopRow:
        """Adds a committed hop's validation metrics, measured by its site after the commit.

        The ``hop.validated`` event carries them; the hop's metrics become the train metrics
        of its commit plus these (a failed pass adds nothing). Recorded once: a retried report
        of the same metrics writes nothing.

        Raises:
            KeyError: No such hop.
            TransitionRefused: The hop is not committed, not this site's, or already validated
                with other metrics.
        """
        with self.transaction() as session:
            hop = session.get(HopRow, hop_id, with_for_update=True)
            if hop is None:
                raise KeyError(hop_id)
            if hop.site != site or hop.status != "committed":
                raise TransitionRefused(f"hop {hop_id} is not a committed hop of site {site}")
            already = session.scalars(
                select(EventRow).where(EventRow.hop_id == hop_id, EventRow.kind == "hop.validated")
            ).first()
            if already is not None:
                if already.payload.get("metrics") == metrics and already.payload.get("ok") == ok:
                    return hop
                raise TransitionRefused(f"hop {hop_id} was already validated")
            if ok:
                hop.metrics = {**hop.metrics, **metrics}
            self.append_event(
                session,
                "hop.validated",
                run_id=hop.run_id,
                hop_id=hop.id,
                site=site,
                payload={"index": hop.index, "ok": ok, "metrics": metrics, "error": error},
            )
            return hop

    def transition_run(
        self,
        run_id: str,
        *,
        expected: Collection[str],
        status: str,
        payload: dict[str, Any] | None = None,
        **fields: Any,
    ) -> RunRow:
        """Moves a run to `status` (event `run.<status>`) if it is in an expected state."""
        with self.transaction() as session:
            run = session.get(RunRow, run_id, with_for_update=True)
            if run is None:
                raise KeyError(run_id)
            if run.status not in expected:
                raise TransitionRefused(f"run {run_id} is {run.status}; cannot move to {status}")
            for name, value in fields.items():
                setattr(run, name, value)
            run.status = status
            if status in TERMINAL_RUN_STATES:
                run.finished_at = utcnow()
            self.append_event(session, f"run.{status}", run_id=run_id, payload=payload or {})
            return run

    # ---- certificates -------------------------------------------------------------------------

    def revoke(self, serial: str, *, reason: str, by: str) -> None:
        with self.transaction() as session:
            if session.get(RevocationRow, serial) is not None:
                return
            session.add(
                RevocationRow(serial=serial, reason=reason, revoked_by=by, revoked_at=utcnow())
            )
            self.append_event(
                session,
                "certificate.revoked",
                payload={"serial": serial, "reason": reason, "by": by},
            )

    def revocations(self) -> dict[str, str]:
        with self._sessions() as session:
            return {row.serial: row.reason for row in session.scalars(select(RevocationRow))}

    # ---- evaluations ----------------------------------------------------------------------------

    def create_evaluations(self, rows: list[EvaluationRow], *, by: str | None = None) -> None:
        with self.transaction() as session:
            session.add_all(rows)
            for row in rows:
                self.append_event(
                    session,
                    "evaluation.requested",
                    run_id=row.run_id,
                    site=row.site,
                    payload={
                        "evaluation_id": row.id,
                        "checkpoint_sha256": row.checkpoint_sha256,
                        "split": row.split,
                        **({"by": by} if by else {}),
                    },
                )

    def pending_evaluations(self) -> list[EvaluationRow]:
        with self._sessions() as session:
            query = select(EvaluationRow).where(EvaluationRow.status == "pending")
            return list(session.scalars(query.order_by(EvaluationRow.created_at)))

    def evaluation(self, evaluation_id: str) -> EvaluationRow | None:
        with self._sessions() as session:
            return session.get(EvaluationRow, evaluation_id)

    def finish_evaluation(
        self,
        evaluation_id: str,
        *,
        metrics: dict[str, float],
        error: str | None = None,
    ) -> None:
        with self.transaction() as session:
            row = session.get(EvaluationRow, evaluation_id)
            if row is None:
                raise KeyError(evaluation_id)
            row.status = "failed" if error else "done"
            row.metrics = metrics
            row.error = error
            row.lease_token = None
            row.finished_at = utcnow()
            self.append_event(
                session,
                f"evaluation.{row.status}",
                run_id=row.run_id,
                site=row.site,
                payload={
                    "evaluation_id": row.id,
                    "checkpoint_sha256": row.checkpoint_sha256,
                    "split": row.split,
                    "metrics": metrics,
                    "error": error,
                },
            )

    # ---- aggregate statistics -------------------------------------------------------------------

    def create_statistics(
        self,
        request: StatisticsRequestRow,
        answers: list[StatisticsAnswerRow],
        *,
        approval_bundle_sha256: str,
    ) -> None:
        """Records a statistics request with one pending answer per site."""
        with self.transaction() as session:
            request.answers = answers
            session.add(request)
            self.append_event(
                session,
                "statistics.requested",
                payload={
                    "statistics_id": request.id,
                    "dataset": request.dataset,
                    "task_type": request.task_type,
                    "min_count": request.min_count,
                    "noise_std": request.noise_std,
                    "sites": list(request.sites),
                    "approval_bundle_sha256": approval_bundle_sha256,
                    "expires_at": request.expires_at.isoformat() if request.expires_at else None,
                },
            )

    def statistics_request(self, request_id: str) -> StatisticsRequestRow | None:
        with self._sessions() as session:
            return session.scalars(
                select(StatisticsRequestRow)
                .where(StatisticsRequestRow.id == request_id)
                .options(selectinload(StatisticsRequestRow.answers))
            ).first()

    def statistics_requests(self, status: str | None = None) -> list[StatisticsRequestRow]:
        """Statistics requests, oldest first; only those in `status` when given."""
        with self._sessions() as session:
            query = select(StatisticsRequestRow).options(selectinload(StatisticsRequestRow.answers))
            if status is not None:
                query = query.where(StatisticsRequestRow.status == status)
            return list(session.scalars(query.order_by(StatisticsRequestRow.created_at)))

    def finish_statistics_answer(
        self,
        request_id: str,
        site: str,
        *,
        lease_token: str,
        aggregates: dict[str, Any] | None,
        error_code: str | None = None,
        error: str | None = None,
    ) -> StatisticsAnswerRow:
        """Records a site's aggregates (`aggregates` given) or its refusal, exactly once.

        Raises:
            TransitionRefused: The answer is no longer pending under that lease token.
        """
        with self.transaction() as session:
            answer = session.get(StatisticsAnswerRow, (request_id, site), with_for_update=True)
            if answer is None:
                raise KeyError((request_id, site))
            if answer.status != "pending" or answer.lease_token != lease_token:
                raise TransitionRefused(
                    f"statistics {request_id} at {site} is {answer.status}; cannot answer it"
                )
            answer.status = "done" if aggregates is not None else "failed"
            answer.aggregates = aggregates or {}
            answer.error_code = error_code
            answer.error = error
            answer.lease_token = None
            answer.finished_at = utcnow()
            self.append_event(
                session,
                f"statistics.site-{answer.status}",
                site=site,
                payload={
                    "statistics_id": request_id,
                    "aggregates": answer.aggregates,
                    "error_code": error_code,
                    "error": error,
                },
            )
            return answer

    def settle_statistics(
        self,
        request_id: str,
        *,
        status: str,
        combined: dict[str, Any] | None = None,
        error: str | None = None,
        event: str | None = None,
    ) -> StatisticsRequestRow:
        """Moves a pending request to `status` ("done" with `combined`, or "failed").

        The event is `statistics.<status>` unless `event` names another (`statistics.expired`).

        Raises:
            TransitionRefused: The request is no longer pending.
        """
        with self.transaction() as session:
            request = session.get(StatisticsRequestRow, request_id, with_for_update=True)
            if request is None:
                raise KeyError(request_id)
            if request.status != "pending":
                raise TransitionRefused(
                    f"statistics {request_id} is {request.status}; cannot move to {status}"
                )
            request.status = status
            request.combined = combined or {}
            request.error = error
            request.finished_at = utcnow()
            self.append_event(
                session,
                event or f"statistics.{status}",
                payload={"statistics_id": request_id, "combined": request.combined, "error": error},
            )
            return request

    # ---- checkpoint lifecycle -------------------------------------------------------------------

    def checkpoints(self, run_id: str | None = None) -> list[CheckpointRow]:
        """Every checkpoint row (of one run), oldest first, whatever its status."""
        with self._sessions() as session:
            query = select(CheckpointRow).order_by(CheckpointRow.stored_at)
            if run_id is not None:
                query = query.where(CheckpointRow.run_id == run_id)
            return list(session.scalars(query))

    def stored_checkpoints(self, hop_id: str) -> list[CheckpointRow]:
        """The checkpoints of a hop whose bytes the store keeps (status "stored")."""
        with self._sessions() as session:
            query = select(CheckpointRow).where(
                CheckpointRow.hop_id == hop_id, CheckpointRow.status == "stored"
            )
            return list(session.scalars(query))

    def supersede_checkpoints(self, hop_id: str, reason: str) -> list[CheckpointRow]:
        """Marks a hop's stored checkpoints other than its committed output superseded.

        One transaction, one `checkpoint.superseded` event per checkpoint. The caller then
        removes their bytes from the store.
        """
        with self.transaction() as session:
            hop = session.get(HopRow, hop_id)
            if hop is None:
                return []
            rows = list(
                session.scalars(
                    select(CheckpointRow)
                    .where(CheckpointRow.hop_id == hop_id, CheckpointRow.status == "stored")
                    .with_for_update()
                )
            )
            superseded = [row for row in rows if row.sha256 != hop.output_sha256]
            for row in superseded:
                row.status = "superseded"
                self.append_event(
                    session,
                    "checkpoint.superseded",
                    run_id=row.run_id,
                    hop_id=hop_id,
                    site=row.producer_site,
                    payload={"sha256": row.sha256, "size": row.size, "reason": reason},
                )
            return superseded

    def delete_checkpoint(
        self, sha256: str, *, size: int, reason: str, run_id: str | None = None
    ) -> None:
        """Ledgers the deletion of a checkpoint's bytes (row marked "deleted" if there is one)."""
        with self.transaction() as session:
            row = session.get(CheckpointRow, sha256, with_for_update=True)
            if row is not None:
                row.status = "deleted"
                run_id = row.run_id
            self.append_event(
                session,
                "checkpoint.deleted",
                run_id=run_id,
                hop_id=row.hop_id if row is not None else None,
                payload={"sha256": sha256, "size": size, "reason": reason},
            )

    # ---- pages (the dashboard: bounded queries, never every row) ------------------------------

    def runs_page(self, *, limit: int, offset: int = 0, status: str | None = None) -> list[RunRow]:
        """Runs newest first, without their hops; only those in `status` when given."""
        with self._sessions() as session:
            query = select(RunRow).order_by(RunRow.created_at.desc(), RunRow.id)
            if status is not None:
                query = query.where(RunRow.status == status)
            return list(session.scalars(query.limit(limit).offset(offset)))

    def run_status_counts(self) -> dict[str, int]:
        """How many runs are in each status."""
        with self._sessions() as session:
            rows = session.execute(select(RunRow.status, func.count()).group_by(RunRow.status))
            return {status: count for status, count in rows}

    def hop_counts(self, run_ids: Collection[str]) -> dict[str, dict[str, int]]:
        """Per run: how many of its hops are in each status."""
        if not run_ids:
            return {}
        with self._sessions() as session:
            rows = session.execute(
                select(HopRow.run_id, HopRow.status, func.count())
                .where(HopRow.run_id.in_(list(run_ids)))
                .group_by(HopRow.run_id, HopRow.status)
            )
            counts: dict[str, dict[str, int]] = {}
            for run_id, status, count in rows:
                counts.setdefault(run_id, {})[status] = count
            return counts

    def events_page(
        self,
        *,
        limit: int,
        before: int | None = None,
        after: int | None = None,
        run_id: str | None = None,
        site: str | None = None,
        kind: str | None = None,
        ascending: bool = False,
    ) -> list[EventRow]:
        """Events by sequence number (keyset: `before`/`after` a seq), optionally filtered."""
        with self._sessions() as session:
            query = select(EventRow)
            if before is not None:
                query = query.where(EventRow.seq < before)
            if after is not None:
                query = query.where(EventRow.seq > after)
            if run_id:
                query = query.where(EventRow.run_id == run_id)
            if site:
                query = query.where(EventRow.site == site)
            if kind:
                query = query.where(EventRow.kind == kind)
            order = EventRow.seq.asc() if ascending else EventRow.seq.desc()
            return list(session.scalars(query.order_by(order).limit(limit)))

    def event_count(self) -> int:
        with self._sessions() as session:
            return int(session.scalar(select(func.count()).select_from(EventRow)) or 0)

    def checkpoints_of_run(self, run_id: str) -> list[CheckpointRow]:
        with self._sessions() as session:
            query = select(CheckpointRow).where(CheckpointRow.run_id == run_id)
            return list(session.scalars(query.order_by(CheckpointRow.stored_at)))

    # ---- rounds (federated and hybrid runs) ---------------------------------------------------

    def rounds(self, run_id: str) -> list[RoundRow]:
        """A run's rounds in order ([] for a sequential run)."""
        with self._sessions() as session:
            query = select(RoundRow).where(RoundRow.run_id == run_id)
            return list(session.scalars(query.order_by(RoundRow.number)))

    def start_round(self, round_id: str, input_sha256: str | None) -> RoundRow:
        """Fixes a pending round's input (event `round.started`); its hops may then be leased."""
        with self.transaction() as session:
            row = session.get(RoundRow, round_id, with_for_update=True)
            if row is None:
                raise KeyError(round_id)
            if row.status != "pending":
                raise TransitionRefused(f"round {row.number} is {row.status}; cannot start it")
            row.status = "training"
            row.input_sha256 = input_sha256
            row.started_at = utcnow()
            self.append_event(
                session, "round.started", run_id=row.run_id,
                payload={"round": row.number, "input_sha256": input_sha256},
            )  # fmt: skip
            return row

    def finish_round(
        self,
        round_id: str,
        *,
        checkpoints: Sequence[CheckpointRow],
        output_sha256: str,
        server_state_sha256: str | None,
        contributions: list[list[Any]],
        dropped: list[list[Any]],
        metrics: dict[str, float],
    ) -> RoundRow:
        """Records a round's aggregate (and server state) as committed, in one event.

        The aggregate's checkpoint row (and the state blob's) are written in the same
        transaction as `round.aggregated`: a round is aggregated exactly once.
        """
        with self.transaction() as session:
            row = session.get(RoundRow, round_id, with_for_update=True)
            if row is None:
                raise KeyError(round_id)
            if row.status != "training":
                raise TransitionRefused(f"round {row.number} is {row.status}; cannot aggregate")
            for checkpoint in checkpoints:
                existing = session.get(CheckpointRow, checkpoint.sha256, with_for_update=True)
                if existing is None:
                    session.add(checkpoint)
                else:
                    existing.status = "stored"  # content-addressed: the same bytes again
            row.status = "aggregated"
            row.output_sha256 = output_sha256
            row.server_state_sha256 = server_state_sha256
            row.contributions = contributions
            row.dropped = dropped
            row.metrics = metrics
            row.finished_at = utcnow()
            self.append_event(
                session, "round.aggregated", run_id=row.run_id,
                payload={"round": row.number, "input_sha256": row.input_sha256,
                         "output_sha256": output_sha256, "contributions": contributions,
                         "dropped": dropped, "server_state_sha256": server_state_sha256},
            )  # fmt: skip
            return row

    def fail_round(self, round_id: str, error: str, dropped: list[list[Any]]) -> RoundRow:
        """Marks a round failed (event `round.failed`): too few contributions, or an abort."""
        with self.transaction() as session:
            row = session.get(RoundRow, round_id, with_for_update=True)
            if row is None:
                raise KeyError(round_id)
            if row.status not in ("pending", "training"):
                raise TransitionRefused(f"round {row.number} is {row.status}; cannot fail it")
            row.status = "failed"
            row.error = error
            row.dropped = dropped
            row.finished_at = utcnow()
            self.append_event(
                session, "round.failed", run_id=row.run_id,
                payload={"round": row.number, "error": error, "dropped": dropped},
            )  # fmt: skip
            return row
