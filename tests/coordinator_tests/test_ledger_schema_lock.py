"""Every path that changes the ledger's schema (a first start's `create_if_empty`, Alembic by
`Ledger.migrate` or the migration child, `baton db upgrade`) holds one schema lock while it
decides and changes: two OS processes racing on one database both succeed, one after the other.

Each race is forced: the first racer stops at its first CREATE or ALTER statement (it has read
the database and decided), the second starts and is seen waiting (PostgreSQL: in pg_stat_activity;
SQLite shows no waiters: a pause), then the first goes on."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from alembic import command
from sqlalchemy import create_engine, inspect, text
from sqlalchemy.exc import DBAPIError

from coordinator.console import db
from coordinator.ledger import Ledger
from coordinator.ledger._chain import SCHEMA_LOCK, hold_schema_lock
from coordinator.ledger._repository import _MIGRATIONS, script_heads
from tests.coordinator_tests.conftest import alembic_config

ROOT = Path(__file__).resolve().parents[2]

# argv: the job ("upgrade": `baton db upgrade`'s db.upgrade; "migrate": a coordinator's start,
# create_if_empty then migrate) and "pause" or "run". Reads the URL, then (paused) a line to go on.
_RACER = """
import sys
from sqlalchemy import event
from sqlalchemy.engine import Engine

job, pause = sys.argv[1], sys.argv[2] == "pause"
url = sys.stdin.readline().strip()
if pause:
    paused = []

    def stop_at_first_change(conn, cursor, statement, parameters, context, executemany):
        if not paused and statement.lstrip().upper().startswith(("CREATE", "ALTER")):
            paused.append(statement)
            print("paused", flush=True)
            sys.stdin.readline()

    event.listen(Engine, "before_cursor_execute", stop_at_first_change)
print("start", flush=True)
if job == "upgrade":
    from coordinator.console import db
    db.upgrade(url)
    print("upgraded", flush=True)
else:
    from coordinator.ledger import Ledger
    ledger = Ledger(url)
    made = ledger.create_if_empty()
    ledger.migrate()
    print(made, ledger.at_head(), flush=True)
    ledger.close()
"""


def _racer(job: str, pause: bool, url: str) -> subprocess.Popen[str]:
    racer = subprocess.Popen(
        [sys.executable, "-c", _RACER, job, "pause" if pause else "run"],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        text=True,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert racer.stdin is not None and racer.stdout is not None
    racer.stdin.write(url + "\n")
    racer.stdin.flush()
    assert racer.stdout.readline().strip() == "start"
    return racer


def _race(url: str, first: str, second: str) -> list[str]:
    """Runs `first` until it stops at its first schema change, then `second` until it waits (or
    ends), then lets `first` go on; returns each one's last line, after both ended with 0."""
    leader = _racer(first, True, url)
    assert leader.stdout is not None and leader.stdin is not None
    line = leader.stdout.readline().strip()
    assert line == "paused", leader.communicate()[1][-2000:]
    follower = _racer(second, False, url)
    if url.startswith("postgresql"):
        engine = create_engine(url)
        waiting = text(
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE datname = current_database() AND wait_event_type = 'Lock'"
        )
        deadline = time.monotonic() + 30
        with engine.connect() as watcher:
            while follower.poll() is None and time.monotonic() < deadline:
                if watcher.execute(waiting).scalar():
                    break
                watcher.rollback()
                time.sleep(0.02)
        engine.dispose()
    else:
        time.sleep(0.5)  # SQLite shows no waiters; the follower waits out its busy timeout
    leader.stdin.write("go\n")
    leader.stdin.flush()
    results = []
    for racer in (leader, follower):
        out, err = racer.communicate(timeout=120)
        assert racer.returncode == 0, err[-2000:]
        results.append(out.strip().splitlines()[-1])
    return results


def _revisions(url: str) -> list[str]:
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            rows = connection.execute(text("SELECT version_num FROM alembic_version"))
            return [row[0] for row in rows]
    finally:
        engine.dispose()


