"""`baton db` (ledger schema migrations), `baton backup` and `baton restore`."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, TypeVar

import typer

from coordinator.console._options import DbUrl, StateDir, console, fail
from protocols.exit_codes import EXIT_BAD_INPUT, EXIT_UNREACHABLE

T = TypeVar("T")

__all__ = ["backup_command", "db_app", "restore_command"]

db_app = typer.Typer(
    pretty_exceptions_show_locals=False,
    help="Ledger schema migrations (Alembic).",
    no_args_is_help=True,
)


def _database_url(state_dir: Path | None, database_url: str | None, *, create: bool) -> str:
    if database_url is not None:
        return database_url
    if state_dir is None:
        raise fail("give --state-dir or --database-url (or BATON_DATABASE_URL)", EXIT_BAD_INPUT)
    if create:
        state_dir.mkdir(parents=True, exist_ok=True)
    elif not (state_dir / "ledger.sqlite3").is_file():
        raise fail(f"no ledger at {state_dir / 'ledger.sqlite3'}", EXIT_BAD_INPUT)
    return f"sqlite:///{(state_dir / 'ledger.sqlite3').resolve()}"


def _db_call(url: str, call: Callable[[], T]) -> T:
    """Runs an Alembic command; database errors become one line without the password."""
    from alembic.util import CommandError
    from sqlalchemy import make_url
    from sqlalchemy.exc import ArgumentError, SQLAlchemyError

    try:
        shown = make_url(url).render_as_string(hide_password=True)
    except ArgumentError as exc:
        raise fail(f"not a database URL: {exc}", EXIT_BAD_INPUT) from exc
    try:
        return call()
    except CommandError as exc:
        raise fail(f"{shown}: {exc}", EXIT_BAD_INPUT) from exc
    except SQLAlchemyError as exc:
        reason = str(getattr(exc, "orig", None) or exc).splitlines()[0]
        raise fail(f"ledger database {shown}: {reason}", EXIT_UNREACHABLE) from exc


@db_app.command("upgrade")
def db_upgrade(
    revision: Annotated[str, typer.Argument(help="Target revision")] = "head",
    state_dir: StateDir = None,
    database_url: DbUrl = None,
    sql: Annotated[
        bool, typer.Option("--sql", help="Print the migration SQL for a DBA; change nothing")
    ] = False,
) -> None:
    """Migrate the ledger schema (the coordinator also does this when it starts)."""
    from coordinator.console import db

    url = _database_url(state_dir, database_url, create=not sql)
    output = _db_call(url, lambda: db.upgrade(url, revision, sql=sql))
    if sql:
        sys.stdout.write(output)
        return
    console.print(f"ledger schema at {_db_call(url, lambda: db.current(url)) or 'base'}")


@db_app.command("current")
def db_current(state_dir: StateDir = None, database_url: DbUrl = None) -> None:
    """Print the ledger schema's revision ('(head)' when up to date)."""
    from coordinator.console import db

    url = _database_url(state_dir, database_url, create=False)
    console.print(_db_call(url, lambda: db.current(url)) or "base (empty database)")


@db_app.command("history")
def db_history() -> None:
    """List the ledger schema's revisions, newest first."""
    from coordinator.console import db

    sys.stdout.write(db.history())


def backup_command(
    out: Annotated[Path, typer.Option(help="New, empty folder for the backup")],
    state_dir: Annotated[Path, typer.Option(help="Coordinator state directory")] = Path(
        "baton-state"
    ),
    database_url: DbUrl = None,
    store_only: Annotated[
        bool, typer.Option(help="PostgreSQL: copy the checkpoint store only (pg_dump the ledger)")
    ] = False,
) -> None:
    """Back up the ledger (SQLite online backup) and the checkpoint store, while serving."""
    from coordinator.console.backup import BackupError, backup

    url = database_url or f"sqlite:///{(state_dir / 'ledger.sqlite3').resolve()}"
    try:
        summary = backup(state_dir, url, out, store_only=store_only)
    except BackupError as exc:
        raise fail(str(exc), EXIT_BAD_INPUT) from exc
    what = "ledger" if summary.ledger_copied else "checkpoint store only (ledger: pg_dump)"
    console.print(f"backup in {out}: {what}, {summary.events} events (head {summary.head[:16]}), "
                  f"{summary.checkpoints} checkpoints")  # fmt: skip


def restore_command(
    backup_dir: Annotated[Path, typer.Argument(help="A folder made by `baton backup`")],
    state_dir: Annotated[Path, typer.Option(help="New coordinator state directory")] = Path(
        "baton-state"
    ),
) -> None:
    """Restore a backup into an empty state directory (verified before anything is written)."""
    from coordinator.console.backup import BackupError, restore

    try:
        summary = restore(backup_dir, state_dir)
    except BackupError as exc:
        raise fail(str(exc), EXIT_BAD_INPUT) from exc
    console.print(f"restored into {state_dir}: {summary.events} events (head "
                  f"{summary.head[:16]}), {summary.checkpoints} checkpoints; sites that saw a "
                  "later ledger event will refuse this coordinator")  # fmt: skip
