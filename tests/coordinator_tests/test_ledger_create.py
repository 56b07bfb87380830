"""A new, empty ledger gets its schema from the models and the head's stamp (`create_if_empty`),
and that schema is the one the Alembic migrations make."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from sqlalchemy import create_engine, inspect, text
from typer.testing import CliRunner

from coordinator.console.cli import app
from coordinator.ledger import Ledger
from coordinator.ledger._chain import SCHEMA_LOCK
from coordinator.ledger._repository import _MIGRATIONS, script_heads
from tests.conftest import PostgresDatabases
from tests.coordinator_tests.conftest import alembic_config

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def two_empty_urls(
    request: pytest.FixtureRequest, empty_database_url: str, tmp_path: Path
) -> Iterator[tuple[str, str]]:
    """Two new, empty databases of one kind (no tables): `empty_database_url` and another."""
    if empty_database_url.startswith("sqlite"):
        yield empty_database_url, f"sqlite:///{tmp_path / 'made.sqlite3'}"
        return
    databases: PostgresDatabases = request.getfixturevalue("postgres_databases")
    other = databases.take_empty()
    try:
        yield empty_database_url, other
    finally:
        databases.give_back(other)


def _schema(url: str) -> dict[str, Any]:
    """Everything the inspector (and, on SQLite, sqlite_master and the PRAGMAs) says of the
    database, and every table's rows, in a form two databases can be compared by."""
    engine = create_engine(url)
    try:
        inspector = inspect(engine)
        schema: dict[str, Any] = {"views": sorted(inspector.get_view_names())}
        tables = sorted(inspector.get_table_names())
        for table in tables:
            schema[table] = {
                # By name: where a later revision added a column, the migrated table has it
                # last and the model may not; nothing reads a ledger table's columns by position.
                "columns": sorted(
                    (
                        c["name"],
                        c["type"].compile(dialect=engine.dialect),
                        repr(c["type"]),
                        c["nullable"],
                        c["default"],
                        c.get("autoincrement"),
                        c.get("comment"),
                    )
                    for c in inspector.get_columns(table)
                ),
                "primary key": inspector.get_pk_constraint(table),
                "foreign keys": sorted(
                    (
                        f["name"] or "",
                        f["constrained_columns"],
                        f["referred_table"],
                        f["referred_columns"],
                        sorted(f["options"].items()),
                    )
                    for f in inspector.get_foreign_keys(table)
                ),
                "indexes": sorted(
                    (i["name"] or "", i["column_names"], i["unique"], sorted(i.items()))
                    for i in inspector.get_indexes(table)
                ),
                "unique": sorted(
                    (u["name"] or "", u["column_names"])
                    for u in inspector.get_unique_constraints(table)
                ),
                "checks": sorted(
                    (c["name"] or "", c["sqltext"]) for c in inspector.get_check_constraints(table)
                ),
            }
        with engine.connect() as connection:
            for table in tables:
                schema[table]["rows"] = sorted(
                    tuple(map(str, row))
                    for row in connection.execute(text(f'SELECT * FROM "{table}"'))
                )
            if engine.dialect.name == "sqlite":
                schema["sqlite_master"] = sorted(
                    connection.execute(text("SELECT type, name, tbl_name FROM sqlite_master")).all()
                )
                schema["pragmas"] = {
                    pragma: connection.execute(text(f"PRAGMA {pragma}")).scalar()
                    for pragma in ("user_version", "application_id", "journal_mode",
                                   "auto_vacuum", "encoding", "page_size")
                }  # fmt: skip
            else:
                schema["sequences"] = sorted(inspector.get_sequence_names())
        return schema
    finally:
        engine.dispose()


def _migrate_by_alembic(url: str) -> None:
    """Every migration, as `Ledger.migrate` ran them before (its connection, its PRAGMAs)."""
    ledger = Ledger(url)
    try:
        config = alembic_config(url)
        with ledger.engine.begin() as connection:
            config.attributes["connection"] = connection
            command.upgrade(config, "head")
    finally:
        ledger.close()


def test_a_created_ledger_has_the_migrated_schema(two_empty_urls: tuple[str, str]) -> None:
    migrated_url, made_url = two_empty_urls
    _migrate_by_alembic(migrated_url)
    ledger = Ledger(made_url)
    try:
        assert ledger.create_if_empty()
        assert ledger.at_head()
    finally:
        ledger.close()
    migrated, made = _schema(migrated_url), _schema(made_url)
    assert made.keys() == migrated.keys()
    for name in migrated:
        assert made[name] == migrated[name], name
    [[version]] = made["alembic_version"]["rows"]
    assert {version} == script_heads()


