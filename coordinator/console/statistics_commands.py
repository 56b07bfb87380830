"""`baton statistics`: aggregate statistics of the sites' training rows (global normaliser)."""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from coordinator.console._options import (
    AdminCa,
    AdminCert,
    AdminKey,
    Coord,
    admin_call,
    admin_client,
    console,
    err,
    fail,
)
from protocols.exit_codes import EXIT_RUN_FAILED
from protocols.v1 import baton_pb2 as pb

__all__ = ["statistics_app", "statistics_document"]

statistics_app = typer.Typer(
    pretty_exceptions_show_locals=False,
    help="Aggregate statistics of the sites' training rows (global normaliser).",
    no_args_is_help=True,
)

StatisticsTask = Annotated[str, typer.Option("--task", help="The dataset's task type")]
CvFolds = Annotated[
    int,
    typer.Option(
        "--cv-folds",
        min=0,
        max=20,
        help="Also one normaliser per cross-validation fold, over the training rows outside "
        "it, for cross-validation runs with this many folds (tabular; 0: global only)",
    ),
]


@statistics_app.command("bundle")
def statistics_bundle(
    dataset: Annotated[str, typer.Argument(help="Dataset name registered at every site")],
    task: StatisticsTask = "tabular",
    min_count: Annotated[
        int, typer.Option(min=1, help="Minimum rows per aggregate; use the same in `collect`")
    ] = 10,
    noise_std: Annotated[float, typer.Option(min=0.0, help="Gaussian noise std")] = 0.0,
    cv_folds: CvFolds = 0,
) -> None:
    """Print a statistics request's approval bundle and its sha256 (before collecting)."""
    from protocols.approval import ApprovalBundle

    bundle = ApprovalBundle.for_statistics(
        task, dataset, min_count=min_count, noise_std=noise_std, cv_folds=cv_folds
    )
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
    cv_folds: CvFolds = 0,
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
    with admin_client(coordinator, ca, cert, key) as client:
        status = admin_call(
            lambda: client.collect_statistics(
                dataset,
                task,
                site,
                min_count=min_count or 0,
                noise_std=noise_std,
                expires_in_seconds=expires_in or 0.0,
                cv_folds=cv_folds,
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
            status = admin_call(lambda: client.wait_for_statistics(status.statistics_id, wait))
        except TimeoutError as exc:
            raise fail(str(exc), EXIT_RUN_FAILED) from exc
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
    with admin_client(coordinator, ca, cert, key) as client:
        status = admin_call(lambda: client.statistics(statistics_id))
    if as_json:
        sys.stdout.write(json.dumps(statistics_document(status), indent=2) + "\n")
        return
    _print_statistics(status)


def statistics_document(status: pb.StatisticsStatus) -> dict[str, object]:
    """A statistics request as plain JSON; with the tabular run options once done."""
    from coordinator.statistics import fold_normaliser_options, normaliser_options

    document: dict[str, object] = {
        "statistics_id": status.statistics_id,
        "status": status.status,
        "dataset": status.dataset,
        "task_type": status.task_type,
        "min_count": status.min_count,
        "noise_std": status.noise_std,
        "approval_bundle_sha256": status.approval_bundle_sha256,
        "expires_at": status.expires_at,
        "cv_folds": status.cv_folds,
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
            "folds": [
                {"fold": f.fold, "count": f.count, "mean": list(f.mean), "std": list(f.std)}
                for f in status.folds
            ],
        }
        if status.feature_names:
            document["normaliser_options"] = normaliser_options(status)
            # What a cross-validation run's options add (baton run ... --normaliser does it).
            document["fold_normaliser_options"] = fold_normaliser_options(status)
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
        + (f"{status.cv_folds} folds, " if status.cv_folds else "")
        + f"bundle {status.approval_bundle_sha256[:12]}{_expiry_note(status)})"
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
    for fold in status.folds:
        table = Table("feature", "mean", "std", title=f"fold {fold.fold} normaliser "
                      f"({fold.count:g} rows outside fold {fold.fold})")  # fmt: skip
        for name, mean, std in zip(status.feature_names, fold.mean, fold.std, strict=True):
            table.add_row(name, f"{mean:.6g}", f"{std:.6g}")
        console.print(table)
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
