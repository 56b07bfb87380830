"""The one place that creates gRPC channels and servers and sets their mTLS and size options."""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping, Sequence
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
    "peer_identity",
    "proxy_for",
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


def _split_target(target: str) -> tuple[str, str]:
    """host and port of a `host:port` target (IPv6 hosts in brackets)."""
    target = target.removeprefix("dns:///").removeprefix("ipv4:").removeprefix("ipv6:")
    if target.startswith("["):
        host, _, rest = target[1:].partition("]")
        return host, rest.removeprefix(":")
    host, _, port = target.rpartition(":")
    return (host, port) if host else (port, "")


def _bypasses(host: str, port: str, entry: str) -> bool:
    """Whether one `no_proxy` entry (name, .suffix, *, IP, CIDR, optionally :port) covers host."""
    entry = entry.strip().lower()
    if not entry:
        return False
    if entry == "*":
        return True
    if not entry.startswith("[") and entry.count(":") == 1:
        entry, _, entry_port = entry.partition(":")
        if entry_port != port:
            return False
    entry = entry.strip("[]")
    try:
        network = ipaddress.ip_network(entry, strict=False)
    except ValueError:
        name = entry.lstrip("*").lstrip(".")
        return host == name or host.endswith("." + name)
    try:
        return ipaddress.ip_address(host) in network
    except ValueError:
        return False


def proxy_for(target: str, environ: Mapping[str, str] | None = None) -> str | None:
    """The HTTP CONNECT proxy a channel to `target` goes through, or None to dial directly.

    Follows the conventions curl and gRPC share: `grpc_proxy`, then `https_proxy`, then
    `http_proxy` (either case) name the proxy; `no_grpc_proxy` or `no_proxy` list hosts
    (names, `.domain` suffixes, IPs, CIDR ranges, optional `:port`, or `*`) dialled directly.
    """
    env = os.environ if environ is None else environ

    def first(*names: str) -> str:
        for name in names:
            for variant in (name, name.upper()):
                if env.get(variant):
                    return env[variant].strip()
        return ""

    proxy = first("grpc_proxy", "https_proxy", "http_proxy")
    if not proxy:
        return None
    host, port = _split_target(target)
    host = host.lower()
    if any(_bypasses(host, port, e) for e in first("no_grpc_proxy", "no_proxy").split(",")):
        return None
    return proxy


def secure_channel(target: str, tls: TlsFiles, *, server_name: str | None = None) -> grpc.Channel:
    """Opens an mTLS channel to the coordinator (the only way Baton dials anything).

    Outbound-only hospital networks: the channel tunnels through the HTTP CONNECT proxy that
    `proxy_for` names (https_proxy / no_proxy); TLS is still end to end with the coordinator,
    whose certificate is checked against the target's name (or `server_name`), never the proxy's.

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
    # Decided here rather than left to gRPC's own environment lookup, so that `no_proxy`
    # entries mean the same thing as for every other tool on the host (CIDR, :port, *) and
    # `baton-site doctor` reports exactly what the agent does.
    proxy = proxy_for(target)
    if proxy is None:
        options.append(("grpc.enable_http_proxy", 0))
    else:
        options.append(("grpc.http_proxy", proxy))
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
