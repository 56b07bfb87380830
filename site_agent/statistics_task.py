"""Aggregate statistics tasks: approved, unexpired, within this site's release budget."""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime

import grpc

from protocols.approval import ApprovalBundle, BundleViolation
from protocols.v1 import baton_pb2 as pb
from protocols.v1 import baton_pb2_grpc as pb_grpc
from site_agent.releases import ReleaseRefused, StatisticsReleases
from site_agent.task_checks import HopFailure, TaskChecks
from site_agent.transfers import _RETRYABLE, Transfers

logger = logging.getLogger("site_agent.agent")


class StatisticsRunner(TaskChecks, Transfers):
    """Answers the aggregate statistics requests the coordinator gives this site."""

    releases: StatisticsReleases

    # ---- aggregate statistics ----------------------------------------------------------------

    def _check_statistics_approval(self, task: pb.StatisticsTask) -> None:
        """Refuses a statistics request unless it matches its bundle and that is approved."""
        try:
            bundle = ApprovalBundle.from_json(task.approval_bundle_json)
        except BundleViolation as exc:
            raise HopFailure("not-approved", str(exc)) from exc
        expected = ApprovalBundle.for_statistics(
            task.task_type,
            task.dataset,
            min_count=task.min_count,
            noise_std=task.noise_std,
            cv_folds=task.cv_folds,
        )
        if bundle != expected:
            raise HopFailure("not-approved", "the statistics request differs from its bundle")
        if self.settings.require_approval and not self.approvals.is_approved(bundle):
            raise HopFailure(
                "not-approved",
                f"statistics bundle {bundle.sha256} is not approved at this site; review it "
                f"with `baton-site approvals` and approve it with "
                f"`baton-site approve {bundle.sha256}`",
            )

    def _check_statistics_expiry(self, task: pb.StatisticsTask) -> None:
        """Refuses a statistics request past its expiry (by this site's clock, with tolerance)."""
        now = time.time()
        if task.expires_at and now > task.expires_at + self.settings.clock_skew_seconds:
            expired = datetime.fromtimestamp(task.expires_at, UTC).isoformat(timespec="seconds")
            raise HopFailure(
                "statistics-expired",
                f"the statistics request expired at {expired} (this site's clock is "
                f"{now - task.expires_at:.0f} s later; tolerance "
                f"{self.settings.clock_skew_seconds:g} s)",
            )

    def _run_statistics(self, stub: pb_grpc.SiteServiceStub, task: pb.StatisticsTask) -> None:
        from site_agent.releases import answer_request
        from site_agent.statistics import BelowMinimumCount

        logger.info("statistics %s of dataset %s", task.statistics_id, task.dataset)
        result = pb.StatisticsResult(statistics_id=task.statistics_id, lease_token=task.lease_token)
        try:
            self._check_statistics_expiry(task)
            self._check_statistics_approval(task)
            dataset = self._dataset(task.dataset, task.task_type)
            try:
                aggregates = answer_request(
                    dataset,
                    self.releases,
                    min_count=max(task.min_count, self.settings.min_aggregate_rows),
                    noise_std=task.noise_std,
                    base_model_dir=self.settings.base_model_dir,
                    cv_folds=task.cv_folds,
                )
            except BelowMinimumCount as exc:
                raise HopFailure("below-minimum-count", str(exc)) from exc
            except ReleaseRefused as exc:
                raise HopFailure(exc.code, str(exc)) from exc
            except ValueError as exc:
                raise HopFailure("statistics-failed", str(exc)) from exc
            result.ok = True
            result.count = aggregates.count
            result.feature_names.extend(aggregates.feature_names)
            result.feature_sums.extend(aggregates.feature_sums)
            result.feature_sums_of_squares.extend(aggregates.feature_sums_of_squares)
            result.label_counts.update(aggregates.label_counts)
            result.length_bin_edges.extend(aggregates.length_bin_edges)
            result.length_histogram.extend(aggregates.length_histogram)
            result.length_unit = aggregates.length_unit
            for fold in aggregates.folds:
                result.folds.add(
                    fold=fold.fold,
                    count=fold.count,
                    feature_sums=fold.feature_sums,
                    feature_sums_of_squares=fold.feature_sums_of_squares,
                )
        except HopFailure as failure:
            logger.error("statistics %s refused: %s", task.statistics_id, failure)
            result.ok = False
            result.error_code = failure.code
            result.error_message = str(failure)
        try:
            self._retrying("statistics result", lambda: stub.ReportStatistics(result, timeout=60))
        except grpc.RpcError as exc:
            if exc.code() in _RETRYABLE:
                raise
            logger.error("statistics result refused: %s %s", exc.code(), exc.details())
