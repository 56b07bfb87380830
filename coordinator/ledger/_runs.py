"""Sites, runs, hops and certificate revocations in the ledger."""

from __future__ import annotations

import functools
from collections.abc import Collection, Iterator, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Select, bindparam, select
from sqlalchemy.orm import selectinload

from coordinator.ledger import _cursor
from coordinator.ledger._chain import (
    LIVE_HOP_STATES,
    TERMINAL_RUN_STATES,
    LedgerCore,
    TransitionRefused,
    connection_of,
    locked_get,
    utcnow,
    write_columns,
)
from coordinator.ledger.models import (
    EvaluationRow,
    EventRow,
    HopRow,
    RevocationRow,
    RoundRow,
    RunRow,
    SiteRow,
)


@functools.cache
def _pin_query() -> Select[Any]:
    """A run's base model pin alone, built once."""
    runs = RunRow.__table__.c  # the table's columns: a plain statement, no ORM compilation
    return select(runs.base_model_sha256).where(runs.id == bindparam("run_id"))


class RunRecords(LedgerCore):
    """Site registrations, run and hop transitions, and revocations."""

    # ---- sites --------------------------------------------------------------------------------

    def register_site(
        self,
        name: str,
        *,
        agent_version: str,
        capabilities: list[str],
        base_models: list[dict[str, str]],
        datasets: list[dict[str, Any]],
        certificate_serial: str,
        certificate_expires_at: datetime | None = None,
    ) -> None:
        now = utcnow()
        with self.transaction() as session:
            row = session.get(SiteRow, name)
            if row is None:
                row = SiteRow(name=name, first_seen_at=now)
                session.add(row)
            row.agent_version = agent_version
            row.capabilities = capabilities
            row.base_models = base_models
            row.datasets = datasets
            row.certificate_serial = certificate_serial
            row.certificate_expires_at = certificate_expires_at
            row.last_seen_at = now
            self.append_event(
                session,
                "site.hello",
                site=name,
                payload={
                    "agent_version": agent_version,
                    "capabilities": capabilities,
                    "base_models": base_models,
                    "certificate_serial": certificate_serial,
                },
            )

    def sites(self) -> list[SiteRow]:
        with self._sessions() as session:
            return list(session.scalars(select(SiteRow).order_by(SiteRow.name)))

    # ---- runs and hops --------------------------------------------------------------------------

    def create_run(
        self,
        run_id: str,
        name: str,
        plan: dict[str, Any],
        hops: list[HopRow],
        pinned: str | None,
        *,
        by: str | None = None,
        rounds: Sequence[RoundRow] = (),
    ) -> RunRow:
        with self.transaction() as session:
            run = RunRow(
                id=run_id,
                name=name,
                status="running",
                plan=plan,
                base_model_sha256=pinned,
                created_at=utcnow(),
            )
            run.hops = hops
            session.add(run)
            if rounds:
                session.flush()  # rounds refer to the run; no relationship orders the inserts
                session.add_all(rounds)
            self.append_event(
                session,
                "run.created",
                run_id=run_id,
                payload={
                    "name": name,
                    "plan": plan,
                    "hops": [h.id for h in hops],
                    **({"rounds": [r.id for r in rounds]} if rounds else {}),
                    **({"by": by} if by else {}),
                },
            )
        return self.run(run_id)

    def run(self, run_id: str, *, evaluations: bool = True) -> RunRow:
        """The run with its hops, and (unless told not to) its evaluations."""
        with self._sessions() as session:
            loads = [selectinload(RunRow.hops)]
            if evaluations:
                loads.append(selectinload(RunRow.evaluations))
            run = session.scalars(select(RunRow).where(RunRow.id == run_id).options(*loads)).first()
            if run is None:
                raise KeyError(run_id)
            return run

    def runs(self) -> list[RunRow]:
        with self._sessions() as session:
            query = (
                select(RunRow)
                .options(selectinload(RunRow.hops), selectinload(RunRow.evaluations))
                .order_by(RunRow.created_at)
            )
            return list(session.scalars(query))

    def runs_in_batches(self, size: int = 20) -> Iterator[list[RunRow]]:
        """Every run with its hops and evaluations, oldest first, `size` runs at a time (each
        batch's hops and evaluations read with it): a reader can let other threads run
        between batches instead of building thousands of rows in one stretch."""
        with self._sessions() as session:
            query = (
                select(RunRow)
                .options(selectinload(RunRow.hops), selectinload(RunRow.evaluations))
                .order_by(RunRow.created_at)
                .execution_options(yield_per=size)
            )
            for batch in session.scalars(query).partitions():
                yield list(batch)

    def active_runs(self) -> list[RunRow]:
        """The running runs with their hops and evaluations; finished runs are never read."""
        with self._sessions() as session:
            query = (
                select(RunRow)
                .where(RunRow.status == "running")
                .options(selectinload(RunRow.hops), selectinload(RunRow.evaluations))
                .order_by(RunRow.created_at)
            )
            return list(session.scalars(query))

    def live_hop_needs(self, site: str, sha256: str) -> bool:
        """Whether a live hop of a running run, leased to `site`, has input `sha256` (indexed)."""
        with self._sessions() as session:
            query = (
                select(HopRow.id)
                .join(RunRow, RunRow.id == HopRow.run_id)
                .where(
                    HopRow.input_sha256 == sha256,
                    HopRow.site == site,
                    HopRow.status.in_(LIVE_HOP_STATES),
                    RunRow.status == "running",
                )
                .limit(1)
            )
            return session.scalars(query).first() is not None

    def pending_evaluation_needs(self, site: str, sha256: str) -> bool:
        """Whether a pending evaluation at `site` scores checkpoint `sha256` (indexed)."""
        with self._sessions() as session:
            query = (
                select(EvaluationRow.id)
                .where(
                    EvaluationRow.checkpoint_sha256 == sha256,
                    EvaluationRow.site == site,
                    EvaluationRow.status == "pending",
                )
                .limit(1)
            )
            return session.scalars(query).first() is not None

    def hop(self, hop_id: str) -> HopRow | None:
        if not hop_id:  # no hop has an empty id (a site's beat between tasks): no query
            return None
        with self._sessions() as session:
            return session.get(HopRow, hop_id)

    def transition_hop(
        self,
        hop_id: str,
        *,
        expected: Collection[str],
        status: str,
        event: str,
        payload: dict[str, Any] | None = None,
        **fields: Any,
    ) -> HopRow:
        """Moves a hop to `status` if it is in one of the `expected` states (compare-and-set).

        One transaction: the row update and one chained event. Field values may be callables
        of the row (e.g. to increment a counter).

        Raises:
            TransitionRefused: The hop is not in an expected state (e.g. committed already).
        """
        with self.transaction() as session:
            hop = locked_get(session, HopRow, hop_id)
            if hop is None:
                raise KeyError(hop_id)
            if hop.status not in expected:
                raise TransitionRefused(f"hop {hop_id} is {hop.status}; cannot move to {status}")
            values = {n: v(hop) if callable(v) else v for n, v in fields.items()}
            write_columns(session, hop, {**values, "status": status})
            self.append_event(
                session,
                event,
                run_id=hop.run_id,
                hop_id=hop.id,
                site=hop.site,
                payload={
                    "index": hop.index,
                    "status": status,
                    "attempts": hop.attempts,
                    **(payload or {}),
                },
            )
            return hop

    def lease_hop(self, hop_id: str, token: str, input_sha256: str | None) -> HopRow:
        return self.transition_hop(
            hop_id,
            expected=("pending",),
            status="leased",
            event="hop.leased",
            payload={"input_sha256": input_sha256},
            lease_token=token,
            leased_at=utcnow(),
            input_sha256=input_sha256,
            attempts=lambda hop: hop.attempts + 1,
        )

    def commit_hop(
        self,
        hop_id: str,
        *,
        lease_token: str,
        output_sha256: str,
        metrics: dict[str, float],
        train_started_at_ns: int,
        train_finished_at_ns: int,
        base_model_sha256: str,
    ) -> HopRow:
        """Commits a hop exactly once: only from a live lease with the same token."""
        with self.transaction() as session:
            hop = locked_get(session, HopRow, hop_id)
            if hop is None:
                raise KeyError(hop_id)
            if hop.status not in LIVE_HOP_STATES or hop.lease_token != lease_token:
                raise TransitionRefused(f"hop {hop_id} is {hop.status}; cannot commit it")
            # The run's base model, once pinned, never changes: read alone (no run row
            # built). Unpinned, the run is read under its lock, as every writer of the run
            # reads it: a commit running meanwhile (a round's other member, another process)
            # must see the base model pinned here.
            found = _cursor.read(connection_of(session), _pin_query(), {"run_id": hop.run_id})
            pinned = found[0][0] if found else None
            run = locked_get(session, RunRow, hop.run_id) if pinned is None else None
            write_columns(session, hop, {
                "status": "committed", "output_sha256": output_sha256, "metrics": metrics,
                "train_started_at_ns": train_started_at_ns,
                "train_finished_at_ns": train_finished_at_ns, "committed_at": utcnow(),
                "lease_token": None,
            })  # fmt: skip
            if run is not None and run.base_model_sha256 is None:
                run.base_model_sha256 = base_model_sha256
            self.append_event(
                session,
                "hop.committed",
                run_id=hop.run_id,
                hop_id=hop.id,
                site=hop.site,
                payload={
                    "index": hop.index,
                    "status": "committed",
                    "input_sha256": hop.input_sha256,
                    "output_sha256": output_sha256,
                    "metrics": metrics,
                    "train_started_at_ns": train_started_at_ns,
                    "train_finished_at_ns": train_finished_at_ns,
                },
            )
            return hop

    def record_hop_validation(
        self, hop_id: str, *, site: str, ok: bool, metrics: dict[str, float], error: str
    ) -> HopRow:
        """Adds a committed hop's validation metrics, measured by its site after the commit.

        The ``hop.validated`` event carries them; the hop's metrics become the train metrics
        of its commit plus these (a failed pass adds nothing). Recorded once: a retried report
        of the same metrics writes nothing.

        Raises:
            KeyError: No such hop.
            TransitionRefused: The hop is not committed, not this site's, or already validated
                with other metrics.
        """
        with self.transaction() as session:
            hop = locked_get(session, HopRow, hop_id)
            if hop is None:
                raise KeyError(hop_id)
            if hop.site != site or hop.status != "committed":
                raise TransitionRefused(f"hop {hop_id} is not a committed hop of site {site}")
            already = session.scalars(
                select(EventRow).where(EventRow.hop_id == hop_id, EventRow.kind == "hop.validated")
            ).first()
            if already is not None:
                if already.payload.get("metrics") == metrics and already.payload.get("ok") == ok:
                    return hop
                raise TransitionRefused(f"hop {hop_id} was already validated")
            if ok:
                hop.metrics = {**hop.metrics, **metrics}
            self.append_event(
                session,
                "hop.validated",
                run_id=hop.run_id,
                hop_id=hop.id,
                site=site,
                payload={"index": hop.index, "ok": ok, "metrics": metrics, "error": error},
            )
            return hop

    def transition_run(
        self,
        run_id: str,
        *,
        expected: Collection[str],
        status: str,
        payload: dict[str, Any] | None = None,
        **fields: Any,
    ) -> RunRow:
        """Moves a run to `status` (event `run.<status>`) if it is in an expected state."""
        with self.transaction() as session:
            run = locked_get(session, RunRow, run_id)
            if run is None:
                raise KeyError(run_id)
            if run.status not in expected:
                raise TransitionRefused(f"run {run_id} is {run.status}; cannot move to {status}")
            for name, value in fields.items():
                setattr(run, name, value)
            run.status = status
            if status in TERMINAL_RUN_STATES:
                run.finished_at = utcnow()
            self.append_event(session, f"run.{status}", run_id=run_id, payload=payload or {})
            return run

    # ---- certificates -------------------------------------------------------------------------

    def revoke(self, serial: str, *, reason: str, by: str) -> None:
        with self.transaction() as session:
            if session.get(RevocationRow, serial) is not None:
                return
            session.add(
                RevocationRow(serial=serial, reason=reason, revoked_by=by, revoked_at=utcnow())
            )
            self.append_event(
                session,
                "certificate.revoked",
                payload={"serial": serial, "reason": reason, "by": by},
            )

    def revocations(self) -> dict[str, str]:
        with self._sessions() as session:
            return {row.serial: row.reason for row in session.scalars(select(RevocationRow))}
