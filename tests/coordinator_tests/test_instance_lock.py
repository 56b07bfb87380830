"""One coordinator per PostgreSQL database: the refusal names that database's holder."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

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
