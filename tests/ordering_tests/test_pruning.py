"""Pruning and budget stages: values from different budgets or cycle counts are never compared."""

from __future__ import annotations

from collections.abc import Callable

import optuna
import pytest
from optuna.trial import FrozenTrial, TrialState

from ordering import (
    CandidatePlan,
    IntRange,
    OrderingStudy,
    PlanPruned,
    PruningSettings,
    Reporter,
    SearchSpace,
    SiteScore,
    StagePruner,
    SyntheticObjective,
    TrialOutcome,
    cycle_end_steps,
    stage_key,
)
from ordering._pruning import STAGE_ATTR


class RecordingPruner(optuna.pruners.BasePruner):
    """Passes through to a real pruner, noting which stages it was shown."""

    def __init__(self, inner: optuna.pruners.BasePruner) -> None:
        self.inner = inner
        self.seen: list[tuple[str, set[str]]] = []

    def prune(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        shown = {t.user_attrs.get(STAGE_ATTR) for t in study.get_trials(deepcopy=False)}
        self.seen.append((trial.user_attrs[STAGE_ATTR], {str(s) for s in shown}))
        return self.inner.prune(study, trial)


def _finished(study: optuna.Study, key: str, values: list[float]) -> None:
    trial = study.ask()
    trial.set_user_attr(STAGE_ATTR, key)
    for step, value in enumerate(values):
        trial.report(value, step)
    study.tell(trial, values[-1])


def test_a_trial_is_compared_only_with_trials_of_its_own_stage() -> None:
    pruner = StagePruner(optuna.pruners.MedianPruner(n_startup_trials=1))
    study = optuna.create_study(direction="maximize", pruner=pruner)
    full, probe = stage_key(1.0, 2), stage_key(0.25, 2)
    for _ in range(3):
        _finished(study, full, [0.8, 0.9])

    low_probe = study.ask()
    low_probe.set_user_attr(STAGE_ATTR, probe)
    low_probe.report(0.1, 0)
    assert not low_probe.should_prune()  # far below the full-budget trials: not comparable

    low_full = study.ask()
    low_full.set_user_attr(STAGE_ATTR, full)
    low_full.report(0.1, 0)
    assert low_full.should_prune()  # below its own stage's median


def test_trials_with_different_cycle_counts_are_not_compared() -> None:
    study = optuna.create_study(
        direction="maximize",
        pruner=StagePruner(optuna.pruners.MedianPruner(n_startup_trials=1)),
    )
    _finished(study, stage_key(1.0, 4), [0.9, 0.95, 0.97, 0.98])
    shorter = study.ask()
    shorter.set_user_attr(STAGE_ATTR, stage_key(1.0, 2))
    shorter.report(0.2, 0)
    assert not shorter.should_prune()


def test_search_with_probes_never_shows_the_pruner_another_stage(
    monkeypatch: pytest.MonkeyPatch, synthetic: SyntheticObjective
) -> None:
    recorders: list[RecordingPruner] = []

    def recording_pruner(settings: PruningSettings) -> StagePruner:
        recorder = RecordingPruner(
            optuna.pruners.PercentilePruner(settings.percentile, n_startup_trials=2)
        )
        recorders.append(recorder)
        return StagePruner(recorder)

    monkeypatch.setattr(PruningSettings, "pruner", recording_pruner)
    space = SearchSpace(sites=synthetic.sites, cycles=IntRange(2, 3))
    study = OrderingStudy.create(None, "stages", space, "random-keys", seed=0)
    study.optimize(synthetic, n_trials=12)
    study.optimize(synthetic, n_trials=12, budget_per_trial=0.25)
    study.optimize(synthetic, n_trials=6)

    seen = [entry for recorder in recorders for entry in recorder.seen]
    assert len(seen) > 20
    assert all(shown == {own} for own, shown in seen)
    stages = {own for own, _ in seen}
    assert {stage_key(0.25, 2), stage_key(1.0, 2), stage_key(1.0, 3)} <= stages
    states = [r.state for r in study.history()]
    assert "PRUNED" in states and "COMPLETE" in states


class BudgetInflatingExecutor:
    """Probe runs score higher than full runs: only stage separation keeps them out of `best`."""

    def execute(
        self, plan: CandidatePlan, *, budget: float, report: Callable[[int, float], None]
    ) -> TrialOutcome:
        value = 10.0 if budget < 1.0 else float(plan.order.index("a"))
        report(0, value)
        return TrialOutcome((SiteScore("a", value, 10),), {"a": budget})


def test_probe_trials_are_kept_out_of_full_budget_selection() -> None:
    study = OrderingStudy.create(None, "probes", SearchSpace(sites=("a", "b", "c")), seed=0)
    study.optimize(BudgetInflatingExecutor(), n_trials=4, budget_per_trial=0.2)
    study.optimize(BudgetInflatingExecutor(), n_trials=8)
    assert study.best_plan().order[2] == "a"
    assert all(r.value is not None and r.value < 10 for r in study.history(budget=1.0))
    probes = study.history(budget=0.2)
    assert len(probes) == 4 and all(r.budget_fraction == 0.2 for r in probes)
    assert all(r.study_name == "probes@budget=0.2" for r in probes)
    assert study.best_plan(budget=0.2) is not None


def test_promoted_probe_plans_rerun_at_full_budget(synthetic: SyntheticObjective) -> None:
    study = OrderingStudy.create(None, "promote", synthetic.default_space(), seed=0)
    promoted = study.probe_then_promote(synthetic, n_probes=10, budget=0.3, promote=2)
    assert len(promoted) == 2
    reruns = study.optimize(synthetic, n_trials=2)
    assert [r.plan for r in reruns] == promoted
    assert all(r.budget_fraction == 1.0 for r in reruns)
    assert study.optuna_study.trials[0].user_attrs["enqueued"] == "promoted from budget 0.3"


def test_a_pruned_trial_records_the_cost_the_executor_attached(
    synthetic: SyntheticObjective,
) -> None:
    study = OrderingStudy.create(
        None,
        "pruned",
        synthetic.default_space(cycles=3),
        pruning=PruningSettings(percentile=100.0, n_startup_trials=1),
        seed=0,
    )
    study.enqueue(synthetic.best_order, synthetic.best_order[::-1])
    best, worse = study.optimize(synthetic, n_trials=2)
    assert best.state == "COMPLETE"
    assert worse.state == "PRUNED"
    assert worse.intermediate and worse.intermediate[0][0] == 0
    assert 0 < worse.compute_seconds < best.compute_seconds
    assert study.optuna_study.trials[1].state == TrialState.PRUNED


def test_pruning_raises_plan_pruned_into_the_executor(synthetic: SyntheticObjective) -> None:
    raised: list[BaseException] = []

    class Watching:
        def execute(
            self, plan: CandidatePlan, *, budget: float, report: Callable[[int, float], None]
        ) -> TrialOutcome:
            try:
                return synthetic.execute(plan, budget=budget, report=report)
            except PlanPruned as exc:
                raised.append(exc)
                raise

    study = OrderingStudy.create(
        None,
        "raise",
        synthetic.default_space(cycles=2),
        pruning=PruningSettings(percentile=100.0, n_startup_trials=1),
        seed=0,
    )
    study.enqueue(synthetic.best_order, synthetic.best_order[::-1])
    study.optimize(Watching(), n_trials=2)
    assert len(raised) == 1 and isinstance(raised[0], PlanPruned)


def test_a_finished_run_is_never_pruned_after_its_last_cycle(
    synthetic: SyntheticObjective,
) -> None:
    study = OrderingStudy.create(
        None,
        "last-cycle",
        synthetic.default_space(cycles=1),
        pruning=PruningSettings(percentile=100.0, n_startup_trials=1),
        seed=0,
    )
    study.enqueue(synthetic.best_order, synthetic.best_order[::-1])
    records = study.optimize(synthetic, n_trials=2)
    assert [r.state for r in records] == ["COMPLETE", "COMPLETE"]


def test_default_pruning_compares_from_two_completed_trials_of_the_stage() -> None:
    study = optuna.create_study(direction="maximize", pruner=PruningSettings().pruner())
    key = stage_key(1.0, 3)
    _finished(study, key, [0.7, 0.8, 0.85])
    low = study.ask()
    low.set_user_attr(STAGE_ATTR, key)
    low.report(0.2, 0)
    assert not low.should_prune()  # one comparable trial: not yet
    study.tell(low, state=TrialState.PRUNED)
    _finished(study, key, [0.75, 0.8, 0.9])
    low = study.ask()
    low.set_user_attr(STAGE_ATTR, key)
    low.report(0.2, 0)
    assert low.should_prune()  # below the median of the stage's two completed trials


# ---- per-hop intermediate values -------------------------------------------------------------


class HopReporting:
    """Three sites, values reported after every hop (or after every cycle with ``per_cycle``):
    a plan starting at "a" scores 0.9 at every step, any other 0.1. Counts the hops trained."""

    def __init__(self, per_cycle: bool = False) -> None:
        self.per_cycle = per_cycle
        self.hops_trained = 0

    def execute(self, plan: CandidatePlan, *, budget: float, report: Reporter) -> TrialOutcome:
        value = 0.9 if plan.order[0] == "a" else 0.1
        hop = 0
        for cycle, hops in enumerate(plan.cycle_hops()):
            for _ in hops:
                self.hops_trained += 1
                if not self.per_cycle:
                    report(cycle, value, hop=hop)
                hop += 1
            if self.per_cycle:
                report(cycle, value)
        return TrialOutcome((SiteScore("a", value, 10),), {"a": 1.0})


def _hop_study(name: str, pruning: PruningSettings) -> OrderingStudy:
    space = SearchSpace(sites=("a", "b", "c"), cycles=2)
    return OrderingStudy.create(None, name, space, pruning=pruning, seed=0)


def test_a_trial_reporting_per_hop_is_pruned_inside_its_first_cycle() -> None:
    study = _hop_study("per-hop", PruningSettings(percentile=50.0, n_startup_trials=1))
    study.enqueue(("a", "b", "c"), ("b", "c", "a"))
    executor = HopReporting()
    good, bad = study.optimize(executor, n_trials=2)
    assert good.state == "COMPLETE" and bad.state == "PRUNED"
    assert executor.hops_trained == 6 + 1  # the bad plan stopped after its first hop
    assert good.hop_values == tuple((h, 0.9) for h in range(6))
    assert good.intermediate == ((0, 0.9), (1, 0.9))  # a cycle's value is its last hop's
    assert bad.hop_values == ((0, 0.1),) and bad.intermediate == ()
    frozen = study.optuna_study.trials
    assert frozen[0].intermediate_values == {h: 0.9 for h in range(6)}
    assert frozen[1].intermediate_values == {0: 0.1}


def test_cycle_values_sit_at_their_last_hops_step_so_per_cycle_and_per_hop_trials_compare() -> None:
    study = _hop_study("mixed", PruningSettings(percentile=50.0, n_startup_trials=1))
    study.enqueue(("a", "b", "c"), ("b", "c", "a"))
    per_cycle = HopReporting(per_cycle=True)
    study.optimize(per_cycle, n_trials=1)
    assert study.optuna_study.trials[0].intermediate_values == {2: 0.9, 5: 0.9}
    assert cycle_end_steps(study.history()[0].plan) == [2, 5]  # type: ignore[arg-type]
    # The per-cycle peer has no values at hops 0 and 1: nothing to compare, no pruning there;
    # at hop 2 (the end of cycle 0) both trials have one, and the low one stops.
    per_hop = HopReporting()
    (bad,) = study.optimize(per_hop, n_trials=1)
    assert bad.state == "PRUNED" and per_hop.hops_trained == 3
    assert study.optuna_study.trials[1].intermediate_values == {0: 0.1, 1: 0.1, 2: 0.1}


def test_warmup_cycles_hold_pruning_for_every_hop_of_those_cycles() -> None:
    study = _hop_study(
        "warmup", PruningSettings(percentile=50.0, n_startup_trials=1, n_warmup_cycles=1)
    )
    study.enqueue(("a", "b", "c"), ("b", "c", "a"))
    executor = HopReporting()
    _, bad = study.optimize(executor, n_trials=2)
    assert bad.state == "PRUNED"
    assert executor.hops_trained == 6 + 4  # all of cycle 0, then stopped at its first hop of 1
    assert [h for h, _ in bad.hop_values] == [0, 1, 2, 3]


def test_a_hop_reported_outside_its_cycle_fails_the_trial_with_the_reason() -> None:
    class Misplaced:
        def execute(self, plan: CandidatePlan, *, budget: float, report: Reporter) -> TrialOutcome:
            report(0, 0.5, hop=3)  # hop 3 is the first of cycle 1
            raise AssertionError("not reached")

    study = _hop_study("misplaced", PruningSettings())
    with pytest.raises(
        ValueError, match=r"hop 3 is not in cycle 0 of the plan \(its hops 0 to 2\)"
    ):
        study.optimize(Misplaced(), n_trials=1)
    assert study.history()[0].state == "FAIL"


def test_trials_stored_with_cycle_indexed_steps_are_never_peers_of_hop_indexed_ones() -> None:
    study = optuna.create_study(
        direction="maximize", pruner=PruningSettings(n_startup_trials=1).pruner()
    )
    _finished(study, "budget=1/cycles=2", [0.9, 0.95])  # a stage key from before hop steps
    low = study.ask()
    low.set_user_attr(STAGE_ATTR, stage_key(1.0, 2))
    low.report(0.1, 1)
    assert not low.should_prune()


def test_a_duplicate_of_a_trial_stored_with_cycle_steps_reports_its_values_at_hop_steps() -> None:
    # A study created before steps were hop indices: its trial holds cycle values at steps 0, 1.
    first = _hop_study("before", PruningSettings())
    first.enqueue(("a", "b", "c"))
    first.optimize(HopReporting(per_cycle=True), n_trials=1)
    done = first.optuna_study.trials[0]
    old = optuna.trial.create_trial(
        params=done.params,
        distributions=done.distributions,
        value=done.value,
        user_attrs={**done.user_attrs, STAGE_ATTR: "budget=1/cycles=2"},
        intermediate_values={0: 0.9, 1: 0.9},
    )
    resumed = _hop_study("resumed", PruningSettings())
    resumed.optuna_study.add_trial(old)
    resumed.optuna_study.enqueue_trial(done.params)  # the sampler proposes the same plan
    executor = HopReporting(per_cycle=True)
    resumed.optimize(executor, n_trials=1)

    assert executor.hops_trained == 0  # reused, not trained
    duplicate = resumed.optuna_study.trials[1]
    assert duplicate.user_attrs["duplicate_of"] == 0
    # Cycle 0 ends at hop 2, cycle 1 at hop 5: no cycle value at a hop-1 peer's step.
    assert duplicate.intermediate_values == {2: 0.9, 5: 0.9}


def test_an_outcome_with_a_cycle_outside_the_plan_fails_its_trial_with_the_reason() -> None:
    class Beyond:
        def execute(self, plan: CandidatePlan, *, budget: float, report: Reporter) -> TrialOutcome:
            return TrialOutcome((SiteScore("a", 0.5, 10),), {"a": 1.0}, intermediate=((5, 0.5),))

    study = _hop_study("beyond", PruningSettings())
    with pytest.raises(ValueError, match="cycle 5 is outside the plan's 2 cycles"):
        study.optimize(Beyond(), n_trials=1)
    assert study.history()[0].state == "FAIL"
