"""The coordinator's start-up line names its ledger without the database password."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from sqlalchemy import make_url

from coordinator.server import build_server
from tests.conftest import LoopThread, Pki
from tests.coordinator_tests.conftest import coordinator_settings


def test_startup_log_hides_the_database_password(
    pki: Pki,
    tmp_path: Path,
    loop_thread: LoopThread,
    database_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    if database_url.startswith("sqlite"):
        pytest.skip("SQLite URLs carry no password")
    # The test server authenticates by socket or trust, so a password in the URL is carried,
    # not checked: exactly what a leak would print.
    url = make_url(database_url).set(password="s3cret-pw").render_as_string(hide_password=False)
    settings = coordinator_settings(pki, tmp_path / "state", database_url=url)
    with caplog.at_level(logging.INFO, logger="coordinator.server"):
        server = loop_thread.run(build_server(settings))
        loop_thread.run(server.stop(0))
    (line,) = [r.getMessage() for r in caplog.records if "listening on" in r.getMessage()]
    assert "s3cret-pw" not in line
    assert ":***@" in line
