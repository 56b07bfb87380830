"""The `baton` command: PKI, the coordinator service, runs, sites and the demo."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, TypeVar

import click
import grpc
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text
from typer.core import TyperGroup

from coordinator.admin import TERMINAL_RUN_STATES, AdminClient, handoff_seconds
from coordinator.admin_cli import admin_app
from coordinator.plan import PlanError, RunPlan, load_plan
from coordinator.simulate_cli import simulate
from coordinator.study_storage import StudyStorage, resolve_storage
from protocols.logs import configure_logging
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
from protocols.settings import settings_problems
from protocols.v1 import baton_pb2 as pb

if TYPE_CHECKING:
    from coordinator.ledger import Ledger

__all__ = ["app", "main"]

T = TypeVar("T")


class _LazyStudyGroup(TyperGroup):
    """The root command group; `study` (Optuna, the search) is imported only when used,
    so `baton coordinator serve` and the other commands start without it."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), "study"})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name == "study" and cmd_name not in self.commands:
            from coordinator.study_cli import study_app

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
pki_app = typer.Typer(
    pretty_exceptions_show_locals=False,
    help="Consortium CA and certificates.",
    no_args_is_help=True,
)
coordinator_app = typer.Typer(
    pretty_exceptions_show_locals=False, help="The coordinator service.", no_args_is_help=True
)
run_app = typer.Typer(
    pretty_exceptions_show_locals=False,
    help="Start and watch sequential runs.",
    no_args_is_help=True,
)
app.add_typer(pki_app, name="pki")
app.add_typer(coordinator_app, name="coordinator")
ledger_app = typer.Typer(
    pretty_exceptions_show_locals=False,
    help="Verify and export the tamper-evident ledger.",
    no_args_is_help=True,
)
app.add_typer(run_app, name="run")
app.add_typer(ledger_app, name="ledger")
statistics_app = typer.Typer(
    pretty_exceptions_show_locals=False,
    help="Aggregate statistics of the sites' training rows (global normaliser).",
    no_args_is_help=True,
)
app.add_typer(statistics_app, name="statistics")
store_app = typer.Typer(
    pretty_exceptions_show_locals=False,
    help="The checkpoint store: retention and clean-up.",
    no_args_is_help=True,
)
app.add_typer(store_app, name="store")
db_app = typer.Typer(
    pretty_exceptions_show_locals=False,
    help="Ledger schema migrations (Alembic).",
    no_args_is_help=True,
)
app.add_typer(db_app, name="db")
app.add_typer(admin_app, name="admin")
app.command("simulate")(simulate)

console = Console()
err = Console(stderr=True)

# Exit codes: 0 ok, 1 the run failed, 2 bad input (plan, config, files), 3 coordinator unreachable.
EXIT_RUN_FAILED, EXIT_BAD_INPUT, EXIT_UNREACHABLE = 1, 2, 3

PkiDir = Annotated[Path, typer.Option("--dir", help="Directory holding ca.crt and ca.key.")]
Coord = Annotated[str, typer.Option("--coordinator", envvar="BATON_COORDINATOR", help="host:port")]
AdminCa = Annotated[Path, typer.Option("--ca", envvar="BATON_ADMIN_CA", help="CA certificate")]
AdminCert = Annotated[Path, typer.Option("--cert", envvar="BATON_ADMIN_CERT", help="Admin cert")]
AdminKey = Annotated[Path, typer.Option("--key", envvar="BATON_ADMIN_KEY", help="Admin key")]


LogFormat = Annotated[
    str | None,
    typer.Option(
        "--log-format",
        envvar="BATON_LOG_FORMAT",
        click_type=click.Choice(["text", "json"]),
        help="text, or json: one JSON object per line with run, hop and site fields",
    ),
]

Normaliser = Annotated[
    str | None,
    typer.Option(
        "--normaliser",
        metavar="STATISTICS_ID",
        help="Tabular: global normalisation with this done statistics request's mean and std",
    ),
]


def _fail(message: str, code: int) -> typer.Exit:
    # One line whatever the terminal width; the message is text, never rich markup.
    err.print(f"[red]error:[/red] {escape(message)}", soft_wrap=True)
    return typer.Exit(code)


# ---- pki ----------------------------------------------------------------------------------------


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
        raise _fail(message, EXIT_BAD_INPUT) from exc
    except PkiError as exc:
        raise _fail(str(exc), EXIT_BAD_INPUT) from exc
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
            raise _fail(f"a {role.value} certificate needs a NAME", EXIT_BAD_INPUT)
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
        raise _fail(f"{exc}; pass --force to replace them", EXIT_BAD_INPUT) from exc
    except PkiError as exc:
        raise _fail(str(exc), EXIT_BAD_INPUT) from exc
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
        raise _fail(str(exc), EXIT_BAD_INPUT) from exc
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
        raise _fail("give exactly one of --serial or --certificate", EXIT_BAD_INPUT)
    if cert is not None:
        try:
            serial = format(identity_from_pem(cert.read_bytes()).serial, "x")
        except (PkiError, OSError) as exc:
            raise _fail(str(exc), EXIT_BAD_INPUT) from exc
    assert serial is not None
    with _admin(coordinator, ca, admin_cert, key) as client:
        closed = _admin_call(lambda: client.revoke(serial, reason))
    console.print(f"certificate {serial} revoked; {closed} open stream(s) closed")


