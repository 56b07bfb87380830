"""Hops of a run: leasing them to their sites, committing results, the failure policy, deadlines."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from coordinator.engine.active_runs import ActiveRuns
from coordinator.engine.export import complete_run
from coordinator.engine.handoff import (
    complete_hop_task,
    first_visits_ahead,
    next_site_hop,
    prepare_ahead_task,
    prepare_task,
    record_validation,
    wants_inline_bundle,
)
from coordinator.engine.leases import HopLeases, HopProgress
from coordinator.engine.ledger_writer import LedgerWriter
from coordinator.engine.rounds import Rounds, runs_in_rounds
from coordinator.engine.rules import (
    DETERMINISTIC_FAILURES,
    current_hop,
    failure_policy,
    finite_metrics,
    input_sha,
)
from coordinator.engine.sessions import SiteSession, SiteSessions
from coordinator.engine.tasks import hop_task
from coordinator.engine.uploads import UploadIntake
from coordinator.errors import CoordinatorError, InvalidInput, StaleLease, StorageFault
from coordinator.ledger import (
    LIVE_HOP_STATES,
    CheckpointRow,
    HopRow,
    Ledger,
    RowMismatch,
    RunRow,
    TransitionRefused,
)
from coordinator.metrics import CoordinatorMetrics
from coordinator.preflight import offline_text
from coordinator.storage_faults import StorageHealth
from coordinator.store import CheckpointStore
from protocols.logs import bind_log_context
from protocols.v1 import baton_pb2 as pb

__all__ = ["CHECK_AHEAD_SECONDS", "WAIT_LOG_SECONDS", "EarlyCheck", "Hops"]

logger = logging.getLogger(__name__)

WAIT_LOG_SECONDS = 60.0  # "run waits for site" is logged at most this often per hop

# An early tamper check (`Hops.check_ahead`) is used by its commit only while it is this
# recent and no ledger event was appended since; otherwise the commit checks the rows again. A
# bundle in one message commits milliseconds after its check; one streamed for long does not.
CHECK_AHEAD_SECONDS = 0.5


@dataclass(frozen=True)
class EarlyCheck:
    """A run's rows checked against their events ahead of its commit (`Hops.check_ahead`)."""

    mismatches: list[RowMismatch]
    head_seq: int  # the newest event this process had appended when the rows were read
    checked_at: float  # time.monotonic() then

    def current(self, head_seq: int, now: float) -> bool:
        """Whether it still stands for the rows: no event appended since, and recent."""
        return head_seq == self.head_seq and now - self.checked_at <= CHECK_AHEAD_SECONDS


# A run's rows checked against their events (`Hops._early_check`), on the ledger writer's thread.
TamperCheck = asyncio.Future[EarlyCheck]


@dataclass
class _Lease:
    """The next hop leased by a commit's transaction, its task put on its site's stream the
    moment that transaction commits (`Hops._lease_committed`), not once the writer thread is
    done with what follows the commit and the engine's call has resumed."""

    run: RunRow
    hop: HopRow  # as held: pending until the transaction's rows are applied on the loop
    session: SiteSession
    loop: asyncio.AbstractEventLoop
    task: pb.Task | None = None  # built on the loop while the transaction runs
    committed: bool = False  # set on the writer thread once the transaction committed
    pushed: bool = False  # the task, or its lease decision, went on the stream
    provisional: bool = False  # the task went out marked provisional, before the commit


def _decision(lease: _Lease, *, granted: bool) -> pb.Task:
    """The stream message deciding a provisional task's lease (`HopTask.provisional`)."""
    assert lease.task is not None
    hop = lease.task.hop
    return pb.Task(
        lease_decision=pb.LeaseDecision(
            hop_id=hop.hop_id, lease_token=hop.lease_token, granted=granted
        )
    )


def _retrieve(check: TamperCheck) -> None:
    """Retrieves a finished check's error, so that one nobody awaits is not reported as lost."""
    if not check.cancelled():
        check.exception()


