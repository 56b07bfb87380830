"""benchmarks/heart_disease_paired.py: repeated k-fold CV (the objective every comparator
shares), forgetting on validation loss and the per-trial audit, on tiny synthetic sites."""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import pytest

from ordering import FloatRange, IntRange, OrderingStudy, SearchSpace
from site_agent.simulation import CrossValidationResult
from site_agent.tasks import TabularTrainer
from tests.benchmark_module import benchmark_module, tabular_site


@pytest.fixture(scope="module")
def bench() -> Iterator[ModuleType]:
    with benchmark_module("heart_disease_paired.py", "heart_disease_paired_benchmark") as module:
        yield module


def _result(
    sites: dict[str, float], visits: list[tuple[str, float, float]], failure: str | None = None
) -> CrossValidationResult:
    metrics = {s: {"accuracy": a, "loss": 1 - a, "examples": 10.0} for s, a in sites.items()}
    return CrossValidationResult(
        folds=2,
        sites=metrics,
        mean={"accuracy": statistics.fmean(sites.values()), "loss": 0.0, "examples": 20.0},
        pooled={"accuracy": 0.0, "loss": 0.0, "examples": 20.0},
        per_fold=({}, {}),
        visits=tuple((s, {"accuracy": a, "loss": loss, "examples": 10.0}) for s, a, loss in visits),
        failure_reason=failure,
    )


def test_repeat_seeds_start_with_the_split_seed_and_never_reuse_another_splits(bench: Any) -> None:
    datasets = [tabular_site("a", 12, 0.0, seed=4)]
    assert bench.repeat_seeds(datasets, 1) == [4]
    seeds = bench.repeat_seeds(datasets, 3)
    assert seeds[0] == 4 and len(set(seeds)) == 3
    assert not set(seeds[1:]) & set(range(1000))  # no split's own seed
    with pytest.raises(ValueError, match="at least 1"):
        bench.repeat_seeds(datasets, 0)


def test_repeated_cv_averages_sites_and_visits_and_keeps_the_first_failure(bench: Any) -> None:
    first = _result({"a": 0.6, "b": 0.8}, [("a", 0.7, 0.5), ("b", 0.8, 0.4)])
    second = _result({"a": 0.8, "b": 0.6}, [("a", 0.9, 0.3), ("b", 0.6, 0.6)], "fold 1: one class")
    combined = bench.combine_repeats([first, second])
    assert combined.sites["a"]["accuracy"] == pytest.approx(0.7)
    assert combined.mean["accuracy"] == pytest.approx(0.7)
    assert combined.visit_scores() == (("a", pytest.approx(0.8)), ("b", pytest.approx(0.7)))
    assert combined.folds == 4
    assert combined.failure_reason == "fold 1: one class"
    assert bench.combine_repeats([first]) is first


def test_loss_forgetting_is_the_worst_sites_rise_from_its_lowest_post_visit_loss(
    bench: Any,
) -> None:
    # site a: lowest post-visit loss 0.2, final 1 - 0.6 = 0.4; site b: 0.1 -> 0.2.
    cv = _result({"a": 0.6, "b": 0.8}, [("a", 0.7, 0.3), ("b", 0.8, 0.1), ("a", 0.7, 0.2)])
    assert bench.loss_forgetting(cv) == pytest.approx(0.2)
    assert bench.loss_forgetting(_result({"a": 0.6}, [])) == 0.0


