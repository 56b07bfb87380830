"""The one place that creates gRPC channels and servers and sets their mTLS and size options."""

from __future__ import annotations

import functools
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
    "WHOLE_HAND_BACK_BYTES",
    "PortInUse",
    "TlsFiles",
    "aio_server",
    "check_port_free",
    "peer_certificate",
    "peer_identity",
    "proxy_for",
    "secure_channel",
]

# 1 MiB chunks sit on gRPC's bulk-throughput plateau; messages stay well under the cap.
CHUNK_BYTES = 1024 * 1024
MAX_MESSAGE_BYTES = 4 * CHUNK_BYTES
# A finished hop whose bundle is at most this size is handed back in one message (LoRA adapters
# are hundreds of KB); a larger one streams in chunks, resumably.
WHOLE_HAND_BACK_BYTES = CHUNK_BYTES

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
# What a client may send ahead of the server reading it, per stream: a fixed window instead of
# gRPC's BDP-grown one, so a coordinator whose disk is slower than the network holds a few MiB of
# an upload in memory, not tens (benchmarks/transfer.py). Loopback and LAN uploads still run at
# wire speed; over a 20 ms WAN path the window allows ~400 MB/s.
UPLOAD_WINDOW_BYTES = 8 * CHUNK_BYTES
_SERVER_OPTIONS: list[tuple[str, Any]] = [
    *_COMMON_OPTIONS,
    ("grpc.http2.bdp_probe", 0),
    ("grpc.http2.lookahead_bytes", UPLOAD_WINDOW_BYTES),
    # gRPC sets SO_REUSEPORT by default: a second coordinator would bind the same port and the
    # kernel would split the sites between the two. One port, one coordinator.
    ("grpc.so_reuseport", 0),
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
]


class PortInUse(OSError):
    """The server's port is already bound by another process."""


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
        contents = []
        for path in (self.ca_certificate, self.certificate, self.private_key):
            try:
                contents.append(path.read_bytes())
            except OSError as exc:
                raise PkiError(f"cannot read {path}: {exc.strerror or exc}") from exc
        ca, certificate, key = contents
        _check_pair(self, certificate, key)
        return ca, certificate, key


def _check_pair(tls: TlsFiles, certificate_pem: bytes, key_pem: bytes) -> None:
    """Refuses a certificate and key that do not belong together (gRPC would fail obscurely)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    try:
        certificate = x509.load_pem_x509_certificate(certificate_pem)
    except ValueError:
        raise PkiError(f"{tls.certificate} is not a PEM certificate") from None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError):
        raise PkiError(f"{tls.private_key} is not an unencrypted PEM private key") from None
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    encoding = serialization.Encoding.DER
    if key.public_key().public_bytes(encoding, public) != certificate.public_key().public_bytes(
        encoding, public
    ):
        raise PkiError(
            f"certificate {tls.certificate} and key {tls.private_key} do not match: give the key "
            "the certificate was issued for"
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
    check_port_free(address)
    server = grpc.aio.server(options=_SERVER_OPTIONS, interceptors=list(interceptors))
    try:
        port = server.add_secure_port(address, credentials)
    except RuntimeError as exc:  # gRPC >= 1.60 raises instead of returning 0
        raise PortInUse(f"port {address.rsplit(':', 1)[-1]} is already in use") from exc
    if port == 0:
        raise OSError(f"could not bind the coordinator to {address}")
    return server, port


def check_port_free(address: str) -> None:
    """Raises PortInUse before gRPC tries (and logs its own multi-line error) on a taken port."""
    import errno
    import socket

    host, _, port_text = address.rpartition(":")
    port = int(port_text)
    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(host.strip("[]") or None, port, type=socket.SOCK_STREAM)
    except OSError:
        return  # gRPC reports unresolvable hosts itself
    for family, kind, proto, _, sockaddr in infos:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(sockaddr)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise PortInUse(f"port {port} is already in use") from None


# Every call presents its connection's certificate again: parse each distinct one once.
# Bounded (a few KB per entry); failures are not cached and raise again on every call.
_PARSED_CERTIFICATES = 4096


@functools.lru_cache(maxsize=_PARSED_CERTIFICATES)
def _identity_of(pem: bytes) -> PeerIdentity:
    return identity_from_pem(pem)


@functools.lru_cache(maxsize=_PARSED_CERTIFICATES)
def _serial_and_subject(pem: bytes) -> tuple[str, str] | None:
    from cryptography import x509

    try:
        certificate = x509.load_pem_x509_certificate(pem)
    except ValueError:
        return None
    return format(certificate.serial_number, "x"), certificate.subject.rfc4514_string()


def peer_identity(context: grpc.ServicerContext | grpc.aio.ServicerContext) -> PeerIdentity:
    """Reads the caller's role and name from its verified client certificate."""
    certs = context.auth_context().get("x509_pem_cert")
    if not certs:
        raise PkiError("the peer presented no client certificate")
    return _identity_of(certs[0])


def peer_certificate(
    context: grpc.ServicerContext | grpc.aio.ServicerContext,
) -> tuple[str, str] | None:
    """The serial (hex) and subject of the caller's verified certificate, whatever its role/CN.

    Refusals record these so an admin knows which certificate to revoke, even when the
    certificate is one the CA issued with a name or role Baton does not accept.
    """
    certs = context.auth_context().get("x509_pem_cert")
    if not certs:
        return None
    return _serial_and_subject(certs[0])
