"""Outbound-only networks: a site agent reaches the coordinator through an HTTP CONNECT proxy."""

from __future__ import annotations

from pathlib import Path

from coordinator.console.admin import AdminClient
from tests.conftest import Pki
from tests.connect_proxy import connect_proxy
from tests.integration.conftest import Cluster

_NO_PROXY_ENV = {k: "" for k in ("grpc_proxy", "GRPC_PROXY", "http_proxy", "HTTP_PROXY",
                                  "HTTPS_PROXY", "no_grpc_proxy", "NO_GRPC_PROXY",
                                  "NO_PROXY")}  # fmt: skip


def test_site_agent_tunnels_through_https_proxy_unless_no_proxy_covers_the_coordinator(
    pki: Pki, tmp_path: Path
) -> None:
    with connect_proxy() as proxy:
        cluster = Cluster(log_dir=tmp_path / "logs")
        with cluster.running():
            port = cluster.start_coordinator(
                state_dir=tmp_path / "coordinator", pki_dir=pki.directory,
                port_file=tmp_path / "port",
            )  # fmt: skip
            target = f"localhost:{port}"
            cluster.env = {**_NO_PROXY_ENV, "https_proxy": proxy.url, "no_proxy": "example.org"}
            cluster.start_site("site-a", coordinator=target, pki_dir=pki.directory,
                               data_dir=tmp_path / "site-a")  # fmt: skip
            with AdminClient(target, pki.tls("admin")) as admin:
                admin.wait_for_sites({"site-a"}, timeout=60)
                tunnelled = list(proxy.connect_lines)
                # no_proxy names the coordinator: the second site dials it directly.
                cluster.env = {**_NO_PROXY_ENV, "https_proxy": proxy.url,
                               "no_proxy": "example.org,localhost"}  # fmt: skip
                cluster.start_site("site-b", coordinator=target, pki_dir=pki.directory,
                                   data_dir=tmp_path / "site-b")  # fmt: skip
                admin.wait_for_sites({"site-a", "site-b"}, timeout=60)
    assert tunnelled and all(line == f"CONNECT {target} HTTP/1.1" for line in tunnelled)
    assert proxy.connect_lines == tunnelled
