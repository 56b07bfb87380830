"""`baton coordinator serve` serves the dashboard over HTTPS beside gRPC; `baton admin` CLI."""

from __future__ import annotations

import ssl
import subprocess
import sys
from pathlib import Path

import httpx
from click.testing import Result
from typer.testing import CliRunner

from coordinator.console.cli import app
from coordinator.console.processes import Cluster
from tests.conftest import Pki


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
        with httpx.Client(
            base_url=f"https://localhost:{port}", verify=trust, follow_redirects=True
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
