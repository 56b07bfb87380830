"""``baton simulate``'s coordinator half: turns a parsed plan into a ``SimulationJob`` (the
hops exactly as the engine would lease them) and finds the simulator the site package declares.

The coordinator never imports the site agent: the simulator is loaded through the entry point
``protocols.simulation.SIMULATOR_GROUP``, so it is present only where the site agent and
Flower's simulation engine are installed (``baton-fl[site,simulation]``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from importlib.metadata import entry_points
from pathlib import Path
from typing import Literal

from coordinator.plan import PlanError, RunPlan, parse_plan
from protocols.simulation import (
    PARTITIONERS,
    SIMULATOR_GROUP,
    SIMULATOR_NAME,
    DataSource,
    Round,
    SimulationJob,
    Simulator,
)

__all__ = [
    "INSTALL_HINT",
    "SimulatorMissing",
    "data_source",
    "load_simulator",
    "plan_rounds",
    "simulation_job",
    "virtual_site_names",
]

INSTALL_HINT = "pip install 'baton-fl[site,simulation]'"
_SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class SimulatorMissing(RuntimeError):
    """The site agent or Flower's simulation engine is not installed here."""


def load_simulator() -> Simulator:
    """The simulator declared under the ``baton.simulators`` entry point.

    Raises:
        SimulatorMissing: If no package declares it or its modules cannot be imported.
    """
    found = entry_points(group=SIMULATOR_GROUP, name=SIMULATOR_NAME)
    if not found:
        raise SimulatorMissing(
            f"baton simulate needs the site agent and Flower's simulation engine: {INSTALL_HINT}"
        )
    entry = next(iter(found))
    try:
        simulator: Simulator = entry.load()
    except ImportError as exc:
        raise missing_module(exc) from exc
    return simulator


def missing_module(exc: ImportError) -> SimulatorMissing:
    """The one-line error for a simulator whose dependencies are not installed."""
    name = exc.name or str(exc)
    return SimulatorMissing(f"baton simulate cannot import {name}: {INSTALL_HINT}")


def data_source(text: str) -> DataSource:
    """Parses ``--data [NAME=]PATH``; the name defaults to the folder's or file's stem.

    Raises:
        PlanError: If the name is not a valid site name.
    """
    name, separator, path = text.partition("=")
    if not separator:
        path = text
        name = Path(text).stem
    if not _SITE_NAME.match(name):
        raise PlanError(f"--data {text}: {name!r} is not a valid site name (use NAME=PATH)")
    return DataSource(name=name, path=str(Path(path).expanduser().resolve()))


def virtual_site_names(
    plan: RunPlan, sources: Sequence[DataSource], sites: int | None, partitioner: str
) -> tuple[RunPlan, tuple[str, ...]]:
    """The virtual sites and the plan they run.

    ``natural``: one site per source, named by it; the plan's sites must be among them.
    ``iid``/``dirichlet``: ``sites`` partitions (default: the plan's site count), named as the
    plan's sites in first-visit order when the counts agree; otherwise ``site-0001``... and a
    ``sites`` x ``cycles`` plan is re-parsed over them (explicit hops cannot be).

    Raises:
        PlanError: With one line saying what does not fit.
    """
    if partitioner not in PARTITIONERS:
        known = ", ".join(PARTITIONERS)
        raise PlanError(f"unknown partitioner {partitioner!r}; use one of {known}")
    if not sources:
        raise PlanError("give the data to simulate on with --data [NAME=]PATH")
    names = [source.name for source in sources]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise PlanError(f"--data names repeat: {', '.join(repeated)}")
    visited = list(dict.fromkeys(site for site, _ in plan.expanded_hops()))
    if partitioner == "natural":
        if sites is not None and sites != len(sources):
            raise PlanError(
                f"the natural partitioner makes one site per --data source ({len(sources)}), "
                f"not {sites}"
            )
        missing = [site for site in visited if site not in names]
        if missing:
            raise PlanError(
                f"the plan visits {', '.join(missing)}, which no --data source is named "
                f"(use --data NAME=PATH)"
            )
        return plan, tuple(names)
    count = len(visited) if sites is None else sites
    if count < 1:
        raise PlanError(f"--sites must be at least 1, got {count}")
    if count == len(visited):
        return plan, tuple(visited)
    if not plan.sites:
        shape = (
            "hybrid plan's groups name" if plan.mode == "hybrid" else "plan with explicit hops has"
        )
        raise PlanError(
            f"a {shape} its own {len(visited)} sites; --sites {count} needs a plan that "
            f"lists 'sites'"
        )
    width = max(4, len(str(count)))
    virtual = tuple(f"site-{index:0{width}d}" for index in range(1, count + 1))
    document = plan.model_dump(mode="json")
    document["sites"] = list(virtual)
    return parse_plan(document), virtual


def simulation_job(
    plan: RunPlan,
    sources: Sequence[DataSource],
    *,
    sites: int | None = None,
    partitioner: str = "natural",
    alpha: float = 0.5,
    seed: int = 0,
    address: str | None = None,
    ray_cpus: int | None = None,
    cpus_per_site: float = 1.0,
    gpus_per_site: float = 0.0,
    evaluate_split: Literal["test", "validation"] | None = "test",
    base_model_dir: Path | None = None,
) -> SimulationJob:
    """The job for the simulator: the plan's hops in order, as the engine leases them.

    Raises:
        PlanError: If the sources, site count or resources do not fit the plan.
    """
    if not alpha > 0:
        raise PlanError(f"--alpha must be > 0, got {alpha}")
    if not cpus_per_site > 0 or gpus_per_site < 0:
        raise PlanError("--cpus-per-site must be > 0 and --gpus-per-site >= 0")
    if ray_cpus is not None and ray_cpus < 1:
        raise PlanError(f"--ray-cpus must be at least 1, got {ray_cpus}")
    plan, names = virtual_site_names(plan, sources, sites, partitioner)
    sequential = plan.mode == "sequential"
    return SimulationJob(
        task_type=plan.task,
        dataset=plan.dataset,
        labels=plan.labels,
        options=plan.options,
        lora=plan.lora.model_dump(mode="json"),
        hops=tuple((site, hp.model_dump()) for site, hp in plan.expanded_hops())
        if sequential
        else (),
        sites=names,
        sources=tuple(sources),
        partitioner=partitioner,  # type: ignore[arg-type]  # checked above
        alpha=alpha,
        seed=seed,
        address=address,
        ray_cpus=ray_cpus,
        cpus_per_site=cpus_per_site,
        gpus_per_site=gpus_per_site,
        evaluate_split=evaluate_split,
        cross_validation=(
            plan.cross_validation.model_dump() if plan.cross_validation is not None else None
        ),
        base_model_dir=str(base_model_dir) if base_model_dir is not None else None,
        mode=plan.mode,
        rounds=() if sequential else plan_rounds(plan),
        round_hyperparameters=None if sequential else plan.round_hyperparameters().model_dump(),
        aggregation=None if sequential else plan.federation(),
    )


def plan_rounds(plan: RunPlan) -> tuple[Round, ...]:
    """The members each round of a federated or hybrid plan trains, as the engine selects them:
    Flower's sample size (``FederatedSpec.sample_size``) drawn by a generator seeded with the
    plan's ``federated.seed`` and the round number, in plan order."""
    spec = plan.federated
    if spec is None:
        raise PlanError("a sequential plan has no rounds")
    return tuple(tuple(selected) for selected in plan.round_selection())
