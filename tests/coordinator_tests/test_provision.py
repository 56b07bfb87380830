"""`baton provision`: one ready folder per participant from a consortium file."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
import typer
from cryptography import x509
from typer.testing import CliRunner

from coordinator.console.cli import app as baton_app
from coordinator.console.provision import ProvisionError, load_consortium, provision
from protocols.pki import Role, identity_from_pem
from site_agent.cli import app as site_app

CONSORTIUM = """\
name = "heart-pilot"
[coordinator]
hosts = ["coord.example.org", "10.0.0.5"]
port = 50443
[[sites]]
name = "st-marys"
base-model = "/srv/models/minilm"
threads = 4
[[sites]]
name = "northgate"
days = 30
[[admins]]
name = "alice"
"""


def _flags(app: typer.Typer, *path: str) -> set[str]:
    """Long option names (without dashes) of a Typer command."""
    command = typer.main.get_command(app)
    for name in path:
        command = command.commands[name]  # type: ignore[attr-defined]
    return {opt[2:] for param in command.params for opt in param.opts if opt.startswith("--")}


@pytest.fixture
def consortium_file(tmp_path: Path) -> Path:
    path = tmp_path / "consortium.toml"
    path.write_text(CONSORTIUM)
    return path


def test_each_participant_gets_certificate_key_ca_settings_unit_and_readme(
    consortium_file: Path, tmp_path: Path
) -> None:
    kit = provision(load_consortium(consortium_file), tmp_path / "kit")
    site = tmp_path / "kit" / "sites" / "st-marys"
    assert sorted(p.name for p in site.iterdir()) == [
        "README.md", "baton-site.service", "ca.crt", "site.toml", "st-marys.crt", "st-marys.key",
    ]  # fmt: skip
    assert (site / "st-marys.key").stat().st_mode & 0o077 == 0
    assert identity_from_pem((site / "st-marys.crt").read_bytes()).role is Role.SITE
    assert (site / "ca.crt").read_bytes() == (tmp_path / "kit" / "ca" / "ca.crt").read_bytes()
    assert "outbound TCP to `coord.example.org:50443` only" in (site / "README.md").read_text()
    coordinator = tmp_path / "kit" / "coordinator"
    assert {"coordinator.toml", "baton-coordinator.service", "README.md"} <= {
        p.name for p in coordinator.iterdir()
    }
    assert (tmp_path / "kit" / "admins" / "alice" / "alice.crt").is_file()
    assert set(kit.folders) == {"coordinator", "st-marys", "northgate", "alice"}
    northgate = identity_from_pem((tmp_path / "kit/sites/northgate/northgate.crt").read_bytes())
    assert (northgate.not_valid_after - kit.expires["st-marys"]).days in (-61, -60)


def test_settings_files_use_exactly_the_serve_flag_names(
    consortium_file: Path, tmp_path: Path
) -> None:
    provision(load_consortium(consortium_file), tmp_path / "kit")
    site = tomllib.loads((tmp_path / "kit/sites/st-marys/site.toml").read_text())
    assert set(site) <= _flags(site_app, "serve")
    assert site["coordinator"] == "coord.example.org:50443"
    assert (site["base-model"], site["threads"]) == ("/srv/models/minilm", 4)
    coordinator = tomllib.loads((tmp_path / "kit/coordinator/coordinator.toml").read_text())
    assert set(coordinator) <= _flags(baton_app, "coordinator", "serve")
    assert (coordinator["host"], coordinator["port"]) == ("0.0.0.0", 50443)


def test_coordinator_certificate_names_every_host(consortium_file: Path, tmp_path: Path) -> None:
    provision(load_consortium(consortium_file), tmp_path / "kit")
    pem = (tmp_path / "kit/coordinator/coordinator.crt").read_bytes()
    names = x509.load_pem_x509_certificate(pem).extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    )
    assert "coord.example.org" in names.value.get_values_for_type(x509.DNSName)
    assert "10.0.0.5" in {str(ip) for ip in names.value.get_values_for_type(x509.IPAddress)}


def test_an_existing_kit_is_never_overwritten(consortium_file: Path, tmp_path: Path) -> None:
    (tmp_path / "kit").mkdir()
    (tmp_path / "kit" / "ca.key").write_text("precious")
    with pytest.raises(ProvisionError, match="exists and is not empty"):
        provision(load_consortium(consortium_file), tmp_path / "kit")
    assert (tmp_path / "kit" / "ca.key").read_text() == "precious"


def test_a_failure_leaves_no_partial_kit(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(CONSORTIUM.replace('name = "heart-pilot"', 'name = "x"\n[ca]\ndays = 100'))
    with pytest.raises(ProvisionError, match=r"would outlive the CA at .*kit/ca"):
        provision(load_consortium(path), tmp_path / "kit")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.toml"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('name = "x"\n[coordinator]\nhost = "h"\n[[sites]]\nname = "a"\n',
         "coordinator.hosts: Field required; coordinator.host: Extra inputs"),
        ('name = "x"\n[coordinator]\nhosts = ["h"]\n[[sites]]\nname = "a"\n[[admins]]\n'
         'name = "a"\n', "names used twice: a"),
        ('name = "x"\n[coordinator]\nhosts = []\n', "sites: Field required"),
        ("name = \n", "is not valid TOML"),
    ],
)  # fmt: skip
def test_bad_consortium_files_are_named_precisely(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(ProvisionError, match=message):
        load_consortium(path)


def test_cli_prints_the_folders_or_one_error_line(consortium_file: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "kit"
    result = runner.invoke(baton_app, ["provision", str(consortium_file), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "st-marys" in result.output and "CA (keep offline, never ship)" in result.output
    again = runner.invoke(baton_app, ["provision", str(consortium_file), "--out", str(out)])
    assert again.exit_code == 2
    assert "exists and is not empty" in " ".join(again.output.split())
    assert "Traceback" not in again.output


def test_an_existing_ca_signs_the_kit_and_stays_where_it_is(tmp_path: Path) -> None:
    from protocols.pki import init_ca

    init_ca(tmp_path / "pki")
    path = tmp_path / "consortium.toml"
    path.write_text(CONSORTIUM.replace('name = "heart-pilot"', 'name = "x"\n[ca]\ndir = "pki"'))
    kit = provision(load_consortium(path), tmp_path / "kit")
    assert kit.ca_dir == tmp_path / "pki"
    assert not (tmp_path / "kit" / "ca").exists()
    ca = (tmp_path / "pki" / "ca.crt").read_bytes()
    assert (tmp_path / "kit" / "sites" / "st-marys" / "ca.crt").read_bytes() == ca
