"""Builds and runs the coordinator: ledger, checkpoint store, run engine and gRPC server."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import importlib
import logging
import signal
import socket
import time
from collections.abc import Callable
from typing import Any

import grpc.aio
from sqlalchemy.exc import SQLAlchemyError

from coordinator.engine import RunEngine
from coordinator.engine.warm_up import warm_first_hand_back
from coordinator.federated import AggregateSigner
from coordinator.health import GrpcHealth, HealthEndpoint, ledger_reachable
from coordinator.heap import TransferTrim, release_free_memory
from coordinator.launch import bind_dashboard_socket, claim_state, open_ledger
from coordinator.ledger import HeadSigner, Ledger
from coordinator.ledger_apart import MigrationChild
from coordinator.servicer import AdminServicer, MalformedMessageGuard, SiteServicer
from coordinator.settings import CoordinatorSettings
from coordinator.startup import InstanceLock, database_error, masked_url
from coordinator.store import CheckpointStore, fsync_write
from protocols.interpreter import quick_thread_switches
from protocols.transport import aio_server
from protocols.v1 import baton_pb2_grpc as pb_grpc

__all__ = [
    "Coordinator",
    "DashboardOnDemand",
    "bind_dashboard_socket",
    "build_server",
    "freeze_start_up",
    "serve",
    "settle_heap",
    "settle_when_quiet",
]

logger = logging.getLogger(__name__)


class Coordinator:
    """A started coordinator; `stop()` shuts it down."""

    lock: InstanceLock | None = None  # its claim on the state directory and database

    def __init__(
        self,
        server: grpc.aio.Server,
        port: int,
        engine: RunEngine,
        watchdog: asyncio.Task[None],
        health: GrpcHealth | None = None,
    ) -> None:
        self.server = server
        self.port = port
        self.engine = engine
        self._watchdog = watchdog
        self.health = health or GrpcHealth()
        self.accepting = True
        self.http: HealthEndpoint | None = None
        self.metrics_port: int | None = None

    async def readiness(self) -> str | None:
        """None when ready: accepting calls and the ledger answers; else the reason."""
        if not self.accepting:
            return "shutting down"
        try:
            await asyncio.to_thread(ledger_reachable, self.engine.ledger)
        except Exception as exc:  # any driver error means the same: not ready
            return f"ledger unreachable ({type(exc).__name__})"
        return None

    async def serve_http(self, host: str, port: int) -> int:
        """Starts /healthz, /readyz and /metrics on host:port; returns the bound port."""
        self.http = HealthEndpoint(self.engine.metrics, self.readiness)
        self.metrics_port = await self.http.start(host, port)
        return self.metrics_port

    async def stop(self, grace: float = 2.0) -> None:
        """Stops accepting calls, lets calls in flight finish for `grace` s, then closes.

        Every ledger write is one transaction made without yielding to the loop, so a call
        cancelled after the grace period never leaves half a commit; the engine's lock is
        taken last so that a commit in progress completes before the ledger closes.
        """
        self.accepting = False
        await self.health.shutting_down()
        self._watchdog.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._watchdog
        await self.server.stop(grace)
        await self.engine.quiesce()
        if self.http is not None:
            await self.http.stop()
        self.engine.ledger.close()
        if self.lock is not None:
            self.lock.release()


async def build_server(
    settings: CoordinatorSettings, *, migrate_apart: bool = False
) -> Coordinator:
    """Checks the configuration, claims the state, opens the ledger, binds and starts serving.

    With `migrate_apart`, a ledger not at the newest revision is migrated by a child process
    (`coordinator.ledger_apart`: Alembic is then never imported here), as `serve` does.

    Returns:
        The running coordinator, with the port actually bound (settings.port may be 0).

    Raises:
        StartupError: One line saying what to fix (AlreadyRunning: another coordinator holds
            the state directory or database).
        PkiError: The TLS files are missing, unreadable or do not match.
        PortInUse: The port is taken.
    """
    lock = await claim_state(settings)
    try:
        ledger, child = await open_ledger(settings, migrate_apart=migrate_apart)
        coordinator = await build_claimed(settings, ledger, child)
    except BaseException:
        lock.release()
        raise
    coordinator.lock = lock
    return coordinator


async def build_claimed(
    settings: CoordinatorSettings, ledger: Ledger, child: MigrationChild | None
) -> Coordinator:
    """`build_server` once the state is claimed and the ledger opened (its migration started).

    Closes the ledger (and stops the child) if it cannot start.
    """
    assert settings.database_url is not None
    try:
        if child is not None:
            await child.finish()
        await asyncio.to_thread(ledger.migrate)  # at the head after the child: nothing to do
    except SQLAlchemyError as exc:
        ledger.close()
        raise database_error(settings.database_url, exc) from exc
    except BaseException:
        if child is not None:
            await child.abandon()
        ledger.close()
        raise
    engine = RunEngine(
        ledger,
        CheckpointStore(settings.checkpoint_dir, cache_bytes=settings.store_cache_bytes),
        settings.runs_dir,
        ca_pem=settings.ca_certificate.read_bytes(),
        max_checkpoint_bytes=settings.max_checkpoint_bytes,
        statistics_min_count=settings.statistics_min_count,
        statistics_expiry_seconds=settings.statistics_expiry_seconds,
        aggregate_signer=AggregateSigner(
            settings.private_key.read_bytes(), settings.certificate.read_bytes()
        ),
    )
    # What a crash of the last coordinator left half-written (before this one serves anything).
    await asyncio.to_thread(engine.intake.sweep_at_start, engine.runs.all(), time.time())
    signer = HeadSigner(
        settings.heads_path,
        private_key_pem=settings.private_key.read_bytes(),
        certificate_pem=settings.certificate.read_bytes(),
        every=settings.ledger_head_every,
    )
    signer.listeners.append(engine.publish_head)
    ledger.head_observers.append(signer.observe)
    signer.sign_current(ledger)
    # Free heap pages go back to the kernel after large transfers (coordinator/heap.py).
    guard = MalformedMessageGuard(ledger, engine.metrics, TransferTrim())
    server, port = aio_server(settings.tls, settings.address, interceptors=[guard])
    pb_grpc.add_SiteServiceServicer_to_server(
        SiteServicer(engine, settings.heartbeat_interval_ms, settings.ca_dir), server
    )
    pb_grpc.add_AdminServiceServicer_to_server(AdminServicer(engine), server)
    health = GrpcHealth()
    health.add_to(server)
    await server.start()
    await health.serving()
    logger.info(
        "coordinator listening on %s:%d (ledger %s)", settings.host, port, masked_url(ledger.url)
    )
    # Runs in flight before a restart continue: their sites get their tasks when they reconnect.
    await engine.dispatch_all()
    coordinator = Coordinator(server, port, engine, asyncio.create_task(engine.watch()), health)
    if settings.metrics_port is not None:
        await coordinator.serve_http(settings.metrics_host, settings.metrics_port)
    return coordinator


async def serve(settings: CoordinatorSettings) -> None:
    """Runs until SIGINT/SIGTERM (`coordinator.launch.serve` with this module imported)."""
    from coordinator.launch import serve as launch

    await launch(settings)


async def serve_claimed(
    settings: CoordinatorSettings,
    listener: socket.socket | None,
    lock: InstanceLock,
    ledger: Ledger,
    child: MigrationChild | None,
) -> None:
    """Builds the coordinator on what `coordinator.launch.serve` claimed, runs until a signal.

    The gRPC port file is written as soon as sites can connect, then the dashboard's: its
    socket is bound at the start and the dashboard (FastAPI, a third of the start-up imports)
    starts on its first connection (`DashboardOnDemand`).
    """
    try:
        coordinator = await build_claimed(settings, ledger, child)
    except BaseException:
        lock.release()
        if listener is not None:
            listener.close()
        raise
    coordinator.lock = lock
    if settings.metrics_port_file is not None and coordinator.metrics_port is not None:
        fsync_write(settings.metrics_port_file, str(coordinator.metrics_port).encode())
    if settings.port_file is not None:
        fsync_write(settings.port_file, str(coordinator.port).encode())
    stop = asyncio.Event()
    dashboard = None
    if listener is not None:
        dashboard = DashboardOnDemand(settings, coordinator, listener)
        dashboard.arm()
    freeze_start_up()
    quick_thread_switches()  # a hand back's commit and the loop share the interpreter (see there)
    # The metric families are made once the first hellos are over (or by the first update),
    # and the first hand back's first-call costs taken ahead (bundle checks, worker threads,
    # the commit's SQL compiled: `coordinator.engine.warm_up`).
    engine = coordinator.engine
    loop = asyncio.get_running_loop()
    warm = functools.partial(warm_first_hand_back, engine.ledger, loop)
    settling = asyncio.create_task(
        settle_when_quiet(lambda: len(engine.sessions), engine.metrics.build, warm)
    )
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    settling.cancel()
    logger.info("coordinator shutting down (grace %.0f s)", settings.shutdown_grace)
    if dashboard is not None:
        await dashboard.stop()
    await coordinator.stop(settings.shutdown_grace)
    logger.info("coordinator stopped")


class DashboardOnDemand:
    """The dashboard, started on its first connection: FastAPI, uvicorn and the pages hold
    ~17 MiB that a coordinator nobody browses would keep for nothing (benchmarks/transfer.py).

    Its socket is bound and listening from the start and its port file written at once: the
    first visitor's connection waits in the socket's backlog while the dashboard starts (about
    a second), then is served. Study workers an earlier coordinator left are adopted at start.
    """

    def __init__(
        self,
        settings: CoordinatorSettings,
        coordinator: Coordinator,
        listener: socket.socket,
    ) -> None:
        self.settings = settings
        self.coordinator = coordinator
        self.listener = listener
        self._supervisor = _study_supervisor(settings, coordinator)
        self._starting: asyncio.Task[Any] | None = None
        self._armed = False
        self.server: Any = None  # the running dashboard, once started

    def arm(self) -> None:
        """Writes the port file and waits for the first connection."""
        if self.settings.dashboard_port_file is not None:
            port = self.listener.getsockname()[1]
            fsync_write(self.settings.dashboard_port_file, str(port).encode())
        asyncio.get_running_loop().add_reader(self.listener.fileno(), self._connection)
        self._armed = True

    def _connection(self) -> None:
        self._disarm()
        self._starting = asyncio.create_task(self._start())

    def _disarm(self) -> None:
        if self._armed:
            asyncio.get_running_loop().remove_reader(self.listener.fileno())
            self._armed = False

    async def _start(self) -> None:
        try:
            self.server = await _start_dashboard(
                self.settings, self.coordinator, self.listener, self._supervisor
            )
        except Exception as exc:
            # Runs in flight go on: a visitor's first page must not stop the sites' work. The
            # dashboard's port is closed, so later visitors are refused, not left hanging.
            logger.error(
                "dashboard failed to start: %s; the coordinator goes on without it "
                "(fix the cause and restart the coordinator to get it back)",
                exc,
            )

    async def stop(self) -> None:
        self._disarm()
        if self._starting is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._starting
        if self.server is not None:
            await self.server.stop()
        elif self.listener.fileno() != -1:
            self.listener.close()


def _study_supervisor(settings: CoordinatorSettings, coordinator: Coordinator) -> Any:
    """The dashboard's study workers: `baton study start` with the configured admin identity."""
    from coordinator.study_supervisor import StudySupervisor, StudyWorkerCredentials

    credentials = None
    if settings.study_admin_certificate is not None and settings.study_admin_key is not None:
        host = "localhost" if settings.host in ("0.0.0.0", "::", "") else settings.host
        credentials = StudyWorkerCredentials(
            coordinator=f"{host}:{coordinator.port}",
            ca_certificate=settings.ca_certificate.resolve(),
            certificate=settings.study_admin_certificate.resolve(),
            private_key=settings.study_admin_key.resolve(),
        )
    assert settings.database_url is not None
    supervisor = StudySupervisor(
        coordinator.engine.ledger,
        database_url=settings.database_url,
        credentials=credentials,
        log_dir=settings.state_dir / "study-workers",
    )
    for worker in supervisor.adopt_orphans():
        logger.warning("study worker %s was started by an earlier coordinator: orphaned", worker)
    return supervisor


