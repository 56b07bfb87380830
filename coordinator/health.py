"""Liveness, readiness and metrics over plain HTTP, and the gRPC health service's statuses.

The HTTP endpoint (`/healthz`, `/readyz`, `/metrics`) serves on its own port from the
coordinator's event loop, without TLS: it carries no data, and probes (kubelet, Prometheus,
load balancers) cannot present the consortium's client certificates that the gRPC port demands.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from sqlalchemy import text

from coordinator.ledger import Ledger
from coordinator.metrics import CoordinatorMetrics
from protocols.v1 import baton_pb2

__all__ = ["GRPC_SERVICES", "GrpcHealth", "HealthEndpoint", "ledger_reachable"]

logger = logging.getLogger(__name__)

GRPC_SERVICES = tuple(
    baton_pb2.DESCRIPTOR.services_by_name[name].full_name
    for name in ("SiteService", "AdminService")
)
_MAX_REQUEST_BYTES = 8192
_READY_TIMEOUT_SECONDS = 5.0


def ledger_reachable(ledger: Ledger) -> bool:
    """Runs `SELECT 1` on the ledger database."""
    with ledger.engine.connect() as connection:
        connection.execute(text("SELECT 1"))
    return True


class GrpcHealth:
    """The standard grpc.health.v1 service on the coordinator's gRPC server."""

    def __init__(self) -> None:
        self.servicer = health.aio.HealthServicer()

    def add_to(self, server: object) -> None:
        health_pb2_grpc.add_HealthServicer_to_server(self.servicer, server)

    async def serving(self) -> None:
        for service in ("", *GRPC_SERVICES):
            await self.servicer.set(service, health_pb2.HealthCheckResponse.SERVING)

    async def shutting_down(self) -> None:
        await self.servicer.enter_graceful_shutdown()


Readiness = Callable[[], Awaitable[str | None]]


class HealthEndpoint:
    """A minimal HTTP/1.1 server: GET /healthz, /readyz and /metrics, one request per connection.

    Args:
        metrics: The registry `/metrics` exposes.
        readiness: Returns None when ready, else why not (sent with a 503).
    """

    def __init__(self, metrics: CoordinatorMetrics, readiness: Readiness) -> None:
        self.metrics = metrics
        self.readiness = readiness
        self._server: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> int:
        """Binds and serves; returns the bound port (port 0 picks one)."""
        self._server = await asyncio.start_server(self._handle, host, port)
        bound: int = self._server.sockets[0].getsockname()[1]
        logger.info("health and metrics on http://%s:%d (/healthz /readyz /metrics)", host, bound)
        return bound

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)

    async def _respond(self, path: str) -> tuple[int, str, bytes]:
        if path == "/healthz":
            return 200, "text/plain; charset=utf-8", b"ok\n"
        if path == "/readyz":
            try:
                problem = await asyncio.wait_for(self.readiness(), _READY_TIMEOUT_SECONDS)
            except TimeoutError:
                problem = "readiness check timed out"
            if problem is None:
                return 200, "text/plain; charset=utf-8", b"ready\n"
            return 503, "text/plain; charset=utf-8", f"not ready: {problem}\n".encode()
        if path == "/metrics":
            return 200, "text/plain; version=0.0.4; charset=utf-8", self.metrics.exposition()
        return 404, "text/plain; charset=utf-8", b"not found\n"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            method, path, *_ = head[:_MAX_REQUEST_BYTES].decode("latin-1").split(" ", 2)
            if method not in ("GET", "HEAD"):
                status, kind, body = 405, "text/plain; charset=utf-8", b"GET only\n"
            else:
                status, kind, body = await self._respond(path.split("?", 1)[0])
            reason = {200: "OK", 404: "Not Found", 405: "Method Not Allowed"}.get(
                status, "Service Unavailable"
            )
            writer.write(
                f"HTTP/1.1 {status} {reason}\r\nContent-Type: {kind}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                + (body if method != "HEAD" else b"")
            )
            await writer.drain()
        except (TimeoutError, ValueError, ConnectionError, asyncio.IncompleteReadError):
            pass  # a probe that hung up or sent garbage gets nothing
        finally:
            writer.close()
