"""A real site process (``--preload eager``) says hello before torch is imported, and a hop that
arrives while the background load is still running waits for it and trains correctly."""

from __future__ import annotations

import json
import time
from pathlib import Path

from coordinator.console.admin import AdminClient
from coordinator.plan import parse_plan
from site_agent._synthetic import SYNTHETIC_LABELS
from site_agent.tasks import hash_base_model
from tests.conftest import SITES, Pki
from tests.integration.conftest import Cluster, wait_for_hop, wait_for_run

# Run as `python -c HOLD_TORCH serve ...`: the site agent's CLI, with `import torch` held (on
# whichever thread asks first) until the file named by BATON_TEST_RELEASE_TORCH exists. The
# file named by BATON_TEST_TORCH_ASKED is written when torch is first asked for.
HOLD_TORCH = """
import os, sys, time
from pathlib import Path

class HoldTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            Path(os.environ["BATON_TEST_TORCH_ASKED"]).touch()
            while not Path(os.environ["BATON_TEST_RELEASE_TORCH"]).exists():
                time.sleep(0.05)
            sys.meta_path.remove(self)
        return None

sys.meta_path.insert(0, HoldTorch())
from site_agent.cli import main
main()
"""


def _log_messages(path: Path) -> list[str]:
    return [
        json.loads(line)["message"]
        for line in path.read_text().splitlines()
        if line.startswith("{")
    ]


def test_site_says_hello_while_torch_is_still_loading_and_its_first_hop_waits_for_the_load(
    pki: Pki, tmp_path: Path, base_model: Path, site_data: dict[str, Path]
) -> None:
    site = SITES[0]
    asked, release = tmp_path / "torch-asked", tmp_path / "release-torch"
    plan = parse_plan({
        "name": "cold-start", "dataset": "notes", "labels": list(SYNTHETIC_LABELS),
        "sites": [site], "base_model_sha256": hash_base_model(base_model),
        "defaults": {"steps": 3, "batch_size": 8, "learning_rate": 1e-2},
        "lora": {"r": 4, "alpha": 8, "target_modules": ["query", "value"]},
    })  # fmt: skip
    cluster = Cluster(
        log_dir=tmp_path / "logs",
        env={"BATON_TEST_TORCH_ASKED": str(asked), "BATON_TEST_RELEASE_TORCH": str(release)},
    )
    with cluster.running():
        port = cluster.start_coordinator(
            state_dir=tmp_path / "coordinator", pki_dir=pki.directory, port_file=tmp_path / "port"
        )
        managed = cluster.start_command(site, [
            "-c", HOLD_TORCH, "serve", "--coordinator", f"localhost:{port}",
            "--ca", str(pki.directory / "ca.crt"),
            "--cert", str(pki.directory / f"{site}.crt"),
            "--key", str(pki.directory / f"{site}.key"),
            "--data-dir", str(site_data[site]), "--base-model", str(base_model),
            "--threads", "1", "--approve", plan.approval_bundle().sha256,
            "--log-format", "json", "--preload", "eager",
        ])  # fmt: skip
        with AdminClient(f"localhost:{port}", pki.tls("admin")) as admin:
            admin.wait_for_sites({site}, timeout=60)
            # Connected, with torch asked for by the background load (which may start after the
            # hello on a busy machine) and still held.
            deadline = time.monotonic() + 60
            while not asked.exists():
                assert time.monotonic() < deadline, "the background load never asked for torch"
                time.sleep(0.05)
            assert not release.exists()
            sites = {s.name: s for s in admin.sites()}
            assert sites[site].base_models[0].sha256 == hash_base_model(base_model)

            run_id = admin.start_run(plan)
            wait_for_hop(admin, run_id, 0, "leased", timeout=60)
            time.sleep(0.5)  # the hop is at the site, waiting for the load
            assert admin.run(run_id).hops[0].status == "leased"
            release.touch()
            run = wait_for_run(admin, cluster, run_id, timeout=120)
        assert managed.process.poll() is None

    assert run.status == "completed", run.error
    hop = run.hops[0]
    assert hop.status == "committed" and hop.metrics["examples"] > 0
    assert hop.train_finished_at_ns > hop.train_started_at_ns > 0
    messages = _log_messages(managed.log_path)
    connected = next(i for i, m in enumerate(messages) if m.startswith("connected to coordinator"))
    loaded = next(i for i, m in enumerate(messages) if "trainer loaded in" in m)
    assert connected < loaded
    assert "Traceback" not in managed.log_path.read_text()
