"""Baselines the search is compared with: fixed order, FLamby's reshuffled cyclic order,
exhaustive enumeration and random search at equal budget."""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ordering._objective import (
    Aggregation,
    Direction,
    PlanExecutor,
    TrialOutcome,
    aggregate,
)
from ordering._plan import CandidatePlan, HopHyperparameters
from ordering._space import SearchSpace
from ordering._study import OrderingStudy

__all__ = [
    "Evaluation",
    "cyclic_random_plan",
    "evaluate_plan",
    "exhaustive_ranking",
    "fixed_order_plan",
    "random_search",
]

logger = logging.getLogger(__name__)

_DEFAULT_HYPERPARAMETERS = HopHyperparameters()


@dataclass(frozen=True)
class Evaluation:
    """A plan run outside a study, with its objective value."""

    plan: CandidatePlan
    value: float
    outcome: TrialOutcome


def fixed_order_plan(
    order: Sequence[str],
    cycles: int = 1,
    hyperparameters: HopHyperparameters = _DEFAULT_HYPERPARAMETERS,
) -> CandidatePlan:
    """The same order every cycle, with the same hyperparameters at every hop."""
    return CandidatePlan.build([tuple(order)] * cycles, hyperparameters)


def cyclic_random_plan(
    sites: Sequence[str],
    cycles: int,
    hyperparameters: HopHyperparameters = _DEFAULT_HYPERPARAMETERS,
    *,
    seed: int,
) -> CandidatePlan:
    """FLamby's cyclic strategy: a fresh random order every cycle (seeded)."""
    rng = np.random.default_rng(seed)
    orders = [tuple(sites[int(i)] for i in rng.permutation(len(sites))) for _ in range(cycles)]
    return CandidatePlan.build(orders, hyperparameters, encoding="random-cyclic")


def _ignore_report(cycle: int, value: float, *, hop: int | None = None) -> None:
    """Baselines run every plan to the end."""


def evaluate_plan(
    executor: PlanExecutor,
    plan: CandidatePlan,
    *,
    budget: float = 1.0,
    aggregation: Aggregation = "mean",
    direction: Direction = "maximize",
) -> Evaluation:
    """Runs one plan to the end (no pruning) and aggregates its site scores."""
    outcome = executor.execute(plan, budget=budget, report=_ignore_report)
    return Evaluation(plan, aggregate(outcome.site_scores, aggregation, direction), outcome)


def exhaustive_ranking(
    executor: PlanExecutor,
    sites: Sequence[str],
    *,
    cycles: int = 1,
    hyperparameters: HopHyperparameters = _DEFAULT_HYPERPARAMETERS,
    budget: float = 1.0,
    aggregation: Aggregation = "mean",
    direction: Direction = "maximize",
    max_sites: int = 7,
) -> list[Evaluation]:
    """Runs every one of the n! fixed orders and ranks them, best first (ties by order).

    Raises:
        ValueError: If there are more than `max_sites` sites (7 sites = 5,040 runs).
    """
    if len(sites) > max_sites:
        raise ValueError(
            f"exhaustive search over {len(sites)} sites needs {math.factorial(len(sites))} runs; "
            f"the limit is {max_sites} sites"
        )
    evaluations = [
        evaluate_plan(
            executor,
            fixed_order_plan(order, cycles, hyperparameters),
            budget=budget,
            aggregation=aggregation,
            direction=direction,
        )
        for order in itertools.permutations(sites)
    ]
    sign = -1.0 if direction == "maximize" else 1.0
    evaluations.sort(key=lambda e: (sign * e.value, e.plan.order))
    logger.info("ranked %d orders; best %s = %.4f", len(evaluations),
                evaluations[0].plan.describe(), evaluations[0].value)  # fmt: skip
    return evaluations


def random_search(
    executor: PlanExecutor,
    space: SearchSpace,
    n_trials: int | None = None,
    *,
    seed: int,
    budget: float = 1.0,
    max_compute_seconds: float | None = None,
    aggregation: Aggregation = "mean",
    direction: Direction = "maximize",
    storage_url: str | None = None,
    study_name: str | None = None,
    max_forgetting: float | None = None,
    forgetting_tolerance: float | None = None,
) -> OrderingStudy:
    """Random search over the same space with the same executor, for equal-budget comparisons.

    Uniform random orders (a uniform Lehmer code is a uniform permutation) and uniform
    hyperparameters, in an ordinary `OrderingStudy` with a random sampler and no pruning, so its
    history reads like the search's.

    Args:
        executor: The same executor the search uses.
        space: The same space.
        n_trials: Trials to run (the search's count, for equal trial budgets).
        seed: Sampler seed.
        budget: Budget fraction of every trial.
        max_compute_seconds: Or stop at the search's compute seconds.
        aggregation: As the search.
        direction: As the search.
        storage_url: Where to store it (in memory by default).
        study_name: Defaults to ``"random-search-<seed>"``.
        max_forgetting: As the search's (selection only: a random sampler models nothing).
        forgetting_tolerance: As the search's (selection only).
    """
    study = OrderingStudy.create(
        storage_url,
        study_name or f"random-search-{seed}",
        space,
        "lehmer",
        aggregation,
        direction,
        seed=seed,
        sampler="random",
        pruning=None,
        max_forgetting=max_forgetting,
        forgetting_tolerance=forgetting_tolerance,
    )
    study.optimize(
        executor, n_trials, budget_per_trial=budget, max_compute_seconds=max_compute_seconds
    )
    return study
