"""The `baton-site` command: run the site agent as a service, and site-side utilities."""

from __future__ import annotations

import atexit
import gc
import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, cast

import click
import typer

from protocols.exit_codes import (
    EXIT_BAD_INPUT,
    EXIT_CHECKS_FAILED,
    EXIT_HISTORY_REWRITTEN,
    EXIT_REFUSED,
)
from protocols.logs import configure_logging, quiet_progress_output

if TYPE_CHECKING:
    from site_agent.agent import SiteAgent
    from site_agent.approvals import ApprovalStore
    from site_agent.settings import SiteSettings

__all__ = ["app", "main"]

app = typer.Typer(
    pretty_exceptions_show_locals=False,
    help="Baton site agent: trains the coordinator's hops on local data.",
    no_args_is_help=True,
)
data_app = typer.Typer(
    pretty_exceptions_show_locals=False,
    help="Register this site's datasets; only aggregate counts ever leave the site.",
    no_args_is_help=True,
)
cert_app = typer.Typer(
    pretty_exceptions_show_locals=False,
    help="Renew this site's certificate (online or offline).",
    no_args_is_help=True,
)
app.add_typer(data_app, name="data")
app.add_typer(cert_app, name="cert")


LogFormat = Annotated[
    str | None,
    typer.Option(
        "--log-format",
        envvar="BATON_SITE_LOG_FORMAT",
        click_type=click.Choice(["text", "json"]),
        help="text, or json: one JSON object per line with run, hop and site fields",
    ),
]

DataDir = Annotated[Path, typer.Option(envvar="BATON_SITE_DATA_DIR", help="The site's data folder")]
StateDir = Annotated[
    Path | None,
    typer.Option(envvar="BATON_SITE_STATE_DIR", help="Site state (default: DATA_DIR/.baton-site)"),
]


# Options `serve` and `doctor` share (the keys of site.toml).
ConfigFile = Annotated[Path | None, typer.Option(help="TOML settings file")]
CoordinatorAddress = Annotated[str | None, typer.Option(help="Coordinator host:port")]
ServerName = Annotated[str | None, typer.Option(help="Name on the coordinator cert")]
CaFile = Annotated[Path | None, typer.Option("--ca")]
CertFile = Annotated[Path | None, typer.Option("--cert")]
KeyFile = Annotated[Path | None, typer.Option("--key")]
SiteDataDir = Annotated[Path | None, typer.Option(help="Folder of registered datasets")]
BaseModelDir = Annotated[Path | None, typer.Option(help="Local base model folder")]
Device = Annotated[str | None, typer.Option(help="cuda, cuda:1, cpu (default: auto)")]


