"""Fed-Heart-Disease, per-site normalisation: does the site order have a real, CV-detectable
effect at tuned settings (issue 17, session 9)?

Per development split: the random-order comparator's settings are tuned exactly as in
``heart_disease_paired.py`` (10 trials, 3-fold CV, the ``--controls`` space, 2 cycles, 40
steps), then all 24 site orders of that tuned schedule are measured:

* CV: ``--draws`` independent k-fold CV draws for every k in ``--cv-folds`` (draw r: the folds
  of ``repeat_seeds`` r and every hop's seed shifted by r * SEED_STRIDE; draw 0 is the paired
  benchmark's own CV), each site's out-of-fold accuracy, log-loss and AUROC;
* test: the schedule trained on the split's training rows with ``--model-seeds`` seeds (seed 0
  is the paired benchmark's final model), scored on each centre's test rows and on two fixed,
  label-stratified halves of them.

From these, per split and over splits (reported, JSON + Markdown):

* variance components of an order's test Avg across orders: the true order effect (covariance
  of disjoint test halves scored by models of different seeds), order x seed, order x test rows
  (what a selection on the test rows exploits and no new test set repeats), and the order main
  effect across splits (does a given order, first or last site win on every split?);
* CV reliability (covariance of two independent CV draws over orders) and the CV-test
  covariance, hence the true CV-test correlation and the gain a CV-selected order can reach;
* per CV design (folds, draws averaged, objective: accuracy, log-loss, AUROC), the CV-to-test
  Spearman correlation over orders and the realised gain of the CV-best order over the mean
  order (the expected random order), with its cost in fold trainings per order;
* the number of splits a paired searched-minus-random-order comparison needs for its 95%
  interval to exclude 0, from a paired run's per-split differences (``--paired``).

    nice -n 19 python heart_disease_order.py --first-split 300 --splits 12 --jobs 2 \
        --data /work/shared/datasets/heart_disease --paired results/hd8-per-site.json
    python heart_disease_order.py --render results/order9-dev.json \
        --paired results/hd8-per-site.json

Writes benchmarks/results/<name>.{json,md}.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import logging
import math
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch
from _harness import markdown_section, report_head
from heart_disease import DEFAULT_DATA, RESULTS_DIR, SITES, _register_sites
from heart_disease_paired import (
    _WORKER,
    PlanFailed,
    TwinExecutor,
    _init_worker,
    _reordered,
    _site_hp,
    _spec_for,
    paired_summary,
    repeat_seeds,
    resample_split,
    search_space,
)

from ordering import CandidatePlan, OrderingStudy
from site_agent.registry import RegisteredDataset
from site_agent.simulation import train_sequential
from site_agent.tasks import TabularTrainer, TaskSpec

logger = logging.getLogger("benchmarks.heart_disease_order")

SETTING = "per-site"
SEED_STRIDE = 10_000  # hop seeds are the split's plus the visit index: far apart per draw
OBJECTIVES = ("accuracy", "brier", "clipped_loss", "auroc")  # CV objectives, ranked by avg
LOWER_IS_BETTER = ("loss", "clipped_loss", "brier")  # negated to rank
LOSS_CLIP = 1e-3
HALVES = ("a", "b")


# ---- measurement --------------------------------------------------------------------------------


def reseeded(plan: CandidatePlan, offset: int) -> CandidatePlan:
    """`plan` with every hop's seed shifted by `offset` (other initial weights and batches)."""
    if offset == 0:
        return plan
    return dataclasses.replace(plan, hops=tuple(
        hop._replace(hyperparameters=dataclasses.replace(
            hop.hyperparameters, seed=hop.hyperparameters.seed + offset))
        for hop in plan.hops
    ))  # fmt: skip


def test_halves(
    datasets: Sequence[RegisteredDataset], split: int
) -> tuple[list[RegisteredDataset], list[RegisteredDataset]]:
    """Each centre's test rows cut into two fixed halves, stratified by label (seeded by the
    split): two independent test sets scored by the same models."""
    first, second = [], []
    for dataset in datasets:
        rng = random.Random(f"order9-half:{split}:{dataset.name}")
        dealt: list[int] = []
        for label in sorted({row.label for row in dataset.test}):
            group = [i for i, row in enumerate(dataset.test) if row.label == label]
            rng.shuffle(group)
            dealt += group
        # Dealt alternately, label by label: stratified, and the halves differ by <= 1 row.
        in_a = set(dealt[::2])
        rows = list(enumerate(dataset.test))
        first.append(dataclasses.replace(dataset, test=tuple(r for i, r in rows if i in in_a)))
        second.append(dataclasses.replace(dataset, test=tuple(r for i, r in rows if i not in in_a)))
    return first, second


