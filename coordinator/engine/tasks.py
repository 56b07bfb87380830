"""Pure builders of the task messages sent to sites, the approval bundles they carry, and the
small input bundles kept in memory for the next hop's task to carry."""

from __future__ import annotations

import json
import math
import threading
from collections import OrderedDict
from datetime import UTC, datetime

from coordinator.engine.handoff import INLINE_BUNDLE_BYTES
from coordinator.ledger import (
    CheckpointRow,
    EvaluationRow,
    HopRow,
    RunRow,
    StatisticsAnswerRow,
    StatisticsRequestRow,
)
from coordinator.plan import RunPlan
from protocols.approval import ApprovalBundle
from protocols.hyperparameter_messages import to_message
from protocols.hyperparameters import HopHyperparameters
from protocols.v1 import baton_pb2 as pb

__all__ = [
    "RecentBundles",
    "approval_bundle",
    "approval_json",
    "checkpoint_ref",
    "evaluation_task",
    "hop_task",
    "statistics_bundle",
    "statistics_expiry",
    "statistics_key",
    "statistics_task",
    "unix_seconds",
]


def lora_config(plan: dict[str, object]) -> pb.LoraConfig:
    lora = plan["lora"]
    assert isinstance(lora, dict)
    return pb.LoraConfig(
        r=lora["r"],
        alpha=lora["alpha"],
        dropout=lora["dropout"],
        target_modules=lora["target_modules"],
    )


def hop_task(run: RunRow, hop: HopRow, input_ref: CheckpointRow | None) -> pb.Task:
    plan = run.plan
    task = pb.HopTask(
        run_id=run.id,
        hop_id=hop.id,
        hop_index=hop.index,
        lease_token=hop.lease_token or "",
        task_type=plan["task"],
        dataset=plan["dataset"],
        labels=plan["labels"],
        base_model_sha256=run.base_model_sha256 or "",
        lora=lora_config(plan),
        hyperparameters=to_message(HopHyperparameters.model_validate(hop.hyperparameters)),
        task_options_json=json.dumps(plan.get("options", {}), sort_keys=True),
        approval_bundle_json=approval_json(run),
    )
    if input_ref is not None:
        task.input_checkpoint.CopyFrom(checkpoint_ref(input_ref))
    cv = cross_validation(run)
    if cv is not None:
        task.cross_validation.CopyFrom(cv)
    return pb.Task(hop=task)


def cross_validation(run: RunRow) -> pb.CrossValidation | None:
    spec = run.plan.get("cross_validation")
    if not spec:
        return None
    assert isinstance(spec, dict)
    return pb.CrossValidation(
        folds=int(spec["folds"]), min_validation_rows=int(spec["min_validation_rows"])
    )


def evaluation_task(run: RunRow, row: EvaluationRow, checkpoint: CheckpointRow) -> pb.Task:
    plan = run.plan
    task = pb.Task(
        evaluation=pb.EvaluationTask(
            evaluation_id=row.id,
            lease_token=row.lease_token or "",
            run_id=run.id,
            checkpoint=checkpoint_ref(checkpoint),
            task_type=plan["task"],
            dataset=plan["dataset"],
            labels=plan["labels"],
            base_model_sha256=run.base_model_sha256 or "",
            lora=lora_config(plan),
            task_options_json=json.dumps(plan.get("options", {}), sort_keys=True),
            split=row.split,
            approval_bundle_json=approval_json(run),
        )
    )
    cv = cross_validation(run)
    if cv is not None:
        task.evaluation.cross_validation.CopyFrom(cv)
    return task


def checkpoint_ref(row: CheckpointRow) -> pb.CheckpointRef:
    """Where a site finds a checkpoint, with what it needs to verify who produced it."""
    return pb.CheckpointRef(
        sha256=row.sha256,
        size=row.size,
        signature=bytes.fromhex(row.signature),
        producer_certificate=row.producer_certificate.encode("ascii"),
    )