async def _start_dashboard(
    settings: CoordinatorSettings,
    coordinator: Coordinator,
    listener: socket.socket,
    supervisor: Any,
) -> Any:
    """Serves the dashboard in this event loop, beside the gRPC server (imported only if on).

    The import runs in a worker thread so that the loop keeps answering sites meanwhile.
    """
    await asyncio.to_thread(importlib.import_module, "coordinator.dashboard")
    from coordinator.dashboard import start_dashboard

    try:
        dashboard = await start_dashboard(
            coordinator.engine,
            host=settings.dashboard_host or settings.host,
            port=settings.dashboard_port,
            certificate=settings.certificate,
            private_key=settings.private_key,
            ca_certificate=settings.ca_certificate,
            sock=listener,
            supervisor=supervisor,
        )
    except BaseException:
        listener.close()
        raise
    return dashboard


# When the heap settles (`settle_when_quiet`): once no site has connected for
# SETTLE_QUIET_SECONDS after one did, or SETTLE_LATEST_SECONDS after ready.
SETTLE_QUIET_SECONDS = 0.5
SETTLE_LATEST_SECONDS = 5.0


def freeze_start_up() -> None:
    """At ready: moves everything start-up made out of the collector's passes without walking
    it (`gc.freeze` splices lists), for the process's lifetime, and turns the collector on.

    Start-up's garbage cycles are frozen with the rest and never freed: about 820 objects, 0.2
    MiB (functions, classes and their descriptors that imports made and dropped). Freeing them
    takes a pass over everything start-up made, ~150,000 objects: 86 ms on an idle host, 133 ms
    with 500 sites connected (benchmarks/scale.py), with every call waiting. What the first
    sites' connections and the warm-up make is collected later (`settle_when_quiet`)."""
    gc.freeze()
    gc.enable()


