"""What keeps a handoff short: the sites of a run's first visits load ahead, the next site is
told it is next, a small input rides inside the task, and a hop's validation metrics may arrive
after its commit as their own ledger event.

Pure decisions over ledger rows; the engine does the I/O.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator

from coordinator.errors import InvalidInput, NotFound, PermissionDenied
from coordinator.ledger import Ledger, TransitionRefused
from coordinator.ledger.models import CheckpointRow, HopRow, RunRow
from coordinator.storage_faults import StorageHealth
from protocols.transport import WHOLE_HAND_BACK_BYTES
from protocols.v1 import baton_pb2 as pb

__all__ = [
    "INLINE_BUNDLE_BYTES",
    "complete_hop_task",
    "finite_validation",
    "first_visits_ahead",
    "is_last_hop",
    "next_site_hop",
    "prepare_ahead_task",
    "prepare_task",
    "record_validation",
    "wants_inline_bundle",
    "whole_hand_back_parts",
]

# An input checkpoint up to this size travels inside its task (no DownloadCheckpoint call);
# LoRA adapters are hundreds of KB. Larger inputs are downloaded in chunks, resumably.
INLINE_BUNDLE_BYTES = 4 * 1024 * 1024


def _later_hops(run: RunRow, hop: HopRow) -> list[HopRow]:
    return sorted((h for h in run.hops if h.index > hop.index), key=lambda h: h.index)


def next_site_hop(run: RunRow, hop: HopRow) -> HopRow | None:
    """The hop after ``hop`` if it is still to be leased and at another site (which is idle
    while ``hop`` trains, so it can get ready); None otherwise."""
    following = next((h for h in _later_hops(run, hop) if h.status == "pending"), None)
    if following is None or following.site == hop.site:
        return None
    return following


def first_visits_ahead(run: RunRow, hop: HopRow) -> list[tuple[HopRow, int]]:
    """The first hop of each site of the run whose first visit is still to come, with how many
    hops ahead of it ``hop`` is: every site but ``hop``'s that no hop of the run has been
    leased to yet. A site that has visited holds what the run needs already."""
    visited = {h.site for h in run.hops if h.status != "pending"} | {hop.site}
    ahead: list[tuple[HopRow, int]] = []
    for later in _later_hops(run, hop):
        if later.site not in visited and later.status == "pending":
            visited.add(later.site)
            ahead.append((later, later.index - hop.index))
    return ahead


def is_last_hop(run: RunRow, hop: HopRow) -> bool:
    """No hop of the run is left to train after this one (its metrics complete the run)."""
    return not any(h.status in ("pending", "leased", "training", "uploaded")
                   for h in _later_hops(run, hop))  # fmt: skip


def prepare_task(hop_task: pb.Task) -> pb.Task:
    """A "you are next" task from the next hop's task: no lease, no input yet."""
    hop = pb.HopTask()
    hop.CopyFrom(hop_task.hop)
    for name in ("lease_token", "input_checkpoint", "input_bundle", "validation_after_commit"):
        hop.ClearField(name)
    return pb.Task(prepare=pb.PrepareHop(hop=hop))


def prepare_ahead_task(hop_task: pb.Task, hops_ahead: int) -> pb.Task:
    """A "you are in this run's schedule" task from a later hop's task (as `prepare_task`)."""
    return pb.Task(
        prepare_ahead=pb.PrepareAhead(hop=prepare_task(hop_task).prepare.hop, hops_ahead=hops_ahead)
    )


def wants_inline_bundle(checkpoint: CheckpointRow | None) -> bool:
    """Whether a hop's input is small enough to travel inside its task."""
    return checkpoint is not None and checkpoint.size <= INLINE_BUNDLE_BYTES


def complete_hop_task(
    task: pb.Task, run: RunRow, hop: HopRow, input_ref: CheckpointRow | None, bundle: bytes | None
) -> pb.Task:
    """A leased hop's task with what shortens its handoff: the input bundle when it is small
    (``bundle``, read by the caller from the store), and whether validation may follow the
    commit (every hop but the run's last)."""
    if bundle is not None and input_ref is not None and len(bundle) == input_ref.size:
        task.hop.input_bundle = bundle
    task.hop.validation_after_commit = not is_last_hop(run, hop)
    return task


def whole_hand_back_parts(request: pb.HandBackWhole) -> AsyncIterator[pb.HandBackRequest]:
    """A hand back in one message (HandBackHopWhole) as the parts of a streamed one that follow
    its header (the bundle, then the result), so it goes through every check of HandBackHop.

    Raises:
        InvalidInput: The header or the result is missing, or the bundle is over
            `WHOLE_HAND_BACK_BYTES` (those stream with HandBackHop).
    """
    if not request.HasField("header") or not request.HasField("result"):
        raise InvalidInput("a hand back in one message carries its upload header and its result")
    size = max(request.header.total_size, len(request.bundle))
    if size > WHOLE_HAND_BACK_BYTES:
        raise InvalidInput(
            f"a hand back in one message carries at most {WHOLE_HAND_BACK_BYTES} bytes of bundle, "
            f"this one {size}; stream it with HandBackHop"
        )

    async def parts() -> AsyncIterator[pb.HandBackRequest]:
        if request.bundle:
            yield pb.HandBackRequest(data=request.bundle)
        yield pb.HandBackRequest(result=request.result)

    return parts()


def finite_validation(report: pb.HopValidation) -> dict[str, float]:
    """A validation report's metrics, refused if one is not a finite number."""
    metrics = {str(k): float(v) for k, v in report.metrics.items()}
    bad = sorted(k for k, v in metrics.items() if not math.isfinite(v))
    if bad:
        raise InvalidInput(f"validation metrics must be finite; not finite: {', '.join(bad)}")
    return metrics


def record_validation(
    ledger: Ledger, storage: StorageHealth, site: str, report: pb.HopValidation
) -> HopRow:
    """Records a committed hop's validation metrics (``hop.validated``) for its own site.

    The caller holds the engine's lock (the event chain stays one line).

    Raises:
        NotFound: No such hop.
        PermissionDenied: The hop is not a committed hop of this site, or was validated already
            with other metrics.
        InvalidInput: A metric is not finite.
        StorageFault: The ledger cannot be written now (the site retries).
    """
    metrics = finite_validation(report) if report.ok else {}
    try:
        with storage.guard(f"validation of hop {report.hop_id}"):
            return ledger.record_hop_validation(
                report.hop_id,
                site=site,
                ok=report.ok,
                metrics=metrics,
                error=report.error_message[:2000],
            )
    except KeyError as exc:
        raise NotFound(f"hop {report.hop_id} does not exist") from exc
    except TransitionRefused as exc:
        raise PermissionDenied(str(exc)) from exc
