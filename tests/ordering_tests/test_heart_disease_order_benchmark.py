"""benchmarks/heart_disease_order.py: the variance components of the order effect, the CV
designs' ranking figures, the test halves and the per-row scores, on synthetic data."""

from __future__ import annotations

import dataclasses
import itertools
import math
import random
import statistics
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import pytest

from ordering import CandidatePlan
from site_agent.examples import TabularExample
from site_agent.registry import RegisteredDataset
from site_agent.simulation import train_sequential
from site_agent.tasks import HopHyperparameters, TabularTrainer, TaskSpec
from tests.benchmark_module import benchmark_module, tabular_trainer

ORDERS = 24


@pytest.fixture(scope="module")
def bench() -> Iterator[ModuleType]:
    with benchmark_module("heart_disease_order.py", "heart_disease_order_benchmark") as module:
        yield module


def _scores(value: float) -> dict[str, dict[str, float]]:
    return {"site": {"accuracy": value, "auroc": value, "brier": 1 - value,
                     "clipped_loss": 1 - value, "examples": 10.0}}  # fmt: skip


def _split(
    rng: random.Random, sd_true: float, sd_seed: float, sd_rows: float, cv_noise: float
) -> dict[str, Any]:
    """24 orders whose test Avg is true effect + order x seed + order x half rows, and whose
    CV score is the true effect plus independent noise per draw."""
    seeds, draws = 3, 3
    true = [rng.gauss(0, sd_true) for _ in range(ORDERS)]
    seed_part = [[rng.gauss(0, sd_seed) for _ in range(ORDERS)] for _ in range(seeds)]
    rows = {h: [rng.gauss(0, sd_rows) for _ in range(ORDERS)] for h in ("a", "b")}
    orders = []
    for o in range(ORDERS):
        test = []
        for m in range(seeds):
            half = {h: 0.7 + true[o] + seed_part[m][o] + rows[h][o] for h in ("a", "b")}
            test.append({
                "full": _scores((half["a"] + half["b"]) / 2),
                "a": _scores(half["a"]),
                "b": _scores(half["b"]),
            })  # fmt: skip
        cv = [{"sites": _scores(0.7 + true[o] + rng.gauss(0, cv_noise)), "failure_reason": None}
              for _ in range(draws)]  # fmt: skip
        orders.append({"order": [f"o{o}"], "cv": {"3": cv}, "test": test})
    return {"split": 0, "orders": orders}


def test_variance_components_recover_the_true_order_effect_and_cv_reliability(
    bench: ModuleType,
) -> None:
    rng = random.Random(5)
    splits = [_split(rng, 0.02, 0.01, 0.015, 0.02) for _ in range(150)]
    point = bench.components_summary(splits, "3", boot=20)["point"]
    assert point["sd_true"] == pytest.approx(0.02, rel=0.15)
    assert point["sd_seed"] == pytest.approx(0.01, rel=0.3)
    # The full test averages the two halves: its order x rows SD is the half's / sqrt(2).
    assert point["sd_rows_full"] == pytest.approx(0.015 / math.sqrt(2), rel=0.3)
    # CV = true + noise of equal SD: a single draw's reliability is 1/2, and its replicable
    # part is the true effect itself.
    assert point["cv_reliability"] == pytest.approx(0.5, abs=0.08)
    assert point["cv_test_corr_true"] == pytest.approx(1.0, abs=0.12)
    assert point["gain_cv_limit"] == pytest.approx(point["gain_oracle_true"], rel=0.15)
    assert point["gain_one_draw"] < point["gain_cv_limit"]


def test_without_an_order_effect_no_cv_design_gains(bench: ModuleType) -> None:
    rng = random.Random(6)
    splits = [_split(rng, 0.0, 0.01, 0.015, 0.02) for _ in range(150)]
    point = bench.components_summary(splits, "3", boot=20)["point"]
    assert abs(point["sd_true"]) < 0.004
    assert abs(point["gain_one_draw"]) < 0.003
    for row in bench.design_table(splits[:15], {"draws": 3, "cv_folds": [3]}):
        assert row["gain_seed0"]["low"] < 0 < row["gain_seed0"]["high"]


def test_a_design_that_sees_the_test_scores_ranks_them_perfectly(bench: ModuleType) -> None:
    split = _split(random.Random(7), 0.02, 0.0, 0.0, 0.0)
    metrics = bench.design_metrics(split, ["3"], 1, "accuracy")
    assert metrics["rho_seed0"] == pytest.approx(1.0)
    test0 = bench.test_matrix(split, "full")[0]
    assert metrics["gain_seed0"] == pytest.approx(max(test0) - statistics.fmean(test0))


def test_a_failed_cv_draw_is_never_selected(bench: ModuleType) -> None:
    split = _split(random.Random(8), 0.02, 0.0, 0.0, 0.0)
    test0 = bench.test_matrix(split, "full")[0]
    best = max(range(ORDERS), key=lambda o: test0[o])
    for entry in split["orders"][best]["cv"]["3"]:
        entry["failure_reason"] = "fold 0: one class predicted for every row"
    metrics = bench.design_metrics(split, ["3"], 1, "accuracy")
    second = sorted(test0)[-2]
    assert metrics["gain_seed0"] == pytest.approx(second - statistics.fmean(test0))


