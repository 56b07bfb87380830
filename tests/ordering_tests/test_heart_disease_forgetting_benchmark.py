"""benchmarks/heart_disease_forgetting.py: the final mechanisms (average of the last cycle,
one FedAvg round), the row-level test scores and the forgetting estimator's noise figures, on
tiny synthetic sites."""

from __future__ import annotations

import math
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import pytest
import torch

from ordering import FloatRange, IntRange, SearchSpace
from site_agent.registry import RegisteredDataset
from site_agent.simulation import evaluate_sites, train_sequential
from site_agent.tasks import TabularTrainer
from tests.benchmark_module import benchmark_module, tabular_site


@pytest.fixture(scope="module")
def bench() -> Iterator[ModuleType]:
    with benchmark_module("heart_disease_forgetting.py", "heart_disease_forgetting_bench") as m:
        yield m


def _two_sites(bench: Any) -> tuple[list[RegisteredDataset], Any, Any]:
    """Sites a and b, their per-site task spec and the cycles of the plan b > a x2."""
    datasets = [tabular_site("a", 16, 0.0), tabular_site("b", 12, 0.7)]
    space = SearchSpace(
        sites=("a", "b"), cycles=IntRange(1, 2), learning_rate=FloatRange(1e-2, 1e-1, log=True),
        steps=5, batch_size=4, max_grad_norm=0.0, seed=0,
    )  # fmt: skip
    cycles = bench.plan_cycles(space.plan(("b", "a"), cycles=2, learning_rate=0.05))
    return datasets, bench._spec_for("per-site")(datasets), cycles


def _trained(
    bench: Any, trainer: TabularTrainer, final: str
) -> tuple[tuple[list[RegisteredDataset], Any, Any], Any, Any]:
    """`_two_sites`, and their plan trained with the plain final ("seq") and with `final`."""
    datasets, spec, cycles = _two_sites(bench)
    plain = bench.train_plan(trainer, spec, datasets, cycles, "seq")
    return (datasets, spec, cycles), plain, bench.train_plan(trainer, spec, datasets, cycles, final)


def test_weighted_average_weights_models_by_their_examples(bench: Any) -> None:
    first = {"w": torch.tensor([0.0, 4.0])}
    second = {"w": torch.tensor([4.0, 0.0])}
    averaged = bench.weighted_average([first, second], [1.0, 3.0])
    assert averaged["w"].tolist() == pytest.approx([3.0, 1.0])
    assert averaged["w"].dtype == first["w"].dtype
    with pytest.raises(ValueError, match="positive weights"):
        bench.weighted_average([first], [1.0, 2.0])


def test_the_average_final_is_the_last_cycles_post_visit_models_weighted_by_train_rows(
    bench: Any, trainer: TabularTrainer
) -> None:
    (datasets, spec, cycles), plain, averaged = _trained(bench, trainer, "avg")
    # The same visits (the mechanism trains nothing more), a different final model.
    assert [s for s, _, _ in averaged.visits] == ["b", "a", "b", "a"]
    for (_, mine, _), (_, theirs, _) in zip(averaged.visits, plain.visits, strict=True):
        assert torch.equal(mine["linear.weight"], theirs["linear.weight"])
    assert torch.equal(plain.tensors["linear.weight"], plain.visits[-1][1]["linear.weight"])
    last_b, last_a = averaged.visits[2][1], averaged.visits[3][1]
    expected = (12 * last_b["linear.weight"] + 16 * last_a["linear.weight"]) / 28
    assert torch.allclose(averaged.tensors["linear.weight"], expected)
    assert not torch.equal(averaged.tensors["linear.weight"], plain.tensors["linear.weight"])
    with pytest.raises(ValueError, match="unknown final mechanism"):
        bench.train_plan(trainer, spec, datasets, cycles, "median")


def test_the_fedavg_final_averages_one_parallel_round_from_the_sequential_model(
    bench: Any, trainer: TabularTrainer
) -> None:
    (datasets, spec, cycles), plain, fed = _trained(bench, trainer, "fed")
    # The round's two local updates are visits too, each from the sequential model.
    assert [s for s, _, _ in fed.visits] == ["b", "a", "b", "a", "b", "a"]
    by_name = {d.name: d for d in datasets}
    hps = dict(cycles[-1])
    local = {
        site: train_sequential(trainer, spec, [(by_name[site], hps[site])],
                               incoming=plain.tensors).tensors
        for site in ("a", "b")
    }  # fmt: skip
    assert torch.equal(fed.visits[4][1]["linear.weight"], local["b"]["linear.weight"])
    expected = (16 * local["a"]["linear.weight"] + 12 * local["b"]["linear.weight"]) / 28
    assert torch.allclose(fed.tensors["linear.weight"], expected, atol=1e-6)


def test_row_scores_are_the_trainers_evaluation_row_by_row(
    bench: Any, trainer: TabularTrainer
) -> None:
    datasets, spec, cycles = _two_sites(bench)
    tensors = bench.train_plan(trainer, spec, datasets, cycles, "seq").tensors
    scores = evaluate_sites(trainer, spec, tensors, datasets, "test")
    for dataset in datasets:
        rows = bench.row_scores(trainer, spec, tensors, dataset)
        assert len(rows) == len(dataset.test)
        assert sum(c for c, _ in rows) / len(rows) == pytest.approx(
            scores[dataset.name]["accuracy"]
        )
        assert sum(x for _, x in rows) / len(rows) == pytest.approx(scores[dataset.name]["loss"])


def _rows(correct: list[int], p_true: float) -> list[tuple[float, float]]:
    return [(float(c), -math.log(p_true)) for c in correct]


def test_forgetting_figures_give_the_worst_drop_on_three_scales_and_its_noise(bench: Any) -> None:
    # Site a: its post-visit model had 3 of 4 rows right, the final model 1 (drop .5, with
    # p(true) .8 -> .6); site b ends as its visit left it.
    visits = [("a", _rows([1, 1, 1, 0], 0.8)), ("b", _rows([1, 0], 0.7))]
    final = {"a": _rows([1, 0, 0, 0], 0.6), "b": _rows([1, 0], 0.7)}
    figures = bench.forgetting_figures(visits, final, seed=0, draws=200)
    assert figures["acc"] == pytest.approx(0.5)
    assert figures["worst_site"] == "a" and figures["rows_lost"] == 2
    assert figures["p_true"] == pytest.approx(0.2)
    assert figures["loss"] == pytest.approx(math.log(0.8) - math.log(0.6))
    # The null draws centre each difference: their mean is the noise of a max over rows.
    assert 0.0 < figures["noise_mean"] < figures["acc"]
    assert figures["corrected"] == pytest.approx(figures["acc"] - figures["bias"])
    # A model that never changed: no drop, and the null and the bias are exactly 0.
    same = bench.forgetting_figures([("a", final["a"])], {"a": final["a"]}, seed=0, draws=50)
    assert same["acc"] == 0.0 and same["noise_mean"] == 0.0 and same["bias"] == 0.0
    assert same["noise_p"] == 1.0
