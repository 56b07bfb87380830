"""Evaluations and aggregate statistics requests in the ledger."""

from __future__ import annotations

import functools
from typing import Any

from sqlalchemy import Select, select
from sqlalchemy.orm import selectinload

from coordinator.ledger._chain import LedgerCore, TransitionRefused, locked_get, utcnow
from coordinator.ledger.models import EvaluationRow, StatisticsAnswerRow, StatisticsRequestRow


@functools.cache
def _pending_statistics_query() -> Select[Any]:
    """The id of one pending statistics request (indexed status), built once."""
    requests = StatisticsRequestRow.__table__.c  # a plain statement: no ORM row built
    return select(requests.id).where(requests.status == "pending").limit(1)


class EvaluationRecords(LedgerCore):
    """Evaluation and statistics requests, their answers and settlements."""

    # ---- evaluations ----------------------------------------------------------------------------

    def create_evaluations(self, rows: list[EvaluationRow], *, by: str | None = None) -> None:
        with self.transaction() as session:
            session.add_all(rows)
            for row in rows:
                self.append_event(
                    session,
                    "evaluation.requested",
                    run_id=row.run_id,
                    site=row.site,
                    payload={
                        "evaluation_id": row.id,
                        "checkpoint_sha256": row.checkpoint_sha256,
                        "split": row.split,
                        **({"by": by} if by else {}),
                    },
                )

    def pending_evaluations(self) -> list[EvaluationRow]:
        with self._sessions() as session:
            query = select(EvaluationRow).where(EvaluationRow.status == "pending")
            return list(session.scalars(query.order_by(EvaluationRow.created_at)))

    def evaluation(self, evaluation_id: str) -> EvaluationRow | None:
        with self._sessions() as session:
            return session.get(EvaluationRow, evaluation_id)

    def finish_evaluation(
        self,
        evaluation_id: str,
        *,
        metrics: dict[str, float],
        error: str | None = None,
    ) -> None:
        with self.transaction() as session:
            row = session.get(EvaluationRow, evaluation_id)
            if row is None:
                raise KeyError(evaluation_id)
            row.status = "failed" if error else "done"
            row.metrics = metrics
            row.error = error
            row.lease_token = None
            row.finished_at = utcnow()
            self.append_event(
                session,
                f"evaluation.{row.status}",
                run_id=row.run_id,
                site=row.site,
                payload={
                    "evaluation_id": row.id,
                    "checkpoint_sha256": row.checkpoint_sha256,
                    "split": row.split,
                    "metrics": metrics,
                    "error": error,
                },
            )

    # ---- aggregate statistics -------------------------------------------------------------------

    def create_statistics(
        self,
        request: StatisticsRequestRow,
        answers: list[StatisticsAnswerRow],
        *,
        approval_bundle_sha256: str,
    ) -> None:
        """Records a statistics request with one pending answer per site."""
        with self.transaction() as session:
            request.answers = answers
            session.add(request)
            self.append_event(
                session,
                "statistics.requested",
                payload={
                    "statistics_id": request.id,
                    "dataset": request.dataset,
                    "task_type": request.task_type,
                    "min_count": request.min_count,
                    "noise_std": request.noise_std,
                    "sites": list(request.sites),
                    "approval_bundle_sha256": approval_bundle_sha256,
                    "expires_at": request.expires_at.isoformat() if request.expires_at else None,
                    # Per-fold requests only: the other events keep the shape they always had.
                    **({"cv_folds": request.cv_folds} if request.cv_folds else {}),
                },
            )

    def statistics_request(self, request_id: str) -> StatisticsRequestRow | None:
        with self._sessions() as session:
            return session.scalars(
                select(StatisticsRequestRow)
                .where(StatisticsRequestRow.id == request_id)
                .options(selectinload(StatisticsRequestRow.answers))
            ).first()

    def has_pending_statistics(self) -> bool:
        """Whether a statistics request is pending: one indexed read of at most one id (the
        watchdog asks on every pass; most passes find none)."""
        with self.engine.connect() as connection:
            return connection.execute(_pending_statistics_query()).first() is not None

    def statistics_requests(self, status: str | None = None) -> list[StatisticsRequestRow]:
        """Statistics requests, oldest first; only those in `status` when given."""
        with self._sessions() as session:
            query = select(StatisticsRequestRow).options(selectinload(StatisticsRequestRow.answers))
            if status is not None:
                query = query.where(StatisticsRequestRow.status == status)
            return list(session.scalars(query.order_by(StatisticsRequestRow.created_at)))

    def finish_statistics_answer(
        self,
        request_id: str,
        site: str,
        *,
        lease_token: str,
        aggregates: dict[str, Any] | None,
        error_code: str | None = None,
        error: str | None = None,
    ) -> StatisticsAnswerRow:
        """Records a site's aggregates (`aggregates` given) or its refusal, exactly once.

        Raises:
            TransitionRefused: The answer is no longer pending under that lease token.
        """
        with self.transaction() as session:
            answer = locked_get(session, StatisticsAnswerRow, (request_id, site))
            if answer is None:
                raise KeyError((request_id, site))
            if answer.status != "pending" or answer.lease_token != lease_token:
                raise TransitionRefused(
                    f"statistics {request_id} at {site} is {answer.status}; cannot answer it"
                )
            answer.status = "done" if aggregates is not None else "failed"
            answer.aggregates = aggregates or {}
            answer.error_code = error_code
            answer.error = error
            answer.lease_token = None
            answer.finished_at = utcnow()
            self.append_event(
                session,
                f"statistics.site-{answer.status}",
                site=site,
                payload={
                    "statistics_id": request_id,
                    "aggregates": answer.aggregates,
                    "error_code": error_code,
                    "error": error,
                },
            )
            return answer

    def settle_statistics(
        self,
        request_id: str,
        *,
        status: str,
        combined: dict[str, Any] | None = None,
        error: str | None = None,
        event: str | None = None,
    ) -> StatisticsRequestRow:
        """Moves a pending request to `status` ("done" with `combined`, or "failed").

        The event is `statistics.<status>` unless `event` names another (`statistics.expired`).

        Raises:
            TransitionRefused: The request is no longer pending.
        """
        with self.transaction() as session:
            request = locked_get(session, StatisticsRequestRow, request_id)
            if request is None:
                raise KeyError(request_id)
            if request.status != "pending":
                raise TransitionRefused(
                    f"statistics {request_id} is {request.status}; cannot move to {status}"
                )
            request.status = status
            request.combined = combined or {}
            request.error = error
            request.finished_at = utcnow()
            self.append_event(
                session,
                event or f"statistics.{status}",
                payload={"statistics_id": request_id, "combined": request.combined, "error": error},
            )
            return request
