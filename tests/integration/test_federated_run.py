"""Federated and hybrid runs through real site processes: rounds, aggregates, crashes, ledger.

Each site trains the tabular task on its own CSV; the coordinator aggregates each round with
Flower's strategy. Every run must end complete with each hop committed once, each round
aggregated once from exactly its committed contributions, and the ledger verifying (chain and
rows).
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy

from coordinator.console.admin import TERMINAL_RUN_STATES, AdminClient
from coordinator.ledger import Ledger
from coordinator.plan import RunPlan, parse_plan
from protocols.checkpoint import AGGREGATOR, inspect_bundle, sha256_hex
from site_agent.registry import register_dataset
from tests.conftest import SITES, Pki
from tests.integration.conftest import Cluster, wait_for_hop, wait_for_run


def _write_csv(path: Path, seed: int, shift: float, rows: int) -> None:
    rng = random.Random(seed)
    lines = ["age,chol,label"]
    for _ in range(rows):
        age, chol = rng.gauss(55 + shift, 8), rng.gauss(230, 40)
        label = int(0.08 * (age - 55) + 0.01 * (chol - 230) + rng.gauss(0, 0.5) > 0)
        lines.append(f"{age:.1f},{chol:.1f},{label}")
    path.write_text("\n".join(lines) + "\n")


def _data(tmp_path: Path) -> None:
    for index, site in enumerate(SITES):
        _write_csv(tmp_path / f"{site}.csv", seed=index, shift=5 * index, rows=60 + 30 * index)
        register_dataset(tmp_path / site, "heart", tmp_path / f"{site}.csv", task_type="tabular")


def _plan(steps: int = 30, sites: tuple[str, ...] = SITES, **federated: object) -> RunPlan:
    return parse_plan({
        "name": "federated", "task": "tabular", "dataset": "heart", "labels": ["0", "1"],
        "mode": "federated", "sites": list(sites), "options": {"model": "logistic"},
        "defaults": {"steps": steps, "batch_size": 4, "learning_rate": 0.05},
        "federated": {"strategy": "fedavg", "rounds": 2, "min_sites": len(sites), **federated},
        "failure": {"on_failure": "retry", "max_retries": 3, "retry_backoff_seconds": 0.2,
                    "lease_timeout_seconds": 10},
    })  # fmt: skip


def _start_site(cluster: Cluster, site: str, port: int, pki: Pki, tmp_path: Path,
                plan: RunPlan) -> None:  # fmt: skip
    cluster.start_site(site, coordinator=f"localhost:{port}", pki_dir=pki.directory,
                       data_dir=tmp_path / site, threads=1,
                       approve=[plan.approval_bundle().sha256])  # fmt: skip


def _check_outcome(
    state_dir: Path, run_id: str, rounds: int, sites: tuple[str, ...] = SITES
) -> None:
    """Complete, each hop committed once, each round aggregated once from its contributions
    (example-weighted, as Flower's FedAvg), the final adapter the last aggregate, ledger
    verifying."""
    ledger = Ledger(f"sqlite:///{state_dir / 'ledger.sqlite3'}")
    try:
        verification = ledger.verify()
        assert verification.ok, [m.message for m in verification.row_mismatches]
        run = ledger.run(run_id)
        assert run.status == "completed", run.error
        assert [h.status for h in run.hops] == ["committed"] * len(sites) * rounds
        events = ledger.events(run_id)
        committed = [e.hop_id for e in events if e.kind == "hop.committed"]
        assert sorted(committed) == sorted(h.id for h in run.hops)
        assert sum(e.kind == "round.aggregated" for e in events) == rounds
        store = state_dir / "checkpoints"
        hops = {h.id: h for h in run.hops}
        previous = None
        for row in ledger.rounds(run_id):
            assert row.status == "aggregated" and row.input_sha256 == previous
            members = [hops[ids[0]] for _, ids in row.members]
            assert all(h.input_sha256 == previous for h in members)
            assert [c[1] for c in row.contributions] == [h.output_sha256 for h in members]
            assert [c[2] for c in row.contributions] == [h.metrics["train_examples"]
                                                         for h in members]  # fmt: skip
            data = (store / row.output_sha256[:2] / row.output_sha256).read_bytes()
            manifest = inspect_bundle(data).manifest
            assert manifest.producer_site == AGGREGATOR and manifest.parent_sha256 == (
                previous or ""
            )
            assert manifest.parents == tuple(sorted(c[1] for c in row.contributions))
            weights = np.array([c[2] for c in row.contributions])
            inputs = [
                safetensors.numpy.load((store / sha[:2] / sha).read_bytes())
                for _, sha, _ in row.contributions
            ]
            for name, value in safetensors.numpy.load(data).items():
                expected = np.average([t[name] for t in inputs], axis=0, weights=weights)
                np.testing.assert_allclose(value, expected, rtol=1e-5, atol=1e-7)
            previous = row.output_sha256
        final = state_dir / "runs" / run_id / "final_adapter" / "adapter_model.safetensors"
        assert sha256_hex(final.read_bytes()) == previous == run.final_sha256
    finally:
        ledger.close()


def test_a_federated_run_aggregates_each_round_from_real_sites(pki: Pki, tmp_path: Path) -> None:
    # Two sites of unequal size (60 and 90 rows): each round's aggregate is still their
    # example-weighted mean; a third site would add a site start (~5 CPU s) and no other path.
    sites = SITES[:2]
    _data(tmp_path)
    plan = _plan(sites=sites)
    state = tmp_path / "coordinator"
    cluster = Cluster(log_dir=tmp_path / "logs")
    with cluster.running():
        port = cluster.start_coordinator(state_dir=state, pki_dir=pki.directory,
                                         port_file=tmp_path / "port")  # fmt: skip
        for site in sites:
            _start_site(cluster, site, port, pki, tmp_path, plan)
        with AdminClient(f"localhost:{port}", pki.tls("admin")) as admin:
            admin.wait_for_sites(set(sites), timeout=120)
            run = wait_for_run(admin, cluster, admin.start_run(plan))
    assert run.status == "completed", run.error
    assert [r.status for r in run.rounds] == ["aggregated", "aggregated"]
    assert [len(r.contributions) for r in run.rounds] == [2, 2]
    _check_outcome(state, run.run_id, rounds=2, sites=sites)


@pytest.mark.slow
def test_coordinator_killed_mid_round_restarts_and_the_federated_run_completes(
    pki: Pki, tmp_path: Path
) -> None:
    _data(tmp_path)
    plan = _plan(steps=4000)
    state = tmp_path / "coordinator"
    cluster = Cluster(log_dir=tmp_path / "logs")
    with cluster.running():
        port = cluster.start_coordinator(state_dir=state, pki_dir=pki.directory,
                                         port_file=tmp_path / "port")  # fmt: skip
        for site in SITES:
            _start_site(cluster, site, port, pki, tmp_path, plan)
        with AdminClient(f"localhost:{port}", pki.tls("admin")) as admin:
            admin.wait_for_sites(set(SITES), timeout=120)
            run_id = admin.start_run(plan)
            wait_for_hop(admin, run_id, 1, "training")
        cluster.process("coordinator").kill()
        cluster.start_coordinator(state_dir=state, pki_dir=pki.directory,
                                  port_file=tmp_path / "port", port=port)  # fmt: skip
        with AdminClient(f"localhost:{port}", pki.tls("admin")) as admin:
            run = wait_for_run(admin, cluster, run_id)
    assert run.status == "completed", run.error
    _check_outcome(state, run_id, rounds=2)


@pytest.mark.slow
def test_site_killed_mid_round_redoes_its_contribution_after_a_restart(
    pki: Pki, tmp_path: Path
) -> None:
    _data(tmp_path)
    plan = _plan(steps=4000)
    state = tmp_path / "coordinator"
    cluster = Cluster(log_dir=tmp_path / "logs")
    with cluster.running():
        port = cluster.start_coordinator(state_dir=state, pki_dir=pki.directory,
                                         port_file=tmp_path / "port")  # fmt: skip
        for site in SITES:
            _start_site(cluster, site, port, pki, tmp_path, plan)
        with AdminClient(f"localhost:{port}", pki.tls("admin")) as admin:
            admin.wait_for_sites(set(SITES), timeout=120)
            run_id = admin.start_run(plan)
            wait_for_hop(admin, run_id, 1, "training")
            cluster.process(SITES[1]).kill()
            _start_site(cluster, SITES[1], port, pki, tmp_path, plan)
            run = wait_for_run(admin, cluster, run_id)
    assert run.status == "completed", run.error
    _check_outcome(state, run_id, rounds=2)


@pytest.mark.slow  # two 20 s round deadlines
def test_a_hybrid_run_chains_within_groups_and_a_late_group_is_dropped_at_the_deadline(
    pki: Pki, tmp_path: Path
) -> None:
    _data(tmp_path)
    plan = parse_plan({
        "name": "hybrid", "task": "tabular", "dataset": "heart", "labels": ["0", "1"],
        "mode": "hybrid", "options": {"model": "logistic"},
        "defaults": {"steps": 30, "batch_size": 4, "learning_rate": 0.05},
        "groups": [{"name": "north", "sites": [SITES[0], SITES[1]]},
                   {"name": "south", "sites": [SITES[2]]}],
        "federated": {"rounds": 2, "min_sites": 1, "stragglers": "drop",
                      "round_deadline_seconds": 20},
    })  # fmt: skip
    state = tmp_path / "coordinator"
    cluster = Cluster(log_dir=tmp_path / "logs")
    with cluster.running():
        port = cluster.start_coordinator(state_dir=state, pki_dir=pki.directory,
                                         port_file=tmp_path / "port")  # fmt: skip
        for site in SITES:
            _start_site(cluster, site, port, pki, tmp_path, plan)
        with AdminClient(f"localhost:{port}", pki.tls("admin")) as admin:
            admin.wait_for_sites(set(SITES), timeout=120)
            cluster.process(SITES[2]).stop()  # the south group's site goes away
            run_id = admin.start_run(plan, allow_offline=True)
            deadline = time.monotonic() + 240  # not wait_for_run: site-c is down on purpose
            while (run := admin.run(run_id)).status not in TERMINAL_RUN_STATES:
                assert time.monotonic() < deadline, "the hybrid run did not finish"
                time.sleep(0.2)
    assert run.status == "completed", run.error
    for status in run.rounds:
        assert [m.name for m in status.members] == ["north", "south"]
        assert list(status.dropped) == ["south"]
        assert [c.member for c in status.contributions] == ["north"]
    ledger = Ledger(f"sqlite:///{state / 'ledger.sqlite3'}")
    try:
        assert ledger.verify().ok
        hops = {h.id: h for h in ledger.run(run.run_id).hops}
        for row in ledger.rounds(run.run_id):
            (_, north), (_, south) = row.members
            first, second = hops[north[0]], hops[north[1]]
            assert first.input_sha256 == row.input_sha256
            assert second.input_sha256 == first.output_sha256  # the chain within the group
            assert hops[south[0]].status == "skipped"
            assert hops[south[0]].error_code == "round-deadline"
            [(_, sha, examples)] = row.contributions
            assert sha == second.output_sha256
            assert examples == first.metrics["train_examples"] + second.metrics["train_examples"]
    finally:
        ledger.close()
