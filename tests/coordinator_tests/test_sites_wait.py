"""`baton sites --wait-for`: scripts wait for their hospitals instead of polling by hand."""

from __future__ import annotations

import socket

from typer.testing import CliRunner

from coordinator.console.cli import app
from tests.conftest import Pki


def test_waiting_for_a_site_that_never_connects_exits_3_naming_it(pki: Pki) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # nothing listens here
    tls = pki.tls("admin")
    result = CliRunner().invoke(app, [
        "sites", "--coordinator", f"localhost:{port}", "--ca", str(tls.ca_certificate),
        "--cert", str(tls.certificate), "--key", str(tls.private_key),
        "--wait-for", "st-marys", "--timeout", "1",
    ])  # fmt: skip
    assert result.exit_code == 3
    assert "site(s) did not connect within 1 s: st-marys" in " ".join(result.output.split())
