"""`baton simulate`: a plan run over virtual sites on Flower's simulation engine (Ray)."""

from __future__ import annotations

import dataclasses
import json
import logging
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Literal

import typer
from rich.markup import escape
from rich.table import Table

from coordinator.console._options import console, fail
from coordinator.plan import PlanError, load_plan
from coordinator.simulation import (
    SimulatorMissing,
    data_source,
    load_simulator,
    missing_module,
    simulation_job,
)
from protocols.exit_codes import EXIT_BAD_INPUT, EXIT_RUN_FAILED
from protocols.simulation import SimulationReport

__all__ = ["simulate"]


class PartitionerChoice(StrEnum):
    iid = "iid"
    dirichlet = "dirichlet"
    natural = "natural"


class SplitChoice(StrEnum):
    test = "test"
    validation = "validation"
    none = "none"


def simulate(
    plan_path: Annotated[Path, typer.Argument(help="Run plan (.toml or .json)")],
    data: Annotated[
        list[str],
        typer.Option(
            "--data",
            help="[NAME=]PATH: a site data folder holding the plan's registered dataset, or a "
            "source file (registered in memory). Repeat for several sources.",
        ),
    ],
    sites: Annotated[
        int | None,
        typer.Option(help="Virtual sites (default: the plan's sites; natural: one per source)"),
    ] = None,
    partitioner: Annotated[
        PartitionerChoice, typer.Option(help="How the sources' rows are cut into sites")
    ] = PartitionerChoice.natural,
    alpha: Annotated[float, typer.Option(help="Dirichlet concentration over labels")] = 0.5,
    seed: Annotated[int, typer.Option(help="Seed of the partitioning")] = 0,
    address: Annotated[
        str | None,
        typer.Option(help="An existing Ray cluster: 'auto' or 'ray://host:port' (default: local)"),
    ] = None,
    ray_cpus: Annotated[
        int | None, typer.Option(help="CPUs of the local Ray instance (default: all)")
    ] = None,
    cpus_per_site: Annotated[float, typer.Option(help="CPUs per virtual site")] = 1.0,
    gpus_per_site: Annotated[float, typer.Option(help="GPUs per virtual site")] = 0.0,
    evaluate: Annotated[
        SplitChoice, typer.Option(help="Split every site scores the final model on")
    ] = SplitChoice.test,
    base_model_dir: Annotated[
        Path | None, typer.Option(help="Base model folder (LoRA tasks)")
    ] = None,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Also write the report here as JSON")
    ] = None,
) -> None:
    """Simulate a plan over virtual sites: the sites' own task code on Flower + Ray."""
    try:
        plan = load_plan(plan_path)
        job = simulation_job(
            plan,
            [data_source(text) for text in data],
            sites=sites,
            partitioner=partitioner.value,
            alpha=alpha,
            seed=seed,
            address=address,
            ray_cpus=ray_cpus,
            cpus_per_site=cpus_per_site,
            gpus_per_site=gpus_per_site,
            evaluate_split=_SPLITS[evaluate],
            base_model_dir=base_model_dir,
        )
        simulator = load_simulator()
    except (PlanError, SimulatorMissing) as exc:
        raise fail(str(exc), EXIT_BAD_INPUT) from None
    logging.getLogger("site_agent").setLevel(logging.WARNING)
    try:
        report = simulator(job)
    except ImportError as exc:
        raise fail(str(missing_module(exc)), EXIT_BAD_INPUT) from None
    except ValueError as exc:
        raise fail(str(exc).splitlines()[0], EXIT_RUN_FAILED) from None
    _show(report)
    if json_out is not None:
        document = dataclasses.asdict(report)
        json_out.write_text(json.dumps(document, indent=2, sort_keys=True) + "\n")


_SPLITS: dict[SplitChoice, Literal["test", "validation"] | None] = {
    SplitChoice.test: "test",
    SplitChoice.validation: "validation",
    SplitChoice.none: None,
}


def _show(report: SimulationReport) -> None:
    hops = Table(title=f"{len(report.hops)} hops")
    for column in ("hop", "site", "train_loss", "val accuracy", "val loss"):
        hops.add_column(column)
    numbered = list(enumerate(report.hops))
    for index, hop in numbered if len(numbered) <= 40 else numbered[:20] + numbered[-20:]:
        hops.add_row(
            str(index),
            escape(hop.site),
            _number(hop.metrics.get("train_loss")),
            _number(hop.metrics.get("accuracy")),
            _number(hop.metrics.get("loss")),
        )
    console.print(hops)
    if report.evaluation:
        scores = Table(title="final model")
        for column in ("site", "examples", "accuracy", "auroc", "loss"):
            scores.add_column(column)
        for site, metrics in list(report.evaluation.items())[:40]:
            scores.add_row(
                escape(site),
                _number(metrics.get("examples")),
                _number(metrics.get("accuracy")),
                _number(metrics.get("auroc")),
                _number(metrics.get("loss")),
            )
        console.print(scores)
    rounds = f", {len(report.rounds)} rounds" if report.rounds else ""
    console.print(
        f"{len(report.site_rows)} virtual sites, {len(report.hops)} hops{rounds} in "
        f"{report.wall_seconds:.1f} s; final tensors sha256 {report.tensors_sha256}"
    )


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"
