"""A forgetting limit: an Optuna constraint for the samplers, feasibility first in selection."""

from __future__ import annotations

from collections.abc import Callable

import optuna
import pytest

from ordering import (
    CandidatePlan,
    FloatRange,
    IntRange,
    OrderingStudy,
    PruningSettings,
    SearchSpace,
    SiteScore,
    TrialOutcome,
    random_search,
)
from ordering._study import CONSTRAINT_KEY

SITES = ("a", "b", "c", "d")


def _space() -> SearchSpace:
    return SearchSpace(sites=SITES, cycles=IntRange(1, 2),
                       learning_rate=FloatRange(1e-4, 1e-1, log=True))  # fmt: skip


class ForgettingExecutor:
    """The higher the learning rate, the better the final score and the more the first site
    forgets: worst-site forgetting is 10 x the learning rate."""

    def __init__(self, visit_scores: bool = True) -> None:
        self.visit_scores = visit_scores

    def execute(
        self, plan: CandidatePlan, *, budget: float, report: Callable[[int, float], None]
    ) -> TrialOutcome:
        lr = plan.hops[0].hyperparameters.learning_rate
        final = 0.5 + lr
        visits = (*((site, final) for site in SITES[1:]), (SITES[0], final + 10 * lr))
        return TrialOutcome(
            tuple(SiteScore(site, final, 10) for site in SITES),
            {site: 1.0 for site in SITES},
            visit_scores=visits if self.visit_scores else (),
        )


def _plans() -> list[CandidatePlan]:
    return [_space().plan(SITES, cycles=1, learning_rate=lr) for lr in (0.05, 0.001, 0.0015, 0.03)]


def test_selection_picks_the_best_feasible_trial_not_the_best_value() -> None:
    study = OrderingStudy.create(None, "limit", _space(), seed=0, pruning=None,
                                 max_forgetting=0.02)  # fmt: skip
    study.enqueue(*_plans())
    records = study.optimize(ForgettingExecutor(), n_trials=4)
    assert max(records, key=lambda r: r.value or 0.0).worst_forgetting == pytest.approx(0.5)
    best = study.best_record()
    # lr 0.0015 forgets 0.015 (feasible) and scores best among the feasible ones.
    assert best.worst_forgetting == pytest.approx(0.015)
    assert study.best_plan().hops[0].hyperparameters.learning_rate == pytest.approx(0.0015)
    # Stored as the trial's Optuna constraint, which the model-based samplers read.
    assert study.optuna_study.trials[0].constraints == {CONSTRAINT_KEY: pytest.approx(0.48)}

    unlimited = OrderingStudy.create(None, "no-limit", _space(), seed=0, pruning=None)
    unlimited.enqueue(*_plans())
    unlimited.optimize(ForgettingExecutor(), n_trials=4)
    assert unlimited.best_plan().hops[0].hyperparameters.learning_rate == pytest.approx(0.05)


def test_with_no_feasible_trial_the_least_forgetting_one_is_selected() -> None:
    study = OrderingStudy.create(None, "none-feasible", _space(), seed=0, pruning=None,
                                 max_forgetting=0.001)  # fmt: skip
    study.enqueue(*_plans())
    study.optimize(ForgettingExecutor(), n_trials=4)
    assert study.best_record().worst_forgetting == pytest.approx(0.01)


def test_a_duplicate_trial_inherits_its_twins_constraint() -> None:
    study = OrderingStudy.create(None, "dup", _space(), seed=0, pruning=None,
                                 max_forgetting=0.02)  # fmt: skip
    plan = _plans()[0]
    study.enqueue(plan)
    (first,) = study.optimize(ForgettingExecutor(), n_trials=1)
    study.optuna_study.enqueue_trial(study.params_for(plan))
    (second,) = study.optimize(ForgettingExecutor(), n_trials=1)
    assert second.duplicate_of == first.number
    assert study.optuna_study.trials[1].constraints == {CONSTRAINT_KEY: pytest.approx(0.48)}


def test_tpe_learns_to_stay_within_the_limit() -> None:
    """Without the constraint TPE chases the high learning rates that forget; with it, more of
    its model-based trials are feasible."""
    feasible = {}
    for limit in (None, 0.02):
        study = OrderingStudy.create(None, f"tpe-{limit}", _space(), seed=2, pruning=None,
                                     max_forgetting=limit, n_startup_trials=4)  # fmt: skip
        records = study.optimize(ForgettingExecutor(), n_trials=24)
        feasible[limit] = sum(
            1 for r in records[4:] if r.worst_forgetting is not None and r.worst_forgetting <= 0.02
        )
    assert feasible[0.02] > feasible[None]


def test_random_search_selects_by_the_same_limit() -> None:
    study = random_search(ForgettingExecutor(), _space(), 12, seed=4, max_forgetting=0.02)
    feasible = [
        r for r in study.history() if r.worst_forgetting is not None and r.worst_forgetting <= 0.02
    ]
    assert feasible, "the seed should draw at least one feasible learning rate"
    assert study.best_record().value == pytest.approx(max(r.value or 0.0 for r in feasible))


def test_a_limit_without_visit_scores_fails_the_trial_loudly() -> None:
    study = OrderingStudy.create(None, "blind", _space(), seed=0, pruning=None,
                                 max_forgetting=0.02)  # fmt: skip
    with pytest.raises(ValueError, match="needs the sites' visit scores"):
        study.optimize(ForgettingExecutor(visit_scores=False), n_trials=1)
    assert study.optuna_study.trials[0].state == optuna.trial.TrialState.FAIL