@pytest.mark.parametrize("holding", ["revision", "foreign table", "view"])
def test_a_database_holding_anything_goes_through_the_migrations(
    empty_database_url: str, holding: str
) -> None:
    url = empty_database_url
    if holding == "revision":
        command.upgrade(alembic_config(url), "0011")
    else:
        engine = create_engine(url)
        with engine.begin() as connection:
            if holding == "foreign table":
                connection.execute(text("CREATE TABLE notes (id INTEGER PRIMARY KEY)"))
            else:
                connection.execute(text("CREATE VIEW one AS SELECT 1 AS x"))
        engine.dispose()
    ledger = Ledger(url)
    try:
        with ledger.engine.connect():
            pass  # SQLite: the ledger's connection sets WAL, which the file keeps
        before = _schema(url)
        assert not ledger.create_if_empty()
        assert _schema(url) == before  # left as it was
        ledger.migrate()  # by Alembic: the revision upgraded, the foreign table kept
        assert ledger.at_head()
        after = _schema(url)
        if holding == "foreign table":
            assert "notes" in after
        if holding == "view":
            assert after["views"] == ["one"]
    finally:
        ledger.close()


def test_a_created_ledger_takes_a_later_revision(empty_database_url: str, tmp_path: Path) -> None:
    [head] = script_heads() or set()
    scripts = tmp_path / "migrations"
    shutil.copytree(_MIGRATIONS, scripts, ignore=shutil.ignore_patterns("__pycache__"))
    (scripts / "versions" / "9999_later.py").write_text(
        f'"""a later revision"""\n\nimport sqlalchemy as sa\nfrom alembic import op\n\n'
        f'revision = "9999"\ndown_revision = "{head}"\nbranch_labels = None\n'
        f"depends_on = None\n\n\ndef upgrade() -> None:\n"
        f'    op.add_column("runs", sa.Column("later", sa.Integer(), nullable=True))\n\n\n'
        f"def downgrade() -> None:\n    pass\n"
    )
    ledger = Ledger(empty_database_url)
    try:
        assert ledger.create_if_empty()
        ledger.record_event("test.made", payload={})
        command.upgrade(alembic_config(empty_database_url, scripts), "head")  # only 9999 runs
        with ledger.engine.connect() as connection:
            assert connection.execute(text("SELECT version_num FROM alembic_version")).all() == [
                ("9999",)
            ]
        assert "later" in {c["name"] for c in inspect(ledger.engine).get_columns("runs")}
        assert ledger.verify().ok
    finally:
        ledger.close()


def test_a_created_ledger_verifies_and_migrate_leaves_it(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    ledger = Ledger(f"sqlite:///{state / 'ledger.sqlite3'}")
    try:
        ledger.migrate()
        ledger.record_event("test.made", payload={"n": 1})
        ledger.migrate()  # at the head: nothing
    finally:
        ledger.close()
    verified = CliRunner().invoke(app, ["ledger", "verify", "--state-dir", str(state)])
    assert verified.exit_code == 0, verified.output


_RACER = """
import sys
from coordinator.ledger import Ledger
ledger = Ledger(sys.stdin.readline().strip())
print("start", flush=True)
made = ledger.create_if_empty()
ledger.migrate()
print(made, ledger.at_head(), flush=True)
ledger.close()
"""


def test_two_processes_on_one_empty_database_create_it_once(empty_database_url: str) -> None:
    # The test holds the lock the creation takes, so both racers find the database empty and
    # wait for it; released, one creates and the other finds the schema made.
    holding = Ledger(empty_database_url)  # on SQLite, its connection sets WAL as the racers' do
    holder = holding.engine
    connection = holder.connect()
    try:
        if holder.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": SCHEMA_LOCK})
        else:
            connection.execute(text("BEGIN IMMEDIATE"))
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        racers = [
            subprocess.Popen(
                [sys.executable, "-c", _RACER],
                env=env,
                text=True,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
            for _ in range(2)
        ]
        for racer in racers:
            assert racer.stdin is not None and racer.stdout is not None
            racer.stdin.write(empty_database_url + "\n")
            racer.stdin.close()
            assert racer.stdout.readline().strip() == "start"
        if holder.dialect.name == "postgresql":
            waiting = text(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted "
                "AND objid = :low AND database = (SELECT oid FROM pg_database "
                "WHERE datname = current_database())"
            )
            with holder.connect() as watcher:
                low = {"low": SCHEMA_LOCK & 0xFFFFFFFF}
                while (watcher.execute(waiting, low).scalar() or 0) < 2:
                    assert all(r.poll() is None for r in racers)
                    time.sleep(0.02)
        else:
            time.sleep(0.5)  # SQLite shows no waiters; they wait out its busy timeout (10 s)
    finally:
        connection.rollback()
        connection.close()
        holding.close()
    results = []
    for racer in racers:
        assert racer.stdout is not None and racer.stderr is not None
        out, err = racer.stdout.read(), racer.stderr.read()
        assert racer.wait(timeout=120) == 0, err[-2000:]
        results.append(out.strip())
    assert sorted(results) == ["False True", "True True"]
