"""One coordinator per PostgreSQL database: the refusal names that database's holder."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import filelock
import pytest
from sqlalchemy import Connection, create_engine, text
from sqlalchemy.pool import NullPool

from coordinator.startup import _INSTANCE_LOCK, AlreadyRunning, InstanceLock
from tests.conftest import PostgresDatabases


@pytest.fixture
def databases(postgres_databases: PostgresDatabases | None) -> Iterator[list[str]]:
    if postgres_databases is None:
        if os.environ.get("BATON_REQUIRE_POSTGRES"):
            pytest.fail("BATON_REQUIRE_POSTGRES is set but BATON_TEST_POSTGRES_URL is not")
        pytest.skip("no PostgreSQL server given (BATON_TEST_POSTGRES_URL)")
    urls = [postgres_databases.take() for _ in range(4)]
    yield urls
    for url in urls:
        postgres_databases.give_back(url)


def _hold(url: str, name: str) -> Connection:
    """A session on `url` named `name` holding the coordinators' advisory lock."""
    engine = create_engine(url, poolclass=NullPool, connect_args={"application_name": name})
    connection = engine.connect()
    assert connection.execute(
        text("SELECT pg_try_advisory_lock(:key)"), {"key": _INSTANCE_LOCK}
    ).scalar()
    return connection


def test_a_refusal_names_the_holder_of_this_database_not_of_another_on_the_server(
    databases: list[str], tmp_path: Path
) -> None:
    ours, *others = databases
    elsewhere = [_hold(url, f"baton-coordinator elsewhere {i}") for i, url in enumerate(others)]
    holder = _hold(ours, "baton-coordinator the holder")
    try:
        second = InstanceLock(tmp_path / "state", ours)
        with pytest.raises(AlreadyRunning) as refused:
            second.acquire()
        second.release()
    finally:
        for connection in [holder, *elsewhere]:
            connection.close()
    assert "(baton-coordinator the holder)" in str(refused.value)
    assert "elsewhere" not in str(refused.value)


def test_a_second_claim_on_a_state_directory_is_refused_with_the_holder_until_released(
    tmp_path: Path,
) -> None:
    (tmp_path / "state").mkdir()
    url = f"sqlite:///{tmp_path / 'state' / 'ledger.sqlite3'}"
    first = InstanceLock(tmp_path / "state", url)
    first.acquire()
    second = InstanceLock(tmp_path / "state", url)
    try:
        with pytest.raises(AlreadyRunning) as refused:
            second.acquire()
        assert "another coordinator is using the state directory" in str(refused.value)
        assert f"(pid {os.getpid()} on " in str(refused.value)
    finally:
        first.release()
    second.acquire()  # released: free again
    second.release()


def test_a_claim_held_with_filelock_by_an_earlier_coordinator_refuses_this_one(
    tmp_path: Path,
) -> None:
    # Earlier coordinators took the claim with filelock (flock on Unix): the same lock.
    held = filelock.FileLock(tmp_path / "state" / "coordinator.lock", timeout=0)
    held.acquire()
    try:
        with pytest.raises(AlreadyRunning, match="the state directory"):
            InstanceLock(tmp_path / "state", "sqlite://").acquire()
    finally:
        held.release()
    claim = InstanceLock(tmp_path / "state", "sqlite://")
    claim.acquire()
    try:
        with pytest.raises(filelock.Timeout):
            filelock.FileLock(tmp_path / "state" / "coordinator.lock", timeout=0).acquire()
    finally:
        claim.release()
