"""Pure decisions over a run's rows: its failure policy, its current hop, a hop's input."""

from __future__ import annotations

import math

from coordinator.errors import InvalidInput
from coordinator.ledger import HopRow, RunRow
from coordinator.plan import FailurePolicy

__all__ = [
    "DETERMINISTIC_FAILURES",
    "actor",
    "current_hop",
    "failure_policy",
    "finite_metrics",
    "input_sha",
]

# Failures that the same site would hit again on a retry: the policy's `then` applies at once.
DETERMINISTIC_FAILURES = frozenset(
    {"not-approved", "base-model-mismatch", "dataset-invalid", "unsupported-task", "no-base-model",
     "bad-task"}
)  # fmt: skip


def failure_policy(run: RunRow) -> FailurePolicy:
    return FailurePolicy.model_validate(run.plan.get("failure", {}))


def current_hop(run: RunRow) -> HopRow | None:
    """The first hop not yet settled (committed or skipped), or None when all are."""
    return next((h for h in run.hops if h.status not in ("committed", "skipped")), None)


def input_sha(run: RunRow, hop: HopRow) -> str | None:
    """A hop trains from the last committed output before it (skipped hops pass it through)."""
    for previous in reversed(run.hops[: hop.index]):
        if previous.status == "committed":
            return previous.output_sha256
    return None


def finite_metrics(metrics: dict[str, float]) -> dict[str, float]:
    bad = sorted(k for k, v in metrics.items() if not math.isfinite(v))
    if bad:
        raise InvalidInput(f"metrics must be finite; not finite: {', '.join(bad)}")
    return metrics


def actor(by: str | None) -> dict[str, str]:
    """The acting account for an event's payload (nothing when the caller names none)."""
    return {"by": by} if by else {}
