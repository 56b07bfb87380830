"""`baton admin`: dashboard accounts, API tokens and one-time login links (local, on the ledger)."""

from __future__ import annotations

import contextlib
import getpass
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from coordinator.console._options import DbUrl, StateDir, console, fail
from protocols.exit_codes import EXIT_BAD_INPUT

if TYPE_CHECKING:
    from coordinator.dashboard import AccountStore
    from coordinator.ledger import Ledger

__all__ = ["admin_app"]

admin_app = typer.Typer(
    pretty_exceptions_show_locals=False,
    help="Dashboard accounts and API tokens (run where the ledger is).",
    no_args_is_help=True,
)
Name = Annotated[str, typer.Argument(help="Account name")]


def _fail(message: str) -> typer.Exit:
    return fail(message, EXIT_BAD_INPUT)


def _open_ledger(state_dir: Path | None, database_url: str | None) -> Ledger:
    from coordinator.ledger import Ledger

    if database_url is None:
        if state_dir is None:
            raise _fail("give --state-dir or --database-url")
        state_dir.mkdir(parents=True, exist_ok=True)
        database_url = f"sqlite:///{(state_dir / 'ledger.sqlite3').resolve()}"
    ledger = Ledger(database_url)
    ledger.migrate()
    return ledger


@contextlib.contextmanager
def _accounts(state_dir: Path | None, database_url: str | None) -> Iterator[AccountStore]:
    """The ledger's account store; a refused account change fails the command, one line."""
    from coordinator.dashboard import AccountError, AccountStore

    ledger = _open_ledger(state_dir, database_url)
    try:
        yield AccountStore(ledger)
    except AccountError as exc:
        raise _fail(str(exc)) from exc
    finally:
        ledger.close()


def _actor() -> str:
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):
        return "cli"


@admin_app.command("add")
def admin_add(
    name: Name,
    role: Annotated[str, typer.Option(help="viewer, operator or admin")] = "viewer",
    password_file: Annotated[
        Path | None, typer.Option(help="Read the password from this file (first line)")
    ] = None,
    state_dir: StateDir = None,
    database_url: DbUrl = None,
) -> None:
    """Create a dashboard account (there are no default credentials)."""
    from coordinator.dashboard import AccountError, DashboardRole

    try:
        parsed = DashboardRole.parse(role)
    except AccountError as exc:
        raise _fail(str(exc)) from exc
    if password_file is not None:
        try:
            lines = password_file.read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise _fail(f"cannot read {password_file}: {exc.strerror}") from exc
        password = lines[0] if lines else ""
    else:
        password = typer.prompt("Password", hide_input=True, confirmation_prompt=True)
    with _accounts(state_dir, database_url) as accounts:
        accounts.add(name, parsed, password, by=_actor())
    console.print(f"account {name} ({parsed.label}) added")


@admin_app.command("token")
def admin_token(
    name: Name,
    days: Annotated[int | None, typer.Option(min=1, help="Expire after this many days")] = None,
    state_dir: StateDir = None,
    database_url: DbUrl = None,
) -> None:
    """Issue an API token for scripts (printed once: `Authorization: Bearer TOKEN`)."""
    with _accounts(state_dir, database_url) as accounts:
        token = accounts.issue_token(
            name, valid_for=timedelta(days=days) if days else None, by=_actor()
        )
    typer.echo(token)


@admin_app.command("login-link")
def admin_login_link(
    name: Name,
    url: Annotated[str, typer.Option(help="The dashboard's address")] = "https://localhost:8443",
    minutes: Annotated[int, typer.Option(min=1, max=24 * 60)] = 15,
    state_dir: StateDir = None,
    database_url: DbUrl = None,
) -> None:
    """Print a one-time login link for an account (valid for --minutes, usable once)."""
    with _accounts(state_dir, database_url) as accounts:
        token = accounts.issue_token(
            name, kind="login", valid_for=timedelta(minutes=minutes), by=_actor()
        )
    typer.echo(f"{url.rstrip('/')}/login/link?token={token}")


@admin_app.command("sessions")
def admin_sessions(
    name: Annotated[str | None, typer.Argument(help="Only this account's sessions")] = None,
    state_dir: StateDir = None,
    database_url: DbUrl = None,
) -> None:
    """List active dashboard sessions (key, account, login kind, client, last seen, expiry)."""
    from coordinator.dashboard import SessionStore

    ledger = _open_ledger(state_dir, database_url)
    try:
        active = SessionStore(ledger).active(name)
    finally:
        ledger.close()
    if not active:
        console.print("no active session")
        return
    for s in active:
        console.print(
            f"{s.key}  {s.account} ({s.role}, {s.via})  from {s.client}  "
            f"last seen {s.last_seen_at:%Y-%m-%d %H:%M} UTC  expires {s.expires_at:%Y-%m-%d %H:%M}"
        )


@admin_app.command("revoke")
def admin_revoke(
    name: Name,
    session: Annotated[
        str | None, typer.Option(help="Only the session with this key (`baton admin sessions`)")
    ] = None,
    state_dir: StateDir = None,
    database_url: DbUrl = None,
) -> None:
    """End an account's dashboard sessions (all, or one by its key): it must log in again."""
    from coordinator.dashboard import SessionStore

    ledger = _open_ledger(state_dir, database_url)
    try:
        ended = SessionStore(ledger).revoke(name, session, by=_actor())
    finally:
        ledger.close()
    if session is not None and not ended:
        raise _fail(f"no active session {session} of account {name!r}")
    console.print(f"{ended} session(s) of {name} ended")
