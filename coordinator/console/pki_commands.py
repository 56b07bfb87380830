"""`baton pki` (the consortium CA and certificates) and `baton provision` (startup kits)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from coordinator.console._options import admin_call, admin_client, console, fail
from protocols.exit_codes import EXIT_BAD_INPUT, EXIT_RUN_FAILED
from protocols.pki import (
    FilesExist,
    PkiError,
    Role,
    expiry_report,
    identity_from_pem,
    init_ca,
    issue_certificate,
    sign_csr,
)

__all__ = ["pki_app", "provision_kit"]

pki_app = typer.Typer(
    pretty_exceptions_show_locals=False,
    help="Consortium CA and certificates.",
    no_args_is_help=True,
)

PkiDir = Annotated[Path, typer.Option("--dir", help="Directory holding ca.crt and ca.key.")]


@pki_app.command("init")
def pki_init(
    directory: PkiDir = Path("pki"),
    days: int = 3650,
    force: Annotated[
        bool, typer.Option("--force", help="Replace an existing CA (its certificates stop working)")
    ] = False,
) -> None:
    """Create the consortium CA (ca.crt, ca.key with 0600 permissions)."""
    try:
        files = init_ca(directory, days=days, overwrite=force)
    except FilesExist as exc:
        message = f"{exc}; pass --force to replace it (every certificate it issued stops working)"
        raise fail(message, EXIT_BAD_INPUT) from exc
    except PkiError as exc:
        raise fail(str(exc), EXIT_BAD_INPUT) from exc
    console.print(f"CA certificate: {files.certificate}\nCA key: {files.private_key}")


@pki_app.command("issue")
def pki_issue(
    role: Annotated[Role, typer.Argument(help="coordinator, site or admin")],
    name: Annotated[str, typer.Argument(help="Site or admin name (coordinator: optional)")] = "",
    directory: PkiDir = Path("pki"),
    out: Annotated[Path | None, typer.Option(help="Output directory (default: --dir)")] = None,
    days: Annotated[int | None, typer.Option(help="Validity in days")] = None,
    dns: Annotated[list[str] | None, typer.Option(help="Extra DNS name (coordinator)")] = None,
    ip: Annotated[list[str] | None, typer.Option(help="Extra IP address (coordinator)")] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Replace an existing certificate and key of NAME")
    ] = False,
) -> None:
    """Issue a certificate for the coordinator, a site or an admin."""
    if not name:
        if role is not Role.COORDINATOR:
            raise fail(f"a {role.value} certificate needs a NAME", EXIT_BAD_INPUT)
        name = "coordinator"
    try:
        files = issue_certificate(
            directory,
            out or directory,
            role,
            name,
            days=days,
            dns_names=dns or (),
            ip_addresses=ip or (),
            overwrite=force,
        )
    except FilesExist as exc:
        raise fail(f"{exc}; pass --force to replace them", EXIT_BAD_INPUT) from exc
    except PkiError as exc:
        raise fail(str(exc), EXIT_BAD_INPUT) from exc
    console.print(f"{role.value} certificate: {files.certificate}\nkey: {files.private_key}")


@pki_app.command("sign")
def pki_sign(
    csr: Annotated[Path, typer.Argument(help="Certificate signing request (PEM)")],
    role: Annotated[Role, typer.Option(help="Role the certificate carries")] = Role.SITE,
    directory: PkiDir = Path("pki"),
    out: Annotated[Path | None, typer.Option(help="Certificate file (default: NAME.crt)")] = None,
    days: Annotated[int | None, typer.Option(help="Validity in days")] = None,
) -> None:
    """Sign a CSR (offline renewal for air-gapped sites); the key never left the site."""
    try:
        certificate = sign_csr(directory, csr.read_bytes(), role, days=days)
    except (PkiError, OSError) as exc:
        raise fail(str(exc), EXIT_BAD_INPUT) from exc
    identity = identity_from_pem(certificate)
    target = out or csr.with_name(f"{identity.name}.crt")
    target.write_bytes(certificate)
    expires = f"{identity.not_valid_after:%Y-%m-%d}"
    console.print(
        f"{role.value} certificate for {identity.name}: {target} "
        f"(serial {identity.serial:x}, expires {expires})"
    )


@pki_app.command("status")
def pki_status(
    directory: PkiDir = Path("pki"),
    warn_days: Annotated[int, typer.Option(help="Warn this many days ahead")] = 30,
) -> None:
    """List certificates with their days left; warn about those expiring soon (exit 1)."""
    table = Table("file", "role", "name", "serial", "days left")
    soon = 0
    for path, identity, days_left in expiry_report(directory):
        flag = "[red]expired[/red]" if days_left < 0 else f"{days_left}"
        if 0 <= days_left < warn_days:
            flag = f"[yellow]{days_left} (renew soon)[/yellow]"
        soon += days_left < warn_days
        table.add_row(path.name, identity.role.value if identity else "CA",
                      identity.name if identity else "", f"{identity.serial:x}" if identity else "",
                      flag)  # fmt: skip
    console.print(table)
    if soon:
        raise typer.Exit(EXIT_RUN_FAILED)


@pki_app.command("revoke")
def pki_revoke(
    serial: Annotated[str | None, typer.Option(help="Certificate serial (hex)")] = None,
    cert: Annotated[Path | None, typer.Option("--certificate", help="Or the certificate")] = None,
    reason: Annotated[str, typer.Option(help="Recorded in the ledger")] = "revoked",
    coordinator: Annotated[str, typer.Option(envvar="BATON_COORDINATOR")] = "localhost:50051",
    ca: Annotated[Path, typer.Option("--ca", envvar="BATON_ADMIN_CA")] = Path("pki/ca.crt"),
    admin_cert: Annotated[Path, typer.Option("--cert", envvar="BATON_ADMIN_CERT")] = Path(
        "pki/admin.crt"
    ),
    key: Annotated[Path, typer.Option("--key", envvar="BATON_ADMIN_KEY")] = Path("pki/admin.key"),
) -> None:
    """Revoke a certificate: refused from the next call on, its open streams closed."""
    if (serial is None) == (cert is None):
        raise fail("give exactly one of --serial or --certificate", EXIT_BAD_INPUT)
    if cert is not None:
        try:
            serial = format(identity_from_pem(cert.read_bytes()).serial, "x")
        except (PkiError, OSError) as exc:
            raise fail(str(exc), EXIT_BAD_INPUT) from exc
    assert serial is not None
    with admin_client(coordinator, ca, admin_cert, key) as client:
        closed = admin_call(lambda: client.revoke(serial, reason))
    console.print(f"certificate {serial} revoked; {closed} open stream(s) closed")


def provision_kit(
    consortium_file: Annotated[Path, typer.Argument(help="consortium.toml")],
    out: Annotated[Path, typer.Option(help="New folder for the kits")] = Path("consortium-kit"),
) -> None:
    """Make a ready folder per participant: certificate, key, CA, settings, systemd unit, README."""
    from coordinator.console.provision import ProvisionError, load_consortium, provision

    try:
        kit = provision(load_consortium(consortium_file), out)
    except ProvisionError as exc:
        raise fail(str(exc), EXIT_BAD_INPUT) from exc
    table = Table("participant", "folder", "certificate expires")
    for name, folder in kit.folders.items():
        table.add_row(name, str(folder), f"{kit.expires[name]:%Y-%m-%d}")
    console.print(table)
    console.print(f"CA (keep offline, never ship): {kit.ca_dir}")