@app.command("provision")
def provision_kit(
    consortium_file: Annotated[Path, typer.Argument(help="consortium.toml")],
    out: Annotated[Path, typer.Option(help="New folder for the kits")] = Path("consortium-kit"),
) -> None:
    """Make a ready folder per participant: certificate, key, CA, settings, systemd unit, README."""
    from coordinator.provision import ProvisionError, load_consortium, provision

    try:
        kit = provision(load_consortium(consortium_file), out)
    except ProvisionError as exc:
        raise _fail(str(exc), EXIT_BAD_INPUT) from exc
    table = Table("participant", "folder", "certificate expires")
    for name, folder in kit.folders.items():
        table.add_row(name, str(folder), f"{kit.expires[name]:%Y-%m-%d}")
    console.print(table)
    console.print(f"CA (keep offline, never ship): {kit.ca_dir}")


# ---- coordinator --------------------------------------------------------------------------------


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
    from pydantic import ValidationError

    from coordinator.server import serve
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
        raise _fail(f"bad coordinator settings: {settings_problems(exc)}", EXIT_BAD_INPUT) from exc
    except (FileNotFoundError, SettingsFileError) as exc:
        raise _fail(f"bad coordinator settings: {exc}", EXIT_BAD_INPUT) from exc
    from coordinator.startup import AlreadyRunning, StartupError
    from protocols.transport import PortInUse

    try:
        asyncio.run(serve(settings))
    except (PortInUse, AlreadyRunning) as exc:
        raise _fail(str(exc), EXIT_RUN_FAILED) from exc
    except (StartupError, PkiError, OSError) as exc:
        raise _fail(str(exc), EXIT_BAD_INPUT) from exc


# ---- runs ---------------------------------------------------------------------------------------


def _admin(coordinator: str, ca: Path, cert: Path, key: Path) -> AdminClient:
    try:
        return AdminClient.from_files(coordinator, ca, cert, key)
    except PkiError as exc:
        raise _fail(str(exc), EXIT_BAD_INPUT) from exc


def run_table(run: pb.RunStatus) -> Table:
    """A table of a run's hops: site, status, progress, validation metrics."""
    table = Table(title=f"run {run.name} ({run.run_id[:8]}): {run.status}")
    for column in ("hop", "site", "status", "step", "val acc", "val F1", "val loss", "output"):
        table.add_column(column)
    for hop in run.hops:
        metrics = hop.metrics
        table.add_row(
            str(hop.index),
            hop.site,
            hop.status,
            f"{hop.step}/{hop.total_steps}" if hop.total_steps else "",
            f"{metrics['accuracy']:.3f}" if "accuracy" in metrics else "",
            f"{metrics['macro_f1']:.3f}" if "macro_f1" in metrics else "",
            f"{metrics['loss']:.3f}" if "loss" in metrics else "",
            hop.output_sha256[:12],
        )
    return table


def follow_run(client: AdminClient, run_id: str, interval: float = 0.25) -> pb.RunStatus:
    """Shows a live table until the run ends; returns its final status."""
    from rich.live import Live

    run = client.run(run_id)
    with Live(run_table(run), console=console, refresh_per_second=8) as live:
        while run.status not in TERMINAL_RUN_STATES:
            time.sleep(interval)
            run = client.run(run_id)
            live.update(run_table(run))
    return run


def print_summary(run: pb.RunStatus) -> None:
    if run.storage_fault and run.status not in TERMINAL_RUN_STATES:
        err.print(f"[yellow]storage fault {run.storage_fault}[/yellow]")
    handoffs = handoff_seconds(run)
    if handoffs:
        ordered = sorted(handoffs)
        console.print(
            f"handoff per hop (training end -> next training start): median "
            f"{ordered[len(ordered) // 2] * 1000:.1f} ms, max {ordered[-1] * 1000:.1f} ms"
        )
    if run.status == "completed":
        console.print(f"final adapter: {run.final_adapter_dir} (sha256 {run.final_sha256})")
    elif run.error:
        err.print(f"[red]run {run.status}:[/red] {run.error}")


def _admin_call(call: Callable[[], T]) -> T:
    try:
        return call()
    except grpc.RpcError as exc:
        code = EXIT_UNREACHABLE if exc.code() == grpc.StatusCode.UNAVAILABLE else EXIT_BAD_INPUT
        raise _fail(f"{exc.code().name}: {exc.details()}", code) from exc


