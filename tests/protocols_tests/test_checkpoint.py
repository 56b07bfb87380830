"""The checkpoint bundle codec refuses anything malformed, inconsistent or non-finite."""

from __future__ import annotations

import contextlib
import json
import struct
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

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
    inspect_bundle_file,
    sha256_file,
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


# ---- the file path (the coordinator's upload check) agrees with the bytes path ------------------


def _verdict(check: Callable[[], object]) -> str:
    try:
        bundle = check()
    except CheckpointError as exc:
        return f"refused: {exc}"
    return f"accepted: {bundle}"


def _both(tmp_path: Path, data: bytes, **kwargs: Any) -> tuple[str, str]:
    path = tmp_path / "bundle.safetensors"
    path.write_bytes(data)
    return (
        _verdict(lambda: inspect_bundle(data, **kwargs)),
        _verdict(lambda: inspect_bundle_file(path, **kwargs)),
    )


def _bf16_nan() -> bytes:
    raw = np.array([0x3F80, 0x7FC0], dtype="<u2").tobytes()
    header = json.dumps({"w": {"dtype": "BF16", "shape": [2], "data_offsets": [0, 4]},
                         "__metadata__": bundle_metadata(MANIFEST, {})}).encode()  # fmt: skip
    return struct.pack("<Q", len(header)) + header + raw


_NOT_SAFETENSORS = "refused: checkpoint is not a valid safetensors file: "

_BAD_BUNDLES: dict[str, Callable[[], tuple[bytes, dict[str, Any]]]] = {
    "nan": lambda: (_bundle({"w": np.array([1.0, np.nan], np.float32)}), {}),
    "inf-float64": lambda: (_bundle({"w": np.array([np.inf], np.float64)}), {}),
    "bf16-nan": lambda: (_bf16_nan(), {}),
    "oversized": lambda: (_bundle({"w": np.ones(64, np.float32)}), {"max_bytes": 100}),
    "hash": lambda: (_bundle({"w": np.ones(4, np.float32)}), {"expected_sha256": "00" * 32}),
    "truncated": lambda: (_bundle({"w": np.ones(4, np.float32)})[:-3], {}),
    "garbage": lambda: (b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}", {}),
    "no-manifest": lambda: (safetensors.numpy.save({"w": np.ones(2, np.float32)}), {}),
    "no-tensors": lambda: (safetensors.numpy.save({}, metadata=bundle_metadata(MANIFEST, {})), {}),
}


@pytest.mark.parametrize("case", sorted(_BAD_BUNDLES))
def test_file_check_refuses_what_the_bytes_check_refuses_with_the_same_message(
    tmp_path: Path, case: str
) -> None:
    data, kwargs = _BAD_BUNDLES[case]()
    from_bytes, from_file = _both(tmp_path, data, **kwargs)
    assert from_bytes.startswith("refused: "), from_bytes
    if from_bytes.startswith(_NOT_SAFETENSORS):
        # The parser's own wording differs slightly between its bytes and file entry points.
        assert from_file.startswith(_NOT_SAFETENSORS)
    else:
        assert from_file == from_bytes


def test_file_check_reads_a_large_tensor_in_bounded_blocks_and_finds_a_late_nan(
    tmp_path: Path,
) -> None:
    # 12 MiB of float32: three read blocks; the NaN sits in the last one.
    values = np.ones(3 * 1024 * 1024, np.float32)
    values[-5] = np.nan
    data = _bundle({"a": np.zeros(3, np.float16), "big": values})
    from_bytes, from_file = _both(tmp_path, data, expected_sha256=sha256_hex(data))
    assert from_file == from_bytes == "refused: tensor 'big' holds NaN or infinite values"
    values[-5] = 0.5
    good = _bundle({"a": np.zeros(3, np.float16), "big": values})
    (tmp_path / "good").write_bytes(good)
    assert inspect_bundle_file(tmp_path / "good", sha256=sha256_hex(good)) == inspect_bundle(good)
    assert sha256_file(tmp_path / "good") == sha256_hex(good)


@settings(max_examples=150, deadline=None)
@given(st.integers(min_value=0, max_value=200), st.binary(min_size=1, max_size=8))
def test_corrupted_bundle_gets_the_same_verdict_from_file_and_bytes(
    position: int, noise: bytes
) -> None:
    data = bytearray(_bundle({"w": np.ones(8, np.float32), "v": np.ones(3, np.float64)}))
    position %= len(data)
    data[position : position + len(noise)] = noise
    with tempfile.TemporaryDirectory() as tmp:
        from_bytes, from_file = _both(Path(tmp), bytes(data))
    if from_bytes.startswith("accepted"):
        assert from_file == from_bytes
    else:
        assert from_file.startswith("refused: ")


def test_warm_up_imports_what_a_first_check_would_and_changes_nothing_else() -> None:
    # A fresh interpreter: numpy is not imported with the module, and is after warm_up; the
    # bundle it checks is one that read_bundle takes by the plain path (no error raised).
    code = (
        "import sys, protocols.checkpoint as c\n"
        "before = 'numpy' in sys.modules\n"
        "c.warm_up()\n"
        "print(before, 'numpy' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True, cwd=Path(__file__).parents[2])  # fmt: skip
    assert out.stdout.split() == ["False", "True"]
