"""`baton simulate`'s coordinator half: the job built from the plan, the virtual sites' names,
the simulator found through the site package's entry point, and the one-line errors."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

import coordinator.simulation
from coordinator.console.cli import app
from coordinator.plan import PlanError, RunPlan, parse_plan
from coordinator.simulation import (
    SimulatorMissing,
    data_source,
    load_simulator,
    simulation_job,
    virtual_site_names,
)
from protocols.simulation import SIMULATOR_GROUP, SIMULATOR_NAME, DataSource

ROOT = Path(__file__).resolve().parents[2]


def _plan(**changes: Any) -> RunPlan:
    document: dict[str, Any] = {
        "task": "tabular",
        "dataset": "heart",
        "labels": ["0", "1"],
        "sites": ["north", "south"],
        "cycles": 2,
        "defaults": {"steps": 5, "learning_rate": 0.1},
    }
    document.update(changes)
    return parse_plan(document)


def _sources(*names: str) -> list[DataSource]:
    return [DataSource(name, f"/data/{name}") for name in names]


def test_the_job_carries_the_hops_exactly_as_the_plan_expands_them() -> None:
    plan = _plan(
        sites=(),
        cycles=1,
        hops=[
            {"site": "south", "hyperparameters": {"learning_rate": 0.2, "seed": 4}},
            {"site": "north"},
        ],
    )
    job = simulation_job(plan, _sources("north", "south"))
    assert job.hops == tuple((site, hp.model_dump()) for site, hp in plan.expanded_hops())
    assert [site for site, _ in job.hops] == ["south", "north"]
    assert job.hops[0][1]["learning_rate"] == 0.2 and job.hops[1][1]["learning_rate"] == 0.1
    assert job.sites == ("north", "south")
    assert (job.task_type, job.dataset, job.labels) == ("tabular", "heart", ("0", "1"))


def test_more_virtual_sites_than_the_plan_names_replace_its_site_list() -> None:
    plan, names = virtual_site_names(_plan(), _sources("pool"), 12, "iid")
    assert names == tuple(f"site-{i:04d}" for i in range(1, 13))
    assert [site for site, _ in plan.expanded_hops()] == list(names) * 2
    assert {hp.steps for _, hp in plan.expanded_hops()} == {5}


def test_as_many_virtual_sites_as_the_plan_keep_its_names_and_order() -> None:
    plan = _plan(sites=["south", "north"])
    kept, names = virtual_site_names(plan, _sources("pool"), 2, "dirichlet")
    assert kept == plan and names == ("south", "north")


def test_explicit_hops_cannot_be_spread_over_other_sites() -> None:
    plan = _plan(sites=(), cycles=1, hops=[{"site": "north"}, {"site": "south"}])
    with pytest.raises(PlanError, match="plan with explicit hops has its own 2 sites"):
        virtual_site_names(plan, _sources("pool"), 10, "iid")


def test_natural_sites_are_the_sources() -> None:
    _, names = virtual_site_names(_plan(), _sources("south", "north", "east"), None, "natural")
    assert names == ("south", "north", "east")
    with pytest.raises(PlanError, match="one site per --data source"):
        virtual_site_names(_plan(), _sources("south", "north"), 5, "natural")
    with pytest.raises(PlanError, match="the plan visits south, which no --data source"):
        virtual_site_names(_plan(), _sources("north"), None, "natural")


def test_data_sources_are_named_by_their_folder_unless_named(tmp_path: Path) -> None:
    assert data_source(f"{tmp_path}/north").name == "north"
    named = data_source(f"east={tmp_path}/x.csv")
    assert named == DataSource("east", str(tmp_path / "x.csv"))
    with pytest.raises(PlanError, match="not a valid site name"):
        data_source(f"-bad={tmp_path}")


def test_bad_engine_settings_are_refused() -> None:
    with pytest.raises(PlanError, match="--alpha must be > 0"):
        simulation_job(_plan(), _sources("north", "south"), alpha=0)
    with pytest.raises(PlanError, match="--cpus-per-site"):
        simulation_job(_plan(), _sources("north", "south"), cpus_per_site=0)


def test_the_site_package_declares_its_simulator_for_baton_simulate() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    target = pyproject["project"]["entry-points"][SIMULATOR_GROUP][SIMULATOR_NAME]
    module, _, function = target.partition(":")
    imported = __import__(module, fromlist=[function])
    assert callable(getattr(imported, function))
    extras = pyproject["project"]["optional-dependencies"]
    assert any(r.startswith("flwr[simulation]") for r in extras["simulation"])
    assert "simulation" in extras["all"][0]


def test_a_missing_simulator_is_one_line_naming_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(coordinator.simulation, "entry_points", lambda **_: ())
    with pytest.raises(SimulatorMissing, match=r"pip install 'baton-fl\[site,simulation\]'"):
        load_simulator()


def test_baton_simulate_without_the_extra_exits_2_with_one_line(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(coordinator.simulation, "entry_points", lambda **_: ())
    plan = tmp_path / "plan.toml"
    plan.write_text('task = "tabular"\ndataset = "heart"\nlabels = ["0", "1"]\nsites = ["north"]\n')
    result = CliRunner().invoke(app, ["simulate", str(plan), "--data", f"north={tmp_path}"])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "baton-fl[site,simulation]" in lines[0]


def test_a_simulator_whose_engine_is_not_installed_names_the_module(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    class Entry:
        def load(self) -> None:
            raise ModuleNotFoundError("No module named 'ray'", name="ray")

    monkeypatch.setattr(coordinator.simulation, "entry_points", lambda **_: (Entry(),))
    with pytest.raises(SimulatorMissing, match=r"^baton simulate cannot import ray: pip install"):
        load_simulator()


def test_a_federated_job_carries_rounds_sampled_as_flower_sizes_them() -> None:
    plan = _plan(
        mode="federated",
        sites=["a", "b", "c", "d"],
        cycles=1,
        federated={"strategy": "fedadam", "rounds": 5, "fraction_train": 0.5, "local_steps": 9},
    )
    job = simulation_job(plan, _sources("a", "b", "c", "d"))
    assert job.mode == "federated" and job.hops == ()
    assert len(job.rounds) == 5
    assert all(len(members) == 2 for members in job.rounds)
    assert all(chain == (name,) for members in job.rounds for name, chain in members)
    assert len({members for members in job.rounds}) > 1  # the draw differs by round
    assert simulation_job(plan, _sources("a", "b", "c", "d")).rounds == job.rounds
    assert job.round_hyperparameters is not None and job.round_hyperparameters["steps"] == 9
    assert job.aggregation == plan.federation()
    assert job.aggregation["eta"] == 0.1  # Flower's FedAdam default, as the sites approved


def test_a_hybrid_job_trains_each_group_as_a_chain() -> None:
    plan = _plan(
        mode="hybrid",
        sites=(),
        cycles=1,
        groups=[{"name": "n", "sites": ["b", "a"]}, {"name": "s", "sites": ["c"]}],
        federated={"rounds": 2},
    )
    job = simulation_job(plan, _sources("a", "b", "c"))
    assert job.rounds == ((("n", ("b", "a")), ("s", ("c",))),) * 2
    with pytest.raises(PlanError, match="hybrid plan's groups name its own 3 sites"):
        simulation_job(plan, _sources("pool"), sites=30, partitioner="iid")
