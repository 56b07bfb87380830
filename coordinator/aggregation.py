"""A federated round's aggregate, computed by Flower's own strategy code over numpy arrays.

Each contribution (a site's output, or a hybrid group's chain output) becomes the reply Message a
Flower ClientApp would have sent: one ArrayRecord with its tensors and one MetricRecord with its
weight under Flower's `num-examples` key. Flower's `aggregate_train` (FedAvg, FedProx, FedAdam,
FedYogi) does the rest, example-weighted as Flower computes it. FedAdam and FedYogi keep server
state across rounds (their moments m_t and v_t): it is read from and returned as bytes, so a
resumed run continues from exactly the state the last round committed. No torch: arrays only.
numpy and safetensors are imported by the first aggregation: a coordinator that runs no federated
round never loads them (a tenth of `coordinator serve`'s start-up).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from coordinator.plan import FederatedSpec
from protocols.checkpoint import (
    AGGREGATOR,
    CheckpointError,
    CheckpointManifest,
    bundle_metadata,
)

if TYPE_CHECKING:
    import numpy as np
    from flwr.serverapp.strategy import FedAvg

__all__ = [
    "WEIGHT_KEY",
    "Aggregate",
    "AggregationError",
    "Contribution",
    "aggregate_bundle",
    "aggregate_round",
    "read_tensors",
]

logger = logging.getLogger(__name__)

WEIGHT_KEY = "num-examples"  # Flower's weighted_by_key default
_ARRAYS_KEY = "arrays"
_METRICS_KEY = "metrics"
_STATE_KINDS = ("m_t", "v_t")
# Flower's Message reads the process's task identity; aggregation sets it, one at a time.
_IDENTITY_LOCK = threading.Lock()


class AggregationError(ValueError):
    """The round's contributions cannot be aggregated (the message says which and why)."""


@dataclass(frozen=True)
class Contribution:
    """One input of a round's aggregate."""

    name: str  # the site (federated) or group (hybrid)
    sha256: str  # the committed checkpoint it is
    tensors: Mapping[str, np.ndarray]
    examples: float  # what it trained on: Flower's weight
    metrics: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Aggregate:
    """A round's result: the new global tensors, Flower's aggregated metrics, server state."""

    tensors: dict[str, np.ndarray]
    metrics: dict[str, float]
    server_state: bytes | None  # FedAdam / FedYogi moments after this round; None otherwise


def read_tensors(data: bytes) -> dict[str, np.ndarray]:
    """A checkpoint bundle's tensors as numpy arrays (float16/32/64 only: what is averaged)."""
    import numpy as np
    import safetensors
    import safetensors.numpy

    try:
        tensors = safetensors.numpy.load(data)
    except (safetensors.SafetensorError, ValueError, TypeError) as exc:
        raise AggregationError(f"checkpoint cannot be read as numpy arrays: {exc}") from exc
    for name, array in tensors.items():
        if array.dtype not in (np.float16, np.float32, np.float64):
            raise AggregationError(f"tensor {name!r} is {array.dtype}; only floats are averaged")
    return tensors


def _strategy(spec: FederatedSpec) -> FedAvg:
    from flwr.serverapp import strategy

    if spec.strategy == "fedprox":
        return strategy.FedProx(min_train_nodes=1, min_available_nodes=1,
                                proximal_mu=spec.proximal_mu)  # fmt: skip
    if spec.strategy in ("fedadam", "fedyogi"):
        kind = strategy.FedAdam if spec.strategy == "fedadam" else strategy.FedYogi
        o = spec.server_optimiser()
        return kind(min_train_nodes=1, min_available_nodes=1, eta=o["eta"],
                    beta_1=o["beta_1"], beta_2=o["beta_2"], tau=o["tau"])  # fmt: skip
    return strategy.FedAvg(min_train_nodes=1, min_available_nodes=1)


@contextlib.contextmanager
def _flower_identity() -> Iterator[None]:
    """Flower's Message needs a task identity (its runtime sets one per ServerApp); this gives
    the process one for the duration, then puts the previous one back."""
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    with _IDENTITY_LOCK:
        saved = {key: TaskIdentity.__dict__[key] for key in ("_task_id", "_run_id", "_node_id")}
        TaskIdentity.task_id = 1
        TaskIdentity.run_id = 1
        TaskIdentity.node_id = SUPERLINK_NODE_ID
        flower = logging.getLogger("flwr")
        level = flower.level
        flower.setLevel(logging.ERROR)  # Flower logs a few INFO lines per aggregation
        try:
            yield
        finally:
            flower.setLevel(level)
            for key, value in saved.items():
                setattr(TaskIdentity, key, value)


def _check_shapes(
    contributions: Sequence[Contribution], current: Mapping[str, np.ndarray] | None
) -> dict[str, tuple[np.dtype[Any], tuple[int, ...]]]:
    import numpy as np

    if not contributions:
        raise AggregationError("a round needs at least one contribution to aggregate")
    first = contributions[0]
    layout = {name: (array.dtype, array.shape) for name, array in first.tensors.items()}
    for other in contributions[1:]:
        theirs = {name: (array.dtype, array.shape) for name, array in other.tensors.items()}
        if theirs != layout:
            raise AggregationError(
                f"contributions {first.name} and {other.name} differ in tensors "
                "(names, dtypes or shapes)"
            )
    if current is not None:
        ours = {name: (array.dtype, array.shape) for name, array in current.items()}
        if ours != layout:
            raise AggregationError("contributions differ in tensors from the round's input")
    for contribution in contributions:
        if not (contribution.examples > 0 and np.isfinite(contribution.examples)):
            raise AggregationError(
                f"contribution {contribution.name} trained on {contribution.examples} examples"
            )
    return layout