@pytest.mark.parametrize(("first", "second"), [("upgrade", "migrate"), ("migrate", "upgrade")])
def test_db_upgrade_racing_a_first_start_makes_the_schema_once(
    empty_database_url: str, first: str, second: str
) -> None:
    results = _race(empty_database_url, first, second)
    made = results[0] if first == "migrate" else results[1]
    assert made == ("True True" if first == "migrate" else "False True")  # made by one only
    assert _revisions(empty_database_url) == sorted(script_heads() or ())


@pytest.mark.parametrize("second", ["upgrade", "migrate"])
def test_two_upgrades_from_an_older_revision_run_each_migration_once(
    empty_database_url: str, second: str
) -> None:
    command.upgrade(alembic_config(empty_database_url), "0011")
    results = _race(empty_database_url, "upgrade", second)
    assert results[0] == "upgraded"
    assert results[1] == ("upgraded" if second == "upgrade" else "False True")
    assert _revisions(empty_database_url) == sorted(script_heads() or ())


def test_db_current_takes_no_lock(empty_database_url: str) -> None:
    # Reading the revision changes nothing: it does not wait out a migration (nor need, on
    # SQLite, the write lock).
    db.upgrade(empty_database_url)
    holder = Ledger(empty_database_url)
    shown: list[str] = []
    try:
        with holder.engine.connect() as connection:
            hold_schema_lock(connection)
            reader = threading.Thread(
                target=lambda: shown.append(db.current(empty_database_url)), daemon=True
            )
            reader.start()
            reader.join(timeout=30)
            answered_meanwhile = not reader.is_alive()
            connection.rollback()
        reader.join(timeout=30)
    finally:
        holder.close()
    assert answered_meanwhile
    assert shown and shown[0].endswith("(head)")


def test_offline_sql_takes_the_schema_lock_on_postgresql_only() -> None:
    # A DBA's script for PostgreSQL waits out a coordinator's start (and it, the script) as
    # `baton db upgrade` does; a SQLite script (Alembic gives it no transaction) has no lock.
    printed = db.upgrade("postgresql+psycopg://baton@db.invalid/baton", sql=True)
    begin, lock = (
        printed.index("BEGIN;"),
        printed.index(f"SELECT pg_advisory_xact_lock({SCHEMA_LOCK})"),
    )
    assert begin < lock < printed.index("CREATE TABLE alembic_version")
    assert printed.count("pg_advisory_xact_lock") == 1
    sqlite = db.upgrade("sqlite:///ledger.sqlite3", sql=True)
    assert "BEGIN" not in sqlite and "advisory" not in sqlite and "CREATE TABLE runs" in sqlite


def test_a_failing_migration_leaves_the_ledger_as_it_was(
    empty_database_url: str, tmp_path: Path
) -> None:
    # The chain runs in the one transaction that holds the lock, on SQLite too (whose DDL the
    # sqlite3 driver would otherwise commit statement by statement): a later migration that
    # fails undoes an earlier one of the same upgrade, and its own first statement.
    [head] = script_heads() or set()
    scripts = tmp_path / "migrations"
    shutil.copytree(_MIGRATIONS, scripts, ignore=shutil.ignore_patterns("__pycache__"))
    for revision, parent, body in (
        ("9998", head, 'op.add_column("runs", sa.Column("later", sa.Integer()))'),
        ("9999", "9998", 'op.create_table("notes", sa.Column("id", sa.Integer(), primary_key=True))'
                         '\n    op.execute("SELECT * FROM no_such_table")'),
    ):  # fmt: skip
        (scripts / "versions" / f"{revision}_later.py").write_text(
            f'"""a later revision"""\n\nimport sqlalchemy as sa\nfrom alembic import op\n\n'
            f'revision = "{revision}"\ndown_revision = "{parent}"\nbranch_labels = None\n'
            f"depends_on = None\n\n\ndef upgrade() -> None:\n    {body}\n\n\n"
            f"def downgrade() -> None:\n    pass\n"
        )
    ledger = Ledger(empty_database_url)
    try:
        assert ledger.create_if_empty()
        with pytest.raises(DBAPIError, match="no_such_table"):
            command.upgrade(alembic_config(empty_database_url, scripts), "head")
        assert ledger.at_head()
        inspector = inspect(ledger.engine)
        assert "later" not in {c["name"] for c in inspector.get_columns("runs")}
        assert not inspector.has_table("notes")
    finally:
        ledger.close()
