"""The sampler and pruning benchmark's accounting: hops trained (pruned runs' partial hops
included), the equal-compute checkpoint, selection and the pairing against random search."""

from __future__ import annotations

import random
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import optuna
import pytest
from optuna.trial import TrialState

from ordering import FloatRange, IntRange, PlanPruned, PruningSettings, SearchSpace, stage_key
from ordering._pruning import STAGE_ATTR
from site_agent.examples import TabularExample
from site_agent.registry import RegisteredDataset
from site_agent.tasks import TabularTrainer
from tests.benchmark_module import benchmark_module


@pytest.fixture(scope="module")
def bench() -> Iterator[ModuleType]:
    with benchmark_module("heart_disease_samplers.py", "heart_disease_samplers_benchmark") as m:
        yield m


def _site(name: str, rows: int, shift: float) -> RegisteredDataset:
    rng = random.Random(name)
    examples = [
        TabularExample(
            features=(i % 2 + shift + rng.gauss(0, 0.8), rng.gauss(0, 1.0)), label=str(i % 2)
        )
        for i in range(rows)
    ]
    return RegisteredDataset(
        name=name,
        task_type="tabular",
        fingerprint="0" * 64,
        train=tuple(examples),
        validation=(),
        test=tuple(examples[:8]),
        feature_names=("x", "y"),
        labels=("0", "1"),
        seed=3,
    )


def _space() -> SearchSpace:
    return SearchSpace(
        sites=("a", "b"),
        cycles=IntRange(1, 3),
        learning_rate=FloatRange(1e-2, 1e-1, log=True),
        steps=4,
        batch_size=4,
        max_grad_norm=0.0,
        seed=0,
    )


def test_hops_count_every_folds_visits_of_every_cycle_run(
    bench: Any, trainer: TabularTrainer
) -> None:
    datasets = [_site("a", 16, 0.0), _site("b", 12, 0.7)]
    twin = bench.TwinExecutor(trainer, "per-site", datasets, 2)
    counter = bench.HopCounter(twin)
    plan = _space().plan(("b", "a"), cycles=3, learning_rate=0.05)
    counter.execute(plan, budget=1.0, report=lambda cycle, value: None)
    assert counter.hops == 2 * 2 * 3  # folds x sites x cycles

    def prune_after_first(cycle: int, value: float) -> None:
        raise PlanPruned("pruned")

    with pytest.raises(PlanPruned):
        counter.execute(plan, budget=1.0, report=prune_after_first)
    assert counter.hops == 12 + 2 * 2  # the pruned run's one cycle is compute spent too


