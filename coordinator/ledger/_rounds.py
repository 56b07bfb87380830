"""Rounds of federated and hybrid runs in the ledger."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Collection, Sequence
from typing import Any

from sqlalchemy import select

from coordinator.ledger._chain import LedgerCore, TransitionRefused, locked_get, utcnow
from coordinator.ledger.models import CheckpointRow, RoundRow


class RoundRecords(LedgerCore):
    """A round's start, aggregate and failure."""

    # ---- rounds (federated and hybrid runs) ---------------------------------------------------

    def rounds(self, run_id: str) -> list[RoundRow]:
        """A run's rounds in order ([] for a sequential run)."""
        with self._sessions() as session:
            query = select(RoundRow).where(RoundRow.run_id == run_id)
            return list(session.scalars(query.order_by(RoundRow.number)))

    def rounds_of(self, run_ids: Collection[str] | None) -> dict[str, list[RoundRow]]:
        """The rounds of several runs (None: of every run) in one query, by run id, each run's
        in order."""
        found: dict[str, list[RoundRow]] = defaultdict(list)
        if run_ids is not None and not run_ids:
            return {}
        with self._sessions() as session:
            query = select(RoundRow)
            if run_ids is not None:
                query = query.where(RoundRow.run_id.in_(list(run_ids)))
            for row in session.scalars(query.order_by(RoundRow.run_id, RoundRow.number)):
                found[row.run_id].append(row)
        return dict(found)

    def start_round(self, round_id: str, input_sha256: str | None) -> RoundRow:
        """Fixes a pending round's input (event `round.started`); its hops may then be leased."""
        with self.transaction() as session:
            row = locked_get(session, RoundRow, round_id)
            if row is None:
                raise KeyError(round_id)
            if row.status != "pending":
                raise TransitionRefused(f"round {row.number} is {row.status}; cannot start it")
            row.status = "training"
            row.input_sha256 = input_sha256
            row.started_at = utcnow()
            self.append_event(
                session, "round.started", run_id=row.run_id,
                payload={"round": row.number, "input_sha256": input_sha256},
            )  # fmt: skip
            return row

    def finish_round(
        self,
        round_id: str,
        *,
        checkpoints: Sequence[CheckpointRow],
        output_sha256: str,
        server_state_sha256: str | None,
        contributions: list[list[Any]],
        dropped: list[list[Any]],
        metrics: dict[str, float],
    ) -> RoundRow:
        """Records a round's aggregate (and server state) as committed, in one event.

        The aggregate's checkpoint row (and the state blob's) are written in the same
        transaction as `round.aggregated`: a round is aggregated exactly once.
        """
        with self.transaction() as session:
            row = locked_get(session, RoundRow, round_id)
            if row is None:
                raise KeyError(round_id)
            if row.status != "training":
                raise TransitionRefused(f"round {row.number} is {row.status}; cannot aggregate")
            for checkpoint in checkpoints:
                existing = locked_get(session, CheckpointRow, checkpoint.sha256)
                if existing is None:
                    session.add(checkpoint)
                else:
                    existing.status = "stored"  # content-addressed: the same bytes again
            row.status = "aggregated"
            row.output_sha256 = output_sha256
            row.server_state_sha256 = server_state_sha256
            row.contributions = contributions
            row.dropped = dropped
            row.metrics = metrics
            row.finished_at = utcnow()
            self.append_event(
                session, "round.aggregated", run_id=row.run_id,
                payload={"round": row.number, "input_sha256": row.input_sha256,
                         "output_sha256": output_sha256, "contributions": contributions,
                         "dropped": dropped, "server_state_sha256": server_state_sha256},
            )  # fmt: skip
            return row

    def fail_round(self, round_id: str, error: str, dropped: list[list[Any]]) -> RoundRow:
        """Marks a round failed (event `round.failed`): too few contributions, or an abort."""
        with self.transaction() as session:
            row = locked_get(session, RoundRow, round_id)
            if row is None:
                raise KeyError(round_id)
            if row.status not in ("pending", "training"):
                raise TransitionRefused(f"round {row.number} is {row.status}; cannot fail it")
            row.status = "failed"
            row.error = error
            row.dropped = dropped
            row.finished_at = utcnow()
            self.append_event(
                session, "round.failed", run_id=row.run_id,
                payload={"round": row.number, "error": error, "dropped": dropped},
            )  # fmt: skip
            return row
