"""The next site gets its input ahead of the commit: site agents as processes check and load
each hop's input while the coordinator commits the hop before, and train from it once leased."""

from __future__ import annotations

from pathlib import Path

from coordinator.console.admin import AdminClient
from coordinator.ledger import Ledger
from coordinator.plan import parse_plan
from site_agent._synthetic import SYNTHETIC_LABELS
from tests.conftest import SITES, Pki
from tests.integration.conftest import Cluster, wait_for_run


def test_each_next_site_trains_from_the_input_it_checked_and_loaded_before_its_lease(
    pki: Pki, tmp_path: Path, base_model: Path, site_data: dict[str, Path]
) -> None:
    plan = parse_plan({
        "name": "preload", "dataset": "notes", "labels": list(SYNTHETIC_LABELS),
        "sites": list(SITES), "cycles": 2, "defaults": {"steps": 80, "batch_size": 8},
        "lora": {"r": 4, "alpha": 8, "target_modules": ["query", "value"]},
    })  # fmt: skip
    state = tmp_path / "coordinator"
    cluster = Cluster(log_dir=tmp_path / "logs")
    with cluster.running():
        port = cluster.start_coordinator(state_dir=state, pki_dir=pki.directory,
                                         port_file=tmp_path / "port")  # fmt: skip
        for site in SITES:
            cluster.start_site(site, coordinator=f"localhost:{port}", pki_dir=pki.directory,
                               data_dir=site_data[site], base_model_dir=base_model, threads=1,
                               approve=[plan.approval_bundle().sha256],
                               extra=["--preload", "eager"])  # fmt: skip
        with AdminClient(f"localhost:{port}", pki.tls("admin")) as admin:
            admin.wait_for_sites(set(SITES), timeout=120)
            run_id = admin.start_run(plan)
            run = wait_for_run(admin, cluster, run_id)
        logs = {p.name: p.log_tail(100_000) for p in cluster.processes if p.name in SITES}
    assert run.status == "completed", run.error
    ledger = Ledger(f"sqlite:///{state / 'ledger.sqlite3'}")
    try:
        assert ledger.verify_chain() is None
        hops = ledger.run(run_id).hops
        kinds = [e.kind for e in ledger.events(run_id)]
    finally:
        ledger.close()
    # One lease, one training and one commit per hop: nothing sent ahead shows in the ledger.
    assert kinds.count("hop.leased") == kinds.count("hop.committed") == len(hops)
    # The second cycle's: every site has loaded its model and prepared by then (a first visit
    # may still be loading when its input comes; it then takes the input from its lease), and
    # its hops (80 steps) outlast a site's validation pass after its commit (a site busy
    # validating reads its stream, input sent ahead included, only afterwards).
    for hop in hops[len(SITES) :]:
        log = logs[hop.site]
        line = f"hop {hop.index} of run {run_id}: input {hop.input_sha256[:12]} checked and loaded"
        assert line in log, log[-3000:]
        # ... before its lease's start, and used by it (no second look at the input).
        assert log.index(line) < log.index(f"hop {hop.index} of run {run_id}: starting")
        assert "not this lease's" not in log and "sent ahead refused" not in log
