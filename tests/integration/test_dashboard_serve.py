"""`baton coordinator serve` serves the dashboard over HTTPS beside gRPC; `baton admin` CLI."""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from click.testing import Result
from typer.testing import CliRunner

from coordinator.console.cli import app
from tests.conftest import Pki
from tests.integration.conftest import Cluster


def _baton(*args: str) -> Result:
    return CliRunner().invoke(app, list(args))


def test_serve_offers_the_dashboard_over_https_with_the_consortium_certificate(
    pki: Pki, tmp_path: Path
) -> None:
    state_dir = tmp_path / "state"
    (tmp_path / "pw").write_text("a long enough password\n")
    added = _baton("admin", "add", "ops", "--role", "operator", "--password-file",
                   str(tmp_path / "pw"), "--state-dir", str(state_dir))  # fmt: skip
    assert added.exit_code == 0, added.output
    token = _baton("admin", "token", "ops", "--state-dir", str(state_dir)).stdout.strip()
    assert token.startswith("baton_")
    cluster = Cluster(log_dir=tmp_path / "logs")
    with cluster.running():
        cluster.start_coordinator(state_dir=state_dir, pki_dir=pki.directory,
                                  port_file=tmp_path / "port",
                                  dashboard_port_file=tmp_path / "dashboard.port")  # fmt: skip
        port = int((tmp_path / "dashboard.port").read_text())
        trust = ssl.create_default_context(cafile=str(pki.directory / "ca.crt"))
        # The first connection starts the dashboard (imports): a generous timeout.
        with httpx.Client(
            base_url=f"https://localhost:{port}", verify=trust, follow_redirects=True, timeout=60
        ) as client:
            assert client.get("/login").status_code == 200
            assert client.get("/api/v1/me").status_code == 401
            me = client.get("/api/v1/me", headers={"Authorization": f"Bearer {token}"})
            assert me.json() == {"account": "ops", "role": "operator"}
            link = _baton("admin", "login-link", "ops", "--url", f"https://localhost:{port}",
                          "--state-dir", str(state_dir)).stdout.strip()  # fmt: skip
            assert client.get(link.removeprefix(f"https://localhost:{port}")).status_code == 200
            assert client.get("/api/v1/me").json()["account"] == "ops"
        # An admin certificate from `baton pki issue admin`, presented in the TLS handshake.
        with httpx.Client(base_url=f"https://localhost:{port}", verify=trust,
                          cert=(str(pki.directory / "admin.crt"), str(pki.directory / "admin.key")),
                          follow_redirects=True) as client:  # fmt: skip
            assert client.get("/login/certificate").status_code == 200
            assert client.get("/api/v1/me").json() == {"account": "admin", "role": "admin"}

        # A second coordinator cannot take the same dashboard port: one line, exit 2.
        second = subprocess.run(
            [sys.executable, "-m", "coordinator", "coordinator", "serve", "--port", "0",
             "--state-dir", str(tmp_path / "other"), "--ca", str(pki.directory / "ca.crt"),
             "--cert", str(pki.directory / "coordinator.crt"),
             "--key", str(pki.directory / "coordinator.key"), "--dashboard-port", str(port)],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert second.returncode == 2
    assert f"dashboard cannot listen on localhost:{port}" in second.stderr
    assert "Traceback" not in second.stderr


def test_no_dashboard_serves_only_grpc(pki: Pki, tmp_path: Path) -> None:
    cluster = Cluster(log_dir=tmp_path / "logs")
    with cluster.running():
        cluster.start_coordinator(state_dir=tmp_path / "state", pki_dir=pki.directory,
                                  port_file=tmp_path / "port")  # fmt: skip
        log = cluster.process("coordinator").log_tail()
    assert "coordinator listening on" in log
    assert "dashboard on https://" not in log


def test_a_taken_dashboard_port_is_refused_before_the_grpc_port_is_announced(
    pki: Pki, tmp_path: Path
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        second = subprocess.run(
            [sys.executable, "-m", "coordinator", "coordinator", "serve", "--port", "0",
             "--state-dir", str(tmp_path / "state"), "--ca", str(pki.directory / "ca.crt"),
             "--cert", str(pki.directory / "coordinator.crt"),
             "--key", str(pki.directory / "coordinator.key"), "--host", "127.0.0.1",
             "--dashboard-port", str(port), "--port-file", str(tmp_path / "port")],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert second.returncode == 2
    assert f"dashboard cannot listen on 127.0.0.1:{port}" in second.stderr
    assert not (tmp_path / "port").exists()  # no site was told to connect to it


def test_the_dashboard_starts_on_its_first_connection(pki: Pki, tmp_path: Path) -> None:
    cluster = Cluster(log_dir=tmp_path / "logs")
    with cluster.running():
        cluster.start_coordinator(state_dir=tmp_path / "state", pki_dir=pki.directory,
                                  port_file=tmp_path / "port",
                                  dashboard_port_file=tmp_path / "dashboard.port")  # fmt: skip
        port = int((tmp_path / "dashboard.port").read_text())
        coordinator = cluster.process("coordinator")
        assert "dashboard on https://" not in coordinator.log_tail()  # not started: not browsed
        trust = ssl.create_default_context(cafile=str(pki.directory / "ca.crt"))
        with httpx.Client(base_url=f"https://localhost:{port}", verify=trust,
                          timeout=60) as client:  # fmt: skip
            assert client.get("/login").status_code == 200
            assert client.get("/login").status_code == 200
        assert f"dashboard on https://localhost:{port}/" in coordinator.log_tail()


def test_a_dashboard_failing_at_its_first_connection_leaves_the_coordinator_serving(
    pki: Pki, tmp_path: Path
) -> None:
    own = tmp_path / "pki"
    shutil.copytree(pki.directory, own)
    cluster = Cluster(log_dir=tmp_path / "logs")
    with cluster.running():
        cluster.start_coordinator(state_dir=tmp_path / "state", pki_dir=own,
                                  port_file=tmp_path / "port",
                                  dashboard_port_file=tmp_path / "dashboard.port")  # fmt: skip
        port = int((tmp_path / "dashboard.port").read_text())
        (own / "coordinator.key").unlink()  # the dashboard's TLS key is gone when it starts
        coordinator = cluster.process("coordinator")
        with socket.create_connection(("localhost", port), timeout=60):
            deadline = time.monotonic() + 60
            while "dashboard failed to start" not in coordinator.log_tail():
                assert time.monotonic() < deadline, coordinator.log_tail()
                time.sleep(0.1)
        log = coordinator.log_tail()
        assert coordinator.process.poll() is None, log  # runs in flight go on
        with pytest.raises(ConnectionRefusedError):  # later visitors are refused at once
            socket.create_connection(("localhost", port), timeout=10).close()
        grpc_port = int((tmp_path / "port").read_text())
        socket.create_connection(("localhost", grpc_port), timeout=10).close()
    assert "the coordinator goes on without it" in log
    assert "Traceback" not in log
