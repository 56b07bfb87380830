"""What the `baton` commands share: the consoles, one-line failures, and the options naming the
coordinator, the admin identity, the ledger and the study storage (defined once here).

`coordinator serve` imports this module for its failures: rich (the consoles) and the admin client
are imported when first used, not on its way to ready.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, TypeVar

import click
import grpc
import typer

from protocols.exit_codes import EXIT_BAD_INPUT, EXIT_UNREACHABLE
from protocols.pki import PkiError

if TYPE_CHECKING:
    from rich.console import Console

    from coordinator.console.admin import AdminClient

__all__ = [
    "DEFAULT_STORAGE_FILE",
    "AdminCa",
    "AdminCert",
    "AdminKey",
    "Coord",
    "DbUrl",
    "LogFormat",
    "StateDir",
    "StudyStorage",
    "admin_call",
    "admin_client",
    "console",
    "err",
    "fail",
    "resolve_storage",
    "rpc_error",
]

T = TypeVar("T")

console: Console  # standard output: made by __getattr__ when first used
err: Console  # standard error, likewise


def __getattr__(name: str) -> Console:
    """`console` (standard output) and `err` (standard error), each made once, on first use."""
    if name not in ("console", "err"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    made: Console | None = globals().get(name)
    if made is None:
        from rich.console import Console

        made = globals()[name] = Console(stderr=name == "err")
    return made


Coord = Annotated[str, typer.Option("--coordinator", envvar="BATON_COORDINATOR", help="host:port")]
AdminCa = Annotated[Path, typer.Option("--ca", envvar="BATON_ADMIN_CA", help="CA certificate")]
AdminCert = Annotated[Path, typer.Option("--cert", envvar="BATON_ADMIN_CERT", help="Admin cert")]
AdminKey = Annotated[Path, typer.Option("--key", envvar="BATON_ADMIN_KEY", help="Admin key")]
StateDir = Annotated[Path | None, typer.Option(help="Coordinator state directory")]
DbUrl = Annotated[str | None, typer.Option(envvar="BATON_DATABASE_URL", help="SQLAlchemy URL")]
LogFormat = Annotated[
    str | None,
    typer.Option(
        "--log-format",
        envvar="BATON_LOG_FORMAT",
        click_type=click.Choice(["text", "json"]),
        help="text, or json: one JSON object per line with run, hop and site fields",
    ),
]

DEFAULT_STORAGE_FILE = "baton-studies.sqlite3"

StudyStorage = Annotated[
    str | None,
    typer.Option(
        "--storage",
        envvar="BATON_STUDY_STORAGE",
        help=f"Optuna storage URL (default: sqlite file {DEFAULT_STORAGE_FILE} in the current "
        "directory)",
    ),
]


def resolve_storage(storage: str | None) -> str:
    """The study storage URL: `storage`, or the default SQLite file in the current directory."""
    if storage:
        return storage
    return f"sqlite:///{Path(DEFAULT_STORAGE_FILE).resolve()}"


def fail(message: str, code: int) -> typer.Exit:
    """Prints `message` as one error line on stderr; raise the returned exit with `from exc`."""
    from rich.markup import escape

    # One line whatever the terminal width; the message is text, never rich markup.
    __getattr__("err").print(f"[red]error:[/red] {escape(message)}", soft_wrap=True)
    return typer.Exit(code)


def admin_client(coordinator: str, ca: Path, cert: Path, key: Path) -> AdminClient:
    """An admin connection to the coordinator; unreadable certificate files are bad input."""
    from coordinator.console.admin import AdminClient

    try:
        return AdminClient.from_files(coordinator, ca, cert, key)
    except PkiError as exc:
        raise fail(str(exc), EXIT_BAD_INPUT) from exc


def rpc_error(exc: grpc.RpcError) -> typer.Exit:
    """A failed admin call as one line: exit 3 when the coordinator is unreachable, else 2."""
    code = EXIT_UNREACHABLE if exc.code() == grpc.StatusCode.UNAVAILABLE else EXIT_BAD_INPUT
    return fail(f"{exc.code().name}: {exc.details()}", code)


def admin_call(call: Callable[[], T]) -> T:
    """`call()`, with a failed RPC turned into `rpc_error`'s exit."""
    try:
        return call()
    except grpc.RpcError as exc:
        raise rpc_error(exc) from exc