def approval_bundle(run: RunRow) -> ApprovalBundle:
    """The bundle the run's sites approve, rebuilt from the plan stored with the run."""
    return RunPlan.model_validate(run.plan).approval_bundle()


# Plan (as its JSON text, keys in stored order) -> its approval bundle's canonical JSON.
_APPROVALS: dict[str, str] = {}
_APPROVALS_LOCK = threading.Lock()
_APPROVALS_KEPT = 64


def approval_json(run: RunRow) -> str:
    """`approval_bundle(run).canonical_json()`, built once per distinct stored plan.

    Every hop task carries it, and building it (validating the plan, expanding its bounds)
    costs milliseconds; it depends on the plan's content alone, which keys the cache.
    """
    key = json.dumps(run.plan)
    with _APPROVALS_LOCK:
        found = _APPROVALS.get(key)
    if found is None:
        found = approval_bundle(run).canonical_json()
        with _APPROVALS_LOCK:
            if len(_APPROVALS) >= _APPROVALS_KEPT:
                _APPROVALS.clear()
            _APPROVALS[key] = found
    return found


def statistics_bundle(request: StatisticsRequestRow) -> ApprovalBundle:
    """The bundle a statistics request's sites approve, rebuilt from the stored request."""
    return ApprovalBundle.for_statistics(
        request.task_type,
        request.dataset,
        min_count=request.min_count,
        noise_std=request.noise_std,
        cv_folds=request.cv_folds or 0,
    )


def statistics_task(request: StatisticsRequestRow, answer: StatisticsAnswerRow) -> pb.Task:
    return pb.Task(
        statistics=pb.StatisticsTask(
            statistics_id=request.id,
            lease_token=answer.lease_token or "",
            task_type=request.task_type,
            dataset=request.dataset,
            min_count=request.min_count,
            noise_std=request.noise_std,
            approval_bundle_json=statistics_bundle(request).canonical_json(),
            expires_at=unix_seconds(statistics_expiry(request)),
            cv_folds=request.cv_folds or 0,
        )
    )


def statistics_expiry(request: StatisticsRequestRow) -> datetime | None:
    """When a pending request fails (aware UTC; SQLite returns naive datetimes), or None."""
    expires_at = request.expires_at
    if expires_at is not None and expires_at.tzinfo is None:
        expires_at = expires_at.replace(tzinfo=UTC)
    return expires_at


def unix_seconds(moment: datetime | None) -> int:
    return math.ceil(moment.timestamp()) if moment is not None else 0


def statistics_key(request_id: str, site: str) -> str:
    """Key of a site's statistics task among the tasks sent (hop and evaluation ids are bare)."""
    return f"statistics:{request_id}:{site}"


class RecentBundles:
    """The bytes of the small bundles stored lately, each taken once by the task that carries
    it inside (the next hop's input): the coordinator held them a moment before, and reading
    them back from the store (a file read and a hash) would be on the handoff.

    Bounded: at most `kept` bundles of at most `max_bytes` each, the oldest dropped first;
    a bundle not found here (dropped, or after a restart) is read from the store as before.
    The bytes are the ones checked before they were stored (content-addressed: their hash is
    their key), so a task carries exactly what the store holds.
    """

    def __init__(self, max_bytes: int = INLINE_BUNDLE_BYTES, kept: int = 4) -> None:
        self.max_bytes = max_bytes
        self.kept = kept
        self._bundles: OrderedDict[str, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def keep(self, sha256: str, data: bytes) -> None:
        """Keeps a stored bundle's bytes for its next task, if it is small enough to ride in it."""
        if len(data) > self.max_bytes:
            return
        with self._lock:
            self._bundles[sha256] = data
            self._bundles.move_to_end(sha256)
            while len(self._bundles) > self.kept:
                self._bundles.popitem(last=False)

    def take(self, sha256: str) -> bytes | None:
        """The kept bytes of a bundle (dropped from here), or None."""
        with self._lock:
            return self._bundles.pop(sha256, None)
