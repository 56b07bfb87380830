"""The `baton-site` command: run the site agent as a service, and site-side utilities."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Annotated

import typer

from protocols.logs import configure_logging

__all__ = ["app", "main"]

app = typer.Typer(
    help="Baton site agent: trains the coordinator's hops on local data.", no_args_is_help=True
)

# Exit codes: 0 ok, 2 bad input (config, files).
EXIT_BAD_INPUT = 2


@app.command("serve")
def serve(
    config: Annotated[Path | None, typer.Option(help="TOML settings file")] = None,
    coordinator: Annotated[str | None, typer.Option(help="Coordinator host:port")] = None,
    server_name: Annotated[str | None, typer.Option(help="Name on the coordinator cert")] = None,
    ca: Annotated[Path | None, typer.Option("--ca")] = None,
    cert: Annotated[Path | None, typer.Option("--cert")] = None,
    key: Annotated[Path | None, typer.Option("--key")] = None,
    data_dir: Annotated[Path | None, typer.Option(help="Folder of registered datasets")] = None,
    base_model: Annotated[Path | None, typer.Option(help="Local base model folder")] = None,
    device: Annotated[str | None, typer.Option(help="cuda, cuda:1, cpu (default: auto)")] = None,
    threads: Annotated[int | None, typer.Option(help="CPU threads for torch")] = None,
    log_level: str = "INFO",
    log_json: bool = False,
) -> None:
    """Connect out to the coordinator and run hops until SIGINT/SIGTERM."""
    from pydantic import ValidationError

    from protocols.pki import PkiError
    from site_agent.agent import SiteAgent
    from site_agent.settings import load_site_settings

    configure_logging(log_level, log_json)
    try:
        settings = load_site_settings(
            config,
            coordinator=coordinator,
            server_name=server_name,
            ca_certificate=ca,
            certificate=cert,
            private_key=key,
            data_dir=data_dir,
            base_model_dir=base_model,
            device=device,
            num_threads=threads,
        )
    except (ValidationError, FileNotFoundError) as exc:
        typer.echo(f"error: bad site settings: {exc}", err=True)
        raise typer.Exit(EXIT_BAD_INPUT) from exc
    if not settings.base_model_dir.is_dir():
        typer.echo(f"error: base model folder not found: {settings.base_model_dir}", err=True)
        raise typer.Exit(EXIT_BAD_INPUT)
    agent = SiteAgent(settings)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: agent.stop())
    try:
        agent.run()
    except PkiError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(EXIT_BAD_INPUT) from exc


@app.command("demo-data")
def demo_data(
    out: Annotated[Path, typer.Option(help="JSONL file to write")],
    site_index: Annotated[int, typer.Option(min=0)] = 0,
    sites: Annotated[int, typer.Option(min=1)] = 3,
    n: Annotated[int, typer.Option(min=10, help="Rows")] = 240,
    seed: int = 0,
) -> None:
    """Write generated clinical-style triage notes for one demo site (no real patients)."""
    from site_agent._synthetic import SYNTHETIC_LABELS, generate_site_records, write_site_dataset

    out.parent.mkdir(parents=True, exist_ok=True)
    records = generate_site_records(site_index, sites, n=n, seed=seed)
    write_site_dataset(out, records)
    typer.echo(
        json.dumps({"path": str(out), "rows": len(records), "labels": list(SYNTHETIC_LABELS)})
    )


@app.command("model-hash")
def model_hash(directory: Path) -> None:
    """Print the sha256 a run uses to pin this base model."""
    from site_agent._training import hash_base_model

    typer.echo(hash_base_model(directory))


def main() -> None:
    app()
