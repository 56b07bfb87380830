"""Tests for the Baton PKI: CA and role certificates, file permissions, and mutual TLS over gRPC."""

from __future__ import annotations

import ipaddress
import json
import os
import stat
from collections.abc import Iterator
from concurrent import futures
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from protocols.pki import (
    CertificateFiles,
    PkiError,
    Role,
    identity_from_pem,
    init_ca,
    issue_certificate,
    load_pem,
)

_WHOAMI = "/baton.test.Identity/WhoAmI"
_TIMEOUT_SECONDS = 30


def _certificate(files: CertificateFiles) -> x509.Certificate:
    return x509.load_pem_x509_certificate(load_pem(files.certificate))


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def ca_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "ca"
    init_ca(directory)
    return directory


# --- CA ------------------------------------------------------------------------------------------


def test_init_ca_writes_a_self_signed_ca_certificate_and_key(tmp_path: Path) -> None:
    files = init_ca(tmp_path / "ca", common_name="Test CA", days=30)

    assert files == CertificateFiles(tmp_path / "ca" / "ca.crt", tmp_path / "ca" / "ca.key")
    certificate = _certificate(files)
    certificate.verify_directly_issued_by(certificate)
    assert certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "Test CA"
    constraints = certificate.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical
    assert constraints.value.ca and constraints.value.path_length == 0
    usage = certificate.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical
    assert usage.value.key_cert_sign and usage.value.crl_sign
    assert not usage.value.digital_signature
    certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    lifetime = certificate.not_valid_after_utc - datetime.now(UTC)
    assert abs(lifetime - timedelta(days=30)) < timedelta(minutes=1)


def test_init_ca_refuses_to_replace_an_existing_ca(tmp_path: Path) -> None:
    files = init_ca(tmp_path)
    before = files.private_key.read_bytes()

    with pytest.raises(PkiError, match="CA already exists at"):
        init_ca(tmp_path)

    assert files.private_key.read_bytes() == before


def test_init_ca_refuses_when_only_the_key_is_left_behind(tmp_path: Path) -> None:
    (tmp_path / "ca.key").write_bytes(b"old key")

    with pytest.raises(PkiError, match="CA already exists at"):
        init_ca(tmp_path)

    assert (tmp_path / "ca.key").read_bytes() == b"old key"
    assert not (tmp_path / "ca.crt").exists()


def test_init_ca_with_overwrite_replaces_the_ca_and_leaves_no_temporary_files(
    tmp_path: Path,
) -> None:
    first = init_ca(tmp_path)
    old_key = first.private_key.read_bytes()
    old_serial = _certificate(first).serial_number

    second = init_ca(tmp_path, overwrite=True)

    assert second == first
    assert second.private_key.read_bytes() != old_key
    assert _certificate(second).serial_number != old_serial
    assert _mode(second.private_key) == 0o600
    assert _mode(second.certificate) == 0o644
    assert sorted(path.name for path in tmp_path.iterdir()) == ["ca.crt", "ca.key"]


@pytest.mark.parametrize("days", [0, -1])
def test_init_ca_rejects_a_non_positive_validity(tmp_path: Path, days: int) -> None:
    with pytest.raises(PkiError, match="positive number of days"):
        init_ca(tmp_path, days=days)


# --- Leaf certificates ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("role", "name", "expected_days"),
    [
        (Role.COORDINATOR, "coordinator", 365),
        (Role.SITE, "st-marys.hospital_01", 90),
        (Role.ADMIN, "alice", 365),
    ],
)
def test_issued_certificate_parses_back_to_its_role_and_name(
    ca_dir: Path, tmp_path: Path, role: Role, name: str, expected_days: int
) -> None:
    files = issue_certificate(ca_dir, tmp_path / "out", role, name)

    assert files == CertificateFiles(
        tmp_path / "out" / f"{name}.crt", tmp_path / "out" / f"{name}.key"
    )
    certificate = _certificate(files)
    identity = identity_from_pem(load_pem(files.certificate))
    assert identity.role is role
    assert identity.name == name
    assert identity.serial == certificate.serial_number
    assert identity.not_valid_after == certificate.not_valid_after_utc
    lifetime = identity.not_valid_after - datetime.now(UTC)
    assert abs(lifetime - timedelta(days=expected_days)) < timedelta(minutes=1)
    assert datetime.now(UTC) - certificate.not_valid_before_utc >= timedelta(minutes=4)


