"""Fixtures for multi-process tests: a tiny base model and generated data for each site."""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from pathlib import Path

import grpc
import pytest
from click.testing import Result
from typer.testing import CliRunner

from coordinator.console import processes
from coordinator.console.admin import TERMINAL_RUN_STATES, AdminClient
from coordinator.console.cli import app as baton
from coordinator.plan import RunPlan
from protocols.v1 import baton_pb2 as pb
from site_agent._synthetic import generate_site_records, write_site_dataset
from site_agent._tiny_model import write_tiny_base_model
from site_agent.cli import app as baton_site
from tests.conftest import SITES, Pki

# The product's `Cluster` (sites stopped together, then the coordinators); kept under this
# name for the integration tests that import it from here.
Cluster = processes.Cluster


@pytest.fixture(scope="session")
def base_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_base_model(tmp_path_factory.mktemp("tiny-bert"), seed=0)


@pytest.fixture
def site_data(tmp_path: Path) -> dict[str, Path]:
    """`<tmp>/<site>/notes.jsonl` for every site, with per-site label skew."""
    folders = {}
    for index, site in enumerate(SITES):
        records = generate_site_records(index, len(SITES), n=60, seed=1)
        write_site_dataset(tmp_path / site / "notes.jsonl", records)
        folders[site] = tmp_path / site
    return folders


def wait_for_run(
    admin: AdminClient, cluster: Cluster, run_id: str, timeout: float = 240
) -> pb.RunStatus:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = admin.run(run_id)
        if run.status in TERMINAL_RUN_STATES:
            return run
        cluster.check_alive()
        time.sleep(0.2)
    raise TimeoutError(f"run {run_id} did not finish in {timeout} s")


def wait_for_hop(
    admin: AdminClient, run_id: str, index: int, status: str, timeout: float = 240
) -> pb.RunStatus:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = admin.run(run_id)
        if run.hops[index].status == status:
            return run
        time.sleep(0.05)
    raise TimeoutError(f"hop {index} of run {run_id} never reached {status}")


def start_when_approved(admin: AdminClient, plan: RunPlan, timeout: float = 60) -> str:
    """Starts the run once the sites' fresh approvals reached the coordinator.

    A site reports a `baton-site approve` within about a second (it says hello again); until
    then preflight refuses the run as unapproved. Any other refusal is raised at once.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            return admin.start_run(plan)
        except grpc.RpcError as exc:
            problems = (exc.details() or "").splitlines()
            unapproved = all("has not approved" in p for p in problems)
            if exc.code() != grpc.StatusCode.FAILED_PRECONDITION or not unapproved:
                raise
            if time.monotonic() > deadline:
                raise
        time.sleep(0.2)


def write_heart_csv(path: Path, rows: int, seed: int, shift: float) -> None:
    """A heart-disease-like CSV (age, chol, bp, label) whose feature means move with ``shift``."""
    rng = random.Random(seed)
    lines = ["age,chol,bp,label"]
    for _ in range(rows):
        age, chol, bp = rng.gauss(55 + shift, 8), rng.gauss(230 - shift, 40), rng.gauss(130, 15)
        label = int(0.08 * (age - 55) + 0.01 * (chol - 230) + rng.gauss(0, 0.5) > 0)
        lines.append(f"{age:.2f},{chol:.2f},{bp:.2f},{label}")
    path.write_text("\n".join(lines) + "\n")


def run_when_approved(
    admin: AdminClient, cluster: Cluster, plan: RunPlan, data_dirs: Path, timeout: float
) -> pb.RunStatus:
    """Every site approves ``plan``'s bundle with `baton-site approve` in its data directory
    (``data_dirs / site``); then the run starts and this waits until it ends."""
    for site in SITES:
        bundle = plan.approval_bundle().sha256
        approved = CliRunner().invoke(
            baton_site, ["approve", bundle, "--data-dir", str(data_dirs / site)]
        )
        assert approved.exit_code == 0, approved.output
    return wait_for_run(admin, cluster, start_when_approved(admin, plan), timeout=timeout)


def start_tabular_sites(
    cluster: Cluster, pki: Pki, tmp_path: Path, approve: Sequence[str], extra: Sequence[str] = ()
) -> int:
    """Starts a coordinator and one single-threaded site per `<tmp>/<site>` data directory;
    returns the coordinator's port."""
    port = cluster.start_coordinator(
        state_dir=tmp_path / "coordinator", pki_dir=pki.directory, port_file=tmp_path / "port"
    )
    for site in SITES:
        cluster.start_site(site, coordinator=f"localhost:{port}", pki_dir=pki.directory,
                           data_dir=tmp_path / site, threads=1, approve=approve,
                           extra=extra)  # fmt: skip
    return port


def collect_heart_statistics(connection: Sequence[str], *options: str) -> tuple[Result, str]:
    """`baton statistics collect heart --min-count 10 OPTIONS` at every site; returns the CLI's
    result and the statistics id it printed."""
    sites = [arg for site in SITES for arg in ("--site", site)]
    args = ["statistics", "collect", "heart", *sites, "--min-count", "10", *options]
    result = CliRunner().invoke(baton, [*args, *connection])
    return result, result.output.split("statistics requested: ")[1].split()[0]
