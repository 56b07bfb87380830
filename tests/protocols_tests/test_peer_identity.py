"""The servicer's view of a caller: each certificate is parsed once, a bad one refused each time."""

from __future__ import annotations

import pytest

from protocols.pki import PkiError, Role
from protocols.transport import _identity_of, peer_certificate, peer_identity
from tests.conftest import Pki


class _Context:
    def __init__(self, pem: bytes | None) -> None:
        self._pem = pem

    def auth_context(self) -> dict[str, list[bytes]]:
        return {"x509_pem_cert": [self._pem]} if self._pem is not None else {}


def test_a_certificate_presented_again_is_not_parsed_again(pki: Pki) -> None:
    pem = pki.tls("site-a").certificate.read_bytes()
    first = peer_identity(_Context(pem))  # type: ignore[arg-type]
    hits = _identity_of.cache_info().hits
    again = peer_identity(_Context(pem))  # type: ignore[arg-type]
    assert again == first and (again.role, again.name) == (Role.SITE, "site-a")
    assert _identity_of.cache_info().hits == hits + 1
    serial, subject = peer_certificate(_Context(pem)) or ("", "")  # type: ignore[arg-type]
    assert serial == format(first.serial, "x") and "CN=site-a" in subject


def test_a_bad_certificate_is_refused_on_every_call() -> None:
    for _ in range(2):
        with pytest.raises(PkiError, match="not a PEM certificate"):
            peer_identity(_Context(b"-----BEGIN CERTIFICATE-----\nAAAA\n"))  # type: ignore[arg-type]
        assert peer_certificate(_Context(b"junk")) is None  # type: ignore[arg-type]
    with pytest.raises(PkiError, match="no client certificate"):
        peer_identity(_Context(None))  # type: ignore[arg-type]
