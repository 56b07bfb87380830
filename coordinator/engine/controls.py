"""What operators do to runs: start one, pause, resume or abort it, skip its failed hop."""

from __future__ import annotations

import asyncio
import json
import logging
import uuid

from coordinator.engine.active_runs import ActiveRuns
from coordinator.engine.hops import Hops
from coordinator.engine.leases import HopLeases
from coordinator.engine.rounds import runs_in_rounds
from coordinator.engine.rules import actor, current_hop
from coordinator.engine.uploads import UploadIntake
from coordinator.errors import InvalidInput, NotFound
from coordinator.ledger import LIVE_HOP_STATES, HopRow, Ledger, RoundRow, TransitionRefused
from coordinator.plan import RunPlan
from coordinator.rounds import round_rows

__all__ = ["RunControls"]

logger = logging.getLogger(__name__)


class RunControls:
    """Operator actions on runs, each one ledgered transition under the engine's lock."""

    def __init__(
        self,
        ledger: Ledger,
        lock: asyncio.Lock,
        hops: Hops,
        leases: HopLeases,
        intake: UploadIntake,
        runs: ActiveRuns,
    ) -> None:
        self.ledger = ledger
        self.runs = runs  # a running run is read from memory; any other from the ledger
        self._lock = lock  # the engine's one lock over state transitions
        self.hops = hops
        self.leases = leases
        self.intake = intake
        # Operators' transitions commit on the thread hop transitions commit on, in the order
        # handed over: ledger I/O stays off the event loop, and all writes keep one order.
        self.writer = hops.writer

    async def start_run(self, plan: RunPlan, *, by: str | None = None) -> str:
        """Records a new run and leases its first hop if the site is connected.

        Args:
            plan: The run plan.
            by: Who started it (a dashboard account), recorded in the `run.created` event.
        """
        known = {s.name for s in self.ledger.sites()}
        unknown = sorted({site for site, _ in plan.expanded_hops()} - known)
        if unknown:
            raise InvalidInput(
                f"run plan names site(s) that never registered: {', '.join(unknown)}; "
                f"known sites: {', '.join(sorted(known)) or 'none'}"
            )
        run_id = uuid.uuid4().hex
        rounds: list[RoundRow] = []
        if plan.mode != "sequential":
            hops, rounds = round_rows(plan, run_id)
        else:
            hops = [
                HopRow(
                    id=uuid.uuid4().hex,
                    index=index,
                    site=site,
                    hyperparameters=hp.model_dump(),
                    status="pending",
                    metrics={},
                )
                for index, (site, hp) in enumerate(plan.expanded_hops())
            ]
        await self.writer.run(
            self.ledger.create_run,
            run_id, plan.name, json.loads(plan.to_json()), hops, plan.base_model_sha256, by=by,
            rounds=rounds,
        )  # fmt: skip
        logger.info("run %s (%s) created with %d hops", run_id, plan.name, len(hops))
        await self.hops.dispatch(run_id)
        return run_id

    async def resume_run(self, run_id: str, *, by: str | None = None) -> None:
        """Resumes a paused run: its failed hop is tried again."""
        async with self._lock:
            try:
                run = self.runs.run(run_id)
            except KeyError:
                raise NotFound(f"no run {run_id!r}") from None
            if run.status != "paused":
                raise InvalidInput(f"run {run_id} is {run.status}, not paused")
            hop = next((h for h in run.hops if h.status == "failed"), None)
            await self.writer.run(
                self._settle_failed_hop_and_run_on, run_id, hop.id if hop is not None else None,
                "pending", "hop.retry", {"action": "resume", **actor(by)}, by,
            )  # fmt: skip
            await self.hops.dispatch_locked(run_id)

    async def abort_run(self, run_id: str, reason: str, *, by: str | None = None) -> None:
        async with self._lock:
            try:
                run = self.runs.run(run_id)  # before it leaves the running runs
                await self.writer.run(
                    self.ledger.transition_run,
                    run_id, expected=("running", "paused"), status="aborted",
                    payload={"reason": reason, **actor(by)}, error=reason,
                )  # fmt: skip
            except KeyError:
                raise NotFound(f"no run {run_id!r}") from None
            except TransitionRefused as exc:
                raise InvalidInput(str(exc)) from exc
            for hop in run.hops:
                if hop.status in LIVE_HOP_STATES:
                    self.leases.forget(hop.id)
                    self.intake.hop_ended(hop.id, "run aborted")

    async def pause_run(self, run_id: str, *, by: str | None = None) -> None:
        """Pauses a running run; the hop in flight is called back and redone on resume.

        Its lease is withdrawn, so the site's late upload or result is refused as stale.
        """
        async with self._lock:
            try:
                run = self.runs.run(run_id)
            except KeyError:
                raise NotFound(f"no run {run_id!r}") from None
            if run.status != "running":
                raise InvalidInput(f"run {run_id} is {run.status}, not running")
            hop = current_hop(run)
            live = [hop] if hop is not None and hop.status in LIVE_HOP_STATES else []
            if runs_in_rounds(run):  # a round's hops train in parallel: recall each of them
                live = self.hops.rounds.live_hops(run)
            for hop in live:
                self.leases.forget(hop.id)
            await self.writer.run(self._pause, run_id, [hop.id for hop in live], by)
            for hop in live:
                self.leases.forget(hop.id)  # what a beat answered during the write extended
                self.intake.hop_ended(hop.id, "run paused")

    async def skip_failed_hop(self, run_id: str, *, by: str | None = None) -> None:
        """Skips the failed hop of a paused run and resumes the run from the next hop."""
        async with self._lock:
            try:
                run = self.runs.run(run_id)
            except KeyError:
                raise NotFound(f"no run {run_id!r}") from None
            hop = next((h for h in run.hops if h.status == "failed"), None)
            if run.status != "paused" or hop is None:
                raise InvalidInput(f"run {run_id} is {run.status} with no failed hop to skip")
            await self.writer.run(
                self._settle_failed_hop_and_run_on, run_id, hop.id, "skipped", "hop.skipped",
                {"action": "skip", **actor(by)}, by,
            )  # fmt: skip
            await self.hops.dispatch_locked(run_id)

    def _pause(self, run_id: str, recalled: list[str], by: str | None) -> None:
        """The hops in flight recalled and the run paused: one transaction, chained events
        (ledger writer's thread)."""
        with self.ledger.transaction():
            for hop_id in recalled:
                self.ledger.transition_hop(
                    hop_id, expected=LIVE_HOP_STATES, status="pending", event="hop.recalled",
                    payload={"action": "pause", **actor(by)}, lease_token=None,
                )  # fmt: skip
            self.ledger.transition_run(
                run_id, expected=("running",), status="paused",
                payload={"reason": "paused by an operator", **actor(by)},
                error=None,
            )  # fmt: skip

    def _settle_failed_hop_and_run_on(
        self,
        run_id: str,
        hop_id: str | None,
        status: str,
        event: str,
        payload: dict[str, str],
        by: str | None,
    ) -> None:
        """A paused run's failed hop (if any) to `status`, and the run running again: one
        transaction, chained events (ledger writer's thread)."""
        with self.ledger.transaction():
            if hop_id is not None:
                self.ledger.transition_hop(
                    hop_id, expected=("failed",), status=status, event=event, payload=payload
                )
            self.ledger.transition_run(
                run_id, expected=("paused",), status="running", payload=actor(by), error=None
            )
