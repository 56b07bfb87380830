"""benchmarks/medquad_paired.py: its label-skew sites, its fast scorer and its trial guard, on a
synthetic pool (no MiniLM)."""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import pytest
import torch

from site_agent.simulation import HopRecord, SequentialResult, collapse_reason
from site_agent.tasks import HopHyperparameters
from tests.benchmark_module import benchmark_module, tabular_trainer

LABELS = (
    "causes",
    "exams and tests",
    "information",
    "inheritance",
    "outlook",
    "prevention",
    "symptoms",
    "treatment",
)
SOURCES = ("GARD", "NIDDK", "NINDS", "SeniorHealth", "CancerGov", "NHLBI")


@pytest.fixture(scope="module")
def bench() -> Iterator[ModuleType]:
    with benchmark_module("medquad_paired.py", "medquad_paired_benchmark") as module:
        yield module


def _pool(bench: ModuleType, rows: int = 480) -> list[Any]:
    rng = random.Random(0)
    pool = []
    for i in range(rows):
        label = LABELS[i % len(LABELS)]
        centre = [1.0 if j == LABELS.index(label) else 0.0 for j in range(len(LABELS))]
        features = tuple(c + rng.gauss(0, 0.3) for c in centre)
        pool.append(bench.Row(SOURCES[i % len(SOURCES)], f"q{i} {label}", label, features))
    return pool


def test_dirichlet_sites_cut_the_pool_by_question_type_and_change_with_the_split(
    bench: Any,
) -> None:
    pool = _pool(bench)
    datasets, rows = bench.split_sites(pool, "dirichlet-0.1", 0)
    assert [d.name for d in datasets] == list(bench.VIRTUAL_SITES)
    texts = [r.text for site_rows in rows.values() for r in site_rows]
    assert sorted(texts) == sorted(r.text for r in pool)  # every row at exactly one site
    # Label skew: two question types hold most of a site's rows at alpha 0.1 (about a quarter
    # of them without skew), and fewer at alpha 1.0.
    assert {d.seed for d in datasets} == {0}  # CV folds seeded with the split
    assert _top_two_share(datasets) >= 0.7
    milder, _ = bench.split_sites(pool, "dirichlet-1.0", 0)
    assert _top_two_share(milder) < _top_two_share(datasets)
    test_share = sum(len(d.test) for d in datasets) / len(pool)
    assert abs(test_share - bench.TEST_SHARE) < 0.01
    # Another split redraws the test rows, the partition and the folds.
    other, _ = bench.split_sites(pool, "dirichlet-0.1", 1)
    assert [len(d.train) for d in other] != [len(d.train) for d in datasets]
    assert {d.seed for d in other} == {1}
    by_source, source_rows = bench.split_sites(pool, "sources", 0)
    assert [d.name for d in by_source] == [s.lower() for s in SOURCES]
    assert all({r.source.lower() for r in source_rows[d.name]} == {d.name} for d in by_source)


def _top_two_share(datasets: Any) -> float:
    shares = []
    for dataset in datasets:
        counts = sorted(Counter(e.label for e in dataset.train).values(), reverse=True)
        shares.append(sum(counts[:2]) / sum(counts))
    return sum(shares) / len(shares)


def test_the_fast_scorer_equals_the_trainer_and_names_a_constant_model(bench: Any) -> None:
    trainer = tabular_trainer()
    datasets, _ = bench.split_sites(_pool(bench), "sources", 0)
    spec = bench._spec(LABELS)
    scorer = bench.Scorer(spec.labels)
    hop = HopHyperparameters(learning_rate=0.05, steps=20, batch_size=8, seed=0)
    tensors = trainer.run_hop(spec, datasets[0], hop, None).tensors
    for dataset in datasets:
        expected = trainer.evaluate(spec, dataset, "test", tensors)["accuracy"]
        assert scorer.accuracy(tensors, dataset.test) == pytest.approx(expected, abs=1e-12)
    assert scorer.collapse(tensors, [d.test for d in datasets], "test") is None
    constant = {
        "linear.weight": torch.zeros_like(tensors["linear.weight"]),
        "linear.bias": 5.0 * (torch.arange(len(LABELS)) == 2).float(),
    }
    found = scorer.collapse(constant, [d.test for d in datasets], "test")
    assert found == collapse_reason(trainer, spec, constant, datasets, "test")
    assert found is not None and "'information'" in found


