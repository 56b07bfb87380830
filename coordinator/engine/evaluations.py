"""Evaluations: sites score a completed run's final checkpoint on their own data."""

from __future__ import annotations

import asyncio
import secrets
import uuid
from datetime import UTC, datetime

from coordinator.engine.ledger_writer import LedgerWriter
from coordinator.engine.rules import finite_metrics
from coordinator.engine.sessions import SiteSession, SiteSessions
from coordinator.engine.tasks import evaluation_task
from coordinator.errors import InvalidInput, NotFound, PermissionDenied, StaleLease
from coordinator.ledger import CheckpointRow, EvaluationRow, Ledger, RunRow
from coordinator.storage_faults import StorageHealth
from protocols.v1 import baton_pb2 as pb

__all__ = ["Evaluations"]


class Evaluations:
    """Creates evaluation requests, sends them to their sites and records the scores.

    Their ledger reads and writes run on the engine's ledger writer thread, never on the event
    loop; tasks are queued to sessions on the loop.
    """

    def __init__(
        self,
        ledger: Ledger,
        storage: StorageHealth,
        lock: asyncio.Lock,
        sessions: SiteSessions,
        writer: LedgerWriter,
    ) -> None:
        self.ledger = ledger
        self.writer = writer
        self.storage = storage
        self._lock = lock  # the engine's one lock over state transitions
        self.sessions = sessions
        self._sent: dict[str, SiteSession] = {}  # evaluation id -> session its task went to

    async def evaluate_run(
        self, run_id: str, split: str, sites: list[str], *, by: str | None = None
    ) -> list[str]:
        """Asks sites to evaluate a completed run's final checkpoint on their own data."""
        rows = await self.writer.run(self._create, run_id, split, sites, by)
        await self.dispatch_evaluations()
        return [row.id for row in rows]

    def _create(
        self, run_id: str, split: str, sites: list[str], by: str | None
    ) -> list[EvaluationRow]:
        try:
            run = self.ledger.run(run_id)
        except KeyError:
            raise NotFound(f"no run {run_id!r}") from None
        if split not in ("validation", "test"):
            raise InvalidInput(f"split must be 'validation' or 'test', not {split!r}")
        if run.status != "completed" or not run.final_sha256:
            raise InvalidInput(
                f"run {run_id} is {run.status}: only a completed run's final checkpoint "
                "is evaluated (test splits are for final reports only)"
            )
        if split == "test" and run.plan.get("cross_validation"):
            raise InvalidInput(
                f"run {run_id} is a cross-validation run: its checkpoint holds fold models, "
                "scored on validation only; test splits are for a final run's report"
            )
        run_sites = list(dict.fromkeys(hop.site for hop in run.hops))
        chosen = list(dict.fromkeys(sites)) or run_sites
        # Sites outside the run may score it too (cross-site probes): they see only the
        # checkpoint, under the run's bundle, which they must have approved like any other.
        known = {row.name for row in self.ledger.sites()}
        unknown = sorted(set(chosen) - known - set(run_sites))
        if unknown:
            raise InvalidInput(f"no site named {', '.join(unknown)} has ever connected")
        now = datetime.now(UTC)
        rows = [
            EvaluationRow(
                id=uuid.uuid4().hex,
                run_id=run_id,
                checkpoint_sha256=run.final_sha256,
                site=site,
                split=split,
                status="pending",
                lease_token=secrets.token_hex(16),
                metrics={},
                created_at=now,
            )
            for site in chosen
        ]
        self.ledger.create_evaluations(rows, by=by)
        return rows

    async def dispatch_evaluations(self) -> None:
        async with self._lock:
            pending = await self.writer.run(self.ledger.pending_evaluations)
            due = [row for row in pending if self._due(row) is not None]
            if not due:
                return
            found = await self.writer.run(self._checkpoints_and_runs, due)
            for row, (checkpoint, run) in zip(due, found, strict=True):
                session = self._due(row)  # its site may have left while the rows were read
                if checkpoint is None or session is None:
                    continue
                self._sent[row.id] = session
                session.queue.put_nowait(evaluation_task(run, row, checkpoint))

    def _due(self, row: EvaluationRow) -> SiteSession | None:
        """The session a pending evaluation's task is to go to now, or None."""
        session = self.sessions.get(row.site)
        if session is None or self._sent.get(row.id) is session:
            return None
        return session

    def _checkpoints_and_runs(
        self, rows: list[EvaluationRow]
    ) -> list[tuple[CheckpointRow | None, RunRow]]:
        return [
            (self.ledger.checkpoint(row.checkpoint_sha256), self.ledger.run(row.run_id))
            for row in rows
        ]

    async def report_evaluation(self, site: str, result: pb.EvaluationResult) -> str:
        async with self._lock:
            status = await self.writer.run(self._record, site, result)
            self._sent.pop(result.evaluation_id, None)
            return status

    def _record(self, site: str, result: pb.EvaluationResult) -> str:
        """Records a site's scores or failure for its pending evaluation."""
        row = self.ledger.evaluation(result.evaluation_id)
        if row is None:
            raise NotFound(f"no evaluation {result.evaluation_id}")
        if row.site != site:
            raise PermissionDenied(f"evaluation {row.id} is not assigned to site {site}")
        if row.status != "pending" or row.lease_token != result.lease_token:
            raise StaleLease(f"evaluation {row.id} is not pending under that lease token")
        with self.storage.guard(f"evaluation {row.id}"):
            if result.ok:
                metrics = finite_metrics(dict(result.metrics))
                self.ledger.finish_evaluation(row.id, metrics=metrics)
            else:
                message = f"{result.error_code or 'site-error'}: {result.error_message}"
                self.ledger.finish_evaluation(row.id, metrics={}, error=message)
        return "failed" if not result.ok else "done"
