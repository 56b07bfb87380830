"""`coordinator serve`'s first steps, before the run engine and the servicer are imported.

Importing them (`coordinator.server`) takes about a second of CPU. After an upgrade, the ledger's
migration runs in a child process (`coordinator.ledger_apart`, about 0.8 s more; a new, empty
ledger is made from the models here instead, `Ledger.create_if_empty`): `serve` here checks the
configuration, claims the state, starts that child, and only then imports the server, so the two
run side by side instead of one after the other. Every refusal comes in the same order as
before: dashboard port, database URL, TLS files, gRPC port, state.
"""

from __future__ import annotations

import asyncio
import socket

from sqlalchemy.exc import SQLAlchemyError

from coordinator.ledger import Ledger
from coordinator.ledger_apart import MigrationChild
from coordinator.settings import CoordinatorSettings
from coordinator.startup import InstanceLock, database_error, parse_database_url
from protocols.transport import check_port_free

__all__ = ["bind_dashboard_socket", "claim_state", "open_ledger", "serve"]


async def serve(settings: CoordinatorSettings) -> None:
    """Runs the coordinator until SIGINT/SIGTERM.

    Raises:
        StartupError: One line saying what to fix (AlreadyRunning: another coordinator holds
            the state directory or database).
        PkiError: The TLS files are missing, unreadable or do not match.
        PortInUse: The port is taken.
        OSError: The dashboard's port cannot be bound.
    """
    listener: socket.socket | None = None
    lock: InstanceLock | None = None
    ledger: Ledger | None = None
    child: MigrationChild | None = None
    try:
        if settings.dashboard:  # bound first: a taken port is refused before anything starts
            listener = bind_dashboard_socket(
                settings.dashboard_host or settings.host, settings.dashboard_port
            )
        lock = await claim_state(settings)
        ledger, child = await open_ledger(settings, migrate_apart=True)
        # The heavy import, while the child (if any) migrates.
        from coordinator.server import serve_claimed
    except BaseException:  # e.g. a refusal, or Ctrl-C during the import: nothing left behind
        if child is not None:
            await child.abandon()
        if ledger is not None:
            ledger.close()
        if lock is not None:
            lock.release()
        if listener is not None:
            listener.close()
        raise
    await serve_claimed(settings, listener, lock, ledger, child)


async def claim_state(settings: CoordinatorSettings) -> InstanceLock:
    """Checks the database URL, the TLS files and the port, then claims the state directory.

    Raises:
        StartupError: One line saying what to fix (AlreadyRunning: another coordinator holds
            the state directory or database).
        PkiError: The TLS files are missing, unreadable or do not match.
        PortInUse: The port is taken.
    """
    assert settings.database_url is not None
    parse_database_url(settings.database_url)
    settings.tls.read()
    check_port_free(settings.address)
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    lock = InstanceLock(settings.state_dir, settings.database_url)
    await asyncio.to_thread(lock.acquire)
    return lock


async def open_ledger(
    settings: CoordinatorSettings, *, migrate_apart: bool
) -> tuple[Ledger, MigrationChild | None]:
    """The claimed ledger and, with `migrate_apart`, its migration child if it needs one.

    Raises:
        StartupError: The database cannot be reached (one line, the password masked).
    """
    assert settings.database_url is not None
    ledger = Ledger(settings.database_url)
    try:
        child = await MigrationChild.start(ledger) if migrate_apart else None
    except SQLAlchemyError as exc:
        ledger.close()
        raise database_error(settings.database_url, exc) from exc
    except BaseException:
        ledger.close()
        raise
    return ledger, child


def bind_dashboard_socket(host: str, port: int) -> socket.socket:
    """The dashboard's listening socket on `host:port` (0: a free port), bound and listening.

    Raises:
        OSError: The port cannot be bound; the message names the dashboard and the address.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OSError(f"dashboard cannot listen on {host}:{port}: {exc.strerror}") from exc
    sock.listen(128)
    sock.setblocking(False)
    return sock
