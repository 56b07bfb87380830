"""A prepared hop keeps its adapter in one buffer: its input comes in, and its output goes out,
in one copy each, bit for bit what the per-tensor path moves, with the same refusals."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch

from protocols.checkpoint import CheckpointError, CheckpointManifest, bundle_metadata, read_bundle
from site_agent.registry import RegisteredDataset
from site_agent.tasks import HopHyperparameters, LoraSettings, TaskSpec, create_trainer
from site_agent.tasks._spec import PreparingTrainer
from site_agent.tasks._state import (
    FlatTensors,
    PackedValues,
    flat_parameters,
    load_flat,
    outgoing,
    serialized,
    tensors_from_values,
)

FIRST = HopHyperparameters(learning_rate=1e-2, steps=3, batch_size=8, seed=11)
SECOND = HopHyperparameters(learning_rate=5e-3, steps=3, batch_size=4, seed=12, proximal_mu=0.5)
MANIFEST = CheckpointManifest(task_type="seq-classification", base_model_sha256="ab" * 32,
                              run_id="r", hop_id="h", producer_site="site-a")  # fmt: skip
METADATA = bundle_metadata(MANIFEST, {"r": 4})


@pytest.fixture
def spec(labels: tuple[str, ...]) -> TaskSpec:
    return TaskSpec("seq-classification", labels=labels, options={"max_length": 24},
                    lora=LoraSettings(r=4, alpha=8, dropout=0.1))  # fmt: skip


def _received(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What the next site builds from a hand back's bundle (`_incoming`)."""
    _, values = read_bundle(serialized(tensors, METADATA))
    received = tensors_from_values(values)
    assert received is not None
    return received


def test_a_prepared_hop_moves_its_adapter_in_one_buffer_bit_for_bit_as_a_fresh_hop(
    tiny_model_dir: Path, spec: TaskSpec, site_datasets: list[RegisteredDataset]
) -> None:
    fresh, prepared = (create_trainer("seq-classification", base_model_dir=tiny_model_dir,
                                      device="cpu") for _ in range(2))  # fmt: skip
    assert isinstance(prepared, PreparingTrainer)
    dataset = site_datasets[0]
    first = fresh.run_hop(spec, dataset, FIRST, None)
    expected = fresh.run_hop(spec, dataset, SECOND, dict(first.tensors))

    incoming = _received(first.tensors)
    assert isinstance(incoming, PackedValues)  # where the bundle's bytes hold them
    prepared.prepare(spec, dataset, SECOND.seed)
    slab = prepared._prepared.flat  # type: ignore[attr-defined]
    assert isinstance(slab, FlatTensors)
    outcome = prepared.run_hop(spec, dataset, SECOND, incoming)
    assert incoming._tensors is None  # loaded from the bundle's bytes: no tensor made of them

    assert outcome.metrics == expected.metrics
    assert isinstance(outcome.tensors, FlatTensors)  # copied out in one copy
    assert outcome.tensors.flat.data_ptr() != slab.flat.data_ptr()
    assert list(outcome.tensors) == sorted(expected.tensors)
    for name, tensor in expected.tensors.items():
        assert torch.equal(tensor, outcome.tensors[name]), name
    # The bundle's tensor bytes are those safetensors' own save writes for the fresh hop's.
    payload = serialized(outcome.tensors, METADATA)
    reference = safetensors.torch.save(dict(expected.tensors), metadata=METADATA)
    size = outcome.tensors.flat.numel() * 4
    assert payload[-size:] == reference[-size:] == outcome.tensors.flat.numpy().tobytes()
    loaded = safetensors.torch.load(payload)
    assert all(torch.equal(loaded[n], t) for n, t in expected.tensors.items())