@app.command("serve")
def serve(
    config: ConfigFile = None,
    coordinator: CoordinatorAddress = None,
    server_name: ServerName = None,
    ca: CaFile = None,
    cert: CertFile = None,
    key: KeyFile = None,
    data_dir: SiteDataDir = None,
    base_model: BaseModelDir = None,
    device: Device = None,
    threads: Annotated[int | None, typer.Option(help="CPU threads for torch")] = None,
    approve: Annotated[
        list[str] | None, typer.Option(help="sha256 of a reviewed run bundle (repeatable)")
    ] = None,
    approval_policy: Annotated[
        Path | None, typer.Option(help="TOML rules that approve bundles")
    ] = None,
    max_statistics_answers: Annotated[
        int | None, typer.Option(min=0, help="Statistics answers per dataset (default 20)")
    ] = None,
    log_level: str = "INFO",
    log_json: bool = False,
    log_format: LogFormat = None,
    metrics_host: Annotated[str | None, typer.Option(help="Interface of /metrics")] = None,
    metrics_port: Annotated[
        int | None, typer.Option(help="Prometheus /metrics port (default: off)")
    ] = None,
    metrics_port_file: Annotated[
        Path | None, typer.Option(help="Write the bound metrics port here")
    ] = None,
    shutdown_grace: Annotated[
        float | None,
        typer.Option(help="SIGTERM: seconds a hop may finish before it is handed back"),
    ] = None,
    preload: Annotated[
        str | None,
        typer.Option(
            click_type=click.Choice(["eager", "when-scheduled", "when-next"]),
            help="Load torch and the base model after hello (eager), once a run this site is "
            "in starts (when-scheduled, the default; low CPU priority until it is next) or once "
            "this site is next (when-next)",
        ),
    ] = None,
) -> None:
    """Connect out to the coordinator and run hops until SIGINT/SIGTERM."""
    paused = _collector_off_until_connecting()
    from protocols.pki import PkiError
    from site_agent.agent import CertificateRefused, HistoryRewritten, SiteAgent
    from site_agent.approvals import PolicyError
    from site_agent.base_model import remember_hashes_in

    quiet_progress_output()  # before any thread starts: setenv races getenv on gRPC's threads
    configure_logging(log_level, log_json or log_format == "json")
    settings = _site_settings(
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
        approved_bundles=approve,
        approval_policy=approval_policy,
        max_statistics_answers=max_statistics_answers,
        metrics_host=metrics_host,
        metrics_port=metrics_port,
        metrics_port_file=metrics_port_file,
        shutdown_grace=shutdown_grace,
        preload=preload,
    )
    if settings.base_model_dir is not None and not settings.base_model_dir.is_dir():
        typer.echo(f"error: base model folder not found: {settings.base_model_dir}", err=True)
        raise typer.Exit(EXIT_BAD_INPUT)
    # A restarted site hashes its base model's weights again only if they changed.
    remember_hashes_in(settings.state_path.parent / "base-model-hashes.json")
    # The ML libraries' output is routed by the agent's background load, which imports them.
    try:
        agent = SiteAgent(settings)
    except PolicyError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(EXIT_BAD_INPUT) from exc
    _graceful_signals(agent, settings.shutdown_grace)
    try:
        bound = agent.serve_metrics()
    except OSError as exc:
        typer.echo(f"error: cannot serve metrics on port {settings.metrics_port}: {exc}", err=True)
        raise typer.Exit(EXIT_BAD_INPUT) from exc
    if bound is not None and settings.metrics_port_file is not None:
        settings.metrics_port_file.write_text(str(bound))
    if paused:
        gc.enable()
    try:
        agent.run()
    except PkiError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(EXIT_BAD_INPUT) from exc
    except HistoryRewritten as exc:
        typer.echo(f"error: refusing this coordinator: {exc}", err=True)
        raise typer.Exit(EXIT_HISTORY_REWRITTEN) from exc
    except CertificateRefused as exc:
        typer.echo(f"error: certificate refused: {exc}", err=True)
        raise typer.Exit(EXIT_REFUSED) from exc
    agent.close()
    _end_process()


def _end_process() -> NoReturn:
    """Ends the process of a site whose agent has stopped, without the interpreter's teardown.

    The teardown's collections walk what torch, transformers and a base model left on the heap:
    seconds of CPU once a site has loaded them (py-spy: the main thread in gc_collect_main for
    ~3 s after SIGTERM), to free memory the process gives back anyway. What the teardown does
    before them is done here: the threads that are not daemons are joined, the exit handlers
    run (logging's flush among them) and the standard streams are flushed.
    """
    current = threading.current_thread()
    left = [t for t in threading.enumerate() if t is not current and not t.daemon]
    logging.getLogger(__name__).debug("joining %s before exit", [t.name for t in left])
    for thread in left:
        thread.join()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _collector_off_until_connecting() -> bool:
    """Pauses the cyclic collector for start-up, whose imports live as long as the process: its
    passes over them find nothing (~8% of a site's CPU to its hello). Returns whether it did:
    `serve` then turns it on again before the agent connects, and a refused start (an
    in-process caller) gets it back when the command ends."""
    context = click.get_current_context(silent=True)
    if context is None or not gc.isenabled():
        return False
    gc.disable()
    context.call_on_close(gc.enable)
    return True


def _site_settings(config: Path | None, **overrides: Any) -> SiteSettings:
    """The site's settings (file < environment < flags), or one line and exit 2."""
    from pydantic import ValidationError

    from protocols.settings import SettingsFileError, settings_problems
    from site_agent.settings import load_site_settings

    try:
        return load_site_settings(config, **overrides)
    except ValidationError as exc:
        typer.echo(f"error: bad site settings: {settings_problems(exc)}", err=True)
        raise typer.Exit(EXIT_BAD_INPUT) from exc
    except (FileNotFoundError, SettingsFileError) as exc:
        typer.echo(f"error: bad site settings: {exc}", err=True)
        raise typer.Exit(EXIT_BAD_INPUT) from exc


