"""Checkpoint rows: recording, reading, superseding and deleting them."""

from __future__ import annotations

import functools
from typing import Any

from sqlalchemy import Select, bindparam, select

from coordinator.ledger import _cursor
from coordinator.ledger._chain import (
    LedgerCore,
    hold_sqlite_write_lock,
    insert_row,
    locked_get,
)
from coordinator.ledger.models import CheckpointRow, HopRow


@functools.cache
def _stored_sizes_query() -> Select[Any]:
    """`stored_sizes`' query, built once (the hop id a bound parameter)."""
    columns = CheckpointRow.__table__.c
    return select(columns.sha256, columns.size).where(
        columns.hop_id == bindparam("hop_id"), columns.status == "stored"
    )


class CheckpointRecords(LedgerCore):
    """The checkpoint rows' lifecycle."""

    def record_checkpoint(self, row: CheckpointRow) -> None:
        with self.transaction() as session:
            existing = locked_get(session, CheckpointRow, row.sha256)
            if existing is not None and existing.status == "stored":
                return  # content-addressed: the same bytes are already recorded
            if existing is not None:
                existing.status = "stored"  # the same bytes stored again after a deletion
            elif not insert_row(session, row):  # with the event's seq: one plain INSERT
                session.add(row)
            self.append_event(
                session,
                "checkpoint.stored",
                run_id=row.run_id,
                hop_id=row.hop_id,
                site=row.producer_site,
                payload={"sha256": row.sha256, "size": row.size, "parent": row.parent_sha256},
            )

    def checkpoint(self, sha256: str) -> CheckpointRow | None:
        with self._sessions() as session:
            return session.get(CheckpointRow, sha256)

    # ---- checkpoint lifecycle -------------------------------------------------------------------

    def checkpoints(self, run_id: str | None = None) -> list[CheckpointRow]:
        """Every checkpoint row (of one run), oldest first, whatever its status."""
        with self._sessions() as session:
            query = select(CheckpointRow).order_by(CheckpointRow.stored_at)
            if run_id is not None:
                query = query.where(CheckpointRow.run_id == run_id)
            return list(session.scalars(query))

    def stored_sizes(self, hop_id: str) -> dict[str, int]:
        """The checkpoints of a hop whose bytes the store keeps (status "stored"): sha256 ->
        size, read as two plain columns on the driver's cursor (every hand back asks, on the
        event loop: no ORM object is built, no SQLAlchemy execution)."""
        with self.engine.connect() as connection:
            found = _cursor.read(connection, _stored_sizes_query(), {"hop_id": hop_id})
            return {row[0]: row[1] for row in found}

    def supersede_checkpoints(self, hop_id: str, reason: str) -> list[CheckpointRow]:
        """Marks a hop's stored checkpoints other than its committed output superseded.

        One transaction, one `checkpoint.superseded` event per checkpoint. The caller then
        removes their bytes from the store.
        """
        with self.transaction() as session:
            hold_sqlite_write_lock(session)  # before the reads its writes rest on
            hop = session.get(HopRow, hop_id)
            if hop is None:
                return []
            rows = list(
                session.scalars(
                    select(CheckpointRow)
                    .where(CheckpointRow.hop_id == hop_id, CheckpointRow.status == "stored")
                    .with_for_update()
                )
            )
            superseded = [row for row in rows if row.sha256 != hop.output_sha256]
            for row in superseded:
                row.status = "superseded"
                self.append_event(
                    session,
                    "checkpoint.superseded",
                    run_id=row.run_id,
                    hop_id=hop_id,
                    site=row.producer_site,
                    payload={"sha256": row.sha256, "size": row.size, "reason": reason},
                )
            return superseded

    def delete_checkpoint(
        self, sha256: str, *, size: int, reason: str, run_id: str | None = None
    ) -> None:
        """Ledgers the deletion of a checkpoint's bytes (row marked "deleted" if there is one)."""
        with self.transaction() as session:
            row = locked_get(session, CheckpointRow, sha256)
            if row is not None:
                row.status = "deleted"
                run_id = row.run_id
            self.append_event(
                session,
                "checkpoint.deleted",
                run_id=run_id,
                hop_id=row.hop_id if row is not None else None,
                payload={"sha256": sha256, "size": size, "reason": reason},
            )