def row_logits(
    trainer: TabularTrainer,
    spec: TaskSpec,
    tensors: Mapping[str, torch.Tensor],
    dataset: RegisteredDataset,
    split: str,
) -> tuple[list[float], list[int]]:
    """Each row's logit and label, scored as ``TabularTrainer.evaluate`` scores them (the
    site's own normaliser): per-row values give Brier and bounded log-loss, which the trainer's
    aggregate metrics do not."""
    from site_agent.tasks._tabular import (
        _feature_count,
        _load,
        _matrix,
        _tabular_examples,
        _targets,
    )

    n_features = _feature_count(dataset)
    model = trainer._model(spec, n_features, seed=0)
    _load(model, tensors)
    examples = _tabular_examples(dataset, split, n_features)
    normaliser = trainer._normaliser(spec, _tabular_examples(dataset, "train", n_features),
                                     n_features)  # fmt: skip
    model.eval()
    with torch.inference_mode():
        logits = model(normaliser(_matrix(examples)))[:, 0]
    return [float(v) for v in logits], [int(v) for v in _targets(examples, spec.labels)]


def row_metrics(logits: Sequence[float], targets: Sequence[int]) -> dict[str, float]:
    """Accuracy (threshold 0.5), log-loss, log-loss with probabilities clipped to
    [LOSS_CLIP, 1 - LOSS_CLIP] (one extreme per-site-normalised row no longer dominates),
    Brier score, AUROC (when both labels occur) and the row count."""
    from site_agent.tasks._metrics import auroc

    n = len(targets)
    probabilities = [1.0 / (1.0 + math.exp(-max(min(z, 700.0), -700.0))) for z in logits]
    clipped = [min(max(p, LOSS_CLIP), 1.0 - LOSS_CLIP) for p in probabilities]
    out = {
        "accuracy": sum((z > 0) == (y == 1) for z, y in zip(logits, targets, strict=True)) / n,
        "loss": statistics.fmean(
            max(z, 0.0) + math.log1p(math.exp(-abs(z))) - y * z
            for z, y in zip(logits, targets, strict=True)
        ),
        "clipped_loss": -statistics.fmean(
            math.log(p) if y == 1 else math.log(1.0 - p)
            for p, y in zip(clipped, targets, strict=True)
        ),
        "brier": statistics.fmean(
            (p - y) ** 2 for p, y in zip(probabilities, targets, strict=True)
        ),
        "examples": float(n),
    }
    score = auroc(list(targets), list(logits))
    if score is not None:
        out["auroc"] = score
    return out


def _cv_draw(
    trainer: TabularTrainer,
    datasets: Sequence[RegisteredDataset],
    plan: CandidatePlan,
    folds: int,
    fold_seed: int,
) -> dict[str, Any]:
    """One k-fold CV draw of `plan` (the paired benchmark's CV: each fold trains the whole
    schedule on the fold's training rows), each site's metrics over its out-of-fold rows."""
    spec_for = _spec_for(SETTING)
    seeded = [dataclasses.replace(d, seed=fold_seed) for d in datasets]
    rows: dict[str, tuple[list[float], list[int]]] = {d.name: ([], []) for d in datasets}
    hops = [(hop.site, _site_hp(hop.hyperparameters.model_dump())) for hop in plan.hops]
    for fold in range(folds):
        views = [d.fold_view(fold, folds) for d in seeded]
        by_name = {v.name: v for v in views}
        spec = spec_for(views)
        try:
            tensors = train_sequential(trainer, spec, [(by_name[s], hp) for s, hp in hops]).tensors
        except ValueError as exc:
            return {"failure_reason": f"fold {fold}: {exc}"}
        predicted: set[bool] = set()
        for view in views:
            logits, targets = row_logits(trainer, spec, tensors, view, "validation")
            rows[view.name][0].extend(logits)
            rows[view.name][1].extend(targets)
            predicted.update(z > 0 for z in logits)
        if len(predicted) < 2:
            return {"failure_reason": f"fold {fold}: one class predicted for every row"}
    return {"sites": {site: row_metrics(*rows[site]) for site in rows}, "failure_reason": None}


def _test_scores(
    trainer: TabularTrainer,
    datasets: Sequence[RegisteredDataset],
    halves: tuple[Sequence[RegisteredDataset], Sequence[RegisteredDataset]],
    plan: CandidatePlan,
) -> dict[str, Any]:
    """`plan` trained on the split's training rows, scored on each centre's test rows and on
    each half of them."""
    spec = _spec_for(SETTING)(datasets)
    by_name = {d.name: d for d in datasets}
    hops = [(by_name[hop.site], _site_hp(hop.hyperparameters.model_dump())) for hop in plan.hops]
    tensors = train_sequential(trainer, spec, hops).tensors
    out: dict[str, Any] = {}
    for part, sets in (("full", datasets), *zip(HALVES, halves, strict=True)):
        out[part] = {d.name: row_metrics(*row_logits(trainer, spec, tensors, d, "test"))
                     for d in sets}  # fmt: skip
    return out


