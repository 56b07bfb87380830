"""Each trial as a real run: `RunExecutor` starts a candidate plan, reports every full cycle's
validation metric (so the search can prune), then has the run's sites score its final adapter."""

from __future__ import annotations

import logging
import signal
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

import grpc

from coordinator.console.admin import TERMINAL_RUN_STATES, AdminClient
from coordinator.console.study._records import RunTemplate, _link_key
from coordinator.plan import PlanError, RunPlan
from ordering import (
    CandidatePlan,
    OrderingStudy,
    PlanPruned,
    SiteScore,
    TrialOutcome,
    TrialRecord,
)
from protocols.v1 import baton_pb2 as pb

__all__ = [
    "ExecutedRun",
    "RunExecutor",
    "RunNotApproved",
    "TrialRunError",
    "hop_training_seconds",
    "run_search",
]

logger = logging.getLogger(__name__)

_DONE_HOP_STATES = ("committed", "skipped")
_UNREACHABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
_T = TypeVar("_T")
# How a refusal for want of approval shows in a run's status: the error code in the run's error
# once it has failed, the site's message in the hop's error while the hop waits for a retry
# (HopStatus carries no error code).
_REFUSAL_MARKERS = ("not-approved", "is not approved at this site")


class TrialRunError(RuntimeError):
    """A trial's run produced no score: it failed, was aborted or paused, took too long, or a
    site could not evaluate its final adapter. The study records the trial as failed."""


class RunNotApproved(RuntimeError):
    """A site refused a trial's run because it has not approved the run's bundle.

    Not a `TrialRunError`: every later trial would be refused too, so the search stops (the
    trial is recorded as failed) until the sites approve the bundle.
    """

    def __init__(self, message: str, bundle_sha256: str) -> None:
        super().__init__(message)
        self.bundle_sha256 = bundle_sha256


# ---- executing plans as runs -------------------------------------------------------------------


@dataclass(frozen=True)
class ExecutedRun:
    """A run a `RunExecutor` started for one trial.

    Attributes:
        run_id: The coordinator's run id.
        plan: The plan it ran.
        budget: The budget fraction it ran with.
    """

    run_id: str
    plan: CandidatePlan
    budget: float


def hop_training_seconds(run: pb.RunStatus) -> dict[str, float]:
    """Training seconds per site, summed over the run's hops that finished training.

    Each hop's duration is ``train_finished_at_ns - train_started_at_ns``, both read from the
    training site's own clock, so clocks need not agree across sites.
    """
    seconds: dict[str, float] = {}
    for hop in run.hops:
        if hop.train_started_at_ns and hop.train_finished_at_ns:
            duration = max(0, hop.train_finished_at_ns - hop.train_started_at_ns) / 1e9
            seconds[hop.site] = seconds.get(hop.site, 0.0) + duration
    return seconds


