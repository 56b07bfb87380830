"""Benchmark helper: best-so-far curves of each permutation encoding against random search."""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Sequence
from typing import Any

from ordering._encodings import LehmerCode, PermutationEncoding, RandomKeys
from ordering._objective import Aggregation, Direction, PlanExecutor
from ordering._space import SearchSpace
from ordering._study import OrderingStudy, TrialRecord

__all__ = ["RANDOM_SEARCH", "best_so_far", "compare_encodings"]

logger = logging.getLogger(__name__)

RANDOM_SEARCH = "random-search"


def best_so_far(records: Sequence[TrialRecord], direction: Direction = "maximize") -> list[float]:
    """The best completed value after each trial (NaN until a trial completes)."""
    curve: list[float] = []
    best = float("nan")
    for record in records:
        value = record.value if record.state == "COMPLETE" else None
        if value is not None and (
            best != best  # NaN: nothing completed yet
            or (value > best if direction == "maximize" else value < best)
        ):
            best = value
        curve.append(best)
    return curve


def _trials_to_reach(curve: Sequence[float], target: float, direction: Direction) -> int | None:
    for i, value in enumerate(curve):
        if value == value and (value >= target if direction == "maximize" else value <= target):
            return i + 1
    return None


def compare_encodings(
    objective: PlanExecutor,
    n_trials: int,
    seeds: Sequence[int],
    *,
    space: SearchSpace | None = None,
    target: float | None = None,
    encodings: Sequence[PermutationEncoding] | None = None,
    aggregation: Aggregation = "mean",
    direction: Direction = "maximize",
    n_startup_trials: int | None = None,
    tolerance: float = 1e-9,
) -> dict[str, Any]:
    """Runs the TPE search once per encoding and seed, and random search per seed, all in memory.

    Args:
        objective: The executor (e.g. a `SyntheticObjective`).
        n_trials: Trials per run.
        seeds: One run per seed and method.
        space: The search space; defaults to ``objective.default_space()`` when it has one.
        target: The value counted as "reached" (e.g. the best from exhaustive enumeration);
            defaults to ``objective.best_value`` when it has one.
        encodings: Defaults to Lehmer code and random keys.
        aggregation: As the search.
        direction: As the search.
        n_startup_trials: TPE's random start (`OrderingStudy.create`'s default when None).
        tolerance: Reaching ``target - tolerance`` (maximizing) counts.

    Returns:
        JSON-able: ``{"n_trials", "seeds", "target", "methods": {name: {"best_so_far":
        [curve per seed], "median_best_so_far": [...], "trials_to_target": [per seed, None if
        never], "runs_to_target": [the same, counting only trials that ran the executor (not
        reused repeats)], "median_trials_to_target" (not reached counts as n_trials + 1),
        "wall_seconds"}}}``.
    """
    if space is None:
        default_space = getattr(objective, "default_space", None)
        if default_space is None:
            raise ValueError("give a space (the objective has no default_space())")
        space = default_space()
        assert isinstance(space, SearchSpace)
    if target is None:
        best_value = getattr(objective, "best_value", None)
        target = float(best_value) if best_value is not None else None
    methods: list[tuple[str, str, PermutationEncoding]] = [
        (encoding.name, "tpe", encoding) for encoding in (encodings or (LehmerCode(), RandomKeys()))
    ]
    methods.append((RANDOM_SEARCH, "random", LehmerCode()))
    result: dict[str, Any] = {
        "n_trials": n_trials,
        "seeds": list(seeds),
        "target": target,
        "methods": {},
    }
    for name, sampler, encoding in methods:
        curves: list[list[float]] = []
        reached: list[int | None] = []
        runs: list[int | None] = []
        started = time.perf_counter()
        for seed in seeds:
            study = OrderingStudy.create(
                None,
                f"compare-{name}-{seed}",
                space,
                encoding,
                aggregation,
                direction,
                seed=seed,
                sampler="random" if sampler == "random" else "tpe",
                pruning=None,
                n_startup_trials=n_startup_trials,
            )
            records = study.optimize(objective, n_trials)
            curve = best_so_far(records, direction)
            curves.append(curve)
            if target is not None:
                goal = target - tolerance if direction == "maximize" else target + tolerance
                trials = _trials_to_reach(curve, goal, direction)
                reached.append(trials)
                runs.append(
                    None
                    if trials is None
                    else sum(r.duplicate_of is None for r in records[:trials])
                )
        entry: dict[str, Any] = {
            "best_so_far": curves,
            "median_best_so_far": [
                statistics.median(column) for column in zip(*curves, strict=True)
            ],
            "wall_seconds": time.perf_counter() - started,
        }
        if target is not None:
            entry["trials_to_target"] = reached
            entry["runs_to_target"] = runs
            entry["median_trials_to_target"] = statistics.median(
                n_trials + 1 if r is None else r for r in reached
            )
        result["methods"][name] = entry
        logger.info("%s: median trials to target %s", name, entry.get("median_trials_to_target"))
    return result