@run_app.command("start")
def run_start(
    plan_file: Annotated[Path | None, typer.Argument(help="Run plan (.json or .toml)")] = None,
    from_study: Annotated[
        str | None, typer.Option("--from-study", help="Run a study's best plan at full budget")
    ] = None,
    storage: StudyStorage = None,
    coordinator: Coord = "localhost:50051",
    ca: AdminCa = Path("pki/ca.crt"),
    cert: AdminCert = Path("pki/admin.crt"),
    key: AdminKey = Path("pki/admin.key"),
    follow: Annotated[bool, typer.Option(help="Watch the run until it ends")] = False,
    normaliser: Normaliser = None,
    allow_offline: Annotated[
        bool,
        typer.Option(
            "--allow-offline", help="Queue the run even if sites are offline (hops wait for them)"
        ),
    ] = False,
) -> None:
    """Validate a plan (a file, or a study's best) and start it as a new run.

    The coordinator first checks what it knows of every site of the plan (connected, dataset
    and labels, base model, bundle approved) and refuses the run with the list of problems.
    """
    if (plan_file is None) == (from_study is None):
        raise _fail("give a PLAN_FILE or --from-study NAME", EXIT_BAD_INPUT)
    try:
        if from_study is not None:
            from coordinator.study import plan_from_study

            plan = plan_from_study(resolve_storage(storage), from_study)
        else:
            assert plan_file is not None
            plan = load_plan(plan_file)
    except (PlanError, KeyError, ValueError) as exc:
        raise _fail(str(exc), EXIT_BAD_INPUT) from exc
    with _admin(coordinator, ca, cert, key) as client:
        if normaliser is not None:
            plan = _with_normaliser(client, plan, normaliser)
        started = plan
        run_id = _start_checked(client, started, allow_offline)
        console.print(f"run started: {run_id}")
        if follow:
            run = follow_run(client, run_id)
            print_summary(run)
            if run.status != "completed":
                raise typer.Exit(EXIT_RUN_FAILED)


def _start_checked(client: AdminClient, plan: RunPlan, allow_offline: bool) -> str:
    """Starts the run; a preflight refusal prints each problem on its own line (exit 2)."""
    try:
        return client.start_run(plan, allow_offline=allow_offline)
    except grpc.RpcError as exc:
        if exc.code() != grpc.StatusCode.FAILED_PRECONDITION:
            raise _admin_call_error(exc) from exc
        problems = (exc.details() or "").splitlines()
        err.print(f"[red]error:[/red] run not started: {len(problems)} problem(s)", soft_wrap=True)
        for problem in problems:
            err.print(f"  {escape(problem)}", soft_wrap=True, highlight=False)
        raise typer.Exit(EXIT_BAD_INPUT) from exc


def _admin_call_error(exc: grpc.RpcError) -> typer.Exit:
    code = EXIT_UNREACHABLE if exc.code() == grpc.StatusCode.UNAVAILABLE else EXIT_BAD_INPUT
    return _fail(f"{exc.code().name}: {exc.details()}", code)


def _with_normaliser(client: AdminClient, plan: RunPlan, statistics_id: str) -> RunPlan:
    """The plan with global normalisation by a done statistics request of its dataset."""
    from coordinator.statistics import plan_with_normaliser

    statistics = _admin_call(lambda: client.statistics(statistics_id))
    try:
        plan = plan_with_normaliser(plan, statistics)
    except ValueError as exc:
        raise _fail(f"cannot use statistics {statistics_id} as normaliser: {exc}",
                    EXIT_BAD_INPUT) from exc  # fmt: skip
    console.print(
        f"global normaliser from statistics {statistics_id} ({statistics.count:g} rows); "
        f"run bundle sha256: {plan.approval_bundle().sha256}"
    )
    return plan


@run_app.command("bundle")
def run_bundle(
    plan_file: Annotated[Path, typer.Argument(help="Run plan (.json or .toml)")],
    normaliser: Normaliser = None,
    coordinator: Coord = "localhost:50051",
    ca: AdminCa = Path("pki/ca.crt"),
    cert: AdminCert = Path("pki/admin.crt"),
    key: AdminKey = Path("pki/admin.key"),
) -> None:
    """Print the plan's approval bundle and its sha256: what each site reviews and approves.

    With --normaliser the collected mean and std become part of the plan (and of its bundle),
    exactly as `baton run start --normaliser` will start it.
    """
    try:
        plan = load_plan(plan_file)
    except PlanError as exc:
        raise _fail(str(exc), EXIT_BAD_INPUT) from exc
    if normaliser is not None:
        with _admin(coordinator, ca, cert, key) as client:
            plan = _with_normaliser(client, plan, normaliser)
    bundle = plan.approval_bundle()
    console.print_json(bundle.canonical_json())
    console.print(f"sha256: {bundle.sha256}")
    console.print(f"at each site, after review: baton-site approve {bundle.sha256}")


@run_app.command("status")
def run_status(
    run_id: Annotated[str | None, typer.Argument(help="Run id (default: list all runs)")] = None,
    coordinator: Coord = "localhost:50051",
    ca: AdminCa = Path("pki/ca.crt"),
    cert: AdminCert = Path("pki/admin.crt"),
    key: AdminKey = Path("pki/admin.key"),
    follow: bool = False,
) -> None:
    """Show one run's hops, or all runs."""
    with _admin(coordinator, ca, cert, key) as client:
        if run_id is None:
            runs = _admin_call(client.runs)
            for run in runs:
                console.print(f"{run.run_id}  {run.status:<10} {run.name}  {len(run.hops)} hops")
            if runs and runs[0].storage_fault:
                err.print(f"[yellow]storage fault {runs[0].storage_fault}[/yellow]")
            return
        shown = run_id
        run = _admin_call(lambda: follow_run(client, shown) if follow else client.run(shown))
        if not follow:
            console.print(run_table(run))
            for hop in run.hops:
                if hop.waiting_reason:
                    console.print(f"hop {hop.index}: {escape(hop.waiting_reason)}")
        print_summary(run)


