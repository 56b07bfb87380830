"""Builds and runs the coordinator: ledger, checkpoint store, run engine and gRPC server."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from typing import Any

import grpc.aio

from coordinator.engine import RunEngine
from coordinator.ledger import Ledger
from coordinator.servicer import AdminServicer, MalformedMessageGuard, SiteServicer
from coordinator.settings import CoordinatorSettings
from coordinator.store import CheckpointStore, fsync_write
from protocols.transport import aio_server
from protocols.v1 import baton_pb2_grpc as pb_grpc

__all__ = ["Coordinator", "build_server", "serve"]

logger = logging.getLogger(__name__)


class Coordinator:
    """A started coordinator; `stop()` shuts it down."""

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


async def build_server(settings: CoordinatorSettings) -> Coordinator:
    """Opens the ledger (migrating it), binds the mTLS server and starts serving.

    Returns:
        The running coordinator, with the port actually bound (settings.port may be 0).
    """
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    assert settings.database_url is not None
    ledger = Ledger(settings.database_url)
    await asyncio.to_thread(ledger.migrate)
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
    logger.info("coordinator listening on %s:%d (ledger %s)", settings.host, port, ledger.url)
    # Runs in flight before a restart continue: their sites get their tasks when they reconnect.
    await engine.dispatch_all()
    return Coordinator(server, port, engine, asyncio.create_task(engine.watch()))


async def serve(settings: CoordinatorSettings) -> None:
    """Runs until SIGINT/SIGTERM."""
    coordinator = await build_server(settings)
    dashboard = await _start_dashboard(settings, coordinator) if settings.dashboard else None
    if settings.port_file is not None:
        fsync_write(settings.port_file, str(coordinator.port).encode())
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    logger.info("coordinator shutting down")
    if dashboard is not None:
        await dashboard.stop()
    await coordinator.stop()


async def _start_dashboard(settings: CoordinatorSettings, coordinator: Coordinator) -> Any:
    """Serves the dashboard in this event loop, beside the gRPC server (imported only if on)."""
    from coordinator.dashboard import start_dashboard

    try:
        dashboard = await start_dashboard(
            coordinator.engine,
            host=settings.dashboard_host or settings.host,
            port=settings.dashboard_port,
            certificate=settings.certificate,
            private_key=settings.private_key,
            ca_certificate=settings.ca_certificate,
        )
    except BaseException:
        await coordinator.stop()
        raise
    if settings.dashboard_port_file is not None:
        fsync_write(settings.dashboard_port_file, str(dashboard.port).encode())
    return dashboard
