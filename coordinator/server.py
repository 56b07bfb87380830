"""Builds and runs the coordinator: ledger, checkpoint store, run engine and gRPC server."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal

import grpc.aio
from sqlalchemy.exc import SQLAlchemyError

from coordinator.engine import RunEngine
from coordinator.ledger import Ledger
from coordinator.servicer import AdminServicer, MalformedMessageGuard, SiteServicer
from coordinator.settings import CoordinatorSettings
from coordinator.startup import InstanceLock, database_error, masked_url, parse_database_url
from coordinator.store import CheckpointStore, fsync_write
from protocols.transport import aio_server, check_port_free
from protocols.v1 import baton_pb2_grpc as pb_grpc

__all__ = ["Coordinator", "build_server", "serve"]

logger = logging.getLogger(__name__)


class Coordinator:
    """A started coordinator; `stop()` shuts it down."""

    lock: InstanceLock | None = None  # its claim on the state directory and database

    def __init__(
        self, server: grpc.aio.Server, port: int, engine: RunEngine, watchdog: asyncio.Task[None]
    ) -> None:
        self.server = server
        self.port = port
        self.engine = engine
        self._watchdog = watchdog

    async def stop(self, grace: float = 2.0) -> None:
        self._watchdog.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._watchdog
        await self.server.stop(grace)
        self.engine.ledger.close()
        if self.lock is not None:
            self.lock.release()


async def build_server(settings: CoordinatorSettings) -> Coordinator:
    """Checks the configuration, claims the state, opens the ledger, binds and starts serving.

    Returns:
        The running coordinator, with the port actually bound (settings.port may be 0).

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
    try:
        coordinator = await _build_server(settings)
    except BaseException:
        lock.release()
        raise
    coordinator.lock = lock
    return coordinator


async def _build_server(settings: CoordinatorSettings) -> Coordinator:
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    assert settings.database_url is not None
    ledger = Ledger(settings.database_url)
    try:
        await asyncio.to_thread(ledger.migrate)
    except SQLAlchemyError as exc:
        ledger.close()
        raise database_error(settings.database_url, exc) from exc
    engine = RunEngine(
        ledger,
        CheckpointStore(settings.checkpoint_dir),
        settings.runs_dir,
        ca_pem=settings.ca_certificate.read_bytes(),
        max_checkpoint_bytes=settings.max_checkpoint_bytes,
        statistics_min_count=settings.statistics_min_count,
    )
    server, port = aio_server(
        settings.tls, settings.address, interceptors=[MalformedMessageGuard(ledger)]
    )
    pb_grpc.add_SiteServiceServicer_to_server(
        SiteServicer(engine, settings.heartbeat_interval_ms, settings.ca_dir), server
    )
    pb_grpc.add_AdminServiceServicer_to_server(AdminServicer(engine), server)
    await server.start()
    logger.info(
        "coordinator listening on %s:%d (ledger %s)", settings.host, port, masked_url(ledger.url)
    )
    # Runs in flight before a restart continue: their sites get their tasks when they reconnect.
    await engine.dispatch_all()
    return Coordinator(server, port, engine, asyncio.create_task(engine.watch()))


async def serve(settings: CoordinatorSettings) -> None:
    """Runs until SIGINT/SIGTERM."""
    coordinator = await build_server(settings)
    if settings.port_file is not None:
        fsync_write(settings.port_file, str(coordinator.port).encode())
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    logger.info("coordinator shutting down")
    await coordinator.stop()
