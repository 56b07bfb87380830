"""Shared fixtures: a throwaway consortium PKI, and a coordinator served on localhost:0."""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import shutil
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import create_engine, make_url, text

from coordinator.ledger import Ledger
from protocols.pki import Role, init_ca, issue_certificate
from protocols.transport import TlsFiles
from site_agent.openmp import prefer_passive_waits

# Site code trains in this process (and in every process it starts) as `baton-site` runs it:
# torch's threads sleep between parallel regions (set before any test module imports torch).
prefer_passive_waits()

SITES = ("site-a", "site-b", "site-c")


def pytest_configure(config: pytest.Config) -> None:
    # Which tests pytest-xdist runs together on one worker (make test XDIST=2).
    config.pluginmanager.import_plugin("tests.xdist_groups")


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


class PostgresDatabases:
    """PostgreSQL databases for tests: each made ahead and dropped afterwards on threads.

    CREATE DATABASE copies a template and DROP DATABASE forces a checkpoint: a second or more
    each on a busy machine, mostly waiting on the disk. Made one test ahead and dropped behind,
    that wait overlaps the tests instead of adding to them. Every test still gets a database no
    other test has used.

    The databases are copies of one migrated once per session, so they are at the ledger's
    newest revision, with no rows: a coordinator or `Ledger.migrate` finds nothing to do, as on
    a restart. Migrating every test's database cost more than the rest of a short test. The
    template is made from the models (`Ledger.create_if_empty`); the migrations themselves run
    on `take_empty` databases (tests/coordinator_tests/test_ledger_create.py, which compares the
    two, test_ledger_migrate.py and the upgrade tests).
    """

    def __init__(self, admin_url: str) -> None:
        self.admin_url = admin_url
        self.admin = create_engine(admin_url, isolation_level="AUTOCOMMIT", pool_size=2)
        self.template = self._create(f"baton_test_template_{uuid.uuid4().hex[:12]}")
        try:
            ledger = Ledger(self._url(self.template))
            try:
                ledger.migrate()
            finally:
                ledger.close()  # CREATE DATABASE ... TEMPLATE needs it unused
        except BaseException:
            self._drop_now(self.template)
            self.admin.dispose()
            raise
        self.ready: queue.Queue[str | BaseException] = queue.Queue(maxsize=1)
        # At most two drops wait: a test that gives back faster than DROP DATABASE (a forced
        # checkpoint) goes then waits in its teardown instead of leaving a backlog that the
        # session's end would wait out (past the per-test timeout on a loaded machine).
        self.spent: queue.Queue[str | None] = queue.Queue(maxsize=2)
        self.closing = threading.Event()
        self.failures: list[str] = []
        self.threads = [threading.Thread(target=self._make, daemon=True),
                        threading.Thread(target=self._drop, daemon=True)]  # fmt: skip
        for thread in self.threads:
            thread.start()

    def take(self) -> str:
        """The URL of a new database at the ledger's head revision; give it back with
        `give_back` once done."""
        made = self.ready.get(timeout=300)
        if isinstance(made, BaseException):
            raise made
        return self._url(made)

    def take_empty(self) -> str:
        """The URL of a new, empty database (no tables); give it back with `give_back`."""
        return self._url(self._create(f"baton_test_{uuid.uuid4().hex[:12]}"))

    def give_back(self, url: str) -> None:
        self.spent.put(make_url(url).database)

    def close(self) -> None:
        """Drops every database made, the one made ahead included; raises if a drop failed."""
        self.closing.set()
        maker, dropper = self.threads
        while maker.is_alive() or not self.ready.empty():
            with contextlib.suppress(queue.Empty):
                made = self.ready.get(timeout=0.1)  # frees the maker's put, if it waits
                if isinstance(made, str):
                    self.spent.put(made)
        self.spent.put(None)
        dropper.join(300)
        try:
            self._drop_now(self.template)
        except Exception as exc:
            self.failures.append(f"{self.template}: {exc}")
        self.admin.dispose()
        if self.failures:
            raise RuntimeError(f"test databases not dropped: {self.failures}")

    def _url(self, database: str) -> str:
        return make_url(self.admin_url).set(database=database).render_as_string(hide_password=False)

    def _create(self, name: str, template: str | None = None) -> str:
        copy = f' TEMPLATE "{template}"' if template else ""
        with self.admin.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{name}"{copy}'))
        return name

    def _drop_now(self, name: str) -> None:
        with self.admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE "{name}" WITH (FORCE)'))

    def _make(self) -> None:
        while not self.closing.is_set():
            try:
                name = self._create(f"baton_test_{uuid.uuid4().hex[:12]}", self.template)
            except Exception as exc:
                self.ready.put(exc)
                return
            self.ready.put(name)

    def _drop(self) -> None:
        while (name := self.spent.get()) is not None:
            try:
                self._drop_now(name)
            except Exception as exc:
                self.failures.append(f"{name}: {exc}")