def _load_state(strategy: Any, data: bytes | None) -> None:
    if data is None:
        return
    import safetensors
    import safetensors.numpy

    try:
        arrays = safetensors.numpy.load(data)
    except (safetensors.SafetensorError, ValueError) as exc:
        raise AggregationError(f"server state is unreadable: {exc}") from exc
    for kind in _STATE_KINDS:
        prefix = f"{kind}/"
        setattr(
            strategy,
            kind,
            {k.removeprefix(prefix): v for k, v in arrays.items() if k.startswith(prefix)} or None,
        )


def _dump_state(strategy: Any, spec: FederatedSpec, round_number: int) -> bytes:
    import numpy as np
    import safetensors.numpy

    arrays: dict[str, np.ndarray] = {}
    for kind in _STATE_KINDS:
        for name, value in (getattr(strategy, kind) or {}).items():
            arrays[f"{kind}/{name}"] = np.ascontiguousarray(value)
    metadata = {"strategy": spec.strategy, "round": str(round_number)}
    return bytes(safetensors.numpy.save(arrays, metadata=metadata))


def aggregate_round(
    spec: FederatedSpec,
    round_number: int,
    contributions: Sequence[Contribution],
    *,
    current: Mapping[str, np.ndarray] | None,
    server_state: bytes | None = None,
) -> Aggregate:
    """Aggregates one round's contributions with the plan's Flower strategy.

    Args:
        spec: The run's `[federated]` table.
        round_number: 1-based (FedAdam and FedYogi's bias correction depends on it).
        contributions: The round's committed contributions, in a fixed order (Flower sums in it).
        current: The round's input tensors; None for a first round that started from fresh
            adapters (FedAdam and FedYogi then average it as FedAvg does and start their
            server optimiser from the next round, with no state before it).
        server_state: What the previous round returned as `server_state`.

    Raises:
        AggregationError: Contributions that do not fit together, or unreadable state.
    """
    import numpy as np

    layout = _check_shapes(contributions, current)
    from flwr.app import Array, ArrayRecord, Message, MessageType, MetricRecord, RecordDict

    optimiser = bool(spec.server_optimiser()) and current is not None
    strategy = _strategy(spec if optimiser or not spec.server_optimiser() else FederatedSpec())
    if optimiser:
        strategy.current_arrays = {  # type: ignore[attr-defined]
            name: np.asarray(array)
            for name, array in current.items()  # type: ignore[union-attr]
        }
        _load_state(strategy, server_state)
    with _flower_identity():
        replies = []
        for contribution in contributions:
            metrics = {k: float(v) for k, v in sorted(contribution.metrics.items())}
            metrics[WEIGHT_KEY] = float(contribution.examples)
            content = RecordDict(
                {
                    _ARRAYS_KEY: ArrayRecord(
                        {
                            name: Array(np.ascontiguousarray(a))
                            for name, a in sorted(contribution.tensors.items())
                        }
                    ),
                    _METRICS_KEY: MetricRecord(metrics),  # type: ignore[arg-type]
                }
            )
            replies.append(Message(content, dst_node_id=0, message_type=MessageType.TRAIN))
        arrays, metrics_record = strategy.aggregate_train(round_number, replies)
    if arrays is None:
        raise AggregationError("Flower's strategy returned no aggregate")
    tensors = {}
    for name, (dtype, shape) in layout.items():
        value = arrays[name].numpy()
        if value.shape != shape or not np.isfinite(value).all():
            raise AggregationError(f"aggregated tensor {name!r} is not finite or changed shape")
        tensors[name] = value.astype(dtype, copy=False)
    metrics = {
        str(k): float(v)
        for k, v in (metrics_record or {}).items()
        if isinstance(v, int | float) and np.isfinite(v)
    }
    state = _dump_state(strategy, spec, round_number) if optimiser else None
    if spec.server_optimiser() and current is None:
        logger.info("round %d started from fresh adapters: averaged as FedAvg", round_number)
    return Aggregate(tensors=tensors, metrics=metrics, server_state=state)


def aggregate_bundle(
    aggregate: Aggregate,
    manifest: CheckpointManifest,
    adapter_config: Mapping[str, Any],
) -> bytes:
    """The aggregate as a checkpoint bundle (the format sites read and upload)."""
    import numpy as np
    import safetensors.numpy

    if not manifest.parents or manifest.producer_site != AGGREGATOR:
        raise CheckpointError(
            f"an aggregate's manifest names its contributions as parents and {AGGREGATOR} as "
            "its producer"
        )
    metadata = bundle_metadata(manifest, adapter_config)
    tensors = {name: np.ascontiguousarray(a) for name, a in sorted(aggregate.tensors.items())}
    return bytes(safetensors.numpy.save(tensors, metadata=metadata))