def test_parameters_moved_into_one_buffer_keep_their_values_and_objects() -> None:
    torch.manual_seed(0)
    layer = torch.nn.Linear(3, 2)
    slots = {"w": layer.weight, "b": layer.bias}
    before = {name: p.detach().clone() for name, p in slots.items()}
    flat = flat_parameters(slots)
    assert flat is not None and list(flat) == ["b", "w"]
    assert layer.weight is slots["w"] and torch.equal(layer.weight, before["w"])
    assert layer.weight.data_ptr() == flat["w"].data_ptr()
    with torch.no_grad():
        flat.flat.zero_()
    assert float(layer.weight.detach().abs().sum()) == 0.0


def test_a_non_finite_adapter_is_refused_with_the_per_tensor_paths_messages() -> None:
    layer = torch.nn.Linear(3, 2)
    slots = {"w": layer.weight, "b": layer.bias}
    flat = flat_parameters(slots)
    assert flat is not None
    with torch.no_grad():
        layer.weight[1, 1] = float("nan")
    with pytest.raises(ValueError) as out:
        outgoing(flat)
    with pytest.raises(ValueError) as per_tensor:
        outgoing({"w": layer.weight, "b": layer.bias})
    assert (
        str(out.value)
        == str(per_tensor.value)
        == ("training diverged: trained tensors have non-finite values in ['w']")
    )
    incoming = FlatTensors(torch.tensor([1.0, float("inf"), 0, 0, 0, 0, 0, 0]),
                           [("b", (2,)), ("w", (2, 3))])  # fmt: skip
    with pytest.raises(ValueError, match=r"incoming tensors have non-finite values in \['b'\]"):
        load_flat(flat, incoming)
    # A bundle holding one is refused before any of this, with its one-line error.
    bad = {"b": torch.zeros(2), "w": torch.tensor([[1.0, 2, 3], [4, float("nan"), 6]])}
    with pytest.raises(CheckpointError, match=r"^tensor 'w' holds NaN or infinite values$"):
        read_bundle(serialized(bad, METADATA))


def test_another_layout_is_not_loaded_in_one_copy() -> None:
    flat = flat_parameters({"w": torch.nn.Parameter(torch.zeros(2, 3))})
    assert flat is not None
    assert not load_flat(flat, {"w": torch.ones(2, 3)})
    assert not load_flat(flat, FlatTensors(torch.ones(6), [("w", (3, 2))]))
    assert float(flat.flat.sum()) == 0.0
    assert load_flat(flat, FlatTensors(torch.ones(6), [("w", (2, 3))]))
    assert float(flat.flat.sum()) == 6.0


def test_flat_tensors_are_read_only_and_copy_out_as_plain_dicts() -> None:
    tensors = FlatTensors(torch.arange(5.0), [("a", (2,)), ("b", (3,))])
    with pytest.raises(TypeError, match="read-only"):
        tensors["a"] = torch.zeros(2)
    copied = pickle.loads(pickle.dumps(tensors))
    assert type(copied) is dict and torch.equal(copied["b"], torch.tensor([2.0, 3, 4]))
    with pytest.raises(ValueError, match="name order"):
        FlatTensors(torch.arange(5.0), [("b", (2,)), ("a", (3,))])