def measure_order(
    trainer: TabularTrainer,
    datasets: Sequence[RegisteredDataset],
    halves: tuple[Sequence[RegisteredDataset], Sequence[RegisteredDataset]],
    plan: CandidatePlan,
    order: Sequence[str],
    config: Mapping[str, Any],
) -> dict[str, Any]:
    """One order of the tuned schedule: every CV draw of every fold count, every model seed's
    test scores (full and halves)."""
    reordered = _reordered(plan, order)
    draws = int(config["draws"])
    fold_seeds = repeat_seeds(datasets, draws)
    cv = {
        str(k): [
            _cv_draw(trainer, datasets, reseeded(reordered, r * SEED_STRIDE), k, fold_seeds[r])
            for r in range(draws)
        ]
        for k in config["cv_folds"]
    }
    test = [
        _test_scores(trainer, datasets, halves, reseeded(reordered, m * SEED_STRIDE))
        for m in range(int(config["model_seeds"]))
    ]
    return {"order": list(order), "cv": cv, "test": test}


def tune_random_order(
    trainer: TabularTrainer, datasets: Sequence[RegisteredDataset], split: int,
    config: Mapping[str, Any],
) -> tuple[CandidatePlan, dict[str, Any]]:  # fmt: skip
    """The paired benchmark's random-order comparator: its settings tuned by TPE on 3-fold CV
    while every trial draws a random order (``sampler="random-order"``), best CV selected."""
    space = search_space(split, config["cycles"], config["max_steps"], controls=True)
    executor = TwinExecutor(trainer, SETTING, datasets, config["tune_folds"])
    study = OrderingStudy.create(None, f"random-order-{split}", space, "lehmer", "mean",
                                 seed=split, sampler="random-order", pruning=None,
                                 max_forgetting=None, forgetting_tolerance=None)  # fmt: skip
    records = study.optimize(executor, config["trials"], catch=(PlanFailed,))
    chosen = study.best_record()
    assert chosen.plan is not None
    return chosen.plan, {
        "plan": chosen.plan.describe(),
        "hyperparameters": chosen.plan.hops[0].hyperparameters.model_dump(),
        "hops": len(chosen.plan.hops),
        "cv": chosen.value,
        "trial_values": [r.value for r in records],
    }


def run_split(split: int, config: Mapping[str, Any]) -> dict[str, Any]:
    """Tunes the split's random-order settings and measures all 24 orders of them."""
    started, cpu_started = time.perf_counter(), time.process_time()
    trainer: TabularTrainer = _WORKER["trainer"]
    datasets = resample_split(_WORKER["datasets"], split)
    plan, tuned = tune_random_order(trainer, datasets, split, config)
    tune_cpu = time.process_time() - cpu_started
    halves = test_halves(datasets, split)
    orders = [
        measure_order(trainer, datasets, halves, plan, order, config)
        for order in itertools.permutations(SITES)
    ]
    logger.info("split %d in %.0f s", split, time.perf_counter() - started)
    return {
        "split": split,
        "tuned": tuned,
        "test_rows": {d.name: len(d.test) for d in datasets},
        "half_rows": {
            h: {d.name: len(d.test) for d in half} for h, half in zip(HALVES, halves, strict=True)
        },
        "orders": orders,
        "seconds": time.perf_counter() - started,
        "tune_cpu_seconds": tune_cpu,
        "cpu_seconds": time.process_time() - cpu_started,
    }


# ---- statistics ---------------------------------------------------------------------------------


def avg(sites: Mapping[str, Mapping[str, float]], metric: str) -> float:
    """Unweighted mean over the centres (FLamby's Avg); NaN when a centre lacks the metric."""
    values = [m.get(metric, math.nan) for m in sites.values()]
    return statistics.fmean(values)


def cov(x: Sequence[float], y: Sequence[float]) -> float:
    """Sample covariance (n - 1)."""
    n = len(x)
    mx, my = statistics.fmean(x), statistics.fmean(y)
    return sum((a - mx) * (b - my) for a, b in zip(x, y, strict=True)) / (n - 1)


def mean_pair_cov(series: Sequence[Sequence[float]], pairs: Sequence[tuple[int, int]]) -> float:
    """Mean covariance over orders of the given pairs of replicate score vectors."""
    return statistics.fmean(cov(series[i], series[j]) for i, j in pairs)


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    from scipy import stats

    if len(set(x)) < 2 or len(set(y)) < 2:
        return math.nan
    return float(stats.spearmanr(x, y).statistic)


def expected_max_normal(n: int) -> float:
    """E[max of n iid standard normals], by numerical integration."""
    from scipy import integrate, stats

    value, _ = integrate.quad(
        lambda x: x * n * stats.norm.pdf(x) * stats.norm.cdf(x) ** (n - 1), -10, 10
    )
    return float(value)


def test_matrix(split: Mapping[str, Any], part: str = "full") -> list[list[float]]:
    """[model seed][order] -> test Avg accuracy on ``part`` (full, a or b)."""
    orders = split["orders"]
    seeds = len(orders[0]["test"])
    return [[avg(o["test"][m][part], "accuracy") for o in orders] for m in range(seeds)]


