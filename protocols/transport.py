"""The one place that creates gRPC channels and servers and sets their mTLS and size options."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

from protocols.pki import PeerIdentity, PkiError, identity_from_pem

__all__ = [
    "CHUNK_BYTES",
    "MAX_MESSAGE_BYTES",
    "TlsFiles",
    "aio_server",
    "peer_certificate",
    "peer_identity",
    "secure_channel",
]

# 1 MiB chunks sit on gRPC's bulk-throughput plateau; messages stay well under the cap.
CHUNK_BYTES = 1024 * 1024
MAX_MESSAGE_BYTES = 4 * CHUNK_BYTES

_COMMON_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]
# Long-lived task streams cross hospital firewalls and NAT: keep them warm so idle
# connections are not silently dropped, and notice dead peers within ~30 s.
_CLIENT_OPTIONS: list[tuple[str, Any]] = [
    *_COMMON_OPTIONS,
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]
_SERVER_OPTIONS: list[tuple[str, Any]] = [
    *_COMMON_OPTIONS,
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
]


@dataclass(frozen=True)
class TlsFiles:
    """Paths of the consortium CA certificate and this party's certificate and key."""

    ca_certificate: Path
    certificate: Path
    private_key: Path

    def read(self) -> tuple[bytes, bytes, bytes]:
        missing = [
            p for p in (self.ca_certificate, self.certificate, self.private_key) if not p.is_file()
        ]
        if missing:
            raise PkiError("TLS file(s) not found: " + ", ".join(str(p) for p in missing))
        return (
            self.ca_certificate.read_bytes(),
            self.certificate.read_bytes(),
            self.private_key.read_bytes(),
        )


def secure_channel(target: str, tls: TlsFiles, *, server_name: str | None = None) -> grpc.Channel:
    """Opens an mTLS channel to the coordinator (the only way Baton dials anything).

    Args:
        target: host:port of the coordinator.
        tls: CA, client certificate and key.
        server_name: Override the name checked against the coordinator's certificate.
    """
    ca, cert, key = tls.read()
    credentials = grpc.ssl_channel_credentials(
        root_certificates=ca, private_key=key, certificate_chain=cert
    )
    options = list(_CLIENT_OPTIONS)
    if server_name:
        options.append(("grpc.ssl_target_name_override", server_name))
    return grpc.secure_channel(target, credentials, options=options)


def aio_server(
    tls: TlsFiles, address: str, interceptors: Sequence[grpc.aio.ServerInterceptor] = ()
) -> tuple[grpc.aio.Server, int]:
    """Creates an asyncio gRPC server that requires client certificates from the CA.

    Returns:
        The server (handlers not yet added, not started) and the bound port (port 0 picks one).
    """
    ca, cert, key = tls.read()
    credentials = grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=ca, require_client_auth=True
    )
    server = grpc.aio.server(options=_SERVER_OPTIONS, interceptors=list(interceptors))
    port = server.add_secure_port(address, credentials)
    if port == 0:
        raise OSError(f"could not bind the coordinator to {address}")
    return server, port


def peer_identity(context: grpc.ServicerContext | grpc.aio.ServicerContext) -> PeerIdentity:
    """Reads the caller's role and name from its verified client certificate."""
    certs = context.auth_context().get("x509_pem_cert")
    if not certs:
        raise PkiError("the peer presented no client certificate")
    return identity_from_pem(certs[0])


def peer_certificate(
    context: grpc.ServicerContext | grpc.aio.ServicerContext,
) -> tuple[str, str] | None:
    """The serial (hex) and subject of the caller's verified certificate, whatever its role/CN.

    Refusals record these so an admin knows which certificate to revoke, even when the
    certificate is one the CA issued with a name or role Baton does not accept.
    """
    from cryptography import x509

    certs = context.auth_context().get("x509_pem_cert")
    if not certs:
        return None
    try:
        certificate = x509.load_pem_x509_certificate(certs[0])
    except ValueError:
        return None
    return format(certificate.serial_number, "x"), certificate.subject.rfc4514_string()