@run_app.command("resume")
def run_resume(
    run_id: str,
    coordinator: Coord = "localhost:50051",
    ca: AdminCa = Path("pki/ca.crt"),
    cert: AdminCert = Path("pki/admin.crt"),
    key: AdminKey = Path("pki/admin.key"),
) -> None:
    """Resume a paused run: its failed hop is tried again."""
    with _admin(coordinator, ca, cert, key) as client:
        run = _admin_call(lambda: client.control(run_id, "resume"))
    console.print(f"run {run.run_id}: {run.status}")


@run_app.command("abort")
def run_abort(
    run_id: str,
    reason: Annotated[str, typer.Option(help="Recorded in the ledger")] = "",
    coordinator: Coord = "localhost:50051",
    ca: AdminCa = Path("pki/ca.crt"),
    cert: AdminCert = Path("pki/admin.crt"),
    key: AdminKey = Path("pki/admin.key"),
) -> None:
    """Abort a running or paused run (committed hops and checkpoints are kept)."""
    with _admin(coordinator, ca, cert, key) as client:
        run = _admin_call(lambda: client.control(run_id, "abort", reason))
    console.print(f"run {run.run_id}: {run.status}")


@run_app.command("evaluate")
def run_evaluate(
    run_id: str,
    split: Annotated[
        str, typer.Option(help="validation, or test for the final report")
    ] = "validation",
    site: Annotated[list[str] | None, typer.Option(help="Only these sites")] = None,
    coordinator: Coord = "localhost:50051",
    ca: AdminCa = Path("pki/ca.crt"),
    cert: AdminCert = Path("pki/admin.crt"),
    key: AdminKey = Path("pki/admin.key"),
    timeout: float = 600.0,
) -> None:
    """Have each site evaluate a completed run's final adapter on its own data."""
    with _admin(coordinator, ca, cert, key) as client:
        _admin_call(lambda: client.evaluate_run(run_id, split, site))
        run = client.wait_for_evaluations(run_id, timeout)
    console.print(evaluation_table(run))


@run_app.command("download")
def run_download(
    run_id: str,
    out: Annotated[Path, typer.Option(help="New folder for the final adapter")],
    base_model: Annotated[
        str | None,
        typer.Option(
            help="Base model id or path for adapter_config.json (default: the name "
            "the sites registered for the run's base-model hash)"
        ),
    ] = None,
    coordinator: Coord = "localhost:50051",
    ca: AdminCa = Path("pki/ca.crt"),
    cert: AdminCert = Path("pki/admin.crt"),
    key: AdminKey = Path("pki/admin.key"),
) -> None:
    """Download a completed run's final adapter: a PEFT folder (LoRA) or safetensors (tabular)."""
    from coordinator.adapter_export import ExportError, base_model_of, write_final_adapter
    from protocols.checkpoint import CheckpointError, inspect_bundle

    with _admin(coordinator, ca, cert, key) as client:
        run = _admin_call(lambda: client.run(run_id))
        data = _admin_call(lambda: client.download_final_checkpoint(run_id))
        try:
            bundle = inspect_bundle(data, expected_sha256=run.final_sha256)
        except CheckpointError as exc:
            raise _fail(f"downloaded checkpoint is not valid: {exc}", EXIT_RUN_FAILED) from exc
        if base_model is None and bundle.manifest.task_type != "tabular":
            base_model = base_model_of(_admin_call(client.sites),
                                       bundle.manifest.base_model_sha256)  # fmt: skip
    try:
        files = write_final_adapter(
            out, data, run_id=run.run_id, plan=json.loads(run.plan_json), base_model=base_model
        )
    except (ExportError, OSError) as exc:
        raise _fail(str(exc), EXIT_BAD_INPUT) from exc
    console.print(f"final adapter of run {run.run_id} (sha256 {bundle.sha256[:16]}) in {out}: "
                  + ", ".join(f.name for f in files))  # fmt: skip


def evaluation_table(run: pb.RunStatus) -> Table:
    table = Table("site", "split", "status", "examples", "accuracy", "macro F1", "loss",
                  title=f"evaluations of run {run.run_id[:8]}")  # fmt: skip
    for row in run.evaluations:
        m = row.metrics
        table.add_row(
            row.site, row.split, row.status if not row.error else f"{row.status}: {row.error}",
            f"{m['examples']:.0f}" if "examples" in m else "",
            *(f"{m[k]:.3f}" if k in m else "" for k in ("accuracy", "macro_f1", "loss")),
        )  # fmt: skip
    return table


# ---- statistics ---------------------------------------------------------------------------------

StatisticsTask = Annotated[str, typer.Option("--task", help="The dataset's task type")]


@statistics_app.command("bundle")
def statistics_bundle(
    dataset: Annotated[str, typer.Argument(help="Dataset name registered at every site")],
    task: StatisticsTask = "tabular",
    min_count: Annotated[
        int, typer.Option(min=1, help="Minimum rows per aggregate; use the same in `collect`")
    ] = 10,
    noise_std: Annotated[float, typer.Option(min=0.0, help="Gaussian noise std")] = 0.0,
) -> None:
    """Print a statistics request's approval bundle and its sha256 (before collecting)."""
    from protocols.approval import ApprovalBundle

    bundle = ApprovalBundle.for_statistics(task, dataset, min_count=min_count, noise_std=noise_std)
    console.print_json(bundle.canonical_json())
    console.print(f"sha256: {bundle.sha256}")
    console.print(f"at each site, after review: baton-site approve {bundle.sha256}")