@app.command("doctor")
def doctor(
    config: ConfigFile = None,
    coordinator: CoordinatorAddress = None,
    server_name: ServerName = None,
    ca: CaFile = None,
    cert: CertFile = None,
    key: KeyFile = None,
    data_dir: SiteDataDir = None,
    base_model: BaseModelDir = None,
    device: Device = None,
    min_free_gb: Annotated[float, typer.Option(min=0, help="Disk space the data dir needs")] = 2,
    skip: Annotated[
        list[str] | None,
        typer.Option(
            help="A check of this host not to run: gpu, disk, data or base-model (repeatable; "
            "gpu imports torch, seconds of CPU)"
        ),
    ] = None,
) -> None:
    """Check DNS, proxy, TLS, certificate, clock, GPU, disk, data and base model (exit 1: fix)."""
    from site_agent.doctor import run_checks

    quiet_progress_output()
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")  # its handshake logs repeat the tls line
    settings = _site_settings(
        config,
        coordinator=coordinator,
        server_name=server_name,
        ca_certificate=ca,
        certificate=cert,
        private_key=key,
        data_dir=data_dir,
        base_model_dir=base_model,
        device=device,
    )
    try:
        checks = run_checks(settings, min_free_bytes=int(min_free_gb * 1024**3), skip=skip or ())
    except ValueError as exc:  # an unknown --skip
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(EXIT_BAD_INPUT) from exc
    failed = 0
    for check in checks:
        typer.echo(check.line())
        failed += not check.ok
    if failed:
        typer.echo(f"{failed} check(s) failed", err=True)
        raise typer.Exit(EXIT_CHECKS_FAILED)


def _graceful_signals(agent: SiteAgent, grace: float) -> None:
    """First SIGTERM/SIGINT: finish or hand back the current hop; a second one stops at once."""
    received: list[int] = []

    def handle(signum: int, _frame: object) -> None:
        received.append(signum)
        if len(received) == 1:
            agent.shutdown(grace)
        else:
            agent.stop()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, handle)


def _approval_store(data_dir: Path, state_dir: Path | None) -> ApprovalStore:
    from site_agent.approvals import ApprovalStore

    return ApprovalStore((state_dir or data_dir / ".baton-site") / "approvals.json")


@app.command("ledger-head")
def ledger_head(
    data_dir: DataDir = Path("."),
    state_dir: StateDir = None,
    out: Annotated[
        Path | None, typer.Option(help="Write the anchor here (default: stdout)")
    ] = None,
) -> None:
    """Export the newest signed ledger head this site kept (for `baton ledger verify --anchor`)."""
    from protocols.ledger_head import HeadError
    from site_agent.heads import HEAD_FILE, KeptHead

    path = (state_dir or data_dir / ".baton-site") / HEAD_FILE
    try:
        head = KeptHead(path, None).load()
    except HeadError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(EXIT_BAD_INPUT) from exc
    if head is None:
        typer.echo(
            f"error: no signed ledger head kept at {path} (has the site connected?)", err=True
        )
        raise typer.Exit(EXIT_BAD_INPUT)
    text = json.dumps(head.to_json(), indent=2, sort_keys=True) + "\n"
    if out is None:
        typer.echo(text, nl=False)
        return
    out.write_text(text)
    typer.echo(f"{head.describe()} written to {out}", err=True)


@app.command("approve")
def approve_bundles(
    hashes: Annotated[list[str], typer.Argument(help="sha256 of reviewed run bundles")],
    data_dir: DataDir = Path("."),
    state_dir: StateDir = None,
    by: Annotated[str, typer.Option(help="Who reviewed it (recorded)")] = "",
) -> None:
    """Approve run bundles after review: their hops may now use this site's data."""
    for digest in hashes:
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            typer.echo(f"error: not a sha256 hex digest: {digest!r}", err=True)
            raise typer.Exit(EXIT_BAD_INPUT)
    _approval_store(data_dir, state_dir).approve(hashes, by=by)
    typer.echo(f"approved {len(hashes)} bundle(s)")


