"""Reading and verifying the event chain, and checking state rows against their events."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from sqlalchemy import select

from coordinator.ledger._chain import (
    GENESIS_HASH,
    ChainBreak,
    LedgerCore,
    LedgerVerification,
    TransitionRefused,
    locked_get,
)
from coordinator.ledger._integrity import (
    MISMATCH_EVENT,
    RowMismatch,
    StateRow,
    state_mismatches,
    state_rows,
)
from coordinator.ledger._run_check import checked_run_mismatches
from coordinator.ledger._walk import walk_chain
from coordinator.ledger.models import Base, CheckpointRow, EventRow, HopRow, RunRow


def _missing_checkpoint(sha256: str) -> RowMismatch:
    return RowMismatch("checkpoints", sha256, "", f"checkpoints row {sha256} is missing")


class EventLog(LedgerCore):
    """The event log: reads, the chain walk, and the state rows' checks."""

    if TYPE_CHECKING:

        def checkpoint(self, sha256: str) -> CheckpointRow | None: ...

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

    def verify(
        self, *, rows: bool = True, chunk: int = 1000, processes: int = 1
    ) -> LedgerVerification:
        """Streams the event chain, then (with `rows`) checks every state row against it.

        Events are read `chunk` at a time as plain tuples with the payload as its stored text
        (decoded once, not by the ORM), and only the newest seq per state row is kept, so
        memory does not grow with the number of events. With `processes` > 1 a long chain is
        cut into that many seq ranges, each walked by a process of its own (`walk_chain`).
        """
        with self._sessions() as session:
            walk = walk_chain(
                session.connection(), self.url, rows=rows, chunk=chunk, processes=processes
            )
            index = walk.index
            mismatches = list(index.compare_tables(session, chunk)) if index is not None else []
        return LedgerVerification(
            chain_break=walk.broken,
            events=walk.count,
            last_seq=walk.last_seq,
            head=walk.prev if walk.prev is not None else GENESIS_HASH,
            row_mismatches=mismatches,
            recorded_mismatches=index.mismatch_events if index is not None else [],
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
            return state_mismatches(session, rows, self.verified_events)

    def run_mismatches(self, run: RunRow, checkpoint_sha256: str | None) -> list[RowMismatch]:
        """The engine's check before it acts on a run: the run, its hops and the checkpoint
        it is about to hand out (a hop's input or the final adapter) against their events."""
        rows: list[Base] = [run, *run.hops]
        found: list[RowMismatch] = []
        if checkpoint_sha256 is not None:
            checkpoint = self.checkpoint(checkpoint_sha256)
            if checkpoint is None:
                found.append(_missing_checkpoint(checkpoint_sha256))
            else:
                rows.append(checkpoint)
        return self.row_mismatches(rows) + found

    def stored_run_mismatches(
        self, run_id: str, checkpoint_sha256: str | None
    ) -> list[RowMismatch]:
        """`run_mismatches` of the run as stored now, read from SQL (the engine runs this check
        before every lease): rows and events read as the same values, of the same types, as when
        this check last found them sound are not compared again (`checked_run_mismatches`).

        Raises:
            KeyError: The run has no row.
        """
        return checked_run_mismatches(
            self.engine,
            self.run_checks,
            self.verified_events,
            run_id,
            checkpoint_sha256,
            lambda: self.full_run_mismatches(run_id, checkpoint_sha256),
        )

    def full_run_mismatches(self, run_id: str, checkpoint_sha256: str | None) -> list[RowMismatch]:
        """`run_mismatches` of the run as stored now: the run, its hops and the checkpoint read
        from SQL as plain columns in one read transaction (no ORM objects), each compared with
        its event.

        Raises:
            KeyError: The run has no row.
        """
        with self.engine.connect() as connection:
            rows: list[StateRow] = state_rows(connection, RunRow, "id", run_id)
            if not rows:
                raise KeyError(run_id)
            rows += state_rows(connection, HopRow, "run_id", run_id, order_by="index")
            found: list[RowMismatch] = []
            if checkpoint_sha256 is not None:
                checkpoint = state_rows(connection, CheckpointRow, "sha256", checkpoint_sha256)
                if not checkpoint:
                    found.append(_missing_checkpoint(checkpoint_sha256))
                rows += checkpoint
            return state_mismatches(connection, rows, self.verified_events) + found

    def pause_for_mismatch(self, run_id: str, mismatches: Sequence[RowMismatch]) -> RunRow:
        """Pauses a running run whose rows differ from their events; one `ledger.mismatch` event.

        Raises:
            TransitionRefused: The run is not running any more.
        """
        error = "ledger mismatch: " + "; ".join(m.message for m in mismatches[:3])
        if len(mismatches) > 3:
            error += f"; and {len(mismatches) - 3} more"
        with self.transaction() as session:
            run = locked_get(session, RunRow, run_id)
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
