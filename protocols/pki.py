"""Baton's private PKI: the consortium CA, role certificates for mutual TLS, and peer identities.

Keys are ECDSA P-256 written as unencrypted PKCS8 PEM. Hospitals protect them with file permissions
(0600, set when the file is created); keeping keys in an HSM is future work.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = [
    "CertificateFiles",
    "FilesExist",
    "PeerIdentity",
    "PkiError",
    "Role",
    "create_csr",
    "expiry_report",
    "identity_from_pem",
    "init_ca",
    "issue_certificate",
    "load_pem",
    "sign_csr",
]

logger = logging.getLogger(__name__)

ORGANIZATION = "Baton"
CA_CERTIFICATE_FILE = "ca.crt"
CA_KEY_FILE = "ca.key"

_KEY_MODE = 0o600
_CERTIFICATE_MODE = 0o644
# Tolerates peers whose clocks run a little behind the issuer's.
_CLOCK_SKEW = timedelta(minutes=5)
# Names become file names and certificate CNs: no separators, no leading dot, so no path traversal.
_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_DNS_LABEL_PATTERN = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_MAX_DNS_NAME_LENGTH = 253


class Role(StrEnum):
    """What a certificate holder is allowed to be in the consortium (stored as the subject OU)."""

    COORDINATOR = "coordinator"
    SITE = "site"
    ADMIN = "admin"


_DEFAULT_VALIDITY_DAYS: dict[Role, int] = {
    Role.COORDINATOR: 365,
    Role.SITE: 90,
    Role.ADMIN: 365,
}
_COORDINATOR_DEFAULT_DNS_NAMES = ("localhost",)
_COORDINATOR_DEFAULT_IP_ADDRESSES = ("127.0.0.1", "::1")


class PkiError(Exception):
    """A certificate or key could not be created, read or trusted."""


class FilesExist(PkiError):
    """The CA, certificate or key to write already exists (the caller decides how to replace)."""


@dataclass(frozen=True)
class CertificateFiles:
    """Where a certificate and its private key were written."""

    certificate: Path
    private_key: Path


@dataclass(frozen=True)
class PeerIdentity:
    """Who a verified peer certificate says its holder is."""

    role: Role
    name: str
    serial: int
    not_valid_after: datetime


def init_ca(
    directory: Path,
    *,
    common_name: str = "Baton Consortium CA",
    days: int = 3650,
    overwrite: bool = False,
) -> CertificateFiles:
    """Create the consortium CA as ``ca.crt`` and ``ca.key`` in ``directory``.

    Args:
        directory: Where to write the CA; created (mode 0700) if missing.
        common_name: Subject CN of the CA certificate.
        days: Validity of the CA certificate.
        overwrite: Replace an existing CA. Every certificate it issued stops being trusted.

    Returns:
        The paths of the CA certificate and key.

    Raises:
        PkiError: If a CA already exists and ``overwrite`` is false, or an argument is invalid.
    """
    if not common_name.strip():
        raise PkiError("CA common name must not be empty")
    _check_days(days)
    directory = Path(directory)
    files = CertificateFiles(
        certificate=directory / CA_CERTIFICATE_FILE, private_key=directory / CA_KEY_FILE
    )
    if not overwrite and (files.certificate.exists() or files.private_key.exists()):
        raise FilesExist(f"a CA already exists at {directory}")

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )
    now = datetime.now(UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(now + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )

    _ensure_directory(directory)
    _write_pair(files, certificate, key, overwrite=overwrite)
    logger.info(
        "created CA %r at %s (serial %x, expires %s)",
        common_name,
        directory,
        certificate.serial_number,
        certificate.not_valid_after_utc.isoformat(),
    )
    return files


def issue_certificate(
    ca_directory: Path,
    out_directory: Path,
    role: Role,
    name: str,
    *,
    days: int | None = None,
    dns_names: Sequence[str] = (),
    ip_addresses: Sequence[str] = (),
    overwrite: bool = False,
) -> CertificateFiles:
    """Issue a certificate for a coordinator, site or admin, signed by the CA in ``ca_directory``.

    The certificate and key are written as ``{name}.crt`` and ``{name}.key`` in ``out_directory``.
    A coordinator certificate always names ``localhost``, ``127.0.0.1`` and ``::1`` besides any
    ``dns_names``/``ip_addresses``; site and admin certificates carry a subject alternative name
    only when some are given.

    Args:
        ca_directory: Directory holding ``ca.crt`` and ``ca.key`` (see `init_ca`).
        out_directory: Where to write the certificate and key; created (mode 0700) if missing.
        role: The holder's role, stored as the subject OU.
        name: The holder's name: 1-64 characters of ``[A-Za-z0-9._-]``, starting alphanumeric.
        days: Validity; defaults to 90 days for sites and 365 for coordinators and admins.
        dns_names: Extra DNS subject alternative names.
        ip_addresses: Extra IP subject alternative names.
        overwrite: Replace an existing certificate and key of the same name (e.g. to renew).

    Returns:
        The paths of the new certificate and key.

    Raises:
        PkiError: If the CA cannot be loaded, an argument is invalid, the certificate would outlive
            the CA, or the files exist and ``overwrite`` is false.
    """
    try:
        role = Role(role)
    except ValueError:
        raise PkiError(f"unknown role {role!r}") from None
    _check_name(name)
    if days is None:
        days = _DEFAULT_VALIDITY_DAYS[role]
    _check_days(days)
    ca_directory = Path(ca_directory)
    out_directory = Path(out_directory)
    files = CertificateFiles(
        certificate=out_directory / f"{name}.crt", private_key=out_directory / f"{name}.key"
    )
    ca_files = CertificateFiles(
        certificate=ca_directory / CA_CERTIFICATE_FILE, private_key=ca_directory / CA_KEY_FILE
    )
    written = {files.certificate.resolve(), files.private_key.resolve()}
    if written & {ca_files.certificate.resolve(), ca_files.private_key.resolve()}:
        raise PkiError(f"name {name!r} would overwrite the CA files in {ca_directory}")
    if not overwrite:
        existing = [str(path) for path in (files.certificate, files.private_key) if path.exists()]
        if existing:
            raise FilesExist(f"refusing to overwrite {', '.join(existing)}: already there")

    ca_certificate, ca_key = _load_ca(ca_files)
    now = datetime.now(UTC)
    not_valid_after = now + timedelta(days=days)
    if not_valid_after > ca_certificate.not_valid_after_utc:
        raise PkiError(
            f"a {days}-day certificate would outlive the CA at {ca_directory} "
            f"(expires {ca_certificate.not_valid_after_utc.isoformat()})"
        )

    key = ec.generate_private_key(ec.SECP256R1())
    certificate = _build_certificate(
        ca_certificate, ca_key, role, name, key.public_key(), now, not_valid_after,
        dns_names, ip_addresses,
    )  # fmt: skip

    _ensure_directory(out_directory)
    _write_pair(files, certificate, key, overwrite=overwrite)
    logger.info(
        "issued %s certificate for %r in %s (serial %x, expires %s)",
        role.value,
        name,
        out_directory,
        certificate.serial_number,
        certificate.not_valid_after_utc.isoformat(),
    )
    return files


def identity_from_pem(pem: bytes) -> PeerIdentity:
    """Read the role and name from a Baton leaf certificate.

    This does not check who signed the certificate: use it on certificates the TLS layer has
    already verified, such as ``context.auth_context()["x509_pem_cert"][0]`` in a gRPC servicer.

    Args:
        pem: The certificate in PEM form.

    Returns:
        The holder's role (subject OU), name (subject CN), serial number and expiry.

    Raises:
        PkiError: If ``pem`` is not a certificate or lacks a known role or a valid name.
    """
    try:
        certificate = x509.load_pem_x509_certificate(pem)
    except ValueError as exc:
        raise PkiError(f"not a PEM certificate: {exc}") from exc
    subject = certificate.subject.rfc4514_string()

    units = certificate.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    if len(units) != 1:
        raise PkiError(f"not a Baton certificate: expected one role OU in {subject}")
    unit = units[0].value
    try:
        role = Role(unit if isinstance(unit, str) else "")
    except ValueError:
        raise PkiError(f"not a Baton certificate: unknown role {unit!r} in {subject}") from None

    common_names = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(common_names) != 1:
        raise PkiError(f"not a Baton certificate: expected one CN in {subject}")
    name = common_names[0].value
    if not isinstance(name, str) or not _NAME_PATTERN.fullmatch(name):
        raise PkiError(f"not a Baton certificate: invalid name {name!r} in {subject}")

    return PeerIdentity(
        role=role,
        name=name,
        serial=certificate.serial_number,
        not_valid_after=certificate.not_valid_after_utc,
    )


def load_pem(path: Path) -> bytes:
    """Read a PEM file (certificate or key), e.g. to build gRPC credentials.

    Raises:
        PkiError: If the file cannot be read or holds no PEM block.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise PkiError(f"cannot read {path}: {exc.strerror or exc}") from exc
    if b"-----BEGIN " not in data:
        raise PkiError(f"not a PEM file: {path}")
    return data


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not _NAME_PATTERN.fullmatch(name):
        raise PkiError(
            f"invalid name {name!r}: use 1-64 characters of A-Z, a-z, 0-9, '.', '_' or '-', "
            "starting with a letter or digit"
        )


