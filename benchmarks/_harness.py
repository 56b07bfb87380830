"""What the benchmarks share: waiting for a run and its sites' test scores, paired bootstrap over
test rows, a report's head and its Markdown rows and sections."""

from __future__ import annotations

import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from coordinator.console.admin import AdminClient
from protocols.v1 import baton_pb2 as pb

# Per seed (or per final model): site -> 1/0 per test row.
RowScores = Mapping[str, Sequence[int]]


def markdown_row(*cells: object) -> str:
    """One row of a Markdown table: ``| a | b |``."""
    return "| " + " | ".join(str(cell) for cell in cells) + " |"


def markdown_section(title: str, *paragraphs: str, columns: Sequence[str]) -> list[str]:
    """The lines of a report's section up to its table's rows: a blank line, ``## title``, each
    paragraph after a blank line, then after one more the table's head (`columns`)."""
    lines = ["", f"## {title}"]
    for paragraph in paragraphs:
        lines += ["", paragraph]
    return [*lines, "", markdown_row(*columns), "|" + "---|" * len(columns)]


def free_port() -> int:
    """A loopback TCP port free now (for a process told its port before it starts)."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


PACKAGES = ("coordinator", "protocols", "site_agent", "ordering")


def project_bytecode(root: Path, *, compiled: bool) -> str:
    """Prepares how the started processes import the project's own modules, and says how.

    ``compiled``: every module compiled to bytecode first, as an installed wheel and the
    images ship it (pip compiles on install), so a start measures what a deployment starts.
    Otherwise every ``__pycache__`` of the project is removed, and with PYTHONDONTWRITEBYTECODE
    (as set here) each start compiles the project's source again.
    """
    import compileall
    import shutil

    for package in PACKAGES:
        if compiled:
            compileall.compile_dir(root / package, quiet=1, workers=1)
        else:
            for cache in (root / package).rglob("__pycache__"):
                shutil.rmtree(cache, ignore_errors=True)
    if compiled:
        return "project modules compiled to bytecode first (as an installed wheel ships them)"
    writes = "not written back" if os.environ.get("PYTHONDONTWRITEBYTECODE") else "written back"
    return f"project modules from source (no bytecode; {writes})"


def report_head(argv: Sequence[str] | None, *versions: str) -> dict[str, str]:
    """The first fields of a benchmark's JSON report: when it was generated, the command (the
    script's name and `argv`, or the process's arguments if `argv` is empty or None) and the
    machine (architecture, cores, Python, then `versions` such as ``torch 2.6.0``)."""
    return {
        "generated": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": shlex.join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]),
        "machine": ", ".join(
            [
                platform.machine(),
                f"{os.cpu_count()} cores",
                f"python {platform.python_version()}",
                *versions,
            ]
        ),
    }


def wait_for_completed_run(
    admin: AdminClient, run_id: str, timeout: float, poll: float = 0.1
) -> pb.RunStatus:
    """The run's status once it completed, asked for every `poll` seconds (each ask is a
    GetRun the coordinator serves on its event loop: a benchmark timing the run's own work
    asks seldom, and takes the end from the ledger).

    Raises:
        RuntimeError: If it failed or was aborted.
        TimeoutError: If it is still going after `timeout` seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        run = admin.run(run_id)
        if run.status in ("completed", "failed", "aborted"):
            if run.status != "completed":
                raise RuntimeError(f"run {run_id} {run.status}: {run.error}")
            return run
        if time.monotonic() > deadline:
            raise TimeoutError(f"run {run_id} did not finish in {timeout} s")
        time.sleep(poll)


def site_test_accuracy(admin: AdminClient, run_id: str, timeout: float) -> dict[str, float]:
    """Each site's accuracy on its test split of the run's final model, in the order the run
    lists its evaluations: every site is asked to score it (the one touch of test data).

    Raises:
        RuntimeError: If a site's test evaluation did not end done.
    """
    wanted = set(admin.evaluate_run(run_id, "test"))
    run = admin.wait_for_evaluations(run_id, timeout=timeout)
    scores: dict[str, float] = {}
    for evaluation in run.evaluations:
        if evaluation.evaluation_id in wanted:
            if evaluation.status != "done":
                raise RuntimeError(f"test evaluation at {evaluation.site}: {evaluation.error}")
            scores[evaluation.site] = float(evaluation.metrics["accuracy"])
    return scores


def mean_site_accuracy(correct: RowScores) -> float:
    """The unweighted mean over sites of each site's accuracy (FLamby's "Avg")."""
    return statistics.fmean(statistics.fmean(rows) for rows in correct.values())


def paired_bootstrap(
    a: Sequence[RowScores], b: Sequence[RowScores], resamples: int, seed: int = 0
) -> dict[str, float]:
    """95% interval of the mean over pairs of ``mean_site_accuracy(a_i) - mean_site_accuracy(b_i)``.

    Test rows are resampled within each site, the same resample for every pair and both
    methods (paired), so the interval reflects which test rows happen to be there.
    """
    rng = np.random.default_rng(seed)
    sites = list(a[0])
    a_rows = {site: np.array([pair[site] for pair in a]) for site in sites}
    b_rows = {site: np.array([pair[site] for pair in b]) for site in sites}
    differences = np.empty(resamples)
    for r in range(resamples):
        total = 0.0
        for site in sites:
            size = a_rows[site].shape[1]
            index = rng.integers(0, size, size)
            total += float(a_rows[site][:, index].mean() - b_rows[site][:, index].mean())
        differences[r] = total / len(sites)
    point = statistics.fmean(
        mean_site_accuracy(x) - mean_site_accuracy(y) for x, y in zip(a, b, strict=True)
    )
    low, high = np.percentile(differences, [2.5, 97.5])
    return {"difference": point, "low": float(low), "high": float(high)}
