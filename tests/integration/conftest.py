"""Fixtures for multi-process tests: a tiny base model and generated data for each site."""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import pytest

from coordinator.console.admin import TERMINAL_RUN_STATES, AdminClient
from coordinator.console.processes import Cluster
from coordinator.plan import RunPlan
from protocols.v1 import baton_pb2 as pb
from site_agent._synthetic import generate_site_records, write_site_dataset
from site_agent._tiny_model import write_tiny_base_model
from tests.conftest import SITES


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
