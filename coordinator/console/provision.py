"""`baton provision`: a consortium file in, one ready folder per participant out (a startup kit).

Each folder holds the participant's certificate and key, the CA certificate, a settings file whose
keys are the service's flag names, the systemd unit and a README for the participant's IT.
The CA key stays in `<out>/ca/` with whoever ran the command.
"""

from __future__ import annotations

import ipaddress
import shutil
import tempfile
import tomllib
from datetime import datetime
from pathlib import Path, PurePosixPath
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from coordinator.console.units import (
    DEFAULT_CONFIG_DIR,
    DEFAULT_PREFIX,
    coordinator_unit,
    site_unit,
)
from protocols.pki import PkiError, Role, identity_from_pem, init_ca, issue_certificate

__all__ = ["Consortium", "ProvisionError", "ProvisionedKit", "load_consortium", "provision"]


class ProvisionError(ValueError):
    """The consortium file is invalid or the kit cannot be written; nothing is half-written."""


class _Entry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CaEntry(_Entry):
    days: int = Field(default=3650, ge=1)
    # An existing CA directory (ca.crt, ca.key) instead of a new CA under <out>/ca.
    dir: Path | None = None


class CoordinatorEntry(_Entry):
    # Names and addresses sites dial; the first is written into every site.toml, all of them
    # go onto the coordinator's certificate.
    hosts: list[str] = Field(min_length=1)
    port: int = Field(default=50051, ge=1, le=65535)
    bind: str = "0.0.0.0"  # what coordinator.toml's `host` listens on
    dashboard_port: int = Field(default=8443, ge=0, le=65535)  # HTTPS admin dashboard
    state_dir: str = "/var/lib/baton"
    database_url: str | None = None
    days: int = Field(default=365, ge=1)


class SiteEntry(_Entry):
    name: str
    data_dir: str = "/var/lib/baton-site"
    base_model: str | None = None
    threads: int | None = Field(default=None, ge=1)
    days: int = Field(default=90, ge=1)


class AdminEntry(_Entry):
    name: str
    days: int = Field(default=365, ge=1)


class InstallEntry(_Entry):
    prefix: str = str(DEFAULT_PREFIX)  # virtual environment holding bin/baton, bin/baton-site
    config_dir: str = str(DEFAULT_CONFIG_DIR)  # where each kit folder is copied


class Consortium(_Entry):
    """The consortium file: who takes part, where the coordinator is, how long certificates live."""

    name: str = Field(min_length=1)
    ca: CaEntry = CaEntry()
    coordinator: CoordinatorEntry
    sites: list[SiteEntry] = Field(min_length=1)
    admins: list[AdminEntry] = Field(default_factory=list)
    install: InstallEntry = InstallEntry()


def _underscored(value: Any) -> Any:
    if isinstance(value, dict):
        return {key.replace("-", "_"): _underscored(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_underscored(item) for item in value]
    return value


def load_consortium(path: Path) -> Consortium:
    """Reads and validates a consortium TOML file (keys with dashes or underscores)."""
    try:
        raw = tomllib.loads(path.read_text())
    except OSError as exc:
        raise ProvisionError(f"cannot read {path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ProvisionError(f"{path} is not valid TOML: {exc}") from exc
    try:
        consortium = Consortium.model_validate(_underscored(raw))
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in error['loc'])}: {error['msg']}"
            for error in exc.errors()
        )
        raise ProvisionError(f"{path}: {problems}") from exc
    names = [site.name for site in consortium.sites] + [a.name for a in consortium.admins]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ProvisionError(f"{path}: names used twice: {', '.join(duplicates)}")
    if "coordinator" in names or "ca" in names:
        raise ProvisionError(f"{path}: 'coordinator' and 'ca' are reserved names")
    if consortium.ca.dir is not None and not consortium.ca.dir.is_absolute():
        # Like settings files: a relative CA folder is beside the consortium file.
        ca = consortium.ca.model_copy(update={"dir": path.parent / consortium.ca.dir})
        consortium = consortium.model_copy(update={"ca": ca})
    return consortium


