"""Checkpoint custody: the producing site signs a bundle's sha256; everyone else verifies it.

The signature is ECDSA (P-256, SHA-256) over the ASCII hex digest, made with the key of the
site's mTLS certificate; the verifier checks that certificate against the consortium CA, that it
is a site certificate of the producer named in the bundle's manifest, and the signature.
"""

from __future__ import annotations

from datetime import UTC, datetime

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from protocols.pki import PkiError, Role, identity_from_pem

__all__ = ["SignatureError", "sign_digest", "verify_custody"]


class SignatureError(ValueError):
    """A checkpoint's signature or its signer's certificate does not verify."""


def sign_digest(private_key_pem: bytes, sha256: str) -> bytes:
    """Signs a bundle's sha256 (hex) with a site's private key."""
    key = serialization.load_pem_private_key(private_key_pem, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise SignatureError("checkpoint signing needs an ECDSA key")
    return key.sign(sha256.encode("ascii"), ec.ECDSA(hashes.SHA256()))


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
    if identity.role is not Role.SITE or identity.name != producer:
        raise SignatureError(
            f"checkpoint is signed by {identity.role.value} {identity.name!r}, "
            f"not by its producer site {producer!r}"
        )
    now = datetime.now(UTC)
    if not certificate.not_valid_before_utc <= now <= certificate.not_valid_after_utc:
        raise SignatureError(f"signer certificate of {producer!r} is outside its validity")
    public_key = certificate.public_key()
    if not isinstance(public_key, ec.EllipticCurvePublicKey):
        raise SignatureError("signer certificate does not hold an ECDSA key")
    try:
        public_key.verify(signature, sha256.encode("ascii"), ec.ECDSA(hashes.SHA256()))
    except InvalidSignature as exc:
        raise SignatureError(f"checkpoint signature of {producer!r} does not verify") from exc
