"""A hop's bundle bytes: what `safetensors.torch.save` writes, whichever way `serialized` takes
to write them (the same header and tensor bytes; safetensors orders the metadata entries as its
hash map iterates them, which may differ from one call to the next)."""

from __future__ import annotations

import json
import struct

import pytest
import safetensors
import safetensors.torch
import torch

from site_agent.tasks import serialized
from site_agent.tasks._state import outgoing

METADATA = {"baton.manifest": '{"hop_id":"h1"}', "baton.adapter_config": "{}"}


def _same_bundle(payload: bytes, expected: bytes) -> bool:
    """Whether two safetensors files hold the same header (as JSON) and the same tensor bytes."""
    (length,) = struct.unpack("<Q", payload[:8])
    (expected_length,) = struct.unpack("<Q", expected[:8])
    return (
        length == expected_length
        and json.loads(payload[8 : 8 + length]) == json.loads(expected[8 : 8 + length])
        and payload[8 + length :] == expected[8 + length :]
    )


def _adapter() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    state = {f"layer.{i}.lora_{ab}.weight": torch.randn(8, 384, generator=generator)
             for i in range(6) for ab in "AB"}  # fmt: skip
    state["classifier.bias"] = torch.randn(3, generator=generator)
    state["empty"] = torch.zeros(0)
    return state


def test_an_outgoing_adapter_serializes_as_safetensors_saves_it() -> None:
    tensors = outgoing(_adapter())
    payload = serialized(tensors, METADATA)
    assert _same_bundle(payload, safetensors.torch.save(tensors, metadata=METADATA))
    loaded = safetensors.torch.load(payload)
    assert loaded.keys() == tensors.keys()
    assert all(torch.equal(loaded[name], tensors[name]) for name in tensors)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64, torch.int64])
def test_other_dtypes_serialize_as_safetensors_saves_them(dtype: torch.dtype) -> None:
    tensors = {"a": torch.arange(24).reshape(4, 6).to(dtype), "b": torch.ones(5, dtype=dtype)}
    assert _same_bundle(
        serialized(tensors, METADATA), safetensors.torch.save(tensors, metadata=METADATA)
    )


def test_views_and_shared_storage_get_safetensors_own_save_and_its_refusal() -> None:
    base = torch.arange(40, dtype=torch.float32).reshape(10, 4)
    transposed = {"t": base.t()}  # not contiguous
    with pytest.raises(ValueError, match="non contiguous"):
        safetensors.torch.save(transposed, metadata=METADATA)
    with pytest.raises(ValueError, match="non contiguous"):
        serialized(transposed, METADATA)
    with pytest.raises(RuntimeError, match="share memory"):
        serialized({"a": base, "b": base[2:]}, METADATA)
    # Contiguous parts of a larger storage, apart: saved, from where each lies.
    for parts in ({"a": base[:5], "b": base[5:]}, {"row": base[3:4]}):
        assert _same_bundle(
            serialized(parts, METADATA), safetensors.torch.save(parts, metadata=METADATA)
        )


def test_without_the_pointer_serializer_it_is_safetensors_own_save(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    tensors = outgoing(_adapter())
    expected = safetensors.torch.save(tensors, metadata=METADATA)
    monkeypatch.delattr(safetensors, "TensorSpec")  # safetensors before 0.7
    assert _same_bundle(serialized(tensors, METADATA), expected)