class Hops:
    """Moves each running run along its hops, one state transition at a time."""

    def __init__(
        self,
        ledger: Ledger,
        store: CheckpointStore,
        runs_dir: Path,
        storage: StorageHealth,
        metrics: CoordinatorMetrics,
        lock: asyncio.Lock,
        sessions: SiteSessions,
        leases: HopLeases,
        intake: UploadIntake,
        rounds: Rounds,
        runs: ActiveRuns,
        writer: LedgerWriter,
    ) -> None:
        self.ledger = ledger
        self.runs = runs  # the running runs, in memory (written through by every commit)
        self.writer = writer  # hop transitions commit on its thread, off the event loop
        self.store = store
        self.runs_dir = runs_dir
        self.storage = storage
        self.metrics = metrics
        self._lock = lock  # the engine's one lock over state transitions
        self.sessions = sessions
        self.leases = leases
        self.intake = intake
        self.rounds = rounds  # federated and hybrid runs
        self._told: dict[str, SiteSession] = {}  # hop id -> the session told it is next
        # hop id -> the session told to load ahead of it (a site's first visit of a run)
        self._told_ahead: dict[str, SiteSession] = {}
        # hop id -> the run's tamper check started when its site said the hop's last step
        # began (`_check_at_last_step`), for its hand back to use (`check_ahead`)
        self._last_step_checks: dict[str, TamperCheck] = {}
        # The newest event this process appended (set on the thread that committed it).
        self._head_seq = 0
        # .lease: the `_Lease` of the commit the writer thread runs (`_commit_and_lease`).
        self._committing = threading.local()
        self._lease_lock = threading.Lock()  # a `_Lease`'s task and commit meet under it
        ledger.head_observers.append(self._appended)

    def _appended(self, seq: int, _hash: str, kinds: tuple[str, ...]) -> None:
        """A transaction committed (on its thread): the newest event; a lease it granted goes
        out now, ahead of the head observers after this one (a head's signature and fsync)."""
        self._head_seq = max(self._head_seq, seq)
        lease: _Lease | None = getattr(self._committing, "lease", None)
        if lease is not None and "hop.leased" in kinds:
            self._committing.lease = None
            self._lease_committed(lease)

    def _lease_committed(self, lease: _Lease) -> None:
        """The transaction leasing `lease` committed (writer thread): its task goes to the loop
        now if it is built, else as soon as it is (`_lease_built`)."""
        with self._lease_lock:
            lease.committed = True
            built = lease.task is not None
        if built:
            lease.loop.call_soon_threadsafe(self._push, lease)

    def _lease_built(self, lease: _Lease, task: pb.Task) -> None:
        """`lease`'s task is built (loop): pushed now if its transaction committed already;
        else, to a site that holds it until the decision, pushed now marked provisional."""
        with self._lease_lock:
            lease.task = task
            committed = lease.committed
            lease.provisional = not committed and self._goes_provisional(lease.session, task)
        if committed:
            self._push(lease)
        elif lease.provisional:
            early = pb.Task()
            early.CopyFrom(task)
            early.hop.provisional = True
            lease.session.queue.put_nowait(early)

    def _goes_provisional(self, session: SiteSession, task: pb.Task) -> bool:
        """Whether a task may go out before its lease commits: its input rides inside it (a
        site downloads only for a committed lease), and the site's agent holds a provisional
        task until the decision (said at hello; an older agent would train at once)."""
        return bool(task.hop.input_bundle) and self.sessions.accepts_provisional(session.site)

    def _push(self, lease: _Lease) -> None:
        """Puts a committed lease's task on its site's stream, once (loop): the task itself,
        or, if it went out provisional, the decision that grants it."""
        if lease.pushed or lease.task is None:
            return
        lease.pushed = True
        if lease.provisional:
            lease.session.queue.put_nowait(_decision(lease, granted=True))
        else:
            lease.session.queue.put_nowait(lease.task)
        self._sent(lease.run, lease.hop, lease.session, lease.task)

    def _withdraw(self, lease: _Lease | None) -> None:
        """Withdraws a provisional task whose transaction did not commit its lease (loop)."""
        if lease is None:
            return
        with self._lease_lock:
            if lease.committed or not lease.provisional or lease.pushed:
                return
            lease.pushed = True
        lease.session.queue.put_nowait(_decision(lease, granted=False))
        logger.info("hop %d of run %s: provisional task withdrawn (lease not committed)",
                    lease.hop.index, lease.run.id)  # fmt: skip

    async def dispatch(self, run_id: str) -> None:
        """Leases the run's next hop to its site, or re-sends a leased task after a reconnect."""
        async with self._lock:
            await self.dispatch_locked(run_id)

    async def dispatch_locked(self, run_id: str) -> None:
        run = self.runs.get(run_id)
        if run is None:
            return  # not running
        if runs_in_rounds(run):
            await self.rounds.dispatch_locked(run, self)
            return
        hop = current_hop(run)
        if hop is None:
            await self._finish(run)
            return
        await self.dispatch_hop(run, hop, input_sha(run, hop))

    async def dispatch_hop(
        self, run: RunRow, hop: HopRow, input_sha256: str | None, *, round_number: int = 0
    ) -> None:
        """Leases one hop to its site from `input_sha256`, or re-sends its leased task after a
        reconnect (a federated round dispatches each of its hops so)."""
        run_id = run.id
        if hop.status == "pending" and time.monotonic() < self.leases.not_before.get(hop.id, 0.0):
            return  # retry backoff: the watchdog dispatches it when due
        session = self.sessions.get(hop.site)
        if session is None:
            self.leases.waiting_since.setdefault(hop.id, time.monotonic())
            now = time.monotonic()
            # Every connect and watchdog tick dispatches: say it once per hop per minute.
            if now - self.leases.wait_logged.get(hop.id, -math.inf) >= WAIT_LOG_SECONDS:
                self.leases.wait_logged[hop.id] = now
                logger.info("run %s waits for site %s to connect", run_id, hop.site)
            return
        self.leases.waiting_since.pop(hop.id, None)
        self.leases.wait_logged.pop(hop.id, None)
        if hop.status in LIVE_HOP_STATES and self.leases.sent.get(hop.id) is session:
            if hop.status != "leased":  # it trains (or hands back): the next site may prepare
                self._tell_next(run, hop)
            return
        if await self._refuse_tampered(run, input_sha256):
            return
        if hop.status == "pending":
            hop = await self.writer.run(
                self.ledger.lease_hop, hop.id, secrets.token_hex(16), input_sha256
            )
        self.send_hop(run, hop, input_sha256, session, round_number=round_number)

    def send_hop(
        self,
        run: RunRow,
        hop: HopRow,
        input_sha256: str | None,
        session: SiteSession,
        *,
        round_number: int = 0,
    ) -> None:
        """Puts a leased hop's task on its site's stream."""
        task = self._hop_task(run, hop, input_sha256, round_number=round_number)
        session.queue.put_nowait(task)
        self._sent(run, hop, session, task)

    def _hop_task(
        self,
        run: RunRow,
        hop: HopRow,
        input_sha256: str | None,
        *,
        round_number: int = 0,
        input_row: CheckpointRow | None = None,
        lease_token: str | None = None,
    ) -> pb.Task:
        """A leased hop's task from `input_sha256`.

        `input_row`: the input's checkpoint row when the caller holds it (the output the same
        transaction commits), instead of reading it again. `lease_token`: the lease the task
        carries when `hop` is the row as it was before its lease (the task is built while the
        transaction that leases it runs).
        """
        if input_row is not None and input_row.sha256 == input_sha256:
            input_ref: CheckpointRow | None = input_row
        else:
            input_ref = self.ledger.checkpoint(input_sha256) if input_sha256 else None
        bundle = self._small_bundle(input_ref)
        task = complete_hop_task(hop_task(run, hop, input_ref), run, hop, input_ref, bundle)
        if lease_token is not None:
            task.hop.lease_token = lease_token
        task.hop.round = round_number
        if round_number:
            # A round's hops train side by side (no one is "next"), and the aggregate weighs
            # each contribution's metrics as it commits: they come with the result.
            task.hop.validation_after_commit = False
        return task

    def _sent(self, run: RunRow, hop: HopRow, session: SiteSession, task: pb.Task) -> None:
        """What the engine holds about a hop whose task went on `session`'s stream."""
        self.leases.extend(run, hop.id)
        self.leases.sent[hop.id] = session
        self.leases.progress[hop.id] = HopProgress(phase="leased")
        self.metrics.hop_phase(hop.id, "leased")
        if task.hop.input_bundle:  # sent to the site inside its task: a download all the same
            self.metrics.checkpoint_bytes.labels(direction="download").inc(
                len(task.hop.input_bundle)
            )
        self._told.pop(hop.id, None)
        self._told_ahead.pop(hop.id, None)
        self._last_step_checks.pop(hop.id, None)

    def _small_bundle(self, input_ref: CheckpointRow | None) -> bytes | None:
        """The input's bytes if it is small enough to ride inside its task."""
        if input_ref is None or not wants_inline_bundle(input_ref):
            return None
        kept = self.intake.recent_bundles.take(input_ref.sha256)  # handed back a moment ago
        if kept is not None:
            return kept
        try:
            return self.store.read(input_ref.sha256)
        except OSError as exc:  # the site downloads it and meets the same fault, loudly
            logger.warning("checkpoint %s not pushed inside its task: %s", input_ref.sha256, exc)
            return None

    def _tell_next(self, run: RunRow, hop: HopRow) -> None:
        """Tells the site of the hop after ``hop`` that it is next, once per hop and session.

        Called once ``hop`` trains (its "training" beat), not when it is leased: a lease is
        a handoff, and a preparation then (a model copy, the data encoded) would take CPU from
        the site starting its hop at that very moment.
        """
        if runs_in_rounds(run):
            return  # a round's hops train side by side: no one is next
        self._tell_first_visits(run, hop)
        following = next_site_hop(run, hop)
        if following is None:
            return
        session = self.sessions.get(following.site)
        if session is None or self._told.get(following.id) is session:
            return
        self._told[following.id] = session
        session.queue.put_nowait(prepare_task(hop_task(run, following, None)))

    def _tell_first_visits(self, run: RunRow, hop: HopRow) -> None:
        """Tells each site of a sequential run whose first visit is still to come, beyond the
        next one (told it is next), that it is in the schedule and how many hops ahead, once per
        hop and session: from the run's first training beat on (a site that connects later
        hears it at the next hop's).

        Not at the first lease: the first hop's site then loads alone, so a cold cluster's first
        step waits for no one else's load. The sites load at a low CPU priority (lower the
        further ahead), and are ready when their short first visits come; a site loads nothing
        for a run it has not approved.
        """
        for following, hops_ahead in first_visits_ahead(run, hop):
            if hops_ahead == 1:
                continue  # the next hop: "you are next" gets its site ready
            session = self.sessions.get(following.site)
            if session is None or self._told_ahead.get(following.id) is session:
                continue
            self._told_ahead[following.id] = session
            task = prepare_ahead_task(hop_task(run, following, None), hops_ahead)
            session.queue.put_nowait(task)

    def _forget_ended_hops(self) -> None:
        """Drops what is held in memory about hops no running run holds any more: the "next"
        and "ahead" notices sent for them, and since when they waited for their site.

        A hop's notices are dropped when its task is sent, its wait when its site connects; a
        hop that gets neither (its run aborted, failed, paused or completed first) would
        otherwise keep them for good. A run resumed after a pause tells its sites again, as
        after a reconnect, and waits for an absent site from the resume on.
        """
        for held in (self._told, self._told_ahead, self._last_step_checks,
                     self.leases.waiting_since, self.leases.wait_logged):  # fmt: skip
            for hop_id in [hop_id for hop_id in held if self.runs.hop(hop_id) is None]:
                del held[hop_id]

    def waiting_reason(self, run: RunRow, hop: HopRow) -> str:
        """Why a run's next hop is not running ("waiting for riverside: offline since ...")."""
        current = current_hop(run)
        if run.status != "running" or current is None or current.id != hop.id:
            return ""
        return self.site_wait(hop.site) if hop.status == "pending" else ""

    def site_wait(self, site: str) -> str:
        """Why a running run's current hop, pending at `site`, is not running: "" while the
        site is connected (its task is on its way), else "waiting for riverside: ..."."""
        if site in self.sessions:
            return ""
        view = self.sessions.site_views().get(site)
        return f"waiting for {site}: {offline_text(view) if view else 'never connected'}"

    async def heartbeat(self, site: str, beat: pb.Heartbeat) -> None:
        """Extends the lease; the first "training" beat moves the hop to training.

        Read from the runs held in memory, without the engine's lock: a beat is answered while
        a transition (a commit) is being written. Only the one beat that moves the hop to
        training waits for the lock and writes.
        """
        run, hop = self.leases.leased_hop(site, beat.hop_id, beat.lease_token)
        self.leases.extend(run, hop.id)
        self.metrics.hop_phase(hop.id, beat.phase)
        self.leases.progress[beat.hop_id] = HopProgress(
            phase=beat.phase, step=beat.step, total_steps=beat.total_steps, loss=beat.loss
        )
        if beat.phase == "training" and 1 < beat.total_steps == beat.step + 1:
            self._check_at_last_step(run, hop)
        if beat.phase != "training" or hop.status != "leased":
            return
        async with self._lock:
            run, hop = self.leases.leased_hop(site, beat.hop_id, beat.lease_token)
            if hop.status == "leased":
                with self.storage.guard(f"heartbeat of hop {hop.index} of run {run.id}"):
                    hop = await self.writer.run(
                        self.ledger.transition_hop,
                        hop.id, expected=("leased",), status="training", event="hop.training",
                    )  # fmt: skip
                held = self.runs.hop(hop.id)
                if held is not None:
                    self._tell_next(*held)

    def _check_at_last_step(self, run: RunRow, hop: HopRow) -> None:
        """Starts the run's tamper check for the hop's hand back, once per hop, at its site's
        beat during the last step (`_Heartbeat` sends one `LAST_STEP_LEAD_SECONDS` before that
        step is expected to end).

        On the ledger writer's thread while the site computes that step (the coordinator is
        idle then), not beside the hand back's own checks on the loop, which would share the
        interpreter with it. The hand back uses it only while it is current, as any early
        check (`check_ahead`): a last step longer than `CHECK_AHEAD_SECONDS`, or an event
        appended meanwhile, and the hand back checks again as it arrives.
        """
        if hop.id in self._last_step_checks or self._following(run, hop) is None:
            return
        self._last_step_checks[hop.id] = self._start_early_check(run)

    def _start_early_check(self, run: RunRow) -> TamperCheck:
        """`_early_check` of the run, handed to the ledger writer's thread now."""
        check = self.writer.submit(self._early_check, run)
        check.add_done_callback(_retrieve)  # a hand back refused meanwhile never awaits it
        return check

    def _current_last_step_check(self, hop_id: str) -> TamperCheck | None:
        """The check `_check_at_last_step` started for the hop, if it is still running or
        current (taken: a hand back uses it once)."""
        check = self._last_step_checks.pop(hop_id, None)
        if check is None or not check.done():
            return check
        if check.cancelled() or check.exception() is not None:
            return None
        return check if check.result().current(self._head_seq, time.monotonic()) else None

    def check_ahead(self, site: str, header: pb.UploadHeader) -> TamperCheck | None:
        """The tamper check a hand back's commit makes before it leases the next hop in its
        own transaction (`_next_to_lease`), started as the hand back arrives: on the ledger
        writer's thread while the bundle is checked and written, not after that.

        The check reads the run and its hops from SQL then, as it would a few milliseconds
        later. The commit uses it only while it is current (`EarlyCheck.current`: no event
        appended since, and at most `CHECK_AHEAD_SECONDS` old; a bundle streamed for long
        is checked again at its commit); an edit made behind the ledger's back in between is
        found by the next check (the next handoff's, the run's end). The one started at the
        hop's last step (`_check_at_last_step`) is used instead while it runs or is current.
        None where no lease would follow in the commit's transaction (the commit then checks
        as it always did), or the caller holds no lease.
        """
        try:
            run, hop = self.leases.leased_hop(site, header.hop_id, header.lease_token)
        except CoordinatorError:
            return None  # refused by the hand back itself, with its own error
        if self._following(run, hop) is None:
            return None
        ahead = self._current_last_step_check(hop.id)
        if ahead is not None:
            return ahead

        # Handed to the writer thread now: its wake-up and its SQL waits overlap the bundle's
        # parse, checks and staged write on the loop (the write no longer fsyncs there).
        return self._start_early_check(run)

    async def report_result(
        self,
        site: str,
        result: pb.HopResult,
        stored: CheckpointRow | None = None,
        checked: TamperCheck | None = None,
    ) -> str:
        """Commits or fails a hop, then moves the run on. Returns the hop's new status.

        A retried report of a hop already committed with the same output is answered
        "committed" again (the site may not have seen the first answer); nothing is written.
        `stored`: the output's checkpoint row when the bundle was handed back with the result
        (checked and durable in the store, not yet recorded): written with the commit.
        `checked`: with `stored`, the run's tamper check started when the hand back arrived
        (`check_ahead`), used instead of checking again.
        """
        async with self._lock:
            held = self.runs.hop(result.hop_id)
            # A hop no running run holds (its run finished with it): the one lookup in SQL.
            done = held[1] if held is not None else self.ledger.hop(result.hop_id)
            if (
                done is not None
                and done.site == site
                and done.status == "committed"
                and result.ok
                and done.output_sha256 == result.output_checkpoint.sha256
            ):
                return "committed"
            run, hop = self.leases.leased_hop(site, result.hop_id, result.lease_token)
            bind_log_context(run_id=run.id, hop_id=hop.id, site=site)
            if result.released:
                return await self._hop_released(run, hop, result.error_message)
            if not result.ok:
                code = result.error_code or "site-error"
                with self.storage.guard(f"failure report of hop {hop.index} of run {run.id}"):
                    status = await self.hop_failed(
                        run, hop, code, result.error_message or "the site reported a failure"
                    )
                return status
            metrics = finite_metrics(dict(result.metrics))
            output = stored or self.ledger.checkpoint(result.output_checkpoint.sha256)
            if (
                output is None
                or output.hop_id != hop.id
                or output.sha256 != result.output_checkpoint.sha256
                or output.status != "stored"
            ):
                raise InvalidInput(
                    f"output checkpoint {result.output_checkpoint.sha256} was not uploaded "
                    f"for hop {hop.id}"
                )
            # A row written in the commit's own transaction has no event yet to differ from.
            following = await self._next_to_lease(
                run, hop, None if stored else output.sha256, checked if stored else None
            )
            token = secrets.token_hex(16)
            lease = (
                _Lease(run, following[0], following[1], asyncio.get_running_loop())
                if following is not None
                else None
            )
            try:
                with self.storage.guard(f"commit of hop {hop.index} of run {run.id}"):
                    commit = self.writer.submit(
                        self._commit_and_lease, hop.id, result, output, metrics,
                        following[0].id if following else None, token, stored is not None, lease,
                    )  # fmt: skip
                    try:
                        if lease is not None:
                            # Built while the transaction runs; pushed the moment it commits.
                            task = self._hop_task(run, lease.hop, output.sha256,
                                                  input_row=output, lease_token=token)  # fmt: skip
                            if not task.hop.base_model_sha256:  # the run's first commit pins it
                                task.hop.base_model_sha256 = output.manifest["base_model_sha256"]
                            self._lease_built(lease, task)
                    finally:
                        leased = await commit
            except TransitionRefused as exc:
                self._withdraw(lease)
                raise StaleLease(str(exc)) from exc
            except BaseException:
                self._withdraw(lease)
                raise
            sent = leased is not None and lease is not None
            if not sent:
                self._withdraw(lease)
            try:
                if sent and lease is not None:
                    # Pushed on the commit already (`_appended`); one turn of the event loop
                    # lets its stream hand it to gRPC before the committed hop's bookkeeping
                    # (its clean-up is a ledger transaction, and a log line) and the answer.
                    self._push(lease)
                    await asyncio.sleep(0)
            finally:  # committed: its clean-up runs even if the call is cancelled meanwhile
                self.leases.forget(hop.id)
                self._observe_commit(run, hop, result)
                logger.info("run %s hop %d committed (%s)", run.id, hop.index, site)
                self.intake.hop_committed(hop.id)  # its other uploads go after the answer
            if sent:
                return "committed"
            try:
                with self.storage.guard(f"dispatch after hop {hop.index} of run {run.id}"):
                    await self.dispatch_locked(run.id)
            except StorageFault:
                pass  # committed; the watchdog leases the next hop once storage recovers
        return "committed"

    async def _next_to_lease(
        self,
        run: RunRow,
        hop: HopRow,
        output_sha256: str | None,
        checked: TamperCheck | None = None,
    ) -> tuple[HopRow, SiteSession] | None:
        """The hop to lease in the same transaction as `hop`'s commit, with its site's stream.

        Only the plain case (`_following`), with every row and the output checkpoint matching
        their events (`checked`: that check of the rows, started earlier, when there is no
        output checkpoint to check). Any other case commits alone and dispatches as usual
        after the commit.
        """
        following = self._following(run, hop)
        if following is None:
            return None
        early = await checked if checked is not None and output_sha256 is None else None
        if early is not None and early.current(self._head_seq, time.monotonic()):
            mismatches = early.mismatches
        else:
            mismatches = await self.writer.run(self._mismatches, run, output_sha256)
        if mismatches:
            return None  # dispatch after the commit pauses the run, as for any tampering
        self.leases.waiting_since.pop(following[0].id, None)
        self.leases.wait_logged.pop(following[0].id, None)
        return following

    def _following(self, run: RunRow, hop: HopRow) -> tuple[HopRow, SiteSession] | None:
        """The hop after `hop` with its site's stream, in the plain case: a sequential run whose
        next hop is pending, not backing off, at a connected site."""
        if runs_in_rounds(run):
            return None
        settled = ("committed", "skipped")
        following = next(
            (h for h in run.hops if h.index > hop.index and h.status not in settled), None
        )
        if following is None or following.status != "pending":
            return None
        if time.monotonic() < self.leases.not_before.get(following.id, 0.0):
            return None
        session = self.sessions.get(following.site)
        if session is None:
            return None
        return following, session

    def _commit_and_lease(
        self,
        hop_id: str,
        result: pb.HopResult,
        output: CheckpointRow,
        metrics: dict[str, float],
        following_id: str | None,
        token: str,
        record_output: bool = False,
        lease: _Lease | None = None,
    ) -> HopRow | None:
        """Commits the hop and leases the next one (if given) in one ledger transaction.

        Two chained events (``hop.committed``, ``hop.leased``), one commit: both or neither.
        With `record_output` (a hand back), the output's checkpoint row and the hop's move to
        "uploaded" go first in the same transaction (``checkpoint.stored``, ``hop.uploaded``):
        one durable commit per handoff instead of three. Runs on the ledger writer's thread.
        `lease`: the next hop's task goes on its stream as the transaction commits, from this
        thread's head observer (`_appended`), before the other observers. Returns the leased
        hop, if one was leased.
        """
        self._committing.lease = lease
        try:
            with self.ledger.transaction():
                if record_output:
                    self.ledger.record_checkpoint(output)
                    with contextlib.suppress(TransitionRefused):  # uploaded by an earlier call
                        self.ledger.transition_hop(
                            hop_id, expected=("leased", "training"), status="uploaded",
                            event="hop.uploaded", payload={"output_sha256": output.sha256},
                        )  # fmt: skip
                self.ledger.commit_hop(
                    hop_id,
                    lease_token=result.lease_token,
                    output_sha256=output.sha256,
                    metrics=metrics,
                    train_started_at_ns=result.train_started_at_ns,
                    train_finished_at_ns=result.train_finished_at_ns,
                    base_model_sha256=output.manifest["base_model_sha256"],
                )
                leased = (
                    self.ledger.lease_hop(following_id, token, output.sha256)
                    if following_id is not None
                    else None
                )
                if record_output:
                    # The bundle's name in the store, fsynced beside these statements, is durable
                    # before the COMMIT that refers to it (raises, rolling back, if it cannot be).
                    self.intake.wait_durable(output.sha256)
            return leased
        finally:
            self._committing.lease = None

    async def report_validation(self, site: str, report: pb.HopValidation) -> None:
        """Records a committed hop's validation metrics (``hop.validated``), measured by its
        site after the commit; a retry of the same report writes nothing."""
        async with self._lock:
            hop = await self.writer.run(record_validation, self.ledger, self.storage, site, report)
        logger.info("run %s hop %d validated (%s)", hop.run_id, hop.index, site)

    def _observe_commit(self, run: RunRow, hop: HopRow, result: pb.HopResult) -> None:
        self.metrics.hop_settled("committed")
        if runs_in_rounds(run):
            return  # a round's hops train side by side: no handoff between neighbours
        previous = next((h for h in run.hops if h.index == hop.index - 1), None)
        if (
            previous is not None
            and previous.status == "committed"
            and previous.train_finished_at_ns
            and result.train_started_at_ns >= previous.train_finished_at_ns
        ):
            handoff = result.train_started_at_ns - previous.train_finished_at_ns
            self.metrics.handoff.observe(handoff / 1e9)

    async def _finish(self, run: RunRow) -> None:
        """Completes a run whose hops are all settled: final = last committed output."""
        final = next((h for h in reversed(run.hops) if h.status == "committed"), None)
        if final is None or final.output_sha256 is None:
            await self.writer.run(
                self.ledger.transition_run,
                run.id, expected=("running",), status="failed", error="no hop was committed",
            )  # fmt: skip
            return
        if await self._refuse_tampered(run, final.output_sha256):
            return
        try:
            await complete_run(self.ledger, self.writer, self.store, self.storage, self.runs_dir,
                               run.id, final.output_sha256)  # fmt: skip
        except StorageFault:
            return  # still running: the watchdog retries the export once storage recovers
        logger.info("run %s completed", run.id)

    async def _refuse_tampered(self, run: RunRow, checkpoint_sha: str | None) -> bool:
        """Pauses the run (ledgered) if its rows or the checkpoint differ from their events."""
        mismatches = await self.writer.run(self._mismatches, run, checkpoint_sha)
        if not mismatches:
            return False
        logger.error("run %s paused: %s", run.id, mismatches[0].message)
        with contextlib.suppress(TransitionRefused):
            await self.writer.run(self.ledger.pause_for_mismatch, run.id, mismatches)
        return True

    def _early_check(self, run: RunRow) -> EarlyCheck:
        """`_mismatches` of the run's rows, with when and at which ledger head (writer thread:
        no commit of this process runs meanwhile)."""
        head_seq, checked_at = self._head_seq, time.monotonic()
        return EarlyCheck(self._mismatches(run, None), head_seq, checked_at)

    def _mismatches(self, run: RunRow, checkpoint_sha: str | None) -> list[RowMismatch]:
        """The run's rows and the checkpoint that differ from their events (writer thread).

        The rows are read from SQL, not the ones held in memory: an edit made behind the
        ledger's back is in the database. Once per checkpoint handed out, not per call.
        """
        try:
            return self.ledger.stored_run_mismatches(run.id, checkpoint_sha)
        except KeyError:  # deleted behind the ledger's back: its events still name it
            return self.ledger.run_mismatches(run, checkpoint_sha)

    async def hop_failed(self, run: RunRow, hop: HopRow, code: str, message: str) -> str:
        """Applies the run's failure policy to a hop that failed, expired or waited too long."""
        policy = failure_policy(run)
        self.leases.forget(hop.id)
        action = policy.on_failure
        if action == "retry":
            retryable = code not in DETERMINISTIC_FAILURES and hop.attempts <= policy.max_retries
            action = "retry" if retryable else policy.then
        detail = {"code": code, "message": message, "action": action}
        self.metrics.hop_settled({"retry": "retried", "skip": "skipped"}.get(action, "failed"))
        logger.warning("run %s hop %d at %s: %s (%s) -> %s", run.id, hop.index, hop.site,
                       code, message, action,
                       extra={"run_id": run.id, "hop_id": hop.id, "site": hop.site})  # fmt: skip
        live = (*LIVE_HOP_STATES, "pending")
        if action == "retry":
            delay = policy.retry_backoff_seconds * 2 ** max(hop.attempts - 1, 0)
            await self.writer.run(
                self.ledger.transition_hop,
                hop.id, expected=live, status="pending", event="hop.retry", payload=detail,
                lease_token=None, error_code=code, error=message,
            )  # fmt: skip
            self.leases.forget(hop.id)  # what a beat answered during the write extended
            self.intake.hop_ended(hop.id, f"hop retried after {code}")
            self.leases.not_before[hop.id] = time.monotonic() + delay
            return "pending"
        if action == "skip":
            await self.writer.run(
                self.ledger.transition_hop,
                hop.id, expected=live, status="skipped", event="hop.skipped", payload=detail,
                lease_token=None, error_code=code, error=message,
            )  # fmt: skip
            self.leases.forget(hop.id)
            self.intake.hop_ended(hop.id, f"hop skipped after {code}")
            await self.dispatch_locked(run.id)
            return "skipped"
        error = f"hop {hop.index} at {hop.site}: {code}: {message}"
        await self.writer.run(
            self._fail_hop_and_run, hop.id, run.id, live, detail,
            "paused" if action == "pause" else "failed", error,
        )  # fmt: skip
        self.leases.forget(hop.id)
        self.intake.hop_ended(hop.id, f"hop failed with {code}")
        return "failed"

    def _fail_hop_and_run(
        self,
        hop_id: str,
        run_id: str,
        live: tuple[str, ...],
        detail: dict[str, str],
        run_status: str,
        error: str,
    ) -> None:
        """The hop fails and its run pauses or fails: one transaction, two chained events."""
        with self.ledger.transaction():
            self.ledger.transition_hop(
                hop_id, expected=live, status="failed", event="hop.failed", payload=detail,
                lease_token=None, error_code=detail["code"], error=detail["message"],
            )  # fmt: skip
            self.ledger.transition_run(run_id, expected=("running",), status=run_status,
                                       payload=detail, error=error)  # fmt: skip

    async def _hop_released(self, run: RunRow, hop: HopRow, reason: str) -> str:
        """A site handed its hop back unfinished: pending again, and not a failed attempt."""
        self.leases.forget(hop.id)
        await self.writer.run(
            self.ledger.transition_hop,
            hop.id, expected=LIVE_HOP_STATES, status="pending", event="hop.released",
            payload={"reason": reason[:500] or "released by the site"}, lease_token=None,
            attempts=lambda row: max(row.attempts - 1, 0),
        )  # fmt: skip
        self.leases.forget(hop.id)  # what a beat answered during the write extended
        self.metrics.hop_settled("released")
        logger.info("run %s hop %d released by %s: %s", run.id, hop.index, hop.site, reason)
        await self.dispatch_locked(run.id)
        return "pending"

    async def check_deadlines(self, runs: list[RunRow]) -> None:
        """Expires leases, gives up on absent sites and dispatches hops whose backoff ended."""
        self._forget_ended_hops()
        now = time.monotonic()
        for run in runs:
            if runs_in_rounds(run):
                async with self._lock:
                    fresh = self.runs.get(run.id)
                    if fresh is not None:
                        await self.rounds.check_deadlines(fresh, self)
                continue
            hop = current_hop(run)
            if hop is None:
                await self.dispatch(run.id)  # all hops settled: retries a failed export
                continue
            async with self._lock:
                if self.runs.get(run.id) is not run or current_hop(run) is not hop:
                    continue  # moved on while this pass waited for the lock
                overdue = self.leases.overdue(run, hop, self.sessions, now)
                if overdue is not None:
                    code, message = overdue
                    if code == "lease-expired":
                        self.metrics.lease_expiries.inc()
                    await self.hop_failed(run, hop, code, message)
                    continue
            if hop.status == "pending":
                await self.dispatch(run.id)