def _check_days(days: int) -> None:
    if isinstance(days, bool) or not isinstance(days, int) or days < 1:
        raise PkiError(f"validity must be a positive number of days, got {days!r}")


def _alternative_names(
    dns_names: Sequence[str], ip_addresses: Sequence[str]
) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for dns_name in dict.fromkeys(dns_names):
        labels = dns_name.split(".")
        if len(dns_name) > _MAX_DNS_NAME_LENGTH or not all(
            _DNS_LABEL_PATTERN.fullmatch(label) for label in labels
        ):
            raise PkiError(f"invalid DNS name {dns_name!r}")
        names.append(x509.DNSName(dns_name))
    addresses: dict[ipaddress.IPv4Address | ipaddress.IPv6Address, None] = {}
    for text in ip_addresses:
        try:
            addresses[ipaddress.ip_address(text)] = None
        except ValueError:
            raise PkiError(f"invalid IP address {text!r}") from None
    names.extend(x509.IPAddress(address) for address in addresses)
    return names


def _authority_key_identifier(ca_certificate: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    try:
        ski = ca_certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    except x509.ExtensionNotFound:
        public_key = ca_certificate.public_key()
        if not isinstance(public_key, ec.EllipticCurvePublicKey):
            raise PkiError("CA public key is not an elliptic-curve key") from None
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(public_key)
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski.value)