def test_issued_certificate_has_the_baton_subject_and_leaf_extensions(
    ca_dir: Path, tmp_path: Path
) -> None:
    certificate = _certificate(issue_certificate(ca_dir, tmp_path, Role.SITE, "site-a"))
    ca_certificate = x509.load_pem_x509_certificate(load_pem(ca_dir / "ca.crt"))

    assert certificate.subject.rfc4514_string() == "CN=site-a,OU=site,O=Baton"
    constraints = certificate.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and not constraints.value.ca
    usage = certificate.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical and usage.value.digital_signature and not usage.value.key_cert_sign
    extended = certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(extended) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    authority = certificate.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier)
    ca_subject_key = ca_certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    assert authority.value.key_identifier == ca_subject_key.value.digest
    with pytest.raises(x509.ExtensionNotFound):
        certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)


def test_issued_serial_numbers_are_random(ca_dir: Path, tmp_path: Path) -> None:
    serials = {
        _certificate(issue_certificate(ca_dir, tmp_path, Role.SITE, f"site-{i}")).serial_number
        for i in range(3)
    }
    assert len(serials) == 3


def test_coordinator_certificate_serves_localhost_and_loopback_plus_given_names(
    ca_dir: Path, tmp_path: Path
) -> None:
    files = issue_certificate(
        ca_dir,
        tmp_path,
        Role.COORDINATOR,
        "coordinator",
        dns_names=["baton.example.org", "localhost"],
        ip_addresses=["10.0.0.5"],
    )

    certificate = _certificate(files)
    names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["localhost", "baton.example.org"]
    assert names.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
        ipaddress.ip_address("10.0.0.5"),
    ]
    extended = certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(extended) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}


def test_site_certificate_gets_alternative_names_only_when_asked(
    ca_dir: Path, tmp_path: Path
) -> None:
    files = issue_certificate(ca_dir, tmp_path, Role.SITE, "site-a", dns_names=["site-a.lan"])

    names = _certificate(files).extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert names.value.get_values_for_type(x509.DNSName) == ["site-a.lan"]
    assert names.value.get_values_for_type(x509.IPAddress) == []


@pytest.mark.parametrize(
    ("dns_names", "ip_addresses"),
    [(["bad name"], []), (["-leading.example"], []), ([], ["300.1.1.1"]), ([], ["localhost"])],
)
def test_invalid_alternative_names_are_rejected(
    ca_dir: Path, tmp_path: Path, dns_names: list[str], ip_addresses: list[str]
) -> None:
    with pytest.raises(PkiError, match="invalid"):
        issue_certificate(
            ca_dir, tmp_path, Role.COORDINATOR, "c", dns_names=dns_names, ip_addresses=ip_addresses
        )
    assert list(tmp_path.glob("c.*")) == []


def test_custom_validity_overrides_the_role_default(ca_dir: Path, tmp_path: Path) -> None:
    identity = identity_from_pem(
        load_pem(issue_certificate(ca_dir, tmp_path, Role.SITE, "s", days=7).certificate)
    )

    lifetime = identity.not_valid_after - datetime.now(UTC)
    assert abs(lifetime - timedelta(days=7)) < timedelta(minutes=1)


def test_certificate_may_not_outlive_its_ca(tmp_path: Path) -> None:
    init_ca(tmp_path / "ca", days=30)

    with pytest.raises(PkiError, match="outlive the CA"):
        issue_certificate(tmp_path / "ca", tmp_path / "out", Role.SITE, "site-a", days=31)
    assert not (tmp_path / "out").exists()


def test_issuing_without_a_ca_is_refused(tmp_path: Path) -> None:
    with pytest.raises(PkiError, match="no CA at"):
        issue_certificate(tmp_path / "missing", tmp_path / "out", Role.SITE, "site-a")


def test_issuing_with_a_key_from_another_ca_is_refused(tmp_path: Path) -> None:
    init_ca(tmp_path / "one")
    init_ca(tmp_path / "two")
    (tmp_path / "one" / "ca.key").write_bytes((tmp_path / "two" / "ca.key").read_bytes())

    with pytest.raises(PkiError, match="does not match"):
        issue_certificate(tmp_path / "one", tmp_path / "out", Role.SITE, "site-a")


