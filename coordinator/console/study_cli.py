"""`baton study`: search site order and hyperparameters with real runs, stored in Optuna."""

from __future__ import annotations

import json
import math
import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import grpc
import optuna
import typer
from pydantic import ValidationError
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from sqlalchemy import make_url

from coordinator.approval_reports import site_approvals
from coordinator.console._options import (
    DEFAULT_STORAGE_FILE,
    AdminCa,
    AdminCert,
    AdminKey,
    Coord,
    StudyStorage,
    admin_client,
    console,
    fail,
    resolve_storage,
    rpc_error,
)
from coordinator.console.study import (
    RunExecutor,
    RunNotApproved,
    TrialRunError,
    attach_run_template,
    cross_site_probe,
    heuristic_seed_orders,
    plan_from_study,
    run_search,
    train_examples_by_site,
    trial_run_ids,
    warm_start_from_ledger,
)
from coordinator.plan import PlanError, RunPlan
from coordinator.study_request import (
    FinishTrialThenStop,
    StudyRequest,
    StudyRequestError,
    json_object,
    prepare_search,
    validation_message,
)
from ordering import (
    HopHyperparameters,
    ModeSearchSpace,
    OrderingStudy,
    SearchSpaceError,
    StudyMismatch,
    TrialRecord,
    probe_order,
)
from protocols.exit_codes import (
    EXIT_BAD_INPUT,
    EXIT_INTERRUPTED,
    EXIT_RUN_FAILED,
    EXIT_UNREACHABLE,
)
from protocols.logs import configure_logging

__all__ = [
    "DEFAULT_STORAGE_FILE",
    "StudyStorage",
    "plan_from_study",
    "resolve_storage",
    "study_app",
]

study_app = typer.Typer(
    pretty_exceptions_show_locals=False,
    help="Search site order and hyperparameters; every trial is a real run.",
    no_args_is_help=True,
)

StudyName = Annotated[str, typer.Argument(help="Study name")]


class SeedOrders(StrEnum):
    none = "none"
    sizes = "sizes"
    probe = "probe"


class EncodingName(StrEnum):
    auto = "auto"
    lehmer = "lehmer"
    random_keys = "random-keys"
    all_orders = "all-orders"


class AggregationName(StrEnum):
    mean = "mean"
    weighted = "weighted"
    worst = "worst"


class DirectionName(StrEnum):
    maximize = "maximize"
    minimize = "minimize"


def _quiet_optuna() -> None:
    """Optuna's own stderr handler would duplicate every line; let our handler show them."""
    optuna.logging.disable_default_handler()
    optuna.logging.enable_propagation()


def _existing_storage(storage: str | None) -> str:
    """The storage URL of an existing store (reading must not create an empty SQLite file)."""
    url = resolve_storage(storage)
    parsed = make_url(url)
    database = parsed.database or ""
    is_file = parsed.get_backend_name() == "sqlite" and database not in ("", ":memory:")
    if is_file and not Path(database).is_file():
        raise fail(f"no study storage at {database}", EXIT_BAD_INPUT)
    return url


def _load(storage: str | None, name: str) -> OrderingStudy:
    url = _existing_storage(storage)
    try:
        return OrderingStudy.load(url, name)
    except KeyError as exc:
        raise fail(f"no study named {name!r} in {url}", EXIT_BAD_INPUT) from exc
    except StudyMismatch as exc:
        raise fail(str(exc), EXIT_BAD_INPUT) from exc


def _listed(value: str) -> list[Any]:
    """A comma-separated option as its items (`--modes sequential,federated`); the request
    model checks them."""
    return [item.strip() for item in value.split(",") if item.strip()]


def _mode(record: TrialRecord) -> str:
    """A trial's mode, with its strategy and grouping when federated or hybrid."""
    if record.plan is None:
        return ""
    federation = record.plan.federation
    if federation is None:
        return "sequential"
    groups = f" {len(federation.groups)} groups" if federation.groups else ""
    return f"{federation.mode} {federation.strategy}{groups}"


def _value(record: TrialRecord) -> str:
    if record.value is not None:
        return f"{record.value:.4f}"
    return (record.error or "")[:60]