class RunExecutor:
    """Runs candidate plans as real runs on a live coordinator (an `ordering.PlanExecutor`).

    For each plan it starts a run, follows it, and at the end of every full cycle reports the
    mean of that cycle's hop validation metric (each hop's metric comes from the training site's
    own validation split, measured right after its visit). Those values are comparable only
    between trials of the same stage (budget fraction and cycle count), which the study's
    `StagePruner` guarantees. When the search prunes the trial, the run is aborted.

    Once the run completes, every site of the run scores the final adapter on its validation
    split; those scores are the trial's site scores. The trial's cost is each site's training
    seconds (see `hop_training_seconds`); evaluation time is not counted.

    Attributes:
        runs: Every run started, in order.
    """

    def __init__(
        self,
        client: AdminClient,
        template: RunTemplate,
        *,
        run_name: str = "search",
        poll_seconds: float = 0.25,
        run_timeout: float | None = None,
        evaluation_timeout: float = 600.0,
        reconnect_seconds: float = 600.0,
        validation_grace_seconds: float = 120.0,
    ) -> None:
        """Builds an executor.

        Args:
            client: An admin connection to the coordinator.
            template: Dataset, task and metric of every run.
            run_name: Prefix of the run names (followed by the plan's order).
            poll_seconds: How often the run's status is read.
            run_timeout: Abort a run that has not ended after this many seconds.
            evaluation_timeout: How long the sites get to evaluate the final adapter.
            reconnect_seconds: How long a trial keeps following its run while the coordinator
                is unreachable (a coordinator restart resumes the run, and the trial with it).
            validation_grace_seconds: How long after its run completes a trial waits for the
                validation metrics of the last hops (sites validate after their commit).
        """
        self.client = client
        self.template = template
        self.run_name = run_name
        self.poll_seconds = poll_seconds
        self.run_timeout = run_timeout
        self.evaluation_timeout = evaluation_timeout
        self.reconnect_seconds = reconnect_seconds
        self.validation_grace_seconds = validation_grace_seconds
        self.runs: list[ExecutedRun] = []
        self._bundle_sha256 = ""

    def execute(
        self, plan: CandidatePlan, *, budget: float, report: Callable[[int, float], None]
    ) -> TrialOutcome:
        """Runs `plan` on the coordinator and returns the sites' validation scores and costs.

        Raises:
            PlanPruned: When `report` prunes the trial (the run is aborted first; the exception
                carries the training seconds spent so far).
            TrialRunError: When the run or an evaluation fails.
            PlanError: When the coordinator would refuse the plan (a template problem).
        """
        suffix = "" if budget == 1.0 else f" @budget={budget:g}"
        name = f"{self.run_name}: {plan.describe()}{suffix}"[:200]
        run_plan = self.template.run_plan(plan, name=name, budget=budget)
        self._bundle_sha256 = run_plan.approval_bundle().sha256
        started: list[str] = []
        intermediate: list[tuple[int, float]] = []
        try:
            # A Ctrl-C (or the dashboard's abort-trial) waits for the start's answer: arriving
            # while the run was being created, it would otherwise leave that run running with
            # no id to abort it by.
            with _interrupt_after():
                started.append(self._start(run_plan))
                run_id = started[0]
                self.runs.append(ExecutedRun(run_id, plan, budget))
            logger.info("run %s started for %s (budget %g)", run_id, plan.describe(), budget)
            run = self._follow(run_id, plan, report, intermediate)
            scores = self._evaluate(run_id, plan)
        except PlanPruned as exc:
            self._abort(run_id, "pruned by the ordering search")
            cost = self._cost_so_far(run_id, plan)
            logger.info("run %s aborted: trial pruned (%s)", run_id, exc)
            raise PlanPruned(str(exc), cost_seconds_by_site=cost) from exc
        except BaseException:
            if started:
                self._abort(started[0], "the ordering search stopped this trial")
            raise
        return TrialOutcome(scores, self._cost(run, plan), tuple(intermediate))

    # -- following a run ----------------------------------------------------------------------

    def _follow(
        self,
        run_id: str,
        plan: CandidatePlan,
        report: Callable[[int, float], None],
        intermediate: list[tuple[int, float]],
    ) -> pb.RunStatus:
        hops_per_cycle = len(plan.order)
        next_cycle = 0
        deadline = None if self.run_timeout is None else time.monotonic() + self.run_timeout
        validated_by: float | None = None  # once the run completed: see below
        while True:
            run = self._reconnecting(lambda: self.client.run(run_id))
            self._check_approved(run)
            if len(run.hops) != len(plan.hops):
                raise TrialRunError(
                    f"run {run_id} has {len(run.hops)} hops; the plan has {len(plan.hops)}"
                )
            # Federated and hybrid trials report nothing before they end: their round values
            # are not comparable with cycle values, and the pruner compares trials by cycle.
            while (
                plan.federation is None
                and next_cycle < plan.cycles
                and self._cycle_done(run, next_cycle, hops_per_cycle)
            ):
                value = self._cycle_value(run, next_cycle, hops_per_cycle)
                if value is not None:
                    intermediate.append((next_cycle, value))
                    report(next_cycle, value)
                next_cycle += 1
            if run.status == "completed":
                if plan.federation is not None or next_cycle >= plan.cycles:
                    return run
                # A hop's validation may come after the run completes (the site validates
                # once its hop is committed): the last cycles are reported when it has come.
                # Past the grace, a cycle whose validation never came (a failed or lost pass)
                # is left out of the intermediate values, with a warning naming its hops; the
                # trial goes on to its score, which the final evaluation gives.
                if validated_by is None:
                    validated_by = time.monotonic() + self.validation_grace_seconds
                elif time.monotonic() > validated_by:
                    for cycle in range(next_cycle, plan.cycles):
                        missing = self._unvalidated(run, cycle, hops_per_cycle)
                        if missing:
                            logger.warning(
                                "run %s: cycle %d is not reported to the search: no %r "
                                "validation metric came within %g s from %s",
                                run_id, cycle, self.template.metric,
                                self.validation_grace_seconds, ", ".join(missing),
                            )  # fmt: skip
                        elif (value := self._cycle_value(run, cycle, hops_per_cycle)) is not None:
                            intermediate.append((cycle, value))
                            report(cycle, value)
                    return run
                time.sleep(self.poll_seconds)
                continue
            if run.status in TERMINAL_RUN_STATES:
                raise TrialRunError(f"run {run_id} {run.status}: {run.error or 'no reason given'}")
            if run.status == "paused":
                raise TrialRunError(
                    f"run {run_id} paused ({run.error or 'a hop failed'}); a search does not wait "
                    "for a resume, so it is aborted"
                )
            if deadline is not None and time.monotonic() > deadline:
                raise TrialRunError(f"run {run_id} did not finish within {self.run_timeout:g} s")
            time.sleep(self.poll_seconds)

    def _reconnecting(self, call: Callable[[], _T]) -> _T:
        """`call()`, retried while the coordinator is unreachable (e.g. restarting).

        Only reads and idempotent requests go through here: a run keeps its id across a
        coordinator restart, so following it simply resumes. Starting a run does not retry
        (a lost reply could start it twice).
        """
        deadline = time.monotonic() + self.reconnect_seconds
        while True:
            try:
                return call()
            except grpc.RpcError as exc:
                if exc.code() not in _UNREACHABLE or time.monotonic() > deadline:
                    raise
                logger.warning("coordinator unreachable (%s); retrying", exc.code())
                time.sleep(max(self.poll_seconds, 0.5))

    def _start(self, run_plan: RunPlan) -> str:
        """Starts the trial's run; a preflight refusal stops the search (every trial would be
        refused alike): RunNotApproved when approvals are all that is missing, else PlanError."""
        try:
            return self.client.start_run(run_plan)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.FAILED_PRECONDITION:
                raise
            problems = (exc.details() or "").splitlines()
            refused = f"the coordinator refused run {run_plan.name!r}: {'; '.join(problems)}"
            if problems and all("has not approved" in problem for problem in problems):
                raise RunNotApproved(refused, self._bundle_sha256) from exc
            raise PlanError(refused) from exc

    def _check_approved(self, run: pb.RunStatus) -> None:
        """Stops at the first refusal: the coordinator would retry the hop, to no avail."""
        refusals = [hop for hop in run.hops if any(m in hop.error for m in _REFUSAL_MARKERS)]
        if refusals or any(marker in run.error for marker in _REFUSAL_MARKERS):
            where = ", ".join(sorted({hop.site for hop in refusals})) or "a site"
            raise RunNotApproved(
                f"{where} refused run {run.run_id}: its approval bundle {self._bundle_sha256} is "
                f"not approved there (baton-site approve {self._bundle_sha256})",
                self._bundle_sha256,
            )

    @staticmethod
    def _cycle_hops(run: pb.RunStatus, cycle: int, hops_per_cycle: int) -> list[pb.HopStatus]:
        hops = sorted(run.hops, key=lambda hop: hop.index)
        return hops[cycle * hops_per_cycle : (cycle + 1) * hops_per_cycle]

    def _cycle_done(self, run: pb.RunStatus, cycle: int, hops_per_cycle: int) -> bool:
        # A hop's validation metrics may follow its commit (a `hop.validated` event).
        return all(
            hop.status in _DONE_HOP_STATES
            and (hop.status != "committed" or self.template.metric in hop.metrics)
            for hop in self._cycle_hops(run, cycle, hops_per_cycle)
        )

    def _unvalidated(self, run: pb.RunStatus, cycle: int, hops_per_cycle: int) -> list[str]:
        """The cycle's committed hops without the template's metric, as 'hop N at SITE'."""
        return [
            f"hop {hop.index} at {hop.site}"
            for hop in self._cycle_hops(run, cycle, hops_per_cycle)
            if hop.status == "committed" and self.template.metric not in hop.metrics
        ]

    def _cycle_value(self, run: pb.RunStatus, cycle: int, hops_per_cycle: int) -> float | None:
        """The mean of the cycle's committed hops' validation metric (None: all skipped)."""
        values: list[float] = []
        for hop in self._cycle_hops(run, cycle, hops_per_cycle):
            if hop.status != "committed":
                continue
            if self.template.metric not in hop.metrics:
                raise TrialRunError(
                    f"hop {hop.index} at {hop.site} reported no {self.template.metric!r} metric "
                    f"(it reported: {', '.join(sorted(hop.metrics)) or 'nothing'})"
                )
            values.append(float(hop.metrics[self.template.metric]))
        if not values:
            logger.warning("cycle %d of run %s has no committed hop to report", cycle, run.run_id)
            return None
        return statistics.fmean(values)

    # -- scoring ---------------------------------------------------------------------------------

    def _evaluate(self, run_id: str, plan: CandidatePlan) -> tuple[SiteScore, ...]:
        """Every site of the run scores the final adapter on its validation split."""
        wanted = set(self._reconnecting(lambda: self.client.evaluate_run(run_id, "validation")))
        try:
            run = self._reconnecting(
                lambda: self.client.wait_for_evaluations(run_id, self.evaluation_timeout)
            )
        except TimeoutError as exc:
            raise TrialRunError(str(exc)) from exc
        rows = {e.site: e for e in run.evaluations if e.evaluation_id in wanted}
        problems = [
            f"{row.site}: {row.error or row.status}"
            for row in rows.values()
            if row.status != "done"
        ]
        if problems:
            raise TrialRunError(
                f"validation of run {run_id} failed at {len(problems)} site(s): "
                + "; ".join(problems)
            )
        scores: list[SiteScore] = []
        metric = self.template.metric
        for site in plan.sites:
            row = rows.get(site)
            if row is None:
                raise TrialRunError(f"site {site} was not asked to evaluate run {run_id}")
            if row.split != "validation":  # never score a trial on a test split
                raise TrialRunError(f"evaluation {row.evaluation_id} is on {row.split!r}")
            if metric not in row.metrics:
                raise TrialRunError(
                    f"{site} reported no {metric!r} for run {run_id} "
                    f"(it reported: {', '.join(sorted(row.metrics)) or 'nothing'})"
                )
            scores.append(
                SiteScore(
                    site,
                    value=float(row.metrics[metric]),
                    examples=int(row.metrics.get("examples", 0)),
                    folds=int(row.metrics.get("folds", 1)),
                )
            )
        return tuple(scores)

    @staticmethod
    def _cost(run: pb.RunStatus, plan: CandidatePlan) -> dict[str, float]:
        return {**dict.fromkeys(plan.sites, 0.0), **hop_training_seconds(run)}

    def _cost_so_far(self, run_id: str, plan: CandidatePlan) -> dict[str, float]:
        try:
            return self._cost(self.client.run(run_id), plan)
        except grpc.RpcError as exc:
            logger.warning("cannot read run %s for its cost: %s", run_id, exc.details())
            return dict.fromkeys(plan.sites, 0.0)

    def _abort(self, run_id: str, reason: str) -> None:
        """Aborts the run unless it has already ended (best effort: errors are logged)."""
        try:
            if self.client.run(run_id).status in TERMINAL_RUN_STATES:
                return
            self.client.control(run_id, "abort", reason)
            logger.info("run %s aborted: %s", run_id, reason)
        except grpc.RpcError as exc:
            logger.warning("could not abort run %s: %s", run_id, exc.details())