def test_the_hand_back_copy_and_the_incoming_load_run_no_torch_kernel() -> None:
    # torch splits a copy over its grain size (32768 values) across its OpenMP threads and waits
    # for them all: on a busy host, milliseconds per copy on the handoff's path. Both copies of
    # an adapter's buffer are made by numpy instead, on the calling thread: no aten kernel runs.
    from torch.utils._python_dispatch import TorchDispatchMode

    class Kernels(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.seen: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            self.seen.append(str(func))
            return func(*args, **(kwargs or {}))

    size = 80_000  # a MiniLM r=8 adapter's buffer: over the grain size
    weight = torch.nn.Parameter(torch.randn(size - 100))
    bias = torch.nn.Parameter(torch.randn(100))
    flat = flat_parameters({"w": weight, "b": bias})
    assert flat is not None
    incoming = FlatTensors(torch.full((size,), 0.5), flat.shapes)
    version = flat.flat._version
    with Kernels() as kernels:
        copied = outgoing(flat)
        loaded = load_flat(flat, incoming)
    assert not [name for name in kernels.seen if "copy" in name or "clone" in name], kernels.seen
    assert loaded and bool((weight == 0.5).all()) and bool((bias == 0.5).all())
    assert flat.flat._version > version  # autograd sees the in-place load, as with copy_
    assert isinstance(copied, FlatTensors) and copied.shapes == flat.shapes
    assert copied.flat.data_ptr() != flat.flat.data_ptr() and not bool((copied.flat == 0.5).all())


def _bundle(tensors: dict[str, torch.Tensor], order: list[str]) -> bytes:
    """A safetensors bundle of float32 ``tensors`` whose bytes lie in ``order`` (safetensors
    itself writes them in name order)."""
    import json
    import struct

    header: dict[str, object] = {"__metadata__": METADATA}
    at = 0
    for name in order:
        size = tensors[name].numel() * 4
        header[name] = {"dtype": "F32", "shape": list(tensors[name].shape),
                        "data_offsets": [at, at + size]}  # fmt: skip
        at += size
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    body = b"".join(tensors[name].numpy().tobytes() for name in order)
    return struct.pack("<Q", len(text)) + text + body


def test_incoming_values_are_packed_only_where_their_bytes_lie_in_name_order() -> None:
    tensors = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.arange(6.0, 12.0).reshape(3, 2),
               "c": torch.arange(12.0, 18.0).reshape(2, 3)}  # fmt: skip
    for order in (["a", "b", "c"], ["c", "b", "a"], ["a", "c", "b"]):
        _, values = read_bundle(_bundle(tensors, order))
        received = tensors_from_values(values)
        assert received is not None
        assert isinstance(received, PackedValues) == (order == ["a", "b", "c"]), order
        # Either way each name holds its own values (a swap of a and c, of the same shape,
        # would load silently into the wrong slots if packed by size alone).
        assert sorted(received) == ["a", "b", "c"] and len(received) == 3 and "b" in received
        for name, tensor in tensors.items():
            assert torch.equal(received[name], tensor), (order, name)
        slab = flat_parameters({n: torch.nn.Parameter(torch.zeros_like(t))
                                for n, t in tensors.items()})  # fmt: skip
        assert slab is not None and load_flat(slab, received)
        assert all(torch.equal(slab[name], tensor) for name, tensor in tensors.items())


def test_packed_values_read_as_tensors_are_writable_copies_of_the_bundle() -> None:
    tensors = {"a": torch.ones(4), "b": torch.full((2, 2), 2.0)}
    data = _bundle(tensors, ["a", "b"])
    _, values = read_bundle(data)
    received = tensors_from_values(values)
    assert isinstance(received, PackedValues)
    received["a"].add_(1.0)  # its own copy: the bundle's bytes do not change
    assert data == _bundle(tensors, ["a", "b"])
    assert torch.equal(received["a"], torch.full((4,), 2.0))
    copied = pickle.loads(pickle.dumps(received))
    assert type(copied) is dict and torch.equal(copied["b"], tensors["b"])
    # A buffer that could change after its checks (not bytes) is copied out, never packed.
    _, mutable = read_bundle(bytearray(data))  # type: ignore[arg-type]
    assert not isinstance(tensors_from_values(mutable), PackedValues)


def test_packed_values_that_are_not_finite_are_refused_by_name_before_loading() -> None:
    layer = torch.nn.Linear(3, 2)
    slab = flat_parameters({"w": layer.weight, "b": layer.bias})
    assert slab is not None
    before = slab.flat.clone()
    values = np.array([1.0, float("nan"), 0, 0, 0, 0, 0, 0], dtype="<f4")
    with pytest.raises(ValueError, match=r"incoming tensors have non-finite values in \['b'\]"):
        load_flat(slab, PackedValues(values, [("b", (2,)), ("w", (2, 3))]))
    assert torch.equal(slab.flat, before)  # nothing reached the model
    assert not load_flat(slab, PackedValues(values, [("b", (2,)), ("w", (3, 2))]))