async def settle_when_quiet(
    connected: Callable[[], int],
    deferred: Callable[[], None] = lambda: None,
    warm: Callable[[], None] = lambda: None,
) -> None:
    """`settle_heap` (what `freeze_start_up` froze stays frozen) once the first sites' hellos
    are over: ``connected()`` (sites connected) has changed and then stayed the same for
    SETTLE_QUIET_SECONDS, or SETTLE_LATEST_SECONDS have passed (no site came).

    ``deferred()`` runs first: start-up's work that waited until after ready (the metric
    families, `CoordinatorMetrics.build`), so that what it makes is frozen with the rest. Then
    ``warm()``, on a worker thread (the loop keeps serving): first-call costs taken off the
    first hand back (`coordinator.engine.warm_up`), what they import frozen too.
    """
    loop = asyncio.get_running_loop()
    began = loop.time()
    count, changed_at = connected(), None
    while True:
        await asyncio.sleep(0.1)
        now, latest = loop.time(), connected()
        if latest != count:
            count, changed_at = latest, now
        if now - began >= SETTLE_LATEST_SECONDS or (
            changed_at is not None and now - changed_at >= SETTLE_QUIET_SECONDS
        ):
            break
    deferred()
    await asyncio.to_thread(warm)
    settle_heap()


def settle_heap() -> None:
    """Moves every object alive after start-up out of the garbage collector's full passes.

    Modules, the ORM's metadata, TLS and protobuf descriptors live as long as the process; left
    in the oldest generation, each full collection walks them all again (200-500 ms measured
    under load with 500 sites connected), and every call in flight waits. `coordinator serve`
    starts with the collector off (its passes over start-up's allocations find nothing) and
    freezes what start-up made at ready (`freeze_start_up`). Here the garbage made since (not
    frozen) is collected once, in a pass over what is not frozen only (3 ms with no site
    connected, 43 ms with 500 just connected), then the survivors are frozen too and the
    collector is on again. The heap pages start-up freed go back to the kernel.
    """
    gc.collect()  # what was made since ready, in cycles: a pass over what is not frozen only
    gc.freeze()
    gc.enable()
    release_free_memory()  # what start-up freed (a migration's, the ledger checks')
