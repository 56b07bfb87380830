"""The checkpoint bundle codec refuses anything malformed, inconsistent or non-finite."""

from __future__ import annotations

import contextlib
import json
import struct

import numpy as np
import pytest
import safetensors.numpy
from hypothesis import given, settings
from hypothesis import strategies as st

from protocols.checkpoint import (
    CheckpointError,
    CheckpointManifest,
    bundle_metadata,
    inspect_bundle,
    sha256_hex,
)

MANIFEST = CheckpointManifest(
    task_type="seq-classification", base_model_sha256="ab" * 32, run_id="r", hop_id="h",
    producer_site="site-a",
)  # fmt: skip


def _bundle(tensors: dict[str, np.ndarray], manifest: CheckpointManifest = MANIFEST) -> bytes:
    return safetensors.numpy.save(tensors, metadata=bundle_metadata(manifest, {"r": 8}))


def test_valid_bundle_reports_manifest_config_and_tensor_specs() -> None:
    data = _bundle({"b": np.zeros((2, 3), np.float32), "a": np.ones(4, np.float16)})
    bundle = inspect_bundle(data, expected_sha256=sha256_hex(data))
    assert bundle.manifest == MANIFEST
    assert bundle.adapter_config == {"r": 8}
    assert [(t.name, t.dtype, t.shape) for t in bundle.tensors] == [
        ("a", "F16", (4,)),
        ("b", "F32", (2, 3)),
    ]
    assert bundle.parameter_count == 10


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values_are_refused(bad: float) -> None:
    values = np.ones(5, np.float32)
    values[3] = bad
    with pytest.raises(CheckpointError, match="NaN or infinite"):
        inspect_bundle(_bundle({"w": values}))


def test_non_finite_bfloat16_is_refused() -> None:
    # 0x7FC0 is a bfloat16 NaN; numpy has no bfloat16, so write the raw header by hand.
    raw = np.array([0x3F80, 0x7FC0], dtype="<u2").tobytes()
    meta = bundle_metadata(MANIFEST, {})
    header = json.dumps({"w": {"dtype": "BF16", "shape": [2], "data_offsets": [0, 4]},
                         "__metadata__": meta}).encode()  # fmt: skip
    data = struct.pack("<Q", len(header)) + header + raw
    with pytest.raises(CheckpointError, match="NaN"):
        inspect_bundle(data)


def test_hash_mismatch_is_refused() -> None:
    data = _bundle({"w": np.ones(3, np.float32)})
    with pytest.raises(CheckpointError, match="hash mismatch"):
        inspect_bundle(data, expected_sha256="0" * 64)


def test_bundle_without_manifest_is_refused() -> None:
    data = safetensors.numpy.save({"w": np.ones(3, np.float32)})
    with pytest.raises(CheckpointError, match="manifest"):
        inspect_bundle(data)


def test_unknown_format_version_is_refused() -> None:
    manifest = CheckpointManifest(**{**MANIFEST.__dict__, "format_version": 99})
    with pytest.raises(CheckpointError, match="format 99"):
        inspect_bundle(_bundle({"w": np.ones(3, np.float32)}, manifest))


def test_oversized_bundle_is_refused_before_parsing() -> None:
    with pytest.raises(CheckpointError, match="cap"):
        inspect_bundle(b"\x00" * 100, max_bytes=10)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512))
def test_arbitrary_bytes_never_crash_the_codec(data: bytes) -> None:
    with contextlib.suppress(CheckpointError):
        inspect_bundle(data)


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=0, max_value=200), st.binary(min_size=1, max_size=8))
def test_corrupting_a_valid_bundle_is_detected_or_harmless(position: int, noise: bytes) -> None:
    data = bytearray(_bundle({"w": np.ones(8, np.float32)}))
    position %= len(data)
    data[position : position + len(noise)] = noise
    try:
        bundle = inspect_bundle(bytes(data))
    except CheckpointError:
        return
    # Whatever still parses is exactly what the codec reports, and finite.
    loaded = safetensors.numpy.load(bytes(data))
    assert sorted(loaded) == [t.name for t in bundle.tensors]
    for array in loaded.values():
        if array.dtype.kind == "f":
            assert np.isfinite(array).all()
