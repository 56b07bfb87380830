"""Real site processes keep the coordinator's signed ledger heads; their copy exposes a cut tail."""

from __future__ import annotations

import json
import random
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from typer.testing import CliRunner

from coordinator.console.admin import AdminClient
from coordinator.console.cli import app
from coordinator.ledger import HEADS_FILE, read_heads
from coordinator.plan import parse_plan
from protocols.ledger_head import SignedHead
from site_agent.registry import register_dataset
from tests.conftest import SITES, Pki
from tests.integration.conftest import Cluster, wait_for_run


def _write_csv(path: Path, seed: int) -> None:
    rng = random.Random(seed)
    lines = ["age,label"] + [f"{rng.gauss(55, 8):.1f},{rng.randint(0, 1)}" for _ in range(40)]
    path.write_text("\n".join(lines) + "\n")


def _kept(site_dir: Path) -> SignedHead | None:
    path = site_dir / ".baton-site" / "ledger-head.json"
    return SignedHead.from_json(json.loads(path.read_text())) if path.is_file() else None


def test_sites_keep_signed_heads_and_their_anchor_exposes_a_truncated_ledger(
    pki: Pki, tmp_path: Path
) -> None:
    sites = list(SITES[:2])
    for index, site in enumerate(sites):
        _write_csv(tmp_path / f"{site}.csv", seed=index)
        register_dataset(tmp_path / site, "heart", tmp_path / f"{site}.csv", task_type="tabular")
    plan = parse_plan({
        "name": "anchored", "task": "tabular", "dataset": "heart", "labels": ["0", "1"],
        "sites": sites, "options": {"model": "logistic"},
        "defaults": {"steps": 5, "batch_size": 4, "learning_rate": 0.05},
    })  # fmt: skip
    state = tmp_path / "coordinator"
    cluster = Cluster(log_dir=tmp_path / "logs")
    with cluster.running():
        port = cluster.start_coordinator(
            state_dir=state, pki_dir=pki.directory, port_file=tmp_path / "port"
        )
        for site in sites:
            cluster.start_site(
                site,
                coordinator=f"localhost:{port}",
                pki_dir=pki.directory,
                data_dir=tmp_path / site,
                threads=1,
                approve=[plan.approval_bundle().sha256],
            )
        with AdminClient(f"localhost:{port}", pki.tls("admin")) as admin:
            admin.wait_for_sites(set(sites), timeout=120)
            run = wait_for_run(admin, cluster, admin.start_run(plan), timeout=120)
        assert run.status == "completed", run.error
        with sqlite3.connect(state / "ledger.sqlite3") as db:
            (completed,) = db.execute("SELECT max(seq) FROM events WHERE kind = 'run.completed'")
        deadline = time.monotonic() + 120
        # The run.completed head is signed off the committing thread, soon after the commit.
        while (newest := list(read_heads(state / HEADS_FILE))[-1]).seq < completed[0]:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        while any(_kept(tmp_path / s) != newest for s in sites) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert all(_kept(tmp_path / s) == newest for s in sites)  # the run.completed head
    anchor = tmp_path / "anchor.json"
    exported = subprocess.run(
        [
            sys.executable,
            "-m",
            "site_agent",
            "ledger-head",
            "--data-dir",
            str(tmp_path / "site-a"),
            "--out",
            str(anchor),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert exported.returncode == 0, exported.stderr
    assert f"signed head #{newest.seq}" in exported.stderr
    ca = ["--ca", str(pki.directory / "ca.crt")]
    verify = ["ledger", "verify", "--state-dir", str(state), "--anchor", str(anchor), *ca]
    intact = CliRunner().invoke(app, verify)
    assert intact.exit_code == 0, intact.output
    # Whoever controls the coordinator's disk cuts the ledger's tail and its heads file.
    with sqlite3.connect(state / "ledger.sqlite3") as connection:
        connection.execute("DELETE FROM events WHERE seq > ?", (newest.seq - 2,))
    (state / HEADS_FILE).unlink()
    cut = CliRunner().invoke(app, verify)
    assert cut.exit_code == 1
    assert (
        f"ledger truncated: signed head #{newest.seq} (hash {newest.hash[:12]}..., signed "
        f"{newest.signed_at}) but the ledger ends at #{newest.seq - 2}"
    ) in cut.output
    # The site itself notices too: it presents its kept head on Hello and stops (exit 3).
    with cluster.running():
        port = cluster.start_coordinator(
            state_dir=state, pki_dir=pki.directory, port_file=tmp_path / "port"
        )
        site = cluster.start_site(
            "site-a",
            coordinator=f"localhost:{port}",
            pki_dir=pki.directory,
            data_dir=tmp_path / "site-a",
            threads=1,
        )
        assert site.process.wait(60) == 3, site.log_tail()
    assert f"signed ledger head #{newest.seq} does not match the ledger" in site.log_tail()
