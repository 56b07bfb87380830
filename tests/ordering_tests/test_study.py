"""OrderingStudy: trials, stored attributes, seeds, budgets and re-opening from SQLite."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from ordering import (
    CandidatePlan,
    FloatRange,
    IntRange,
    OrderingStudy,
    SearchSpace,
    SearchSpaceError,
    SiteScore,
    StudyMismatch,
    SyntheticObjective,
    TrialOutcome,
    aggregate,
)


class FailingExecutor:
    def execute(
        self, plan: CandidatePlan, *, budget: float, report: Callable[[int, float], None]
    ) -> TrialOutcome:
        raise ConnectionError("site south is offline")


class NanExecutor:
    def execute(
        self, plan: CandidatePlan, *, budget: float, report: Callable[[int, float], None]
    ) -> TrialOutcome:
        return TrialOutcome((SiteScore(plan.order[0], float("nan"), 10),), {"x": 1.0})


def test_aggregations_are_mean_weighted_and_worst() -> None:
    scores = (SiteScore("a", 0.9, 300), SiteScore("b", 0.6, 100))
    assert aggregate(scores, "mean") == pytest.approx(0.75)
    assert aggregate(scores, "weighted") == pytest.approx(0.825)
    assert aggregate(scores, "worst") == 0.6
    assert aggregate(scores, "worst", "minimize") == 0.9


def test_each_trial_stores_json_able_scores_costs_and_budget(
    synthetic: SyntheticObjective,
) -> None:
    study = OrderingStudy.create(None, "attrs", synthetic.default_space(cycles=2), seed=0)
    records = study.optimize(synthetic, n_trials=3)
    assert [r.number for r in records] == [0, 1, 2]
    stored = study.optuna_study.trials[0].user_attrs
    assert json.loads(json.dumps(stored)) == stored
    assert stored["budget_fraction"] == 1.0
    assert {s["site"] for s in stored["site_scores"]} == set(synthetic.sites)
    assert set(stored["cost_seconds_by_site"]) == set(synthetic.sites)
    assert [c for c, _ in stored["intermediate"]] == [0, 1]
    record = records[0]
    assert record.state == "COMPLETE" and record.budget_fraction == 1.0
    assert record.value == pytest.approx(aggregate(record.site_scores, "mean"))
    assert record.compute_seconds == pytest.approx(sum(stored["cost_seconds_by_site"].values()))
    assert record.plan is not None and record.plan.cycles == 2


def test_enqueued_orders_and_plans_run_first(synthetic: SyntheticObjective) -> None:
    space = SearchSpace(
        sites=synthetic.sites, learning_rate=FloatRange(1e-4, 1e-2, log=True), steps=20
    )
    study = OrderingStudy.create(None, "seeds", space, "random-keys", seed=1)
    warm = space.plan(synthetic.best_order[::-1], learning_rate=2e-3)
    study.enqueue(synthetic.best_order, warm)
    first, second, _ = study.optimize(synthetic, n_trials=3)
    assert first.plan is not None and first.plan.order == synthetic.best_order
    assert second.plan == CandidatePlan(
        hops=warm.hops, cycles=1, order=warm.order, encoding="random-keys"
    )
    assert study.optuna_study.trials[0].user_attrs["enqueued"] == "seed"


def test_best_plan_is_the_best_completed_trial(synthetic: SyntheticObjective) -> None:
    study = OrderingStudy.create(None, "best", synthetic.default_space(), seed=0)
    study.enqueue(synthetic.best_order)
    records = study.optimize(synthetic, n_trials=6)
    assert study.best_plan().order == synthetic.best_order
    assert max(r.value or 0.0 for r in records) == pytest.approx(synthetic.best_value)


def test_multi_objective_studies_optimise_the_mean_and_the_worst_site(
    synthetic: SyntheticObjective,
) -> None:
    space = SearchSpace(sites=synthetic.sites, cycles=2)
    study = OrderingStudy.create(None, "mo", space, multi_objective=True, seed=0)
    records = study.optimize(synthetic, n_trials=6)
    record = records[0]
    assert record.values is not None and len(record.values) == 2
    assert record.values[1] == min(s.value for s in record.site_scores)
    assert record.intermediate  # stored although Optuna cannot prune multi-objective trials
    assert study.best_plans()
    with pytest.raises(ValueError, match="Pareto front"):
        study.best_plan()


def test_the_trial_budget_stops_the_search_on_compute_seconds(
    synthetic: SyntheticObjective,
) -> None:
    study = OrderingStudy.create(None, "budget", synthetic.default_space(), seed=0)
    one_trial = study.optimize(synthetic, n_trials=1)[0].compute_seconds
    records = study.optimize(
        synthetic, n_trials=100, max_compute_seconds=2.5 * one_trial, reuse_duplicates=False
    )
    assert len(records) == 3  # stops once spent, not before: the last trial may overshoot
    assert study.compute_seconds() == pytest.approx(4 * one_trial)
    with pytest.raises(ValueError, match="n_trials"):
        study.optimize(synthetic)


def test_a_repeated_plan_reuses_the_earlier_result_at_no_cost(
    synthetic: SyntheticObjective,
) -> None:
    study = OrderingStudy.create(None, "repeat", synthetic.default_space(), seed=0)
    study.enqueue(synthetic.best_order)
    study.optimize(synthetic, n_trials=1)
    study.optuna_study.enqueue_trial(study.params_for(synthetic.best_order))
    calls = synthetic.calls
    (repeat,) = study.optimize(synthetic, n_trials=1)
    assert synthetic.calls == calls
    assert repeat.duplicate_of == 0 and repeat.compute_seconds == 0.0
    assert repeat.value == study.history()[0].value


def test_a_failing_executor_fails_the_trial_and_propagates_unless_caught(
    synthetic: SyntheticObjective,
) -> None:
    study = OrderingStudy.create(None, "fail", synthetic.default_space(), seed=0)
    with pytest.raises(ConnectionError):
        study.optimize(FailingExecutor(), n_trials=2)
    (caught,) = study.optimize(FailingExecutor(), n_trials=1, catch=(ConnectionError,))
    assert caught.state == "FAIL" and caught.error is not None and "offline" in caught.error
    (nan,) = study.optimize(NanExecutor(), n_trials=1)
    assert nan.state == "FAIL" and nan.error is not None and "non-finite" in nan.error
    assert [r.state for r in study.history()] == ["FAIL", "FAIL", "FAIL"]


def test_a_study_reopened_from_sqlite_continues_with_its_earlier_trials(
    tmp_path: Path, synthetic: SyntheticObjective
) -> None:
    url = f"sqlite:///{tmp_path / 'ordering.db'}"
    space = synthetic.default_space(cycles=2)
    first = OrderingStudy.create(url, "reopen", space, "random-keys", seed=0)
    first.optimize(synthetic, n_trials=4)
    first.optimize(synthetic, n_trials=2, budget_per_trial=0.5)
    before = first.history()

    again = OrderingStudy.create(url, "reopen", space, "random-keys", seed=1)
    assert again.history() == before
    again.optimize(synthetic, n_trials=3)
    assert [r.number for r in again.history(budget=1.0)] == list(range(7))
    assert [r.number for r in again.history(budget=0.5)] == [0, 1]

    loaded = OrderingStudy.load(url, "reopen")
    assert loaded.space == space and loaded.encoding.name == "random-keys"
    assert len(loaded.history()) == 9
    assert loaded.best_plan() == again.best_plan()


def test_reopening_with_another_space_or_objective_is_refused(
    tmp_path: Path, synthetic: SyntheticObjective
) -> None:
    url = f"sqlite:///{tmp_path / 'ordering.db'}"
    OrderingStudy.create(url, "fixed", synthetic.default_space(), seed=0)
    with pytest.raises(StudyMismatch, match="space"):
        OrderingStudy.create(url, "fixed", synthetic.default_space(cycles=3))
    with pytest.raises(StudyMismatch, match="aggregation"):
        OrderingStudy.create(url, "fixed", synthetic.default_space(), aggregation="worst")


def test_a_space_outside_the_approved_bounds_is_refused_at_creation(
    synthetic: SyntheticObjective,
) -> None:
    space = SearchSpace(sites=synthetic.sites, cycles=IntRange(1, 20))
    with pytest.raises(SearchSpaceError, match="cycles"):
        OrderingStudy.create(None, "bounds", space, bounds={"cycles": (1, 10)})
