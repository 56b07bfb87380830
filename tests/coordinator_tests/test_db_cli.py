"""`baton db upgrade|current|history` and the plain `alembic` command from the repository root."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from alembic.script import ScriptDirectory
from typer.testing import CliRunner

from coordinator.console.cli import app
from coordinator.ledger import Ledger

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[2]
ALEMBIC = Path(sys.executable).with_name("alembic")
HEAD = ScriptDirectory(str(ROOT / "coordinator" / "migrations")).get_current_head()


def test_db_upgrade_then_current_reports_head_and_history_lists_every_revision(
    tmp_path: Path,
) -> None:
    state = tmp_path / "state"
    empty = runner.invoke(app, ["db", "current", "--state-dir", str(state)])
    assert empty.exit_code == 2 and "no ledger at" in empty.output
    upgraded = runner.invoke(app, ["db", "upgrade", "--state-dir", str(state)])
    assert upgraded.exit_code == 0, upgraded.output
    assert f"ledger schema at {HEAD} (head)" in upgraded.output
    current = runner.invoke(app, ["db", "current", "--state-dir", str(state)])
    assert current.output.strip() == f"{HEAD} (head)"
    history = runner.invoke(app, ["db", "history"]).output
    assert [line.split(",")[0] for line in history.splitlines()][-1] == "<base> -> 0001"
    assert "(head)" in history.splitlines()[0]
    ledger = Ledger(f"sqlite:///{state / 'ledger.sqlite3'}")
    try:
        ledger.migrate()  # nothing left to do, and the schema is the one the code expects
        assert ledger.verify_chain() is None and ledger.sites() == []
    finally:
        ledger.close()


def test_db_upgrade_sql_prints_migrations_without_connecting() -> None:
    unreachable = "postgresql+psycopg://baton:secret@db.invalid:5432/baton"
    result = runner.invoke(app, ["db", "upgrade", "--sql", "--database-url", unreachable])
    assert result.exit_code == 0, result.output
    assert "CREATE TABLE runs" in result.output and "CREATE TABLE events" in result.output
    assert f"UPDATE alembic_version SET version_num='{HEAD}'" in result.output


def test_db_current_of_an_unreachable_database_is_one_line_without_the_password() -> None:
    result = runner.invoke(
        app, ["db", "current", "--database-url", "postgresql+psycopg://baton:secret@127.0.0.1:1/b"]
    )
    assert result.exit_code == 3
    assert "secret" not in result.output and "baton:***@127.0.0.1:1/b" in result.output
    assert "Traceback" not in result.output


def test_plain_alembic_works_from_the_repository_root(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'ledger.sqlite3'}"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("BATON_DATABASE_URL", None)

    def alembic(*args: str, **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(ALEMBIC), *args], cwd=ROOT, env={**env, **extra},
                              capture_output=True, text=True, check=False)  # fmt: skip

    assert alembic("-x", f"url={url}", "upgrade", "head").returncode == 0
    current = alembic("current", BATON_DATABASE_URL=url)
    assert current.returncode == 0, current.stderr
    assert current.stdout.strip() == f"{HEAD} (head)"
    missing = alembic("current")
    assert missing.returncode != 0
    assert "give -x url=DIALECT://... or set BATON_DATABASE_URL" in missing.stderr
