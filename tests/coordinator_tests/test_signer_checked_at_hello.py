"""A site's certificate is checked as its bundles' signer at its hello, so that its first hand
back does not parse and check it against the CA on the handoff."""

from __future__ import annotations

import uuid

import pytest
from cryptography import x509

from coordinator.server import Coordinator
from protocols.pki import Role, issue_certificate
from protocols.signing import sign_digest, verify_custody
from tests.conftest import Pki
from tests.coordinator_tests.conftest import ScriptedSite

DIGEST = "ab" * 32


def _certificate_loads(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    loaded: list[bytes] = []
    real = x509.load_pem_x509_certificate

    def load(data: bytes, *args: object) -> x509.Certificate:
        loaded.append(data)
        return real(data, *args)

    monkeypatch.setattr(x509, "load_pem_x509_certificate", load)
    return loaded


def test_a_sites_hello_leaves_its_signer_certificate_checked(
    pki: Pki, coordinator: Coordinator, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A certificate of its own: no other test's custody check has met it.
    name = f"site-signer-{uuid.uuid4().hex[:8]}"
    issue_certificate(pki.directory, pki.directory, Role.SITE, name)
    tls = pki.tls(name)
    site = ScriptedSite(pki, name, coordinator.port)
    try:
        site.hello()
    finally:
        site.close()
    certificate = tls.certificate.read_bytes()
    loaded = _certificate_loads(monkeypatch)

    verify_custody(DIGEST, sign_digest(tls.private_key.read_bytes(), DIGEST), certificate,
                   ca_pem=tls.ca_certificate.read_bytes(), producer=name)  # fmt: skip

    assert certificate not in loaded
