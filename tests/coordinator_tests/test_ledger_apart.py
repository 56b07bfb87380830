"""`coordinator serve` migrates a ledger in a child process: Alembic never enters its memory."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from sqlalchemy import make_url, text

from coordinator.ledger import Ledger
from coordinator.ledger_apart import migrate_apart
from coordinator.startup import StartupError
from tests.conftest import Pki
from tests.coordinator_tests.conftest import alembic_config


def _serve(pki: Pki, state_dir: Path, *extra: str) -> tuple[subprocess.Popen[bytes], Path]:
    """A coordinator listing its imports (-X importtime) in the file returned."""
    stderr = state_dir.parent / "serve.stderr"
    with stderr.open("wb") as sink:
        return subprocess.Popen(
        [
            sys.executable, "-X", "importtime", "-m", "coordinator", "coordinator", "serve",
            "--port", "0", "--port-file", str(state_dir / "port"),
            "--dashboard-port", "0",  # not 8443: another test's coordinator may hold it
            "--state-dir", str(state_dir),
            "--ca", str(pki.directory / "ca.crt"),
            "--cert", str(pki.directory / "coordinator.crt"),
            "--key", str(pki.directory / "coordinator.key"),
            "--log-level", "WARNING", *extra,
        ],
        stdout=subprocess.DEVNULL,
        stderr=sink,
        stdin=subprocess.DEVNULL,
    ), stderr  # fmt: skip


def _unknown_revision(url: str) -> None:
    """A ledger stamped with a revision no migration script has."""
    ledger = Ledger(url)
    try:
        with ledger.engine.begin() as connection:
            connection.execute(text("CREATE TABLE alembic_version (version_num VARCHAR(32))"))
            connection.execute(text("INSERT INTO alembic_version VALUES ('zzzz')"))
    finally:
        ledger.close()


def test_serve_migrates_a_new_ledger_without_importing_alembic(pki: Pki, tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    process, stderr = _serve(pki, state)
    try:
        deadline = time.monotonic() + 120
        port_file = state / "port"
        while not (port_file.is_file() and port_file.read_text()):
            assert process.poll() is None, stderr.read_text()[-2000:]
            assert time.monotonic() < deadline, "the coordinator did not start"
            time.sleep(0.05)
    finally:
        process.terminate()
        process.wait(timeout=60)
    imports = stderr.read_text()
    imported = {line.rsplit("|", 1)[-1].strip() for line in imports.splitlines()
                if line.startswith("import time:")}  # fmt: skip
    assert "coordinator.server" in imported  # -X importtime listed the serving process's imports
    assert not {name for name in imported if name.split(".")[0] in ("alembic", "mako")}
    ledger = Ledger(f"sqlite:///{state / 'ledger.sqlite3'}")
    try:
        assert ledger.at_head()
    finally:
        ledger.close()


def test_a_ledger_the_child_cannot_migrate_stops_serve_with_one_line(
    pki: Pki, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    url = f"sqlite:///{tmp_path / 'ledger.sqlite3'}"
    _unknown_revision(url)
    process, stderr = _serve(pki, state, "--database-url", url)
    process.wait(timeout=180)
    lines = [line for line in stderr.read_text().splitlines()
             if not line.startswith("import time:")]  # fmt: skip
    assert process.returncode != 0
    assert len(lines) == 1 and "Traceback" not in lines[0], lines
    assert "cannot migrate the ledger database" in lines[0] and "zzzz" in lines[0]


def _old_revision(url: str) -> None:
    """A ledger at revision 0011: one the migrations, not `create_if_empty`, bring up."""
    command.upgrade(alembic_config(url), "0011")


def test_migrate_apart_makes_an_empty_ledger_without_a_child(empty_database_url: str) -> None:
    ledger = Ledger(empty_database_url)
    try:
        assert not ledger.at_head()
        assert asyncio.run(migrate_apart(ledger)) is False  # made here, from the models
        assert ledger.at_head()
        ledger.record_event("test.after-creation", payload={})
    finally:
        ledger.close()


def test_migrate_apart_brings_an_old_ledger_to_the_head(empty_database_url: str) -> None:
    _old_revision(empty_database_url)
    ledger = Ledger(empty_database_url)
    try:
        assert not ledger.at_head()
        assert asyncio.run(migrate_apart(ledger)) is True
        assert ledger.at_head()
        assert asyncio.run(migrate_apart(ledger)) is False  # at the head: no child
        ledger.record_event("test.after-migration", payload={})  # the pool works afterwards
    finally:
        ledger.close()


def _refusal(url: str) -> str:
    """What `migrate_apart` refuses the ledger at `url` with: one line, no password."""
    ledger = Ledger(url)
    try:
        with pytest.raises(StartupError) as refused:
            asyncio.run(migrate_apart(ledger))
    finally:
        ledger.close()
    message = str(refused.value)
    assert "\n" not in message
    password = make_url(url).password
    assert not password or str(password) not in message
    return message


def test_migrate_apart_refuses_an_unknown_revision_in_one_line(empty_database_url: str) -> None:
    _unknown_revision(empty_database_url)
    message = _refusal(empty_database_url)
    assert "zzzz" in message
    assert message.startswith("cannot migrate the ledger database ")


def test_the_migration_child_imports_the_ledger_not_the_engine(tmp_path: Path) -> None:
    # Every first start waits for this child: the run engine, the servicer and gRPC are not needed
    # to migrate, and importing them took 0.8 s of its 2.1 s.
    url = f"sqlite:///{tmp_path / 'ledger.sqlite3'}"
    _old_revision(url)  # an empty one is made without the child
    child = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "coordinator.ledger_apart"],
        input=url.encode(), capture_output=True, timeout=180, check=False,
    )  # fmt: skip
    assert child.returncode == 0, child.stderr.decode()[-2000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in child.stderr.decode().splitlines()
                if line.startswith("import time:")}  # fmt: skip
    assert "coordinator.ledger" in imported and "alembic" in imported
    assert not {"coordinator.engine", "coordinator.server", "coordinator.servicer"} & imported
    ledger = Ledger(url)
    try:
        assert ledger.at_head()
    finally:
        ledger.close()


def test_a_migration_child_that_dies_at_once_is_one_line(
    empty_database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A child that cannot start (a broken interpreter or environment) exits before the URL is
    # written to it: that write fails, and serve refuses in one line instead of a traceback.
    broken = tmp_path / "python"
    broken.write_text("#!/bin/sh\necho 'Fatal Python error: init_fs_encoding' >&2\nexit 1\n")
    broken.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(broken))
    spawn = asyncio.create_subprocess_exec

    async def spawn_and_let_die(*args: Any, **kwargs: Any) -> asyncio.subprocess.Process:
        process = await spawn(*args, **kwargs)
        await process.wait()  # dead before its URL is written, every time
        return process

    monkeypatch.setattr(asyncio, "create_subprocess_exec", spawn_and_let_die)
    _old_revision(empty_database_url)  # an empty one is made without the child
    message = _refusal(empty_database_url)
    assert "exited with code 1 before it read the database URL" in message
    assert message.endswith("Fatal Python error: init_fs_encoding")