class ProvisionedKit(BaseModel):
    """What `provision` wrote: each participant's folder and certificate expiry."""

    ca_dir: Path
    folders: dict[str, Path]
    expires: dict[str, datetime]


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'


def _toml(comment: str, settings: dict[str, object]) -> str:
    lines = [f"# {line}".rstrip() for line in comment.splitlines()]
    lines += [
        f"{key} = {_toml_value(value)}" for key, value in settings.items() if value is not None
    ]
    return "\n".join(lines) + "\n"


def _split_hosts(hosts: list[str]) -> tuple[list[str], list[str]]:
    dns, ips = [], []
    for host in hosts:
        try:
            ips.append(str(ipaddress.ip_address(host)))
        except ValueError:
            dns.append(host)
    return dns, ips


def provision(consortium: Consortium, out: Path) -> ProvisionedKit:
    """Writes the kit under `out` (which must not exist or be empty).

    Raises:
        ProvisionError: `out` is not empty, the CA cannot be used, or a certificate would outlive
            the CA. The kit is written aside and moved into place whole: a failure leaves nothing.
    """
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ProvisionError(f"{out} exists and is not empty; give a new folder")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    except OSError as exc:
        raise ProvisionError(f"cannot write under {out.parent}: {exc.strerror}") from exc
    try:
        try:
            kit = _write_kit(consortium, staging)
        except ProvisionError as exc:
            raise ProvisionError(str(exc).replace(str(staging), str(out))) from exc
        if out.exists():
            out.rmdir()
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    moved = {name: out / folder.relative_to(staging) for name, folder in kit.folders.items()}
    ca_dir = out / "ca" if consortium.ca.dir is None else kit.ca_dir
    return ProvisionedKit(ca_dir=ca_dir, folders=moved, expires=kit.expires)


