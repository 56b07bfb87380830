"""Collapse guard, forgetting and the tuned random-order sampler of the search."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from ordering import (
    CandidatePlan,
    FloatRange,
    IntRange,
    OrderingStudy,
    PlanFailed,
    SamplerName,
    SearchSpace,
    SiteScore,
    TrialOutcome,
    order_importance,
    site_forgetting,
)

SITES = ("a", "b", "c", "d")


def _space() -> SearchSpace:
    return SearchSpace(sites=SITES, cycles=IntRange(1, 3),
                       learning_rate=FloatRange(1e-4, 1e-1, log=True))  # fmt: skip


class CollapsingExecutor:
    """Plans with a high learning rate collapse: their models score best but predict one class."""

    def execute(
        self, plan: CandidatePlan, *, budget: float, report: Callable[[int, float], None]
    ) -> TrialOutcome:
        lr = plan.hops[0].hyperparameters.learning_rate
        collapsed = lr > 1e-2
        value = 0.95 if collapsed else 0.5 + lr
        return TrialOutcome(
            tuple(SiteScore(site, value, 10) for site in SITES),
            {site: 1.0 for site in SITES},
            visit_scores=tuple((hop.site, value + 0.01) for hop in plan.hops),
            failure_reason="collapsed: predicts label 1 for every row" if collapsed else None,
        )


class DivergingExecutor:
    def execute(
        self, plan: CandidatePlan, *, budget: float, report: Callable[[int, float], None]
    ) -> TrialOutcome:
        raise PlanFailed("diverged: train loss 1e9 at visit 3", {"a": 2.0})


def test_a_collapsed_trial_fails_with_its_reason_and_is_never_the_best_plan() -> None:
    study = OrderingStudy.create(None, "collapse", _space(), seed=0, pruning=None)
    collapsing = _space().plan(SITES, cycles=1, learning_rate=0.05)
    healthy = _space().plan(SITES, cycles=1, learning_rate=1e-3)
    study.enqueue(collapsing, healthy)
    first, second = study.optimize(CollapsingExecutor(), n_trials=2)
    assert first.state == "FAIL"
    assert first.failure_reason == "collapsed: predicts label 1 for every row"
    assert study.optuna_study.trials[0].user_attrs["failure_reason"] == first.failure_reason
    assert second.state == "COMPLETE" and second.failure_reason is None
    assert study.best_plan().hops == healthy.hops


def test_a_collapsed_plan_proposed_again_runs_again_instead_of_being_reused() -> None:
    study = OrderingStudy.create(None, "no-reuse", _space(), seed=0, pruning=None)
    collapsing = _space().plan(SITES, cycles=1, learning_rate=0.05)
    study.enqueue(collapsing)
    study.optimize(CollapsingExecutor(), n_trials=1)
    study.optuna_study.enqueue_trial(study.params_for(collapsing))
    (again,) = study.optimize(CollapsingExecutor(), n_trials=1)
    assert again.duplicate_of is None and again.state == "FAIL"
    with pytest.raises(ValueError, match="no completed trial"):
        study.best_plan()


def test_a_diverged_run_fails_its_trial_with_the_reason_and_the_search_goes_on() -> None:
    study = OrderingStudy.create(None, "diverge", _space(), seed=0)
    records = study.optimize(DivergingExecutor(), n_trials=2)
    assert [r.state for r in records] == ["FAIL", "FAIL"]
    assert records[0].failure_reason == "diverged: train loss 1e9 at visit 3"
    assert records[0].cost_seconds_by_site == {"a": 2.0}


def test_a_failure_reason_must_say_why() -> None:
    with pytest.raises(ValueError, match="say why"):
        TrialOutcome((SiteScore("a", 0.5, 1),), {}, failure_reason=" ")
    with pytest.raises(ValueError, match="say why"):
        PlanFailed("")


def test_forgetting_is_each_sites_drop_from_its_best_post_visit_score_to_the_final() -> None:
    visits = [("a", 0.7), ("b", 0.6), ("a", 0.8), ("b", 0.65)]
    final = [SiteScore("a", 0.75, 10), SiteScore("b", 0.7, 10)]
    forgetting = site_forgetting(visits, final)
    assert forgetting == pytest.approx({"a": 0.05, "b": -0.05})
    losses = site_forgetting([("a", 0.3), ("a", 0.2)], [SiteScore("a", 0.5, 1)], "minimize")
    assert losses == pytest.approx({"a": 0.3})


def test_a_trial_with_visit_scores_stores_each_sites_forgetting() -> None:
    study = OrderingStudy.create(None, "forgetting", _space(), seed=0, pruning=None)
    study.enqueue(_space().plan(SITES, cycles=2, learning_rate=1e-3))
    (record,) = study.optimize(CollapsingExecutor(), n_trials=1)
    assert record.forgetting == pytest.approx({site: 0.01 for site in SITES})
    assert record.worst_forgetting == pytest.approx(0.01)
    stored = study.optuna_study.trials[0].user_attrs
    assert len(stored["visit_scores"]) == 8


class OrderRewardingExecutor:
    """Scores one order far above the others; the learning rate adds a little."""

    def __init__(self, reward: tuple[str, ...]) -> None:
        self.reward = reward
        self.orders: list[tuple[str, ...]] = []
        self.learning_rates: list[float] = []

    def execute(
        self, plan: CandidatePlan, *, budget: float, report: Callable[[int, float], None]
    ) -> TrialOutcome:
        self.orders.append(plan.order)
        self.learning_rates.append(plan.hops[0].hyperparameters.learning_rate)
        value = (1.0 if plan.order == self.reward else 0.0) + plan.hops[
            0
        ].hyperparameters.learning_rate
        return TrialOutcome(tuple(SiteScore(s, value, 1) for s in SITES), {})


def test_the_random_order_sampler_never_learns_the_order_but_tunes_the_rest() -> None:
    space = SearchSpace(sites=SITES, learning_rate=FloatRange(1e-4, 1e-1, log=True))
    rewards = (("a", "b", "c", "d"), ("d", "c", "b", "a"))

    def run(sampler: SamplerName) -> list[OrderRewardingExecutor]:
        executors = []
        for reward in rewards:
            executor = OrderRewardingExecutor(reward)
            study = OrderingStudy.create(None, "ro", space, "lehmer", seed=3,
                                         sampler=sampler, n_startup_trials=2,
                                         pruning=None)  # fmt: skip
            study.optimize(executor, n_trials=12, reuse_duplicates=False)
            executors.append(executor)
        return executors

    # Whatever the objective rewards, the orders drawn are the same sequence: not learnt.
    ordered_a, ordered_b = run("random-order")
    first, second = ordered_a.orders, ordered_b.orders
    assert first == second
    # The learning rate follows the objective: the two rewards' scores lead to different
    # learning rates. A sampler random in every parameter draws the same ones for both.
    assert ordered_a.learning_rates != ordered_b.learning_rates
    random_a, random_b = run("random")
    assert random_a.learning_rates == random_b.learning_rates
    tuned = OrderingStudy.create(None, "tpe", space, "lehmer", seed=3, n_startup_trials=2,
                                 pruning=None)  # fmt: skip
    learner = OrderRewardingExecutor(("a", "b", "c", "d"))
    tuned.optimize(learner, n_trials=12, reuse_duplicates=False)
    assert learner.orders != first


def test_an_unknown_sampler_is_refused() -> None:
    with pytest.raises(ValueError, match="random-order"):
        OrderingStudy.create(None, "x", _space(), sampler="bayes")  # type: ignore[arg-type]


class FirstSiteExecutor:
    """Scores 1 when site "a" goes first, else 0, plus `lr_weight` times the learning rate."""

    def __init__(self, order_weight: float) -> None:
        self.order_weight = order_weight

    def execute(
        self, plan: CandidatePlan, *, budget: float, report: Callable[[int, float], None]
    ) -> TrialOutcome:
        first = 1.0 if plan.order[0] == "a" else 0.0
        value = self.order_weight * first + plan.hops[0].hyperparameters.learning_rate
        return TrialOutcome(tuple(SiteScore(s, value, 1) for s in SITES), {})


def test_order_importance_is_large_when_only_the_order_matters_and_small_otherwise() -> None:
    space = SearchSpace(sites=SITES, learning_rate=FloatRange(1e-4, 1e-1, log=True))
    order_study = OrderingStudy.create(None, "order", space, "lehmer", sampler="random", seed=0)
    order_study.optimize(FirstSiteExecutor(1.0), n_trials=40)
    by_order = order_importance(order_study)
    assert by_order.trials == 40 and by_order.order_share is not None
    assert next(iter(by_order.importances)) == "order" and by_order.order_share > 0.5

    lr_study = OrderingStudy.create(None, "lr", space, "lehmer", sampler="random", seed=0)
    lr_study.optimize(FirstSiteExecutor(0.0), n_trials=40)
    by_lr = order_importance(lr_study)
    assert next(iter(by_lr.importances)) == "learning_rate"
    assert by_lr.order_share is not None and by_lr.order_share < 0.5
    assert sum(by_lr.importances.values()) == pytest.approx(1.0)


def test_order_importance_says_why_when_there_are_too_few_trials() -> None:
    study = OrderingStudy.create(None, "few", _space(), seed=0)
    study.optimize(CollapsingExecutor(), n_trials=3)
    few = order_importance(study)
    assert few.importances == {} and few.order_share is None
    assert few.note is not None and "at least 8 completed trials" in few.note
