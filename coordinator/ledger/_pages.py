"""Bounded queries for the dashboard's pages."""

from __future__ import annotations

from collections.abc import Collection

from sqlalchemy import func, select

from coordinator.ledger._chain import LedgerCore
from coordinator.ledger.models import CheckpointRow, EventRow, HopRow, RunRow


class DashboardPages(LedgerCore):
    """The dashboard's pages: bounded queries, never every row."""

    # ---- pages (the dashboard: bounded queries, never every row) ------------------------------

    def runs_page(self, *, limit: int, offset: int = 0, status: str | None = None) -> list[RunRow]:
        """Runs newest first, without their hops; only those in `status` when given."""
        with self._sessions() as session:
            query = select(RunRow).order_by(RunRow.created_at.desc(), RunRow.id)
            if status is not None:
                query = query.where(RunRow.status == status)
            return list(session.scalars(query.limit(limit).offset(offset)))

    def run_status_counts(self) -> dict[str, int]:
        """How many runs are in each status."""
        with self._sessions() as session:
            rows = session.execute(select(RunRow.status, func.count()).group_by(RunRow.status))
            return {status: count for status, count in rows}

    def hop_counts(self, run_ids: Collection[str]) -> dict[str, dict[str, int]]:
        """Per run: how many of its hops are in each status."""
        if not run_ids:
            return {}
        with self._sessions() as session:
            rows = session.execute(
                select(HopRow.run_id, HopRow.status, func.count())
                .where(HopRow.run_id.in_(list(run_ids)))
                .group_by(HopRow.run_id, HopRow.status)
            )
            counts: dict[str, dict[str, int]] = {}
            for run_id, status, count in rows:
                counts.setdefault(run_id, {})[status] = count
            return counts

    def events_page(
        self,
        *,
        limit: int,
        before: int | None = None,
        after: int | None = None,
        run_id: str | None = None,
        site: str | None = None,
        kind: str | None = None,
        ascending: bool = False,
    ) -> list[EventRow]:
        """Events by sequence number (keyset: `before`/`after` a seq), optionally filtered."""
        with self._sessions() as session:
            query = select(EventRow)
            if before is not None:
                query = query.where(EventRow.seq < before)
            if after is not None:
                query = query.where(EventRow.seq > after)
            if run_id:
                query = query.where(EventRow.run_id == run_id)
            if site:
                query = query.where(EventRow.site == site)
            if kind:
                query = query.where(EventRow.kind == kind)
            order = EventRow.seq.asc() if ascending else EventRow.seq.desc()
            return list(session.scalars(query.order_by(order).limit(limit)))

    def event_count(self) -> int:
        with self._sessions() as session:
            return int(session.scalar(select(func.count()).select_from(EventRow)) or 0)

    def checkpoints_of_run(self, run_id: str) -> list[CheckpointRow]:
        with self._sessions() as session:
            query = select(CheckpointRow).where(CheckpointRow.run_id == run_id)
            return list(session.scalars(query.order_by(CheckpointRow.stored_at)))
