"""Crashes with real processes: kill -9 a site mid-training, kill -9 the coordinator mid-run.

Each trial must end with the run complete, exactly one committed result per hop, the ledger
verifying, and the final adapter equal to the last committed hop's output. The repeated random
trials live in benchmarks/soak.py; these are the representative cases.

The sites train the tabular task: what is under test (a hop redone after a kill -9, the
coordinator's recovery, exactly one commit per hop, the hashes chaining to the final adapter) does
not depend on the task, and a tabular site starts in about half a LoRA site's CPU time (5 s, not
10). LoRA hops chaining from site to site: test_sequential_run; benchmarks/soak.py kills LoRA sites.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from coordinator.console.admin import AdminClient
from coordinator.ledger import Ledger
from coordinator.plan import RunPlan, parse_plan
from protocols.checkpoint import sha256_hex
from site_agent.registry import register_dataset
from tests.conftest import SITES, Pki
from tests.integration.conftest import Cluster, wait_for_hop, wait_for_run, write_heart_csv

# A hop that is killed while it trains is long enough to be caught training (as in
# test_storage_fault_run); the others are short.
LONG, SHORT = 2000, 20


def _plan(steps: dict[str, int]) -> RunPlan:
    return parse_plan({
        "name": "fault-injection", "task": "tabular", "dataset": "heart", "labels": ["0", "1"],
        "options": {"model": "logistic"},
        "hops": [{"site": site, "hyperparameters": {"steps": steps[site], "batch_size": 4,
                                                    "learning_rate": 0.05}} for site in SITES],
        "failure": {"on_failure": "retry", "max_retries": 3, "retry_backoff_seconds": 0.2,
                    "lease_timeout_seconds": 10},
    })  # fmt: skip


def _site_data(tmp_path: Path) -> dict[str, Path]:
    for index, site in enumerate(SITES):
        write_heart_csv(tmp_path / f"{site}.csv", rows=80, seed=index, shift=3 * index)
        register_dataset(tmp_path / site, "heart", tmp_path / f"{site}.csv", task_type="tabular")
    return {site: tmp_path / site for site in SITES}


def _start_sites(
    cluster: Cluster, port: int, pki: Pki, data: dict[str, Path], plan: RunPlan
) -> None:
    for site in SITES:
        _start_site(cluster, site, port, pki, data, plan)


def _start_site(
    cluster: Cluster, site: str, port: int, pki: Pki, data: dict[str, Path], plan: RunPlan
) -> None:
    cluster.start_site(site, coordinator=f"localhost:{port}", pki_dir=pki.directory,
                       data_dir=data[site], threads=1,
                       approve=[plan.approval_bundle().sha256])  # fmt: skip


def _check_outcome(state_dir: Path, run_id: str) -> None:
    ledger = Ledger(f"sqlite:///{state_dir / 'ledger.sqlite3'}")
    try:
        assert ledger.verify_chain() is None
        run = ledger.run(run_id)
        assert run.status == "completed", run.error
        assert [h.status for h in run.hops] == ["committed"] * len(SITES)
        committed = [e for e in ledger.events(run_id) if e.kind == "hop.committed"]
        assert sorted(e.hop_id for e in committed) == sorted(h.id for h in run.hops)
        for before, after in zip(run.hops, run.hops[1:], strict=False):
            assert after.input_sha256 == before.output_sha256
        final = state_dir / "runs" / run_id / "final_adapter" / "adapter_model.safetensors"
        assert sha256_hex(final.read_bytes()) == run.hops[-1].output_sha256 == run.final_sha256
    finally:
        ledger.close()


def test_site_killed_mid_training_redoes_its_hop_after_a_restart(pki: Pki, tmp_path: Path) -> None:
    site_data = _site_data(tmp_path)
    plan = _plan({SITES[0]: SHORT, SITES[1]: LONG, SITES[2]: SHORT})  # SITES[1] is killed
    state = tmp_path / "coordinator"
    cluster = Cluster(log_dir=tmp_path / "logs")
    with cluster.running():
        port = cluster.start_coordinator(state_dir=state, pki_dir=pki.directory,
                                         port_file=tmp_path / "port")  # fmt: skip
        _start_sites(cluster, port, pki, site_data, plan)
        with AdminClient(f"localhost:{port}", pki.tls("admin")) as admin:
            admin.wait_for_sites(set(SITES), timeout=120)
            run_id = admin.start_run(plan)
            wait_for_hop(admin, run_id, 1, "training")
            cluster.process(SITES[1]).kill()
            _start_site(cluster, SITES[1], port, pki, site_data, plan)
            run = wait_for_run(admin, cluster, run_id)
    assert run.status == "completed", run.error
    _check_outcome(state, run_id)


# Slow (~50 s; make test-all): make test keeps a coordinator SIGKILLed mid-run, restarted and
# the run completed with nothing lost in test_commit_first.
@pytest.mark.slow
def test_coordinator_killed_mid_run_restarts_and_the_run_completes(
    pki: Pki, tmp_path: Path
) -> None:
    site_data = _site_data(tmp_path)
    plan = _plan(dict.fromkeys(SITES, LONG))
    # Killed twice in one run: in the first hop (nothing committed yet) and in the last one
    # (after commits), each time while a site trains.
    state = tmp_path / "coordinator"
    cluster = Cluster(log_dir=tmp_path / "logs")
    with cluster.running():
        port = cluster.start_coordinator(state_dir=state, pki_dir=pki.directory,
                                         port_file=tmp_path / "port")  # fmt: skip
        _start_sites(cluster, port, pki, site_data, plan)
        with AdminClient(f"localhost:{port}", pki.tls("admin")) as admin:
            admin.wait_for_sites(set(SITES), timeout=120)
            run_id = admin.start_run(plan)
        for hop in (0, len(SITES) - 1):
            with AdminClient(f"localhost:{port}", pki.tls("admin")) as admin:
                wait_for_hop(admin, run_id, hop, "training")
            cluster.process("coordinator").kill()
            cluster.start_coordinator(state_dir=state, pki_dir=pki.directory,
                                      port_file=tmp_path / "port", port=port)  # fmt: skip
        with AdminClient(f"localhost:{port}", pki.tls("admin")) as admin:
            run = wait_for_run(admin, cluster, run_id)
    assert run.status == "completed", run.error
    _check_outcome(state, run_id)