def cv_matrix(split: Mapping[str, Any], folds: str, objective: str) -> list[list[float]]:
    """[draw][order] -> CV Avg of ``objective`` (loss negated: higher is better); failed
    draws score -inf (never selected)."""
    orders = split["orders"]
    draws = len(orders[0]["cv"][folds])
    out = []
    for r in range(draws):
        row = []
        for o in orders:
            entry = o["cv"][folds][r]
            if entry.get("failure_reason") or "sites" not in entry:
                row.append(-math.inf)
                continue
            value = avg(entry["sites"], objective)
            row.append(-value if objective in LOWER_IS_BETTER else value)
        out.append(row)
    return out


def variance_components(split: Mapping[str, Any], folds: str = "3") -> dict[str, float]:
    """One split's covariances over orders (accuracy, test Avg; CV Avg accuracy).

    ``true`` = cov(half a of seed m, half b of seed m'), m != m': the order effect that repeats
    on new test rows and a new seed. ``seed`` adds the order x seed part (same seed, other
    half); ``rows_half``/``rows_full`` add the order x test-rows part (other seed, same rows).
    ``total_full`` is the variance of one seed's full-test Avg over orders. CV: ``cv_total``
    one draw's variance, ``cv_rep`` covariance of two draws (folds and seeds independent),
    ``cv_test`` covariance of a CV draw and a full-test score of another seed.
    """
    full, half_a, half_b = (test_matrix(split, p) for p in ("full", "a", "b"))
    seeds = range(len(full))
    other = [(m, n) for m in seeds for n in seeds if m != n]
    same = [(m, m) for m in seeds]
    cv = cv_matrix(split, folds, "accuracy")
    draws = range(len(cv))
    if any(math.isinf(v) for row in cv for v in row):
        cv = [[v if math.isfinite(v) else statistics.fmean(
            x for x in row if math.isfinite(x)) for v in row] for row in cv]  # fmt: skip
    cv_pairs = [(r, s) for r in draws for s in draws if r != s]
    cross = [(r, m) for r in draws for m in seeds if r != m]
    return {
        "true": statistics.fmean(cov(half_a[m], half_b[n]) for m, n in other),
        "true_plus_seed": statistics.fmean(cov(half_a[m], half_b[n]) for m, n in same),
        "true_plus_rows_half": statistics.fmean(
            [cov(half_a[m], half_a[n]) for m, n in other]
            + [cov(half_b[m], half_b[n]) for m, n in other]
        ),
        "true_plus_rows_full": mean_pair_cov(full, other),
        "total_half": statistics.fmean([cov(h[m], h[m]) for h in (half_a, half_b) for m in seeds]),
        "total_full": statistics.fmean(cov(full[m], full[m]) for m in seeds),
        "cv_total": statistics.fmean(cov(cv[r], cv[r]) for r in draws),
        "cv_rep": mean_pair_cov(cv, cv_pairs),
        "cv_test": statistics.fmean(cov(cv[r], full[m]) for r, m in cross),
    }


def _sd(variance: float) -> float:
    return math.copysign(math.sqrt(abs(variance)), variance)


def components_summary(
    splits: Sequence[Mapping[str, Any]], folds: str = "3", boot: int = 2000
) -> dict[str, Any]:
    """Split-averaged components with a bootstrap over splits, and what they imply."""
    per_split = [variance_components(s, folds) for s in splits]
    keys = list(per_split[0])
    n_orders = len(splits[0]["orders"])
    e_max = expected_max_normal(n_orders)

    def derived(rows: Sequence[Mapping[str, float]]) -> dict[str, float]:
        m = {k: statistics.fmean(r[k] for r in rows) for k in keys}
        true, cv_rep, cv_test = m["true"], m["cv_rep"], m["cv_test"]
        out = dict(m)
        out["sd_true"] = _sd(true)
        out["sd_total_full"] = _sd(m["total_full"])
        out["sd_seed"] = _sd(m["true_plus_seed"] - true)
        out["sd_rows_full"] = _sd(m["true_plus_rows_full"] - true)
        out["test_reliability_full"] = m["true_plus_rows_full"] / m["total_full"]
        out["test_true_share_full"] = true / m["total_full"]
        out["cv_reliability"] = cv_rep / m["cv_total"]
        both = true * cv_rep
        out["cv_test_corr_true"] = cv_test / math.sqrt(both) if both > 0 else math.nan
        out["cv_test_corr_observed"] = cv_test / math.sqrt(m["cv_total"] * m["total_full"])
        # Gain of the CV-best order over the mean order (= a random order), normal model:
        # E[max of n] * cov(CV, true test) / sd(CV score) for one draw and for infinitely many.
        out["gain_one_draw"] = e_max * cv_test / math.sqrt(m["cv_total"])
        out["gain_cv_limit"] = e_max * cv_test / math.sqrt(cv_rep) if cv_rep > 0 else math.nan
        out["gain_oracle_true"] = e_max * _sd(true) if true > 0 else 0.0
        return out

    point = derived(per_split)
    rng = random.Random(9)
    draws = [derived([rng.choice(per_split) for _ in per_split]) for _ in range(boot)]
    interval = {}
    for key in point:
        values = sorted(d[key] for d in draws if math.isfinite(d[key]))
        if values:
            interval[key] = [values[int(0.025 * len(values))], values[int(0.975 * len(values)) - 1]]
    return {
        "folds": folds,
        "orders": n_orders,
        "expected_max_normal": e_max,
        "point": point,
        "interval": interval,
        "per_split": per_split,
    }


