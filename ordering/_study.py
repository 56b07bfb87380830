"""OrderingStudy: an Optuna study over candidate plans, one Optuna study per budget stage."""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any, Literal

import optuna
from optuna.trial import FrozenTrial, TrialState, create_trial

from ordering._encodings import (
    ParamValue,
    PermutationEncoding,
    default_encoding,
    encoding_by_name,
)
from ordering._objective import (
    AGGREGATIONS,
    FAILURE_REASON_ATTR,
    Aggregation,
    Direction,
    PlanExecutor,
    PlanFailed,
    PlanPruned,
    Reporter,
    SiteScore,
    TrialOutcome,
    aggregate,
    objective_values,
)
from ordering._plan import CandidatePlan
from ordering._pruning import STAGE_ATTR, PruningSettings, cycle_end_steps, stage_key
from ordering._samplers import RandomOrderSampler, alternative_sampler
from ordering._space import SearchSpace, SearchSpaceError

__all__ = ["DEFAULT_PRUNING", "OrderingStudy", "StudyMismatch", "TrialRecord"]

logger = logging.getLogger(__name__)

DEFAULT_PRUNING = PruningSettings()
SamplerName = Literal["tpe", "random", "random-order", "gp", "cmaes", "qmc"]
SAMPLERS: tuple[SamplerName, ...] = ("tpe", "random", "random-order", "gp", "cmaes", "qmc")

# The Optuna constraint of a study with a forgetting limit: worst-site forgetting minus the
# limit (<= 0 is feasible), set with ``Trial.set_constraint``; TPE and GP model it.
CONSTRAINT_KEY = "worst_site_forgetting"
_HOP_VALUES_ATTR = "hop_values"  # [hop index, value] reported after single hops
_META_ATTR = "baton.ordering"  # study user attribute describing what the study searches
_SCHEMA = 1
_FULL = 1.0


class StudyMismatch(ValueError):
    """An existing study of that name searches something else than what was asked for."""


def _stage_study_name(study_name: str, budget: float) -> str:
    return study_name if budget == _FULL else f"{study_name}@budget={budget:g}"


def _check_budget(budget: float) -> float:
    budget = float(budget)
    if not (math.isfinite(budget) and 0.0 < budget <= 1.0):
        raise ValueError(f"a budget fraction must be within (0, 1], got {budget}")
    # Six significant digits, as in the stage's study name, so a stage is found again by it.
    return float(f"{budget:g}")


@dataclass(frozen=True)
class TrialRecord:
    """One trial as stored: what ran, what it scored and what it cost.

    Attributes:
        study_name: The Optuna study holding the trial (one per budget stage).
        number: The trial number within that study.
        state: "COMPLETE", "PRUNED", "FAIL", "RUNNING" or "WAITING".
        values: The objective value(s), when complete.
        plan: The plan the trial ran (None for a waiting trial).
        site_scores: Per-site scores (empty unless complete).
        cost_seconds_by_site: Compute seconds per site.
        budget_fraction: The fraction of the full budget the trial ran with.
        intermediate: (cycle, value) reported after each full cycle.
        hop_values: (hop index in the plan, value) reported after single hops, when the
            executor reports per hop. Optuna stores every value at step = the hop index after
            which it was measured (a cycle's value at its last hop), so steps mean the same
            thing in every trial of a stage.
        params: The Optuna parameters.
        error: Why the trial failed, when it did.
        duplicate_of: The earlier trial of the same stage with the identical plan whose result
            this trial reuses instead of running the plan again.
        warm_start: Set for a trial recorded from a run made before the trial (`add_prior`):
            the note naming that run. Its compute cost was paid by that run, not the study.
        failure_reason: Why the executor declared the finished run a failure (a collapsed or
            diverged model); such a trial is FAIL and never selected or reused.
        forgetting: Site -> drop from its best post-visit score to its final score, when the
            executor reported scores after each visit.
    """

    study_name: str
    number: int
    state: str
    values: tuple[float, ...] | None
    plan: CandidatePlan | None
    site_scores: tuple[SiteScore, ...]
    cost_seconds_by_site: Mapping[str, float]
    budget_fraction: float
    intermediate: tuple[tuple[int, float], ...] = ()
    hop_values: tuple[tuple[int, float], ...] = ()
    params: Mapping[str, Any] = field(default_factory=dict)
    error: str | None = None
    duplicate_of: int | None = None
    warm_start: str | None = None
    failure_reason: str | None = None
    forgetting: Mapping[str, float] = field(default_factory=dict)

    @property
    def worst_forgetting(self) -> float | None:
        """The largest site's forgetting, when measured."""
        return max(self.forgetting.values()) if self.forgetting else None

    @property
    def value(self) -> float | None:
        """The first objective value."""
        return None if self.values is None else self.values[0]

    @property
    def compute_seconds(self) -> float:
        """Total compute seconds across sites."""
        return float(sum(self.cost_seconds_by_site.values()))

    @classmethod
    def from_frozen_trial(
        cls, study_name: str, trial: FrozenTrial, budget_fraction: float = _FULL
    ) -> TrialRecord:
        """Reads a record back from a stored trial of the stage with `budget_fraction`."""
        attrs = trial.user_attrs
        plan = attrs.get("plan")
        return cls(
            study_name=study_name,
            number=trial.number,
            state=trial.state.name,
            values=tuple(trial.values) if trial.values is not None else None,
            plan=CandidatePlan.from_json_dict(plan) if plan is not None else None,
            site_scores=tuple(SiteScore(**score) for score in attrs.get("site_scores", ())),
            cost_seconds_by_site=MappingProxyType(dict(attrs.get("cost_seconds_by_site", {}))),
            budget_fraction=float(attrs.get("budget_fraction", budget_fraction)),
            intermediate=tuple((int(c), float(v)) for c, v in attrs.get("intermediate", ())),
            hop_values=tuple((int(h), float(v)) for h, v in attrs.get(_HOP_VALUES_ATTR, ())),
            params=MappingProxyType(dict(trial.params)),
            error=attrs.get("error"),
            duplicate_of=attrs.get("duplicate_of"),
            warm_start=attrs.get("warm_start"),
            failure_reason=attrs.get(FAILURE_REASON_ATTR),
            forgetting=MappingProxyType(dict(attrs.get("forgetting", {}))),
        )