@pytest.mark.parametrize(
    "name", ["../x", "", "a" * 65, ".hidden", "-dash", "a/b", "a\\b", "site a", "sité", "x\n"]
)
def test_invalid_names_are_rejected(ca_dir: Path, tmp_path: Path, name: str) -> None:
    out = tmp_path / "out"

    with pytest.raises(PkiError, match="invalid name"):
        issue_certificate(ca_dir, out, Role.SITE, name)
    assert not out.exists()


def test_longest_allowed_name_is_accepted(ca_dir: Path, tmp_path: Path) -> None:
    name = "a" * 64

    files = issue_certificate(ca_dir, tmp_path, Role.ADMIN, name)

    assert identity_from_pem(load_pem(files.certificate)).name == name


def test_issuing_refuses_to_overwrite_an_existing_certificate(ca_dir: Path, tmp_path: Path) -> None:
    files = issue_certificate(ca_dir, tmp_path, Role.SITE, "site-a")
    before = (files.certificate.read_bytes(), files.private_key.read_bytes())

    with pytest.raises(PkiError, match="refusing to overwrite"):
        issue_certificate(ca_dir, tmp_path, Role.SITE, "site-a")

    assert (files.certificate.read_bytes(), files.private_key.read_bytes()) == before


def test_issuing_with_overwrite_renews_the_certificate_and_key(
    ca_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    first = issue_certificate(ca_dir, out, Role.SITE, "site-a")
    old_key = first.private_key.read_bytes()
    old_serial = _certificate(first).serial_number

    second = issue_certificate(ca_dir, out, Role.SITE, "site-a", overwrite=True)

    assert second == first
    assert second.private_key.read_bytes() != old_key
    assert _certificate(second).serial_number != old_serial
    assert _mode(second.private_key) == 0o600
    assert _mode(second.certificate) == 0o644
    assert sorted(path.name for path in out.iterdir()) == ["site-a.crt", "site-a.key"]


def test_a_certificate_named_ca_cannot_replace_the_ca_files(ca_dir: Path) -> None:
    ca_key = (ca_dir / "ca.key").read_bytes()

    with pytest.raises(PkiError, match="would overwrite the CA files"):
        issue_certificate(ca_dir, ca_dir, Role.ADMIN, "ca", overwrite=True)

    assert (ca_dir / "ca.key").read_bytes() == ca_key


# --- File permissions ----------------------------------------------------------------------------


def test_private_keys_are_0600_and_certificates_0644(ca_dir: Path, tmp_path: Path) -> None:
    files = issue_certificate(ca_dir, tmp_path / "out", Role.SITE, "site-a")

    assert _mode(ca_dir / "ca.key") == 0o600
    assert _mode(ca_dir / "ca.crt") == 0o644
    assert _mode(files.private_key) == 0o600
    assert _mode(files.certificate) == 0o644


@pytest.mark.parametrize("umask", [0o000, 0o077])
def test_file_modes_do_not_depend_on_the_umask(tmp_path: Path, umask: int) -> None:
    previous = os.umask(umask)
    try:
        ca = init_ca(tmp_path / "ca")
        files = issue_certificate(tmp_path / "ca", tmp_path / "out", Role.ADMIN, "alice")
    finally:
        os.umask(previous)

    assert _mode(ca.private_key) == _mode(files.private_key) == 0o600
    assert _mode(ca.certificate) == _mode(files.certificate) == 0o644


# --- Trust ---------------------------------------------------------------------------------------


def test_certificate_verifies_against_its_own_ca_only(tmp_path: Path) -> None:
    init_ca(tmp_path / "ca")
    # Same default subject as the real CA, so only the signature can tell them apart.
    other = init_ca(tmp_path / "other-ca")
    files = issue_certificate(tmp_path / "ca", tmp_path / "out", Role.SITE, "site-a")
    certificate = _certificate(files)

    certificate.verify_directly_issued_by(
        x509.load_pem_x509_certificate(load_pem(tmp_path / "ca" / "ca.crt"))
    )
    with pytest.raises(InvalidSignature):
        certificate.verify_directly_issued_by(_certificate(other))


def test_identity_from_pem_rejects_a_certificate_without_a_role(ca_dir: Path) -> None:
    with pytest.raises(PkiError, match="not a Baton certificate"):
        identity_from_pem(load_pem(ca_dir / "ca.crt"))


def test_identity_from_pem_rejects_data_that_is_not_a_certificate() -> None:
    with pytest.raises(PkiError, match="not a PEM certificate"):
        identity_from_pem(b"-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----\n")


def test_load_pem_reports_missing_and_non_pem_files(tmp_path: Path) -> None:
    with pytest.raises(PkiError, match="cannot read"):
        load_pem(tmp_path / "missing.crt")
    (tmp_path / "junk.crt").write_bytes(b"junk")
    with pytest.raises(PkiError, match="not a PEM file"):
        load_pem(tmp_path / "junk.crt")


# --- Mutual TLS over gRPC ------------------------------------------------------------------------


def _who_am_i(request: bytes, context: grpc.ServicerContext) -> bytes:
    identity = identity_from_pem(context.auth_context()["x509_pem_cert"][0])
    return json.dumps(
        {"role": identity.role.value, "name": identity.name, "serial": identity.serial}
    ).encode()


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    init_ca(tmp_path / "ca")
    init_ca(tmp_path / "rogue-ca")
    issue_certificate(tmp_path / "ca", tmp_path / "certs", Role.COORDINATOR, "coordinator")
    issue_certificate(tmp_path / "ca", tmp_path / "certs", Role.SITE, "site-a")
    issue_certificate(tmp_path / "rogue-ca", tmp_path / "rogue", Role.SITE, "site-a")
    return tmp_path


@pytest.fixture
def mtls_port(pki: Path) -> Iterator[int]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    handler = grpc.unary_unary_rpc_method_handler(
        _who_am_i, request_deserializer=None, response_serializer=None
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("baton.test.Identity", {"WhoAmI": handler}),)
    )
    credentials = grpc.ssl_server_credentials(
        [
            (
                load_pem(pki / "certs" / "coordinator.key"),
                load_pem(pki / "certs" / "coordinator.crt"),
            )
        ],
        root_certificates=load_pem(pki / "ca" / "ca.crt"),
        require_client_auth=True,
    )
    port = server.add_secure_port("localhost:0", credentials)
    server.start()
    try:
        yield port
    finally:
        server.stop(grace=None).wait(timeout=_TIMEOUT_SECONDS)


