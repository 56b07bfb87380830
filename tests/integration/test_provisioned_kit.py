"""A provisioned consortium runs from its generated settings files alone (real processes)."""

from __future__ import annotations

import socket
from pathlib import Path

from coordinator.console.admin import AdminClient
from coordinator.console.provision import load_consortium, provision
from protocols.transport import TlsFiles
from site_agent.registry import register_dataset
from tests.integration.conftest import Cluster


def _free_port() -> int:
    # The kit's site.toml must name the coordinator's port before it starts.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_coordinator_and_site_start_from_their_kits_and_the_site_connects(
    tmp_path: Path,
) -> None:
    consortium = tmp_path / "consortium.toml"
    consortium.write_text(
        'name = "pilot"\n'
        f'[coordinator]\nhosts = ["localhost"]\nbind = "127.0.0.1"\nport = {_free_port()}\n'
        "dashboard-port = 0\n"
        f'state-dir = "{tmp_path / "coordinator-state"}"\n'
        f'[[sites]]\nname = "st-marys"\ndata-dir = "{tmp_path / "st-marys-data"}"\nthreads = 1\n'
        '[[admins]]\nname = "alice"\n'
    )
    kit = tmp_path / "kit"
    provision(load_consortium(consortium), kit)
    csv = tmp_path / "heart.csv"
    csv.write_text("age,chol,label\n" + "".join(f"{50 + i},{200 + i},{i % 2}\n" for i in range(40)))
    register_dataset(tmp_path / "st-marys-data", "heart", csv, task_type="tabular")

    site_kit, admin_kit = kit / "sites" / "st-marys", kit / "admins" / "alice"
    address = (site_kit / "site.toml").read_text().split('coordinator = "')[1].split('"')[0]
    cluster = Cluster(log_dir=tmp_path / "logs")
    with cluster.running():
        coordinator_toml = kit / "coordinator" / "coordinator.toml"
        cluster.start_command(
            "coordinator",
            ["-m", "coordinator", "coordinator", "serve", "--config", str(coordinator_toml)],
        )
        cluster.start_command(
            "st-marys", ["-m", "site_agent", "serve", "--config", str(site_kit / "site.toml")]
        )
        tls = TlsFiles(admin_kit / "ca.crt", admin_kit / "alice.crt", admin_kit / "alice.key")
        with AdminClient(address, tls) as admin:
            admin.wait_for_sites({"st-marys"}, timeout=60)
            cluster.check_alive()
            (site,) = admin.sites()
    assert site.connected
    assert [d.name for d in site.datasets] == ["heart"]
    assert (tmp_path / "coordinator-state" / "ledger.sqlite3").is_file()
