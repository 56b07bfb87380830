"""MedQuAD: is the order's spread at tuned settings more than re-running one order gives?

Issue 17 item 5. Session 8 (``mq8-medquad-paired``) ran 24 random orders at the tuned random
order's settings and found a spread of about a point; this script asks how much of that spread is
the order and how much is training noise, and whether cross-validation can see the order.

Per setting (sources, Dirichlet 0.1, Dirichlet 1.0) and split, at ``medquad_paired.py``'s design
(``--space budget --seed-default``, TPE with its default start, the same trials and folds):

1. the random order's settings are tuned exactly as ``medquad_paired.py`` tunes them (the same
   study, seed and enqueued default), and its 24 random orders are drawn from the same RNG, so
   replicate 0 below reproduces session 8's 24 test scores;
2. **test, 24 orders x 2 training seeds**: every order trained on the split's training rows and
   scored on test (mean over the six sites) with the plan's own seeds (replicate 0) and with
   every hop's seed moved by ``SEED_STRIDE`` (replicate 1). A hop's seed is what the tabular
   trainer takes as its training seed: it draws the batch order of that hop and, at the first
   hop, the initial weights;
3. **test, one order x 24 training seeds**: the first of those orders, its seeds moved by
   ``r * SEED_STRIDE`` for r = 0..23 (r = 0 and 1 are its two runs of step 2);
4. **CV, 24 orders x 2 fold draws**: every order's k-fold CV score as the study sees it (folds
   seeded with the split, the plan's seeds: draw A) and on an independent draw (folds seeded with
   ``FOLD_DRAW_B + split``, every hop's seed moved by ``FOLD_DRAW_B``: draw B).

Variance components (``order_variance``): a one-order-many-seeds spread measures training noise
(sigma_s^2); the spread of orders at one seed measures sigma_o^2 + sigma_s^2. The order's SD
beyond seed noise, sigma_o, is estimated two ways per split: (a) 24 orders at seed 0 against the
fixed order's 24 seeds (an F test with 23 and 23 df, the brief's design), and (b) the 24 x 2
design, orders crossed with the two seed shifts (two-way ANOVA without interaction, 23 and 23
df): a seed shift is shared by every order (hop k of every order gets seed + k, the first hop's
initial weights are the same), and its main effect is measurable, so it is taken out of the
noise term rather than counted as order-to-order noise. Design (a) counts that shared part in
the fixed order's seed spread but not in the orders' spread, so it understates sigma_o when the
shared part is large, and it relies on one order's noise standing for all 24. Intervals: the
exact interval for the ratio sigma_o^2 / sigma_s^2 from F quantiles, and the modified
large-sample (Graybill-Wang) interval for sigma_o^2 (Burdick & Graybill 1992). Pooled over a
setting's splits, the mean squares are pooled (their df add).

Reliability: Spearman rank correlations over the 24 orders of CV draw A vs draw B, CV A vs test,
and test seed 0 vs seed 1. Value: the test score (mean of both seeds) of the order CV picks (best
of draw A) and of the order test seed 0 picks, scored on seed 1, each minus the mean order;
from them and mq8's per-split SD of searched - random order, the splits a searched - random
order interval needs to exclude 0 (``splits_needed``, 80% power, two-sided 95% t-interval).

    .venv/bin/python benchmarks/medquad_order.py --splits 40 41 42              # development
    .venv/bin/python benchmarks/medquad_order.py --splits 15 16 17 18 19 --name mqord9-reported
    .venv/bin/python benchmarks/medquad_order.py --quick                         # smoke run
    .venv/bin/python benchmarks/medquad_order.py --render benchmarks/results/X.json

Writes benchmarks/results/NAME.{json,md,png} after every (setting, split).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import platform
import random
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from _harness import markdown_section
from heart_disease_paired import _reordered, _spearman
from medquad_paired import (
    DEFAULT_DATA,
    RANDOM_ORDERS,
    RESULTS_DIR,
    SETTINGS,
    Scorer,
    TwinExecutor,
    _best,
    _scorer,
    _site_hp,
    _spec,
    add_report_arguments,
    default_start,
    fresh_random_orders,
    load_pool,
    memoise_feature_matrices,
    search_space,
    split_sites,
    tuned_random_order_study,
)

from ordering import CandidatePlan
from site_agent.registry import RegisteredDataset
from site_agent.simulation import train_sequential
from site_agent.tasks import TabularTrainer, TaskSpec, Trainer, create_trainer

logger = logging.getLogger("benchmarks.medquad_order")

SEED_STRIDE = 1000  # a replicate's seed shift: more than any plan's hops, so no seed repeats
SEED_REPLICATES = 24  # runs of the fixed order
FOLD_DRAW_B = 50_000  # draw B's folds are seeded with this + split, its hops' seeds shifted by it
EXPECTED_MAX_OF_24 = 1.9477  # E[max of 24 standard normals]: the best of 24 orders, in SDs
MQ8_REPORT = RESULTS_DIR / "mq8-medquad-paired.json"


# ---- statistics (pure) ------------------------------------------------------------------------


def order_variance(
    ms_between: float,
    df_between: int,
    ms_within: float,
    df_within: int,
    replicates: int,
    level: float = 0.95,
) -> dict[str, Any]:
    """The order's variance component beyond training noise, with intervals.

    ``ms_between`` estimates sigma_s^2 + replicates * sigma_o^2 (the spread of orders, each the
    mean of ``replicates`` seeds), ``ms_within`` estimates sigma_s^2 (the spread of seeds of one
    order). Returns the estimate of sigma_o^2 (clipped at 0) and sigma_o, the F ratio and its
    one-sided p (no order effect), the exact interval for sigma_o^2 / sigma_s^2, and the modified
    large-sample interval for sigma_o^2 and sigma_o (Burdick & Graybill 1992, sec. 3.3).

    Raises:
        ValueError: If a mean square is negative, a df below 1 or ``replicates`` below 1.
    """
    from scipy import stats

    if ms_between < 0 or ms_within < 0:
        raise ValueError("mean squares cannot be negative")
    if df_between < 1 or df_within < 1 or replicates < 1:
        raise ValueError("degrees of freedom and replicates must be at least 1")
    alpha = (1 - level) / 2
    n1, n2, c = df_between, df_within, 1.0 / replicates
    estimate = c * (ms_between - ms_within)
    f_ratio = ms_between / ms_within if ms_within > 0 else math.inf
    p = float(stats.f.sf(f_ratio, n1, n2)) if math.isfinite(f_ratio) else 0.0
    # Upper-alpha points, as Burdick & Graybill write them (F_a: area a to the right).
    f_hi = float(stats.f.ppf(1 - alpha, n1, n2))
    f_lo = float(stats.f.ppf(alpha, n1, n2))
    ratio_low = max(0.0, c * (f_ratio / f_hi - 1)) if math.isfinite(f_ratio) else math.inf
    ratio_high = c * (f_ratio / f_lo - 1) if math.isfinite(f_ratio) else math.inf
    g1 = 1 - n1 / float(stats.chi2.ppf(1 - alpha, n1))
    h1 = n1 / float(stats.chi2.ppf(alpha, n1)) - 1
    g2 = 1 - n2 / float(stats.chi2.ppf(1 - alpha, n2))
    h2 = n2 / float(stats.chi2.ppf(alpha, n2)) - 1
    g12 = ((f_hi - 1) ** 2 - g1**2 * f_hi**2 - h2**2) / f_hi
    h12 = ((1 - f_lo) ** 2 - h1**2 * f_lo**2 - g2**2) / f_lo
    s1, s2 = c * ms_between, c * ms_within
    v_low = g1**2 * s1**2 + h2**2 * s2**2 + g12 * s1 * s2
    v_high = h1**2 * s1**2 + g2**2 * s2**2 + h12 * s1 * s2
    low = max(0.0, estimate - math.sqrt(max(0.0, v_low)))
    high = max(0.0, estimate + math.sqrt(max(0.0, v_high)))
    return {
        "var": max(0.0, estimate),
        "sd": math.sqrt(max(0.0, estimate)),
        "var_low": low,
        "var_high": high,
        "sd_low": math.sqrt(low),
        "sd_high": math.sqrt(high),
        "seed_sd": math.sqrt(ms_within),
        "f": f_ratio,
        "p": p,
        "ratio_low": ratio_low,
        "ratio_high": ratio_high,
        "df": [n1, n2],
        "replicates": replicates,
    }


def spread_against_seeds(orders: Sequence[float], seeds: Sequence[float]) -> dict[str, Any]:
    """Design (a): orders at one seed against one order at many seeds (one run each)."""
    if len(orders) < 2 or len(seeds) < 2:
        raise ValueError("need at least two orders and two seeds")
    return order_variance(
        statistics.variance(orders), len(orders) - 1, statistics.variance(seeds), len(seeds) - 1, 1
    )


def mean_squares(
    groups: Sequence[Sequence[float]], crossed: bool = False
) -> tuple[float, int, float, int, int]:
    """ANOVA of equal-sized groups (an order's runs at several seeds): (MS between, its df,
    MS within, its df, runs per group). One-way; with `crossed`, run j of every group shares a
    replicate (the same seed shift), whose main effect leaves the within term (two-way without
    interaction: the residual has (groups - 1)(runs - 1) df).

    Raises:
        ValueError: With fewer than two groups, fewer than two runs each, or unequal groups.
    """
    sizes = {len(g) for g in groups}
    if len(groups) < 2 or len(sizes) != 1 or min(sizes) < 2:
        raise ValueError("need at least two groups of the same size, two runs or more each")
    n = sizes.pop()
    means = [statistics.fmean(g) for g in groups]
    within = sum(sum((v - m) ** 2 for v in g) for g, m in zip(groups, means, strict=True))
    df_within = len(groups) * (n - 1)
    if crossed:
        grand = statistics.fmean(means)
        replicates = [statistics.fmean(g[j] for g in groups) for j in range(n)]
        within -= len(groups) * sum((r - grand) ** 2 for r in replicates)
        df_within -= n - 1
    return n * statistics.variance(means), len(groups) - 1, within / df_within, df_within, n


def nested(groups: Sequence[Sequence[float]]) -> dict[str, Any]:
    """Design (b): every order at the same seed shifts (orders x replicates, crossed)."""
    return order_variance(*mean_squares(groups, crossed=True))


def pooled(parts: Sequence[tuple[float, int, float, int, int]]) -> dict[str, Any]:
    """``order_variance`` of several splits' mean squares pooled (df-weighted; df add)."""
    if not parts or len({p[4] for p in parts}) != 1:
        raise ValueError("pool at least one split, all with the same replicates")
    df1, df2 = sum(p[1] for p in parts), sum(p[3] for p in parts)
    ms1 = sum(p[0] * p[1] for p in parts) / df1
    ms2 = sum(p[2] * p[3] for p in parts) / df2
    return order_variance(ms1, df1, ms2, df2, parts[0][4])


