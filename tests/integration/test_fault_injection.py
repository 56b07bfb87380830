"""Crashes with real processes: kill -9 a site mid-training, kill -9 the coordinator mid-run.

Each trial must end with the run complete, exactly one committed result per hop, the ledger
verifying, and the final adapter equal to the last committed hop's output. The repeated random
trials live in benchmarks/soak.py; these are the representative cases.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from coordinator.console.admin import AdminClient
from coordinator.ledger import Ledger
from coordinator.plan import parse_plan
from protocols.checkpoint import sha256_hex
from site_agent._synthetic import SYNTHETIC_LABELS
from tests.conftest import SITES, Pki
from tests.integration.conftest import Cluster, wait_for_hop, wait_for_run

STEPS = 100


def _plan(steps: int) -> dict[str, object]:
    return {
        "name": "fault-injection", "dataset": "notes", "labels": list(SYNTHETIC_LABELS),
        "sites": list(SITES), "defaults": {"steps": steps, "batch_size": 8},
        "lora": {"r": 4, "alpha": 8, "target_modules": ["query", "value"]},
        "failure": {"on_failure": "retry", "max_retries": 3, "retry_backoff_seconds": 0.2,
                    "lease_timeout_seconds": 10},
    }  # fmt: skip


def _start_sites(cluster: Cluster, port: int, pki: Pki, data: dict[str, Path], model: Path) -> None:
    for site in SITES:
        _start_site(cluster, site, port, pki, data, model)


def _start_site(
    cluster: Cluster, site: str, port: int, pki: Pki, data: dict[str, Path], model: Path
) -> None:
    bundle = parse_plan(_plan(steps=STEPS)).approval_bundle().sha256
    cluster.start_site(site, coordinator=f"localhost:{port}", pki_dir=pki.directory,
                       data_dir=data[site], base_model_dir=model, threads=1,
                       approve=[bundle])  # fmt: skip


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


def test_site_killed_mid_training_redoes_its_hop_after_a_restart(
    pki: Pki, tmp_path: Path, base_model: Path, site_data: dict[str, Path]
) -> None:
    state = tmp_path / "coordinator"
    cluster = Cluster(log_dir=tmp_path / "logs")
    with cluster.running():
        port = cluster.start_coordinator(state_dir=state, pki_dir=pki.directory,
                                         port_file=tmp_path / "port")  # fmt: skip
        _start_sites(cluster, port, pki, site_data, base_model)
        with AdminClient(f"localhost:{port}", pki.tls("admin")) as admin:
            admin.wait_for_sites(set(SITES), timeout=120)
            run_id = admin.start_run(parse_plan(_plan(steps=STEPS)))
            wait_for_hop(admin, run_id, 1, "training")
            cluster.process(SITES[1]).kill()
            _start_site(cluster, SITES[1], port, pki, site_data, base_model)
            run = wait_for_run(admin, cluster, run_id)
    assert run.status == "completed", run.error
    _check_outcome(state, run_id)


# Slow (~50 s; make test-all): make test keeps a coordinator SIGKILLed mid-run, restarted and
# the run completed with nothing lost in test_commit_first.
@pytest.mark.slow
def test_coordinator_killed_mid_run_restarts_and_the_run_completes(
    pki: Pki, tmp_path: Path, base_model: Path, site_data: dict[str, Path]
) -> None:
    # Killed twice in one run: in the first hop (nothing committed yet) and in the last one
    # (after commits), each time while a site trains.
    state = tmp_path / "coordinator"
    cluster = Cluster(log_dir=tmp_path / "logs")
    with cluster.running():
        port = cluster.start_coordinator(state_dir=state, pki_dir=pki.directory,
                                         port_file=tmp_path / "port")  # fmt: skip
        _start_sites(cluster, port, pki, site_data, base_model)
        with AdminClient(f"localhost:{port}", pki.tls("admin")) as admin:
            admin.wait_for_sites(set(SITES), timeout=120)
            run_id = admin.start_run(parse_plan(_plan(steps=STEPS)))
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
