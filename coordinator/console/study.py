"""The ordering search against a live coordinator: each trial is a real run, scored by the sites.

`RunExecutor` implements `ordering.PlanExecutor`: it turns a `CandidatePlan` into a run plan,
starts the run, reports a value after every full cycle (so the search can prune it), then has
every site of the run score the final adapter on its own *validation* split. Test splits are
never asked for here: they are for the final report of the plan the search picks.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
from sqlalchemy import create_engine, make_url, text

from coordinator.console.admin import TERMINAL_RUN_STATES, AdminClient
from coordinator.plan import HyperparameterSpec, PlanError, RunPlan, parse_plan
from ordering import (
    CandidatePlan,
    FloatRange,
    HopHyperparameters,
    IntRange,
    OrderingStudy,
    PlanPruned,
    SearchSpace,
    SearchSpaceError,
    SiteScore,
    StudyMismatch,
    TrialOutcome,
    TrialRecord,
)
from protocols.approval import ApprovalBundle
from protocols.v1 import baton_pb2 as pb

__all__ = [
    "STUDY_SCHEMA",
    "ExecutedRun",
    "RunExecutor",
    "RunNotApproved",
    "RunTemplate",
    "TrialRunError",
    "approval_bounds",
    "attach_run_template",
    "cross_site_probe",
    "heuristic_seed_orders",
    "hop_training_seconds",
    "plan_from_study",
    "run_search",
    "run_template_of",
    "scale_hyperparameters",
    "study_storage_url",
    "train_examples_by_site",
    "trial_run_ids",
    "warm_start_from_ledger",
]

logger = logging.getLogger(__name__)

STUDY_SCHEMA = "baton_studies"
"""The PostgreSQL schema holding Optuna's tables beside the ledger's (see `study_storage_url`)."""

_TEMPLATE_ATTR = "baton.run_template"  # study user attribute: the RunTemplate as JSON
_RUN_LINK_PREFIX = "baton.run_id:"  # study user attributes: "<prefix><stage study>#<trial>"
_DONE_HOP_STATES = ("committed", "skipped")
_UNREACHABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
_T = TypeVar("_T")
# What a run must share with a study's template to count as one of its trials (RunPlan fields).
_TEMPLATE_FIELDS = (
    "task", "dataset", "labels", "options", "lora", "base_model_sha256", "cross_validation",
)  # fmt: skip
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


# ---- what every run of a study shares -----------------------------------------------------------


def _plain_json(value: Any) -> Any:
    """`value` as plain JSON types (tuples become lists), so stored and fresh copies compare."""
    return json.loads(json.dumps(value, allow_nan=False))


@dataclass(frozen=True)
class RunTemplate:
    """What every run of a study shares: the data, the task, and the metric the sites report.

    Attributes:
        dataset: The dataset name every site resolves locally.
        labels: The label set (classification tasks).
        task: The coordinator's task type ("seq-classification", "tabular", "causal-lm").
        metric: The validation metric that scores a run ("accuracy", "macro_f1", "loss", ...);
            the study's direction must match it (larger accuracy is better, smaller loss is).
        lora: LoRA settings (r, alpha, dropout, target_modules); the coordinator's defaults
            when None.
        options: Task options (e.g. the tabular model).
        base_model_sha256: Pins the base model of every run, when given.
        failure: The failure policy of every run (the coordinator's default when None).
        bounds: The hyperparameter bounds every run declares (see `approval_bounds`). Sites
            approve a run by its approval bundle, which holds these bounds instead of the hops'
            own values, so one approval covers every trial of the study. None: each run's
            bundle holds its own values, and every trial needs its own approval.
        cross_validation: ``{"folds": k, "min_validation_rows": m}``: every trial is a
            cross-validation run (see `coordinator.plan.CrossValidationSpec`), scored by the
            sites' k-fold cross-validated metric over their training splits. The final run of
            the chosen plan (``final=True``) is an ordinary run: one model on all training rows,
            under its own approval bundle. None: trials are scored on validation splits.
    """

    dataset: str
    labels: tuple[str, ...] = ()
    task: str = "seq-classification"
    metric: str = "accuracy"
    lora: Mapping[str, Any] | None = None
    options: Mapping[str, Any] = field(default_factory=dict)
    base_model_sha256: str | None = None
    failure: Mapping[str, Any] | None = None
    bounds: Mapping[str, tuple[float, float]] | None = None
    cross_validation: Mapping[str, int] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "labels", tuple(self.labels))
        if self.bounds is not None:
            bounds = {str(k): (float(lo), float(hi)) for k, (lo, hi) in self.bounds.items()}
            object.__setattr__(self, "bounds", bounds)
        if not self.metric:
            raise ValueError("a run template needs the metric that scores a run")
        if self.cross_validation is not None:
            object.__setattr__(
                self, "cross_validation", {k: int(v) for k, v in self.cross_validation.items()}
            )

    def plan_document(
        self, plan: CandidatePlan, *, name: str = "run", budget: float = 1.0, final: bool = False
    ) -> dict[str, Any]:
        """The run-plan document of `plan` (explicit hops), scaled down when `budget` < 1.

        Args:
            plan: The hops to run.
            name: The run name.
            budget: Fraction of the full training budget; see `scale_hyperparameters`.
            final: The run that trains the chosen plan's model: never a cross-validation run.
        """
        document = plan.to_plan_document(
            self.dataset,
            self.labels,
            self.task,
            name=name,
            lora=self.lora,
            base_model_sha256=self.base_model_sha256,
        )
        if self.options:
            document["options"] = _plain_json(dict(self.options))
        if self.failure is not None:
            document["failure"] = _plain_json(dict(self.failure))
        if self.bounds is not None:
            document["bounds"] = {k: [lo, hi] for k, (lo, hi) in self.bounds.items()}
        if self.cross_validation is not None and not final:
            document["cross_validation"] = dict(self.cross_validation)
        if budget != 1.0:
            for hop in document["hops"]:
                hop["hyperparameters"] = scale_hyperparameters(hop["hyperparameters"], budget)
        return document

    def run_plan(
        self, plan: CandidatePlan, *, name: str = "run", budget: float = 1.0, final: bool = False
    ) -> RunPlan:
        """The validated `RunPlan` of `plan` (see `plan_document`).

        Raises:
            PlanError: If the coordinator would refuse it (the message names the field).
        """
        return parse_plan(self.plan_document(plan, name=name, budget=budget, final=final))

    def approval_bundle(self, plan: CandidatePlan) -> ApprovalBundle:
        """The approval bundle of `plan`'s run: what each site reviews and approves.

        With `bounds` set it is the same for every plan of the study's space, so the sites
        approve the study once (``baton-site approve <sha256>``).

        Raises:
            PlanError: If the coordinator would refuse the plan.
        """
        return self.run_plan(plan).approval_bundle()

    def to_json_dict(self) -> dict[str, Any]:
        """A JSON-able form, stored with the study; `from_json_dict` reads it back."""
        return {
            "dataset": self.dataset,
            "labels": list(self.labels),
            "task": self.task,
            "metric": self.metric,
            "lora": None if self.lora is None else _plain_json(dict(self.lora)),
            "options": _plain_json(dict(self.options)),
            "base_model_sha256": self.base_model_sha256,
            "failure": None if self.failure is None else _plain_json(dict(self.failure)),
            "bounds": None
            if self.bounds is None
            else {k: [lo, hi] for k, (lo, hi) in self.bounds.items()},
            "cross_validation": None
            if self.cross_validation is None
            else dict(self.cross_validation),
        }

    @classmethod
    def from_json_dict(cls, data: Mapping[str, Any]) -> RunTemplate:
        """The inverse of `to_json_dict`."""
        return cls(
            dataset=str(data["dataset"]),
            labels=tuple(data.get("labels", ())),
            task=str(data.get("task", "seq-classification")),
            metric=str(data.get("metric", "accuracy")),
            lora=data.get("lora"),
            options=dict(data.get("options") or {}),
            base_model_sha256=data.get("base_model_sha256"),
            failure=data.get("failure"),
            bounds=data.get("bounds"),
            cross_validation=data.get("cross_validation"),
        )


def scale_hyperparameters(hyperparameters: Mapping[str, Any], budget: float) -> dict[str, Any]:
    """One hop's hyperparameters at a fraction of the full training budget.

    A probe trial (budget b < 1) trains every hop for ``max(1, round(steps * b))`` steps (and
    ``round(warmup_steps * b)`` warm-up steps), or for ``epochs * b`` passes over the train split
    when the plan gives epochs (the wire contract takes fractional epochs). The site order, the
    number of cycles, the learning rate and the seeds are unchanged, so a probe runs the same
    schedule, only shorter at every visit.

    Raises:
        ValueError: If `budget` is not within (0, 1].
    """
    if not (math.isfinite(budget) and 0.0 < budget <= 1.0):
        raise ValueError(f"a budget fraction must be within (0, 1], got {budget}")
    scaled = dict(hyperparameters)
    if budget == 1.0:
        return scaled
    if "steps" in scaled:
        scaled["steps"] = max(1, round(int(scaled["steps"]) * budget))
    if scaled.get("warmup_steps"):
        scaled["warmup_steps"] = round(int(scaled["warmup_steps"]) * budget)
    if scaled.get("epochs"):
        scaled["epochs"] = float(scaled["epochs"]) * budget
    return scaled


def approval_bounds(space: SearchSpace) -> dict[str, tuple[float, float]]:
    """Bounds covering every hop any plan of `space` can run, at any budget fraction.

    The learning rate spans every hop's decayed value; the lower bounds of steps, warm-up steps
    and epochs are 1, 0 and 0, because probe trials (budget < 1) run shorter visits (see
    `scale_hyperparameters`). Fixed values are bounded by themselves. A site that approves a
    bundle with these bounds approves every trial of the study.
    """

    def span(value: float | FloatRange | IntRange | None) -> tuple[float, float]:
        if value is None:
            return 0.0, 0.0
        if isinstance(value, FloatRange | IntRange):
            return float(value.low), float(value.high)
        return float(value), float(value)

    lr_low, lr_high = span(space.learning_rate)
    decay_low, decay_high = span(space.learning_rate_decay)
    last_hop = space.max_cycles * len(space.sites) - 1
    return {
        "learning_rate": (
            lr_low * min(1.0, decay_low) ** last_hop,
            lr_high * max(1.0, decay_high) ** last_hop,
        ),
        "steps": (1.0, span(space.steps)[1]),
        "epochs": (0.0, span(space.epochs)[1]),
        "batch_size": span(space.batch_size),
        "weight_decay": span(space.weight_decay),
        "warmup_steps": (0.0, float(space.warmup_steps)),
        "max_grad_norm": span(space.max_grad_norm),
        "proximal_mu": span(space.proximal_mu),
    }


def attach_run_template(study: OrderingStudy, template: RunTemplate) -> None:
    """Stores `template` with the study, or checks that it is the one already stored.

    Raises:
        StudyMismatch: If the study was created for other runs (another dataset, metric...).
    """
    optuna_study = study.optuna_study
    wanted = template.to_json_dict()
    stored = optuna_study.user_attrs.get(_TEMPLATE_ATTR)
    if stored is None:
        optuna_study.set_user_attr(_TEMPLATE_ATTR, wanted)
    elif stored != wanted:
        differing = sorted(k for k in wanted if stored.get(k) != wanted[k])
        raise StudyMismatch(
            f"study {study.study_name!r} runs plans with a different {', '.join(differing)}; "
            "use another study name"
        )


def run_template_of(study: OrderingStudy) -> RunTemplate:
    """The run template stored with the study.

    Raises:
        StudyMismatch: If the study has none (it was not created by `baton study start`).
    """
    stored = study.optuna_study.user_attrs.get(_TEMPLATE_ATTR)
    if not isinstance(stored, dict):
        raise StudyMismatch(f"study {study.study_name!r} has no run template (dataset, labels...)")
    return RunTemplate.from_json_dict(stored)


def plan_from_study(storage: str, name: str, *, run_name: str | None = None) -> RunPlan:
    """The run plan of a study's best full-budget trial, ready for `AdminClient.start_run`.

    Args:
        storage: The study's Optuna storage URL.
        name: The study name.
        run_name: The run's name (default ``"<name>-best"``).

    Raises:
        KeyError: If there is no study of that name.
        StudyMismatch: If the study was not created by `baton study start`.
        ValueError: If no full-budget trial has completed yet.
    """
    study = OrderingStudy.load(storage, name)
    template = run_template_of(study)
    return template.run_plan(study.best_plan(), name=run_name or f"{name}-best", final=True)


# ---- storage --------------------------------------------------------------------------------


def study_storage_url(database_url: str, *, create_schema: bool = True) -> str:
    """The Optuna storage URL that keeps a coordinator's studies beside its ledger.

    Optuna's tables (studies, trials, trial_params, ...) do not share names with the ledger's
    (sites, runs, hops, checkpoints, events, evaluations), but both sides version their schema
    with Alembic in a table named ``alembic_version``, and each refuses the other's revision.
    So the two are kept apart:

    * SQLite: a sibling file, ``ledger.sqlite3`` -> ``ledger-studies.sqlite3``.
    * PostgreSQL: the same database, schema `STUDY_SCHEMA` (``search_path`` set through the
      connection's ``options``), created here when `create_schema`.

    Raises:
        ValueError: For an in-memory SQLite ledger or another database.
    """
    url = make_url(database_url)
    backend = url.get_backend_name()
    if backend == "sqlite":
        database = url.database
        if not database or database == ":memory:":
            raise ValueError("an in-memory SQLite ledger has no file to keep studies beside")
        path = Path(database)
        sibling = path.with_name(f"{path.stem}-studies{path.suffix or '.sqlite3'}")
        return url.set(database=str(sibling)).render_as_string(hide_password=False)
    if backend == "postgresql":
        if create_schema:
            engine = create_engine(url)
            try:
                with engine.begin() as connection:
                    connection.execute(text(f'CREATE SCHEMA IF NOT EXISTS "{STUDY_SCHEMA}"'))
            finally:
                engine.dispose()
        existing = url.query.get("options")
        if isinstance(existing, tuple):
            existing = " ".join(existing)
        search_path = f"-csearch_path={STUDY_SCHEMA}"
        options = f"{existing} {search_path}" if existing else search_path
        return url.update_query_dict({"options": options}).render_as_string(hide_password=False)
    raise ValueError(f"studies are kept beside SQLite or PostgreSQL ledgers, not {backend}")


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
        """
        self.client = client
        self.template = template
        self.run_name = run_name
        self.poll_seconds = poll_seconds
        self.run_timeout = run_timeout
        self.evaluation_timeout = evaluation_timeout
        self.reconnect_seconds = reconnect_seconds
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
        run_id = self._start(run_plan)
        self.runs.append(ExecutedRun(run_id, plan, budget))
        logger.info("run %s started for %s (budget %g)", run_id, plan.describe(), budget)
        intermediate: list[tuple[int, float]] = []
        try:
            run = self._follow(run_id, plan, report, intermediate)
            scores = self._evaluate(run_id, plan)
        except PlanPruned as exc:
            self._abort(run_id, "pruned by the ordering search")
            cost = self._cost_so_far(run_id, plan)
            logger.info("run %s aborted: trial pruned (%s)", run_id, exc)
            raise PlanPruned(str(exc), cost_seconds_by_site=cost) from exc
        except BaseException:
            self._abort(run_id, "the ordering search stopped this trial")
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
        while True:
            run = self._reconnecting(lambda: self.client.run(run_id))
            self._check_approved(run)
            if len(run.hops) != len(plan.hops):
                raise TrialRunError(
                    f"run {run_id} has {len(run.hops)} hops; the plan has {len(plan.hops)}"
                )
            while next_cycle < plan.cycles and self._cycle_done(run, next_cycle, hops_per_cycle):
                value = self._cycle_value(run, next_cycle, hops_per_cycle)
                if value is not None:
                    intermediate.append((next_cycle, value))
                    report(next_cycle, value)
                next_cycle += 1
            if run.status == "completed":
                return run
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
        return all(
            hop.status in _DONE_HOP_STATES for hop in self._cycle_hops(run, cycle, hops_per_cycle)
        )

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


# ---- running a search --------------------------------------------------------------------------


def _link_key(study_name: str, number: int) -> str:
    return f"{_RUN_LINK_PREFIX}{study_name}#{number}"


def trial_run_ids(study: OrderingStudy) -> dict[tuple[str, int], str]:
    """The run each trial ran, by (stage study name, trial number), as `run_search` recorded."""
    links: dict[tuple[str, int], str] = {}
    for key, run_id in study.optuna_study.user_attrs.items():
        if key.startswith(_RUN_LINK_PREFIX):
            stage, _, number = key[len(_RUN_LINK_PREFIX) :].rpartition("#")
            links[(stage, int(number))] = str(run_id)
    return links


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


class _NotAPrior(Exception):
    """Why a run of the ledger cannot seed a study."""


def warm_start_from_ledger(
    client: AdminClient, study: OrderingStudy, template: RunTemplate
) -> list[tuple[str, TrialRecord]]:
    """Adds the coordinator's earlier runs of the study's computation as completed trials.

    Runs made before the search (an earlier study's trials, hand-made runs of the same data)
    cost real training time at the sites; this records them in the study without re-running
    them (`OrderingStudy.add_prior`: full budget, compute cost 0), linked to their run ids like
    `run_search`'s trials. A run is used when it completed, is not yet linked to a trial of the
    study, its plan matches `template` (dataset, task, labels, options, LoRA, base model pin and
    cross-validation: a cross-validation template takes only cross-validation runs with the same
    folds, an ordinary template only ordinary runs), every hop was committed, its hops form a
    plan of the study's space (each cycle visits every site once, the learning rate changes by
    one factor per hop, hop k trains with seed + k: runs of the ``sites`` shorthand repeat one
    seed and are left out), and every site of the plan has a finished validation evaluation of
    its final checkpoint reporting the template's metric. Test evaluations are never read.
    Each run left out is logged at INFO with the reason.

    Args:
        client: An admin connection to the coordinator.
        study: The search to seed.
        template: The study's run template.

    Returns:
        (run id, trial record) of every run added, in the coordinator's order.
    """
    linked = set(trial_run_ids(study).values())
    reference = template.run_plan(study.space.plan(study.space.sites))
    added: list[tuple[str, TrialRecord]] = []
    for run in client.runs():
        if run.status != "completed" or run.run_id in linked:
            continue
        try:
            plan, outcome = _prior_of(run, study, template, reference)
            record = study.add_prior(plan, outcome, note=f"run {run.run_id}")
        except (_NotAPrior, SearchSpaceError) as exc:
            logger.info("run %s (%s) is not a warm start for study %r: %s",
                        run.run_id, run.name, study.study_name, exc)  # fmt: skip
            continue
        study.optuna_study.set_user_attr(_link_key(record.study_name, record.number), run.run_id)
        added.append((run.run_id, record))
    return added


def _prior_of(
    run: pb.RunStatus, study: OrderingStudy, template: RunTemplate, reference: RunPlan
) -> tuple[CandidatePlan, TrialOutcome]:
    """The plan a completed run ran and what it scored, as a trial of `study` would have."""
    try:
        stored = parse_plan(run.plan_json)
    except PlanError as exc:
        raise _NotAPrior(f"its plan cannot be read: {exc}") from exc
    differing = [
        name for name in _TEMPLATE_FIELDS if getattr(stored, name) != getattr(reference, name)
    ]
    if differing:
        raise _NotAPrior(f"its {', '.join(differing)} differ(s) from the study's")
    hops = stored.expanded_hops()
    if [site for site, _ in hops] != [h.site for h in sorted(run.hops, key=lambda h: h.index)]:
        raise _NotAPrior("its hops do not match its plan")
    skipped = [f"{hop.index} at {hop.site}" for hop in run.hops if hop.status != "committed"]
    if skipped:
        raise _NotAPrior(f"hop(s) {', '.join(skipped)} did not train: it did not run its plan")
    plan = _candidate_of_hops(study.space, hops, study.encoding.name)
    metric = template.metric
    final: dict[str, pb.EvaluationStatus] = {}
    for row in run.evaluations:  # oldest first: a later evaluation replaces an earlier one
        if (
            row.split == "validation"
            and row.status == "done"
            and row.checkpoint_sha256 == run.final_sha256
            and metric in row.metrics
        ):
            final[row.site] = row
    missing = [site for site in plan.sites if site not in final]
    if missing:
        raise _NotAPrior(
            f"no finished validation evaluation of its final checkpoint with {metric!r} at "
            + ", ".join(missing)
        )
    scores = tuple(
        SiteScore(
            site,
            value=float(final[site].metrics[metric]),
            examples=int(final[site].metrics.get("examples", 0)),
            folds=int(final[site].metrics.get("folds", 1)),
        )
        for site in plan.sites
    )
    intermediate: list[tuple[int, float]] = []
    for cycle in range(plan.cycles):
        cycle_hops = RunExecutor._cycle_hops(run, cycle, len(plan.order))
        if all(metric in hop.metrics for hop in cycle_hops):
            intermediate.append(
                (cycle, statistics.fmean(float(hop.metrics[metric]) for hop in cycle_hops))
            )
    return plan, TrialOutcome(scores, RunExecutor._cost(run, plan), tuple(intermediate))


def _candidate_of_hops(
    space: SearchSpace, hops: Sequence[tuple[str, HyperparameterSpec]], encoding: str
) -> CandidatePlan:
    """The plan of `space` whose hops are `hops`.

    Raises:
        SearchSpaceError: If no plan of the space has these hops; the message says why.
    """
    n = len(space.sites)
    if not hops or len(hops) % n:
        raise SearchSpaceError(f"{len(hops)} hop(s) are not whole cycles over {n} sites")
    sites = [site for site, _ in hops]
    orders = [tuple(sites[start : start + n]) for start in range(0, len(sites), n)]
    for cycle, order in enumerate(orders):
        if sorted(order) != sorted(space.sites):
            raise SearchSpaceError(
                f"cycle {cycle} visits {list(order)}, not each of {sorted(space.sites)} once"
            )
    rates = [spec.learning_rate for _, spec in hops]
    if len(rates) == 1:
        allowed = space.learning_rate_decay
        decay = (
            (1.0 if allowed.low <= 1.0 <= allowed.high else allowed.low)
            if isinstance(allowed, FloatRange)
            else float(allowed)
        )
    else:
        decay = rates[1] / rates[0]
        if not all(
            math.isclose(later / earlier, decay, rel_tol=1e-9)
            for earlier, later in itertools.pairwise(rates)
        ):
            raise SearchSpaceError("its learning rate does not change by one factor per hop")
        if not isinstance(space.learning_rate_decay, FloatRange) and math.isclose(
            decay, space.learning_rate_decay, rel_tol=1e-9
        ):
            decay = float(space.learning_rate_decay)
    first = hops[0][1]
    if first.epochs and not float(first.epochs).is_integer():
        raise SearchSpaceError(f"its visits last {first.epochs:g} epochs, not a whole number")
    base = HopHyperparameters(
        learning_rate=first.learning_rate,
        steps=first.steps,
        batch_size=first.batch_size,
        weight_decay=first.weight_decay,
        warmup_steps=first.warmup_steps,
        max_grad_norm=first.max_grad_norm,
        seed=first.seed,
        epochs=int(first.epochs) if first.epochs else None,
        # The coordinator sends 0 when a plan leaves the proximal term out.
        proximal_mu=(
            None if first.proximal_mu == 0.0 and space.proximal_mu is None else first.proximal_mu
        ),
    )
    first_visit = {site: spec.steps for site, spec in reversed(hops)}
    plan = CandidatePlan.build(
        orders,
        base,
        learning_rate_decay=decay,
        steps_by_site=first_visit if len(set(first_visit.values())) > 1 else {},
        encoding=encoding,
    )
    for k, (hop, (_, spec)) in enumerate(zip(plan.hops, hops, strict=True)):
        actual = spec.model_dump()
        expected = HyperparameterSpec.model_validate(hop.hyperparameters.as_dict()).model_dump()
        differing = [
            f"{name} {actual[name]:g} (the space's schedule: {expected[name]:g})"
            for name in actual
            if actual[name] != expected[name]
            # The rate is rebuilt as rate * decay**k from the inferred decay: equal up to rounding.
            and not (name == "learning_rate" and math.isclose(actual[name], expected[name]))
        ]
        if differing:
            raise SearchSpaceError(f"hop {k} trains with " + ", ".join(differing))
    space.params_for(plan, None)  # ranges and fixed values
    return plan


def heuristic_seed_orders(
    train_examples: Mapping[str, int], sites: Sequence[str]
) -> list[tuple[str, ...]]:
    """Seed orders from what the sites already told the coordinator: their training-set sizes.

    Sequential training forgets early visits most, so the first seed puts the largest site last
    (smallest first); the second is its reverse, a contrasting starting point for the sampler.
    Ties are broken by site name.

    Args:
        train_examples: Training examples per site (from the sites' Hello).
        sites: The sites to order; a site with no count is treated as empty.
    """
    ascending = tuple(sorted(sites, key=lambda site: (train_examples.get(site, 0), site)))
    descending = tuple(reversed(ascending))
    return [ascending] if ascending == descending else [ascending, descending]


def train_examples_by_site(client: AdminClient, dataset: str) -> dict[str, int]:
    """Each connected site's training-set size for `dataset`, as reported at its Hello."""
    sizes: dict[str, int] = {}
    for site in client.sites():
        for summary in site.datasets:
            if summary.name == dataset:
                sizes[site.name] = int(summary.train_examples)
    return sizes


def cross_site_probe(
    client: AdminClient,
    template: RunTemplate,
    sites: Sequence[str],
    hyperparameters: HopHyperparameters,
    *,
    run_name: str = "probe",
    poll_seconds: float = 0.25,
    timeout: float = 3600.0,
) -> dict[tuple[str, str], float]:
    """A cheap cross-site probe: each site trains briefly from scratch, every site scores it.

    Each probe is a real one-hop run at one site (under the template's bundle, so a study's
    approval covers it), then every site of `sites` scores that run's model on its own
    validation data (the cross-validated score for a cross-validation template). Test splits
    are never asked for. `ordering.probe_order` turns the result into a seed order.

    Args:
        client: An admin connection.
        template: The study's run template (dataset, task, metric, bounds...).
        sites: The sites to probe.
        hyperparameters: The probe visit's settings (short: it only has to tell sites apart).
        run_name: Prefix of the probe runs' names.
        poll_seconds: How often runs are polled.
        timeout: Seconds allowed for each probe run and its evaluations.

    Returns:
        ``scores[(trained_at, evaluated_at)]``: the template's metric.

    Raises:
        TrialRunError: If a probe run or one of its evaluations fails.
    """
    scores: dict[tuple[str, str], float] = {}
    for site in sites:
        plan = template.run_plan(
            CandidatePlan.build([(site,)], hyperparameters), name=f"{run_name}: {site}"
        )
        run_id = client.start_run(plan)
        deadline = time.monotonic() + timeout
        while (run := client.run(run_id)).status not in TERMINAL_RUN_STATES:
            if time.monotonic() > deadline:
                client.control(run_id, "abort", "probe took too long")
                raise TrialRunError(f"probe run {run_id} at {site} did not finish")
            time.sleep(poll_seconds)
        if run.status != "completed":
            raise TrialRunError(f"probe run {run_id} at {site} {run.status}: {run.error}")
        wanted = set(client.evaluate_run(run_id, "validation", list(sites)))
        try:
            run = client.wait_for_evaluations(run_id, timeout)
        except TimeoutError as exc:
            raise TrialRunError(str(exc)) from exc
        for row in run.evaluations:
            if row.evaluation_id not in wanted:
                continue
            if row.status != "done" or template.metric not in row.metrics:
                raise TrialRunError(
                    f"{row.site} could not score the probe trained at {site}: "
                    f"{row.error or 'no ' + template.metric}"
                )
            scores[(site, row.site)] = float(row.metrics[template.metric])
        logger.info("probe at %s scored by %d sites", site, len(wanted))
    return scores
