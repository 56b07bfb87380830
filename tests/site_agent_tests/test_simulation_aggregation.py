"""The simulator's aggregation: the plan's Flower strategy, with the engine's first-round rule
(a round that started from fresh tensors is averaged as FedAvg), without Ray."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord

from site_agent.ray_simulation import _Aggregator
from site_agent.simulation import _server_app_identity

ADAM = {"strategy": "fedadam", "eta": 0.1, "beta_1": 0.9, "beta_2": 0.99, "tau": 1e-3}


def _record(value: list[float]) -> ArrayRecord:
    return ArrayRecord({"w": Array(np.array(value, dtype=np.float32))})


def _aggregate(
    aggregator: _Aggregator,
    number: int,
    values: list[list[float]],
    weights: list[float],
    current: list[float] | None,
) -> np.ndarray:
    with _server_app_identity():
        arrays, _ = aggregator.aggregate(
            number,
            [_record(v) for v in values],
            weights,
            [{} for _ in values],
            current=None if current is None else _record(current),
        )
    return arrays["w"].numpy()  # fmt: skip


def test_fedavg_weights_each_chain_by_the_examples_it_trained_on() -> None:
    result = _aggregate(_Aggregator({"strategy": "fedavg"}), 1, [[0, 0], [4, 8]], [3, 1], None)
    np.testing.assert_allclose(result, [1.0, 2.0])


def test_fedadam_averages_a_fresh_first_round_then_steps_from_the_global_model() -> None:
    aggregator = _Aggregator(ADAM)
    first = _aggregate(aggregator, 1, [[1, 1], [3, 3]], [1, 1], None)
    np.testing.assert_allclose(first, [2.0, 2.0])
    second = _aggregate(aggregator, 2, [[3, 1], [3, 1]], [1, 1], list(first))
    # The mean update is (+1, -1): Adam moves each weight its way, by about eta, not all of it.
    assert second[0] > first[0] and second[1] < first[1]
    np.testing.assert_allclose(np.abs(second - first), [0.1, 0.1], rtol=0.5)
    assert not np.allclose(second, [3.0, 1.0])


def test_an_unknown_strategy_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown aggregation strategy 'fedsgd'"):
        _Aggregator({"strategy": "fedsgd"})


def test_chains_whose_sites_report_different_metrics_still_aggregate() -> None:
    # A site without validation rows reports train metrics only; Flower refuses replies whose
    # metric keys differ, so only the shared ones are handed to it.
    with _server_app_identity():
        arrays, metrics = _Aggregator({"strategy": "fedavg"}).aggregate(
            1,
            [_record([0.0]), _record([2.0])],
            [1.0, 1.0],
            [{"train_loss": 1.0, "accuracy": 0.5}, {"train_loss": 3.0}],
            current=None,
        )
    np.testing.assert_allclose(arrays["w"].numpy(), [1.0])
    assert metrics == {"train_loss": 2.0}
