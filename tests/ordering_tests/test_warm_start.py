"""OrderingStudy.add_prior: plans that already ran, recorded as trials without running them."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from optuna.search_space import IntersectionSearchSpace
from optuna.trial import TrialState

from ordering import (
    CandidatePlan,
    FloatRange,
    IntRange,
    OrderingStudy,
    SearchSpace,
    SearchSpaceError,
    SiteScore,
    SyntheticObjective,
    TrialOutcome,
    cycle_end_steps,
)


def _space(synthetic: SyntheticObjective) -> SearchSpace:
    return SearchSpace(
        sites=synthetic.sites,
        cycles=2,
        learning_rate=FloatRange(1e-4, 1e-2, log=True),
        learning_rate_decay=FloatRange(0.8, 1.0),
        steps=IntRange(5, 40),
    )


def _ran(synthetic: SyntheticObjective, plan: CandidatePlan) -> TrialOutcome:
    """What running `plan` produced earlier (e.g. in another study), with its cycle values."""
    reported: list[tuple[int, float]] = []
    outcome = synthetic.execute(plan, budget=1.0, report=lambda c, v: reported.append((c, v)))
    return replace(outcome, intermediate=tuple(reported))


def test_a_prior_is_a_completed_trial_that_cost_nothing_and_counts_for_the_best_plan(
    synthetic: SyntheticObjective, tmp_path: Path
) -> None:
    space = _space(synthetic)
    url = f"sqlite:///{tmp_path / 'warm.db'}"
    study = OrderingStudy.create(url, "warm", space, seed=0)
    best = space.plan(synthetic.best_order, learning_rate=1e-3, learning_rate_decay=0.9, steps=20)
    poor = space.plan(synthetic.best_order[::-1], learning_rate=1e-4, steps=5)
    ran = {plan: _ran(synthetic, plan) for plan in (poor, best)}
    calls = synthetic.calls

    records = [study.add_prior(plan, outcome, note=f"run {i}") for i, (plan, outcome)
               in enumerate(ran.items())]  # fmt: skip

    assert synthetic.calls == calls  # nothing ran
    assert [r.state for r in records] == ["COMPLETE", "COMPLETE"]
    assert [r.warm_start for r in records] == ["run 0", "run 1"]
    assert all(r.compute_seconds == 0.0 for r in records) and study.compute_seconds() == 0.0
    stored = study.optuna_study.trials[1]
    assert stored.user_attrs["warm_start_cost_seconds_by_site"] == pytest.approx(
        dict(ran[best].cost_seconds_by_site)
    )
    # Stored like a trial that ran: plan, scores, objective, the values after each cycle.
    record = records[1]
    assert record.plan == replace(best, encoding=study.encoding.name)
    assert record.site_scores == ran[best].site_scores
    assert record.value == pytest.approx(
        sum(s.value for s in ran[best].site_scores) / len(synthetic.sites)
    )
    assert record.intermediate == ran[best].intermediate
    # Each cycle's value at the step of its last hop, as a trial that ran stores it.
    ends = cycle_end_steps(best)
    assert stored.intermediate_values == {ends[c]: v for c, v in ran[best].intermediate}
    assert stored.params == study.params_for(best)
    assert study.best_plan() == record.plan

    # The sampler models the priors as it models trials that ran: same parameters, same
    # distributions, complete.
    (sampled,) = study.optimize(synthetic, n_trials=1)
    assert sampled.state == "COMPLETE" and sampled.warm_start is None
    searched = IntersectionSearchSpace().calculate(study.optuna_study)
    assert searched == study.optuna_study.trials[sampled.number].distributions
    assert all(
        trial.distributions == searched
        for trial in study.optuna_study.get_trials(states=(TrialState.COMPLETE,))
    )
    # Kept across reopening.
    assert OrderingStudy.load(url, "warm").history()[:2] == records


def test_a_prior_leaves_a_queued_seed_in_place(synthetic: SyntheticObjective) -> None:
    space = _space(synthetic)
    study = OrderingStudy.create(None, "queue", space, seed=0)
    study.enqueue(synthetic.sites)
    plan = space.plan(synthetic.best_order, learning_rate=1e-3, steps=20)
    prior = study.add_prior(plan, _ran(synthetic, plan))
    (seeded,) = study.optimize(synthetic, n_trials=1)
    assert seeded.plan is not None and seeded.plan.order == synthetic.sites
    assert (prior.number, seeded.number) == (1, 0)


def test_a_later_trial_repeating_a_prior_reuses_its_result(
    synthetic: SyntheticObjective,
) -> None:
    space = _space(synthetic)
    study = OrderingStudy.create(None, "repeat", space, seed=0)
    plan = space.plan(synthetic.best_order, learning_rate=1e-3, steps=20)
    prior = study.add_prior(plan, _ran(synthetic, plan))
    study.optuna_study.enqueue_trial(study.params_for(plan))
    calls = synthetic.calls
    (repeat,) = study.optimize(synthetic, n_trials=1)
    assert synthetic.calls == calls
    assert repeat.duplicate_of == prior.number and repeat.compute_seconds == 0.0
    assert repeat.value == prior.value and repeat.warm_start is None


def test_a_prior_outside_the_space_or_with_a_bad_outcome_is_refused_and_leaves_no_trial(
    synthetic: SyntheticObjective,
) -> None:
    space = _space(synthetic)
    study = OrderingStudy.create(None, "refused", space, seed=0)
    fits = space.plan(synthetic.best_order, learning_rate=1e-3, steps=20)
    outcome = _ran(synthetic, fits)

    too_fast = CandidatePlan.build(fits.cycle_orders, replace(fits.hops[0][1], learning_rate=0.5))
    with pytest.raises(SearchSpaceError, match="learning_rate"):
        study.add_prior(too_fast, outcome)
    three_cycles = CandidatePlan.build([fits.order] * 3, fits.hops[0][1])
    with pytest.raises(SearchSpaceError, match="cycles"):
        study.add_prior(three_cycles, outcome)
    fewer_sites = CandidatePlan.build([fits.order[:2]] * 2, fits.hops[0][1])
    with pytest.raises(SearchSpaceError, match="sites"):
        study.add_prior(fewer_sites, outcome)
    stranger = TrialOutcome((*outcome.site_scores, SiteScore("elsewhere", 0.5, 10)), {})
    with pytest.raises(ValueError, match="elsewhere"):
        study.add_prior(fits, stranger)
    not_finite = TrialOutcome((SiteScore(fits.order[0], float("nan"), 10),), {})
    with pytest.raises(ValueError, match="not finite"):
        study.add_prior(fits, not_finite)
    assert study.history() == []
