"""The admin view of runs (`pb.RunStatus`): a running run from the runs held in memory, any
other read on the ledger reader's thread, so no admin call reads SQL on the event loop.

A running run's view is built on the loop (its waiting reason and progress are the loop's
state); a paused or finished run's is built on the reader's thread with the rows it read,
since nothing in it changes with the loop's state but progress and faults, read as values.

A held run's view is built once per change of its held rows (`ActiveRuns.revision`) and copied
per call with what is live put in: its hops' progress, the storage fault, the wait for a site.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from coordinator.engine.active_runs import ActiveRuns
from coordinator.engine.export import final_adapter_dir
from coordinator.engine.hops import Hops
from coordinator.engine.leases import HopLeases
from coordinator.engine.ledger_reader import LedgerReader
from coordinator.engine.rules import current_hop
from coordinator.engine.tasks import approval_bundle
from coordinator.ledger import Ledger, RoundRow, RunRow
from coordinator.rounds import round_statuses
from coordinator.storage_faults import StorageHealth
from protocols.v1 import baton_pb2 as pb

__all__ = ["RunViews"]

# A run as read from SQL, its rounds, and its view (None: running, its view built on the loop)
_Read = tuple[RunRow, list[RoundRow], pb.RunStatus | None]


@dataclass(frozen=True)
class _Built:
    """A run's view without what changes with the loop's state, and where that goes."""

    status: pb.RunStatus  # no progress, storage fault or waiting reason
    waiting: tuple[int, str] | None  # the running run's current hop if pending: (place, site)


@dataclass(frozen=True)
class _HeldView:
    """The view built from a held run's rows (the very objects) at one revision of them."""

    run: RunRow
    revision: int
    plan: object  # the plan the view's text was made from (the held row's value, as is)
    built: _Built