def test_hops_count_a_per_hop_twins_pruned_run_to_the_hop_it_stopped_at(
    bench: Any, trainer: TabularTrainer
) -> None:
    datasets = [_site("a", 16, 0.0), _site("b", 12, 0.7)]
    twin = bench.TwinExecutor(trainer, "per-site", datasets, 2, per_hop=True)
    counter = bench.HopCounter(twin)
    plan = _space().plan(("b", "a"), cycles=3, learning_rate=0.05)
    seen: list[tuple[int, int | None]] = []

    def record(cycle: int, value: float, *, hop: int | None = None) -> None:
        seen.append((cycle, hop))

    counter.execute(plan, budget=1.0, report=record)
    assert seen == [(h // 2, h) for h in range(6)]  # every hop, never a bare cycle report
    assert counter.hops == 2 * 2 * 3

    def prune_at_hop_2(cycle: int, value: float, *, hop: int | None = None) -> None:
        if hop == 2:
            raise PlanPruned("pruned")

    with pytest.raises(PlanPruned):
        counter.execute(plan, budget=1.0, report=prune_at_hop_2)
    assert counter.hops == 12 + 2 * 3  # folds x the three hops it trained


def test_equal_compute_checkpoint_is_the_first_trial_reaching_the_hops(bench: Any) -> None:
    curve = [{"hops": h} for h in (24, 30, 54, 80)]
    assert bench.trials_at_hops(curve, 54) == 3
    assert bench.trials_at_hops(curve, 55) == 4
    assert bench.trials_at_hops(curve, 500) == 4  # never reached: every trial it ran
    assert bench.trials_at_hops(curve, 1) == 1


def test_selection_takes_the_best_completed_trial_only(bench: Any) -> None:
    class Record:
        def __init__(self, state: str, value: float | None) -> None:
            self.state, self.value = state, value

    records = [
        Record("COMPLETE", 0.7),
        Record("PRUNED", None),
        Record("FAIL", None),
        Record("COMPLETE", 0.8),
        Record("COMPLETE", 0.8),
    ]
    assert bench._selected(records) is records[3]
    assert bench._selected(records[1:3]) is None


def _cell(split: int, tests: dict[str, float]) -> dict[str, Any]:
    return {
        "setting": "per-site",
        "split": split,
        "cpu_seconds": 1.0,
        "samplers": {
            name: {
                "curve": [{"trial": 1, "hops": 8, "best_cv": t}],
                "cpu_seconds": 1.0,
                "failed": 0,
                "at": {"1": {"test_avg": t, "cv": t, "hops": 8}},
            }
            for name, t in tests.items()
        },
    }


def test_summary_pairs_every_sampler_with_random_search_by_split(bench: Any) -> None:
    cells = [
        _cell(200, {"random": 0.70, "tpe": 0.72, "gp": 0.69}),
        _cell(201, {"random": 0.60, "tpe": 0.65, "gp": 0.60}),
        _cell(202, {"random": 0.80, "tpe": 0.79, "gp": 0.81}),
    ]
    table = bench.summarise(cells, [1])["per-site"]
    tpe = table["tpe"]["budgets"]["1"]["test_avg_vs_random"]
    assert tpe["differences"] == pytest.approx([0.02, 0.05, -0.01])
    assert (tpe["wins"], tpe["ties"], tpe["losses"]) == (2, 0, 1)
    assert tpe["low"] < tpe["mean"] < tpe["high"]
    gp = table["gp"]["budgets"]["1"]["test_avg_vs_random"]
    assert (gp["wins"], gp["ties"], gp["losses"]) == (1, 1, 1)
    assert "test_avg_vs_random" not in table["random"]["budgets"]["1"]
    assert "global" not in bench.summarise(cells, [1])


def _live_decisions(curve: list[dict[str, Any]], n_startup: int) -> list[int | None]:
    """What Baton's stage pruner decides when the curve's trials report live."""
    pruner = PruningSettings(percentile=50.0, n_startup_trials=n_startup).pruner()
    study = optuna.create_study(direction="maximize", pruner=pruner)
    decisions: list[int | None] = []
    for point in curve:
        trial = study.ask()
        trial.set_user_attr(STAGE_ATTR, stage_key(1.0, point["cycles"]))
        decision = None
        for cycle, value in enumerate(point["intermediate"]):
            trial.report(value, cycle)
            if cycle < point["cycles"] - 1 and trial.should_prune():
                decision = cycle
                break
        decisions.append(decision)
        if decision is None:
            study.tell(trial, point["intermediate"][-1])
        else:
            study.tell(trial, state=TrialState.PRUNED)
    return decisions


def test_replayed_pruning_decides_as_the_live_stage_pruner(bench: Any) -> None:
    rng = random.Random(7)
    curve = []
    for _ in range(30):
        cycles = rng.choice([1, 2, 3])
        values = [rng.uniform(0.5, 0.8) for _ in range(cycles)]
        curve.append({"cycles": cycles, "intermediate": values, "value": values[-1]})
    for n_startup in (2, 5):
        replayed = bench.replay_pruning(curve, n_startup)
        assert replayed == _live_decisions(curve, n_startup)
    assert any(d is not None for d in bench.replay_pruning(curve, 2))


def test_replay_accounts_the_hops_a_pruned_trial_did_not_train(bench: Any) -> None:
    curve = [
        {"cycles": 2, "intermediate": [0.8, 0.8], "value": 0.8, "cycle_hops": [6, 6]},
        {"cycles": 2, "intermediate": [0.7, 0.9], "value": 0.9, "cycle_hops": [6, 6]},
        {"cycles": 2, "intermediate": [0.1, 0.2], "value": 0.2, "cycle_hops": [6, 6]},
    ]
    replay = bench._replayed(curve, 3, 2)
    assert replay["pruned"] == 1  # the third, after its first cycle
    assert replay["hops_saved_share"] == pytest.approx(6 / 36)
    assert replay["best_kept"] is True


def test_test_avg_is_the_mean_of_the_four_centres_only(bench: Any) -> None:
    scores = {"cleveland": 0.8, "hungary": 0.7, "switzerland": 0.5, "va": 0.6}
    with_forgetting = {**scores, "test_worst_loss_forgetting": 6.0e6}
    assert bench.centre_mean(with_forgetting) == pytest.approx(0.65)
    cells = [
        {"samplers": {"tpe": {"at": {"10": {"test_avg": 1.0e6, "site_test": with_forgetting}}}}}
    ]
    bench._recompute_test_avg(cells)
    assert cells[0]["samplers"]["tpe"]["at"]["10"]["test_avg"] == pytest.approx(0.65)
    with pytest.raises(ValueError, match="no test accuracy for va"):
        bench.centre_mean({k: v for k, v in scores.items() if k != "va"})