@study_app.command("start")
def study_start(
    name: Annotated[str, typer.Option("--name", help="Study name (continued if it exists)")],
    dataset: Annotated[str, typer.Option(help="Dataset name every site resolves locally")],
    sites: Annotated[list[str], typer.Option("--sites", help="A site to order (repeat)")],
    labels: Annotated[list[str] | None, typer.Option("--labels", help="A label (repeat)")] = None,
    task: Annotated[str, typer.Option(help="Task type of the runs")] = "seq-classification",
    cycles: Annotated[int, typer.Option(min=1, help="Passes over the sites")] = 1,
    lr_min: Annotated[float, typer.Option(help="Smallest learning rate searched")] = 1e-4,
    lr_max: Annotated[float, typer.Option(help="Largest learning rate (= lr-min: fixed)")] = 1e-2,
    steps_min: Annotated[int, typer.Option(min=1, help="Fewest steps per visit")] = 10,
    steps_max: Annotated[int, typer.Option(min=1, help="Most steps (= steps-min: fixed)")] = 40,
    split_steps_over_cycles: Annotated[
        bool,
        typer.Option(
            help="Steps are each site's budget for the whole run, split over its cycles "
            "(more cycles: shorter visits at equal compute)"
        ),
    ] = False,
    lr_decay_min: Annotated[
        float, typer.Option(min=0.0, help="Smallest per-hop learning-rate factor searched")
    ] = 1.0,
    lr_decay_max: Annotated[float, typer.Option(help="Largest (= lr-decay-min: fixed)")] = 1.0,
    proximal_mu_max: Annotated[
        float, typer.Option(min=0.0, help="Search a proximal term in [0, this] (0: none)")
    ] = 0.0,
    consolidation_steps: Annotated[
        int,
        typer.Option(
            min=0,
            help="End every plan with a consolidation cycle of 1 to this many steps per visit "
            "(0: none)",
        ),
    ] = 0,
    consolidation_lr_factor_min: Annotated[
        float,
        typer.Option(help="Smallest consolidation learning rate, as a fraction of the last hop's"),
    ] = 0.05,
    consolidation_lr_factor_max: Annotated[
        float, typer.Option(help="Largest (= the min: fixed)")
    ] = 0.5,
    batch_size: Annotated[int, typer.Option(min=1)] = 16,
    trials: Annotated[int, typer.Option(min=1, help="Trials to run now")] = 10,
    encoding: Annotated[
        EncodingName, typer.Option(help="How an order is expressed to the sampler")
    ] = EncodingName.auto,
    aggregation: Annotated[
        AggregationName, typer.Option(help="How site scores become the objective")
    ] = AggregationName.mean,
    metric: Annotated[str, typer.Option(help="Validation metric that scores a run")] = "accuracy",
    direction: Annotated[
        DirectionName | None, typer.Option(help="Default: minimize loss/perplexity, else maximize")
    ] = None,
    lora: Annotated[str | None, typer.Option(help='LoRA settings as JSON, e.g. {"r": 8}')] = None,
    options: Annotated[str | None, typer.Option(help="Task options as a JSON object")] = None,
    base_model_sha256: Annotated[str | None, typer.Option(help="Pin the base model")] = None,
    storage: StudyStorage = None,
    seed: Annotated[int | None, typer.Option(help="Sampler seed")] = None,
    seed_orders: Annotated[
        SeedOrders,
        typer.Option(
            help="Orders tried first: from training-set sizes (smallest first), or from a "
            "cross-site probe (each site trains one short visit, every site scores it; least "
            "typical site first)"
        ),
    ] = SeedOrders.none,
    cv_folds: Annotated[
        int,
        typer.Option(
            min=0, max=20, help="Score trials by k-fold CV over the sites' training splits (0: off)"
        ),
    ] = 0,
    min_validation_rows: Annotated[
        int,
        typer.Option(
            min=0, help="With --cv-folds: sites with this many validation rows score on them"
        ),
    ] = 0,
    warm_start: Annotated[
        bool,
        typer.Option(
            help="Before any trial, add the coordinator's completed runs of the same dataset, "
            "task and space (scored on validation) as completed trials, without re-running them"
        ),
    ] = False,
    modes: Annotated[
        str,
        typer.Option(
            help="Run modes a trial may choose among, comma-separated: sequential, federated, "
            "hybrid (federated and hybrid train each site for the same total steps)"
        ),
    ] = "sequential",
    strategies: Annotated[
        str,
        typer.Option(
            help="Federated/hybrid aggregation strategies: fedavg,fedprox,fedadam,fedyogi"
        ),
    ] = "fedavg",
    rounds_min: Annotated[int, typer.Option(min=1, help="Fewest federated/hybrid rounds")] = 1,
    rounds_max: Annotated[int, typer.Option(min=1, help="Most rounds (= rounds-min: fixed)")] = 4,
    max_groups: Annotated[
        int, typer.Option(min=2, help="Most groups a hybrid trial cuts the sites into")
    ] = 2,
    fedprox_mu_min: Annotated[float, typer.Option(help="Smallest FedProx proximal term")] = 0.001,
    fedprox_mu_max: Annotated[float, typer.Option(help="Largest (= the min: fixed)")] = 1.0,
    run_timeout: Annotated[float, typer.Option(help="Abort a trial's run after (s)")] = 3600.0,
    site_timeout: Annotated[float, typer.Option(help="Wait for the sites to connect (s)")] = 60.0,
    dry_run: Annotated[
        bool, typer.Option(help="Only print the approval bundle the sites must approve")
    ] = False,
    coordinator: Coord = "localhost:50051",
    ca: AdminCa = Path("pki/ca.crt"),
    cert: AdminCert = Path("pki/admin.crt"),
    key: AdminKey = Path("pki/admin.key"),
    log_level: str = "WARNING",
) -> None:
    """Run trials of a search: each trial is a real run, scored on the sites' validation splits."""
    configure_logging(log_level)
    _quiet_optuna()
    url = resolve_storage(storage)
    try:
        # The dashboard's "New study" checks the same request with the same code.
        request = StudyRequest(
            name=name, dataset=dataset, sites=list(sites), labels=list(labels or ()), task=task,
            cycles=cycles, lr_min=lr_min, lr_max=lr_max, steps_min=steps_min,
            steps_max=steps_max, split_steps_over_cycles=split_steps_over_cycles,
            lr_decay_min=lr_decay_min, lr_decay_max=lr_decay_max,
            proximal_mu_max=proximal_mu_max, consolidation_steps=consolidation_steps,
            consolidation_lr_factor_min=consolidation_lr_factor_min,
            consolidation_lr_factor_max=consolidation_lr_factor_max, batch_size=batch_size,
            trials=trials, encoding=encoding.value,
            aggregation=aggregation.value, metric=metric,
            direction=direction.value if direction is not None else None,
            lora=json_object(lora, "--lora"), options=json_object(options, "--options"),
            base_model_sha256=base_model_sha256, seed=seed, seed_orders=seed_orders.value,
            cv_folds=cv_folds, min_validation_rows=min_validation_rows, warm_start=warm_start,
            run_timeout=run_timeout, site_timeout=site_timeout,
            modes=_listed(modes), strategies=_listed(strategies), rounds_min=rounds_min,
            rounds_max=rounds_max, max_groups=max_groups, fedprox_mu_min=fedprox_mu_min,
            fedprox_mu_max=fedprox_mu_max,
        )  # fmt: skip
        prepared = prepare_search(request)
    except ValidationError as exc:
        raise fail(validation_message(exc), EXIT_BAD_INPUT) from exc
    except StudyRequestError as exc:
        raise fail(str(exc), EXIT_BAD_INPUT) from exc
    minimize = request.minimize
    space, template, bundle = prepared.space, prepared.template, prepared.bundle
    if dry_run:
        console.print_json(bundle.canonical_json())
        console.print(f"approval bundle sha256: {bundle.sha256}")
        return
    try:
        study = OrderingStudy.create(
            url,
            name,
            space,
            encoding.value,
            aggregation.value,
            "minimize" if minimize else "maximize",
            seed=seed,
        )
        attach_run_template(study, template)
    except (SearchSpaceError, PlanError, StudyMismatch) as exc:
        raise fail(str(exc), EXIT_BAD_INPUT) from exc
    mode_bundles = prepared.mode_bundles
    if mode_bundles:
        console.print(
            f"trials choose among {', '.join(request.modes)}: each trial's run has its own "
            "approval bundle, approved by the sites' approval policies ("
            + "; ".join(
                f"{what}: e.g. {b.sha256[:12]}" for what, b in prepared.mode_bundles.items()
            )
            + ")"
        )
    else:
        console.print(
            f"approval bundle {bundle.sha256}: every site must have approved it "
            f"(baton-site approve {bundle.sha256}); --dry-run shows it"
        )
    with admin_client(coordinator, ca, cert, key) as client:
        try:
            client.wait_for_sites(set(sites), timeout=site_timeout)
        except TimeoutError as exc:
            raise fail(str(exc), EXIT_UNREACHABLE) from exc
        if prepared.mode_bundles:
            try:
                reported = {s.name: site_approvals(s.approvals) for s in client.sites()}
            except grpc.RpcError as exc:
                raise rpc_error(exc) from exc
            refusals = prepared.approval_refusals(reported)
            if refusals:
                raise fail("the study offers runs its sites would refuse:\n" + "\n".join(refusals),
                           EXIT_BAD_INPUT)  # fmt: skip
        if warm_start:
            try:
                added = warm_start_from_ledger(client, study, template)
            except grpc.RpcError as exc:
                raise rpc_error(exc) from exc
            console.print(
                f"warm start: {len(added)} earlier run(s) added as completed trials"
                + "".join(f"\n  trial {r.number}: {_value(r)}  run {run_id}" for run_id, r in added)
            )
        if seed_orders is SeedOrders.sizes:
            try:
                sizes = train_examples_by_site(client, dataset)
            except grpc.RpcError as exc:
                raise rpc_error(exc) from exc
            seeds = heuristic_seed_orders(sizes, sites)
            study.enqueue(*seeds, note="seed: training-set sizes")
            console.print("seed orders: " + "; ".join(" > ".join(order) for order in seeds))
        elif seed_orders is SeedOrders.probe:
            probe = HopHyperparameters(
                learning_rate=math.sqrt(lr_min * lr_max), steps=steps_min, batch_size=batch_size
            )
            console.print(f"cross-site probe: one {steps_min}-step visit per site")
            try:
                scores = cross_site_probe(
                    client, template, sites, probe, run_name=f"{name} probe", timeout=run_timeout
                )
            except TrialRunError as exc:
                raise fail(f"cross-site probe failed: {exc}", EXIT_RUN_FAILED) from exc
            except grpc.RpcError as exc:
                raise rpc_error(exc) from exc
            order = probe_order(scores, higher_is_better=not minimize)
            study.enqueue(order, note="seed: cross-site probe")
            console.print("seed orders: " + " > ".join(order))
        executor = RunExecutor(client, template, run_name=name, run_timeout=run_timeout)
        console.print(
            f"study {name!r} in {url}: {trials} trial(s) over {', '.join(space.sites)}, "
            f"{cycles} cycle(s)"
        )
        progress = Progress(
            TextColumn("[bold]trials"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
        )
        stop = FinishTrialThenStop().install()  # SIGTERM: finish this trial, then stop
        with progress:
            bar = progress.add_task("trials", total=trials)

            def on_trial(record: TrialRecord, run_id: str | None) -> None:
                order = escape(record.plan.describe()) if record.plan is not None else ""
                progress.console.print(
                    f"trial {record.number}: {record.state:<8} {_value(record):<10} {order}  "
                    f"{record.compute_seconds:.1f} s" + (f"  run {run_id}" if run_id else "")
                )
                progress.advance(bar)
                stop.check()

            try:
                run_search(study, executor, trials, on_trial=on_trial)
            except FinishTrialThenStop.Stopped:
                console.print("stopped after this trial, as asked")
            except KeyboardInterrupt:
                # The executor aborted the trial's run on its way out; the trial is failed.
                console.print("stopped at once, as asked: this trial's run is aborted")
                raise typer.Exit(EXIT_INTERRUPTED) from None
            except (PlanError, RunNotApproved) as exc:
                raise fail(str(exc), EXIT_BAD_INPUT) from exc
            except grpc.RpcError as exc:
                raise rpc_error(exc) from exc
    try:
        best = study.best_plan()
    except ValueError as exc:
        raise fail(f"no trial of study {name!r} has completed", EXIT_RUN_FAILED) from exc
    console.print(f"best plan so far: {escape(best.describe())} (baton study best {name})")


@study_app.command("status")
def study_status(name: StudyName, storage: StudyStorage = None) -> None:
    """Every trial of a study: state, value, order, compute seconds and its run."""
    _quiet_optuna()
    study = _load(storage, name)
    links = trial_run_ids(study)
    table = Table(title=f"study {name} ({study.encoding.name}, {study.aggregation})")
    modes = isinstance(study.space, ModeSearchSpace)
    columns = ("trial", "state", "value", *(("mode",) if modes else ()), "order", "compute s",
               "run")  # fmt: skip
    for column in columns:
        table.add_column(column)
    history = study.history()
    for record in history:
        stage = "" if record.budget_fraction == 1.0 else f" @{record.budget_fraction:g}"
        state = (
            record.state
            + (f" (= {record.duplicate_of})" if record.duplicate_of is not None else "")
            + (" (warm)" if record.warm_start is not None else "")
        )
        table.add_row(
            f"{record.number}{stage}",
            state,
            _value(record),
            *((_mode(record),) if modes else ()),
            escape(record.plan.describe()) if record.plan is not None else "",
            f"{record.compute_seconds:.1f}",
            links.get((record.study_name, record.number), "")[:12],
        )
    console.print(table)
    total = sum(record.compute_seconds for record in history)
    try:
        best = study.best_plan()
        mode = f" ({best.mode})" if modes else ""
        console.print(f"best{mode}: {escape(best.describe())}; compute so far: {total:.1f} s")
    except ValueError:
        console.print(f"no completed full-budget trial yet; compute so far: {total:.1f} s")
    _print_importance(study)


# The order's share of the importances from which `study status` calls it worth searching.
ORDER_WORTH_SEARCHING = 0.3


def _print_importance(study: OrderingStudy) -> None:
    """Where the objective's spread comes from: is the order worth searching here?"""
    from ordering import order_importance

    measured = order_importance(study)
    if not measured.importances:
        console.print(f"parameter importances: not measured ({measured.note})")
        return
    shares = ", ".join(f"{name} {share:.0%}" for name, share in measured.importances.items())
    console.print(f"parameter importances over {measured.trials} trials (PED-ANOVA): {shares}")
    order = measured.order_share or 0.0
    verdict = (
        "the order matters here: keep searching it"
        if order >= ORDER_WORTH_SEARCHING
        else "the hyperparameters decide here: a fixed or random order would do about as well"
    )
    console.print(f"order share {order:.0%}: {verdict}")
    if measured.note:
        console.print(f"note: {measured.note}")


@study_app.command("best")
def study_best(
    name: StudyName,
    storage: StudyStorage = None,
    out: Annotated[Path | None, typer.Option(help="Write the plan here (default: stdout)")] = None,
) -> None:
    """The best plan as a run-plan JSON document (`baton run start` accepts it)."""
    _quiet_optuna()
    url = _existing_storage(storage)
    try:
        plan: RunPlan = plan_from_study(url, name)
    except KeyError as exc:
        raise fail(f"no study named {name!r} in {url}", EXIT_BAD_INPUT) from exc
    except StudyMismatch as exc:
        raise fail(str(exc), EXIT_BAD_INPUT) from exc
    except ValueError as exc:
        raise fail(str(exc), EXIT_RUN_FAILED) from exc
    text = json.dumps(json.loads(plan.to_json()), indent=2) + "\n"
    if out is None:
        sys.stdout.write(text)
    else:
        out.write_text(text)
        console.print(f"best plan of {name!r} written to {out}")
