"""benchmarks/medquad_order.py: its variance components, their intervals, the power of a paired
interval over splits and the seed shift of a plan (no MiniLM, no training)."""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import pytest

from ordering import CandidatePlan
from protocols.hyperparameters import HopHyperparameters
from tests.benchmark_module import benchmark_module


@pytest.fixture(scope="module")
def bench() -> Iterator[ModuleType]:
    with benchmark_module("medquad_order.py", "medquad_order_benchmark") as module:
        yield module


def _groups(
    rng: random.Random, orders: int, seeds: int, sd_order: float, sd_seed: float, shared: float
) -> Any:
    """Orders x seed shifts: an order effect, a seed-shift effect every order shares (sd
    `shared`) and noise."""
    shifts = [rng.gauss(0, shared) for _ in range(seeds)]
    groups = []
    for _ in range(orders):
        effect = rng.gauss(0, sd_order)
        groups.append([effect + shift + rng.gauss(0, sd_seed) for shift in shifts])
    return groups


def test_mean_squares_are_the_one_way_and_the_crossed_anova_ones(bench: Any) -> None:
    # Means 2 and 6: between 2 * var(2, 6) = 16 on 1 df; within (1+1+1+1) / 2 = 2 on 2 df.
    assert bench.mean_squares([[1.0, 3.0], [5.0, 7.0]]) == (16.0, 1, 2.0, 2, 2)
    # Crossed: both groups' second run is 2 higher (replicate means 3 and 5, a shared effect
    # of 2 * ((3 - 4)**2 + (5 - 4)**2) = 4), which leaves 4 - 4 = 0 on 2 - 1 df.
    assert bench.mean_squares([[1.0, 3.0], [5.0, 7.0]], crossed=True) == (16.0, 1, 0.0, 1, 2)
    with pytest.raises(ValueError, match="same size"):
        bench.mean_squares([[1.0, 2.0], [3.0]])


def test_no_spread_beyond_the_seeds_gives_no_order_component(bench: Any) -> None:
    result = bench.order_variance(4e-5, 23, 4e-5, 23, 1)
    assert result["var"] == 0.0 and result["sd"] == 0.0
    assert result["f"] == 1.0
    assert result["p"] == pytest.approx(0.5)  # F(23, 23) is symmetric about 1 on a log scale
    assert result["var_low"] == 0.0 and result["ratio_low"] == 0.0
    assert result["var_high"] > 0.0 and result["ratio_high"] > 0.0


def test_an_order_spread_far_above_the_seeds_is_detected(bench: Any) -> None:
    # Orders spread with sd 0.01 (var 1e-4) on seeds of sd 0.002 (var 4e-6).
    result = bench.order_variance(1e-4 + 4e-6, 23, 4e-6, 23, 1)
    assert result["var"] == pytest.approx(1e-4)
    assert result["p"] < 1e-6
    assert 0 < result["sd_low"] < result["sd"] < result["sd_high"]
    assert result["ratio_low"] > 1.0


@pytest.mark.parametrize(("sd_order", "seeds", "shared"), [(1.0, 2, 0.0), (0.5, 4, 2.0)])
def test_the_order_variance_interval_covers_the_true_component_about_95_percent(
    bench: Any, sd_order: float, seeds: int, shared: float
) -> None:
    # A seed shift shared by every order (sd 2, twice the noise) must not bias the estimate.
    rng = random.Random(17)
    runs, covered, covered_ratio = 400, 0, 0
    for _ in range(runs):
        result = bench.nested(_groups(rng, 24, seeds, sd_order, 1.0, shared))
        covered += result["var_low"] <= sd_order**2 <= result["var_high"]
        covered_ratio += result["ratio_low"] <= sd_order**2 <= result["ratio_high"]
    # Binomial SD of a 95% coverage over 400 runs is about 1.1 points.
    assert 0.91 <= covered / runs <= 0.99
    assert 0.91 <= covered_ratio / runs <= 0.99


def test_pooling_splits_adds_their_degrees_of_freedom(bench: Any) -> None:
    one = bench.mean_squares([[0.1, 0.3], [0.5, 0.6], [0.2, 0.2]])
    both = bench.pooled([one, one])
    alone = bench.order_variance(*one)
    assert both["df"] == [2 * one[1], 2 * one[3]]
    assert both["var"] == pytest.approx(alone["var"])
    assert both["var_high"] - both["var_low"] < alone["var_high"] - alone["var_low"]


def test_spread_against_seeds_compares_orders_with_one_order_rerun(bench: Any) -> None:
    rng = random.Random(3)
    orders = [rng.gauss(0, 0.01) for _ in range(24)]
    seeds = [rng.gauss(0, 0.002) for _ in range(24)]
    result = bench.spread_against_seeds(orders, seeds)
    assert result["f"] == pytest.approx(statistics.variance(orders) / statistics.variance(seeds))
    assert result["df"] == [23, 23]
    with pytest.raises(ValueError, match="two orders"):
        bench.spread_against_seeds(orders[:1], seeds)


def test_splits_needed_matches_the_one_sample_t_test_power(bench: Any) -> None:
    # Effect size 1 and 0.5 at 80% power, two-sided 5%: n = 9.94 and 33.37 (pwr.t.test).
    assert bench.splits_needed(0.01, 0.01) == 10
    assert bench.splits_needed(0.005, 0.01) == 34
    assert bench.splits_needed(0.0, 0.01) is None
    assert bench.splits_needed(-0.002, 0.01) is None
    assert bench.splits_needed(1e-9, 1.0, cap=1000) is None


def test_a_seed_shift_moves_every_hops_seed_and_nothing_else(bench: Any) -> None:
    plan = CandidatePlan.build(
        [("a", "b", "c"), ("a", "b", "c")],
        HopHyperparameters(learning_rate=0.1, steps=5, seed=15),
        learning_rate_decay=0.9,
    )
    shifted = bench.with_seed_shift(plan, 1000)
    assert [h.hyperparameters.seed for h in shifted.hops] == [1015 + k for k in range(6)]
    assert [h.site for h in shifted.hops] == [h.site for h in plan.hops]
    assert [h.hyperparameters.learning_rate for h in shifted.hops] == [
        h.hyperparameters.learning_rate for h in plan.hops
    ]
    assert shifted.cycle_orders == plan.cycle_orders
    assert math.isclose(shifted.learning_rate_decay, plan.learning_rate_decay)
