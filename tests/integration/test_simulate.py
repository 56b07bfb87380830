"""`baton simulate` on Flower's simulation engine (Ray) against a real run of the same plan:
real coordinator, real site processes, the same registered data, fixed seeds.

The simulation joins a Ray head started for the module (`--address`); every test reads the
same two runs.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import pytest

from coordinator.console.admin import AdminClient
from coordinator.plan import load_plan
from protocols.simulation import SIMULATOR_GROUP, SIMULATOR_NAME
from protocols.v1 import baton_pb2 as pb
from site_agent.registry import register_dataset
from tests.conftest import SITES, Pki
from tests.integration.conftest import Cluster, wait_for_run
from tests.ray_head import ray_head

ROOT = Path(__file__).resolve().parents[2]
TOLERANCE = 1e-6
# Explicit hops with different hyperparameters, a site visited twice: a simulator that ignored
# the plan's order or any hop's settings would not reproduce the run.
PLAN = """
name = "simulated"
task = "tabular"
dataset = "heart"
labels = ["0", "1"]
options = {{ model = "mlp", hidden = [8] }}

[[hops]]
site = "{a}"
hyperparameters = {{ learning_rate = 0.05, steps = 30, batch_size = 4, seed = 7 }}

[[hops]]
site = "{b}"
hyperparameters = {{ learning_rate = 0.02, steps = 25, batch_size = 8, seed = 3 }}

[[hops]]
site = "{a}"
[hops.hyperparameters]
learning_rate = 0.01
epochs = 2.0
batch_size = 4
seed = 11
weight_decay = 0.01
"""


@dataclass(frozen=True)
class Runs:
    real: pb.RunStatus
    simulated: dict[str, Any]


def simulator_path(directory: Path) -> str:
    """A PYTHONPATH entry declaring the site package's simulator entry point as pyproject does,
    for checkouts whose installed metadata predates it (an installed one is used as is)."""
    if entry_points(group=SIMULATOR_GROUP, name=SIMULATOR_NAME):
        return ""
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]
    target = declared[SIMULATOR_GROUP][SIMULATOR_NAME]
    info = directory / "baton_simulator_entry-0.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: baton-simulator-entry\n")
    (info / "entry_points.txt").write_text(f"[{SIMULATOR_GROUP}]\n{SIMULATOR_NAME} = {target}\n")
    return str(directory)


def baton(
    *args: str, extra_path: str = "", timeout: float = 240
) -> subprocess.CompletedProcess[str]:
    path = os.pathsep.join(p for p in (str(ROOT), extra_path, os.environ.get("PYTHONPATH")) if p)
    return subprocess.run(
        [sys.executable, "-m", "coordinator", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONPATH": path, "COLUMNS": "200"},
        check=False,
    )


def _write_csv(path: Path, seed: int, shift: float) -> None:
    rng = random.Random(seed)
    lines = ["age,chol,label"]
    for _ in range(80):
        age, chol = rng.gauss(55 + shift, 8), rng.gauss(230, 40)
        label = int(0.08 * (age - 55) + 0.01 * (chol - 230) + rng.gauss(0, 0.5) > 0)
        lines.append(f"{age:.1f},{chol:.1f},{label}")
    path.write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def address() -> Iterator[str]:
    with ray_head(cpus=1) as head:
        yield head


@pytest.fixture(scope="module")
def runs(pki: Pki, tmp_path_factory: pytest.TempPathFactory, address: str) -> Runs:
    tmp = tmp_path_factory.mktemp("simulate")
    sites = list(SITES[:2])
    for index, site in enumerate(sites):
        _write_csv(tmp / f"{site}.csv", seed=index, shift=5 * index)
        register_dataset(tmp / site, "heart", tmp / f"{site}.csv", task_type="tabular")
    plan_file = tmp / "plan.toml"
    plan_file.write_text(PLAN.format(a=sites[0], b=sites[1]))
    plan = load_plan(plan_file)

    cluster = Cluster(log_dir=tmp / "logs")
    with cluster.running():
        port = cluster.start_coordinator(
            state_dir=tmp / "coordinator", pki_dir=pki.directory, port_file=tmp / "port"
        )
        for site in sites:
            cluster.start_site(site, coordinator=f"localhost:{port}", pki_dir=pki.directory,
                               data_dir=tmp / site, threads=1,
                               approve=[plan.approval_bundle().sha256])  # fmt: skip
        with AdminClient(f"localhost:{port}", pki.tls("admin")) as admin:
            admin.wait_for_sites(set(sites), timeout=240)
            run = wait_for_run(admin, cluster, admin.start_run(plan))
            admin.evaluate_run(run.run_id, "test")
            real = admin.wait_for_evaluations(run.run_id, timeout=60)
    assert real.status == "completed", real.error

    report = tmp / "simulated.json"
    done = baton(
        "simulate", str(plan_file),
        "--data", f"{sites[1]}={tmp / sites[1]}", "--data", f"{sites[0]}={tmp / sites[0]}",
        "--address", address, "--json", str(report),
        extra_path=simulator_path(tmp / "entry-point"), timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    return Runs(real=real, simulated=json.loads(report.read_text()))


@pytest.mark.slow  # a real run and a Ray head: one to three minutes on 2 cores
def test_simulated_chain_matches_the_real_run_hop_by_hop(runs: Runs) -> None:
    real_hops = sorted(runs.real.hops, key=lambda hop: hop.index)
    simulated = runs.simulated["hops"]
    assert [hop["site"] for hop in simulated] == [hop.site for hop in real_hops]
    for real, hop in zip(real_hops, simulated, strict=True):
        assert real.status == "committed"
        assert set(hop["metrics"]) == set(real.metrics)
        for key, value in real.metrics.items():
            assert hop["metrics"][key] == pytest.approx(value, abs=TOLERANCE), (real.index, key)
    # The hops trained as the plan said: the epochs hop ran its own step count.
    assert [hop["metrics"]["train_steps"] for hop in simulated[:2]] == [30.0, 25.0]


@pytest.mark.slow
def test_simulated_final_model_scores_as_the_real_one_at_every_site(runs: Runs) -> None:
    real = {e.site: dict(e.metrics) for e in runs.real.evaluations if e.status == "done"}
    assert set(real) == set(SITES[:2])
    assert set(runs.simulated["evaluation"]) == set(real)
    for site, metrics in real.items():
        simulated = runs.simulated["evaluation"][site]
        assert set(simulated) == set(metrics)
        for key, value in metrics.items():
            assert simulated[key] == pytest.approx(value, abs=TOLERANCE), (site, key)


def test_simulate_refuses_a_plan_site_without_data_in_one_line(tmp_path: Path) -> None:
    plan = tmp_path / "plan.toml"
    plan.write_text(PLAN.format(a="north", b="south"))
    done = baton("simulate", str(plan), "--data", f"north={tmp_path}", timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "error: the plan visits south, which no --data source is named (use --data NAME=PATH)"
    ]
