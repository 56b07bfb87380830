"""The `baton` command: PKI, the coordinator service, runs, sites and the demo."""

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
from coordinator.console.admin_cli import admin_app
from coordinator.console.coordinator_commands import coordinator_app
from coordinator.console.db_commands import backup_command, db_app, restore_command
from coordinator.console.ledger_commands import ledger_app, store_app
from coordinator.console.pki_commands import pki_app, provision_kit
from coordinator.console.run_commands import run_app
from coordinator.console.statistics_commands import statistics_app
from protocols.exit_codes import EXIT_RUN_FAILED, EXIT_UNREACHABLE
from protocols.logs import configure_logging

__all__ = ["app", "main"]


class _LazyStudyGroup(TyperGroup):
    """The root command group; `study` (Optuna, the search) is imported only when used,
    so `baton coordinator serve` and the other commands start without it."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), "study"})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name == "study" and cmd_name not in self.commands:
            from coordinator.console.study_cli import study_app

            study = typer.main.get_group(study_app)
            study.name = "study"
            self.add_command(study)
        return super().get_command(ctx, cmd_name)


app = typer.Typer(
    pretty_exceptions_show_locals=False,
    help="Baton coordinator: sequential LoRA training across hospitals.",
    no_args_is_help=True,
    cls=_LazyStudyGroup,
)
app.add_typer(pki_app, name="pki")
app.add_typer(coordinator_app, name="coordinator")
app.add_typer(run_app, name="run")
app.add_typer(ledger_app, name="ledger")
app.add_typer(statistics_app, name="statistics")
app.add_typer(store_app, name="store")
app.add_typer(db_app, name="db")
app.add_typer(admin_app, name="admin")
app.command("provision")(provision_kit)
app.command("backup")(backup_command)
app.command("restore")(restore_command)


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


def main() -> None:
    app()
