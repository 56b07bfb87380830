"""The seam between ``baton simulate`` (coordinator side: reads the plan) and the simulator the
site package declares (runs the sites' task code): the job handed over and the report returned.

The coordinator never imports the site agent; it finds the simulator through the entry point
group ``SIMULATOR_GROUP`` and passes plain values only (the plan as its parser expanded it).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol

__all__ = [
    "PARTITIONERS",
    "SIMULATOR_GROUP",
    "SIMULATOR_NAME",
    "DataSource",
    "Round",
    "SimulatedHop",
    "SimulatedRound",
    "SimulationJob",
    "SimulationReport",
    "Simulator",
]

# Entry point group and name under which the site package declares its simulator.
SIMULATOR_GROUP = "baton.simulators"
SIMULATOR_NAME = "flower"
PARTITIONERS = ("iid", "dirichlet", "natural")
Partitioner = Literal["iid", "dirichlet", "natural"]


@dataclass(frozen=True)
class DataSource:
    """Data the virtual sites are cut from: a site data folder holding the plan's registered
    dataset, or a source file registered in memory (the registry's split, seeded)."""

    name: str  # the natural partition's id: with ``natural``, the virtual site's name
    path: str


# One round of a federated or hybrid run: (member, its chain of sites) for every member the
# round selected, in plan order; a federated member is one site and its one-site chain.
Round = tuple[tuple[str, tuple[str, ...]], ...]


@dataclass(frozen=True)
class SimulationJob:
    """One plan to simulate, as plain values.

    Sequential: ``hops`` is the chain exactly as the engine would lease it: (site, the hop's
    hyperparameters as the plan parser expanded them). Federated and hybrid: ``rounds`` are the
    members each round trains, every hop with ``round_hyperparameters``, aggregated by the
    Flower strategy ``aggregation`` names (the plan's approved ``federation``). ``sites`` are
    the virtual sites in partition order; with ``natural`` they are the sources' names.
    """

    task_type: str
    dataset: str
    labels: tuple[str, ...]
    options: Mapping[str, Any]
    lora: Mapping[str, Any]
    hops: tuple[tuple[str, Mapping[str, Any]], ...]
    sites: tuple[str, ...]
    sources: tuple[DataSource, ...]
    partitioner: Partitioner = "natural"
    alpha: float = 0.5  # Dirichlet concentration over the labels
    seed: int = 0  # partitioning (and the split of source files)
    address: str | None = None  # an existing Ray cluster ("auto", "ray://host:port"); None: local
    ray_cpus: int | None = None  # CPUs of a local Ray instance; None: Ray's default
    cpus_per_site: float = 1.0  # Flower's client_resources per virtual site
    gpus_per_site: float = 0.0
    evaluate_split: Literal["test", "validation"] | None = "test"  # final model, every site
    cross_validation: Mapping[str, int] | None = None
    mode: Literal["sequential", "federated", "hybrid"] = "sequential"
    rounds: tuple[Round, ...] = ()
    round_hyperparameters: Mapping[str, Any] | None = None
    aggregation: Mapping[str, Any] | None = None  # strategy and its options
    base_model_dir: str | None = None  # LoRA tasks: the transformers model folder


@dataclass(frozen=True)
class SimulatedHop:
    """One hop of the simulated chain: where it ran and what ``run_hop`` reported."""

    site: str
    metrics: Mapping[str, float]


@dataclass(frozen=True)
class SimulatedRound:
    """One aggregated round: who contributed, with what weight, and Flower's train metrics."""

    number: int
    members: tuple[str, ...]
    weights: tuple[float, ...]  # examples each member's chain trained on
    metrics: Mapping[str, float]


@dataclass(frozen=True)
class SimulationReport:
    """What a simulation produced, in hop order; evaluations per site of the final model."""

    hops: tuple[SimulatedHop, ...]
    evaluation: Mapping[str, Mapping[str, float]]
    tensors_sha256: str  # sha256 over the final tensors' names, shapes and float32 bytes
    site_rows: Mapping[str, Mapping[str, int]]  # site -> rows per split
    wall_seconds: float
    rounds: tuple[SimulatedRound, ...] = ()


class Simulator(Protocol):
    """What the entry point ``SIMULATOR_GROUP`` / ``SIMULATOR_NAME`` loads."""

    def __call__(self, job: SimulationJob) -> SimulationReport:
        """Runs the job; raises ``ValueError`` with a one-line reason on bad input."""
        ...
