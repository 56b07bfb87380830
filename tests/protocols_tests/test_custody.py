"""Custody signatures: a signer's certificate is parsed and checked against the CA once, while
the signature, the producer and the validity period are still checked on every call, and a
certificate that failed is checked again (never remembered as good)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509

import protocols.signing
from protocols.pki import Role
from protocols.signing import SignatureError, sign_digest, verify_custody, verify_signed_digest
from tests.conftest import Pki

DIGEST = "ab" * 32


@pytest.fixture
def parses(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[bytes]]:
    """The certificates `protocols.signing` parses, in order (its cache emptied first)."""
    parsed: list[bytes] = []
    original = x509.load_pem_x509_certificate

    def counting(data: bytes) -> x509.Certificate:
        parsed.append(data)
        return original(data)

    protocols.signing._issued_by_ca.cache_clear()
    monkeypatch.setattr(protocols.signing.x509, "load_pem_x509_certificate", counting)
    yield parsed
    protocols.signing._issued_by_ca.cache_clear()


def test_a_signers_certificate_is_checked_against_the_ca_once_per_pair(
    pki: Pki, parses: list[bytes]
) -> None:
    ca = (pki.directory / "ca.crt").read_bytes()
    certificate = (pki.directory / "site-a.crt").read_bytes()
    key = (pki.directory / "site-a.key").read_bytes()
    verify_custody(DIGEST, sign_digest(key, DIGEST), certificate, ca_pem=ca, producer="site-a")
    first = list(parses)
    assert certificate in first and ca in first
    for _ in range(2):
        verify_custody(DIGEST, sign_digest(key, DIGEST), certificate, ca_pem=ca, producer="site-a")
    assert parses == first  # parsed and checked by the first call only
    # Every call still checks the signature, the producer and the validity period.
    with pytest.raises(SignatureError, match="checkpoint signature of 'site-a' does not verify"):
        verify_custody("cd" * 32, sign_digest(key, DIGEST), certificate, ca_pem=ca,
                       producer="site-a")  # fmt: skip
    with pytest.raises(SignatureError, match="not by its producer site 'site-b'"):
        verify_custody(DIGEST, sign_digest(key, DIGEST), certificate, ca_pem=ca, producer="site-b")
    with pytest.raises(SignatureError, match="outside its validity"):
        verify_signed_digest(DIGEST, sign_digest(key, DIGEST), certificate, ca_pem=ca,
                             role=Role.SITE, at=datetime.now(UTC) + timedelta(days=36500),
                             what="checkpoint")  # fmt: skip
    assert parses == first


def test_a_certificate_from_another_ca_is_refused_every_time(pki: Pki, parses: list[bytes]) -> None:
    ca = (pki.directory / "ca.crt").read_bytes()
    foreign = (pki.foreign / "site-a.crt").read_bytes()
    signature = sign_digest((pki.foreign / "site-a.key").read_bytes(), DIGEST)
    for attempt in range(1, 3):
        with pytest.raises(
            SignatureError, match="signer certificate is not from the consortium CA"
        ):
            verify_custody(DIGEST, signature, foreign, ca_pem=ca, producer="site-a")
        assert parses == [foreign, ca] * attempt  # checked again: a refusal is not kept
    assert protocols.signing._issued_by_ca.cache_info().currsize == 0