def _write_kit(consortium: Consortium, out: Path) -> ProvisionedKit:
    install = consortium.install
    prefix, config_dir = PurePosixPath(install.prefix), PurePosixPath(install.config_dir)
    try:
        if consortium.ca.dir is not None:
            ca_dir = consortium.ca.dir
        else:
            ca_dir = out / "ca"
            init_ca(ca_dir, days=consortium.ca.days, common_name=f"{consortium.name} CA")
        ca_pem = (ca_dir / "ca.crt").read_bytes()
        coordinator = consortium.coordinator
        address = f"{coordinator.hosts[0]}:{coordinator.port}"
        folders: dict[str, Path] = {}
        expires: dict[str, datetime] = {}

        def issue(folder: Path, role: Role, name: str, days: int, hosts: list[str]) -> None:
            dns, ips = _split_hosts(hosts)
            files = issue_certificate(ca_dir, folder, role, name, days=days,
                                      dns_names=dns, ip_addresses=ips)  # fmt: skip
            (folder / "ca.crt").write_bytes(ca_pem)
            folders[name] = folder
            expires[name] = identity_from_pem(files.certificate.read_bytes()).not_valid_after

        folder = out / "coordinator"
        issue(folder, Role.COORDINATOR, "coordinator", coordinator.days, coordinator.hosts)
        settings: dict[str, object] = {
            "host": coordinator.bind,
            "port": coordinator.port,
            "dashboard-port": coordinator.dashboard_port,
            "state-dir": coordinator.state_dir,
            "database-url": coordinator.database_url,
            "ca": "ca.crt",
            "cert": "coordinator.crt",
            "key": "coordinator.key",
        }
        (folder / "coordinator.toml").write_text(_toml(_COORDINATOR_TOML_HEADER, settings))
        (folder / "baton-coordinator.service").write_text(coordinator_unit(prefix, config_dir))
        (folder / "README.md").write_text(
            _COORDINATOR_README.format(
                consortium=consortium.name, address=address, port=coordinator.port,
                bind=coordinator.bind, prefix=prefix, config_dir=config_dir,
                expires=f"{expires['coordinator']:%Y-%m-%d}", state_dir=coordinator.state_dir,
                sites=", ".join(site.name for site in consortium.sites),
            )
        )  # fmt: skip

        for site in consortium.sites:
            folder = out / "sites" / site.name
            issue(folder, Role.SITE, site.name, site.days, [])
            settings = {
                "coordinator": address,
                "ca": "ca.crt",
                "cert": f"{site.name}.crt",
                "key": f"{site.name}.key",
                "data-dir": site.data_dir,
                "base-model": site.base_model,
                "threads": site.threads,
            }
            (folder / "site.toml").write_text(_toml(_SITE_TOML_HEADER, settings))
            (folder / "baton-site.service").write_text(site_unit(prefix, config_dir))
            (folder / "README.md").write_text(
                _SITE_README.format(
                    consortium=consortium.name, site=site.name, address=address,
                    port=coordinator.port, prefix=prefix, config_dir=config_dir,
                    data_dir=site.data_dir, expires=f"{expires[site.name]:%Y-%m-%d}",
                    days=site.days,
                )
            )  # fmt: skip

        for admin in consortium.admins:
            folder = out / "admins" / admin.name
            issue(folder, Role.ADMIN, admin.name, admin.days, [])
            (folder / "admin.env").write_text(
                f"# source this file from this folder: set -a; . ./admin.env; set +a\n"
                f"BATON_COORDINATOR={address}\nBATON_ADMIN_CA=ca.crt\n"
                f"BATON_ADMIN_CERT={admin.name}.crt\nBATON_ADMIN_KEY={admin.name}.key\n"
            )
            (folder / "README.md").write_text(
                _ADMIN_README.format(
                    consortium=consortium.name, admin=admin.name, address=address,
                    expires=f"{expires[admin.name]:%Y-%m-%d}",
                )
            )  # fmt: skip
    except (PkiError, OSError) as exc:
        raise ProvisionError(str(exc)) from exc
    return ProvisionedKit(ca_dir=ca_dir, folders=folders, expires=expires)


_COORDINATOR_TOML_HEADER = """\
Baton coordinator settings: `baton coordinator serve --config coordinator.toml`.
Keys are the flag names of `baton coordinator serve`; relative paths are beside this file.
host: the address to listen on. 0.0.0.0 accepts sites on every interface; the command's own
default (without this file) is localhost only."""

_SITE_TOML_HEADER = """\
Baton site agent settings: `baton-site serve --config site.toml` is all this site runs.
Keys are the flag names of `baton-site serve`; relative paths are beside this file.
The agent only dials out to `coordinator`; it never listens."""

_COORDINATOR_README = """\
# Baton coordinator kit ({consortium})

This folder is the coordinator's configuration. Sites dial `{address}`.

| file | what |
| --- | --- |
| `coordinator.crt`, `coordinator.key` | this server's certificate and key (keep the key 0600) |
| `ca.crt` | the consortium CA certificate: which peers to trust |
| `coordinator.toml` | settings; keys are the flags of `baton coordinator serve` |
| `baton-coordinator.service` | the hardened systemd unit |

## Install

1. Install Baton into `{prefix}` (see docs/operations.md, "Offline install"):
   `python3 -m venv {prefix} && {prefix}/bin/pip install --no-index --find-links wheelhouse
   'baton-fl[coordinator,postgres]'`.
2. `useradd --system --home-dir /var/lib/baton --shell /usr/sbin/nologin baton`
3. Copy this folder to `{config_dir}` (owner root, group baton; `chmod 0640 {config_dir}/*.key`).
4. `cp {config_dir}/baton-coordinator.service /etc/systemd/system/ &&
   systemctl daemon-reload && systemctl enable --now baton-coordinator`

The coordinator listens on `{bind}:{port}` (gRPC, mTLS). Open this port to the sites
({sites}) and nothing else; it keeps its ledger and checkpoints in `{state_dir}` (back it up).
For PostgreSQL set `database-url` in `coordinator.toml`.

## Certificates

`coordinator.crt` expires on {expires}. Renew it before then with the CA holder
(`baton pki issue coordinator --dir ca --dns ... --days 365`), replace the two files and restart.
`baton pki status --dir .` shows the days left.
"""

