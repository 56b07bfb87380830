"""`Ledger.migrate` skips Alembic for a ledger already at the head or new (empty), and only then."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from alembic import command
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, text

from coordinator.ledger import Ledger
from coordinator.ledger._repository import script_heads
from tests.coordinator_tests.conftest import alembic_config

ROOT = Path(__file__).resolve().parents[2]


def test_heads_read_from_the_scripts_are_alembics_heads() -> None:
    scripts = ScriptDirectory.from_config(alembic_config("sqlite://"))
    assert script_heads() == set(scripts.get_heads())


def test_a_fresh_database_is_not_at_head_and_migrate_creates_the_schema(
    empty_database_url: str,
) -> None:
    ledger = Ledger(empty_database_url)
    try:
        assert not ledger.at_head()
        ledger.migrate()
        assert ledger.at_head()
        assert inspect(ledger.engine).has_table("events")
    finally:
        ledger.close()


def test_a_ledger_at_an_older_revision_is_upgraded(empty_database_url: str) -> None:
    command.upgrade(alembic_config(empty_database_url), "0011")
    ledger = Ledger(empty_database_url)
    try:
        assert not ledger.at_head()
        ledger.migrate()
        assert ledger.at_head()
        with ledger.engine.connect() as connection:
            [version] = connection.execute(text("SELECT version_num FROM alembic_version"))
        assert {version[0]} == script_heads()
    finally:
        ledger.close()


@pytest.mark.parametrize("ledger_is", ["at head", "new"])
def test_migrate_does_not_import_alembic_on_a_ledger_at_head_or_new(
    tmp_path: Path, ledger_is: str
) -> None:
    # A restart finds the ledger at the head; a first start makes it from the models.
    url = f"sqlite:///{tmp_path / 'ledger.sqlite3'}"
    if ledger_is == "at head":
        ledger = Ledger(url)
        ledger.migrate()
        ledger.close()
    check = (
        "import sys\n"
        "from coordinator.ledger import Ledger\n"
        f"ledger = Ledger({url!r})\n"
        "ledger.migrate()\n"
        "assert ledger.at_head()\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('alembic', 'mako')))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-c", check], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"