def test_a_collapsed_or_diverged_trial_fails_with_its_reason(bench: Any) -> None:
    trainer = tabular_trainer()
    datasets, _ = bench.split_sites(_pool(bench), "sources", 0)
    spec = bench._spec(LABELS)
    scorer = bench.Scorer(spec.labels)
    hop = HopHyperparameters(learning_rate=0.05, steps=5, batch_size=8, seed=0)
    shape = trainer.run_hop(spec, datasets[0], hop, None).tensors

    def constant(views: Any) -> dict[str, torch.Tensor]:
        return {
            "linear.weight": torch.zeros_like(shape["linear.weight"]),
            "linear.bias": 5.0 * (torch.arange(len(LABELS)) == 6).float(),
        }

    cv = bench._run_cv(trainer, spec, datasets, 2, constant, scorer)
    assert cv.failure_reason is not None
    assert cv.failure_reason.startswith("fold 0: collapsed: predicts label 'symptoms'")

    def diverged(views: Any) -> SequentialResult:
        visits = tuple(HopRecord(v.name, {"train_loss": math.inf}) for v in views)
        return SequentialResult(tensors=dict(shape), visits=visits)

    cv = bench._run_cv(trainer, spec, datasets, 2, diverged, scorer)
    assert cv.failure_reason is not None and cv.failure_reason.startswith("diverged")

    def sound(views: Any) -> dict[str, torch.Tensor]:
        return dict(trainer.run_hop(spec, views[0], hop, None).tensors)

    assert bench._run_cv(trainer, spec, datasets, 2, sound, scorer).failure_reason is None


def test_the_controls_space_splits_each_sites_budget_over_cycles_and_consolidates(
    bench: Any,
) -> None:
    sites = [s.lower() for s in SOURCES]
    space = bench.search_space(sites, 0, 60, "controls")
    plan = space.plan(sites, cycles=6, steps=60, consolidation_steps=2)
    regular, consolidation = plan.hops[: 6 * 6], plan.hops[6 * 6 :]
    assert {h.hyperparameters.steps for h in regular} == {10}  # 60 steps over 6 cycles
    assert [h.site for h in consolidation] == sites
    assert {h.hyperparameters.steps for h in consolidation} == {2}
    assert space.max_cycles == bench.MAX_CYCLES
    narrow = bench.search_space(sites, 0, 30, "narrow")
    assert narrow.max_cycles == 2 and not narrow.consolidates
    with pytest.raises(ValueError, match="unknown space 'wide'"):
        bench.search_space(sites, 0, 30, "wide")


def test_memoised_feature_matrices_train_to_the_same_tensors(bench: Any) -> None:
    trainer = tabular_trainer()
    datasets, _ = bench.split_sites(_pool(bench), "sources", 0)
    spec = bench._spec(LABELS)
    hop = HopHyperparameters(learning_rate=0.05, steps=6, batch_size=8, seed=0)
    visits = [(d, hop) for d in datasets * 2]
    plain = bench.train_sequential(trainer, spec, visits).tensors
    from site_agent.tasks import _tabular

    original = _tabular._matrix
    undo = bench.memoise_feature_matrices()
    try:
        assert _tabular._matrix is not original
        memoised = bench.train_sequential(trainer, spec, visits).tensors
        examples = datasets[0].train
        assert _tabular._matrix(examples) is _tabular._matrix(examples)  # built once
    finally:
        undo()
    assert _tabular._matrix is original
    assert all(torch.equal(plain[k], memoised[k]) for k in plain)