@pytest.mark.parametrize("limit", [-0.01, float("nan"), float("inf")])
def test_an_invalid_limit_is_refused(limit: float) -> None:
    with pytest.raises(ValueError, match="max_forgetting must be a finite value >= 0"):
        OrderingStudy.create(None, "bad", _space(), max_forgetting=limit)


class CycleReportingExecutor:
    """Reports a value after each cycle as the twin does; a low learning rate scores low at
    every cycle. Counts the cycles it ran."""

    def __init__(self) -> None:
        self.cycles_run = 0

    def execute(
        self, plan: CandidatePlan, *, budget: float, report: Callable[[int, float], None]
    ) -> TrialOutcome:
        lr = plan.hops[0].hyperparameters.learning_rate
        for cycle in range(plan.cycles):
            self.cycles_run += 1
            report(cycle, lr * (cycle + 1))
        return TrialOutcome(
            tuple(SiteScore(site, lr * plan.cycles, 10) for site in SITES),
            {"sim": 1.0},
            visit_scores=tuple((hop.site, lr * plan.cycles) for hop in plan.hops),
        )


def test_the_pruner_receives_per_cycle_values_and_stops_a_poor_partial_schedule() -> None:
    space = SearchSpace(sites=SITES, cycles=IntRange(3, 3),
                        learning_rate=FloatRange(1e-4, 1e-1, log=True))  # fmt: skip
    study = OrderingStudy.create(None, "prune", space, seed=0, max_forgetting=0.02,
                                 pruning=PruningSettings(n_startup_trials=2))  # fmt: skip
    good = [space.plan(SITES, cycles=3, learning_rate=lr) for lr in (0.05, 0.04)]
    poor = space.plan(SITES, cycles=3, learning_rate=0.0001)
    study.enqueue(*good, poor)
    executor = CycleReportingExecutor()
    records = study.optimize(executor, n_trials=3)
    assert [r.state for r in records] == ["COMPLETE", "COMPLETE", "PRUNED"]
    assert [c for c, _ in records[0].intermediate] == [0, 1, 2]
    assert [v for _, v in records[0].intermediate] == pytest.approx([0.05, 0.1, 0.15])
    assert [c for c, _ in records[2].intermediate] == [0]
    assert executor.cycles_run == 3 + 3 + 1


def test_a_plans_hops_grouped_by_cycle_follow_its_cycle_orders() -> None:
    space = SearchSpace(sites=SITES, cycles=IntRange(2, 2), consolidation_steps=IntRange(3, 3),
                        learning_rate=FloatRange(1e-3, 1e-2, log=True))  # fmt: skip
    plan = space.plan(SITES, cycles=2, learning_rate=5e-3)
    groups = plan.cycle_hops()
    assert len(groups) == plan.cycles == 3  # the consolidation cycle is the last group
    assert [h.hyperparameters.steps for h in groups[-1]] == [3] * len(SITES)
    assert [tuple(h.site for h in g) for g in groups] == list(plan.cycle_orders)
    assert tuple(h for g in groups for h in g) == plan.hops


@pytest.mark.parametrize(("tolerance", "chosen_lr"), [(0.0, 0.05), (0.03, 0.03), (0.1, 0.001)])
def test_a_forgetting_tolerance_picks_the_least_forgetting_trial_close_to_the_best(
    tolerance: float, chosen_lr: float
) -> None:
    # Values 0.55, 0.501, 0.5015, 0.53; worst-site forgetting 10 x the learning rate.
    study = OrderingStudy.create(None, "tolerance", _space(), seed=0, pruning=None,
                                 forgetting_tolerance=tolerance)  # fmt: skip
    study.enqueue(*_plans())
    study.optimize(ForgettingExecutor(), n_trials=4)
    assert study.best_plan().hops[0].hyperparameters.learning_rate == pytest.approx(chosen_lr)
    ranked = study._ranked(1.0)
    assert len(ranked) == 4 and ranked[0] == study.best_record()


def test_a_forgetting_tolerance_applies_among_the_feasible_trials_and_in_random_search() -> None:
    study = OrderingStudy.create(None, "both", _space(), seed=0, pruning=None,
                                 max_forgetting=0.02, forgetting_tolerance=0.1)  # fmt: skip
    study.enqueue(*_plans())
    study.optimize(ForgettingExecutor(), n_trials=4)
    # Feasible: lr 0.001 (forgets 0.01) and 0.0015 (0.015); the tolerance picks the former.
    assert study.best_record().worst_forgetting == pytest.approx(0.01)

    searched = random_search(ForgettingExecutor(), _space(), 6, seed=1, forgetting_tolerance=1.0)
    least = min(r.worst_forgetting or 0.0 for r in searched.history())
    assert searched.best_record().worst_forgetting == pytest.approx(least)


@pytest.mark.parametrize("tolerance", [-0.01, float("nan")])
def test_a_bad_forgetting_tolerance_is_refused(tolerance: float) -> None:
    with pytest.raises(ValueError, match="forgetting_tolerance must be a finite value >= 0"):
        OrderingStudy.create(None, "bad", _space(), forgetting_tolerance=tolerance)
    with pytest.raises(ValueError, match="single-objective"):
        OrderingStudy.create(None, "multi", _space(), multi_objective=True,
                             forgetting_tolerance=0.01)  # fmt: skip