@statistics_app.command("collect")
def statistics_collect(
    dataset: Annotated[str, typer.Argument(help="Dataset name registered at every site")],
    site: Annotated[list[str], typer.Option(help="A site to ask (repeat for each)")],
    task: StatisticsTask = "tabular",
    min_count: Annotated[
        int | None,
        typer.Option(min=1, help="Minimum rows per aggregate (default: the coordinator's)"),
    ] = None,
    noise_std: Annotated[float, typer.Option(min=0.0, help="Gaussian noise std")] = 0.0,
    expires_in: Annotated[
        float | None,
        typer.Option(
            min=1.0,
            metavar="SECONDS",
            help="The request fails unless every site answered by then (default: the "
            "coordinator's statistics_expiry_seconds, 1 hour)",
        ),
    ] = None,
    wait: Annotated[
        float | None, typer.Option(metavar="SECONDS", help="Wait for the result this long")
    ] = None,
    coordinator: Coord = "localhost:50051",
    ca: AdminCa = Path("pki/ca.crt"),
    cert: AdminCert = Path("pki/admin.crt"),
    key: AdminKey = Path("pki/admin.key"),
) -> None:
    """Ask sites for aggregate statistics of their training rows (counts, sums, labels)."""
    with _admin(coordinator, ca, cert, key) as client:
        status = _admin_call(
            lambda: client.collect_statistics(
                dataset,
                task,
                site,
                min_count=min_count or 0,
                noise_std=noise_std,
                expires_in_seconds=expires_in or 0.0,
            )
        )
        console.print(f"statistics requested: {status.statistics_id}")
        console.print(
            f"approval bundle sha256: {status.approval_bundle_sha256} (sites must approve it: "
            f"baton-site approve {status.approval_bundle_sha256})"
        )
        if wait is None:
            return
        try:
            status = _admin_call(lambda: client.wait_for_statistics(status.statistics_id, wait))
        except TimeoutError as exc:
            raise _fail(str(exc), EXIT_RUN_FAILED) from exc
    _print_statistics(status)
    if status.status != "done":
        raise typer.Exit(EXIT_RUN_FAILED)