@pytest.mark.slow  # ~25 CPU s: five studies of real (tiny) sequential training
def test_with_the_default_start_every_comparator_runs_it_first(
    bench: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ordering import short_cycles_seed

    monkeypatch.setattr(bench, "MAX_CYCLES", 2)  # short plans: a cheap test
    trainer = tabular_trainer()
    datasets, _ = bench.split_sites(_pool(bench, rows=240), "sources", 0)
    spec = bench._spec(LABELS)
    out = bench.sequential_methods(
        trainer, spec, datasets, 0, 1, 2, 12, 1, "budget", seed_default=True,
        plain_random_search=True,
    )  # fmt: skip
    sites = [d.name for d in datasets]
    sizes = {d.name: len(d.train) for d in datasets}
    space = bench.search_space(sites, 0, 12, "budget")
    default = short_cycles_seed(space, sorted(sites, key=lambda s: (sizes[s], s)))
    assert default.cycles == 3  # the space's 2 cycles and a consolidation cycle
    # One trial each: searched and random search ran the default; random search without it
    # did not; the tuned random order ran its hyperparameters with a random order.
    assert out["searched"]["chosen_plan"] == out["random-search"]["chosen_plan"]
    assert out["searched"]["chosen_plan"] == default.describe()
    assert out["searched"]["trial_values"] == out["random-search"]["trial_values"]
    assert out[bench.PLAIN]["chosen_plan"] != default.describe()
    tuned = out["random-order"]["chosen_hyperparameters"]
    assert tuned == default.hops[0].hyperparameters.model_dump()
    firsts = bench.baseline_defaults(12, 12, 12, 6 * 12)
    assert firsts["pooled"] == {"learning_rate": pytest.approx(bench.LR[1]), "steps": 72}
    assert firsts["fedavg"]["rounds"] == 12 and firsts["fedavg"]["steps"] == 5


def test_the_default_start_can_decay_further_and_consolidate_longer(bench: Any) -> None:
    sites = [f"site-{i}" for i in range(1, 7)]
    space = bench.search_space(sites, 0, 60, "budget")
    own = bench.default_start(space, sites)
    changed = bench.default_start(space, sites, 0.1, (6, 0.3))
    regular = 12 * 6  # 12 cycles of 5 steps at every site, then the consolidation cycle
    assert own.hops[:regular] != changed.hops[:regular]
    assert {h.hyperparameters.steps for h in own.hops[regular:]} == {1}
    assert {h.hyperparameters.steps for h in changed.hops[regular:]} == {6}
    last = changed.hops[regular - 1].hyperparameters.learning_rate
    assert changed.hops[regular].hyperparameters.learning_rate == pytest.approx(0.3 * last)
    # 0.1 is below what the space's per-hop decay (0.97 at least) reaches in 72 hops.
    assert changed.learning_rate_decay == pytest.approx(bench.BUDGET_DECAY[0])
    assert own.learning_rate_decay == pytest.approx(0.3 ** (1 / (regular - 1)))
    space.params_for(changed, None)  # a plan every comparator's space can propose


def test_a_default_consolidation_is_shortest_or_steps_and_factor(
    bench: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    assert bench.parse_consolidation(None) is None
    assert bench.parse_consolidation("shortest") is None
    assert bench.parse_consolidation("6:0.3") == (6, 0.3)
    with pytest.raises(SystemExit) as exited:
        bench.main(["--default-consolidation", "six"])
    assert exited.value.code == 2
    assert "a consolidation is 'shortest' or STEPS:FACTOR (e.g. 5:0.3), got 'six'" in (
        capsys.readouterr().err
    )


def test_a_run_takes_the_methods_it_did_not_run_from_an_earlier_run_of_its_design(
    bench: Any, tmp_path: Any
) -> None:
    design = {"trials": 10, "folds": 3, "max_steps": 60, "seed_default": True}
    earlier = {
        "config": design,
        "cells": [
            {"setting": "sources", "split": 15, "methods": {"searched": 1, "pooled": 2}},
            {"setting": "dirichlet-0.1", "split": 15, "methods": {"searched": 3, "pooled": 4}},
        ],
    }
    path = tmp_path / "earlier.json"
    forgetting_aware = {**design, "default_consolidation": "10:0.3", "only_searched": True}
    bench.check_reusable(forgetting_aware, earlier, path)  # the default start may differ
    cell = {"setting": "dirichlet-0.1", "split": 15, "methods": {"searched": 5}}
    bench.reuse_methods(cell, earlier, path)
    assert cell["methods"] == {"searched": 5, "pooled": 4}  # its own searched study kept
    assert cell["reused_methods"] == ["pooled"]
    assert "pooled (earlier.json)" in " ".join(bench._reuse_note([cell]))
    with pytest.raises(SystemExit, match=r"differs in folds \(3 vs 2\), trials \(10 vs 6\)"):
        bench.check_reusable({**design, "folds": 2, "trials": 6}, earlier, path)
    with pytest.raises(SystemExit, match=r"has no dirichlet-1\.0 split 15 to reuse"):
        bench.reuse_methods({"setting": "dirichlet-1.0", "split": 15, "methods": {}}, earlier, path)


@pytest.mark.slow  # ~5 CPU s: one study of real (tiny) sequential training
def test_only_the_searched_study_runs_when_asked(
    bench: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bench, "MAX_CYCLES", 2)
    datasets, _ = bench.split_sites(_pool(bench, rows=240), "sources", 0)
    out = bench.sequential_methods(
        tabular_trainer(), bench._spec(LABELS), datasets, 0, 1, 2, 12, 1, "budget",
        seed_default=True, default_consolidation=(3, 0.5), only_searched=True,
    )  # fmt: skip
    assert list(out) == ["searched"]
    assert out["searched"]["chosen_plan"].endswith("x3")  # 2 cycles and the consolidation
    consolidation = out["searched"]["after_each_visit"][-6:]
    assert [v["site"] for v in consolidation] == out["searched"]["chosen_plan"].split(" x")[
        0
    ].split(" > ")