_SITE_README = """\
# Baton site kit: {site} ({consortium})

For {site}'s IT. The site agent dials out to the coordinator at `{address}` over mutually
authenticated TLS (gRPC). It opens no listening port: allow outbound TCP to `{address}` only.

| file | what |
| --- | --- |
| `{site}.crt`, `{site}.key` | this site's certificate and key (keep the key 0600/0640) |
| `ca.crt` | the consortium CA certificate |
| `site.toml` | settings; keys are the flags of `baton-site serve` |
| `baton-site.service` | the hardened systemd unit |

## Install

1. Install Baton into `{prefix}` from the offline wheelhouse (no internet needed):
   `python3 -m venv {prefix} && {prefix}/bin/pip install --no-index --find-links wheelhouse
   'baton-fl[site]'` (check `sha256sum -c SHA256SUMS` in the wheelhouse first).
2. `useradd --system --home-dir /var/lib/baton-site --shell /usr/sbin/nologin baton`
3. Copy this folder to `{config_dir}` (owner root, group baton; `chmod 0640 {config_dir}/*.key`).
4. Register the data (as the baton user; the file is read, never copied; systemd creates
   `/var/lib/baton-site` on first start, before that `install -d -o baton -g baton -m 0750
   /var/lib/baton-site`):
   `sudo -u baton {prefix}/bin/baton-site data add NAME /path/to/file.csv --task tabular
   --data-dir {data_dir}`
5. `cp {config_dir}/baton-site.service /etc/systemd/system/ &&
   systemctl daemon-reload && systemctl enable --now baton-site`

By hand, the same is `baton-site serve --config site.toml`.

## Approving runs

A hop runs only for a run bundle this site approved. The ML lead sends the bundle's sha256
(`baton run bundle plan.toml`); review it, then
`sudo -u baton {prefix}/bin/baton-site approve SHA256 --data-dir {data_dir} --by YOUR-NAME`.

## Certificates

`{site}.crt` expires on {expires} ({days}-day validity). Renew it before then, as root in
`{config_dir}`: online with `{prefix}/bin/baton-site cert renew --coordinator {address} --ca ca.crt
--cert {site}.crt --key {site}.key` (where the coordinator holds the CA key), or offline with
`{prefix}/bin/baton-site cert csr --name {site}` and the CSR sent to the CA holder
(`baton pki sign`). Then `chgrp baton {site}.key && chmod 0640 {site}.key` and
`systemctl restart baton-site`. `openssl x509 -enddate -noout -in {config_dir}/{site}.crt` shows
the expiry date.

## Logs

`journalctl -u baton-site`. Logs carry run, hop and site identifiers and metrics, never records,
tensors or keys.
"""

_ADMIN_README = """\
# Baton admin kit: {admin} ({consortium})

Your admin certificate for starting and watching runs on the coordinator at `{address}`.
Every `baton` admin command takes `--coordinator {address} --ca ca.crt --cert {admin}.crt
--key {admin}.key`, or reads them from `BATON_COORDINATOR`, `BATON_ADMIN_CA`, `BATON_ADMIN_CERT`,
`BATON_ADMIN_KEY`: from this folder, `set -a; . ./admin.env; set +a`, then

    baton sites
    baton run bundle plan.toml     # the sha256 each site approves
    baton run start plan.toml --follow

`{admin}.crt` expires on {expires}.
"""
