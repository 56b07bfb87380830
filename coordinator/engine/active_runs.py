"""The running runs, held in memory: read by every call, written through by every ledger commit.

Loaded once from SQL (only running runs) on first use; every transaction this process commits
through the engine's `Ledger` updates the rows it wrote here (`Ledger.row_observers`), so no
heartbeat, connect, download, report or watchdog pass reads a run from SQL. A federated or
hybrid run's rounds are held with it, so its dispatches, beats and contributions read no round
either; its evaluations too, so an admin's view of a running run reads no SQL. The ledger
stays the source of truth: a restart loads it again, and a ledger event written by anything
else (another process or `Ledger` object) is noticed by its sequence number and the runs are
read again.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy import inspect as sa_inspect
from sqlalchemy.orm.attributes import set_committed_value

from coordinator.engine.ledger_writer import LedgerWriter
from coordinator.ledger import Base, EvaluationRow, HopRow, Ledger, RoundRow, RunRow

__all__ = ["ActiveRuns"]

logger = logging.getLogger(__name__)


@functools.cache
def _column_keys(model: type[Base]) -> tuple[str, ...]:
    return tuple(column.key for column in sa_inspect(model).column_attrs)


_UNSET = object()


def _copy_columns(target: Base, source: Base) -> None:
    """Gives a held row the committed column values of the same row as a transaction wrote it.

    A column the held row holds already (the same value, of the same type) is left as it is:
    a commit writes a few columns of a row, and this runs on the event loop for every row of
    every commit, before the lease the commit granted is pushed (about 3 us a column set).
    """
    held = target.__dict__
    for key in _column_keys(type(source)):
        value = getattr(source, key)
        current = held.get(key, _UNSET)
        if current is value or (type(current) is type(value) and current == value):
            continue
        set_committed_value(target, key, value)


class ActiveRuns:
    """Every running run with its hops (and rounds), by run id; each of their hops by hop id."""

    def __init__(self, ledger: Ledger, writer: LedgerWriter | None = None) -> None:
        self.ledger = ledger
        self.writer = writer  # its thread commits; what it wrote is applied on the loop
        self._runs: dict[str, RunRow] | None = None  # None: not loaded yet
        self._hops: dict[str, tuple[RunRow, HopRow]] = {}
        self._rounds: dict[str, list[RoundRow]] = {}  # run id -> its rounds in order
        self._unread: set[str] = set()  # running runs written here but not yet held
        # Run id -> the count of changes to the held rows when its own last changed
        self._revisions: dict[str, int] = {}
        self._changes = 0
        self._seq = 0  # the newest ledger event this view has accounted for
        self._seq_lock = threading.Lock()  # a commit's thread raises it, the loop reads it
        self.loads = 0  # full loads from SQL (start, or after a change made elsewhere)
        self.loop: asyncio.AbstractEventLoop | None = None  # where the rows are read
        ledger.row_observers.append(self._written)
        ledger.head_observers.append(self._appended)

    # ---- reads --------------------------------------------------------------------------------

    def all(self) -> list[RunRow]:
        """The running runs, oldest first."""
        runs = self._held()
        return sorted(runs.values(), key=lambda run: run.created_at)

    def get(self, run_id: str) -> RunRow | None:
        """The run if it is running, else None."""
        return self._held().get(run_id)

    def run(self, run_id: str) -> RunRow:
        """The run: held if it is running, else read from the ledger (paused, finished).

        Raises:
            KeyError: No such run.
        """
        held = self.get(run_id)
        return held if held is not None else self.ledger.run(run_id)

    def rounds(self, run_id: str) -> list[RoundRow]:
        """A run's rounds in order ([] for a sequential run): held if the run is running, else
        read from the ledger."""
        if self.get(run_id) is None:
            return self.ledger.rounds(run_id)
        return self._rounds.get(run_id, [])

    def held(self, run_id: str) -> RunRow | None:
        """The run as held now if it is running, with no SQL read: None when the runs are not
        loaded yet or this one is due to be read again (created, resumed, a hop added), as for
        a run that is not running (the caller reads the ledger)."""
        if self._runs is None or run_id in self._unread:
            return None
        return self._runs.get(run_id)

    def held_rounds(self, run_id: str) -> list[RoundRow]:
        """The rounds held with a run `held` returned ([] for a sequential run)."""
        return self._rounds.get(run_id, [])

    def revision(self, run_id: str) -> int:
        """A number that changes whenever the rows held for the run change: written through,
        held anew or read again. What was built from a run `held` returned stays current
        while `held` returns the same run object with the same revision."""
        return self._revisions.get(run_id, 0)

    def hop(self, hop_id: str) -> tuple[RunRow, HopRow] | None:
        """A hop of a running run, with its run; None for any other hop."""
        self._held()
        return self._hops.get(hop_id)

    # ---- keeping in step with the ledger ------------------------------------------------------

    def reload(self) -> None:
        """Reads every running run from SQL again (start-up, or after a change made elsewhere)."""
        last = self.ledger.last_seq()
        runs = self.ledger.active_runs()
        self.loads += 1
        self._saw(last)
        self._runs = {run.id: run for run in runs}
        self._unread.clear()
        self._hops = {hop.id: (run, hop) for run in runs for hop in run.hops}
        self._rounds = self.ledger.rounds_of([run.id for run in runs])
        self._revisions.clear()
        for run in runs:
            self._changed(run.id)

    def check_outside_writes(self) -> bool:
        """Reads the runs again if the ledger has events this view did not see written;
        returns whether it had.

        One indexed query (the newest event's seq): admin actions reach the engine in this
        process, but a ledger written by another process or `Ledger` must not be missed. Call
        it under the engine's lock: a transition's own commit is not an outside write.
        """
        if self._runs is None:
            return False
        last = self.ledger.last_seq()  # the seq alone: no event row built per pass
        if last > self._seq:
            logger.info("ledger written outside this engine (event #%d); reading runs again",
                        last)  # fmt: skip
            self.reload()
            return True
        return False

    def _held(self) -> dict[str, RunRow]:
        # Read outside an event loop (a test, the CLI): rows written later apply at once.
        with contextlib.suppress(RuntimeError):
            self.loop = asyncio.get_running_loop()
        if self._runs is None:
            self.reload()
        assert self._runs is not None
        for run_id in list(self._unread):
            self._unread.discard(run_id)
            try:
                run = self.ledger.run(run_id)
            except KeyError:
                continue
            if run.status == "running":
                self._hold(run, self.ledger.rounds(run_id))
        return self._runs

    def _hold(self, run: RunRow, rounds: list[RoundRow]) -> None:
        assert self._runs is not None
        self._drop(run.id)
        self._runs[run.id] = run
        self._changed(run.id)
        for hop in run.hops:
            self._hops[hop.id] = (run, hop)
        if rounds:
            self._rounds[run.id] = rounds

    def _drop(self, run_id: str) -> None:
        assert self._runs is not None
        old = self._runs.pop(run_id, None)
        self._rounds.pop(run_id, None)
        self._revisions.pop(run_id, None)
        if old is not None:
            for hop in old.hops:
                self._hops.pop(hop.id, None)

    def _changed(self, run_id: str) -> None:
        """Notes a change to the rows held for the run (none if it is not held)."""
        if self._runs is not None and run_id in self._runs:
            self._changes += 1
            self._revisions[run_id] = self._changes

    def on_loop(self, callback: Callable[..., None], *args: Any) -> None:
        """Runs `callback` on the event loop that reads the rows (a writer thread commits)."""
        loop = self.writer.loop if self.writer is not None and self.writer.loop else self.loop
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if loop is None or running is loop or not loop.is_running():
            callback(*args)
        else:
            loop.call_soon_threadsafe(callback, *args)

    def _written(self, rows: Sequence[Base]) -> None:
        self.on_loop(self._apply, list(rows))

    def _appended(self, seq: int, _hash: str, _kinds: tuple[str, ...]) -> None:
        # On the committing thread, not through the loop: one wake-up of the loop per commit
        # (its rows, `_written`), not two. A pass of `check_outside_writes` under the engine's
        # lock runs before or after a whole transition (its rows and this seq), never between.
        self._saw(seq)

    def _saw(self, seq: int) -> None:
        with self._seq_lock:
            self._seq = max(self._seq, seq)

    def _apply(self, rows: list[Base]) -> None:
        """Writes committed rows through to the held runs (a run that stops running leaves)."""
        if self._runs is None:
            return  # nothing held yet: the first read loads the committed state
        for row in rows:
            if isinstance(row, RunRow):
                self._changed(row.id)
                held = self._runs.get(row.id)
                if row.status != "running":
                    self._drop(row.id)
                    self._unread.discard(row.id)
                elif held is not None:
                    _copy_columns(held, row)
                else:
                    self._unread.add(row.id)  # created or resumed: read once, with its hops
            elif isinstance(row, HopRow):
                self._changed(row.run_id)
                found = self._hops.get(row.id)
                if found is not None:
                    _copy_columns(found[1], row)
                elif row.run_id in self._runs:
                    self._unread.add(row.run_id)  # a hop added to a held run
            elif isinstance(row, RoundRow):
                self._changed(row.run_id)
                held_round = next(
                    (r for r in self._rounds.get(row.run_id, []) if r.id == row.id), None
                )
                if held_round is not None:
                    _copy_columns(held_round, row)
                elif row.run_id in self._runs:
                    self._unread.add(row.run_id)  # a round added to a held run: read it again
            elif isinstance(row, EvaluationRow):
                self._changed(row.run_id)
                self._evaluation_written(row)

    def _evaluation_written(self, row: EvaluationRow) -> None:
        """An evaluation of a held run, created or updated: its row written through."""
        assert self._runs is not None
        run = self._runs.get(row.run_id)
        if run is None:
            return
        held = next((e for e in run.evaluations if e.id == row.id), None)
        if held is not None:
            _copy_columns(held, row)
            return
        added = EvaluationRow()
        _copy_columns(added, row)
        # A new list set as committed: appending to a detached row's collection would fire
        # the ORM's collection events (and its cascade) for nothing.
        set_committed_value(run, "evaluations", [*run.evaluations, added])
