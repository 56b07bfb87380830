"""`RunEngine`: the one object the servicer, the dashboard and the server hold.

It builds the engine's parts around one ledger, store and lock, dispatches work to sites as they
connect, and runs the watchdog; every other call is handed to the part whose job it is.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path

from coordinator.engine.active_runs import ActiveRuns
from coordinator.engine.controls import RunControls
from coordinator.engine.evaluations import Evaluations
from coordinator.engine.export import final_adapter_dir
from coordinator.engine.handoff import whole_hand_back_parts
from coordinator.engine.hops import Hops
from coordinator.engine.leases import HopLeases, HopProgress
from coordinator.engine.ledger_reader import LedgerReader
from coordinator.engine.ledger_writer import LedgerWriter
from coordinator.engine.rounds import Rounds
from coordinator.engine.run_views import RunViews
from coordinator.engine.sessions import SiteSession, SiteSessions
from coordinator.engine.spool import UploadSpool
from coordinator.engine.statistics_rounds import StatisticsRounds
from coordinator.engine.uploads import UploadIntake
from coordinator.errors import PreflightFailed
from coordinator.federated import AggregateSigner
from coordinator.ledger import CheckpointRow, HopRow, Ledger, RunRow
from coordinator.metrics import CoordinatorMetrics
from coordinator.plan import RunPlan
from coordinator.preflight import SiteApprovals, SiteView
from coordinator.storage_faults import StorageHealth, storage_fault_reason
from coordinator.store import CheckpointStore
from protocols.ledger_head import SignedHead
from protocols.v1 import baton_pb2 as pb

__all__ = ["RunEngine"]

logger = logging.getLogger(__name__)


class RunEngine:
    """Drives sequential runs over the sites that are connected.

    All state transitions run on the coordinator's event loop under one lock, each as one ledger
    transaction with one event (a hop's commit and the next hop's lease: one transaction, two
    events). The running runs are held in memory (`ActiveRuns`, written through by every
    commit); hop transitions commit on the ledger writer's thread, so the event loop keeps
    answering heartbeats meanwhile. Tasks are pushed onto a site's open stream the moment they
    are ready. Admin reads that need SQL (a finished run, the run list, the sites) run on a
    reader thread of their own (`RunViews`, `LedgerReader`).
    """

    def __init__(
        self,
        ledger: Ledger,
        store: CheckpointStore,
        runs_dir: Path,
        *,
        ca_pem: bytes,
        max_checkpoint_bytes: int,
        statistics_min_count: int = 10,
        statistics_expiry_seconds: float = 3600.0,
        aggregate_signer: AggregateSigner | None = None,
    ) -> None:
        self.ledger = ledger
        self.ca_pem = ca_pem
        self.store = store
        self.runs_dir = runs_dir
        self.uploads_dir = runs_dir.parent / "uploads"
        self.spool = UploadSpool(self.uploads_dir)
        self.storage = StorageHealth(ledger, runs_dir.parent)
        self.metrics = CoordinatorMetrics()
        self._lock = asyncio.Lock()  # one lock over every state transition of every part
        self.writer = LedgerWriter()
        self.runs = ActiveRuns(ledger, self.writer)
        self.sessions = SiteSessions(ledger)
        self.metrics.track_connected_sites(lambda: len(self.sessions))
        self.leases = HopLeases(self.runs, self.metrics)
        self.intake = UploadIntake(
            ledger, store, self.spool, self.storage, self.metrics, self.leases, self._lock,
            self.writer, ca_pem=ca_pem, max_checkpoint_bytes=max_checkpoint_bytes,
        )  # fmt: skip
        self.rounds = Rounds(
            ledger, store, runs_dir, self.storage, self.sessions, self.leases, self.intake,
            aggregate_signer, self.runs, self.writer,
        )  # fmt: skip
        self.hops = Hops(
            ledger, store, runs_dir, self.storage, self.metrics, self._lock,
            self.sessions, self.leases, self.intake, self.rounds, self.runs, self.writer,
        )  # fmt: skip
        self.controls = RunControls(
            ledger, self._lock, self.hops, self.leases, self.intake, self.runs
        )
        self.reader = LedgerReader()  # admin reads: off the loop, not behind the writer
        self.views = RunViews(
            ledger, self.runs, self.reader, self.hops, self.leases, self.storage, runs_dir
        )
        self.evaluations = Evaluations(ledger, self.storage, self._lock, self.sessions, self.writer)
        self.statistics = StatisticsRounds(
            ledger, self._lock, self.sessions, self.writer,
            min_count=statistics_min_count, expiry_seconds=statistics_expiry_seconds,
        )  # fmt: skip

    @property
    def max_checkpoint_bytes(self) -> int:
        """The largest hop output accepted, in bytes."""
        return self.intake.max_checkpoint_bytes

    @max_checkpoint_bytes.setter
    def max_checkpoint_bytes(self, value: int) -> None:
        self.intake.max_checkpoint_bytes = value

    @property
    def statistics_min_count(self) -> int:
        """The minimum row count of a statistics request that names none."""
        return self.statistics.statistics_min_count

    @statistics_min_count.setter
    def statistics_min_count(self, value: int) -> None:
        self.statistics.statistics_min_count = value

    @property
    def statistics_expiry_seconds(self) -> float:
        """How long a statistics request that names no expiry waits for its sites."""
        return self.statistics.statistics_expiry_seconds

    @statistics_expiry_seconds.setter
    def statistics_expiry_seconds(self, value: float) -> None:
        self.statistics.statistics_expiry_seconds = value

    # ---- certificates and connections ---------------------------------------------------------

    def revocation(self, serial: int) -> str | None:
        """The reason a certificate serial was revoked, or None."""
        return self.sessions.revocation(serial)

    async def revoke(self, serial: str, reason: str, *, by: str) -> int:
        """Revokes a certificate serial (hex) and closes the streams opened with it."""
        return self.sessions.revoke(serial, reason, by=by)

    def connected_sites(self) -> set[str]:
        return self.sessions.connected_sites()

    async def connect(self, site: str, serial: int = 0) -> SiteSession:
        """Registers a site's new task stream (replacing an older one) and sends it its work.

        A stream closed while its work is dispatched (the dispatch awaits the ledger writer)
        is unregistered here: its caller's ``finally`` is not reached yet.
        """
        session = self.sessions.connect(site, serial)
        try:
            await self.dispatch_all()
        except BaseException:
            self.sessions.disconnect(session)
            raise
        return session

    def disconnect(self, session: SiteSession) -> None:
        self.sessions.disconnect(session)

    def publish_head(self, head: SignedHead) -> None:
        """Hands a newly signed ledger head to every connected site (they keep the newest).

        A head signed on the ledger writer's thread is handed over on the event loop.
        """
        self.runs.on_loop(self.sessions.publish_head, head)

    async def tasks(self, session: SiteSession) -> AsyncIterator[pb.Task]:
        async for task in self.sessions.tasks(session):
            yield task

    # ---- preflight ----------------------------------------------------------------------------

    def report_approvals(self, site: str, approvals: SiteApprovals) -> None:
        """Remembers what a site said at hello it approved (for preflight)."""
        self.sessions.report_approvals(site, approvals)

    def report_provisional(self, site: str, accepts: bool) -> None:
        """Remembers whether the site's agent holds a provisional hop task (hello)."""
        self.sessions.report_provisional(site, accepts)

    def site_views(self) -> dict[str, SiteView]:
        """Every registered site as this coordinator knows it: connection, data, approvals."""
        return self.sessions.site_views()

    def preflight(self, plan: RunPlan, *, allow_offline: bool = False) -> None:
        """Refuses a run its sites would not run, listing every problem (one per line).

        Raises:
            PreflightFailed: One problem per line of its message.
        """
        if plan.mode != "sequential" and self.rounds.signer is None:
            raise PreflightFailed(
                f"this coordinator has no key to sign round aggregates: it cannot run {plan.mode} "
                "plans"
            )
        self.sessions.preflight(plan, allow_offline=allow_offline)

    def waiting_reason(self, run: RunRow, hop: HopRow) -> str:
        """Why a run's next hop is not running ("waiting for riverside: offline since ...")."""
        return self.hops.waiting_reason(run, hop)

    # ---- dispatch -----------------------------------------------------------------------------

    async def dispatch_all(self) -> None:
        """Sends every connected site the work that is due: hops, evaluations, statistics."""
        for run in self.runs.all():
            await self.dispatch(run.id)
        await self.dispatch_evaluations()
        await self.dispatch_statistics()

    async def dispatch(self, run_id: str) -> None:
        """Leases the run's next hop to its site, or re-sends a leased task after a reconnect."""
        await self.hops.dispatch(run_id)

    def progress(self, hop_id: str) -> HopProgress | None:
        return self.leases.progress.get(hop_id)

    # ---- runs ---------------------------------------------------------------------------------

    async def start_run(self, plan: RunPlan, *, by: str | None = None) -> str:
        """Records a new run and leases its first hop if the site is connected.

        Args:
            plan: The run plan.
            by: Who started it (a dashboard account), recorded in the `run.created` event.
        """
        return await self.controls.start_run(plan, by=by)

    async def resume_run(self, run_id: str, *, by: str | None = None) -> None:
        """Resumes a paused run: its failed hop is tried again."""
        await self.controls.resume_run(run_id, by=by)

    async def abort_run(self, run_id: str, reason: str, *, by: str | None = None) -> None:
        await self.controls.abort_run(run_id, reason, by=by)

    async def pause_run(self, run_id: str, *, by: str | None = None) -> None:
        """Pauses a running run; the hop in flight is called back and redone on resume."""
        await self.controls.pause_run(run_id, by=by)

    async def skip_failed_hop(self, run_id: str, *, by: str | None = None) -> None:
        """Skips the failed hop of a paused run and resumes the run from the next hop."""
        await self.controls.skip_failed_hop(run_id, by=by)

    def final_adapter_dir(self, run_id: str) -> Path:
        return final_adapter_dir(self.runs_dir, run_id)

    # ---- site calls ---------------------------------------------------------------------------

    def checkpoint_for_download(self, site: str, sha256: str) -> CheckpointRow:
        """A site may download only the input of its leased hop or of its pending evaluation."""
        return self.intake.checkpoint_for_download(site, sha256)

    async def receive_upload(
        self,
        site: str,
        certificate_pem: bytes,
        header: pb.UploadHeader,
        chunks: AsyncIterator[bytes],
    ) -> pb.CheckpointRef:
        """Accepts a hop's output bundle: size, hash, signature, format, values and lineage."""
        return await self.intake.receive_upload(site, certificate_pem, header, chunks)

    async def hand_back(
        self,
        site: str,
        certificate_pem: bytes,
        header: pb.UploadHeader,
        parts: AsyncIterator[pb.HandBackRequest],
    ) -> str:
        """Stores a finished hop's bundle and commits the hop with the result that follows it
        (an upload and a hop result in one call). Returns the hop's new status.

        The run's tamper check that precedes the next lease starts now, beside the bundle's
        checks and store write (`Hops.check_ahead`)."""
        checked = self.hops.check_ahead(site, header)

        async def commit(site: str, result: pb.HopResult, stored: CheckpointRow | None) -> str:
            return await self.hops.report_result(site, result, stored, checked)

        return await self.intake.hand_back(site, certificate_pem, header, parts, commit)

    async def hand_back_whole(
        self, site: str, certificate_pem: bytes, request: pb.HandBackWhole
    ) -> str:
        """`hand_back` of a small hop in one message (its bundle and its result): the same
        checks and the same ledger events. Returns the hop's new status."""
        parts = whole_hand_back_parts(request)
        return await self.hand_back(site, certificate_pem, request.header, parts)

    def site_certificate_presented(self, site: str, certificate_pem: bytes) -> None:
        """A site's hello: its certificate is checked as a bundle signer's now, not at its
        first hand back (`UploadIntake.check_signer_ahead`)."""
        self.intake.check_signer_ahead(certificate_pem)

    def upload_progress(self, site: str, header: pb.UploadHeader) -> int:
        """Bytes of a hop's upload already received (to resume a cut upload from there)."""
        return self.intake.upload_progress(site, header)

    async def heartbeat(self, site: str, beat: pb.Heartbeat) -> None:
        """Extends the lease; the first "training" beat moves the hop to training."""
        await self.hops.heartbeat(site, beat)

    async def report_result(self, site: str, result: pb.HopResult) -> str:
        """Commits or fails a hop, then moves the run on. Returns the hop's new status."""
        return await self.hops.report_result(site, result)

    async def report_validation(self, site: str, report: pb.HopValidation) -> None:
        """Records a committed hop's validation metrics, measured by its site after the commit."""
        await self.hops.report_validation(site, report)

    # ---- watchdog -----------------------------------------------------------------------------

    async def watch(self, interval: float = 0.5) -> None:
        """Expires leases, gives up on absent sites and releases retry backoffs, forever."""
        while True:
            await asyncio.sleep(interval)
            try:
                await self.check_deadlines()
            except Exception as exc:
                fault = storage_fault_reason(exc)
                if fault is None:
                    logger.exception("watchdog pass failed; trying again")
                else:
                    self.storage.report("watchdog pass", fault)

    async def check_deadlines(self) -> None:
        """One watchdog pass: storage health, abandoned spool files, hop and statistics expiry."""
        self.storage.check()
        async with self._lock:
            # Never mid-transition: its commit's event is in the ledger before the loop applies
            # its rows, and taken for an outside write it would swap the rows the transition
            # holds for fresh ones (it would go on with stale rows, e.g. an unpinned base model).
            if self.runs.check_outside_writes():
                self.sessions.forget_site_rows()  # a site row may have been written too
        runs = self.runs.all()
        self.intake.sweep_spool(runs)
        await self.hops.check_deadlines(runs)
        await self.expire_statistics()

    async def quiesce(self) -> None:
        """Returns once no state transition is in progress (the one in flight has committed)
        and the committed hops' clean-ups handed to the ledger writer have ended."""
        async with self._lock:
            pass
        await self.intake.settle_clean_ups()

    # ---- evaluations --------------------------------------------------------------------------

    async def evaluate_run(
        self, run_id: str, split: str, sites: list[str], *, by: str | None = None
    ) -> list[str]:
        """Asks sites to evaluate a completed run's final checkpoint on their own data."""
        return await self.evaluations.evaluate_run(run_id, split, sites, by=by)

    async def dispatch_evaluations(self) -> None:
        await self.evaluations.dispatch_evaluations()

    async def report_evaluation(self, site: str, result: pb.EvaluationResult) -> str:
        return await self.evaluations.report_evaluation(site, result)

    # ---- aggregate statistics -----------------------------------------------------------------

    async def collect_statistics(
        self,
        dataset: str,
        task_type: str,
        sites: list[str],
        *,
        min_count: int = 0,
        noise_std: float = 0.0,
        expires_in_seconds: float = 0.0,
        cv_folds: int = 0,
    ) -> str:
        """Asks sites for aggregate statistics of a dataset's training rows; returns the id.

        See `StatisticsRounds.collect_statistics` for the arguments.
        """
        return await self.statistics.collect_statistics(
            dataset, task_type, sites, min_count=min_count, noise_std=noise_std,
            expires_in_seconds=expires_in_seconds, cv_folds=cv_folds,
        )  # fmt: skip

    async def dispatch_statistics(self) -> None:
        """Sends each pending statistics task to its site if connected (again after a reconnect)."""
        await self.statistics.dispatch_statistics()

    async def report_statistics(self, site: str, result: pb.StatisticsResult) -> str:
        """Records one site's aggregates or refusal; settles the request when it can."""
        return await self.statistics.report_statistics(site, result)

    async def expire_statistics(self) -> None:
        """Fails every pending statistics request past its expiry (``statistics.expired``)."""
        await self.statistics.expire_statistics()

    def statistics_status(self, request_id: str) -> pb.StatisticsStatus:
        """The admin view of a statistics request, with the pooled result once done."""
        return self.statistics.statistics_status(request_id)