def _call(port: int, credentials: grpc.ChannelCredentials) -> bytes:
    with grpc.secure_channel(f"localhost:{port}", credentials) as channel:
        who_am_i = channel.unary_unary(_WHOAMI)
        response: bytes = who_am_i(b"", timeout=_TIMEOUT_SECONDS)
        return response


def test_server_sees_the_site_identity_over_mutual_tls(pki: Path, mtls_port: int) -> None:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=load_pem(pki / "ca" / "ca.crt"),
        private_key=load_pem(pki / "certs" / "site-a.key"),
        certificate_chain=load_pem(pki / "certs" / "site-a.crt"),
    )

    seen = json.loads(_call(mtls_port, credentials))

    site_certificate = x509.load_pem_x509_certificate(load_pem(pki / "certs" / "site-a.crt"))
    assert seen == {"role": "site", "name": "site-a", "serial": site_certificate.serial_number}


def test_client_with_a_certificate_from_another_ca_is_refused(pki: Path, mtls_port: int) -> None:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=load_pem(pki / "ca" / "ca.crt"),
        private_key=load_pem(pki / "rogue" / "site-a.key"),
        certificate_chain=load_pem(pki / "rogue" / "site-a.crt"),
    )

    with pytest.raises(grpc.RpcError) as raised:
        _call(mtls_port, credentials)
    assert raised.value.code() is grpc.StatusCode.UNAVAILABLE


def test_client_without_a_certificate_is_refused(pki: Path, mtls_port: int) -> None:
    credentials = grpc.ssl_channel_credentials(root_certificates=load_pem(pki / "ca" / "ca.crt"))

    with pytest.raises(grpc.RpcError) as raised:
        _call(mtls_port, credentials)
    assert raised.value.code() is grpc.StatusCode.UNAVAILABLE


def test_client_that_does_not_trust_the_server_ca_refuses_to_connect(
    pki: Path, mtls_port: int
) -> None:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=load_pem(pki / "rogue-ca" / "ca.crt"),
        private_key=load_pem(pki / "certs" / "site-a.key"),
        certificate_chain=load_pem(pki / "certs" / "site-a.crt"),
    )

    with pytest.raises(grpc.RpcError) as raised:
        _call(mtls_port, credentials)
    assert raised.value.code() is grpc.StatusCode.UNAVAILABLE