def _load_ca(
    files: CertificateFiles,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    if not files.certificate.exists() or not files.private_key.exists():
        raise PkiError(
            f"no CA at {files.certificate.parent}: expected {files.certificate.name} and "
            f"{files.private_key.name} (create them with init_ca)"
        )
    try:
        certificate = x509.load_pem_x509_certificate(load_pem(files.certificate))
    except ValueError as exc:
        raise PkiError(f"cannot parse CA certificate {files.certificate}: {exc}") from exc
    try:
        key = serialization.load_pem_private_key(load_pem(files.private_key), password=None)
    except (TypeError, ValueError) as exc:
        # The message may describe the key material, so it is not repeated here.
        raise PkiError(f"cannot load CA key {files.private_key}") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PkiError(f"CA key {files.private_key} is not an elliptic-curve key")
    if key.public_key() != certificate.public_key():
        raise PkiError(f"CA key {files.private_key} does not match {files.certificate}")
    try:
        constraints = certificate.extensions.get_extension_for_class(x509.BasicConstraints)
    except x509.ExtensionNotFound:
        raise PkiError(f"{files.certificate} is not a CA certificate") from None
    if not constraints.value.ca:
        raise PkiError(f"{files.certificate} is not a CA certificate")
    if certificate.not_valid_after_utc <= datetime.now(UTC):
        raise PkiError(f"CA certificate {files.certificate} has expired")
    return certificate, key


def _ensure_directory(directory: Path) -> None:
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise PkiError(f"cannot create directory {directory}: {exc.strerror or exc}") from exc


def _write_pair(
    files: CertificateFiles,
    certificate: x509.Certificate,
    key: ec.EllipticCurvePrivateKey,
    *,
    overwrite: bool,
) -> None:
    """Write the key, then the certificate; a fresh key is removed if the certificate fails."""
    key_pem = key.private_bytes(
        encoding=serialization.Encoding.PEM,
        format=serialization.PrivateFormat.PKCS8,
        encryption_algorithm=serialization.NoEncryption(),
    )
    certificate_pem = certificate.public_bytes(serialization.Encoding.PEM)
    _write_file(files.private_key, key_pem, mode=_KEY_MODE, overwrite=overwrite)
    try:
        _write_file(files.certificate, certificate_pem, mode=_CERTIFICATE_MODE, overwrite=overwrite)
    except BaseException:
        if not overwrite:
            files.private_key.unlink(missing_ok=True)
        raise


def _write_file(path: Path, data: bytes, *, mode: int, overwrite: bool) -> None:
    """Write ``data`` to ``path``, creating it with ``mode`` so it is never more permissive.

    Without ``overwrite`` the file is created exclusively; with it, a temporary file in the same
    directory (created with the same mode) is written and then renamed over ``path``.
    """
    target = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp") if overwrite else path
    try:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        raise FilesExist(f"refusing to overwrite {path}: already there") from None
    except OSError as exc:
        raise PkiError(f"cannot create {target}: {exc.strerror or exc}") from exc
    try:
        with os.fdopen(fd, "wb") as stream:
            # The file was created no more permissive than `mode`; this only undoes a umask that
            # would hide a certificate from the services that read it. Nothing is written yet.
            os.fchmod(stream.fileno(), mode)
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        if overwrite:
            os.replace(target, path)
    except BaseException as exc:
        target.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise PkiError(f"cannot write {path}: {exc.strerror or exc}") from exc
        raise


def _build_certificate(
    ca_certificate: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    role: Role,
    name: str,
    public_key: ec.EllipticCurvePublicKey,
    now: datetime,
    not_valid_after: datetime,
    dns_names: Sequence[str],
    ip_addresses: Sequence[str],
) -> x509.Certificate:
    if role is Role.COORDINATOR:
        dns_names = [*_COORDINATOR_DEFAULT_DNS_NAMES, *dns_names]
        ip_addresses = [*_COORDINATOR_DEFAULT_IP_ADDRESSES, *ip_addresses]
    alternative_names = _alternative_names(dns_names, ip_addresses)
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
    if role is Role.COORDINATOR:
        usages.insert(0, ExtendedKeyUsageOID.SERVER_AUTH)

    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role.value),
            x509.NameAttribute(NameOID.COMMON_NAME, name),
        ]
    )
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_certificate.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(not_valid_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(_authority_key_identifier(ca_certificate), critical=False)
    )
    if alternative_names:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(alternative_names), critical=False
        )
    return builder.sign(ca_key, hashes.SHA256())


