"""Aggregate statistics rounds: sites release checked aggregates of a dataset, pooled here."""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
import uuid
from datetime import UTC, datetime, timedelta
from typing import get_args

from coordinator.engine.ledger_writer import LedgerWriter
from coordinator.engine.sessions import SiteSession, SiteSessions
from coordinator.engine.tasks import (
    statistics_bundle,
    statistics_expiry,
    statistics_key,
    statistics_task,
    unix_seconds,
)
from coordinator.errors import InvalidInput, NotFound, PermissionDenied, StaleLease
from coordinator.ledger import (
    Ledger,
    StatisticsAnswerRow,
    StatisticsRequestRow,
    TransitionRefused,
)
from coordinator.plan import TaskType
from coordinator.statistics import (
    CombinedStatistics,
    FoldAggregates,
    SiteAggregates,
    StatisticsMismatch,
    combine,
)
from protocols.v1 import baton_pb2 as pb

__all__ = ["StatisticsRounds"]

logger = logging.getLogger(__name__)

_TASK_TYPES: tuple[str, ...] = get_args(TaskType)
_MAX_MIN_COUNT = 1_000_000_000  # StatisticsTask.min_count is a uint32
_MAX_STATISTICS_EXPIRY_SECONDS = 30 * 86400
_MAX_CV_FOLDS = 20  # as a run plan's cross_validation.folds


def _released_aggregates(
    request: StatisticsRequestRow, site: str, result: pb.StatisticsResult
) -> SiteAggregates:
    """A site's reported aggregates, checked before anything is stored."""
    try:
        released = SiteAggregates(
            site=site,
            count=result.count,
            feature_names=tuple(result.feature_names),
            feature_sums=tuple(result.feature_sums),
            feature_sums_of_squares=tuple(result.feature_sums_of_squares),
            label_counts=dict(result.label_counts),
            length_bin_edges=tuple(result.length_bin_edges),
            length_histogram=tuple(result.length_histogram),
            length_unit=result.length_unit,
            folds=tuple(
                FoldAggregates(
                    fold=f.fold,
                    count=f.count,
                    feature_sums=tuple(f.feature_sums),
                    feature_sums_of_squares=tuple(f.feature_sums_of_squares),
                )
                for f in result.folds
            ),
        )
    except StatisticsMismatch as exc:
        raise InvalidInput(str(exc)) from exc
    cv_folds = request.cv_folds or 0
    if len(released.folds) != cv_folds:
        raise InvalidInput(
            f"site {site} released {len(released.folds)} folds; the request asked for "
            f"{cv_folds}" + (" (an agent that predates per-fold statistics answers without "
                             "folds: upgrade it)" if cv_folds and not released.folds else "")
        )  # fmt: skip
    if request.noise_std == 0:
        # Fold k's training part differs from the whole split by fold k's rows: both, and so
        # every difference of two released aggregates, must reach the minimum.
        for fold in released.folds:
            held_out = released.count - fold.count
            if fold.count < request.min_count or held_out < request.min_count:
                raise InvalidInput(
                    f"site {site} released fold {fold.fold} over {fold.count:g} training rows "
                    f"and {held_out:g} held-out rows; both must reach the request's minimum of "
                    f"{request.min_count}"
                )
    if request.task_type == "tabular" and not released.feature_names:
        raise InvalidInput("tabular statistics must name their features")
    if request.noise_std == 0 and released.count < request.min_count:
        raise InvalidInput(
            f"site {site} released aggregates over {released.count:g} rows, fewer than the "
            f"request's minimum of {request.min_count}"
        )
    if request.noise_std == 0:
        # Sites suppress or merge small cells; one that does not (an old agent) is refused.
        small = [f"label {label!r}" for label, n in released.label_counts.items()
                 if n < request.min_count] + [
            f"length bin from {edge}"
            for edge, n in zip(released.length_bin_edges, released.length_histogram, strict=True)
            if n < request.min_count
        ]  # fmt: skip
        if small:
            raise InvalidInput(
                f"site {site} released cells below the request's minimum of "
                f"{request.min_count}: {', '.join(small)}"
            )
    return released


