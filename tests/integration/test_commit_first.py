"""Commit first: a hop is committed and the next one leased before its site's validation pass,
whose metrics arrive as their own ledger event; the next site prepares while the current one
trains and gets its (small) input inside its task."""

from __future__ import annotations

import time
from datetime import datetime
from pathlib import Path

from coordinator.console.admin import AdminClient
from coordinator.ledger import Ledger
from coordinator.plan import parse_plan
from site_agent._synthetic import SYNTHETIC_LABELS, generate_site_records, write_site_dataset
from tests.conftest import SITES, Pki
from tests.integration.conftest import Cluster, wait_for_run

TRAIN_KEYS = {"train_loss", "train_steps", "train_examples"}


def _plan(steps: int) -> dict[str, object]:
    return {
        "name": "commit-first", "dataset": "notes", "labels": list(SYNTHETIC_LABELS),
        "sites": list(SITES), "defaults": {"steps": steps, "batch_size": 8},
        "lora": {"r": 4, "alpha": 8, "target_modules": ["query", "value"]},
        "failure": {"on_failure": "retry", "max_retries": 3, "retry_backoff_seconds": 0.2,
                    "lease_timeout_seconds": 10},
    }  # fmt: skip


def _start_sites(
    cluster: Cluster, port: int, pki: Pki, data: dict[str, Path], model: Path, steps: int
) -> None:
    bundle = parse_plan(_plan(steps)).approval_bundle().sha256
    for site in SITES:
        cluster.start_site(site, coordinator=f"localhost:{port}", pki_dir=pki.directory,
                           data_dir=data[site], base_model_dir=model, threads=1,
                           approve=[bundle])  # fmt: skip


def _check_validated(state: Path, run_id: str) -> None:
    """Every hop committed once; every hop but the last validated after its commit."""
    ledger = Ledger(f"sqlite:///{state / 'ledger.sqlite3'}")
    try:
        assert ledger.verify_chain() is None
        run = ledger.run(run_id)
        assert run.status == "completed", run.error
        assert [h.status for h in run.hops] == ["committed"] * len(SITES)
        events = ledger.events(run_id)
        for hop in run.hops:
            committed = [e for e in events if e.hop_id == hop.id and e.kind == "hop.committed"]
            validated = [e for e in events if e.hop_id == hop.id and e.kind == "hop.validated"]
            assert len(committed) == 1
            # The hop's row holds its train metrics and its validation metrics.
            assert {"loss", "accuracy"} | TRAIN_KEYS <= set(hop.metrics)
            if hop is run.hops[-1]:
                assert validated == []  # the last hop's metrics complete the run: inline
                continue
            (validation,) = validated
            assert set(committed[0].payload["metrics"]) == TRAIN_KEYS
            assert validation.seq > committed[0].seq
            assert validation.payload["ok"] is True
            assert {"loss", "accuracy"} <= set(validation.payload["metrics"])
            # Commit first: the next hop was leased before this one's validation arrived.
            following = run.hops[hop.index + 1]
            leases = [e for e in events if e.hop_id == following.id and e.kind == "hop.leased"]
            assert leases and leases[0].seq < validation.seq
        for hop in run.hops:
            # "Training" is told after the first step (the next site prepares only then): the
            # committed attempt's (after the hop's last lease; a retried one had its own).
            leased = max(e.seq for e in events if e.hop_id == hop.id and e.kind == "hop.leased")
            for event in events:
                if event.hop_id == hop.id and event.kind == "hop.training" and event.seq > leased:
                    told = datetime.fromisoformat(event.at).timestamp() * 1e9
                    assert hop.train_started_at_ns and told >= hop.train_started_at_ns
    finally:
        ledger.close()


def test_validation_follows_the_commit_as_its_own_event_and_a_kill_between_loses_nothing(
    pki: Pki, tmp_path: Path, base_model: Path, site_data: dict[str, Path]
) -> None:
    """Hop 0's validation is cut by a coordinator kill right after its commit; hops 1 and 2 run
    under the restarted coordinator undisturbed. Every hop but the last is validated after its
    commit, as its own ledger event, and the next hop was leased before that validation."""
    # Many validation rows at the first site: its validation pass outlasts the kill below.
    records = generate_site_records(0, len(SITES), n=3000, seed=1)
    write_site_dataset(site_data[SITES[0]] / "notes.jsonl", records)
    state = tmp_path / "coordinator"
    cluster = Cluster(log_dir=tmp_path / "logs")
    with cluster.running():
        port = cluster.start_coordinator(state_dir=state, pki_dir=pki.directory,
                                         port_file=tmp_path / "port")  # fmt: skip
        _start_sites(cluster, port, pki, site_data, base_model, steps=20)
        with AdminClient(f"localhost:{port}", pki.tls("admin")) as admin:
            admin.wait_for_sites(set(SITES), timeout=120)
            run_id = admin.start_run(parse_plan(_plan(steps=20)))
            deadline = time.monotonic() + 120
            while admin.run(run_id).hops[0].status != "committed":
                assert time.monotonic() < deadline, "hop 0 never committed"
                time.sleep(0.02)  # not a busy loop: it took CPU from the sites' start and hop
        cluster.process("coordinator").kill()  # at once: the site is validating hop 0
        cluster.start_coordinator(state_dir=state, pki_dir=pki.directory,
                                  port_file=tmp_path / "port", port=port)  # fmt: skip
        with AdminClient(f"localhost:{port}", pki.tls("admin")) as admin:
            run = wait_for_run(admin, cluster, run_id)
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and not all(
                "loss" in hop.metrics for hop in admin.run(run_id).hops
            ):
                time.sleep(0.1)
    assert run.status == "completed", run.error
    _check_validated(state, run_id)
    logs = "".join(p.log_tail(100_000) for p in cluster.processes if p.name in SITES[1:])
    assert "prepared" in logs  # the next sites got ready while the previous one trained
    # Their tasks left while the commits leasing them ran, and waited for the decision (hop 1's
    # may have met the kill first: dropped with its stream, then sent again, committed).
    assert "starting (provisional: its lease is committing)" in logs
