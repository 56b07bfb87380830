"""Settings files: their keys are the commands' flag names (or the field names)."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from coordinator.settings import load_coordinator_settings
from protocols.settings import SettingsFileError
from site_agent.cli import app as site_app
from site_agent.settings import load_site_settings


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_site_file_takes_the_serve_flag_names(tmp_path: Path) -> None:
    config = _write(
        tmp_path / "site.toml",
        'coordinator = "coord.example.org:50051"\nca = "ca.crt"\ncert = "st-marys.crt"\n'
        'key = "st-marys.key"\ndata-dir = "/srv/baton"\nbase-model = "/srv/models/minilm"\n'
        'threads = 4\napprove = ["' + "a" * 64 + '"]\nserver-name = "coord"\n',
    )
    settings = load_site_settings(config)
    assert settings.ca_certificate == tmp_path / Path("ca.crt")
    assert settings.certificate == tmp_path / Path("st-marys.crt")
    assert settings.private_key == tmp_path / Path("st-marys.key")
    assert settings.data_dir == Path("/srv/baton")
    assert settings.base_model_dir == Path("/srv/models/minilm")
    assert settings.num_threads == 4
    assert settings.approved_bundles == ["a" * 64]
    assert settings.server_name == "coord"


def test_coordinator_file_takes_the_serve_flag_names(tmp_path: Path) -> None:
    config = _write(
        tmp_path / "coordinator.toml",
        'host = "0.0.0.0"\nport = 50051\nstate-dir = "/var/lib/baton"\nca = "ca.crt"\n'
        'cert = "coordinator.crt"\nkey = "coordinator.key"\n',
    )
    settings = load_coordinator_settings(config)
    assert (settings.host, settings.port) == ("0.0.0.0", 50051)
    assert settings.state_dir == Path("/var/lib/baton")
    assert settings.tls.ca_certificate == tmp_path / Path("ca.crt")
    assert settings.tls.certificate == tmp_path / Path("coordinator.crt")
    assert settings.tls.private_key == tmp_path / Path("coordinator.key")


def test_field_names_still_work_and_flags_still_win(tmp_path: Path) -> None:
    config = _write(
        tmp_path / "coordinator.toml",
        'ca_certificate = "ca.crt"\ncertificate = "c.crt"\nprivate_key = "c.key"\nport = 1\n',
    )
    settings = load_coordinator_settings(config, port=2)
    assert settings.ca_certificate == tmp_path / Path("ca.crt")
    assert settings.port == 2


def test_coordinator_listens_on_localhost_unless_told(tmp_path: Path) -> None:
    config = _write(tmp_path / "c.toml", 'ca = "ca.crt"\ncert = "c.crt"\nkey = "c.key"\n')
    assert load_coordinator_settings(config).host == "localhost"


def test_one_setting_under_two_names_is_refused(tmp_path: Path) -> None:
    config = _write(
        tmp_path / "site.toml",
        'coordinator = "c:1"\nca = "a.crt"\nca_certificate = "b.crt"\ncert = "s.crt"\n'
        'key = "s.key"\ndata-dir = "d"\n',
    )
    with pytest.raises(SettingsFileError, match="'ca' and 'ca_certificate' are the same setting"):
        load_site_settings(config)


def test_bad_toml_and_unknown_keys_are_refused(tmp_path: Path) -> None:
    with pytest.raises(SettingsFileError, match="is not valid TOML"):
        load_site_settings(_write(tmp_path / "bad.toml", "coordinator = \n"))
    unknown = _write(
        tmp_path / "unknown.toml",
        'coordinator = "c:1"\nca = "a"\ncert = "s"\nkey = "k"\ndata-dir = "d"\nbase-modle = "x"\n',
    )
    with pytest.raises(ValidationError, match="base_modle"):
        load_site_settings(unknown)


def test_site_serve_reports_a_bad_config_file_in_one_line(tmp_path: Path) -> None:
    config = _write(tmp_path / "site.toml", "coordinator = [\n")
    result = CliRunner().invoke(site_app, ["serve", "--config", str(config)])
    assert result.exit_code == 2
    assert "error: bad site settings:" in result.output
    assert "is not valid TOML" in result.output
    assert "Traceback" not in result.output


def test_relative_paths_in_a_file_are_beside_the_file(tmp_path: Path) -> None:
    folder = tmp_path / "etc"
    folder.mkdir()
    config = _write(
        folder / "site.toml",
        'coordinator = "c:1"\nca = "ca.crt"\ncert = "s.crt"\nkey = "/abs/s.key"\n'
        'data-dir = "../data"\n',
    )
    settings = load_site_settings(config, certificate=Path("flag.crt"))
    assert settings.ca_certificate == folder / "ca.crt"
    assert settings.private_key == Path("/abs/s.key")
    assert settings.data_dir == folder / "../data"
    assert settings.certificate == Path("flag.crt")  # flags stay relative to the working dir
    assert settings.coordinator == "c:1"


def test_the_environment_is_between_the_file_and_the_flags(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = _write(
        tmp_path / "site.toml",
        'coordinator = "file:1"\nca = "ca.crt"\ncert = "s.crt"\nkey = "s.key"\ndata-dir = "d"\n'
        "threads = 2\n",
    )
    monkeypatch.setenv("BATON_SITE_COORDINATOR", "env:1")
    monkeypatch.setenv("baton_site_num_threads", "3")  # names in any case
    monkeypatch.setenv("BATON_SITE_APPROVED_BUNDLES", '["' + "b" * 64 + '"]')  # a list: JSON
    monkeypatch.setenv("BATON_SITE_PRELOAD", "false")
    monkeypatch.setenv("BATON_SITE_NOT_A_SETTING", "ignored")
    settings = load_site_settings(config, num_threads=4)
    assert settings.coordinator == "env:1"
    assert settings.num_threads == 4
    assert settings.approved_bundles == ["b" * 64]
    assert settings.preload == "when-next"
    monkeypatch.setenv("BATON_PORT", "not-a-port")
    with pytest.raises(ValidationError, match="port"):
        load_coordinator_settings(_write(tmp_path / "c.toml", 'ca = "a"\ncert = "c"\nkey = "k"\n'))


def test_a_list_setting_whose_variable_is_not_json_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BATON_SITE_APPROVED_BUNDLES", "abc,def")
    config = _write(
        tmp_path / "site.toml",
        'coordinator = "c:1"\nca = "ca.crt"\ncert = "s.crt"\nkey = "s.key"\ndata-dir = "d"\n',
    )
    with pytest.raises(SettingsFileError, match="BATON_SITE_APPROVED_BUNDLES is not JSON"):
        load_site_settings(config)
    result = CliRunner().invoke(site_app, ["serve", "--config", str(config)])
    assert result.exit_code == 2
    assert "error: bad site settings: environment variable" in result.output