def test_the_order_main_effect_is_found_when_one_site_last_always_wins(bench: ModuleType) -> None:
    rng = random.Random(9)
    sites = bench.SITES
    orders = list(itertools.permutations(sites))
    splits = []
    for _ in range(8):
        entries = []
        for order in orders:
            value = 0.7 + (0.03 if order[-1] == sites[0] else 0.0) + rng.gauss(0, 0.01)
            entries.append({"order": list(order), "test": [{"full": _scores(value)}]})
        splits.append({"orders": entries})
    effect = bench.order_main_effect(splits)
    assert effect["p"] < 0.001
    assert effect["position"]["last"][sites[0]]["low"] > 0.015
    assert effect["best_order"][-1] == sites[0]


def test_power_needs_more_splits_for_a_smaller_effect(bench: ModuleType) -> None:
    differences = [0.03, -0.02, 0.01, 0.0, 0.025, -0.015]
    result = bench.power(differences, {"small": 0.002, "large": 0.02, "none": 0.0})
    sd = statistics.stdev(differences)
    assert result["needed"]["large"]["n50"] == math.ceil((1.959964 * sd / 0.02) ** 2)
    assert result["needed"]["small"]["n80"] > result["needed"]["large"]["n80"]
    assert result["needed"]["none"]["n50"] is None


def _site(name: str, rows: int, seed: int = 3) -> RegisteredDataset:
    rng = random.Random(f"{name}:{seed}")
    examples = []
    for i in range(rows):
        label = i % 2
        features = (label + rng.gauss(0, 0.8), rng.gauss(0, 1.0))
        examples.append(TabularExample(features=features, label=str(label)))
    return RegisteredDataset(
        name=name, task_type="tabular", fingerprint="0" * 64, train=tuple(examples[:30]),
        validation=(), test=tuple(examples[30:]), feature_names=("x", "y"), labels=("0", "1"),
        seed=seed,
    )  # fmt: skip


def test_test_halves_are_disjoint_stratified_and_cover_the_test_rows(bench: ModuleType) -> None:
    datasets = [_site("a", 47), _site("b", 40)]
    first, second = bench.test_halves(datasets, 3)
    for whole, x, y in zip(datasets, first, second, strict=True):
        assert sorted(map(id, x.test + y.test)) == sorted(map(id, whole.test))
        assert abs(len(x.test) - len(y.test)) <= 1
        for label in ("0", "1"):
            count = [sum(r.label == label for r in h.test) for h in (x, y)]
            assert abs(count[0] - count[1]) <= 1
        assert x.train == whole.train  # the site's normaliser is unchanged
    assert [d.test for d in bench.test_halves(datasets, 3)[0]] == [d.test for d in first]
    assert [d.test for d in bench.test_halves(datasets, 4)[0]] != [d.test for d in first]


def test_row_scores_agree_with_the_trainers_own_evaluation(bench: ModuleType) -> None:
    trainer: TabularTrainer = tabular_trainer()
    spec = TaskSpec("tabular", labels=("0", "1"), options={"model": "logistic"})
    site = _site("a", 60)
    hp = HopHyperparameters(learning_rate=0.05, steps=20, batch_size=4, max_grad_norm=0.0)
    tensors = train_sequential(trainer, spec, [(site, hp)]).tensors
    ours = bench.row_metrics(*bench.row_logits(trainer, spec, tensors, site, "test"))
    theirs = trainer.evaluate(spec, site, "test", tensors)
    for key in ("accuracy", "loss", "auroc", "examples"):
        assert ours[key] == pytest.approx(theirs[key], rel=1e-5)
    assert 0 <= ours["brier"] <= 1
    assert ours["clipped_loss"] <= ours["loss"] + 1e-9


def test_row_metrics_bound_the_loss_of_an_extreme_row(bench: ModuleType) -> None:
    scores = bench.row_metrics([50.0, -3.0, 2.0], [0, 0, 1])
    assert scores["loss"] > 15
    assert scores["clipped_loss"] < -math.log(bench.LOSS_CLIP) / 3 + 0.2
    assert scores["accuracy"] == pytest.approx(2 / 3)


def test_reseeded_shifts_every_hops_seed_and_nothing_else(bench: ModuleType) -> None:
    hp = HopHyperparameters(learning_rate=0.01, steps=5, batch_size=4, seed=11)
    plan = CandidatePlan.build([("a", "b"), ("b", "a")], hp, learning_rate_decay=0.9)
    shifted = bench.reseeded(plan, bench.SEED_STRIDE)
    assert [h.site for h in shifted.hops] == [h.site for h in plan.hops]
    for old, new in zip(plan.hops, shifted.hops, strict=True):
        assert new.hyperparameters.seed == old.hyperparameters.seed + bench.SEED_STRIDE
        assert dataclasses.replace(new.hyperparameters, seed=old.hyperparameters.seed) == (
            old.hyperparameters
        )
    assert bench.reseeded(plan, 0) is plan