@dataclass(frozen=True)
class _KnownOutcome:
    """A `PlanExecutor` for a plan that has already run: its outcome, at no compute cost."""

    outcome: TrialOutcome

    def execute(self, plan: CandidatePlan, *, budget: float, report: Reporter) -> TrialOutcome:
        return dataclasses.replace(self.outcome, cost_seconds_by_site={})


class _Stage:
    """One budget fraction's Optuna study."""

    def __init__(self, budget: float, study: optuna.Study) -> None:
        self.budget = budget
        self.study = study


class OrderingStudy:
    """A search over site order and hyperparameters, stored in Optuna.

    Full-budget trials live in the Optuna study named `study_name` (what optuna-dashboard
    shows); reduced-budget probe trials live in sibling studies named
    ``"<study_name>@budget=<fraction>"``, so neither the sampler, the pruner nor best-plan
    selection ever compares values obtained with different budgets. Within a study the pruner
    further compares only trials with the same number of cycles.

    Build one with `create` (or `load` for an existing study).
    """

    def __init__(
        self,
        *,
        storage: optuna.storages.BaseStorage,
        study_name: str,
        space: SearchSpace,
        encoding: PermutationEncoding,
        aggregation: Aggregation,
        direction: Direction,
        multi_objective: bool,
        seed: int | None,
        sampler: SamplerName,
        pruning: PruningSettings | None,
        n_startup_trials: int,
        max_forgetting: float | None = None,
        forgetting_tolerance: float | None = None,
    ) -> None:
        self._storage = storage
        self.study_name = study_name
        self.space = space
        self.encoding = encoding
        self.aggregation: Aggregation = aggregation
        self.direction: Direction = direction
        self.multi_objective = multi_objective
        self._seed = seed
        self._sampler_name: SamplerName = sampler
        self._pruning = None if multi_objective else pruning
        self._n_startup_trials = n_startup_trials
        self.max_forgetting = max_forgetting
        self.forgetting_tolerance = forgetting_tolerance
        self._stages: dict[float, _Stage] = {}

    @classmethod
    def create(
        cls,
        storage_url: str | None,
        study_name: str,
        space: SearchSpace,
        encoding: PermutationEncoding | str = "auto",
        aggregation: Aggregation = "mean",
        direction: Direction = "maximize",
        *,
        seed: int | None = None,
        sampler: SamplerName = "tpe",
        pruning: PruningSettings | None = DEFAULT_PRUNING,
        multi_objective: bool = False,
        bounds: Mapping[str, tuple[float, float]] | None = None,
        n_startup_trials: int | None = None,
        max_forgetting: float | None = None,
        forgetting_tolerance: float | None = None,
    ) -> OrderingStudy:
        """Creates the study, or reopens it (with its trials) if one of that name exists.

        Args:
            storage_url: An SQLAlchemy URL Optuna can store studies in (``sqlite:///x.db``,
                ``postgresql+psycopg://...``), or None for an in-memory study.
            study_name: The Optuna study name of the full-budget trials.
            space: What the search may vary.
            encoding: The permutation encoding (an instance or its name); "auto" picks the one
                measured fastest for the number of sites (`default_encoding`).
            aggregation: How per-site scores become the objective: "mean", "weighted", "worst".
            direction: "maximize" for scores such as accuracy, "minimize" for losses.
            seed: Sampler seed.
            sampler: "tpe" (the search), "random" (the random-search baseline) or
                "random-order" (TPE over the hyperparameters, a uniformly random order every
                trial: the tuned random-order baseline); "gp", "cmaes" or "qmc" for Optuna's
                Gaussian-process (needs torch), CMA-ES (needs the ``cmaes`` package; pair it
                with the "random-keys" encoding) and quasi-Monte-Carlo samplers.
            pruning: Pruning settings, or None for no pruning. Ignored for multi-objective
                studies (Optuna cannot prune them).
            multi_objective: Optimise (aggregation, worst site) jointly.
            bounds: The hyperparameter bounds the sites approved; the space must stay within.
            n_startup_trials: Random trials before TPE starts modelling; by default 3.
            max_forgetting: A limit on the worst site's forgetting (its best post-visit score
                minus its final score, `TrialOutcome.forgetting`), or None for none. A trial
                above it is infeasible: it is stored as the trial's Optuna constraint (which
                the TPE, GP and random-order samplers model), and `best_plan` picks the best
                feasible trial (the least-forgetting one when none is feasible). The executor
                must then report visit scores.
            forgetting_tolerance: Selection only: among the completed trials whose value is
                within this much of the best one (of the feasible ones, with a limit), pick
                the one whose worst site forgets least (then by value). None picks the best
                value. Unlike a hard limit it never gives up more than the tolerance of the
                objective; the executor must report visit scores.

        Raises:
            SearchSpaceError: If the space leaves `bounds`.
            StudyMismatch: If a study of that name exists but searches something else.
        """
        if encoding == "auto":
            encoding = default_encoding(len(space.sites))
        elif isinstance(encoding, str):
            encoding = encoding_by_name(encoding)
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"unknown aggregation {aggregation!r}")
        if direction not in ("maximize", "minimize"):
            raise ValueError(f"direction must be 'maximize' or 'minimize', got {direction!r}")
        if multi_objective and aggregation == "worst":
            raise ValueError("multi-objective studies pair the aggregation with 'worst'; "
                             "choose 'mean' or 'weighted'")  # fmt: skip
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
        if bounds is not None:
            space.check_within(bounds)
        if max_forgetting is not None and not (math.isfinite(max_forgetting)
                                               and max_forgetting >= 0):  # fmt: skip
            raise ValueError(f"max_forgetting must be a finite value >= 0, got {max_forgetting}")
        if max_forgetting is not None and multi_objective:
            raise ValueError("a forgetting limit applies to single-objective studies")
        if forgetting_tolerance is not None and not (
            math.isfinite(forgetting_tolerance) and forgetting_tolerance >= 0
        ):
            raise ValueError(
                f"forgetting_tolerance must be a finite value >= 0, got {forgetting_tolerance}"
            )
        if forgetting_tolerance is not None and multi_objective:
            raise ValueError("a forgetting tolerance applies to single-objective studies")
        storage: optuna.storages.BaseStorage = (
            optuna.storages.InMemoryStorage()
            if storage_url is None
            else optuna.storages.RDBStorage(storage_url)
        )
        study = cls(
            storage=storage,
            study_name=study_name,
            space=space,
            encoding=encoding,
            aggregation=aggregation,
            direction=direction,
            multi_objective=multi_objective,
            seed=seed,
            sampler=sampler,
            pruning=pruning,
            n_startup_trials=(
                # 3 random trials before TPE models beat n-sites on every measured objective
                # (benchmarks/ordering_search.py, 4 and 6 sites).
                3 if n_startup_trials is None else n_startup_trials
            ),
            max_forgetting=max_forgetting,
            forgetting_tolerance=forgetting_tolerance,
        )
        study._stage(_FULL)
        return study

    @classmethod
    def load(
        cls,
        storage_url: str,
        study_name: str,
        *,
        seed: int | None = None,
        sampler: SamplerName = "tpe",
        pruning: PruningSettings | None = DEFAULT_PRUNING,
        n_startup_trials: int | None = None,
        max_forgetting: float | None = None,
        forgetting_tolerance: float | None = None,
    ) -> OrderingStudy:
        """Reopens an existing study with the space, encoding and objective it was created with.

        Raises:
            StudyMismatch: If the stored study was not created by `OrderingStudy`.
            KeyError: If there is no study of that name.
        """
        storage = optuna.storages.RDBStorage(storage_url)
        existing = optuna.load_study(study_name=study_name, storage=storage)
        meta = existing.user_attrs.get(_META_ATTR)
        if not isinstance(meta, dict) or meta.get("schema") != _SCHEMA:
            raise StudyMismatch(f"study {study_name!r} was not created by OrderingStudy")
        return cls.create(
            storage_url,
            study_name,
            SearchSpace.from_json_dict(meta["space"]),
            meta["encoding"],
            meta["aggregation"],
            meta["direction"],
            seed=seed,
            sampler=sampler,
            pruning=pruning,
            multi_objective=bool(meta["multi_objective"]),
            n_startup_trials=n_startup_trials,
            max_forgetting=max_forgetting,
            forgetting_tolerance=forgetting_tolerance,
        )

    # -- stages ---------------------------------------------------------------------------

    def _metadata(self) -> dict[str, Any]:
        return {
            "schema": _SCHEMA,
            "space": self.space.to_json_dict(),
            "encoding": self.encoding.name,
            "aggregation": self.aggregation,
            "direction": self.direction,
            "multi_objective": self.multi_objective,
        }

    def _new_sampler(self) -> optuna.samplers.BaseSampler:
        if self._sampler_name == "random":
            return optuna.samplers.RandomSampler(seed=self._seed)
        if self._sampler_name == "random-order":
            return RandomOrderSampler(seed=self._seed, n_startup_trials=self._n_startup_trials)
        if self._sampler_name in ("gp", "cmaes", "qmc"):
            return alternative_sampler(self._sampler_name, self._seed, self._n_startup_trials)
        # Optuna 5 defaults: multivariate TPE for one objective, independent TPE for two.
        return optuna.samplers.TPESampler(seed=self._seed, n_startup_trials=self._n_startup_trials)

    def _stage(self, budget: float) -> _Stage:
        budget = _check_budget(budget)
        if budget in self._stages:
            return self._stages[budget]
        name = _stage_study_name(self.study_name, budget)
        study = optuna.create_study(
            storage=self._storage,
            study_name=name,
            sampler=self._new_sampler(),
            pruner=self._pruning.pruner() if self._pruning else optuna.pruners.NopPruner(),
            directions=[self.direction] * (2 if self.multi_objective else 1),
            load_if_exists=True,
        )
        meta = {**self._metadata(), "budget_fraction": budget}
        stored = study.user_attrs.get(_META_ATTR)
        if stored is None:
            if study.trials:
                raise StudyMismatch(f"study {name!r} exists and was not created by OrderingStudy")
            study.set_user_attr(_META_ATTR, meta)
            logger.info("created ordering study %r (budget %g)", name, budget)
        elif stored != meta:
            differing = sorted(k for k in meta if stored.get(k) != meta[k])
            raise StudyMismatch(
                f"study {name!r} exists with a different {', '.join(differing)}; "
                "use another study name or the stored settings (OrderingStudy.load)"
            )
        else:
            logger.info("reopened ordering study %r with %d trials", name, len(study.trials))
        stage = _Stage(budget, study)
        self._stages[budget] = stage
        return stage

    def _stage_budgets(self) -> list[float]:
        """Every budget stage stored for this study, full budget first."""
        prefix = f"{self.study_name}@budget="
        budgets = {_FULL}
        for summary in optuna.get_all_study_names(storage=self._storage):
            if summary.startswith(prefix):
                budgets.add(float(summary[len(prefix) :]))
        return sorted(budgets, reverse=True)

    @property
    def optuna_study(self) -> optuna.Study:
        """The Optuna study of the full-budget trials (for plots and the dashboard)."""
        return self._stage(_FULL).study

    # -- seeding --------------------------------------------------------------------------

    def params_for(self, candidate: Sequence[str] | CandidatePlan) -> dict[str, ParamValue]:
        """The trial parameters that reproduce an order or a plan in this study."""
        if isinstance(candidate, CandidatePlan):
            return self.space.params_for(candidate, self.encoding)
        order = tuple(candidate)
        if self.space.reshuffle_each_cycle:
            params: dict[str, ParamValue] = {}
            for c in range(self.space.max_cycles):
                params.update(self.encoding.encode(order, self.space.sites, prefix=f"cycle{c}_"))
            return params
        return self.encoding.encode(order, self.space.sites)

    def enqueue(
        self,
        *candidates: Sequence[str] | CandidatePlan,
        budget: float = _FULL,
        note: str = "seed",
    ) -> None:
        """Queues orders or plans to be tried next (heuristic seeds, warm starts).

        An order fixes only the order (every cycle); the sampler picks the other values. A plan
        fixes everything. Candidates already tried or queued are skipped.

        Args:
            candidates: Orders (sequences of site names) or plans of this space.
            budget: The stage to queue them in.
            note: Stored as the trials' ``"enqueued"`` user attribute.

        Raises:
            SearchSpaceError: If a plan does not fit the space.
            ValueError: If an order is not a permutation of the space's sites.
        """
        stage = self._stage(budget)
        for candidate in candidates:
            stage.study.enqueue_trial(
                self.params_for(candidate), user_attrs={"enqueued": note}, skip_if_exists=True
            )

    def add_prior(
        self, plan: CandidatePlan, outcome: TrialOutcome, *, note: str = "warm start"
    ) -> TrialRecord:
        """Records a plan that has already run as a completed full-budget trial; runs nothing.

        A warm start from runs made before the search (an earlier study's trials, hand-made
        runs of the same data and task). The trial takes the path of a trial that ran, with
        the plan's parameters fixed, so its site scores, objectives, intermediate values and
        plan are stored alike: the sampler learns from it, `best_plan` may pick it, and a later
        trial proposing the same plan reuses its result. Its compute cost is recorded as 0
        (the earlier run paid it; its seconds are kept in the trial's
        ``"warm_start_cost_seconds_by_site"`` user attribute). A plan the study already holds
        is recorded again, as another sample of it.

        Args:
            plan: The plan that ran: one this study's space can propose.
            outcome: What it scored and cost.
            note: Stored as the trial's ``"warm_start"`` user attribute (e.g. naming the run).

        Raises:
            SearchSpaceError: If the plan does not fit the space.
            ValueError: If the outcome scores a site the plan does not visit, reports a cycle
                the plan does not have, or has a non-finite objective.
        """
        params = self.params_for(plan)
        unknown = {score.site for score in outcome.site_scores} - set(plan.sites)
        if unknown:
            raise ValueError(f"the outcome scores sites the plan does not visit: {sorted(unknown)}")
        if any(not 0 <= cycle < plan.cycles for cycle, _ in outcome.intermediate):
            raise ValueError(f"the outcome reports cycles outside the plan's {plan.cycles}")
        values = objective_values(outcome, self.aggregation, self.direction, self.multi_objective)
        if not all(math.isfinite(v) for v in values):
            raise ValueError(f"the outcome's objective is not finite: {values}")
        stage = self._stage(_FULL)
        # Created running with its parameters fixed rather than queued: `ask` pops the oldest
        # queued trial, which may be a seed queued earlier or be taken by another worker. Made
        # through the study's own storage (Optuna wraps an RDB storage in a cache per study), as
        # `Study.ask` makes its trials.
        template = create_trial(
            state=TrialState.RUNNING,
            system_attrs={"fixed_params": params},
            user_attrs={
                "warm_start": note,
                "warm_start_cost_seconds_by_site": {
                    site: float(seconds) for site, seconds in outcome.cost_seconds_by_site.items()
                },
            },
        )
        storage = stage.study._storage
        trial_id = storage.create_new_trial(stage.study._study_id, template_trial=template)
        trial = optuna.Trial(stage.study, trial_id)
        record = self._run_trial(
            stage, _KnownOutcome(outcome), (), reuse_duplicates=False, trial=trial, expected=plan
        )
        logger.info("%s trial %d recorded from an earlier run (%s)",
                    stage.study.study_name, record.number, note)  # fmt: skip
        return record

    # -- running --------------------------------------------------------------------------

    def optimize(
        self,
        executor: PlanExecutor,
        n_trials: int | None = None,
        budget_per_trial: float = _FULL,
        timeout: float | None = None,
        *,
        max_compute_seconds: float | None = None,
        catch: tuple[type[Exception], ...] = (),
        reuse_duplicates: bool = True,
    ) -> list[TrialRecord]:
        """Runs trials until a limit is reached; returns the records of the trials it ran.

        Args:
            executor: Runs each plan.
            n_trials: Stop after this many trials.
            budget_per_trial: The budget fraction every trial runs with (< 1: probe trials,
                kept in their own stage).
            timeout: Stop starting trials after this many wall-clock seconds.
            max_compute_seconds: Stop starting trials once the trials run by this call have
                cost this many compute seconds, summed over sites (checked between trials;
                `compute_seconds()` gives the study-wide total).
            catch: Exceptions from the executor that fail the trial but not the search. Others
                fail the trial and propagate.
            reuse_duplicates: When the sampler proposes a plan that already completed in this
                stage, record the earlier result (at no compute cost) instead of running it
                again. Small site counts make such repeats common; turn it off when the
                executor is noisy and repeats are wanted as fresh samples.
        """
        if n_trials is None and timeout is None and max_compute_seconds is None:
            raise ValueError("give n_trials, timeout or max_compute_seconds (or several)")
        stage = self._stage(budget_per_trial)
        started = time.monotonic()
        spent = 0.0
        records: list[TrialRecord] = []
        while True:
            if n_trials is not None and len(records) >= n_trials:
                break
            if timeout is not None and time.monotonic() - started >= timeout:
                break
            if max_compute_seconds is not None and spent >= max_compute_seconds:
                break
            record = self._run_trial(stage, executor, catch, reuse_duplicates)
            records.append(record)
            spent += record.compute_seconds
        return records

    def _run_trial(
        self,
        stage: _Stage,
        executor: PlanExecutor,
        catch: tuple[type[Exception], ...],
        reuse_duplicates: bool,
        *,
        trial: optuna.Trial | None = None,
        expected: CandidatePlan | None = None,
    ) -> TrialRecord:
        """Runs one trial (`trial`, else a new one); its plan must be `expected` if given."""
        study = stage.study
        if trial is None:
            trial = study.ask()
        try:
            plan = self.space.suggest_plan(trial, self.encoding)
            if expected is not None and replace(expected, encoding=plan.encoding) != plan:
                raise SearchSpaceError(
                    f"the trial's parameters build {plan.describe()}, not the given plan "
                    f"{expected.describe()}"
                )
        except BaseException as exc:
            trial.set_user_attr("error", f"cannot build a plan: {exc}")
            study.tell(trial, state=TrialState.FAIL)
            raise
        trial.set_user_attr("budget_fraction", stage.budget)
        trial.set_user_attr(STAGE_ATTR, stage_key(stage.budget, plan.cycles))
        trial.set_user_attr("plan", plan.to_json_dict())
        trial.set_user_attr("order", plan.describe())
        if reuse_duplicates:
            twin = self._completed_twin(stage, plan)
            if twin is not None:
                return self._reuse(stage, trial, twin, plan)
        reported: dict[int, float] = {}
        hop_values: dict[int, float] = {}
        ends = cycle_end_steps(plan)
        steps: set[int] = set()
        warmup = 0 if self._pruning is None else self._pruning.n_warmup_cycles

        def report(cycle: int, value: float, *, hop: int | None = None) -> None:
            cycle, value = int(cycle), float(value)
            if cycle < 0 or cycle >= plan.cycles:
                raise ValueError(f"cycle {cycle} is outside the plan's {plan.cycles} cycles")
            step = ends[cycle]
            if hop is not None:
                step, first = int(hop), ends[cycle - 1] + 1 if cycle else 0
                if not first <= step <= ends[cycle]:
                    raise ValueError(
                        f"hop {step} is not in cycle {cycle} of the plan (its hops {first} to "
                        f"{ends[cycle]})"
                    )
                hop_values[step] = value
            if step == ends[cycle]:
                reported.setdefault(cycle, value)
            if self.multi_objective or step in steps:
                return  # Optuna cannot prune multi-objective trials; values are still stored.
            steps.add(step)
            trial.report(value, step)
            # After the last hop the run is paid for: keep its result whatever the pruner says.
            if cycle >= warmup and step < ends[-1] and trial.should_prune():
                raise PlanPruned(
                    f"trial {trial.number} pruned after hop {step} (cycle {cycle})"
                    if hop is not None
                    else f"trial {trial.number} pruned after cycle {cycle}"
                )

        began = time.monotonic()
        try:
            outcome = executor.execute(plan, budget=stage.budget, report=report)
        except PlanPruned as exc:
            cost = exc.cost_seconds_by_site or {"(unattributed)": time.monotonic() - began}
            self._store_run(trial, cost, reported, hop_values)
            study.tell(trial, state=TrialState.PRUNED)
            logger.info("%s trial %d pruned: %s", study.study_name, trial.number, plan.describe())
            return self._record(stage, trial.number)
        except PlanFailed as exc:
            cost = exc.cost_seconds_by_site or {"(unattributed)": time.monotonic() - began}
            self._store_run(trial, cost, reported, hop_values)
            trial.set_user_attr(FAILURE_REASON_ATTR, exc.reason)
            trial.set_user_attr("error", exc.reason)
            study.tell(trial, state=TrialState.FAIL)
            logger.warning("%s trial %d failed: %s", study.study_name, trial.number, exc.reason)
            return self._record(stage, trial.number)
        except BaseException as exc:
            self._store_run(
                trial, {"(unattributed)": time.monotonic() - began}, reported, hop_values
            )
            trial.set_user_attr("error", f"{type(exc).__name__}: {exc}")
            study.tell(trial, state=TrialState.FAIL)
            if isinstance(exc, catch):
                logger.warning("%s trial %d failed: %s", study.study_name, trial.number, exc)
                return self._record(stage, trial.number)
            raise
        try:
            self._store_outcome(trial, plan, outcome, reported, hop_values, steps)
            values = objective_values(
                outcome, self.aggregation, self.direction, self.multi_objective
            )
        except ValueError as exc:  # an outcome the executor should not have returned
            trial.set_user_attr("error", f"invalid outcome: {exc}")
            study.tell(trial, state=TrialState.FAIL)
            raise
        if outcome.failure_reason is not None:
            # A collapsed or diverged model ran to the end but must never be the best plan,
            # the twin a duplicate reuses, nor the settings a baseline inherits.
            trial.set_user_attr(FAILURE_REASON_ATTR, outcome.failure_reason)
            trial.set_user_attr("error", outcome.failure_reason)
            study.tell(trial, state=TrialState.FAIL)
            logger.warning("%s trial %d failed: %s", study.study_name, trial.number,
                           outcome.failure_reason)  # fmt: skip
        elif not all(math.isfinite(v) for v in values):
            trial.set_user_attr("error", f"non-finite objective {values}")
            study.tell(trial, state=TrialState.FAIL)
            logger.warning("%s trial %d scored %s", study.study_name, trial.number, values)
        else:
            study.tell(trial, list(values))
            logger.info("%s trial %d: %s -> %s", study.study_name, trial.number,
                        plan.describe(), ", ".join(f"{v:.4f}" for v in values))  # fmt: skip
        return self._record(stage, trial.number)

    @staticmethod
    def _completed_twin(stage: _Stage, plan: CandidatePlan) -> FrozenTrial | None:
        wanted = plan.to_json_dict()
        for earlier in stage.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            if (
                earlier.user_attrs.get("plan") == wanted
                and "duplicate_of" not in earlier.user_attrs
            ):
                return earlier
        return None

    def _reuse(
        self, stage: _Stage, trial: optuna.Trial, twin: FrozenTrial, plan: CandidatePlan
    ) -> TrialRecord:
        for key in (
            "site_scores",
            "objectives",
            "intermediate",
            _HOP_VALUES_ATTR,
            "visit_scores",
            "forgetting",
        ):
            if key in twin.user_attrs:
                trial.set_user_attr(key, twin.user_attrs[key])
        for name, value in twin.constraints.items():
            trial.set_constraint(name, value)
        trial.set_user_attr("cost_seconds_by_site", {})
        trial.set_user_attr("compute_seconds", 0.0)
        trial.set_user_attr("duplicate_of", twin.number)
        if not self.multi_objective:
            if twin.user_attrs.get(STAGE_ATTR) == trial.user_attrs.get(STAGE_ATTR):
                for step, value in sorted(twin.intermediate_values.items()):
                    trial.report(value, step)
            else:  # stored before steps were hop indices: its per-cycle values at their hops
                ends = cycle_end_steps(plan)
                for cycle, value in twin.user_attrs.get("intermediate", []):
                    if 0 <= int(cycle) < len(ends):
                        trial.report(float(value), ends[int(cycle)])
        assert twin.values is not None
        stage.study.tell(trial, list(twin.values))
        logger.info("%s trial %d repeats trial %d; reusing its result",
                    stage.study.study_name, trial.number, twin.number)  # fmt: skip
        return self._record(stage, trial.number)

    def _store_run(
        self,
        trial: optuna.Trial,
        cost: Mapping[str, float],
        reported: Mapping[int, float],
        hop_values: Mapping[int, float],
    ) -> None:
        trial.set_user_attr("cost_seconds_by_site", {k: float(v) for k, v in cost.items()})
        trial.set_user_attr("compute_seconds", float(sum(cost.values())))
        trial.set_user_attr("intermediate", sorted([c, v] for c, v in reported.items()))
        if hop_values:
            trial.set_user_attr(_HOP_VALUES_ATTR, sorted([h, v] for h, v in hop_values.items()))

    def _store_outcome(
        self,
        trial: optuna.Trial,
        plan: CandidatePlan,
        outcome: TrialOutcome,
        reported: dict[int, float],
        hop_values: Mapping[int, float],
        steps: set[int],
    ) -> None:
        unknown = {score.site for score in outcome.site_scores} - set(plan.sites)
        if unknown:
            raise ValueError(f"executor scored sites the plan does not visit: {sorted(unknown)}")
        ends = cycle_end_steps(plan)
        for cycle, value in outcome.intermediate:
            if not 0 <= cycle < plan.cycles:
                raise ValueError(f"cycle {cycle} is outside the plan's {plan.cycles} cycles")
            if cycle not in reported:
                reported[cycle] = value
                if not self.multi_objective and ends[cycle] not in steps:
                    steps.add(ends[cycle])
                    trial.report(value, ends[cycle])
        self._store_run(trial, outcome.cost_seconds_by_site, reported, hop_values)
        trial.set_user_attr("site_scores", [s.to_json_dict() for s in outcome.site_scores])
        if outcome.visit_scores:
            trial.set_user_attr("visit_scores", [list(v) for v in outcome.visit_scores])
            trial.set_user_attr("forgetting", outcome.forgetting(self.direction))
        if self.max_forgetting is not None and outcome.failure_reason is None:
            forgetting = outcome.forgetting(self.direction)
            if not forgetting:
                raise ValueError("a study with a forgetting limit needs the sites' visit scores")
            trial.set_constraint(CONSTRAINT_KEY, max(forgetting.values()) - self.max_forgetting)
        trial.set_user_attr(
            "objectives",
            {a: aggregate(outcome.site_scores, a, self.direction) for a in AGGREGATIONS},
        )

    def _record(self, stage: _Stage, number: int) -> TrialRecord:
        frozen = stage.study.get_trials(deepcopy=False)[number]
        return TrialRecord.from_frozen_trial(stage.study.study_name, frozen, stage.budget)

    def probe_then_promote(
        self,
        executor: PlanExecutor,
        n_probes: int,
        budget: float,
        promote: int,
        *,
        catch: tuple[type[Exception], ...] = (),
    ) -> list[CandidatePlan]:
        """Runs cheap probe trials at a reduced budget, then queues the best at full budget.

        Probe values are compared only with each other; the promoted plans are rerun at full
        budget before they can count as the study's best.

        Returns:
            The promoted plans (queued in the full-budget stage).
        """
        if not 0.0 < budget < 1.0:
            raise ValueError(f"a probe budget must be within (0, 1), got {budget}")
        self.optimize(executor, n_probes, budget, catch=catch)
        return self.promote(budget, promote)

    def promote(
        self, from_budget: float, top_k: int, to_budget: float = _FULL
    ) -> list[CandidatePlan]:
        """Queues the `top_k` best distinct completed plans of one stage in a larger-budget stage.

        A plan already tried or queued at `to_budget` is not queued again.

        Returns:
            The promoted plans, best first.
        """
        if _check_budget(to_budget) <= _check_budget(from_budget):
            raise ValueError("plans are promoted to a larger budget")
        plans: list[CandidatePlan] = []
        for record in self._ranked(from_budget):
            if len(plans) == top_k:
                break
            if record.plan is not None and record.plan not in plans:
                plans.append(record.plan)
        self.enqueue(*plans, budget=to_budget, note=f"promoted from budget {from_budget:g}")
        return plans

    # -- results --------------------------------------------------------------------------

    def _ranked(self, budget: float) -> list[TrialRecord]:
        """Completed trials, best first: with a forgetting limit, the feasible ones by value,
        then the infeasible ones by how far they exceed it; with a forgetting tolerance, the
        trials within it of the first one's value (and as feasible) lead, least forgetting
        first."""
        complete = [r for r in self.history(budget=budget) if r.state == TrialState.COMPLETE.name]
        sign = -1.0 if self.direction == "maximize" else 1.0
        limit = self.max_forgetting

        def key(record: TrialRecord) -> tuple[float, float, int]:
            excess = 0.0
            if limit is not None:
                worst = record.worst_forgetting
                excess = math.inf if worst is None else max(0.0, worst - limit)
            return (excess, sign * (record.value or 0.0), record.number)

        ranked = sorted(complete, key=key)
        tolerance = self.forgetting_tolerance
        if tolerance is None or not ranked:
            return ranked
        excess, best = key(ranked[0])[0], ranked[0].value or 0.0
        close = [
            r for r in ranked
            if key(r)[0] == excess and abs((r.value or 0.0) - best) <= tolerance
        ]  # fmt: skip

        def forgets(record: TrialRecord) -> tuple[float, float, int]:
            worst = record.worst_forgetting
            return (math.inf if worst is None else worst, *key(record)[1:])

        return sorted(close, key=forgets) + [r for r in ranked if r not in close]

    def best_record(self, budget: float = _FULL) -> TrialRecord:
        """The best completed trial at `budget` (the record of `best_plan`).

        Raises:
            ValueError: As `best_plan`.
        """
        if self.multi_objective:
            raise ValueError("a multi-objective study has a Pareto front: use best_plans()")
        ranked = self._ranked(budget)
        if not ranked or ranked[0].plan is None:
            raise ValueError(f"no completed trial at budget {budget:g} in {self.study_name!r}")
        return ranked[0]

    def best_plan(self, budget: float = _FULL) -> CandidatePlan:
        """The plan of the best completed trial at `budget` (full budget unless asked).

        Raises:
            ValueError: If no trial completed at that budget, or the study is multi-objective
                (use `best_plans`).
        """
        plan = self.best_record(budget).plan
        assert plan is not None  # best_record returns planned trials only
        return plan

    def best_plans(self, budget: float = _FULL) -> list[CandidatePlan]:
        """The distinct plans of the Pareto-optimal completed trials at `budget` (the best plan
        when single-objective)."""
        stage = self._stage(budget)
        plans: list[CandidatePlan] = []
        for trial in stage.study.best_trials:
            plan = TrialRecord.from_frozen_trial(stage.study.study_name, trial, stage.budget).plan
            if plan is not None and plan not in plans:
                plans.append(plan)
        return plans

    def history(self, budget: float | None = None) -> list[TrialRecord]:
        """Every trial, full budget first then each probe stage, by trial number.

        Args:
            budget: Only this stage's trials.
        """
        budgets = self._stage_budgets() if budget is None else [_check_budget(budget)]
        records: list[TrialRecord] = []
        for stage_budget in budgets:
            stage = self._stage(stage_budget)
            records += [
                TrialRecord.from_frozen_trial(stage.study.study_name, trial, stage.budget)
                for trial in stage.study.get_trials(deepcopy=False)
            ]
        return records

    def compute_seconds(self, budget: float | None = None) -> float:
        """Compute seconds spent by the study's trials (all stages unless asked), over sites."""
        return float(sum(record.compute_seconds for record in self.history(budget)))
