"""Federated and hybrid runs: each round's hops dispatched together, then aggregated.

Within a round every member (a site; a hybrid group's chain) trains from the round's input in
parallel, hop by hop, through the same lease, upload, lineage, signature and commit path as a
sequential hop (`Hops`). Once every member is done, the round's aggregate is computed and
committed (`coordinator.federated.commit_round`) and the next round starts from it. The round's
deadline drops or aborts stragglers as the plan's `federated.stragglers` says.

The rounds are read from the runs the engine holds in memory (`ActiveRuns`, written through by
every commit), never from SQL per dispatch, beat or contribution. The round rows are checked
against their ledger events (read from SQL, where an edit made behind the ledger's back is) only
before the engine acts on them: starting a round, leasing its hops, aggregating, finishing.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

from coordinator.aggregation import AggregationError
from coordinator.engine.active_runs import ActiveRuns
from coordinator.engine.export import complete_run
from coordinator.engine.leases import HopLeases
from coordinator.engine.ledger_writer import LedgerWriter
from coordinator.engine.sessions import SiteSessions
from coordinator.engine.uploads import UploadIntake
from coordinator.federated import AggregateSigner, commit_round
from coordinator.ledger import (
    LIVE_HOP_STATES,
    HopRow,
    Ledger,
    RoundRow,
    RunRow,
    TransitionRefused,
)
from coordinator.plan import RunPlan
from coordinator.rounds import DEADLINE_CODE, current_round, leasable_hops, stragglers
from coordinator.storage_faults import StorageHealth
from coordinator.store import CheckpointStore

__all__ = ["HopDispatcher", "Rounds", "runs_in_rounds"]

logger = logging.getLogger(__name__)


def runs_in_rounds(run: RunRow) -> bool:
    """True for a federated or hybrid run."""
    return str(run.plan.get("mode", "sequential")) != "sequential"


class HopDispatcher(Protocol):
    """What rounds need of the hop path (implemented by `Hops`)."""

    async def dispatch_hop(
        self, run: RunRow, hop: HopRow, input_sha256: str | None, *, round_number: int
    ) -> None: ...

    async def hop_failed(self, run: RunRow, hop: HopRow, code: str, message: str) -> str: ...


class Rounds:
    """Moves federated and hybrid runs along their rounds."""

    def __init__(
        self,
        ledger: Ledger,
        store: CheckpointStore,
        runs_dir: Path,
        storage: StorageHealth,
        sessions: SiteSessions,
        leases: HopLeases,
        intake: UploadIntake,
        signer: AggregateSigner | None,
        runs: ActiveRuns,
        writer: LedgerWriter,
    ) -> None:
        self.ledger = ledger
        self.writer = writer  # the rounds' ledger reads and writes run on its thread
        self.runs = runs  # the running runs and their rounds, in memory (written through)
        self.store = store
        self.runs_dir = runs_dir
        self.storage = storage
        self.sessions = sessions
        self.leases = leases
        self.intake = intake
        self.signer = signer

    async def dispatch_locked(self, run: RunRow, hops: HopDispatcher) -> None:
        """Starts, dispatches, aggregates or finishes the run's current round (engine lock held).

        Reads the rounds held in memory; a call that only finds the round's hops leased and
        sent (a reconnect, a watchdog pass, a contribution while others train) reads no SQL.
        """
        rounds = self.runs.rounds(run.id)
        row = current_round(rounds)
        if row is None:
            if not await self._tampered(run):
                await self._finish(run, rounds)
            return
        if row.status == "failed":
            return
        checked = row.status == "pending"  # its rows are checked before it starts
        if row.status == "pending":
            if await self._tampered(run):
                return
            before = [r for r in rounds if r.number < row.number]
            row = await self.writer.run(
                self.ledger.start_round, row.id, before[-1].output_sha256 if before else None
            )
            logger.info("run %s round %d started", run.id, row.number)
        by_id = {h.id: h for h in run.hops}
        leasable = leasable_hops(row, by_id)
        if not leasable and not stragglers(row, by_id):
            if not await self._tampered(run):
                await self._aggregate(run, rounds, row, by_id, hops)
            return
        leases_now = any(self._leases_now(hop) for hop, _ in leasable)
        if leases_now and not checked and await self._tampered(run):
            return
        for hop, input_sha256 in leasable:
            if self._on_its_stream(hop):
                continue  # leased and sent already: nothing to send (and no site is "next")
            await hops.dispatch_hop(run, hop, input_sha256, round_number=row.number)

    def _on_its_stream(self, hop: HopRow) -> bool:
        """Whether the hop is leased and its task is on its site's current stream."""
        session = self.sessions.get(hop.site)
        return (
            hop.status in LIVE_HOP_STATES
            and session is not None
            and self.leases.sent.get(hop.id) is session
        )

    def _leases_now(self, hop: HopRow) -> bool:
        """Whether dispatching this hop writes a lease now (pending, its site here, no backoff)."""
        return (
            hop.status == "pending"
            and hop.site in self.sessions
            and time.monotonic() >= self.leases.not_before.get(hop.id, 0.0)
        )

    async def _tampered(self, run: RunRow) -> bool:
        """Pauses the run (ledgered) if a round row in SQL differs from its ledger event.

        Read from SQL, not memory: an edit made behind the ledger's back is in the database.
        Called only before the engine acts on the rounds, never per beat or re-dispatch.
        """
        return await self.writer.run(self._check_rounds, run)

    def _check_rounds(self, run: RunRow) -> bool:
        mismatches = self.ledger.row_mismatches(list(self.ledger.rounds(run.id)))
        if not mismatches:
            return False
        logger.error("run %s paused: %s", run.id, mismatches[0].message)
        with contextlib.suppress(TransitionRefused):
            self.ledger.pause_for_mismatch(run.id, mismatches)
        return True

    async def _aggregate(
        self,
        run: RunRow,
        rounds: list[RoundRow],
        row: RoundRow,
        by_id: dict[str, HopRow],
        hops: HopDispatcher,
    ) -> None:
        if self.signer is None:
            await self._fail(run, row, "this coordinator has no key to sign round aggregates")
            return
        current = [r if r.id != row.id else row for r in rounds]
        try:
            with self.storage.guard(f"aggregate of round {row.number} of run {run.id}"):
                done = await self.writer.run(
                    commit_round, self.ledger, self.store, self.signer, run, current, row, by_id
                )
        except (AggregationError, OSError) as exc:
            await self._fail(run, row, f"round {row.number}: {exc}")
            return
        logger.info("run %s round %d aggregated from %d contribution(s)", run.id, done.number,
                    len(done.contributions))  # fmt: skip
        await self._dispatch_again(run.id, hops)

    async def _dispatch_again(self, run_id: str, hops: HopDispatcher) -> None:
        """Moves the run on from its rows as the last write left them (held, written through)."""
        fresh = self.runs.get(run_id)
        if fresh is not None:  # still running
            await self.dispatch_locked(fresh, hops)

    async def _fail(self, run: RunRow, row: RoundRow, error: str) -> None:
        logger.error("run %s failed: %s", run.id, error)
        await self.writer.run(self._fail_round_and_run, run, row, error)

    def _fail_round_and_run(self, run: RunRow, row: RoundRow, error: str) -> None:
        self.ledger.fail_round(row.id, error, [])
        self.ledger.transition_run(
            run.id, expected=("running",), status="failed", error=error,
            payload={"round": row.number, "message": error},
        )  # fmt: skip

    async def _finish(self, run: RunRow, rounds: Sequence[RoundRow]) -> None:
        """Completes a run whose rounds are all aggregated: final = the last aggregate."""
        final = rounds[-1].output_sha256 if rounds else None
        if final is None:
            await self.writer.run(
                self.ledger.transition_run,
                run.id, expected=("running",), status="failed", error="no round was aggregated",
            )  # fmt: skip
            return
        await complete_run(
            self.ledger, self.writer, self.store, self.storage, self.runs_dir, run.id, final
        )
        logger.info("run %s completed after %d rounds", run.id, len(rounds))

    def live_hops(self, run: RunRow) -> list[HopRow]:
        """The hops of the run's current round that hold a lease (to recall on pause)."""
        row = current_round(self.runs.rounds(run.id))
        if row is None:
            return []
        ids = {i for _, chain in row.members for i in chain}
        return [h for h in run.hops if h.id in ids and h.status in LIVE_HOP_STATES]

    async def check_deadlines(self, run: RunRow, hops: HopDispatcher) -> None:
        """Leases, absent sites and the round's deadline of one run (engine lock held)."""
        row = current_round(self.runs.rounds(run.id))
        if row is None or row.status != "training":
            await self.dispatch_locked(run, hops)
            return
        now = time.monotonic()
        by_id = {h.id: h for h in run.hops}
        for member in stragglers(row, by_id):
            hop = member.next_hop
            if hop is None:
                continue
            overdue = self.leases.overdue(run, hop, self.sessions, now)
            if overdue is not None:
                await hops.hop_failed(run, hop, *overdue)
                return
        spec = RunPlan.model_validate(run.plan).federated
        started = row.started_at
        if spec is not None and spec.stragglers != "wait" and started is not None:
            if started.tzinfo is None:
                started = started.replace(tzinfo=UTC)
            late = (datetime.now(UTC) - started).total_seconds() > spec.round_deadline_seconds
            if late and stragglers(row, by_id):
                await self._deadline(run, row, by_id, spec.stragglers, hops)
                return
        await self.dispatch_locked(run, hops)

    async def _deadline(
        self, run: RunRow, row: RoundRow, by_id: dict[str, HopRow], action: str,
        hops: HopDispatcher,
    ) -> None:  # fmt: skip
        late = stragglers(row, by_id)
        names = ", ".join(m.name for m in late)
        if action == "abort":
            for member in late:
                for hop in member.hops:
                    if hop.status in LIVE_HOP_STATES:
                        self.leases.forget(hop.id)
                        self.intake.hop_ended(hop.id, "run aborted at the round deadline")
            await self._fail(run, row, f"round {row.number}: {names} missed the round deadline")
            return
        for member in late:
            for hop in member.hops:
                if hop.status in ("committed", "skipped"):
                    continue
                self.leases.forget(hop.id)
                await self.writer.run(
                    self.ledger.transition_hop,
                    hop.id, expected=(*LIVE_HOP_STATES, "pending"), status="skipped",
                    event="hop.skipped", lease_token=None, error_code=DEADLINE_CODE,
                    error="dropped at the round deadline",
                    payload={"code": DEADLINE_CODE, "action": "drop", "round": row.number},
                )  # fmt: skip
                self.intake.hop_ended(hop.id, "hop dropped at the round deadline")
        logger.warning("run %s round %d dropped %s at its deadline", run.id, row.number, names)
        await self._dispatch_again(run.id, hops)
