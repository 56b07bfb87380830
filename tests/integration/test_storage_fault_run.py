"""A real site keeps its finished hop while the coordinator's disk is full, and hands it over
once space is freed: no restart, no hop trained twice, nothing committed lost.

The coordinator runs in-process (its state directory on a small tmpfs) so that, besides the
real full disk, its database can be made to refuse commits as SQLite does on a full disk.
"""

from __future__ import annotations

import random
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.exc import OperationalError

from coordinator.console.admin import AdminClient
from coordinator.ledger import Ledger
from coordinator.plan import parse_plan
from coordinator.server import build_server
from coordinator.settings import CoordinatorSettings
from protocols.checkpoint import sha256_hex
from site_agent.registry import register_dataset
from tests.conftest import SITES, LoopThread, Pki
from tests.integration.conftest import Cluster, wait_for_hop, wait_for_run
from tests.small_disk import Ballast, small_disk

LEASE = 5.0  # seconds; the sites heartbeat every 0.5 s


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[Path]:
    with small_disk(tmp_path / "disk") as mount:
        yield mount


def _write_csv(path: Path, seed: int) -> None:
    rng = random.Random(seed)
    lines = ["age,chol,label"]
    for _ in range(80):
        age, chol = rng.gauss(55, 8), rng.gauss(230, 40)
        lines.append(f"{age:.1f},{chol:.1f},{int(age + rng.gauss(0, 5) > 55)}")
    path.write_text("\n".join(lines) + "\n")


class _FullDatabase:
    """Makes the ledger refuse hop commits as SQLite does on a full disk, for `seconds` from the
    first commit attempt after `refuse_for` (so the window covers the site's result retries)."""

    def __init__(self, ledger: Ledger) -> None:
        self.commit_hop = ledger.commit_hop
        self.seconds = 0.0
        self.until: float | None = None
        self.refused = 0
        ledger.commit_hop = self  # type: ignore[method-assign]

    def refuse_for(self, seconds: float) -> None:
        self.seconds = seconds

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.seconds and self.until is None:
            self.until = time.monotonic() + self.seconds
        if self.until is not None and time.monotonic() < self.until:
            self.refused += 1
            full = sqlite3.OperationalError("database or disk is full")
            raise OperationalError("UPDATE hops", {}, full)
        return self.commit_hop(*args, **kwargs)


def _wait(predicate: Callable[[], object], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{what} never happened"
        time.sleep(0.1)


def test_site_keeps_its_hop_through_a_full_disk_and_the_run_completes(
    pki: Pki, tmp_path: Path, disk: Path, loop_thread: LoopThread
) -> None:
    sites = [SITES[0]]
    for index, site in enumerate(sites):
        _write_csv(tmp_path / f"{site}.csv", seed=index)
        register_dataset(tmp_path / site, "heart", tmp_path / f"{site}.csv", task_type="tabular")
    plan = parse_plan({
        "name": "disk-full", "task": "tabular", "dataset": "heart", "labels": ["0", "1"],
        "sites": sites, "options": {"model": "logistic"},
        "defaults": {"steps": 2000, "batch_size": 4, "learning_rate": 0.05},
        # Shorter than each stall below: only heartbeats during the retries keep the lease. Ten
        # heartbeat intervals long: a beat delayed on a loaded machine does not expire it.
        "failure": {"lease_timeout_seconds": LEASE},
    })  # fmt: skip
    tls = pki.tls("coordinator")
    settings = CoordinatorSettings(
        port=0,
        state_dir=disk / "coordinator",
        ca_certificate=tls.ca_certificate,
        certificate=tls.certificate,
        private_key=tls.private_key,
        heartbeat_interval_ms=500,
    )
    coordinator = loop_thread.run(build_server(settings))
    ledger = coordinator.engine.ledger
    full_database = _FullDatabase(ledger)
    ballast = Ballast(disk)
    cluster = Cluster(log_dir=tmp_path / "logs")
    try:
        with (
            cluster.running(),
            AdminClient(f"localhost:{coordinator.port}", pki.tls("admin")) as admin,
        ):
            for site in sites:
                cluster.start_site(site, coordinator=f"localhost:{coordinator.port}",
                                   pki_dir=pki.directory, data_dir=tmp_path / site, threads=1,
                                   approve=[plan.approval_bundle().sha256])  # fmt: skip
            admin.wait_for_sites(set(sites), timeout=120)
            run_id = admin.start_run(plan)
            wait_for_hop(admin, run_id, 0, "training")
            # The disk fills while hop 0 trains: its upload meets it.
            ballast.fill()
            try:
                _wait(lambda: admin.run(run_id).storage_fault, "a storage fault")
                time.sleep(LEASE + 0.5)  # longer than the lease: the site keeps it by heartbeating
                stalled = admin.run(run_id)
                # Space comes back, but the database refuses commits for a while longer.
                full_database.refuse_for(LEASE + 1)
            finally:
                ballast.free()
            run = wait_for_run(admin, cluster, run_id, timeout=120)
            site_log = cluster.process(sites[0]).log_path.read_text()
    finally:
        ballast.free()
        loop_thread.run(coordinator.stop(0))
    assert stalled.status == "running" and stalled.storage_fault.startswith("since ")
    assert run.status == "completed", run.error
    # One hand back (bundle and result in one call), retried through both faults.
    assert full_database.refused >= 1
    assert (
        "hand back not taken by the coordinator now (UNAVAILABLE: coordinator storage full: "
        "No space left on device" in site_log
    )
    assert (
        "hand back not taken by the coordinator now (UNAVAILABLE: coordinator storage "
        "full: ledger database: database or disk is full" in site_log
    )
    reopened = Ledger(ledger.url)
    try:
        assert reopened.verify_chain() is None
        hops = reopened.run(run_id).hops
        # Each hop trained once: no lease expired, nothing was redone or lost.
        assert [(h.status, h.attempts) for h in hops] == [("committed", 1)] * len(sites)
        kinds = [e.kind for e in reopened.events()]
        assert "hop.retry" not in kinds
        # The disk and the database faults may be one episode: the hand back stores the bundle
        # and commits within one call, before the watchdog notes the disk's recovery.
        assert kinds.count("storage.fault") == kinds.count("storage.recovered") >= 1
    finally:
        reopened.close()
    final = settings.runs_dir / run_id / "final_adapter" / "adapter_model.safetensors"
    assert sha256_hex(final.read_bytes()) == hops[-1].output_sha256