@statistics_app.command("show")
def statistics_show(
    statistics_id: Annotated[str, typer.Argument(help="Statistics id")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON")] = False,
    coordinator: Coord = "localhost:50051",
    ca: AdminCa = Path("pki/ca.crt"),
    cert: AdminCert = Path("pki/admin.crt"),
    key: AdminKey = Path("pki/admin.key"),
) -> None:
    """Show a statistics request: each site's answer and, once done, the pooled result."""
    with _admin(coordinator, ca, cert, key) as client:
        status = _admin_call(lambda: client.statistics(statistics_id))
    if as_json:
        sys.stdout.write(json.dumps(statistics_document(status), indent=2) + "\n")
        return
    _print_statistics(status)


def statistics_document(status: pb.StatisticsStatus) -> dict[str, object]:
    """A statistics request as plain JSON; with the tabular run options once done."""
    from coordinator.statistics import normaliser_options

    document: dict[str, object] = {
        "statistics_id": status.statistics_id,
        "status": status.status,
        "dataset": status.dataset,
        "task_type": status.task_type,
        "min_count": status.min_count,
        "noise_std": status.noise_std,
        "approval_bundle_sha256": status.approval_bundle_sha256,
        "expires_at": status.expires_at,
        "error": status.error,
        "sites": [
            {"site": s.site, "status": s.status, "count": s.count, "error": s.error}
            for s in status.sites
        ],
    }
    if status.status == "done":
        document |= {
            "count": status.count,
            "feature_names": list(status.feature_names),
            "mean": list(status.mean),
            "std": list(status.std),
            "label_counts": dict(sorted(status.label_counts.items())),
            "length_bin_edges": list(status.length_bin_edges),
            "length_histogram": list(status.length_histogram),
            "length_unit": status.length_unit,
        }
        if status.feature_names:
            document["normaliser_options"] = normaliser_options(status)
    return document


def _expiry_note(status: pb.StatisticsStatus) -> str:
    if not status.expires_at:
        return ""
    expires = datetime.fromtimestamp(status.expires_at, UTC).isoformat(timespec="seconds")
    return f", expires {expires}"


def _print_statistics(status: pb.StatisticsStatus) -> None:
    console.print(
        f"statistics {status.statistics_id}: {status.status} ({status.task_type} dataset "
        f"{status.dataset!r}, min count {status.min_count}, noise std {status.noise_std:g}, "
        f"bundle {status.approval_bundle_sha256[:12]}{_expiry_note(status)})"
    )
    sites = Table("site", "status", "rows", "error", title="site answers")
    for site in status.sites:
        sites.add_row(site.site, site.status, f"{site.count:g}" if site.status == "done" else "",
                      site.error)  # fmt: skip
    console.print(sites)
    if status.error:
        err.print(f"[red]statistics {status.status}:[/red] {status.error}")
    if status.status != "done":
        return
    console.print(f"pooled rows: {status.count:g}")
    if status.feature_names:
        features = Table("feature", "mean", "std", title="global normaliser")
        for name, mean, std in zip(status.feature_names, status.mean, status.std, strict=True):
            features.add_row(name, f"{mean:.6g}", f"{std:.6g}")
        console.print(features)
    if status.label_counts:
        labels = Table("label", "rows", title="label counts")
        for label, count in sorted(status.label_counts.items()):
            labels.add_row(label, f"{count:g}")
        console.print(labels)
    if status.length_bin_edges:
        edges = list(status.length_bin_edges)
        lengths = Table(f"length ({status.length_unit})", "rows", title="lengths")
        for index, count in enumerate(status.length_histogram):
            upper = f"{edges[index + 1] - 1}" if index + 1 < len(edges) else ""
            lengths.add_row(f"{edges[index]}-{upper}", f"{count:g}")
        console.print(lengths)


def _ledger(state_dir: Path | None, database_url: str | None) -> Ledger:
    if database_url is None:
        if state_dir is None:
            raise _fail("give --state-dir or --database-url", EXIT_BAD_INPUT)
        path = state_dir / "ledger.sqlite3"
        if not path.is_file():
            raise _fail(f"no ledger at {path}", EXIT_BAD_INPUT)
        database_url = f"sqlite:///{path.resolve()}"
    from sqlalchemy.exc import SQLAlchemyError

    from coordinator.ledger import Ledger
    from coordinator.startup import StartupError, database_error, parse_database_url

    try:
        url = parse_database_url(database_url)
    except StartupError as exc:
        raise _fail(str(exc), EXIT_BAD_INPUT) from exc
    if url.get_backend_name() == "sqlite":
        # Opening a missing SQLite file would create an empty one: say so, create nothing.
        path = Path(url.database or "")
        if not url.database or not path.is_file():
            raise _fail(f"no ledger database at {path}: check --database-url", EXIT_BAD_INPUT)
    ledger = Ledger(database_url)
    try:
        with ledger.engine.connect():
            pass
    except SQLAlchemyError as exc:
        ledger.close()
        raise _fail(str(database_error(database_url, exc)), EXIT_BAD_INPUT) from exc
    return ledger


StateDir = Annotated[Path | None, typer.Option(help="Coordinator state directory")]
DbUrl = Annotated[str | None, typer.Option(envvar="BATON_DATABASE_URL", help="SQLAlchemy URL")]


@ledger_app.command("verify")
def ledger_verify(
    state_dir: StateDir = None,
    database_url: DbUrl = None,
    anchor: Annotated[
        list[Path] | None,
        typer.Option(help="A signed head kept by a site (`baton-site ledger-head`); repeatable"),
    ] = None,
    heads: Annotated[
        Path | None, typer.Option(help="Signed heads file (default: STATE_DIR/ledger-heads.jsonl)")
    ] = None,
    ca: Annotated[
        Path, typer.Option("--ca", envvar="BATON_CA", help="CA certificate (to check signed heads)")
    ] = Path("pki/ca.crt"),
) -> None:
    """Check the event chain, every state row against it, and that it reaches its signed heads.

    Names the first altered, deleted or inserted event, every table row and column that differs
    from the event that last wrote it, and a ledger cut short of, or differing from, a signed head
    (exit 1).
    """
    from coordinator.ledger import HEADS_FILE, HeadProblem, check_heads, read_heads
    from protocols.ledger_head import HeadError, SignedHead

    sources: list[Path] = list(anchor or [])
    if heads is not None:
        sources.insert(0, heads)
    elif state_dir is not None and (state_dir / HEADS_FILE).is_file():
        sources.insert(0, state_dir / HEADS_FILE)
    signed: list[tuple[str, SignedHead]] = []
    try:
        for source in sources:
            signed.extend((str(source), head) for head in read_heads(source))
    except HeadError as exc:
        raise _fail(str(exc), EXIT_BAD_INPUT) from exc
    ca_pem: bytes | None = ca.read_bytes() if ca.is_file() else None
    if anchor and ca_pem is None:
        raise _fail(f"no CA certificate at {ca}: give --ca to check the anchor", EXIT_BAD_INPUT)
    if signed and ca_pem is None:  # the state dir's own heads: truncation is still found
        err.print(
            Text.assemble(
                ("note: ", "yellow"),
                f"signatures of {len(signed)} signed head(s) not checked: no CA certificate at "
                f"{ca} (give --ca)",
            ),
            highlight=False,
            soft_wrap=True,
        )
    ledger = _ledger(state_dir, database_url)
    try:
        rows_covered = ledger.covers_state_rows()
        result = ledger.verify(rows=rows_covered)
        problems: list[HeadProblem] = []
        newest = None
        if signed:
            problems, newest = check_heads(ledger, signed, ca_pem=ca_pem, last_seq=result.last_seq)
    finally:
        ledger.close()
    failures = [m.message for m in result.row_mismatches]
    failures += [p.message for p in problems]
    if result.chain_break is not None:
        failures.insert(
            0,
            f"ledger does not verify at event {result.chain_break.seq}: "
            f"{result.chain_break.reason}",
        )
    for seq, finding in result.recorded_mismatches:  # history: the rows may be restored since
        err.print(
            Text.assemble(
                ("note: ", "yellow"),
                f"ledger event #{seq} (ledger.mismatch) records "
                f"that the engine paused a run over altered rows: {finding}",
            ),
            highlight=False,
            soft_wrap=True,
        )
    for message in failures[:50]:  # values may hold brackets: printed as text, not markup
        err.print(Text.assemble(("error: ", "red"), message), highlight=False, soft_wrap=True)
    if len(failures) > 50:
        err.print(f"[red]error:[/red] and {len(failures) - 50} more")
    if failures:
        raise typer.Exit(EXIT_RUN_FAILED)
    console.print(
        f"ledger verifies: {result.events} events, head {result.head}; "
        + (
            "every state row matches the event that last wrote it"
            if rows_covered
            else "state rows NOT checked: the schema predates row snapshots (start the "
            "coordinator once to migrate it)"
        ),
        highlight=False,
        soft_wrap=True,
    )
    if newest is not None:
        message = f"reaches the newest {newest.describe()} of {len(signed)} checked"
    else:
        message = "no signed head checked: a cut tail would go unnoticed (give --anchor)"
    console.print(message, highlight=False, soft_wrap=True)


@ledger_app.command("export")
def ledger_export(
    out: Annotated[Path, typer.Option(help="JSONL file to write ('-' for stdout)")],
    state_dir: StateDir = None,
    database_url: DbUrl = None,
) -> None:
    """Write every event, with its hashes, as JSON lines for auditors."""
    ledger = _ledger(state_dir, database_url)
    try:
        lines = [
            json.dumps({"seq": e.seq, "at": e.at, "kind": e.kind, "run_id": e.run_id,
                        "hop_id": e.hop_id, "site": e.site, "payload": e.payload,
                        "prev_hash": e.prev_hash, "hash": e.hash}, sort_keys=True)
            for e in ledger.events()
        ]  # fmt: skip
    finally:
        ledger.close()
    text = "".join(line + "\n" for line in lines)
    if str(out) == "-":
        sys.stdout.write(text)
    else:
        out.write_text(text)
        console.print(f"{len(lines)} events written to {out}")


def _bytes(size: int) -> str:
    return f"{size / 1024**2:.1f} MiB" if size >= 1024**2 else f"{size / 1024:.1f} KiB"


@store_app.command("gc")
def store_gc(
    state_dir: StateDir = None,
    database_url: DbUrl = None,
    config: Annotated[
        Path | None, typer.Option(help="Coordinator TOML settings (state dir, database, policy)")
    ] = None,
    keep: Annotated[
        int | None,
        typer.Option(
            min=0,
            envvar="BATON_CHECKPOINT_RETENTION",
            help="Checkpoints kept per finished run besides its final (default: the "
            "settings' checkpoint_retention, 2)",
        ),
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run/--delete", help="Only list what would go (default)")
    ] = True,
) -> None:
    """Apply the retention policy: delete checkpoints nothing needs (final + N kept per run)."""
    from coordinator.retention import collect_garbage
    from coordinator.store import CheckpointStore

    if config is not None:
        from pydantic import ValidationError

        from coordinator.settings import load_coordinator_settings
        from protocols.settings import SettingsFileError

        try:
            settings = load_coordinator_settings(config)
        except (ValidationError, FileNotFoundError, SettingsFileError) as exc:
            raise _fail(f"bad coordinator settings: {exc}", EXIT_BAD_INPUT) from exc
        state_dir = state_dir or settings.state_dir
        database_url = database_url or settings.database_url
        keep = settings.checkpoint_retention if keep is None else keep
    if state_dir is None:
        raise _fail("give --state-dir (the store lives there) or --config", EXIT_BAD_INPUT)
    if not (state_dir / "checkpoints").is_dir():
        raise _fail(f"no checkpoint store at {state_dir / 'checkpoints'}", EXIT_BAD_INPUT)
    ledger = _ledger(state_dir, database_url)
    try:
        deletions = collect_garbage(
            ledger, CheckpointStore(state_dir / "checkpoints"), 2 if keep is None else keep,
            delete=not dry_run,
        )  # fmt: skip
    finally:
        ledger.close()
    table = Table("checkpoint", "run", "reason", "size")
    for deletion in deletions:
        table.add_row(deletion.sha256[:16], (deletion.run_id or "")[:8], deletion.reason,
                      _bytes(deletion.size))  # fmt: skip
    if deletions:
        console.print(table)
    freed = _bytes(sum(d.size for d in deletions))
    if dry_run:
        console.print(f"dry run: {len(deletions)} checkpoint(s) would be deleted, {freed} freed; "
                      "run with --delete to delete them")  # fmt: skip
    else:
        console.print(f"deleted {len(deletions)} checkpoint(s), {freed} freed (ledgered)")


# ---- db -----------------------------------------------------------------------------------------


def _database_url(state_dir: Path | None, database_url: str | None, *, create: bool) -> str:
    if database_url is not None:
        return database_url
    if state_dir is None:
        raise _fail("give --state-dir or --database-url (or BATON_DATABASE_URL)", EXIT_BAD_INPUT)
    if create:
        state_dir.mkdir(parents=True, exist_ok=True)
    elif not (state_dir / "ledger.sqlite3").is_file():
        raise _fail(f"no ledger at {state_dir / 'ledger.sqlite3'}", EXIT_BAD_INPUT)
    return f"sqlite:///{(state_dir / 'ledger.sqlite3').resolve()}"


def _db_call(url: str, call: Callable[[], T]) -> T:
    """Runs an Alembic command; database errors become one line without the password."""
    from alembic.util import CommandError
    from sqlalchemy import make_url
    from sqlalchemy.exc import ArgumentError, SQLAlchemyError

    try:
        shown = make_url(url).render_as_string(hide_password=True)
    except ArgumentError as exc:
        raise _fail(f"not a database URL: {exc}", EXIT_BAD_INPUT) from exc
    try:
        return call()
    except CommandError as exc:
        raise _fail(f"{shown}: {exc}", EXIT_BAD_INPUT) from exc
    except SQLAlchemyError as exc:
        reason = str(getattr(exc, "orig", None) or exc).splitlines()[0]
        raise _fail(f"ledger database {shown}: {reason}", EXIT_UNREACHABLE) from exc


@db_app.command("upgrade")
def db_upgrade(
    revision: Annotated[str, typer.Argument(help="Target revision")] = "head",
    state_dir: StateDir = None,
    database_url: DbUrl = None,
    sql: Annotated[
        bool, typer.Option("--sql", help="Print the migration SQL for a DBA; change nothing")
    ] = False,
) -> None:
    """Migrate the ledger schema (the coordinator also does this when it starts)."""
    from coordinator import db

    url = _database_url(state_dir, database_url, create=not sql)
    output = _db_call(url, lambda: db.upgrade(url, revision, sql=sql))
    if sql:
        sys.stdout.write(output)
        return
    console.print(f"ledger schema at {_db_call(url, lambda: db.current(url)) or 'base'}")


@db_app.command("current")
def db_current(state_dir: StateDir = None, database_url: DbUrl = None) -> None:
    """Print the ledger schema's revision ('(head)' when up to date)."""
    from coordinator import db

    url = _database_url(state_dir, database_url, create=False)
    console.print(_db_call(url, lambda: db.current(url)) or "base (empty database)")


@db_app.command("history")
def db_history() -> None:
    """List the ledger schema's revisions, newest first."""
    from coordinator import db

    sys.stdout.write(db.history())


# ---- backup -------------------------------------------------------------------------------------


@app.command("backup")
def backup_command(
    out: Annotated[Path, typer.Option(help="New, empty folder for the backup")],
    state_dir: Annotated[Path, typer.Option(help="Coordinator state directory")] = Path(
        "baton-state"
    ),
    database_url: DbUrl = None,
    store_only: Annotated[
        bool, typer.Option(help="PostgreSQL: copy the checkpoint store only (pg_dump the ledger)")
    ] = False,
) -> None:
    """Back up the ledger (SQLite online backup) and the checkpoint store, while serving."""
    from coordinator.backup import BackupError, backup

    url = database_url or f"sqlite:///{(state_dir / 'ledger.sqlite3').resolve()}"
    try:
        summary = backup(state_dir, url, out, store_only=store_only)
    except BackupError as exc:
        raise _fail(str(exc), EXIT_BAD_INPUT) from exc
    what = "ledger" if summary.ledger_copied else "checkpoint store only (ledger: pg_dump)"
    console.print(f"backup in {out}: {what}, {summary.events} events (head {summary.head[:16]}), "
                  f"{summary.checkpoints} checkpoints")  # fmt: skip


@app.command("restore")
def restore_command(
    backup_dir: Annotated[Path, typer.Argument(help="A folder made by `baton backup`")],
    state_dir: Annotated[Path, typer.Option(help="New coordinator state directory")] = Path(
        "baton-state"
    ),
) -> None:
    """Restore a backup into an empty state directory (verified before anything is written)."""
    from coordinator.backup import BackupError, restore

    try:
        summary = restore(backup_dir, state_dir)
    except BackupError as exc:
        raise _fail(str(exc), EXIT_BAD_INPUT) from exc
    console.print(f"restored into {state_dir}: {summary.events} events (head "
                  f"{summary.head[:16]}), {summary.checkpoints} checkpoints; sites that saw a "
                  "later ledger event will refuse this coordinator")  # fmt: skip


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
    with _admin(coordinator, ca, cert, key) as client:
        if wait_for:
            try:
                client.wait_for_sites(set(wait_for), timeout)
            except TimeoutError as exc:
                raise _fail(str(exc), EXIT_UNREACHABLE) from exc
        try:
            rows = client.sites()
        except grpc.RpcError as exc:
            raise _fail(f"{exc.code().name}: {exc.details()}", EXIT_UNREACHABLE) from exc
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
    from coordinator.demo import DemoError, run_demo

    configure_logging("WARNING")
    try:
        run = run_demo(directory, n_sites=sites, cycles=cycles, steps=steps, base_model=base_model,
                       keep_serving=keep_serving)  # fmt: skip
    except DemoError as exc:
        raise _fail(str(exc), EXIT_RUN_FAILED) from exc
    if run.status != "completed":
        raise typer.Exit(EXIT_RUN_FAILED)


def main() -> None:
    app()
