"""A round's aggregate is vouched for by the coordinator's signature, and by nobody else's."""

from __future__ import annotations

import pytest

from protocols.signing import SignatureError, sign_digest, verify_aggregate_custody
from tests.conftest import Pki

DIGEST = "ab" * 32


def _signed_by(pki: Pki, name: str) -> tuple[bytes, bytes]:
    tls = pki.tls(name)
    return sign_digest(tls.private_key.read_bytes(), DIGEST), tls.certificate.read_bytes()


def test_an_aggregate_signed_by_the_coordinator_verifies(pki: Pki) -> None:
    signature, certificate = _signed_by(pki, "coordinator")
    ca = pki.tls("coordinator").ca_certificate.read_bytes()
    assert verify_aggregate_custody(DIGEST, signature, certificate, ca_pem=ca) == "coordinator"


def test_an_aggregate_signed_by_a_site_or_for_other_bytes_is_refused(pki: Pki) -> None:
    ca = pki.tls("coordinator").ca_certificate.read_bytes()
    signature, certificate = _signed_by(pki, "site-a")
    with pytest.raises(SignatureError, match="signed by site 'site-a', not by a coordinator"):
        verify_aggregate_custody(DIGEST, signature, certificate, ca_pem=ca)
    signature, certificate = _signed_by(pki, "coordinator")
    with pytest.raises(SignatureError, match="does not verify"):
        verify_aggregate_custody("cd" * 32, signature, certificate, ca_pem=ca)
    with pytest.raises(SignatureError, match="not signed"):
        verify_aggregate_custody(DIGEST, b"", certificate, ca_pem=ca)