def test_twin_executor_with_repeats_scores_the_mean_of_the_single_draws(
    bench: Any, trainer: TabularTrainer
) -> None:
    datasets = [tabular_site("a", 16, 0.0), tabular_site("b", 12, 0.7)]
    space = SearchSpace(
        sites=("a", "b"), cycles=IntRange(1, 2), learning_rate=FloatRange(1e-2, 1e-1, log=True),
        steps=5, batch_size=4, max_grad_norm=0.0, seed=0,
    )  # fmt: skip
    plan = space.plan(("b", "a"), cycles=2, learning_rate=0.05)
    reported: list[tuple[int, float]] = []

    def run(repeats: int, seed: int | None = None) -> Any:
        views = datasets if seed is None else [dataclasses.replace(d, seed=seed) for d in datasets]
        executor = bench.TwinExecutor(trainer, "per-site", views, 2, repeats)
        report = (lambda c, v: reported.append((c, v))) if repeats > 1 else (lambda c, v: None)
        return executor, executor.execute(plan, budget=1.0, report=report)

    executor, repeated = run(2)
    seeds = bench.repeat_seeds(datasets, 2)
    singles = [run(1, seed)[1] for seed in seeds]
    for site in ("a", "b"):
        mean = statistics.fmean(
            next(s.value for s in single.site_scores if s.site == site) for single in singles
        )
        assert next(s.value for s in repeated.site_scores if s.site == site) == pytest.approx(mean)
    assert [c for c, _ in reported] == [0, 1]  # intermediate values from the first repeat only
    audit = executor.audit[bench.plan_key(plan)]
    assert len(audit["repeat_cv"]) == 2 and audit["loss_forgetting"] >= 0.0
    assert statistics.fmean(audit["repeat_cv"]) == pytest.approx(
        statistics.fmean(s.value for s in repeated.site_scores)
    )


def test_audit_recomputes_a_forgetting_limits_choice_from_cv_only(bench: Any) -> None:
    # The limit drops the CV-best trial (forgetting 0.05) for the feasible one; the audit reports
    # what that choice cost on test without the test figures having chosen anything.
    trials = [
        {"cv": 0.80, "cv_forgetting": 0.05, "test": 0.75, "test_forgetting": 0.06},
        {"cv": 0.70, "cv_forgetting": 0.01, "test": 0.72, "test_forgetting": 0.00},
        {"cv": 0.60, "cv_forgetting": 0.00, "test": 0.90, "test_forgetting": 0.00},
    ]
    assert bench._limited_choice(trials, 0.02) is trials[1]
    assert bench._limited_choice(trials[:1], 0.02) is trials[0]  # none feasible: least forgetting
    cell = {
        "split": 0,
        "methods": {
            "searched": {"trial_audit": trials},
            "random-search": {"trial_audit": [dict(t, cv=1 - t["cv"]) for t in trials]},
        },
    }
    summary = bench.audit_summary([cell])
    assert summary["limit_studies"] == 2
    # searched: 0.75 -> 0.72; random search (CV reversed): picks the 0.90 trial either way.
    assert summary["limit_test_cost"] == pytest.approx((0.03 + 0.0) / 2)
    assert summary["cv_test"]["splits"] == 1
    assert bench.audit_summary([{"split": 0, "methods": {m: {} for m in bench.AUDITED}}]) is None


def test_audit_tolerance_rules_trade_at_most_the_tolerance_of_cv_for_less_forgetting(
    bench: Any,
) -> None:
    trials = [
        {"cv": 0.80, "cv_forgetting": 0.05, "loss_forgetting": 0.01, "test": 0.75,
         "test_forgetting": 0.06},
        {"cv": 0.79, "cv_forgetting": 0.00, "loss_forgetting": 0.09, "test": 0.70,
         "test_forgetting": 0.00},
        {"cv": 0.70, "cv_forgetting": 0.00, "loss_forgetting": 0.00, "test": 0.90,
         "test_forgetting": 0.00},
    ]  # fmt: skip
    assert bench._within("cv_forgetting", 0.02)(trials) is trials[1]
    assert bench._within("loss_forgetting", 0.02)(trials) is trials[0]
    assert bench._within("cv_forgetting", 0.0)(trials) is trials[0]
    cell = {"split": 0, "methods": {m: {"trial_audit": trials} for m in bench.AUDITED}}
    rules = bench.audit_summary([cell])["selection_rules"]
    assert rules["best CV"]["test_avg"] == pytest.approx(0.75)
    assert rules["least accuracy forgetting within 0.02 of the best CV"]["test_avg"] == (
        pytest.approx(0.70)
    )