def design_instances(draws: int, per: int) -> list[list[int]]:
    """Disjoint groups of ``per`` CV draws out of ``draws`` (each an instance of a design that
    averages ``per`` draws)."""
    return [list(range(i, i + per)) for i in range(0, draws - per + 1, per)]


def design_metrics(
    split: Mapping[str, Any], folds: Sequence[str], per: int, objective: str
) -> dict[str, float]:
    """One split, one CV design (fold counts pooled, ``per`` draws each, ``objective``):
    Spearman over orders of CV and test (seed 0's full test; and the mean over seeds), and the
    test gain of the CV-best order over the mean order, averaged over the design's instances."""
    test0 = test_matrix(split, "full")[0]
    seeds = test_matrix(split, "full")
    test_mean = [statistics.fmean(col) for col in zip(*seeds, strict=True)]
    draws = len(split["orders"][0]["cv"][folds[0]])
    rhos, rhos_mean, gains, gains_mean = [], [], [], []
    for group in design_instances(draws, per):
        rows = [cv_matrix(split, k, objective)[r] for k in folds for r in group]
        score = [statistics.fmean(col) for col in zip(*rows, strict=True)]
        finite = [i for i, v in enumerate(score) if math.isfinite(v)]
        best = max(finite, key=lambda i: score[i])
        rhos.append(spearman([score[i] for i in finite], [test0[i] for i in finite]))
        rhos_mean.append(spearman([score[i] for i in finite], [test_mean[i] for i in finite]))
        gains.append(test0[best] - statistics.fmean(test0))
        gains_mean.append(test_mean[best] - statistics.fmean(test_mean))
    return {
        "rho_seed0": statistics.fmean(rhos),
        "rho_seed_mean": statistics.fmean(rhos_mean),
        "gain_seed0": statistics.fmean(gains),
        "gain_seed_mean": statistics.fmean(gains_mean),
    }


