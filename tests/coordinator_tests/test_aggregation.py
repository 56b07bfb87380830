"""A round's aggregate: Flower's strategies over numpy arrays, server state carried as bytes."""

from __future__ import annotations

import numpy as np
import pytest

from coordinator.aggregation import (
    AggregationError,
    Contribution,
    aggregate_bundle,
    aggregate_round,
    read_tensors,
)
from coordinator.plan import FederatedSpec
from protocols.checkpoint import AGGREGATOR, CheckpointError, CheckpointManifest, inspect_bundle


def _contributions(seed: int, sizes: tuple[float, ...] = (10.0, 30.0, 60.0)) -> list[Contribution]:
    rng = np.random.default_rng(seed)
    return [
        Contribution(
            name=f"site{i}",
            sha256=f"{i:064x}",
            tensors={
                "a.weight": rng.normal(size=(3, 2)).astype(np.float32),
                "b.bias": rng.normal(size=(4,)).astype(np.float32),
            },
            examples=size,
            metrics={"train_loss": float(i + 1)},
        )
        for i, size in enumerate(sizes)
    ]


def test_fedavg_is_the_example_weighted_mean_in_the_inputs_dtype() -> None:
    contributions = _contributions(0)
    result = aggregate_round(FederatedSpec(), 1, contributions, current=None)
    weights = np.array([c.examples for c in contributions])
    for name in ("a.weight", "b.bias"):
        expected = np.average([c.tensors[name] for c in contributions], axis=0, weights=weights)
        np.testing.assert_allclose(result.tensors[name], expected, rtol=1e-6)
        assert result.tensors[name].dtype == np.float32
    assert result.metrics["train_loss"] == pytest.approx(np.average([1, 2, 3], weights=weights))
    assert result.server_state is None


def _flower_fedadam_in_memory(
    rounds: list[list[Contribution]], start: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """The reference: one Flower FedAdam instance kept alive across every round."""
    from flwr.serverapp.strategy import FedAdam

    from coordinator import aggregation

    strategy = FedAdam(min_train_nodes=1, min_available_nodes=1, eta=0.1, beta_1=0.9,
                       beta_2=0.99, tau=1e-3)  # fmt: skip
    current = start
    for number, contributions in enumerate(rounds, start=1):
        strategy.current_arrays = dict(current)
        with aggregation._flower_identity():
            from flwr.app import Array, ArrayRecord, Message, MessageType, MetricRecord, RecordDict

            replies = [
                Message(RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in
                                                           sorted(c.tensors.items())}),
                                    "metrics": MetricRecord({"num-examples": c.examples})}),
                        dst_node_id=0, message_type=MessageType.TRAIN)
                for c in contributions
            ]  # fmt: skip
            arrays, _ = strategy.aggregate_train(number, replies)
        # The round's checkpoint holds the aggregate in the contributions' dtype.
        current = {k: arrays[k].numpy().astype(np.float32) for k in current}
    return current


def test_fedadam_resumed_from_its_state_bytes_matches_one_live_strategy() -> None:
    spec = FederatedSpec(strategy="fedadam")
    start = {k: np.zeros_like(v) for k, v in _contributions(0)[0].tensors.items()}
    rounds = [_contributions(seed) for seed in (1, 2, 3)]
    current, state = start, None
    for number, contributions in enumerate(rounds, start=1):
        # Each round in a fresh call, as after a coordinator restart: only bytes carry over.
        result = aggregate_round(spec, number, contributions, current=current, server_state=state)
        assert result.server_state is not None
        current, state = result.tensors, result.server_state
    reference = _flower_fedadam_in_memory(rounds, start)
    for name, value in reference.items():
        np.testing.assert_array_equal(current[name], value)
    fedavg = aggregate_round(FederatedSpec(), 3, rounds[2], current=None)
    assert not np.allclose(current["a.weight"], fedavg.tensors["a.weight"])


def test_fedyogi_without_its_state_differs_from_fedyogi_with_it() -> None:
    spec = FederatedSpec(strategy="fedyogi")
    start = {k: np.zeros_like(v) for k, v in _contributions(0)[0].tensors.items()}
    first = aggregate_round(spec, 1, _contributions(1), current=start)
    with_state = aggregate_round(spec, 2, _contributions(2), current=first.tensors,
                                 server_state=first.server_state)  # fmt: skip
    without = aggregate_round(spec, 2, _contributions(2), current=first.tensors)
    assert not np.array_equal(with_state.tensors["a.weight"], without.tensors["a.weight"])


def test_fedadam_from_fresh_adapters_averages_as_fedavg_in_round_one() -> None:
    contributions = _contributions(4)
    adam = aggregate_round(FederatedSpec(strategy="fedadam"), 1, contributions, current=None)
    avg = aggregate_round(FederatedSpec(), 1, contributions, current=None)
    np.testing.assert_array_equal(adam.tensors["a.weight"], avg.tensors["a.weight"])
    assert adam.server_state is None


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        (lambda c: {"a.weight": c.tensors["a.weight"]}, "differ in tensors"),
        (
            lambda c: {**c.tensors, "b.bias": c.tensors["b.bias"].astype(np.float64)},
            "differ in tensors",
        ),
        (lambda c: {**c.tensors, "b.bias": np.zeros(5, np.float32)}, "differ in tensors"),
    ],
)
def test_contributions_that_do_not_fit_together_are_refused(change, fragment: str) -> None:  # type: ignore[no-untyped-def]
    contributions = _contributions(5)
    odd = contributions[1]
    contributions[1] = Contribution(odd.name, odd.sha256, change(odd), odd.examples)
    with pytest.raises(AggregationError, match=fragment):
        aggregate_round(FederatedSpec(), 1, contributions, current=None)


def test_a_contribution_without_examples_or_a_round_without_any_is_refused() -> None:
    contributions = _contributions(6, sizes=(10.0, 0.0))
    with pytest.raises(AggregationError, match=r"site1 trained on 0\.0 examples"):
        aggregate_round(FederatedSpec(), 1, contributions, current=None)
    with pytest.raises(AggregationError, match="at least one contribution"):
        aggregate_round(FederatedSpec(), 1, [], current=None)


def test_the_aggregate_bundle_names_its_contributions_and_reads_back() -> None:
    contributions = _contributions(7)
    result = aggregate_round(FederatedSpec(), 2, contributions, current=None)
    parents = tuple(sorted(c.sha256 for c in contributions))
    manifest = CheckpointManifest(task_type="tabular", base_model_sha256="", run_id="r",
                                  hop_id="round-2", producer_site=AGGREGATOR,
                                  parent_sha256="f" * 64, parents=parents)  # fmt: skip
    data = aggregate_bundle(result, manifest, {"kind": "tabular"})
    bundle = inspect_bundle(data)
    assert bundle.manifest.parents == parents and bundle.adapter_config == {"kind": "tabular"}
    assert bundle.manifest == manifest
    np.testing.assert_array_equal(read_tensors(data)["a.weight"], result.tensors["a.weight"])
    with pytest.raises(CheckpointError, match="parents"):
        aggregate_bundle(result, CheckpointManifest(**{**manifest.__dict__, "parents": ()}), {})


def test_a_hops_manifest_json_is_unchanged_by_the_parents_field() -> None:
    manifest = CheckpointManifest(task_type="tabular", base_model_sha256="", run_id="r",
                                  hop_id="h", producer_site="x")  # fmt: skip
    assert "parents" not in manifest.to_json()
    assert CheckpointManifest.from_json(manifest.to_json()) == manifest