class RunViews:
    """Builds `pb.RunStatus` messages for admin calls, reading SQL only off the event loop."""

    def __init__(
        self,
        ledger: Ledger,
        runs: ActiveRuns,
        reader: LedgerReader,
        hops: Hops,
        leases: HopLeases,
        storage: StorageHealth,
        runs_dir: Path,
    ) -> None:
        self.ledger = ledger
        self.runs = runs
        self.reader = reader
        self.hops = hops
        self.leases = leases
        self.storage = storage
        self.runs_dir = runs_dir
        # Run id -> (digest of its plan's text, its approval bundle's sha256). A run's plan is
        # never written after it is created; the digest still keys the answer, so a plan edited
        # outside the coordinator shows the bundle it now makes, as it did when rebuilt per call.
        self._bundles: dict[str, tuple[bytes, str]] = {}
        self._held_views: dict[str, _HeldView] = {}  # run id -> its view as last built on the loop

    # ---- one run, many runs -------------------------------------------------------------------

    async def run(self, run_id: str) -> pb.RunStatus:
        """The view of one run: from memory if it is running, else read on the reader thread.

        Raises:
            KeyError: No such run.
        """
        held = self.runs.held(run_id)
        if held is not None:
            return self._held_status(held)
        run, rounds, built = await self.reader.run(self._read_run, run_id)
        return built if built is not None else self._status_on_loop(run, rounds)

    async def all(self) -> list[pb.RunStatus]:
        """The view of every run, oldest first (`ListRuns`)."""
        read = await self.reader.run(self._read_runs)
        return [built if built is not None else self._status_on_loop(run, rounds)
                for run, rounds, built in read]  # fmt: skip

    def _status_on_loop(self, run: RunRow, rounds: list[RoundRow]) -> pb.RunStatus:
        """A run read from SQL: its held rows if it is running and held by now, else these."""
        held = self.runs.held(run.id)
        if held is not None:
            return self._held_status(held)
        return self.status(run, rounds)

    def _held_status(self, run: RunRow) -> pb.RunStatus:
        """A held run's view (on the loop): built again only when its held rows changed.

        The plan's text is kept while the held run keeps the same plan object: its plan is
        never written after it is created, and a plan edited outside the coordinator comes
        back as another object (the runs read again, or the column written through).
        """
        revision = self.runs.revision(run.id)
        known = self._held_views.get(run.id)
        if known is None or known.run is not run or known.revision != revision:
            plan = run.plan
            plan_json = None
            if known is not None and known.run is run and known.plan is plan:
                plan_json = known.built.status.plan_json
            if known is None:
                self._forget_views_of_unheld_runs()
            built = self._build(run, self.runs.held_rounds(run.id), plan_json)
            known = _HeldView(run, revision, plan, built)
            self._held_views[run.id] = known
        return self._live(known.built, copy=True)

    def _forget_views_of_unheld_runs(self) -> None:
        for run_id in [run_id for run_id in self._held_views if self.runs.held(run_id) is None]:
            del self._held_views[run_id]

    def _read_run(self, run_id: str) -> _Read:
        """On the reader thread: the run, its rounds, and its view unless it is running."""
        run = self.ledger.run(run_id)
        rounds = self.ledger.rounds(run_id)
        return run, rounds, None if run.status == "running" else self.status(run, rounds)

    def _read_runs(self) -> list[_Read]:
        """On the reader thread: every run (read in batches, the rounds in one query) and the
        views of those not running.

        Reading and building a thousand runs is pure Python for a good part of a second: the
        thread gives the interpreter up after each run (`time.sleep(0)`), so the event loop,
        if it waits for it, runs then instead of after the interpreter's switch interval.
        """
        runs: list[RunRow] = []
        for batch in self.ledger.runs_in_batches():
            runs.extend(batch)
            time.sleep(0)
        rounds = self.ledger.rounds_of(None)  # after the runs: a run read has its rounds
        read: list[_Read] = []
        for run in runs:
            of_run = rounds.get(run.id, [])
            built = None if run.status == "running" else self.status(run, of_run)
            read.append((run, of_run, built))
            time.sleep(0)
        return read

    # ---- the message --------------------------------------------------------------------------

    def bundle_sha256(self, run: RunRow, plan_json: str) -> str:
        """The sha256 of the run's approval bundle, built once per run (validating the plan and
        expanding its bounds costs a third of a millisecond); `plan_json` is its plan's text."""
        digest = hashlib.blake2b(plan_json.encode(), digest_size=16).digest()
        known = self._bundles.get(run.id)
        if known is not None and known[0] == digest:
            return known[1]
        sha256 = approval_bundle(run).sha256
        self._bundles[run.id] = (digest, sha256)
        return sha256

    def status(self, run: RunRow, rounds: Sequence[RoundRow]) -> pb.RunStatus:
        """The admin view of a run and its rounds, with live progress of its leased hop."""
        return self._live(self._build(run, rounds), copy=False)

    def _build(
        self, run: RunRow, rounds: Sequence[RoundRow], plan_json: str | None = None
    ) -> _Built:
        """The view of a run and its rounds but what is live (`_live`); `plan_json`: its
        plan's text, if known."""
        if plan_json is None:
            plan_json = json.dumps(run.plan, sort_keys=True)
        run_status = run.status
        status = pb.RunStatus(
            approval_bundle_sha256=self.bundle_sha256(run, plan_json),
            run_id=run.id,
            name=run.name,
            status=run_status,
            final_sha256=run.final_sha256 or "",
            error=run.error or "",
            plan_json=plan_json,
        )
        if run_status == "completed":
            status.final_adapter_dir = str(final_adapter_dir(self.runs_dir, run.id).resolve())
        hops = run.hops
        current = current_hop(run) if run_status == "running" else None
        waiting = None
        for place, hop in enumerate(hops):
            hop_id, hop_status = hop.id, hop.status
            entry = status.hops.add(
                index=hop.index,
                hop_id=hop_id,
                site=hop.site,
                status=hop_status,
                input_sha256=hop.input_sha256 or "",
                output_sha256=hop.output_sha256 or "",
                train_started_at_ns=hop.train_started_at_ns or 0,
                train_finished_at_ns=hop.train_finished_at_ns or 0,
                error=hop.error or "",
                error_code=hop.error_code or "",
            )
            entry.metrics.update(hop.metrics or {})
            if hop is current and hop_status == "pending":
                waiting = (place, hop.site)
        status.rounds.extend(round_statuses(run, rounds))
        for row in run.evaluations:
            evaluation = status.evaluations.add(
                evaluation_id=row.id,
                site=row.site,
                split=row.split,
                checkpoint_sha256=row.checkpoint_sha256,
                status=row.status,
                error=row.error or "",
            )
            evaluation.metrics.update(row.metrics or {})
        return _Built(status, waiting)

    def _live(self, built: _Built, *, copy: bool) -> pb.RunStatus:
        """The view with what is live put in (into a copy if `copy`): the leased hops'
        progress (`leases.progress`), the storage fault, why the current hop waits."""
        if copy:
            status = pb.RunStatus()
            status.CopyFrom(built.status)
        else:
            status = built.status
        status.storage_fault = self.storage.fault or ""
        if built.waiting is not None:
            place, site = built.waiting
            status.hops[place].waiting_reason = self.hops.site_wait(site)
        progress_of = self.leases.progress
        for entry in status.hops:  # its status is the hop row's until set here
            progress = progress_of.get(entry.hop_id)
            if progress is not None:
                entry.step, entry.total_steps = progress.step, progress.total_steps
                if progress.phase and entry.status == "leased":
                    entry.status = progress.phase
        return status
