"""Shared fixtures: a throwaway consortium PKI, and a coordinator served on localhost:0."""

from __future__ import annotations

import asyncio
import os
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import create_engine, make_url, text

from protocols.pki import Role, init_ca, issue_certificate
from protocols.transport import TlsFiles

SITES = ("site-a", "site-b", "site-c")


@dataclass(frozen=True)
class Pki:
    directory: Path
    foreign: Path  # a second CA with a site certificate named like a real one

    def tls(self, name: str) -> TlsFiles:
        return TlsFiles(self.directory / "ca.crt", self.directory / f"{name}.crt",
                        self.directory / f"{name}.key")  # fmt: skip

    def foreign_tls(self, name: str) -> TlsFiles:
        return TlsFiles(self.directory / "ca.crt", self.foreign / f"{name}.crt",
                        self.foreign / f"{name}.key")  # fmt: skip


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    root = tmp_path_factory.mktemp("pki")
    init_ca(root)
    issue_certificate(root, root, Role.COORDINATOR, "coordinator")
    issue_certificate(root, root, Role.ADMIN, "admin")
    for site in SITES:
        issue_certificate(root, root, Role.SITE, site)
    foreign = tmp_path_factory.mktemp("foreign-pki")
    init_ca(foreign)
    issue_certificate(foreign, foreign, Role.SITE, "site-a")
    return Pki(root, foreign)


class LoopThread:
    """An asyncio loop on a background thread, for running the coordinator under sync tests."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro, timeout: float = 30):  # type: ignore[no-untyped-def]
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture
def loop_thread() -> Iterator[LoopThread]:
    lt = LoopThread()
    yield lt
    lt.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty ledger database: SQLite always, PostgreSQL where a server is given."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'ledger.sqlite3'}"
        return
    admin_url = os.environ.get("BATON_TEST_POSTGRES_URL")
    if not admin_url:
        if os.environ.get("BATON_REQUIRE_POSTGRES"):
            pytest.fail("BATON_REQUIRE_POSTGRES is set but BATON_TEST_POSTGRES_URL is not")
        pytest.skip("no PostgreSQL server given (BATON_TEST_POSTGRES_URL; .ci/run starts one)")
    name = f"baton_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE "{name}" WITH (FORCE)'))
        admin.dispose()
