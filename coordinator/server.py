"""Builds and runs the coordinator: ledger, checkpoint store, run engine and gRPC server."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal

import grpc.aio
from sqlalchemy import make_url

from coordinator.engine import RunEngine
from coordinator.ledger import HeadSigner, Ledger
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
        statistics_expiry_seconds=settings.statistics_expiry_seconds,
    )
    signer = HeadSigner(
        settings.heads_path,
        private_key_pem=settings.private_key.read_bytes(),
        certificate_pem=settings.certificate.read_bytes(),
        every=settings.ledger_head_every,
    )
    signer.listeners.append(engine.publish_head)
    ledger.head_observers.append(signer.observe)
    signer.sign_current(ledger)
    server, port = aio_server(
        settings.tls, settings.address, interceptors=[MalformedMessageGuard(ledger)]
    )
    pb_grpc.add_SiteServiceServicer_to_server(
        SiteServicer(engine, settings.heartbeat_interval_ms, settings.ca_dir), server
    )
    pb_grpc.add_AdminServiceServicer_to_server(AdminServicer(engine), server)
    await server.start()
    shown_url = make_url(ledger.url).render_as_string(hide_password=True)
    logger.info("coordinator listening on %s:%d (ledger %s)", settings.host, port, shown_url)
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