@contextmanager
def _interrupt_after() -> Iterator[None]:
    """Holds back SIGINT's KeyboardInterrupt until the block ends (main thread only; a
    second SIGINT interrupts at once)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []

    def hold(signum: int, frame: object) -> None:
        if pending:
            raise KeyboardInterrupt
        pending.append(signum)

    previous = signal.signal(signal.SIGINT, hold)
    try:
        yield
    finally:
        # None: a handler not set from Python (restored as the default).
        signal.signal(signal.SIGINT, previous if previous is not None else signal.SIG_DFL)
    if pending:
        raise KeyboardInterrupt


# ---- running a search --------------------------------------------------------------------------


def run_search(
    study: OrderingStudy,
    executor: RunExecutor,
    n_trials: int,
    *,
    budget: float = 1.0,
    catch: tuple[type[Exception], ...] = (TrialRunError,),
    on_trial: Callable[[TrialRecord, str | None], None] | None = None,
) -> list[TrialRecord]:
    """Runs `n_trials` trials one at a time, recording which run each trial ran.

    The link from trial to run id is kept in the study's user attributes (``trial_run_ids``),
    so the ledger's run can be found from the study and the other way round.

    Args:
        study: The search.
        executor: Runs the plans.
        n_trials: How many trials.
        budget: Budget fraction of every trial.
        catch: Executor errors that fail a trial but not the search.
        on_trial: Called after each trial with its record and run id (None when the trial ran
            nothing: a reused duplicate, or a plan that could not be started).
    """
    records: list[TrialRecord] = []
    for _ in range(n_trials):
        started = len(executor.runs)
        [record] = study.optimize(executor, 1, budget, catch=catch)
        run_id = executor.runs[-1].run_id if len(executor.runs) > started else None
        if run_id is not None:
            study.optuna_study.set_user_attr(_link_key(record.study_name, record.number), run_id)
        records.append(record)
        if on_trial is not None:
            on_trial(record, run_id)
    return records
