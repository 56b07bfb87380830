"""Services and commands fail fast: one line, a meaningful exit code, no traceback, no secret."""

from __future__ import annotations

from pathlib import Path

import typer
from typer.testing import CliRunner

from coordinator.console.cli import app

runner = CliRunner()


def _typer_apps(root: typer.Typer) -> list[typer.Typer]:
    found = [root]
    for group in root.registered_groups:
        assert group.typer_instance is not None
        found += _typer_apps(group.typer_instance)
    return found


def test_no_typer_app_prints_local_variables_in_a_traceback() -> None:
    from site_agent.cli import app as site_app

    apps = _typer_apps(app) + _typer_apps(site_app)
    assert len(apps) > 5
    assert [a for a in apps if a.pretty_exceptions_show_locals] == []


def test_pki_init_on_an_existing_ca_offers_the_force_flag(tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    assert runner.invoke(app, ["pki", "init", "--dir", str(pki)]).exit_code == 0
    first = (pki / "ca.crt").read_bytes()
    again = runner.invoke(app, ["pki", "init", "--dir", str(pki)])
    assert again.exit_code == 2
    assert "--force" in again.output and "overwrite=" not in again.output
    assert len(again.output.strip().splitlines()) == 1
    assert (pki / "ca.crt").read_bytes() == first
    forced = runner.invoke(app, ["pki", "init", "--dir", str(pki), "--force"])
    assert forced.exit_code == 0, forced.output
    assert (pki / "ca.crt").read_bytes() != first


def test_pki_issue_over_an_existing_certificate_offers_the_force_flag(tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    runner.invoke(app, ["pki", "init", "--dir", str(pki)])
    issue = ["pki", "issue", "site", "st-marys", "--dir", str(pki)]
    assert runner.invoke(app, issue).exit_code == 0
    again = runner.invoke(app, issue)
    assert again.exit_code == 2
    assert "--force" in again.output and "overwrite=" not in again.output
    forced = runner.invoke(app, [*issue, "--force"])
    assert forced.exit_code == 0, forced.output