def designs(config: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The CV designs compared: (fold counts pooled, draws averaged, objective)."""
    draws = int(config["draws"])
    folds = [str(k) for k in config["cv_folds"]]
    out = []
    for objective in OBJECTIVES:
        for k in folds:
            per = 1
            while per <= draws:
                out.append({"folds": [k], "per": per, "objective": objective,
                            "cost": int(k) * per})  # fmt: skip
                per *= 2
        if len(folds) > 1:
            out.append({"folds": folds, "per": draws, "objective": objective,
                        "cost": sum(int(k) for k in folds) * draws})  # fmt: skip
    return out


def design_table(
    splits: Sequence[Mapping[str, Any]], config: Mapping[str, Any]
) -> list[dict[str, Any]]:
    rows = []
    for design in designs(config):
        per_split = [design_metrics(s, design["folds"], design["per"], design["objective"])
                     for s in splits]  # fmt: skip
        row = {**design}
        for key in ("rho_seed0", "rho_seed_mean", "gain_seed0", "gain_seed_mean"):
            values = [p[key] for p in per_split if math.isfinite(p[key])]
            row[key] = paired_summary(values)
        rows.append(row)
    return rows


def oracle_gains(splits: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Selections on test: on seed 0's own full test (selection on test noise) and on an
    independent replicate (half a, seeds 1.. averaged) scored on half b of seed 0."""
    on_own, on_replicate = [], []
    for split in splits:
        full0 = test_matrix(split, "full")[0]
        on_own.append(max(full0) - statistics.fmean(full0))
        a = test_matrix(split, "a")
        b0 = test_matrix(split, "b")[0]
        picker = [statistics.fmean(col) for col in zip(*a[1:], strict=True)] if len(a) > 1 else a[0]
        best = max(range(len(picker)), key=lambda i: picker[i])
        on_replicate.append(b0[best] - statistics.fmean(b0))
    return {"own_test": paired_summary(on_own), "replicate": paired_summary(on_replicate)}


def order_main_effect(splits: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Two-way layout split x order on the test Avg (mean over seeds, full test): the order
    main effect's F test and variance (what repeats across splits), the first and last site's
    mean centred effects with t-intervals over splits."""
    from scipy import stats

    table = []
    for split in splits:
        seeds = test_matrix(split, "full")
        table.append([statistics.fmean(col) for col in zip(*seeds, strict=True)])
    orders = [tuple(o["order"]) for o in splits[0]["orders"]]
    for split in splits:
        if [tuple(o["order"]) for o in split["orders"]] != orders:
            raise ValueError("every split must measure the same orders in the same sequence")
    n_s, n_o = len(table), len(orders)
    grand = statistics.fmean(v for row in table for v in row)
    split_means = [statistics.fmean(row) for row in table]
    order_means = [statistics.fmean(row[o] for row in table) for o in range(n_o)]
    ss_order = n_s * sum((m - grand) ** 2 for m in order_means)
    ss_resid = sum(
        (table[s][o] - split_means[s] - order_means[o] + grand) ** 2
        for s in range(n_s)
        for o in range(n_o)
    )
    df_order, df_resid = n_o - 1, (n_s - 1) * (n_o - 1)
    ms_order, ms_resid = ss_order / df_order, ss_resid / df_resid
    centred = [[v - split_means[s] for v in row] for s, row in enumerate(table)]
    position = {}
    for where, index in (("first", 0), ("last", -1)):
        position[where] = {
            site: paired_summary([
                statistics.fmean(row[o] for o in range(n_o) if orders[o][index] == site)
                for row in centred
            ])
            for site in SITES
        }  # fmt: skip
    best = max(range(n_o), key=lambda o: order_means[o])
    return {
        "f": ms_order / ms_resid,
        "p": float(stats.f.sf(ms_order / ms_resid, df_order, df_resid)),
        "sd_main": _sd((ms_order - ms_resid) / n_s),
        "sd_interaction_plus_noise": math.sqrt(ms_resid),
        "best_order": list(orders[best]),
        "best_order_effect": order_means[best] - grand,
        "position": position,
    }


def hd8_order_main_effect(report: Mapping[str, Any]) -> dict[str, Any]:
    """The same question on a paired run's ``--order-spread`` orders (a sample per split):
    the mean centred test Avg by first and last site, t-intervals over splits."""
    rows = []
    for cell in report["cells"]:
        spread = [e for e in cell["methods"]["random-order"].get("order_spread", []) if "test" in e]
        if len(spread) < 2:
            continue
        centre = statistics.fmean(e["test"] for e in spread)
        rows.append([(tuple(e["order"]), e["test"] - centre) for e in spread])
    out: dict[str, Any] = {"splits": len(rows)}
    for where, index in (("first", 0), ("last", -1)):
        out[where] = {}
        for site in SITES:
            values = [statistics.fmean(v for o, v in row if o[index] == site) for row in rows
                      if any(o[index] == site for o, _ in row)]  # fmt: skip
            out[where][site] = paired_summary(values)
    return out


def power(differences: Sequence[float], effects: Mapping[str, float]) -> dict[str, Any]:
    """Splits needed for the 95% interval of a paired mean to exclude 0, for each assumed true
    effect: n50 (the interval's expected lower bound reaches 0) and n80 (80% power)."""
    from scipy import stats

    sd = statistics.stdev(differences)
    out: dict[str, Any] = {"splits": len(differences), "sd": sd,
                           "mean": statistics.fmean(differences), "needed": {}}  # fmt: skip
    z, z80 = float(stats.norm.ppf(0.975)), float(stats.norm.ppf(0.8))
    for name, effect in effects.items():
        if not effect > 0:
            out["needed"][name] = {"effect": effect, "n50": None, "n80": None}
            continue
        out["needed"][name] = {
            "effect": effect,
            "n50": math.ceil((z * sd / effect) ** 2),
            "n80": math.ceil(((z + z80) * sd / effect) ** 2),
        }
    return out


def paired_differences(report: Mapping[str, Any], comparator: str = "random-order") -> list[float]:
    return [
        cell["methods"]["searched"]["test_avg"] - cell["methods"][comparator]["test_avg"]
        for cell in report["cells"]
        if cell["setting"] == SETTING
    ]


def summarise(report: Mapping[str, Any], paired: Mapping[str, Any] | None) -> dict[str, Any]:
    splits = report["splits_data"]
    config = report["config"]
    components = {str(k): components_summary(splits, str(k)) for k in config["cv_folds"]}
    table = design_table(splits, config)
    seed0 = [test_matrix(s, "full")[0] for s in splits]
    out: dict[str, Any] = {
        "components": components,
        "designs": table,
        "oracle": oracle_gains(splits),
        "main_effect": order_main_effect(splits),
        "spread": {
            "range_seed0": paired_summary([max(r) - min(r) for r in seed0]),
            "sd_seed0": paired_summary([statistics.stdev(r) for r in seed0]),
        },
    }
    if paired is not None:
        point = components[str(config["cv_folds"][0])]["point"]
        best_design = max(table, key=lambda r: r["gain_seed0"]["mean"])
        out["hd8_main_effect"] = hd8_order_main_effect(paired)
        out["power"] = power(paired_differences(paired), {
            "observed hd8 mean": statistics.fmean(paired_differences(paired)),
            "CV one draw (model)": point["gain_one_draw"],
            "CV limit (model)": point["gain_cv_limit"],
            "best dev design (picked on noise)": best_design["gain_seed0"]["mean"],
            "oracle: true order effect": point["gain_oracle_true"],
        })  # fmt: skip
    return out


# ---- report -------------------------------------------------------------------------------------


def _n(value: float | None, digits: int = 3) -> str:
    if value is None or not math.isfinite(value):
        return "n/a"
    return f"{value:+.{digits}f}"


def _ci(summary: Mapping[str, Any], digits: int = 3) -> str:
    return (f"{_n(summary['mean'], digits)} [{_n(summary['low'], digits)}, "
            f"{_n(summary['high'], digits)}]")  # fmt: skip


def markdown(report: Mapping[str, Any]) -> str:
    s = report["summary"]
    splits = report["splits_data"]
    cpu = sum(x["cpu_seconds"] for x in splits)
    lines = [
        "# Heart disease per-site: does the order have a real, CV-detectable effect? (order9)",
        "",
        f"Generated {report['generated']}; `{report['command']}`; {report['machine']}.",
        f"Splits {', '.join(str(x['split']) for x in splits)} (development); "
        f"{len(splits[0]['orders'])} orders each at the split's tuned random-order settings; "
        f"CV draws {report['config']['draws']} per fold count {report['config']['cv_folds']}; "
        f"model seeds {report['config']['model_seeds']}. Worker CPU {cpu:.0f} s "
        f"(tuning {sum(x['tune_cpu_seconds'] for x in splits):.0f} s).",
        *markdown_section(
            "Variance components of an order's test Avg (accuracy), over orders within a split",
            "SD in accuracy points x 100 is the square root of the split-averaged (co)variance "
            "(negative covariance shown as a negative SD); intervals: bootstrap over splits.",
            columns=["quantity", "3-fold CV", "interval"],
        ),
    ]
    comp = s["components"][str(report["config"]["cv_folds"][0])]
    point, interval = comp["point"], comp["interval"]

    def row(label: str, key: str, scale: float = 100.0, digits: int = 2) -> str:
        lo, hi = interval.get(key, [math.nan, math.nan])
        return (f"| {label} | {_n(point[key] * scale, digits)} | "
                f"[{_n(lo * scale, digits)}, {_n(hi * scale, digits)}] |")  # fmt: skip

    lines += [
        row("test spread: SD of one seed's full-test Avg over orders (points)", "sd_total_full"),
        row("true order effect SD (halves x seeds independent; points)", "sd_true"),
        row("order x seed SD (points)", "sd_seed"),
        row("order x test rows SD, full test (points)", "sd_rows_full"),
        row("share of test variance that is the true order effect", "test_true_share_full", 1.0),
        row("test reliability over model seeds (same test rows)", "test_reliability_full", 1.0),
        row("CV reliability: corr of two independent CV draws over orders", "cv_reliability", 1.0),
        row("CV-test correlation, observed (one draw, one seed)", "cv_test_corr_observed", 1.0),
        row("CV-test correlation of the replicable parts", "cv_test_corr_true", 1.0),
        row("gain of CV-best order, one CV draw (normal model; points)", "gain_one_draw"),
        row("gain of CV-best order, CV noise-free (normal model; points)", "gain_cv_limit"),
        row("gain of the truly best order (oracle; points)", "gain_oracle_true"),
        "",
    ]
    for k, c in s["components"].items():
        if k == str(report["config"]["cv_folds"][0]):
            continue
        p = c["point"]
        lines.append(
            f"With {k}-fold CV: CV reliability {_n(p['cv_reliability'])}, CV-test correlation of "
            f"replicable parts {_n(p['cv_test_corr_true'])}, gain one draw "
            f"{_n(p['gain_one_draw'] * 100, 2)} points, CV noise-free "
            f"{_n(p['gain_cv_limit'] * 100, 2)}."
        )
    o = s["oracle"]
    lines += [
        "",
        f"Realised oracles (mean over splits, t-interval): test-best order on its own test rows "
        f"{_ci(o['own_test'])} (selection on test noise); order picked on half a (other seeds) "
        f"and scored on half b {_ci(o['replicate'])}.",
        f"Spread over orders, seed 0 full test: range {_ci(s['spread']['range_seed0'])}, "
        f"SD {_ci(s['spread']['sd_seed0'])}.",
    ]
    me = s["main_effect"]
    lines += markdown_section(
        "Order main effect across splits (does a given order win on every split?)",
        f"Two-way split x order on test Avg (mean over seeds): F {me['f']:.2f}, p {me['p']:.3f}; "
        f"SD of the order main effect {_n(me['sd_main'] * 100, 2)} points; best order "
        f"{' > '.join(me['best_order'])} at {_n(me['best_order_effect'] * 100, 2)} points "
        "(selected on these splits).",
        columns=["site", "first: mean centred test Avg", "last: mean centred test Avg"],
    )
    for site in SITES:
        lines.append(f"| {site} | {_ci(me['position']['first'][site])} | "
                     f"{_ci(me['position']['last'][site])} |")  # fmt: skip
    if "hd8_main_effect" in s:
        hd8 = s["hd8_main_effect"]
        lines += ["", f"The same on hd8's `--order-spread 8` orders ({hd8['splits']} splits):", "",
                  "| site | first | last |", "|---|---|---|"]  # fmt: skip
        for site in SITES:
            lines.append(f"| {site} | {_ci(hd8['first'][site])} | {_ci(hd8['last'][site])} |")
    lines += markdown_section(
        "CV designs: ranking the 24 orders",
        "Per split: Spearman over orders of the design's CV score and the test Avg (seed 0 = the "
        "final model the benchmark trains; seed mean = 4 seeds averaged), and the test gain of "
        "the design's best order over the mean order (what a random order scores on average); "
        "mean [95% t-interval] over splits. Cost: fold trainings per order.",
        columns=["objective", "folds", "draws", "cost", "rho (seed 0)", "rho (seed mean)",
                 "gain seed 0", "gain seed mean"],
    )  # fmt: skip
    for r in s["designs"]:
        lines.append(
            f"| {r['objective']} | {'+'.join(r['folds'])} | {r['per']} | {r['cost']} | "
            f"{_ci(r['rho_seed0'], 2)} | {_ci(r['rho_seed_mean'], 2)} | "
            f"{_ci(r['gain_seed0'])} | {_ci(r['gain_seed_mean'])} |"
        )
    if "power" in s:
        pw = s["power"]
        lines += markdown_section(
            "Power: splits needed for searched - random order (tuned) to exclude 0",
            f"From the paired run's {pw['splits']} per-split differences: mean "
            f"{_n(pw['mean'])}, SD {pw['sd']:.3f}. n50: the interval's expected lower bound "
            "reaches 0; n80: 80% power.",
            columns=["assumed true gain", "points", "n50", "n80"],
        )
        for name, need in pw["needed"].items():
            lines.append(f"| {name} | {_n(need['effect'] * 100, 2)} | {need['n50'] or 'never'} | "
                         f"{need['n80'] or 'never'} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def _write(report: dict[str, Any], out: Path, name: str, paired: Mapping[str, Any] | None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    if len(report["splits_data"]) >= 2:
        report["summary"] = summarise(report, paired)
        (out / f"{name}.md").write_text(markdown(report))
    _write_json(report, out, name)


def _write_json(report: Mapping[str, Any], out: Path, name: str) -> None:
    """The measurements so far (a run cut short keeps its finished splits), written compact: a
    12-split run's per-order, per-draw and per-site rows are 6 MB indented, 4 MB compact."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(report, separators=(",", ":")) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--first-split", type=int, default=300)
    parser.add_argument("--splits", type=int, default=12)
    parser.add_argument("--trials", type=int, default=10, help="Random-order tuning budget")
    parser.add_argument("--tune-folds", type=int, default=3)
    parser.add_argument("--cycles", type=int, default=2)
    parser.add_argument("--max-steps", type=int, default=40)
    parser.add_argument("--cv-folds", type=int, nargs="+", default=[3, 5])
    parser.add_argument("--draws", type=int, default=4, help="Independent CV draws per fold count")
    parser.add_argument("--model-seeds", type=int, default=4)
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--paired", type=Path, help="A paired run's JSON (power, hd8 orders)")
    parser.add_argument("--render", type=Path, help="Only rewrite the report from this JSON")
    parser.add_argument("--name", default="order9-dev")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    paired = json.loads(args.paired.read_text()) if args.paired else None
    if args.render is not None:
        report = json.loads(args.render.read_text())
        _write(report, args.render.parent, args.render.stem, paired)
        print(markdown(report))
        return 0
    if args.draws < 2 or args.model_seeds < 2:
        parser.error("--draws and --model-seeds must be at least 2 (covariances of replicates)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="baton-heart-order-"))
    site_dirs = _register_sites(args.data, work)
    config = {
        "trials": args.trials, "tune_folds": args.tune_folds, "cycles": args.cycles,
        "max_steps": args.max_steps, "cv_folds": args.cv_folds, "draws": args.draws,
        "model_seeds": args.model_seeds,
    }  # fmt: skip
    splits = list(range(args.first_split, args.first_split + args.splits))
    report: dict[str, Any] = {
        **report_head(argv, f"torch {torch.__version__}"),
        "config": config,
        "splits_data": [],
    }
    if args.jobs <= 1:
        _init_worker(site_dirs)
        for split in splits:
            report["splits_data"].append(run_split(split, config))
            report["wall_seconds"] = time.perf_counter() - started
            _write_json(report, args.out, args.name)
    else:
        with ProcessPoolExecutor(args.jobs, initializer=_init_worker,
                                 initargs=(site_dirs,)) as pool:  # fmt: skip
            futures = [pool.submit(run_split, split, config) for split in splits]
            for future in futures:
                report["splits_data"].append(future.result())
                report["wall_seconds"] = time.perf_counter() - started
                _write_json(report, args.out, args.name)
    report["wall_seconds"] = time.perf_counter() - started
    _write(report, args.out, args.name, paired)
    if "summary" in report:
        print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
