"""How a run is shown in a terminal: its hop table, a live view, its summary, its evaluations."""

from __future__ import annotations

import time

from rich.table import Table

from coordinator.console._options import console, err
from coordinator.console.admin import TERMINAL_RUN_STATES, AdminClient, handoff_seconds
from protocols.v1 import baton_pb2 as pb

__all__ = ["evaluation_table", "follow_run", "print_summary", "run_table"]


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
