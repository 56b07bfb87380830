"""What the benchmarks share: waiting for a run, paired bootstrap over test rows, Markdown rows."""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping, Sequence

import numpy as np

from coordinator.console.admin import AdminClient
from protocols.v1 import baton_pb2 as pb

# Per seed (or per final model): site -> 1/0 per test row.
RowScores = Mapping[str, Sequence[int]]


def markdown_row(*cells: object) -> str:
    """One row of a Markdown table: ``| a | b |``."""
    return "| " + " | ".join(str(cell) for cell in cells) + " |"


def wait_for_completed_run(admin: AdminClient, run_id: str, timeout: float) -> pb.RunStatus:
    """The run's status once it completed.

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
        time.sleep(0.1)


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
