"""`baton run`: validate, start, watch, control, evaluate and download sequential runs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import grpc
import typer
from rich.markup import escape

from coordinator.console._options import (
    AdminCa,
    AdminCert,
    AdminKey,
    Coord,
    StudyStorage,
    admin_call,
    admin_client,
    console,
    err,
    fail,
    resolve_storage,
    rpc_error,
)
from coordinator.console.admin import AdminClient
from coordinator.console.run_view import (
    evaluation_table,
    follow_run,
    print_summary,
    rounds_table,
    run_table,
)
from coordinator.plan import PlanError, RunPlan, load_plan
from protocols.exit_codes import EXIT_BAD_INPUT, EXIT_RUN_FAILED

__all__ = ["run_app"]

run_app = typer.Typer(
    pretty_exceptions_show_locals=False,
    help="Start and watch sequential runs.",
    no_args_is_help=True,
)

Normaliser = Annotated[
    str | None,
    typer.Option(
        "--normaliser",
        metavar="STATISTICS_ID",
        help="Tabular: global normalisation with this done statistics request's mean and std",
    ),
]


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
        raise fail("give a PLAN_FILE or --from-study NAME", EXIT_BAD_INPUT)
    try:
        if from_study is not None:
            from coordinator.console.study import plan_from_study

            plan = plan_from_study(resolve_storage(storage), from_study)
        else:
            assert plan_file is not None
            plan = load_plan(plan_file)
    except (PlanError, KeyError, ValueError) as exc:
        raise fail(str(exc), EXIT_BAD_INPUT) from exc
    with admin_client(coordinator, ca, cert, key) as client:
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
            raise rpc_error(exc) from exc
        problems = (exc.details() or "").splitlines()
        err.print(f"[red]error:[/red] run not started: {len(problems)} problem(s)", soft_wrap=True)
        for problem in problems:
            err.print(f"  {escape(problem)}", soft_wrap=True, highlight=False)
        raise typer.Exit(EXIT_BAD_INPUT) from exc


def _with_normaliser(client: AdminClient, plan: RunPlan, statistics_id: str) -> RunPlan:
    """The plan with global normalisation by a done statistics request of its dataset."""
    from coordinator.statistics import plan_with_normaliser

    statistics = admin_call(lambda: client.statistics(statistics_id))
    try:
        plan = plan_with_normaliser(plan, statistics)
    except ValueError as exc:
        raise fail(f"cannot use statistics {statistics_id} as normaliser: {exc}",
                    EXIT_BAD_INPUT) from exc  # fmt: skip
    from coordinator.statistics import FOLD_NORMALISERS_OPTION

    folds = len(plan.options.get(FOLD_NORMALISERS_OPTION, ()))
    console.print(
        f"global normaliser from statistics {statistics_id} ({statistics.count:g} rows)"
        + (f", and one per cross-validation fold ({folds} folds)" if folds else "")
        + f"; run bundle sha256: {plan.approval_bundle().sha256}"
    )
    if plan.cross_validation is not None and not folds:
        err.print(
            "note: the fold models use the global normaliser, fitted on their held-out rows "
            f"too; collect with --cv-folds {plan.cross_validation.folds} for per-fold ones"
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
        raise fail(str(exc), EXIT_BAD_INPUT) from exc
    if normaliser is not None:
        with admin_client(coordinator, ca, cert, key) as client:
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
    with admin_client(coordinator, ca, cert, key) as client:
        if run_id is None:
            runs = admin_call(client.runs)
            for run in runs:
                console.print(f"{run.run_id}  {run.status:<10} {run.name}  {len(run.hops)} hops")
            if runs and runs[0].storage_fault:
                err.print(f"[yellow]storage fault {runs[0].storage_fault}[/yellow]")
            return
        shown = run_id
        run = admin_call(lambda: follow_run(client, shown) if follow else client.run(shown))
        if not follow:
            console.print(run_table(run))
            if run.rounds:
                console.print(rounds_table(run))
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
    with admin_client(coordinator, ca, cert, key) as client:
        run = admin_call(lambda: client.control(run_id, "resume"))
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
    with admin_client(coordinator, ca, cert, key) as client:
        run = admin_call(lambda: client.control(run_id, "abort", reason))
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
    with admin_client(coordinator, ca, cert, key) as client:
        admin_call(lambda: client.evaluate_run(run_id, split, site))
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
    from coordinator.console.adapter_export import ExportError, base_model_of, write_final_adapter
    from protocols.checkpoint import CheckpointError, inspect_bundle

    with admin_client(coordinator, ca, cert, key) as client:
        run = admin_call(lambda: client.run(run_id))
        data = admin_call(lambda: client.download_final_checkpoint(run_id))
        try:
            bundle = inspect_bundle(data, expected_sha256=run.final_sha256)
        except CheckpointError as exc:
            raise fail(f"downloaded checkpoint is not valid: {exc}", EXIT_RUN_FAILED) from exc
        if base_model is None and bundle.manifest.task_type != "tabular":
            base_model = base_model_of(admin_call(client.sites),
                                       bundle.manifest.base_model_sha256)  # fmt: skip
    try:
        files = write_final_adapter(
            out, data, run_id=run.run_id, plan=json.loads(run.plan_json), base_model=base_model
        )
    except (ExportError, OSError) as exc:
        raise fail(str(exc), EXIT_BAD_INPUT) from exc
    console.print(f"final adapter of run {run.run_id} (sha256 {bundle.sha256[:16]}) in {out}: "
                  + ", ".join(f.name for f in files))  # fmt: skip
