"""Certificate lifecycle: online and offline renewal, expiry report."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from typer.testing import CliRunner

from coordinator.console.cli import app
from coordinator.server import Coordinator, build_server
from protocols.pki import Role, create_csr, identity_from_pem, init_ca, issue_certificate
from protocols.transport import TlsFiles, secure_channel
from protocols.v1 import baton_pb2 as pb
from protocols.v1 import baton_pb2_grpc as pb_grpc
from tests.conftest import LoopThread, Pki
from tests.coordinator_tests.conftest import coordinator_settings

runner = CliRunner()


@pytest.fixture
def renewing_coordinator(
    pki: Pki, tmp_path: Path, loop_thread: LoopThread
) -> Iterator[Coordinator]:
    settings = coordinator_settings(pki, tmp_path / "state", ca_dir=pki.directory)
    coordinator = loop_thread.run(build_server(settings))
    yield coordinator
    loop_thread.run(coordinator.stop(0))


def _renew(port: int, tls: TlsFiles, csr: bytes) -> pb.RenewResponse:
    with secure_channel(f"localhost:{port}", tls) as channel:
        response: pb.RenewResponse = pb_grpc.SiteServiceStub(channel).RenewCertificate(
            pb.RenewRequest(csr_pem=csr), timeout=30
        )
        return response


def test_site_renews_online_with_a_new_key_and_the_new_certificate_works(
    pki: Pki, renewing_coordinator: Coordinator, tmp_path: Path
) -> None:
    csr = create_csr(tmp_path, "site-c")
    response = _renew(renewing_coordinator.port, pki.tls("site-c"), csr.certificate.read_bytes())
    renewed = identity_from_pem(response.certificate_pem)
    old = identity_from_pem(pki.tls("site-c").certificate.read_bytes())
    assert (renewed.role, renewed.name) == (Role.SITE, "site-c") and renewed.serial != old.serial
    new_cert = tmp_path / "site-c.crt"
    new_cert.write_bytes(response.certificate_pem)
    fresh = TlsFiles(pki.directory / "ca.crt", new_cert, csr.private_key)
    with secure_channel(f"localhost:{renewing_coordinator.port}", fresh) as channel:
        hello = pb_grpc.SiteServiceStub(channel).Hello(
            pb.HelloRequest(protocol_version=1), timeout=30
        )
    assert hello.site_name == "site-c" and hello.certificate_expires_at > 0
    events = [e.kind for e in renewing_coordinator.engine.ledger.events()]
    assert "certificate.renewed" in events


def test_a_site_cannot_renew_another_sites_name(
    pki: Pki, renewing_coordinator: Coordinator, tmp_path: Path
) -> None:
    csr = create_csr(tmp_path, "site-a")
    with pytest.raises(grpc.RpcError) as refused:
        _renew(renewing_coordinator.port, pki.tls("site-c"), csr.certificate.read_bytes())
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "may only renew 'site-c'" in refused.value.details()
    refusals = [
        e for e in renewing_coordinator.engine.ledger.events() if e.kind == "access.refused"
    ]
    assert refusals and refusals[0].payload["method"] == "RenewCertificate"


def test_online_renewal_needs_the_ca_at_the_coordinator(
    pki: Pki, coordinator: Coordinator, tmp_path: Path
) -> None:
    csr = create_csr(tmp_path, "site-a")
    with pytest.raises(grpc.RpcError) as refused:
        _renew(coordinator.port, pki.tls("site-a"), csr.certificate.read_bytes())
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "baton pki sign" in refused.value.details()


def test_offline_renewal_signs_a_csr_and_status_warns_before_expiry(tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    init_ca(pki)
    issue_certificate(pki, pki, Role.SITE, "st-marys", days=10)
    csr = create_csr(tmp_path / "site", "st-marys")
    signed = runner.invoke(app, ["pki", "sign", str(csr.certificate), "--dir", str(pki),
                                 "--out", str(tmp_path / "site" / "st-marys.crt")])  # fmt: skip
    assert signed.exit_code == 0, signed.output
    identity = identity_from_pem((tmp_path / "site" / "st-marys.crt").read_bytes())
    assert identity.name == "st-marys" and identity.role is Role.SITE
    status = runner.invoke(app, ["pki", "status", "--dir", str(pki)])
    assert status.exit_code == 1 and "renew soon" in status.output