@app.command("approvals")
def approvals(data_dir: DataDir = Path("."), state_dir: StateDir = None) -> None:
    """Show every run bundle this site was asked to run, and whether it is approved."""
    from rich.console import Console

    console = Console()
    for digest, entry in sorted(_approval_store(data_dir, state_dir).listing().items()):
        state = "[green]approved[/green]" if entry["approved"] else "[yellow]pending[/yellow]"
        console.print(f"{state} {digest}")
        if entry["bundle"] is not None:
            console.print_json(json.dumps(entry["bundle"]))


@app.command("statistics-releases")
def statistics_releases(
    data_dir: DataDir = Path("."),
    state_dir: StateDir = None,
    delta: Annotated[float, typer.Option(min=0.0, help="delta for the epsilon shown")] = 1e-6,
) -> None:
    """Show the statistics answers this site released per dataset, and the privacy loss spent."""
    from rich.console import Console
    from rich.table import Table

    from site_agent.releases import ReleaseRefused, StatisticsReleases, epsilon_of

    path = (state_dir or data_dir / ".baton-site") / "statistics_releases.json"
    try:
        listing = StatisticsReleases(path).listing()
    except ReleaseRefused as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(EXIT_BAD_INPUT) from exc
    table = Table("dataset", "answers", "rho spent", f"epsilon (delta {delta:g})",
                  title="statistics releases")  # fmt: skip
    for name, (answers, rho) in listing.items():
        epsilon = f"{epsilon_of(rho, delta):.4g}" if rho > 0 and 0 < delta < 1 else "0"
        table.add_row(name, str(answers), f"{rho:.4g}", epsilon)
    Console().print(table)


@cert_app.command("csr")
def cert_csr(
    name: Annotated[str, typer.Option(help="This site's name (the certificate CN)")],
    out: Annotated[Path, typer.Option(help="Folder for NAME.key and NAME.csr")] = Path("."),
) -> None:
    """Offline renewal: a new key (stays here) and a CSR to hand to the CA holder."""
    from protocols.pki import PkiError, create_csr

    try:
        files = create_csr(out, name)
    except PkiError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(EXIT_BAD_INPUT) from exc
    typer.echo(f"key: {files.private_key}\nCSR: {files.certificate} (CA: baton pki sign)")


