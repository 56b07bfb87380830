"""Checkpoint custody: the producing site signs a bundle's sha256; everyone else verifies it.

The signature is ECDSA (P-256, SHA-256) over the ASCII hex digest, made with the key of the
site's mTLS certificate; the verifier checks that certificate against the consortium CA, that it
is a site certificate of the producer named in the bundle's manifest, and the signature.
"""

from __future__ import annotations

import functools
from datetime import UTC, datetime

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from protocols.pki import PeerIdentity, PkiError, Role, identity_from_pem

__all__ = [
    "SignatureError",
    "check_signer",
    "sign_digest",
    "verify_aggregate_custody",
    "verify_custody",
    "verify_signed_digest",
]


class SignatureError(ValueError):
    """A checkpoint's signature or its signer's certificate does not verify."""


def sign_digest(private_key_pem: bytes, sha256: str) -> bytes:
    """Signs a bundle's sha256 (hex) with a site's private key."""
    return _signing_key(private_key_pem).sign(sha256.encode("ascii"), ec.ECDSA(hashes.SHA256()))


@functools.lru_cache(maxsize=4)
def _signing_key(private_key_pem: bytes) -> ec.EllipticCurvePrivateKey:
    """A private key, parsed once per key: a site signs every hop's bundle with the same one
    (a renewed key is other bytes, parsed anew). A refusal raises, so it is never cached."""
    key = serialization.load_pem_private_key(private_key_pem, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise SignatureError("checkpoint signing needs an ECDSA key")
    return key


def verify_custody(
    sha256: str,
    signature: bytes,
    certificate_pem: bytes,
    *,
    ca_pem: bytes,
    producer: str,
) -> None:
    """Checks who produced a checkpoint.

    Args:
        sha256: The bundle's digest (recomputed from its bytes by the caller).
        signature: What the producer sent with the bundle.
        certificate_pem: The producer's certificate.
        ca_pem: The consortium CA certificate.
        producer: The site the bundle's manifest names.

    Raises:
        SignatureError: If the certificate is not a valid site certificate of `producer` issued by
            the CA, or the signature does not verify.
    """
    if not signature:
        raise SignatureError("checkpoint is not signed")
    _verify_signer(
        sha256,
        signature,
        certificate_pem,
        ca_pem=ca_pem,
        role=Role.SITE,
        name=producer,
        at=datetime.now(UTC),
        what="checkpoint",
    )


def check_signer(certificate_pem: bytes, *, ca_pem: bytes) -> None:
    """Checks a signer's certificate as issued by the CA, ahead of its first signature (a site's
    hello): the answer is kept (`_issued_by_ca`), so that signature's check does not pay for it.

    Raises:
        SignatureError: If the certificate is not from the consortium CA.
    """
    _issued_by_ca(certificate_pem, ca_pem)


def verify_aggregate_custody(
    sha256: str, signature: bytes, certificate_pem: bytes, *, ca_pem: bytes
) -> str:
    """Checks that a round's aggregate was made and signed by a coordinator of the consortium.

    Returns:
        The coordinator's name (certificate CN).

    Raises:
        SignatureError: If the certificate is not a coordinator certificate from the CA, or the
            signature does not verify.
    """
    return verify_signed_digest(
        sha256, signature, certificate_pem, ca_pem=ca_pem, role=Role.COORDINATOR,
        at=datetime.now(UTC), what="round aggregate",
    )  # fmt: skip


def verify_signed_digest(
    digest: str,
    signature: bytes,
    certificate_pem: bytes,
    *,
    ca_pem: bytes,
    role: Role,
    at: datetime,
    what: str,
) -> str:
    """Checks a signature over a sha256 (hex) by a holder of `role` certified by the CA.

    Args:
        at: When the signature was made: the certificate must have been valid then.
        what: Names the signed thing in error messages.

    Returns:
        The signer's name (certificate CN).

    Raises:
        SignatureError: If the certificate is not from the CA, not of `role`, was not valid at
            `at`, or the signature does not verify.
    """
    if not signature:
        raise SignatureError(f"{what} is not signed")
    return _verify_signer(
        digest, signature, certificate_pem, ca_pem=ca_pem, role=role, name=None, at=at, what=what
    )


def _verify_signer(
    digest: str,
    signature: bytes,
    certificate_pem: bytes,
    *,
    ca_pem: bytes,
    role: Role,
    name: str | None,
    at: datetime,
    what: str,
) -> str:
    certificate, identity = _issued_by_ca(certificate_pem, ca_pem)
    if role is Role.SITE and name is not None:
        if identity.role is not Role.SITE or identity.name != name:
            raise SignatureError(
                f"checkpoint is signed by {identity.role.value} {identity.name!r}, "
                f"not by its producer site {name!r}"
            )
    elif identity.role is not role:
        raise SignatureError(
            f"{what} is signed by {identity.role.value} {identity.name!r}, not by a {role.value}"
        )
    signer = name or identity.name
    if not certificate.not_valid_before_utc <= at <= certificate.not_valid_after_utc:
        raise SignatureError(f"signer certificate of {signer!r} is outside its validity")
    public_key = certificate.public_key()
    if not isinstance(public_key, ec.EllipticCurvePublicKey):
        raise SignatureError("signer certificate does not hold an ECDSA key")
    try:
        public_key.verify(signature, digest.encode("ascii"), ec.ECDSA(hashes.SHA256()))
    except InvalidSignature as exc:
        raise SignatureError(f"{what} signature of {signer!r} does not verify") from exc
    return identity.name


@functools.lru_cache(maxsize=64)
def _issued_by_ca(certificate_pem: bytes, ca_pem: bytes) -> tuple[x509.Certificate, PeerIdentity]:
    """A signer's certificate, checked as issued by the CA, and who it names.

    Cached by the exact bytes of both certificates: a producer signs every hop with the same
    certificate, and the answer depends on nothing else (the validity period, role, name and
    signature are checked on every call by the caller). A refusal raises, so it is never
    cached: a certificate refused once is checked again the next time.
    """
    try:
        certificate = x509.load_pem_x509_certificate(certificate_pem)
        ca = x509.load_pem_x509_certificate(ca_pem)
        certificate.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise SignatureError(f"signer certificate is not from the consortium CA: {exc}") from exc
    try:
        identity = identity_from_pem(certificate_pem)
    except PkiError as exc:
        raise SignatureError(str(exc)) from exc
    return certificate, identity