def create_csr(out_directory: Path, name: str, *, overwrite: bool = False) -> CertificateFiles:
    """Makes a new key and a certificate signing request for `name` (renewal, air-gapped sites).

    Writes ``{name}.key`` (0600) and ``{name}.csr``; returns them as (csr, key) in a
    CertificateFiles whose ``certificate`` is the CSR path. The key never leaves the site.
    """
    _check_name(name)
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .sign(key, hashes.SHA256())
    )
    out_directory = Path(out_directory)
    _ensure_directory(out_directory)
    files = CertificateFiles(out_directory / f"{name}.csr", out_directory / f"{name}.key")
    key_pem = key.private_bytes(
        encoding=serialization.Encoding.PEM,
        format=serialization.PrivateFormat.PKCS8,
        encryption_algorithm=serialization.NoEncryption(),
    )
    _write_file(files.private_key, key_pem, mode=0o600, overwrite=overwrite)
    _write_file(
        files.certificate,
        csr.public_bytes(serialization.Encoding.PEM),
        mode=0o644,
        overwrite=overwrite,
    )
    return files


def sign_csr(
    ca_directory: Path,
    csr_pem: bytes,
    role: Role,
    *,
    expected_name: str | None = None,
    days: int | None = None,
) -> bytes:
    """Issues a certificate (PEM) for a CSR; the name comes from the CSR's CN.

    Raises:
        PkiError: If the CSR is malformed, its signature does not verify, its name is invalid or
            differs from `expected_name` (a site renewing may only renew itself).
    """
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except ValueError as exc:
        raise PkiError(f"not a PEM certificate signing request: {exc}") from exc
    if not csr.is_signature_valid:
        raise PkiError("certificate signing request signature does not verify")
    names = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(names) != 1:
        raise PkiError("certificate signing request must carry exactly one CN")
    name = str(names[0].value)
    _check_name(name)
    if expected_name is not None and name != expected_name:
        raise PkiError(f"CSR names {name!r}; the caller may only renew {expected_name!r}")
    public_key = csr.public_key()
    if not isinstance(public_key, ec.EllipticCurvePublicKey):
        raise PkiError("certificate signing request must hold an ECDSA P-256 key")
    role = Role(role)
    days = _DEFAULT_VALIDITY_DAYS[role] if days is None else days
    _check_days(days)
    ca_directory = Path(ca_directory)
    ca_certificate, ca_key = _load_ca(
        CertificateFiles(ca_directory / CA_CERTIFICATE_FILE, ca_directory / CA_KEY_FILE)
    )
    now = datetime.now(UTC)
    not_valid_after = min(now + timedelta(days=days), ca_certificate.not_valid_after_utc)
    certificate = _build_certificate(
        ca_certificate, ca_key, role, name, public_key, now, not_valid_after, (), ()
    )
    logger.info("signed a %s certificate for %r from a CSR (serial %x)", role.value, name,
                certificate.serial_number)  # fmt: skip
    return certificate.public_bytes(serialization.Encoding.PEM)


def expiry_report(directory: Path) -> list[tuple[Path, PeerIdentity | None, int]]:
    """Every certificate in a directory with its identity and days left (negative: expired)."""
    now = datetime.now(UTC)
    report = []
    for path in sorted(Path(directory).glob("*.crt")):
        certificate = x509.load_pem_x509_certificate(path.read_bytes())
        try:
            identity: PeerIdentity | None = identity_from_pem(path.read_bytes())
        except PkiError:
            identity = None  # the CA itself
        report.append((path, identity, (certificate.not_valid_after_utc - now).days))
    return report
