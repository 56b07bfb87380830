"""`baton GROUP ...` builds that group alone: `coordinator serve` reaches ready without the other
groups' modules, rich or the settings libraries'
providers, and each group alone is the group of the whole tree."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import click
import typer

from coordinator.console.cli import GROUPS, app, group_app, new_root
from tests.conftest import Pki

# What only the other command groups (and the whole tree) import.
_OTHER_GROUPS = {module for name, (module, _) in GROUPS.items() if name != "coordinator"}
_TREE_ONLY = {"coordinator.console.root", "coordinator.console.simulate_commands", "rich"}
# pydantic-settings imported every settings source and provider it has (dotenv, argparse...).
_SETTINGS_PROVIDERS = {"pydantic_settings", "dotenv", "argparse"}


def test_serve_reaches_ready_without_the_other_groups_or_rich(pki: Pki, tmp_path: Path) -> None:
    state = tmp_path / "state"
    port_file = tmp_path / "port"
    stderr = tmp_path / "serve.stderr"
    with stderr.open("wb") as sink:
        process = subprocess.Popen(
            [sys.executable, "-X", "importtime", "-m", "coordinator", "coordinator", "serve",
             "--port", "0", "--port-file", str(port_file), "--dashboard-port", "0",
             "--state-dir", str(state), "--ca", str(pki.directory / "ca.crt"),
             "--cert", str(pki.directory / "coordinator.crt"),
             "--key", str(pki.directory / "coordinator.key"), "--log-level", "WARNING"],
            stdout=subprocess.DEVNULL, stderr=sink, stdin=subprocess.DEVNULL,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not (port_file.is_file() and port_file.read_text()):
            assert process.poll() is None, stderr.read_text()[-2000:]
            assert time.monotonic() < deadline, "the coordinator did not start"
            time.sleep(0.05)
        imported = {line.rsplit("|", 1)[-1].strip() for line in stderr.read_text().splitlines()
                    if line.startswith("import time:")}  # fmt: skip
    finally:
        process.terminate()
        process.wait(timeout=60)
    assert "coordinator.server" in imported  # importtime listed the serving process's imports
    assert not {name for name in imported
                if name in _OTHER_GROUPS | _TREE_ONLY or name.startswith("rich.")}  # fmt: skip
    assert not imported & _SETTINGS_PROVIDERS


def _shape(command: click.Command) -> object:
    """A command's names, options and help, recursively: what a user can type and read."""
    if isinstance(command, click.Group):
        return {name: _shape(sub) for name, sub in sorted(command.commands.items())}
    return (command.help, sorted((tuple(p.opts), p.required, p.type.name) for p in command.params))


def test_each_group_alone_is_the_group_of_the_whole_tree() -> None:
    tree = typer.main.get_command(app)
    assert isinstance(tree, click.Group)
    context = click.Context(tree)
    assert set(GROUPS) <= set(tree.list_commands(context))
    for name in GROUPS:
        alone = new_root()
        alone.add_typer(group_app(name), name=name)
        single = typer.main.get_command(alone)
        assert isinstance(single, click.Group) and list(single.commands) == [name]
        in_tree = tree.get_command(context, name)
        assert in_tree is not None
        assert single.commands[name].help == in_tree.help
        assert _shape(single.commands[name]) == _shape(in_tree)