def splits_needed(
    difference: float, sd: float, power: float = 0.8, level: float = 0.95, cap: int = 100_000
) -> int | None:
    """Fewest splits at which a two-sided `level` t-interval over splits of a paired difference
    with mean `difference` and per-split SD `sd` lies above 0 with probability `power`; None if
    the difference is not positive or needs more than `cap` splits."""
    from scipy import stats

    if difference <= 0 or sd < 0:
        return None
    if sd == 0:
        return 2

    def reached(n: int) -> bool:
        critical = float(stats.t.ppf(1 - (1 - level) / 2, n - 1))
        noncentrality = difference * math.sqrt(n) / sd
        return float(stats.nct.sf(critical, n - 1, noncentrality)) >= power

    high = 2
    while not reached(high):
        if high >= cap:
            return None
        high = min(cap, high * 2)
    low = max(2, high // 2)
    while low < high:  # smallest n in [low, high] that reaches the power
        middle = (low + high) // 2
        if reached(middle):
            high = middle
        else:
            low = middle + 1
    return high


# ---- runs -------------------------------------------------------------------------------------


def with_seed_shift(plan: CandidatePlan, shift: int) -> CandidatePlan:
    """`plan` with every hop's training seed moved by `shift` (order and settings unchanged)."""
    return dataclasses.replace(
        plan,
        hops=tuple(
            hop._replace(
                hyperparameters=dataclasses.replace(
                    hop.hyperparameters, seed=hop.hyperparameters.seed + shift
                )
            )
            for hop in plan.hops
        ),
    )


def scored_on_test(
    trainer: Trainer,
    spec: TaskSpec,
    datasets: Sequence[RegisteredDataset],
    plan: CandidatePlan,
    scorer: Scorer,
) -> float:
    """Mean over the sites of test accuracy after training `plan` on the training rows."""
    by_name = {d.name: d for d in datasets}
    visits = [(by_name[hop.site], _site_hp(hop.hyperparameters.model_dump())) for hop in plan.hops]
    tensors = train_sequential(trainer, spec, visits).tensors
    return statistics.fmean(scorer.accuracy(tensors, d.test) for d in datasets)


def tuned_random_order(
    trainer: Trainer,
    spec: TaskSpec,
    datasets: Sequence[RegisteredDataset],
    split: int,
    config: Mapping[str, Any],
) -> tuple[CandidatePlan, float, list[tuple[str, ...]]]:
    """``medquad_paired.sequential_methods``' tuned random order under ``--space budget
    --seed-default`` (the same study, seed and enqueued default) with the config's trials,
    folds and max steps, its CV value and its ``RANDOM_ORDERS`` random orders (the same RNG)."""
    sites = [d.name for d in datasets]
    space = search_space(sites, split, config["max_steps"], "budget")
    executor = TwinExecutor(trainer, spec, datasets, config["folds"], _scorer(trainer, spec))
    sizes = {d.name: len(d.train) for d in datasets}
    default = default_start(space, tuple(sorted(sites, key=lambda s: (sizes[s], s))))
    study, _ = tuned_random_order_study(executor, space, split, config["trials"], default)
    chosen = _best(study)
    assert chosen.plan is not None and chosen.value is not None
    return chosen.plan, float(chosen.value), fresh_random_orders(sites, split, RANDOM_ORDERS)


def cv_accuracy(
    trainer: Trainer,
    spec: TaskSpec,
    datasets: Sequence[RegisteredDataset],
    folds: int,
    plan: CandidatePlan,
) -> tuple[float, str | None]:
    """The plan's k-fold CV score as the study computes it (mean over sites), and any failure."""
    executor = TwinExecutor(trainer, spec, datasets, folds, _scorer(trainer, spec))
    outcome = executor.execute(plan, budget=math.inf, report=lambda step, value: None)
    return statistics.fmean(s.value for s in outcome.site_scores), outcome.failure_reason


def run_cell(
    trainer: Trainer, pool: Sequence[Any], setting: str, split: int, config: Mapping[str, Any]
) -> dict[str, Any]:
    """Steps 1-4 of the module docstring on one (setting, split)."""
    started, cpu = time.perf_counter(), time.process_time()
    datasets, _ = split_sites(pool, setting, split)
    spec = _spec(sorted({r.label for r in pool}))
    scorer = _scorer(trainer, spec)
    folds = config["folds"]
    plan, tuned_cv, orders = tuned_random_order(trainer, spec, datasets, split, config)
    tuning_cpu = time.process_time() - cpu
    plans = [_reordered(plan, o) for o in orders]
    test = [
        [scored_on_test(trainer, spec, datasets, with_seed_shift(p, r * SEED_STRIDE), scorer)
         for r in range(2)]
        for p in plans
    ]  # fmt: skip
    fixed = [test[0][0], test[0][1]] + [
        scored_on_test(trainer, spec, datasets, with_seed_shift(plans[0], r * SEED_STRIDE), scorer)
        for r in range(2, config["seed_replicates"])
    ]
    draw_b = [dataclasses.replace(d, seed=FOLD_DRAW_B + split) for d in datasets]
    cv_a, cv_b, failures = [], [], []
    for p in plans:
        value, reason = cv_accuracy(trainer, spec, datasets, folds, p)
        cv_a.append(value)
        failures += [reason] if reason else []
        value, reason = cv_accuracy(trainer, spec, draw_b, folds, with_seed_shift(p, FOLD_DRAW_B))
        cv_b.append(value)
        failures += [reason] if reason else []
    cell = {
        "setting": setting,
        "split": split,
        "tuned_plan": plan.describe(),
        "tuned_hyperparameters": plan.hops[0].hyperparameters.model_dump(),
        "tuned_learning_rate_decay": plan.learning_rate_decay,
        "tuned_cv": tuned_cv,
        "orders": [list(o) for o in orders],
        "test": test,
        "fixed_order_seeds": fixed,
        "cv_a": cv_a,
        "cv_b": cv_b,
        "failures": failures,
        "seconds": time.perf_counter() - started,
        "cpu_seconds": time.process_time() - cpu,
        "tuning_cpu_seconds": tuning_cpu,
    }
    cell.update(cell_statistics(cell))
    logger.info(
        "[%s] split %d: order sd %.4f (seed sd %.4f, p %.3g), rho CV A/B %s, CV/test %s, %.0f s",
        setting,
        split,
        cell["against_seeds"]["sd"],
        cell["against_seeds"]["seed_sd"],
        cell["against_seeds"]["p"],
        _fmt(cell["rho"]["cv_a_cv_b"], 2),
        _fmt(cell["rho"]["cv_a_test"], 2),
        cell["seconds"],
    )
    return cell


def _spread(values: Sequence[float]) -> dict[str, float]:
    return {"range": max(values) - min(values), "std": statistics.stdev(values)}


def cell_statistics(cell: Mapping[str, Any]) -> dict[str, Any]:
    """Spreads, variance components, rank correlations and selection gains of one cell."""
    test = cell["test"]
    seed0 = [t[0] for t in test]
    seed1 = [t[1] for t in test]
    mean_test = [statistics.fmean(t) for t in test]
    cv_pick = max(range(len(test)), key=lambda i: cell["cv_a"][i])
    test_pick = max(range(len(test)), key=lambda i: seed0[i])
    cv_pairs = [[a, b] for a, b in zip(cell["cv_a"], cell["cv_b"], strict=True)]
    return {
        "order_spread": _spread(seed0),
        "seed_spread": _spread(cell["fixed_order_seeds"]),
        "against_seeds": spread_against_seeds(seed0, cell["fixed_order_seeds"]),
        "nested": nested(test),
        # The same on the CV objective: draws A and B as an order's two replicates.
        "cv_nested": nested(cv_pairs),
        "mean_squares": {
            "against_seeds": [
                statistics.variance(seed0),
                len(seed0) - 1,
                statistics.variance(cell["fixed_order_seeds"]),
                len(cell["fixed_order_seeds"]) - 1,
                1,
            ],
            "nested": list(mean_squares(test, crossed=True)),
            "cv_nested": list(mean_squares(cv_pairs, crossed=True)),
        },
        "rho": {
            "cv_a_cv_b": _spearman(cell["cv_a"], cell["cv_b"]),
            "cv_a_test": _spearman(cell["cv_a"], seed0),
            "cv_a_test_mean": _spearman(cell["cv_a"], mean_test),
            "cv_b_test_mean": _spearman(cell["cv_b"], mean_test),
            "test_seed0_seed1": _spearman(seed0, seed1),
        },
        # What picking one of the 24 orders buys on test, minus the mean order: by CV (scored
        # on both seeds, neither used to pick) and by test seed 0 (scored on seed 1 only).
        "gain_cv_pick": mean_test[cv_pick] - statistics.fmean(mean_test),
        "gain_test_pick": seed1[test_pick] - statistics.fmean(seed1),
    }


# ---- summary and report -----------------------------------------------------------------------


def _mq8_differences(path: Path) -> dict[str, list[float]]:
    """Session 8's per-split searched - random order (tuned) differences, per setting."""
    if not path.exists():
        return {}
    report = json.loads(path.read_text())
    return {
        setting: list(s["paired"]["random-order"]["differences"])
        for setting, s in report["settings"].items()
        if "random-order" in s["paired"]
    }


def _mq8_orders(path: Path) -> dict[tuple[str, int], list[float]]:
    if not path.exists():
        return {}
    report = json.loads(path.read_text())
    return {
        (c["setting"], c["split"]): [o["test_avg"] for o in c["methods"]["random-order"]["orders"]]
        for c in report["cells"]
        if "random-order" in c["methods"]
    }


def _summary_of(values: Sequence[float | None]) -> dict[str, Any]:
    measured = [v for v in values if v is not None]
    if not measured:
        return {"mean": None, "min": None, "max": None}
    return {"mean": statistics.fmean(measured), "min": min(measured), "max": max(measured)}


def summarise(cells: Sequence[Mapping[str, Any]], mq8: Path = MQ8_REPORT) -> dict[str, Any]:
    differences = _mq8_differences(mq8)
    reference = _mq8_orders(mq8)
    settings: dict[str, Any] = {}
    for setting in SETTINGS:
        rows = sorted((c for c in cells if c["setting"] == setting), key=lambda c: c["split"])
        if not rows:
            continue
        against = pooled([c["mean_squares"]["against_seeds"] for c in rows])
        both = pooled([c["mean_squares"]["nested"] for c in rows])
        on_cv = pooled([c["mean_squares"]["cv_nested"] for c in rows])
        gains_cv = [c["gain_cv_pick"] for c in rows]
        gains_test = [c["gain_test_pick"] for c in rows]
        diff = differences.get(setting, [])
        diff_sd = statistics.stdev(diff) if len(diff) > 1 else None
        # The best of 24 orders known exactly (sd_o times E[max of 24]): an upper bound on what
        # choosing the order can add; its interval follows sigma_o's.
        oracle = EXPECTED_MAX_OF_24 * both["sd"]
        oracle_high = EXPECTED_MAX_OF_24 * both["sd_high"]
        reproduced = [
            max(
                abs(a - b[0])
                for a, b in zip(reference[(setting, c["split"])], c["test"], strict=True)
            )
            for c in rows
            if (setting, c["split"]) in reference
        ]
        settings[setting] = {
            "splits": [c["split"] for c in rows],
            "order_range_mean": statistics.fmean(c["order_spread"]["range"] for c in rows),
            "order_std_mean": statistics.fmean(c["order_spread"]["std"] for c in rows),
            "seed_range_mean": statistics.fmean(c["seed_spread"]["range"] for c in rows),
            "seed_std_mean": statistics.fmean(c["seed_spread"]["std"] for c in rows),
            "against_seeds": against,
            "nested": both,
            "cv_nested": on_cv,
            "rho": {key: _summary_of([c["rho"][key] for c in rows]) for key in rows[0]["rho"]},
            "gain_cv_pick": _summary_of(gains_cv),
            "gain_test_pick": _summary_of(gains_test),
            "gain_cv_pick_sd": statistics.stdev(gains_cv) if len(gains_cv) > 1 else None,
            "mq8_difference_sd": diff_sd,
            "oracle_gain": oracle,
            "oracle_gain_high": oracle_high,
            "splits_needed": {
                "oracle": splits_needed(oracle, diff_sd) if diff_sd else None,
                "oracle_high": splits_needed(oracle_high, diff_sd) if diff_sd else None,
                "cv_pick": (
                    splits_needed(statistics.fmean(gains_cv), diff_sd) if diff_sd else None
                ),
            },
            "reproduces_mq8_max_abs": max(reproduced) if reproduced else None,
            "failures": sum(len(c["failures"]) for c in rows),
            "cpu_seconds": sum(c["cpu_seconds"] for c in rows),
        }
    return settings


def _fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def _interval(v: Mapping[str, Any]) -> str:
    return f"{v['sd']:.4f} [{v['sd_low']:.4f}, {v['sd_high']:.4f}]"


def _needed(n: int | None) -> str:
    return "never (no gain)" if n is None else str(n)


def markdown(report: Mapping[str, Any]) -> str:
    config = report["config"]
    lines = [
        "# MedQuAD: the order's spread at tuned settings against re-running one order",
        "",
        f"Generated {report['generated']} by `{report['command']}` on {report['machine']}; wall "
        f"{report['wall_seconds'] / 60:.1f} min, CPU {report['cpu_seconds'] / 60:.1f} min, "
        f"load at start {report['load_start']}, now {report.get('load_now', 'n/a')}. Design of "
        f"`mq8-medquad-paired` (space `budget`, default start, {config['trials']} trials, "
        f"{config['folds']}-fold CV, {config['max_steps']} steps per site, "
        f"{config['rows_per_source']} rows per source); per split the tuned random order's "
        f"{RANDOM_ORDERS} orders x 2 training seeds on test, its first order x "
        f"{config['seed_replicates']} training seeds on test, and the {RANDOM_ORDERS} orders' CV "
        "on two independent fold draws (A: the study's; B: other folds and seeds). A training "
        "seed is each hop's `seed` (batch order; initial weights at the first hop), moved by "
        f"{SEED_STRIDE} per replicate. Score: mean over the six sites of test accuracy.",
        "",
        "sigma_o: the order's SD beyond training noise (sqrt of the variance component), with "
        "the modified large-sample 95% interval; p: F test of no order effect. (a) 24 orders at "
        "seed 0 vs one order at 24 seeds; (b) 24 orders x 2 seeds, crossed "
        "(the seed shift's shared effect removed). "
        "Pooled over the splits (mean squares pooled). sigma_o on CV: the same as (b) on the CV "
        "score, draws A and B as each order's two replicates.",
        *markdown_section(
            "Spread: orders against seeds",
            columns=["setting", "splits", "orders: range / std",
                     "one order, 24 seeds: range / std", "sigma_o (a)", "p (a)", "sigma_o (b)",
                     "p (b)", "seed SD (b)", "sigma_o on CV", "p (CV)"],
        ),
    ]  # fmt: skip
    for setting, s in report["settings"].items():
        lines.append(
            f"| {setting} | {s['splits']} | {s['order_range_mean']:.3f} / "
            f"{s['order_std_mean']:.4f} | {s['seed_range_mean']:.3f} / {s['seed_std_mean']:.4f} "
            f"| {_interval(s['against_seeds'])} | {s['against_seeds']['p']:.3g} | "
            f"{_interval(s['nested'])} | {s['nested']['p']:.3g} | "
            f"{s['nested']['seed_sd']:.4f} | {_interval(s['cv_nested'])} | "
            f"{s['cv_nested']['p']:.3g} |"
        )
    lines += markdown_section(
        "Can CV see the order?",
        "Spearman rank correlation over the 24 orders, mean [min, max] over splits.",
        columns=["setting", "CV draw A vs draw B", "CV A vs test (seed 0)",
                 "CV A vs test (2 seeds)", "test seed 0 vs seed 1", "CV pick - mean order, test",
                 "test-seed-0 pick - mean, seed 1"],
    )  # fmt: skip
    for setting, s in report["settings"].items():
        rho = s["rho"]

        def cell(v: Mapping[str, Any], digits: int = 2, sign: str = "") -> str:
            if v["mean"] is None:
                return "n/a"
            f = f"{sign}.{digits}f"
            return f"{v['mean']:{f}} [{v['min']:{f}}, {v['max']:{f}}]"

        lines.append(
            f"| {setting} | {cell(rho['cv_a_cv_b'], sign='+')} | "
            f"{cell(rho['cv_a_test'], sign='+')} | {cell(rho['cv_a_test_mean'], sign='+')} | "
            f"{cell(rho['test_seed0_seed1'], sign='+')} | "
            f"{cell(s['gain_cv_pick'], 4, '+')} | {cell(s['gain_test_pick'], 4, '+')} |"
        )
    lines += markdown_section(
        "Power: splits a searched - random order interval needs",
        "80% power for a two-sided 95% t-interval over splits to lie above 0, with session 8's "
        "per-split SD of searched - random order (tuned). Oracle: the best of 24 orders known "
        f"exactly ({EXPECTED_MAX_OF_24} x sigma_o (b)); CV pick: the measured gain of the order "
        "CV ranks first.",
        columns=["setting", "mq8 difference SD", "oracle gain (upper 95%)", "splits (oracle)",
                 "splits (oracle, upper)", "CV-pick gain", "splits (CV pick)"],
    )  # fmt: skip
    for setting, s in report["settings"].items():
        need = s["splits_needed"]
        lines.append(
            f"| {setting} | {_fmt(s['mq8_difference_sd'], 4)} | {s['oracle_gain']:.4f} "
            f"({s['oracle_gain_high']:.4f}) | {_needed(need['oracle'])} | "
            f"{_needed(need['oracle_high'])} | {s['gain_cv_pick']['mean']:+.4f} | "
            f"{_needed(need['cv_pick'])} |"
        )
    lines += markdown_section(
        "Per split",
        columns=["setting", "split", "tuned plan", "tuned CV", "orders: range / std",
                 "seeds: range / std", "sigma_o (a), p", "sigma_o (b), p", "rho CV A/B",
                 "rho CV A/test", "rho test 0/1"],
    )  # fmt: skip
    for c in report["cells"]:
        a, b = c["against_seeds"], c["nested"]
        lines.append(
            f"| {c['setting']} | {c['split']} | {c['tuned_plan'].rsplit(' ', 1)[-1]}, lr "
            f"{c['tuned_hyperparameters']['learning_rate']:.3g}, decay "
            f"{c['tuned_learning_rate_decay']:.3f}, mu "
            f"{c['tuned_hyperparameters']['proximal_mu']:.2f} | {c['tuned_cv']:.3f} | "
            f"{c['order_spread']['range']:.3f} / {c['order_spread']['std']:.4f} | "
            f"{c['seed_spread']['range']:.3f} / {c['seed_spread']['std']:.4f} | "
            f"{a['sd']:.4f}, {a['p']:.2g} | {b['sd']:.4f}, {b['p']:.2g} | "
            f"{_fmt(c['rho']['cv_a_cv_b'], 2)} | {_fmt(c['rho']['cv_a_test'], 2)} | "
            f"{_fmt(c['rho']['test_seed0_seed1'], 2)} |"
        )
    checks = {s: v["reproduces_mq8_max_abs"] for s, v in report["settings"].items()}
    if any(v is not None for v in checks.values()):
        lines += [
            "",
            "Replicate 0 against session 8's 24 random-order test scores (same splits), max "
            "absolute difference: "
            + ", ".join(f"{s} {_fmt(v, 6)}" for s, v in checks.items() if v is not None)
            + ".",
        ]
    failures = sum(v["failures"] for v in report["settings"].values())
    lines += ["", f"CV runs that failed the collapse/divergence guard: {failures}."]
    return "\n".join(lines) + "\n"


def plot(report: Mapping[str, Any], path: Path) -> None:
    """Per setting and split: the 24 orders (seed 0) beside one order's 24 seeds, centred."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = list(report["settings"])
    figure, axes = plt.subplots(1, len(settings), figsize=(5 * len(settings), 4), squeeze=False)
    for axis, setting in zip(axes[0], settings, strict=True):
        rows = [c for c in report["cells"] if c["setting"] == setting]
        for i, c in enumerate(rows):
            orders = [t[0] for t in c["test"]]
            seeds = c["fixed_order_seeds"]
            for offset, values, colour, label in (
                (-0.15, orders, "tab:blue", "24 orders, seed 0"),
                (0.15, seeds, "tab:orange", "one order, 24 seeds"),
            ):
                centre = statistics.fmean(values)
                jitter = random.Random(f"{setting}{i}{offset}")
                axis.scatter(
                    [i + offset + jitter.uniform(-0.06, 0.06) for _ in values],
                    [v - centre for v in values],
                    s=9,
                    color=colour,
                    alpha=0.7,
                    label=label if i == 0 else None,
                )
        axis.set_xticks(range(len(rows)), [str(c["split"]) for c in rows])
        axis.axhline(0, color="grey", linewidth=0.5)
        s = report["settings"][setting]
        axis.set_title(
            f"{setting}: SD of orders {s['order_std_mean']:.4f}, of one order's seeds "
            f"{s['seed_std_mean']:.4f}\nsigma_o (b) {_interval(s['nested'])}",
            fontsize=9,
        )
        axis.set_xlabel("split")
        axis.set_ylabel("test accuracy minus its group's mean")
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write(report: dict[str, Any], out: Path, name: str) -> None:
    for cell in report["cells"]:  # from the stored runs, so a re-render applies today's code
        cell.update(cell_statistics(cell))
    report["settings"] = summarise(report["cells"])
    report["cpu_seconds"] = sum(c["cpu_seconds"] for c in report["cells"])
    report["wall_seconds"] = sum(c["seconds"] for c in report["cells"])
    report["load_now"] = " ".join(f"{v:.2f}" for v in os.getloadavg())
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / f"{name}.md").write_text(markdown(report))
    plot(report, out / f"{name}.png")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=SETTINGS)
    parser.add_argument("--splits", type=int, nargs="+", default=[40, 41, 42])
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--max-steps", type=int, default=30)
    parser.add_argument("--rows-per-source", type=int, default=300)
    parser.add_argument("--seed-replicates", type=int, default=SEED_REPLICATES)
    parser.add_argument(
        "--cache", type=Path, default=Path(tempfile.gettempdir()) / "baton-medquad-cache"
    )
    parser.add_argument("--quick", action="store_true", help="1 split, 2 trials, 60 rows")
    parser.add_argument("--resume", action="store_true", help="keep the cells NAME.json holds")
    add_report_arguments(
        parser, "mqord9-medquad-order", merge="one report of these reports' cells, as NAME"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for noisy in ("site_agent", "ordering", "optuna"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    if args.render:
        report = json.loads(args.render.read_text())
        write(report, args.render.parent, args.render.stem)
        return 0
    if args.merge:
        parts = [json.loads(p.read_text()) for p in args.merge]
        if any(p["config"] != parts[0]["config"] for p in parts):
            parser.error("the reports were run with different configs")
        merged = {
            **parts[0],
            "command": " + ".join(p["command"] for p in parts),
            "load_start": ", ".join(p["load_start"] for p in parts),
            "cells": [c for p in parts for c in p["cells"]],
        }
        write(merged, args.out, args.name)
        return 0
    if args.quick:
        args.splits, args.trials, args.rows_per_source = args.splits[:1], 2, 60
        args.seed_replicates, args.name = 4, f"{args.name}_quick"
    if args.seed_replicates < 2:
        parser.error("--seed-replicates must be at least 2")
    torch.set_num_threads(1)
    memoise_feature_matrices()
    pool = load_pool(args.data, args.rows_per_source, args.cache)
    trainer = create_trainer("tabular", base_model_dir=None, device="cpu")
    assert isinstance(trainer, TabularTrainer)
    config = {
        "trials": args.trials,
        "folds": args.folds,
        "max_steps": args.max_steps,
        "rows_per_source": args.rows_per_source,
        "seed_replicates": args.seed_replicates,
    }
    path = args.out / f"{args.name}.json"
    cells: list[dict[str, Any]] = []
    previous: dict[str, Any] | None = None
    if args.resume and path.exists():
        previous = json.loads(path.read_text())
        if previous["config"] != config:
            parser.error(f"{path} was run with {previous['config']}, not {config}")
        cells = previous["cells"]
    report: dict[str, Any] = {
        "generated": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": "medquad_order.py " + shlex.join(sys.argv[1:] if argv is None else argv),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, python "
        f"{platform.python_version()}, torch {torch.__version__}",
        "load_start": " ".join(f"{v:.2f}" for v in os.getloadavg()),
        "config": config,
        "cells": cells,
    }
    if previous is not None:  # the report's command and load name every run that made it
        report["command"] = f"{previous['command']} + {report['command']}"
        report["load_start"] = f"{previous['load_start']}, {report['load_start']}"
    done = {(c["setting"], c["split"]) for c in cells}
    for split in args.splits:
        for setting in args.settings:
            if (setting, split) in done:
                continue
            cells.append(run_cell(trainer, pool, setting, split, config))
            write(report, args.out, args.name)  # after every cell: a stopped run keeps its cells
    write(report, args.out, args.name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
