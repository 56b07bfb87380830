"""Federated and hybrid plans simulated on Flower's simulation engine (Ray) against the
in-process baselines (``site_agent.simulation``) on the same data with the same seeds.

One Ray session for the module: a Ray head the simulations join (``--address``), since a
simulation that starts its own Ray instance spends tens of seconds on it.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from coordinator.plan import parse_plan
from coordinator.simulation import simulation_job
from protocols.simulation import DataSource, SimulationReport
from site_agent import ray_simulation
from site_agent.ray_simulation import simulate
from site_agent.registry import RegisteredDataset, register_dataset
from site_agent.simulation import evaluate_sites, train_fedavg, train_sequential
from site_agent.tasks import HopHyperparameters, TabularTrainer, TaskSpec
from tests.ray_head import ray_head

SITES = ("north", "south", "east")
TOLERANCE = 1e-6
DEFAULTS = {"steps": 12, "batch_size": 8, "learning_rate": 0.05, "seed": 5}
SPEC = TaskSpec(task_type="tabular", labels=("0", "1"), options={"model": "mlp", "hidden": [6]})


@dataclasses.dataclass(frozen=True)
class Sites:
    address: str  # the module's Ray head
    folders: dict[str, Path]
    datasets: list[RegisteredDataset]  # named by site, in SITES order


def _csv(path: Path, seed: int, shift: float) -> Path:
    rng = random.Random(seed)
    lines = ["age,chol,label"]
    for _ in range(60):
        age, chol = rng.gauss(55 + shift, 8), rng.gauss(230, 40)
        label = int(0.08 * (age - 55) + 0.01 * (chol - 230) + rng.gauss(0, 0.5) > 0)
        lines.append(f"{age:.1f},{chol:.1f},{label}")
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def address() -> Iterator[str]:
    with ray_head(cpus=1) as head:
        yield head


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory, address: str) -> Sites:
    tmp = tmp_path_factory.mktemp("ray-simulation")
    datasets = []
    for index, site in enumerate(SITES):
        csv = _csv(tmp / f"{site}.csv", index, 4 * index)
        registered = register_dataset(tmp / site, "heart", csv, task_type="tabular")
        datasets.append(dataclasses.replace(registered, name=site))
    return Sites(address, {site: tmp / site for site in SITES}, datasets)


def _simulate(data: Sites, **plan: Any) -> SimulationReport:
    document = {"task": "tabular", "dataset": "heart", "labels": ["0", "1"],
                "options": dict(SPEC.options), "defaults": DEFAULTS, **plan}  # fmt: skip
    sources = [DataSource(site, str(data.folders[site])) for site in SITES]
    return simulate(simulation_job(parse_plan(document), sources, address=data.address))


def _assert_scores_equal(report: SimulationReport, expected: dict[str, dict[str, float]]) -> None:
    assert set(report.evaluation) == set(expected)
    for site, metrics in expected.items():
        assert set(report.evaluation[site]) == set(metrics)
        for key, value in metrics.items():
            assert report.evaluation[site][key] == pytest.approx(value, abs=TOLERANCE), (site, key)


@pytest.fixture(scope="module")
def federated(sites: Sites) -> SimulationReport:
    return _simulate(
        sites,
        mode="federated",
        sites=list(SITES),
        federated={"strategy": "fedavg", "rounds": 3, "min_sites": 3},
    )


@pytest.mark.ray
def test_federated_simulation_matches_flowers_fedavg_in_one_process(
    sites: Sites, federated: SimulationReport
) -> None:
    trainer = TabularTrainer(num_threads=1)
    baseline = train_fedavg(
        trainer, SPEC, sites.datasets, rounds=3, hyperparameters=HopHyperparameters(**DEFAULTS)
    )
    assert [r.members for r in federated.rounds] == [SITES] * 3
    for simulated, expected in zip(federated.rounds, baseline.rounds, strict=True):
        assert simulated.weights == tuple(float(len(d.train)) for d in sites.datasets)
        hops = federated.hops[3 * (simulated.number - 1) : 3 * simulated.number]
        assert [hop.site for hop in hops] == list(SITES)
        for hop, record in zip(hops, expected.hops, strict=True):
            loss = record.metrics["train_loss"]
            assert hop.metrics["train_loss"] == pytest.approx(loss, abs=TOLERANCE)
        assert simulated.metrics["train_loss"] == pytest.approx(
            expected.train_metrics["train_loss"], abs=TOLERANCE
        )
    scores = evaluate_sites(trainer, SPEC, baseline.tensors, sites.datasets, "test")
    _assert_scores_equal(federated, scores)


@pytest.mark.ray
def test_hybrid_round_of_one_group_is_that_groups_sequential_chain(sites: Sites) -> None:
    report = _simulate(
        sites,
        mode="hybrid",
        groups=[{"name": "all", "sites": list(SITES)}],
        federated={"strategy": "fedavg", "rounds": 1},
    )
    trainer = TabularTrainer(num_threads=1)
    hyperparameters = HopHyperparameters(**DEFAULTS)
    chain = train_sequential(trainer, SPEC, [(d, hyperparameters) for d in sites.datasets])
    assert [hop.site for hop in report.hops] == list(SITES)
    assert report.rounds[0].weights == (float(sum(len(d.train) for d in sites.datasets)),)
    _assert_scores_equal(
        report, evaluate_sites(trainer, SPEC, chain.tensors, sites.datasets, "test")
    )


def test_work_is_cut_into_one_batch_per_lane_and_at_most_the_cap() -> None:
    batches = ray_simulation._batches
    assert batches(10, 2, 128) == [range(0, 5), range(5, 10)]
    assert batches(1000, 1, 128)[0] == range(0, 128) and len(batches(1000, 1, 128)) == 8
    assert batches(3, 8, 128) == [range(0, 1), range(1, 2), range(2, 3)]
    assert batches(0, 2, 128) == []
    assert sum(len(b) for b in batches(1001, 3, 100)) == 1001


def test_lanes_are_the_sites_ray_can_run_at_once() -> None:
    lanes = ray_simulation._lanes
    assert lanes({"CPU": 4.0}, 1.0, 0.0) == 4
    assert lanes({"CPU": 4.0}, 1.5, 0.0) == 2
    assert lanes({"CPU": 8.0, "GPU": 1.0}, 1.0, 0.5) == 2
    assert lanes({"CPU": 1.0}, 2.0, 0.0) == 1  # never none: Flower then runs one actor


def test_flower_runs_a_supernode_per_message_of_the_largest_exchange() -> None:
    supernodes = ray_simulation._supernodes
    assert supernodes(1000, 1) == 8  # 1,000 sites, 128 a message
    assert supernodes(1000, 16) == 16  # one message per lane
    assert supernodes(3, 8) == 3  # never more than the sites
    assert supernodes(1, 1) == 1


@pytest.mark.ray
def test_smaller_batches_change_no_hop_round_or_score(
    sites: Sites, federated: SimulationReport, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One chain a message and two sites a scoring message: three training messages a round
    and two scoring messages instead of one each; the same numbers."""
    monkeypatch.setattr(ray_simulation, "_CHAINS_PER_MESSAGE", 1)
    monkeypatch.setattr(ray_simulation, "_SITES_PER_MESSAGE", 2)
    report = _simulate(
        sites,
        mode="federated",
        sites=list(SITES),
        federated={"strategy": "fedavg", "rounds": 3, "min_sites": 3},
    )
    assert [hop.site for hop in report.hops] == [hop.site for hop in federated.hops]
    for hop, expected in zip(report.hops, federated.hops, strict=True):
        assert hop.metrics == pytest.approx(expected.metrics, abs=TOLERANCE)
    assert [r.weights for r in report.rounds] == [r.weights for r in federated.rounds]
    assert report.tensors_sha256 == federated.tensors_sha256
    _assert_scores_equal(report, federated.evaluation)


@pytest.mark.ray
def test_sequential_chain_in_segments_is_the_in_process_chain(
    sites: Sites, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Six hops, four a message: the second message starts from the first one's output."""
    monkeypatch.setattr(ray_simulation, "_HOPS_PER_MESSAGE", 4)
    report = _simulate(sites, sites=list(SITES), cycles=2)
    trainer = TabularTrainer(num_threads=1)
    hyperparameters = HopHyperparameters(**DEFAULTS)
    chain = train_sequential(trainer, SPEC, [(d, hyperparameters) for d in sites.datasets] * 2)
    assert [hop.site for hop in report.hops] == list(SITES) * 2
    for hop, record in zip(report.hops, chain.visits, strict=True):
        assert hop.metrics["train_loss"] == pytest.approx(
            record.metrics["train_loss"], abs=TOLERANCE
        )
    _assert_scores_equal(
        report, evaluate_sites(trainer, SPEC, chain.tensors, sites.datasets, "test")
    )