@cert_app.command("renew")
def cert_renew(
    coordinator: Annotated[str, typer.Option(envvar="BATON_SITE_COORDINATOR")],
    ca: Annotated[Path, typer.Option("--ca", envvar="BATON_SITE_CA_CERTIFICATE")],
    cert: Annotated[Path, typer.Option("--cert", envvar="BATON_SITE_CERTIFICATE")],
    key: Annotated[Path, typer.Option("--key", envvar="BATON_SITE_PRIVATE_KEY")],
    server_name: Annotated[str | None, typer.Option()] = None,
) -> None:
    """Online renewal while runs go on: new key, CSR, certificate signed by the coordinator.

    The old certificate and key are kept as *.old; the agent uses the new pair on its next
    connection.
    """
    import os
    import tempfile

    import grpc

    from protocols.pki import PkiError, create_csr, identity_from_pem
    from protocols.transport import TlsFiles, secure_channel
    from protocols.v1 import baton_pb2 as pb
    from protocols.v1 import baton_pb2_grpc as pb_grpc

    try:
        name = identity_from_pem(cert.read_bytes()).name
        with tempfile.TemporaryDirectory(dir=key.parent) as scratch:
            files = create_csr(Path(scratch), name)
            with secure_channel(
                coordinator, TlsFiles(ca, cert, key), server_name=server_name
            ) as ch:
                response = pb_grpc.SiteServiceStub(ch).RenewCertificate(
                    pb.RenewRequest(csr_pem=files.certificate.read_bytes()), timeout=30
                )
            renewed = identity_from_pem(response.certificate_pem)
            for path in (cert, key):
                os.replace(path, path.with_name(path.name + ".old"))
            os.replace(files.private_key, key)
            cert.write_bytes(response.certificate_pem)
    except (PkiError, OSError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(EXIT_BAD_INPUT) from exc
    except grpc.RpcError as exc:
        typer.echo(f"error: {exc.code().name}: {exc.details()}", err=True)
        raise typer.Exit(EXIT_BAD_INPUT) from exc
    typer.echo(f"renewed: serial {renewed.serial:x}, expires {renewed.not_valid_after:%Y-%m-%d}")


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
    from site_agent.tasks import hash_base_model

    typer.echo(hash_base_model(directory))


DataDirOption = Annotated[
    Path,
    typer.Option(
        "--data-dir",
        envvar="BATON_SITE_DATA_DIR",
        help="The site's data folder (registrations live in DIR/NAME/)",
    ),
]


@data_app.command("add")
def data_add(
    name: Annotated[str, typer.Argument(help="Dataset name the coordinator's plans refer to")],
    path: Annotated[Path, typer.Argument(help="Source file; it is never copied")],
    task: Annotated[str, typer.Option(help="seq-classification, causal-lm or tabular")],
    data_dir: DataDirOption,
    fmt: Annotated[
        str,
        typer.Option("--format", help="auto, jsonl, csv, heart-disease or medquad"),
    ] = "auto",
    option: Annotated[
        list[str] | None,
        typer.Option(
            "--option",
            help="key=value, repeatable: dedupe=true, labels=a,b, source=GHR, target=answer, "
            "label_column=y, center=NAME",
        ),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the train/validation/test split")] = 0,
    validation_fraction: Annotated[float, typer.Option(min=0.0, max=1.0)] = 0.2,
    test_fraction: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="Ignored for heart-disease (FLamby's split)")
    ] = 0.2,
    replace: Annotated[
        bool, typer.Option(help="Overwrite a registration of the same name")
    ] = False,
) -> None:
    """Validate a data file, fingerprint it and fix its seeded, stratified split."""
    from site_agent.registry import DatasetError, register_dataset

    try:
        options = _parse_options(option or [])
        dataset = register_dataset(
            data_dir,
            name,
            path,
            task_type=task,
            fmt=fmt,
            validation_fraction=validation_fraction,
            test_fraction=test_fraction,
            seed=seed,
            options=options,
            replace=replace,
        )
    except DatasetError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(EXIT_BAD_INPUT) from exc
    summary: dict[str, object] = {
        "name": dataset.name,
        "task_type": dataset.task_type,
        "fingerprint": dataset.fingerprint,
        "train": len(dataset.train),
        "validation": len(dataset.validation),
        "test": len(dataset.test),
        "labels": list(dataset.labels),
        "features": len(dataset.feature_names),
    }
    typer.echo(json.dumps(summary))


@data_app.command("list")
def data_list(
    data_dir: DataDirOption,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table")] = False,
) -> None:
    """Show the registered datasets: names and aggregate counts only."""
    from rich.console import Console
    from rich.table import Table

    from site_agent.registry import list_registered

    entries = list_registered(data_dir)
    if as_json:
        typer.echo(json.dumps(entries))
        return
    table = Table(title=f"datasets in {data_dir}")
    for column in ("name", "task", "format"):
        table.add_column(column, no_wrap=True)
    for column in ("train", "validation", "test"):
        table.add_column(column, justify="right")
    table.add_column("labels")
    table.add_column("status", no_wrap=True)
    for entry in entries:
        counts = cast("dict[str, int]", entry["counts"])
        label_counts = cast("dict[str, dict[str, int]]", entry["label_counts"])
        labels = sorted({label for split in label_counts.values() for label in split})
        table.add_row(
            str(entry["name"]),
            str(entry["task_type"]),
            str(entry["format"]),
            *(str(counts.get(split, 0)) for split in ("train", "validation", "test")),
            ", ".join(labels) if len(labels) <= 6 else f"{len(labels)} labels",
            str(entry["status"]),
        )
    Console().print(table)


def _parse_options(pairs: list[str]) -> dict[str, str]:
    from site_agent.registry import DatasetError

    options: dict[str, str] = {}
    for pair in pairs:
        key, separator, value = pair.partition("=")
        if not separator or not key.strip():
            raise DatasetError(f"--option must be key=value, got {pair!r}")
        if key.strip() in options:
            raise DatasetError(f"--option {key.strip()!r} given twice")
        options[key.strip()] = value.strip()
    return options


def main() -> None:
    from site_agent.openmp import prefer_passive_waits

    prefer_passive_waits()  # before anything loads torch (see site_agent/openmp.py)
    app()
