"""A producer's certificate is checked against the CA once per exact certificate and CA; every
signature, validity period, role and name is still checked on every call."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from cryptography import x509

from protocols.pki import Role
from protocols.signing import SignatureError, sign_digest, verify_custody, verify_signed_digest
from tests.conftest import Pki

FIRST, SECOND = "ab" * 32, "cd" * 32


def _counting_loads(monkeypatch: pytest.MonkeyPatch, owner: Any, name: str) -> list[bytes]:
    """The PEM bytes `owner.name` (a cryptography loader) is called with from now on."""
    loaded: list[bytes] = []
    real = getattr(owner, name)

    def load(data: bytes, *args: Any, **kwargs: Any) -> Any:
        loaded.append(data)
        return real(data, *args, **kwargs)

    monkeypatch.setattr(owner, name, load)
    return loaded


def _counting_certificate_loads(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    return _counting_loads(monkeypatch, x509, "load_pem_x509_certificate")


def test_a_producers_certificate_is_checked_once_across_hops(
    pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    tls = pki.tls("site-b")
    key, certificate = tls.private_key.read_bytes(), tls.certificate.read_bytes()
    ca = tls.ca_certificate.read_bytes()
    verify_custody(FIRST, sign_digest(key, FIRST), certificate, ca_pem=ca, producer="site-b")
    loaded = _counting_certificate_loads(monkeypatch)

    verify_custody(SECOND, sign_digest(key, SECOND), certificate, ca_pem=ca, producer="site-b")

    assert loaded == []


def test_a_cached_certificate_still_has_each_signature_name_and_validity_checked(
    pki: Pki,
) -> None:
    tls = pki.tls("site-b")
    key, certificate = tls.private_key.read_bytes(), tls.certificate.read_bytes()
    ca = tls.ca_certificate.read_bytes()
    signature = sign_digest(key, FIRST)
    verify_custody(FIRST, signature, certificate, ca_pem=ca, producer="site-b")

    with pytest.raises(SignatureError, match="does not verify"):
        verify_custody(SECOND, signature, certificate, ca_pem=ca, producer="site-b")
    with pytest.raises(SignatureError, match="not by its producer site 'site-a'"):
        verify_custody(FIRST, signature, certificate, ca_pem=ca, producer="site-a")
    with pytest.raises(SignatureError, match="outside its validity"):
        verify_signed_digest(FIRST, signature, certificate, ca_pem=ca, role=Role.SITE,
                             at=datetime.now(UTC) + timedelta(days=40_000),
                             what="checkpoint")  # fmt: skip


def test_a_certificate_is_checked_again_against_another_ca_or_when_it_differs(
    pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    tls, foreign = pki.tls("site-a"), pki.foreign_tls("site-a")
    ca = tls.ca_certificate.read_bytes()
    key, certificate = tls.private_key.read_bytes(), tls.certificate.read_bytes()
    verify_custody(FIRST, sign_digest(key, FIRST), certificate, ca_pem=ca, producer="site-a")
    loaded = _counting_certificate_loads(monkeypatch)
    foreign_ca = (pki.foreign / "ca.crt").read_bytes()

    # The same certificate against another CA: checked, and refused.
    with pytest.raises(SignatureError, match="not from the consortium CA"):
        verify_custody(FIRST, sign_digest(key, FIRST), certificate, ca_pem=foreign_ca,
                       producer="site-a")  # fmt: skip
    # A certificate of the same name from another CA: checked, and refused, every time.
    foreign_key, foreign_certificate = (
        foreign.private_key.read_bytes(), foreign.certificate.read_bytes(),
    )  # fmt: skip
    for _ in range(2):
        with pytest.raises(SignatureError, match="not from the consortium CA"):
            verify_custody(FIRST, sign_digest(foreign_key, FIRST), foreign_certificate,
                           ca_pem=ca, producer="site-a")  # fmt: skip

    assert loaded.count(certificate) == 1
    assert loaded.count(foreign_certificate) == 2


def _counting_key_loads(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    from cryptography.hazmat.primitives import serialization

    return _counting_loads(monkeypatch, serialization, "load_pem_private_key")


def test_a_sites_signing_key_is_parsed_once_across_hops_and_a_renewed_one_anew(
    pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    site_a = pki.tls("site-a")
    key, ca = site_a.private_key.read_bytes(), site_a.ca_certificate.read_bytes()
    renewed_key = ec.generate_private_key(ec.SECP256R1())
    renewed = renewed_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )  # fmt: skip
    sign_digest(key, FIRST)
    loaded = _counting_key_loads(monkeypatch)

    signature = sign_digest(key, SECOND)
    assert loaded == []  # the same key's bytes: not parsed again
    verify_custody(SECOND, signature, site_a.certificate.read_bytes(), ca_pem=ca,
                   producer="site-a")  # fmt: skip
    # Other key bytes (a renewed key) are parsed, and sign with that key.
    renewed_signature = sign_digest(renewed, SECOND)
    assert loaded == [renewed]
    renewed_key.public_key().verify(renewed_signature, SECOND.encode("ascii"),
                                    ec.ECDSA(hashes.SHA256()))  # fmt: skip


def test_a_key_that_cannot_sign_is_refused_every_time(monkeypatch: pytest.MonkeyPatch) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    pem = ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )  # fmt: skip
    loaded = _counting_key_loads(monkeypatch)
    for _ in range(2):
        with pytest.raises(SignatureError, match="needs an ECDSA key"):
            sign_digest(pem, FIRST)
    assert loaded == [pem, pem]
