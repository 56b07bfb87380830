"""Tells a refused certificate (stop: exit 3) from a passing network fault (retry), and why.

gRPC shows a site whose certificate the coordinator rejects in the TLS handshake only as
"Socket closed", like a dropped connection. So the agent checks its own certificate (validity,
issuer) before dialling, and after such a failure asks the coordinator once more with Python's
TLS stack, which reports the coordinator's alert ("unknown ca", "certificate expired", ...).
"""

from __future__ import annotations

import socket
import ssl
from datetime import UTC, datetime

from cryptography import x509
from cryptography.exceptions import InvalidSignature

from protocols.transport import TlsFiles

__all__ = ["CertificateRefused", "local_certificate_problem", "probe_handshake"]


class CertificateRefused(RuntimeError):
    """The coordinator refuses (or will refuse) this site's certificate; retrying cannot help."""


def _issued_by(certificate: x509.Certificate, issuer: x509.Certificate) -> bool:
    if certificate.issuer != issuer.subject:
        return False
    try:
        certificate.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def local_certificate_problem(tls: TlsFiles, now: datetime | None = None) -> str | None:
    """Why the coordinator will refuse this site's certificate, judged locally; None if fine."""
    now = now or datetime.now(UTC)
    try:
        certificate = x509.load_pem_x509_certificate(tls.certificate.read_bytes())
        authorities = x509.load_pem_x509_certificates(tls.ca_certificate.read_bytes())
    except (OSError, ValueError):
        return None  # unreadable files are reported as bad input by the TLS layer
    if certificate.not_valid_after_utc < now:
        return (
            f"certificate {tls.certificate} (serial {certificate.serial_number:x}) expired on "
            f"{certificate.not_valid_after_utc:%Y-%m-%d %H:%M} UTC; get a new one: "
            "`baton-site cert csr`, then the CA holder runs `baton pki sign`"
        )
    if certificate.not_valid_before_utc > now:
        return (
            f"certificate {tls.certificate} is not valid before "
            f"{certificate.not_valid_before_utc:%Y-%m-%d %H:%M} UTC; check this machine's clock"
        )
    if not any(_issued_by(certificate, authority) for authority in authorities):
        return (
            f"certificate {tls.certificate} was issued by {certificate.issuer.rfc4514_string()}, "
            f"not by the consortium CA in {tls.ca_certificate}; use the certificate the "
            "consortium CA issued for this site"
        )
    return None


def probe_handshake(
    target: str, tls: TlsFiles, server_name: str | None = None, timeout: float = 5.0
) -> str | None:
    """Connects once with Python's TLS and reports the coordinator's refusal, if it refuses.

    Returns:
        Why the handshake was refused (the peer's TLS alert, or this side's verification
        error), or None if the coordinator accepted the certificate or could not be reached.
    """
    host, _, port = target.rpartition(":")
    host = host.strip("[]")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False  # only the trust of the certificates matters here
    try:
        context.load_verify_locations(cafile=str(tls.ca_certificate))
        context.load_cert_chain(str(tls.certificate), str(tls.private_key))
    except (OSError, ssl.SSLError):
        return None
    context.set_alpn_protocols(["h2"])
    try:
        with (
            socket.create_connection((host, int(port)), timeout=timeout) as raw,
            context.wrap_socket(
                raw, server_hostname=server_name or host, suppress_ragged_eofs=False
            ) as tls_socket,
        ):
            # TLS 1.3 servers verify the client's certificate after the client's handshake
            # finished: their verdict is the first thing read. An accepted HTTP/2 peer sends
            # its SETTINGS frame; gRPC closes the connection of a certificate it refuses.
            first = tls_socket.recv(1)
    except ssl.SSLCertVerificationError as exc:
        return (
            f"this site does not trust the coordinator's certificate ({exc.verify_message}); "
            f"is {tls.ca_certificate} the consortium CA?"
        )
    except ssl.SSLEOFError:
        first = b""
    except ssl.SSLError as exc:
        reason = exc.reason or str(exc)
        if "ALERT" not in reason.upper():
            return None
        return _refused(tls, f"TLS alert: {reason.lower().replace('_', ' ')}")
    except OSError:
        return None
    if first:
        return None
    return _refused(tls, "it closed the connection right after the TLS handshake")


def _refused(tls: TlsFiles, evidence: str) -> str:
    try:
        issuer = x509.load_pem_x509_certificate(tls.certificate.read_bytes()).issuer
        by = f"issued by {issuer.rfc4514_string()}"
    except (OSError, ValueError):
        by = "unreadable"
    return (
        f"the coordinator rejected this site's certificate in the TLS handshake ({evidence}); "
        f"{tls.certificate} ({by}) is not one it trusts: use a certificate of the consortium "
        "CA, or renew an expired or revoked one"
    )