def test_test_forgetting_is_the_worst_sites_drop_on_accuracy_loss_and_auroc(bench: Any) -> None:
    visits = [
        ("a", {"accuracy": 0.75, "loss": 0.50, "auroc": 0.80}),
        ("b", {"accuracy": 0.60, "loss": 0.60, "auroc": math.nan}),  # one-class test rows
        ("a", {"accuracy": 0.70, "loss": 0.40, "auroc": 0.90}),
    ]
    final = {
        "a": {"accuracy": 0.70, "loss": 0.45, "auroc": 0.85},
        "b": {"accuracy": 0.50, "loss": 0.62, "auroc": math.nan},
    }
    out = bench.test_forgetting(visits, final)
    assert out[bench.TEST_FORGETTING_KEY] == pytest.approx(0.10)  # b: 0.60 -> 0.50
    assert out[bench.TEST_LOSS_FORGETTING_KEY] == pytest.approx(0.05)  # a: 0.40 -> 0.45
    assert out[bench.TEST_AUROC_FORGETTING_KEY] == pytest.approx(0.05)  # b left out
    only_b = bench.test_forgetting(visits[1:2], {"b": final["b"]})
    assert bench.TEST_AUROC_FORGETTING_KEY not in only_b


_TRIALS = [
    {"number": 0, "cv": 0.80, "cv_forgetting": 0.10, "loss_forgetting": 0.30, "test": 0.75,
     "test_forgetting": 0.12},
    {"number": 1, "cv": 0.78, "cv_forgetting": 0.00, "loss_forgetting": 0.05, "test": 0.74,
     "test_forgetting": 0.00},
    {"number": 2, "cv": 0.70, "cv_forgetting": 0.00, "loss_forgetting": 0.00, "test": 0.90,
     "test_forgetting": 0.00},
]  # fmt: skip


def test_selection_rules_read_cv_only_and_trade_cv_for_less_forgetting(bench: Any) -> None:
    assert bench.selection_rule("best")(_TRIALS) is _TRIALS[0]
    assert bench.selection_rule("accuracy-within:0.01")(_TRIALS) is _TRIALS[0]
    assert bench.selection_rule("accuracy-within:0.02")(_TRIALS) is _TRIALS[1]
    assert bench.selection_rule("loss-within:0.1")(_TRIALS) is _TRIALS[2]
    # 0.80 - 0.5 x 0.10 = 0.75 < 0.78: the penalty moves the choice; 0.1 does not.
    assert bench.selection_rule("accuracy-penalty:0.5")(_TRIALS) is _TRIALS[1]
    assert bench.selection_rule("accuracy-penalty:0.1")(_TRIALS) is _TRIALS[0]
    flipped = [dict(t, test=1 - t["test"]) for t in _TRIALS]  # test never changes a choice
    assert bench.selection_rule("accuracy-penalty:0.5")(flipped)["number"] == 1
    for bad in ("worst", "accuracy-within", "loss-penalty:-1", "auroc-within:0.1"):
        with pytest.raises(ValueError, match="unknown selection rule"):
            bench.selection_rule(bad)


def test_reselect_redoes_every_sequential_methods_choice_from_its_audited_trials(
    bench: Any,
) -> None:
    cell = {
        "setting": "per-site",
        "split": 0,
        "methods": {
            **{m: {"trial_audit": _TRIALS, "test_avg": 0.75} for m in bench.SEQUENTIAL},
            "fedavg": {"test_avg": 0.70},
        },
    }
    report = {"cells": [cell], "config": {"select": None}}
    out = bench.reselect(report, "accuracy-within:0.02")
    for method in bench.SEQUENTIAL:
        chosen = out["cells"][0]["methods"][method]
        assert chosen["test_avg"] == 0.74 and chosen["reselected"]["trial"] == 1
        assert chosen[bench.TEST_FORGETTING_KEY] == 0.0
    assert out["cells"][0]["methods"]["fedavg"] == {"test_avg": 0.70}
    assert out["config"]["select"] == "accuracy-within:0.02"
    assert cell["methods"]["searched"]["test_avg"] == 0.75  # the run's report is untouched
    del cell["methods"]["random-order"]["trial_audit"]
    with pytest.raises(ValueError, match="random-order: no audited trials"):
        bench.reselect(report, "best")