@pytest.fixture(scope="session")
def postgres_databases() -> Iterator[PostgresDatabases | None]:
    """Where PostgreSQL test databases come from, or None without a server."""
    admin_url = os.environ.get("BATON_TEST_POSTGRES_URL")
    if not admin_url:
        yield None
        return
    databases = PostgresDatabases(admin_url)
    yield databases
    databases.close()


@pytest.fixture(scope="session")
def migrated_sqlite(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SQLite ledger file at the ledger's newest revision, with no rows: migrated once per
    session and copied for each test, as `PostgresDatabases` copies its template. Migrating a
    new file costs a quarter of a CPU second and a few fsyncs, in hundreds of tests. A new file
    is made from the models (`Ledger.create_if_empty`); the migrations of a new file run in
    tests/coordinator_tests/test_ledger_create.py, which compares the two schemas."""
    path = tmp_path_factory.mktemp("sqlite-template") / "ledger.sqlite3"
    ledger = Ledger(f"sqlite:///{path}")
    try:
        ledger.migrate()
    finally:
        ledger.close()  # the last connection: SQLite folds the WAL into the file and removes it
    if path.with_name(path.name + "-wal").exists():
        raise RuntimeError(f"{path}: SQLite left its WAL file; a copy would miss the schema")
    return path


@pytest.fixture
def sqlite_ledger_url(tmp_path: Path, migrated_sqlite: Path) -> str:
    """``sqlite:///<tmp>/ledger.sqlite3``, a copy of `migrated_sqlite`: a new ledger no other
    test used, already at the newest revision."""
    path = tmp_path / "ledger.sqlite3"
    shutil.copyfile(migrated_sqlite, path)
    return f"sqlite:///{path}"


def _ledger_database(
    request: pytest.FixtureRequest, tmp_path: Path, *, empty: bool
) -> Iterator[str]:
    if request.param == "sqlite":
        if empty:
            yield f"sqlite:///{tmp_path / 'ledger.sqlite3'}"
        else:
            yield request.getfixturevalue("sqlite_ledger_url")
        return
    databases: PostgresDatabases | None = request.getfixturevalue("postgres_databases")
    if databases is None:
        if os.environ.get("BATON_REQUIRE_POSTGRES"):
            pytest.fail("BATON_REQUIRE_POSTGRES is set but BATON_TEST_POSTGRES_URL is not")
        pytest.skip("no PostgreSQL server given (BATON_TEST_POSTGRES_URL; .ci/run starts one)")
    url = databases.take_empty() if empty else databases.take()
    try:
        yield url
    finally:
        databases.give_back(url)


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh ledger database no other test used, already at the newest revision with no rows:
    SQLite always (a copy of `migrated_sqlite`), PostgreSQL where a server is given (see
    `PostgresDatabases`)."""
    yield from _ledger_database(request, tmp_path, empty=False)


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty database (no tables) on SQLite and PostgreSQL: for migration tests."""
    yield from _ledger_database(request, tmp_path, empty=True)


def admin_options(port: int, tls: TlsFiles) -> list[str]:
    """The `baton` CLI options that reach the coordinator on ``port`` as the admin ``tls``."""
    return ["--coordinator", f"localhost:{port}", "--ca", str(tls.ca_certificate),
            "--cert", str(tls.certificate), "--key", str(tls.private_key)]  # fmt: skip
