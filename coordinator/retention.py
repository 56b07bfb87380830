"""Checkpoint retention: which stored bundles nothing needs any more, and their ledgered deletion.

A finished run keeps its final checkpoint and its `keep` last committed checkpoints before it.
Nothing a running or paused run, a pending evaluation or any run's final needs is ever deleted.
Bytes left by superseded or deleted rows, and store files no row names (older than an hour:
a live coordinator may be between storing bytes and recording them), go too.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from coordinator.ledger import TERMINAL_RUN_STATES, CheckpointRow, EvaluationRow, Ledger, RunRow
from coordinator.store import CheckpointStore

__all__ = ["Deletion", "collect_garbage", "plan_deletions"]

ORPHAN_AGE_SECONDS = 3600.0


@dataclass(frozen=True)
class Deletion:
    """A stored bundle to delete, and why."""

    sha256: str
    size: int
    run_id: str | None
    reason: str  # "retention", "superseded", "deleted" (bytes left behind) or "orphan"


def _needed(runs: Iterable[RunRow], evaluations: Iterable[EvaluationRow]) -> set[str]:
    """Checkpoints that must stay: finals, everything of unfinished runs, pending evaluations'."""
    needed = {row.checkpoint_sha256 for row in evaluations if row.status == "pending"}
    for run in runs:
        if run.final_sha256:
            needed.add(run.final_sha256)
        if run.status not in TERMINAL_RUN_STATES:
            for hop in run.hops:
                needed.update(sha for sha in (hop.input_sha256, hop.output_sha256) if sha)
    return needed


def _kept(run: RunRow, keep: int) -> set[str]:
    """A finished run's final (or last committed output) and the `keep` committed before it."""
    outputs = [h.output_sha256 for h in run.hops if h.status == "committed" and h.output_sha256]
    final = run.final_sha256 or (outputs[-1] if outputs else None)
    earlier = [sha for sha in outputs if sha != final]
    kept = set(earlier[len(earlier) - keep :] if keep else [])
    return kept | ({final} if final else set())


def plan_deletions(
    runs: list[RunRow],
    checkpoints: list[CheckpointRow],
    evaluations: list[EvaluationRow],
    stored: Mapping[str, tuple[int, float]],
    keep: int,
    *,
    now: float | None = None,
) -> list[Deletion]:
    """What the retention policy deletes (a pure decision over the ledger and the store).

    Args:
        runs: Every run, with its hops.
        checkpoints: Every checkpoint row.
        evaluations: Every evaluation row (pending ones protect their checkpoint).
        stored: sha256 -> (size, modification time) of every bundle in the store.
        keep: Committed checkpoints kept per finished run besides its final.
        now: The time orphan ages are measured against (default: now).
    """
    now = time.time() if now is None else now
    needed = _needed(runs, evaluations)
    by_run = {run.id: run for run in runs}
    deletions: list[Deletion] = []
    rows = {row.sha256: row for row in checkpoints}
    for row in checkpoints:
        if row.sha256 not in stored or row.sha256 in needed:
            continue
        size = stored[row.sha256][0]
        if row.status != "stored":
            deletions.append(Deletion(row.sha256, size, row.run_id, row.status))
            continue
        run = by_run.get(row.run_id)
        if run is None or run.status not in TERMINAL_RUN_STATES:
            continue
        if row.sha256 not in _kept(run, keep):
            deletions.append(Deletion(row.sha256, size, row.run_id, "retention"))
    for sha256, (size, mtime) in sorted(stored.items()):
        if sha256 not in rows and sha256 not in needed and now - mtime > ORPHAN_AGE_SECONDS:
            deletions.append(Deletion(sha256, size, None, "orphan"))
    return deletions


def collect_garbage(
    ledger: Ledger, store: CheckpointStore, keep: int, *, delete: bool
) -> list[Deletion]:
    """Plans the retention policy's deletions and, with `delete`, ledgers and performs them.

    Each deletion is ledgered (`checkpoint.deleted`) before its bytes go, so the ledger never
    names as stored a checkpoint whose bytes are gone.
    """
    stored = {sha: (size, mtime) for sha, size, mtime in store.stored()}
    runs = ledger.runs()
    evaluations = [row for run in runs for row in run.evaluations]
    planned = plan_deletions(runs, ledger.checkpoints(), evaluations, stored, keep)
    if delete:
        for deletion in planned:
            ledger.delete_checkpoint(
                deletion.sha256, size=deletion.size, reason=deletion.reason, run_id=deletion.run_id
            )
            store.delete(deletion.sha256)
    return planned