def test_order_spread_summary_reports_what_the_cv_best_order_gains_over_the_mean_order(
    bench: Any,
) -> None:
    def cell(split: int, tests: list[float], cvs: list[float]) -> dict[str, Any]:
        spread = [
            {"order": [str(i)], "cv": cv, "test": t, "test_forgetting": 0.01 * i}
            for i, (t, cv) in enumerate(zip(tests, cvs, strict=True))
        ]
        spread.append({"order": ["x"], "failure_reason": "collapsed"})  # left out
        return {"split": split, "methods": {"random-order": {"order_spread": spread}}}

    rows = [cell(0, [0.70, 0.80, 0.75], [0.6, 0.9, 0.7]), cell(1, [0.70, 0.72], [0.8, 0.7])]
    summary = bench.order_spread_summary(rows)
    gains = summary["cv_best_gain"]["differences"]
    assert gains == [pytest.approx(0.80 - 0.75), pytest.approx(0.70 - 0.71)]
    assert summary["orders"] == pytest.approx(2.5)
    assert summary["oracle_gain_mean"] == pytest.approx((0.05 + 0.01) / 2)
    assert summary["test_range_mean"] == pytest.approx((0.10 + 0.02) / 2)
    assert bench.order_spread_summary([{"split": 0, "methods": {"random-order": {}}}]) is None


@pytest.mark.slow  # a 4-trial study on the twin: seconds on a quiet machine, more under load
def test_choose_applies_a_rule_to_a_studys_trials_with_the_executors_loss_forgetting(
    bench: Any, trainer: TabularTrainer
) -> None:
    datasets = [tabular_site("a", 16, 0.0), tabular_site("b", 12, 0.7)]
    space = SearchSpace(
        sites=("a", "b"), cycles=IntRange(1, 2), learning_rate=FloatRange(1e-2, 3e-1, log=True),
        steps=IntRange(2, 8), batch_size=4, max_grad_norm=0.0, seed=0,
    )  # fmt: skip
    executor = bench.TwinExecutor(trainer, "per-site", datasets, 2)
    study = OrderingStudy.create(None, "choose", space, seed=1, pruning=None)
    records = study.optimize(executor, 4)
    complete = [r for r in records if r.state == "COMPLETE"]
    loss = {r.number: executor.audit[bench.plan_key(r.plan)]["loss_forgetting"] for r in complete}
    assert bench.choose(records, executor, "best").number == study.best_record().number
    assert (
        bench.choose(records, executor, "loss-within:1").number
        == min(complete, key=lambda r: (loss[r.number], -(r.value or 0.0))).number
    )
    with pytest.raises(RuntimeError, match="every trial failed"):
        bench.choose([], executor, "best")


def test_reselect_of_an_older_run_leaves_random_order_without_audited_trials_as_it_was(
    bench: Any,
) -> None:
    cell = {
        "setting": "global",
        "split": 0,
        "methods": {
            "searched": {"trial_audit": _TRIALS, "test_avg": 0.75},
            "random-search": {"trial_audit": _TRIALS, "test_avg": 0.75},
            "random-order": {"trial_audit": [{"number": 0, "cv": 0.8}], "test_avg": 0.77},
        },
    }
    report = {"cells": [cell], "config": {}}
    methods = bench.audited_methods(report)
    assert methods == ("searched", "random-search")
    out = bench.reselect(report, "accuracy-within:0.02", methods)
    assert out["cells"][0]["methods"]["random-order"] == cell["methods"]["random-order"]
    assert out["cells"][0]["methods"]["searched"]["test_avg"] == 0.74
    assert out["config"]["reselected_methods"] == ["searched", "random-search"]


def test_the_forgetting_target_is_judged_on_test_accuracy_not_on_cv(bench: Any) -> None:
    paired = {"mean": 0.01, "low": 0.001, "high": 0.02}
    searched = {
        "worst_forgetting_max": 0.01,  # within the target on CV
        "test_forgetting_max": 0.0625,  # one Swiss test row lost
        "test_forgetting_mean": 0.03,
        "final_collapsed": 0,
    }
    settings = {
        "global": {
            "splits": [0],
            "methods": {"searched": searched},
            "paired": {m: paired for m in ("random-search", "random-order", "pooled")},
        }
    }
    line = next(v for v in bench.verdict(settings) if "forgetting" in v)
    assert "**missed**" in line and "on test max over splits 0.062" in line
    searched["test_forgetting_max"] = 0.0
    line = next(v for v in bench.verdict(settings) if "forgetting" in v)
    assert "**met**" in line


