"""The whole `baton` command tree: PKI, the coordinator service, runs, sites and the demo.

`coordinator.console.cli` builds it only for what a single group cannot answer (the root's help,
the top-level commands): `baton GROUP ...` builds that group alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import click
import grpc
import typer
from rich.table import Table
from typer.core import TyperGroup

from coordinator.console._options import (
    AdminCa,
    AdminCert,
    AdminKey,
    Coord,
    admin_client,
    console,
    fail,
)
from coordinator.console.cli import GROUPS, group_app, new_root
from coordinator.console.db_commands import backup_command, restore_command
from coordinator.console.pki_commands import provision_kit
from coordinator.console.simulate_commands import simulate
from protocols.exit_codes import EXIT_RUN_FAILED, EXIT_UNREACHABLE
from protocols.logs import configure_logging

__all__ = ["app"]


class _LazyStudyGroup(TyperGroup):
    """The root command group; `study` (Optuna, the search) is imported only when used,
    so `baton coordinator serve` and the other commands start without it."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), "study"})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name == "study" and cmd_name not in self.commands:
            study = typer.main.get_group(group_app("study"))
            study.name = "study"
            self.add_command(study)
        return super().get_command(ctx, cmd_name)


app = new_root(cls=_LazyStudyGroup)
for _name in GROUPS:
    if _name != "study":
        app.add_typer(group_app(_name), name=_name)
app.command("provision")(provision_kit)
app.command("backup")(backup_command)
app.command("restore")(restore_command)
app.command("simulate")(simulate)


@app.command("sites")
def sites(
    coordinator: Coord = "localhost:50051",
    ca: AdminCa = Path("pki/ca.crt"),
    cert: AdminCert = Path("pki/admin.crt"),
    key: AdminKey = Path("pki/admin.key"),
    wait_for: Annotated[
        list[str] | None,
        typer.Option(help="First wait until this site is connected (repeatable)"),
    ] = None,
    timeout: Annotated[float, typer.Option(help="How long --wait-for waits (seconds)")] = 120.0,
) -> None:
    """List registered sites and whether they are connected."""
    with admin_client(coordinator, ca, cert, key) as client:
        if wait_for:
            try:
                client.wait_for_sites(set(wait_for), timeout)
            except TimeoutError as exc:
                raise fail(str(exc), EXIT_UNREACHABLE) from exc
        try:
            rows = client.sites()
        except grpc.RpcError as exc:
            raise fail(f"{exc.code().name}: {exc.details()}", EXIT_UNREACHABLE) from exc
    table = Table("site", "connected", "agent", "base model", "datasets")
    for site in rows:
        table.add_row(
            site.name,
            "yes" if site.connected else "no",
            site.agent_version,
            ", ".join(m.sha256[:12] for m in site.base_models),
            ", ".join(
                f"{d.name} ({d.train_examples}/{d.validation_examples})" for d in site.datasets
            ),
        )
    console.print(table)


@app.command("demo")
def demo(
    directory: Annotated[Path, typer.Option("--dir", help="Demo directory (recreated)")] = Path(
        "demo"
    ),
    sites: Annotated[int, typer.Option(min=2, max=8)] = 3,
    cycles: Annotated[int, typer.Option(min=1)] = 2,
    steps: Annotated[int, typer.Option(min=1)] = 15,
    base_model: Annotated[
        Path | None, typer.Option(help="Base model folder (default: packaged all-MiniLM-L6-v2)")
    ] = None,
    keep_serving: Annotated[
        bool, typer.Option(help="Keep the coordinator and its dashboard up after the run")
    ] = False,
) -> None:
    """Run a real multi-process sequential run on generated data, then print its summary."""
    from coordinator.console.demo import DemoError, run_demo

    configure_logging("WARNING")
    try:
        run = run_demo(directory, n_sites=sites, cycles=cycles, steps=steps, base_model=base_model,
                       keep_serving=keep_serving)  # fmt: skip
    except DemoError as exc:
        raise fail(str(exc), EXIT_RUN_FAILED) from exc
    if run.status != "completed":
        raise typer.Exit(EXIT_RUN_FAILED)
