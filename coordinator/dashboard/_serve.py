"""Serves the dashboard over HTTPS inside the coordinator's running event loop (uvicorn)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from coordinator.dashboard._app import create_app
from coordinator.engine import RunEngine
from coordinator.launch import bind_dashboard_socket
from coordinator.study_supervisor import StudySupervisor

__all__ = ["DashboardServer", "start_dashboard"]

logger = logging.getLogger(__name__)


class _EmbeddedServer(uvicorn.Server):
    # The coordinator owns SIGINT/SIGTERM; uvicorn must neither take nor re-raise them.
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class _ClientCertificateProtocol(H11Protocol):
    """HTTP/1.1 that hands the TLS client certificate (verified against the consortium CA by the
    handshake, when one was presented) to the app as the ASGI TLS extension's
    ``client_cert_chain``: admins may log in with their `baton pki issue admin` certificate."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        ssl_object = transport.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        if not der:
            return
        pem = ssl.DER_cert_to_PEM_cert(der)
        app = self.app

        async def with_certificate(scope: Any, receive: Any, send: Any) -> None:
            scope.setdefault("extensions", {})["tls"] = {"client_cert_chain": [pem]}
            await app(scope, receive, send)

        self.app = with_certificate


class DashboardServer:
    """A running dashboard; `stop()` shuts it down."""

    def __init__(self, server: uvicorn.Server, task: asyncio.Task[None], port: int) -> None:
        self.server = server
        self.port = port
        self._task = task

    async def stop(self) -> None:
        self.server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(self._task, timeout=5)


async def start_dashboard(
    engine: RunEngine,
    *,
    host: str,
    port: int,
    certificate: Path,
    private_key: Path,
    ca_certificate: Path | None = None,
    sock: socket.socket | None = None,
    supervisor: StudySupervisor | None = None,
) -> DashboardServer:
    """Binds `host:port` (0: a free port) and serves the dashboard with the given TLS identity.

    With `sock` (from `bind_dashboard_socket`), serves on that already bound socket instead.

    With `ca_certificate`, browsers may present a client certificate of that CA (optional).
    `supervisor` starts and stops the study workers (see `create_app`).

    Raises:
        OSError: The port cannot be bound.
    """
    if sock is None:
        sock = bind_dashboard_socket(host, port)
    bound = sock.getsockname()[1]
    config = uvicorn.Config(
        create_app(engine, supervisor=supervisor),
        ssl_certfile=str(certificate),
        ssl_keyfile=str(private_key),
        ssl_ca_certs=str(ca_certificate) if ca_certificate else None,
        ssl_cert_reqs=ssl.CERT_OPTIONAL if ca_certificate else ssl.CERT_NONE,
        http=_ClientCertificateProtocol,
        log_config=None,
        access_log=False,
        lifespan="off",
        proxy_headers=False,
        server_header=False,
    )
    server = _EmbeddedServer(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        if task.done():
            task.result()  # raises what stopped it
            raise OSError("dashboard stopped while starting")
        await asyncio.sleep(0.01)
    logger.info("dashboard on https://%s:%d/", host, bound)
    return DashboardServer(server, task, bound)