def test_merge_combines_runs_of_one_configuration_and_refuses_others(bench: Any) -> None:
    def run(split: int, **config: Any) -> dict[str, Any]:
        return {
            "command": f"run {split}",
            "wall_seconds": 10.0,
            "config": {"trials": 10, "jobs": 1, **config},
            "cells": [{"setting": "global", "split": split}],
        }

    merged = bench.merge([run(3, jobs=2, reuse_baselines="x.json"), run(0)])
    assert [c["split"] for c in merged["cells"]] == [0, 3]
    assert merged["splits"] == [0, 3] and merged["wall_seconds"] == 20.0
    with pytest.raises(ValueError, match="different configurations"):
        bench.merge([run(0), run(1, trials=8)])
    with pytest.raises(ValueError, match="more than one run"):
        bench.merge([run(0), run(0)])


SIZES = {"cleveland": 104, "hungary": 89, "switzerland": 16, "va": 45}


def test_forgetting_rows_names_the_site_and_rows_a_test_accuracy_drop_is_made_of(
    bench: Any,
) -> None:
    assert bench.forgetting_rows(1 / 16, SIZES) == ("switzerland", 1)
    assert bench.forgetting_rows(2 / 45, SIZES) == ("va", 2)
    assert bench.forgetting_rows(3 / 89, SIZES) == ("hungary", 3)
    # 2 of 16 Swiss rows is also 13 of 104 Cleveland rows: the fewer rows are counted.
    assert bench.forgetting_rows(0.125, SIZES) == ("switzerland", 2)
    assert bench.forgetting_rows(0.0, SIZES) == ("", 0)
    assert bench.forgetting_rows(0.03, SIZES) is None  # no whole number of any site's rows
    assert bench.forgetting_rows(None, SIZES) is None


def _forgetting_cell(split: int, forgetting: float | None) -> dict[str, Any]:
    method = {"test_worst_forgetting": forgetting}
    methods = {m: method for m in ("searched", "random-search", "random-order")}
    return {"setting": "per-site", "split": split, "test_rows": SIZES, "methods": methods}


def test_forgetting_rows_summary_counts_splits_by_rows_lost_and_the_two_point_target(
    bench: Any,
) -> None:
    cells = [
        _forgetting_cell(0, 0.0),
        _forgetting_cell(1, 1 / 104),  # one Cleveland row: within 2 points
        _forgetting_cell(2, 1 / 16),
        _forgetting_cell(3, 0.125),
        _forgetting_cell(4, 4 / 45),
        _forgetting_cell(5, 0.03),
    ]
    summary = bench.forgetting_rows_summary(cells, "searched")
    assert summary["rows"] == {"0": 1, "1": 2, "2": 1, "3+": 1}
    assert summary["sites"] == {"cleveland": 1, "switzerland": 2, "va": 1}
    assert summary["decoded"] == 5 and summary["splits"] == 6
    assert summary["within_target"] == 2
    methods = {m: {"test_forgetting_rows": summary} for m in ("searched", "random-search",
                                                              "random-order")}  # fmt: skip
    lines = bench._forgetting_rows_lines(cells, "per-site", methods)
    assert "6.2 points at switzerland" in lines[0]
    assert any(
        line.startswith("- searched: 0 rows in 1/6 splits, 1 row in 2, 2 rows in 1, 3 or more in 1")
        and "1 not whole rows" in line
        and "<= 2 points in 2/6" in line
        for line in lines
    )


def test_only_splits_keeps_a_range_of_a_reports_splits_and_refuses_an_empty_one(
    bench: Any,
) -> None:
    report = {"command": "run", "splits": list(range(12)),
              "cells": [{"setting": s, "split": i} for s in ("per-site", "global")
                        for i in range(12)]}  # fmt: skip
    subset = bench.only_splits(report, "0-9")
    assert subset["splits"] == list(range(10)) and len(subset["cells"]) == 20
    assert subset["command"] == "run (splits 0-9 only)"
    assert [c["split"] for c in bench.only_splits(report, "11")["cells"]] == [11, 11]
    for spec in ("9-3", "a-b", "-1"):
        with pytest.raises(ValueError, match="use A or A-B"):
            bench.only_splits(report, spec)
    with pytest.raises(ValueError, match="has none of them"):
        bench.only_splits(report, "20-29")
    with pytest.raises(SystemExit):
        bench.main(["--only-splits", "0-9"])  # only with --render: refused before any work