class StatisticsRounds:
    """Statistics requests: created, sent to their sites, answered, settled or expired.

    Their ledger reads and writes run on the engine's ledger writer thread, never on the event
    loop, while the caller holds the engine's lock (so ``_sent`` is touched by one at a time);
    tasks are queued to sessions on the loop.
    """

    def __init__(
        self,
        ledger: Ledger,
        lock: asyncio.Lock,
        sessions: SiteSessions,
        writer: LedgerWriter,
        *,
        min_count: int,
        expiry_seconds: float,
    ) -> None:
        self.ledger = ledger
        self.writer = writer
        self._lock = lock  # the engine's one lock over state transitions
        self.sessions = sessions
        self.statistics_min_count = min_count  # for requests that name no minimum
        self.statistics_expiry_seconds = expiry_seconds  # for requests naming none
        self._sent: dict[str, SiteSession] = {}  # statistics key -> session its task went to

    async def collect_statistics(
        self,
        dataset: str,
        task_type: str,
        sites: list[str],
        *,
        min_count: int = 0,
        noise_std: float = 0.0,
        expires_in_seconds: float = 0.0,
        cv_folds: int = 0,
    ) -> str:
        """Asks sites for aggregate statistics of a dataset's training rows; returns the id.

        Args:
            dataset: The dataset name every site registered.
            task_type: The dataset's task type.
            sites: The sites to ask (at least one; each must have connected once).
            min_count: No aggregate over fewer rows may leave a site; 0: the coordinator's
                default (``statistics_min_count``). Sites may enforce a higher floor.
            noise_std: > 0: sites add Gaussian noise of this std to every aggregate.
            expires_in_seconds: The request fails if not every site answered by then; 0: the
                coordinator's default (``statistics_expiry_seconds``).
            cv_folds: 2 to 20 (tabular only): sites also answer per cross-validation fold, as
                their registrations deal the folds, and the result holds one normaliser per
                fold over the training rows outside it; 0: one global answer only.
        """
        if not dataset or len(dataset) > 200:
            raise InvalidInput("a statistics request needs a dataset name (at most 200 characters)")
        if task_type not in _TASK_TYPES:
            raise InvalidInput(
                f"task type must be one of {', '.join(_TASK_TYPES)}, not {task_type!r}"
            )
        chosen = list(dict.fromkeys(sites))
        if not chosen:
            raise InvalidInput("a statistics request must name at least one site")
        known = {row.name for row in await self.writer.run(self.ledger.sites)}
        unknown = sorted(set(chosen) - known)
        if unknown:
            raise InvalidInput(f"no site named {', '.join(unknown)} has ever connected")
        min_count = min_count or self.statistics_min_count
        if not 1 <= min_count <= _MAX_MIN_COUNT:
            raise InvalidInput(f"min_count must be in [1, {_MAX_MIN_COUNT}], got {min_count}")
        if not (math.isfinite(noise_std) and noise_std >= 0):
            raise InvalidInput(f"noise_std must be finite and >= 0, got {noise_std}")
        if cv_folds and not 2 <= cv_folds <= _MAX_CV_FOLDS:
            raise InvalidInput(f"cv_folds must be 0 or in [2, {_MAX_CV_FOLDS}], got {cv_folds}")
        if cv_folds and task_type != "tabular":
            raise InvalidInput(
                f"per-fold statistics (cv_folds) are for tabular datasets, not {task_type}: "
                "only tabular runs use a normaliser"
            )
        expires_in = expires_in_seconds or self.statistics_expiry_seconds
        if not (math.isfinite(expires_in) and 1 <= expires_in <= _MAX_STATISTICS_EXPIRY_SECONDS):
            raise InvalidInput(
                f"a statistics request expires in 1 s to {_MAX_STATISTICS_EXPIRY_SECONDS} s, "
                f"not {expires_in:g} s"
            )
        created_at = datetime.now(UTC)
        request = StatisticsRequestRow(
            id=uuid.uuid4().hex,
            dataset=dataset,
            task_type=task_type,
            min_count=min_count,
            noise_std=float(noise_std),
            sites=chosen,
            status="pending",
            combined={},
            created_at=created_at,
            expires_at=created_at + timedelta(seconds=expires_in),
            cv_folds=cv_folds,
        )
        answers = [
            StatisticsAnswerRow(
                site=site, status="pending", lease_token=secrets.token_hex(16), aggregates={}
            )
            for site in chosen
        ]
        await self.writer.run(
            self.ledger.create_statistics,
            request, answers, approval_bundle_sha256=statistics_bundle(request).sha256,
        )  # fmt: skip
        logger.info("statistics %s of %s requested from %s (min count %d, noise std %g, "
                    "folds %d)", request.id, dataset, ", ".join(chosen), min_count, noise_std,
                    cv_folds)  # fmt: skip
        await self.dispatch_statistics()
        return request.id

    async def dispatch_statistics(self) -> None:
        """Sends each pending statistics task to its site if connected (again after a reconnect).

        A request past its expiry fails first (as ``expire_statistics``). A request whose answers
        are all in but which is still pending (the coordinator stopped between recording the last
        answer and settling) is settled here.
        """
        now = datetime.now(UTC)
        async with self._lock:
            for request in await self.writer.run(self._waiting, now):
                for answer in request.answers:
                    session = self.sessions.get(answer.site)
                    key = statistics_key(request.id, answer.site)
                    if answer.status != "pending" or session is None:
                        continue
                    if self._sent.get(key) is session:
                        continue
                    self._sent[key] = session
                    session.queue.put_nowait(statistics_task(request, answer))

    def _waiting(self, now: datetime) -> list[StatisticsRequestRow]:
        """The pending requests still waiting for an answer; expires those past their expiry
        and settles those answered in full (one read of the pending requests)."""
        waiting = []
        for request in self._unexpired(now):
            if all(answer.status != "pending" for answer in request.answers):
                self._settle(request)
            else:
                waiting.append(request)
        return waiting

    async def report_statistics(self, site: str, result: pb.StatisticsResult) -> str:
        """Records one site's aggregates or refusal; settles the request when it can.

        A request fails as soon as one site refuses (answers already in are kept, and answers
        from sites already at work are still recorded); it is done, with the pooled statistics,
        once every site has answered with aggregates.

        Returns:
            The site's answer status: "done" or "failed".
        """
        async with self._lock:
            return await self.writer.run(self._record_answer, site, result)

    def _record_answer(self, site: str, result: pb.StatisticsResult) -> str:
        request = self.ledger.statistics_request(result.statistics_id)
        if request is None:
            raise NotFound(f"no statistics request {result.statistics_id}")
        answer = next((a for a in request.answers if a.site == site), None)
        if answer is None:
            raise PermissionDenied(f"statistics {request.id} is not assigned to site {site}")
        if (
            answer.status != "pending"
            or not result.lease_token
            or answer.lease_token != result.lease_token
        ):
            raise StaleLease(f"statistics {request.id} of site {site} is not pending "
                             "under that lease token")  # fmt: skip
        expires_at = statistics_expiry(request)
        if expires_at is not None and datetime.now(UTC) > expires_at:
            self._expire(request, expires_at)
            raise StaleLease(
                f"statistics {request.id} expired at "
                f"{expires_at.isoformat(timespec='seconds')}; the answer of site {site} "
                "came too late"
            )
        try:
            if result.ok:
                released = _released_aggregates(request, site, result)
                self.ledger.finish_statistics_answer(
                    request.id, site, lease_token=result.lease_token,
                    aggregates=released.to_json(),
                )  # fmt: skip
            else:
                self.ledger.finish_statistics_answer(
                    request.id, site, lease_token=result.lease_token, aggregates=None,
                    error_code=result.error_code or "site-error",
                    error=result.error_message or "the site reported a failure",
                )  # fmt: skip
        except TransitionRefused as exc:
            raise StaleLease(str(exc)) from exc
        self._sent.pop(statistics_key(request.id, site), None)
        refreshed = self.ledger.statistics_request(request.id)
        assert refreshed is not None
        if refreshed.status == "pending":
            self._settle(refreshed)
        logger.info("statistics %s: site %s answered (%s)", request.id, site,
                    "ok" if result.ok else result.error_code)  # fmt: skip
        return "done" if result.ok else "failed"

    def _settle(self, request: StatisticsRequestRow) -> None:
        """Fails a pending request once a site refused; combines once every site answered."""
        failed = [a for a in request.answers if a.status == "failed"]
        try:
            if failed:
                error = "; ".join(f"{a.site}: {a.error_code}: {a.error}" for a in failed)
                if request.cv_folds and any(
                    a.error_code == "not-approved" and "differs from its bundle" in (a.error or "")
                    for a in failed
                ):
                    error += (
                        " (a per-fold request: a site agent that predates per-fold statistics "
                        "refuses it this way; upgrade that site, or collect without --cv-folds)"
                    )
                self.ledger.settle_statistics(request.id, status="failed", error=error)
                logger.warning("statistics %s failed: %s", request.id, error)
                return
            if any(a.status == "pending" for a in request.answers):
                return
            try:
                combined = combine(
                    [SiteAggregates.from_json(a.aggregates) for a in request.answers],
                    cv_folds=request.cv_folds or 0,
                )
            except StatisticsMismatch as exc:
                self.ledger.settle_statistics(request.id, status="failed", error=str(exc))
                logger.warning("statistics %s failed: %s", request.id, exc)
                return
            self.ledger.settle_statistics(request.id, status="done", combined=combined.to_json())
            logger.info("statistics %s done over %g rows", request.id, combined.count)
        except TransitionRefused:
            pass  # settled already

    async def expire_statistics(self) -> None:
        """Fails every pending statistics request past its expiry (``statistics.expired``).

        A pass that finds no pending request (one indexed read, on the loop) takes neither the
        engine's lock nor the ledger writer: the watchdog's pass every half second no longer
        reads every pending request as ORM rows (about 0.5 ms of CPU) on the writer thread,
        under the lock a hand back's commit waits for. A request made after that read is
        expired by a later pass (an expiry is at least a second away).
        """
        now = datetime.now(UTC)
        if not self.ledger.has_pending_statistics():
            return
        async with self._lock:
            await self.writer.run(self._unexpired, now)

    def _unexpired(self, now: datetime) -> list[StatisticsRequestRow]:
        """Expires the pending requests past their expiry; returns the other pending ones."""
        unexpired = []
        for request in self.ledger.statistics_requests("pending"):
            expires_at = statistics_expiry(request)
            if expires_at is not None and now > expires_at:
                self._expire(request, expires_at)
            else:
                unexpired.append(request)
        return unexpired

    def _expire(self, request: StatisticsRequestRow, expires_at: datetime) -> None:
        waiting = [a.site for a in request.answers if a.status == "pending"]
        error = (
            f"expired at {expires_at.isoformat(timespec='seconds')} before "
            f"{', '.join(waiting) or 'every site'} answered"
        )
        try:
            self.ledger.settle_statistics(
                request.id, status="failed", error=error, event="statistics.expired"
            )
        except TransitionRefused:
            return  # settled already
        for site in waiting:
            self._sent.pop(statistics_key(request.id, site), None)
        logger.warning("statistics %s %s", request.id, error)

    def statistics_status(self, request_id: str) -> pb.StatisticsStatus:
        """The admin view of a statistics request, with the pooled result once done."""
        request = self.ledger.statistics_request(request_id)
        if request is None:
            raise NotFound(f"no statistics request {request_id!r}")
        status = pb.StatisticsStatus(
            statistics_id=request.id,
            status=request.status,
            dataset=request.dataset,
            task_type=request.task_type,
            min_count=request.min_count,
            noise_std=request.noise_std,
            approval_bundle_sha256=statistics_bundle(request).sha256,
            error=request.error or "",
            expires_at=unix_seconds(statistics_expiry(request)),
            cv_folds=request.cv_folds or 0,
        )
        for answer in request.answers:
            status.sites.add(
                site=answer.site,
                status=answer.status,
                count=float(answer.aggregates.get("count", 0.0)),
                error=f"{answer.error_code}: {answer.error}" if answer.status == "failed" else "",
            )
        if request.status == "done":
            combined = CombinedStatistics.from_json(request.combined)
            status.count = combined.count
            status.feature_names.extend(combined.feature_names)
            status.mean.extend(combined.mean)
            status.std.extend(combined.std)
            status.label_counts.update(combined.label_counts)
            status.length_bin_edges.extend(combined.length_bin_edges)
            status.length_histogram.extend(combined.length_histogram)
            status.length_unit = combined.length_unit
            for fold in combined.folds:
                status.folds.add(fold=fold.fold, count=fold.count, mean=fold.mean, std=fold.std)
        return status
