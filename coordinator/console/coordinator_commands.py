"""`baton coordinator serve`: the coordinator service in the foreground."""

from __future__ import annotations

import asyncio
import gc
from pathlib import Path
from typing import Annotated

import click
import typer

from coordinator.console._options import LogFormat, fail
from protocols.exit_codes import EXIT_BAD_INPUT, EXIT_RUN_FAILED
from protocols.logs import configure_logging
from protocols.pki import PkiError
from protocols.settings import settings_problems

__all__ = ["coordinator_app"]

coordinator_app = typer.Typer(
    pretty_exceptions_show_locals=False, help="The coordinator service.", no_args_is_help=True
)


@coordinator_app.command("serve")
def coordinator_serve(
    config: Annotated[Path | None, typer.Option(help="TOML settings file")] = None,
    host: Annotated[
        str | None,
        typer.Option(help="Address to bind (default localhost only; 0.0.0.0 for all interfaces)"),
    ] = None,
    port: Annotated[int | None, typer.Option(help="0 picks a free port")] = None,
    state_dir: Annotated[Path | None, typer.Option(help="Ledger and checkpoint store")] = None,
    database_url: Annotated[str | None, typer.Option(help="SQLAlchemy URL")] = None,
    ca: Annotated[Path | None, typer.Option("--ca")] = None,
    cert: Annotated[Path | None, typer.Option("--cert")] = None,
    key: Annotated[Path | None, typer.Option("--key")] = None,
    port_file: Annotated[Path | None, typer.Option(help="Write the bound port here")] = None,
    ca_dir: Annotated[
        Path | None, typer.Option(help="CA directory with ca.key: enables online renewal")
    ] = None,
    log_level: str = "INFO",
    log_json: bool = False,
    log_format: LogFormat = None,
    metrics_host: Annotated[str | None, typer.Option(help="Interface of the HTTP port")] = None,
    metrics_port: Annotated[
        int | None, typer.Option(help="HTTP /metrics /healthz /readyz port (default: off)")
    ] = None,
    metrics_port_file: Annotated[
        Path | None, typer.Option(help="Write the bound metrics port here")
    ] = None,
    shutdown_grace: Annotated[
        float | None, typer.Option(help="SIGTERM: seconds calls in flight get to finish")
    ] = None,
    dashboard: Annotated[
        bool | None, typer.Option("--dashboard/--no-dashboard", help="Serve the admin dashboard")
    ] = None,
    dashboard_port: Annotated[
        int | None, typer.Option(help="Dashboard HTTPS port (default 8443; 0 picks one)")
    ] = None,
    dashboard_port_file: Annotated[
        Path | None, typer.Option(help="Write the dashboard's bound port here")
    ] = None,
) -> None:
    """Run the coordinator until SIGINT/SIGTERM (and its HTTPS dashboard, unless --no-dashboard)."""
    # What start-up imports and builds lives as long as the process: the cyclic collector's
    # passes over it (8% of the start's CPU) find next to nothing. On again, with start-up's
    # heap frozen, once the coordinator is ready (coordinator.server.freeze_start_up); a refused
    # start (an in-process caller) gets it back when the command ends.
    context = click.get_current_context(silent=True)
    if context is not None and gc.isenabled():
        gc.disable()
        context.call_on_close(gc.enable)
    from pydantic import ValidationError

    from coordinator.launch import serve
    from coordinator.settings import load_coordinator_settings
    from protocols.settings import SettingsFileError

    configure_logging(log_level, log_json or log_format == "json")
    try:
        settings = load_coordinator_settings(
            config,
            host=host,
            port=port,
            state_dir=state_dir,
            database_url=database_url,
            ca_certificate=ca,
            certificate=cert,
            private_key=key,
            port_file=port_file,
            ca_dir=ca_dir,
            metrics_host=metrics_host,
            metrics_port=metrics_port,
            metrics_port_file=metrics_port_file,
            shutdown_grace=shutdown_grace,
            dashboard=dashboard,
            dashboard_port=dashboard_port,
            dashboard_port_file=dashboard_port_file,
        )
    except ValidationError as exc:
        raise fail(f"bad coordinator settings: {settings_problems(exc)}", EXIT_BAD_INPUT) from exc
    except (FileNotFoundError, SettingsFileError) as exc:
        raise fail(f"bad coordinator settings: {exc}", EXIT_BAD_INPUT) from exc
    from coordinator.startup import AlreadyRunning, StartupError
    from protocols.transport import PortInUse

    try:
        asyncio.run(serve(settings))
    except (PortInUse, AlreadyRunning) as exc:
        raise fail(str(exc), EXIT_RUN_FAILED) from exc
    except (StartupError, PkiError, OSError) as exc:
        raise fail(str(exc), EXIT_BAD_INPUT) from exc
