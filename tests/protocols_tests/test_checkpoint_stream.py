"""A bundle checked as it streams gets the file check's verdict, without being read back."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy

import protocols.checkpoint_stream as checkpoint_stream
from protocols.checkpoint import (
    CheckpointError,
    CheckpointManifest,
    bundle_metadata,
    inspect_bundle_file,
)
from protocols.checkpoint_stream import BundleStream, inspect_streamed_bundle

MANIFEST = CheckpointManifest(task_type="t", base_model_sha256="ab" * 32, run_id="r", hop_id="h",
                              producer_site="s", parent_sha256="")  # fmt: skip


def _streamed(data: bytes, rng: np.random.Generator) -> BundleStream:
    stream, position = BundleStream(), 0
    while position < len(data):
        step = int(rng.integers(1, 3000))  # chunk edges fall inside header and elements
        stream.feed(data[position : position + step])
        position += step
    return stream


def _verdict(check: object) -> object:
    try:
        return check()  # type: ignore[operator]
    except CheckpointError as exc:
        return str(exc)


@pytest.mark.parametrize("seed", range(40))
def test_streamed_check_agrees_with_the_file_check_whatever_the_chunking(
    tmp_path: Path, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    tensors = {}
    for index in range(int(rng.integers(1, 5))):
        dtype = [np.float32, np.float16, np.float64, np.int32][int(rng.integers(4))]
        values = rng.standard_normal(int(rng.integers(1, 3000))).astype(dtype)
        if dtype != np.int32 and rng.random() < 0.4:
            values[int(rng.integers(len(values)))] = [np.nan, np.inf][int(rng.integers(2))]
        tensors[f"t{index}"] = values
    data = safetensors.numpy.save(tensors, metadata=bundle_metadata(MANIFEST, {}))
    if rng.random() < 0.2:
        assert data[8:9] == b"{"
        data = data[:8] + b"[" + data[9:]  # a header that is not JSON
    path = tmp_path / "bundle"
    path.write_bytes(data)
    stream = _streamed(data, rng)
    assert _verdict(lambda: inspect_streamed_bundle(path, stream)) == _verdict(
        lambda: inspect_bundle_file(path)
    )


def test_values_checked_on_the_way_in_are_not_read_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    values = np.ones(100_000, np.float32)
    values[-1] = np.nan
    data = safetensors.numpy.save({"w": values}, metadata=bundle_metadata(MANIFEST, {}))
    path = tmp_path / "bundle"
    path.write_bytes(data)
    stream = _streamed(data, np.random.default_rng(0))

    def read_back(*_: object) -> None:
        raise AssertionError("the values were read back from the file")

    monkeypatch.setattr(checkpoint_stream, "_check_finite_file", read_back)
    with pytest.raises(CheckpointError, match="tensor 'w' holds NaN or infinite values"):
        inspect_streamed_bundle(path, stream)


def test_a_bundle_not_wholly_streamed_is_refused(tmp_path: Path) -> None:
    data = safetensors.numpy.save({"w": np.ones(8, np.float32)},
                                  metadata=bundle_metadata(MANIFEST, {}))  # fmt: skip
    path = tmp_path / "bundle"
    path.write_bytes(data)
    stream = BundleStream()
    stream.feed(data[:-4])
    with pytest.raises(CheckpointError, match=f"checkpoint is {len(data)} bytes; "):
        inspect_streamed_bundle(path, stream)


def test_values_are_read_from_the_file_when_the_streamed_layout_differs_from_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clean = np.ones(1000, np.float32)
    poisoned = clean.copy()
    poisoned[-1] = np.inf
    streamed = safetensors.numpy.save({"v": clean}, metadata=bundle_metadata(MANIFEST, {}))
    on_disk = safetensors.numpy.save({"w": poisoned}, metadata=bundle_metadata(MANIFEST, {}))
    assert len(streamed) == len(on_disk)  # the same size, another layout (tensor name)
    path = tmp_path / "bundle"
    path.write_bytes(on_disk)
    stream = _streamed(streamed, np.random.default_rng(0))
    assert stream.value_error is None and stream.layout is not None
    read_back: list[str] = []
    check_file = checkpoint_stream._check_finite_file

    def spy(*args: object) -> None:
        read_back.append("file")
        check_file(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(checkpoint_stream, "_check_finite_file", spy)
    with pytest.raises(CheckpointError, match="tensor 'w' holds NaN or infinite values"):
        inspect_streamed_bundle(path, stream)
    assert read_back == ["file"]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_finite_values_whose_sum_overflows_pass_and_any_bad_value_is_refused(
    tmp_path: Path, dtype: type
) -> None:
    huge = np.full(4096, np.finfo(dtype).max, dtype)  # finite, but their sum is infinite
    for bad in (None, np.nan, np.inf, -np.inf):
        values = huge.copy()
        if bad is not None:
            values[1234] = bad
        values[:2] = [np.finfo(dtype).max, -np.finfo(dtype).max]
        data = safetensors.numpy.save({"w": values}, metadata=bundle_metadata(MANIFEST, {}))
        path = tmp_path / "bundle"
        path.write_bytes(data)
        stream = _streamed(data, np.random.default_rng(1))
        if bad is None:
            assert stream.value_error is None
            assert inspect_streamed_bundle(path, stream).tensors[0].name == "w"
        else:
            assert stream.value_error == "tensor 'w' holds NaN or infinite values"


def test_values_whose_sum_is_finite_are_not_tested_one_by_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    values = np.random.default_rng(0).standard_normal(50_000).astype(np.float32)
    data = safetensors.numpy.save({"w": values}, metadata=bundle_metadata(MANIFEST, {}))
    tested: list[str] = []
    monkeypatch.setattr(checkpoint_stream, "_check_finite", lambda name, *_: tested.append(name))
    stream = BundleStream()
    stream.feed(data)
    assert stream.value_error is None and tested == []
    values[7] = np.nan
    stream = BundleStream()
    stream.feed(safetensors.numpy.save({"w": values}, metadata=bundle_metadata(MANIFEST, {})))
    assert tested == ["w"]


@pytest.mark.parametrize("seed", range(20))
def test_many_adjoining_tensors_get_the_file_checks_verdict_whatever_the_chunking(
    tmp_path: Path, seed: int
) -> None:
    """A LoRA-like layout (tens of small tensors, mostly of one dtype, laid end to end) is
    checked run by run; a bad value is still pinned on the first tensor holding one."""
    rng = np.random.default_rng(1000 + seed)
    tensors = {}
    for index in range(int(rng.integers(20, 60))):
        dtype = [np.float32, np.float32, np.float16, np.float64, np.int64][int(rng.integers(5))]
        values = rng.standard_normal(int(rng.integers(0, 400))).astype(dtype)
        if dtype != np.int64 and len(values) and rng.random() < 0.05:
            values[int(rng.integers(len(values)))] = [np.nan, np.inf, -np.inf][int(rng.integers(3))]
        tensors[f"layer{index:02d}"] = values
    data = safetensors.numpy.save(tensors, metadata=bundle_metadata(MANIFEST, {}))
    path = tmp_path / "bundle"
    path.write_bytes(data)
    stream = _streamed(data, rng)
    assert _verdict(lambda: inspect_streamed_bundle(path, stream)) == _verdict(
        lambda: inspect_bundle_file(path)
    )


def test_a_chunk_spanning_many_tensors_of_one_dtype_is_summed_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rng = np.random.default_rng(0)
    tensors = {f"lora_{i:02d}": rng.standard_normal(1000).astype(np.float32) for i in range(50)}
    data = safetensors.numpy.save(tensors, metadata=bundle_metadata(MANIFEST, {}))
    spans: list[int] = []
    check_span = checkpoint_stream._check_span

    def spy(run: object, at: int, raw: memoryview, scratch: list[object]) -> None:
        spans.append(len(raw))
        check_span(run, at, raw, scratch)  # type: ignore[arg-type]

    monkeypatch.setattr(checkpoint_stream, "_check_span", spy)
    stream = BundleStream()
    stream.feed(data)
    assert stream.value_error is None
    assert spans == [50 * 1000 * 4]  # the 50 tensors' values in one sum
    tensors["lora_31"][999] = np.inf
    stream = BundleStream()
    stream.feed(safetensors.numpy.save(tensors, metadata=bundle_metadata(MANIFEST, {})))
    assert stream.value_error == "tensor 'lora_31' holds NaN or infinite values"


def test_finite_float16_values_are_not_tested_one_by_one(monkeypatch: pytest.MonkeyPatch) -> None:
    # The largest float16 values (any sum of them overflows), then a bad one past the first
    # block of exponents looked at.
    values = np.full(150_000, np.finfo(np.float16).max, np.float16)
    values[::2] = -np.finfo(np.float16).max
    tested: list[str] = []
    check_finite = checkpoint_stream._check_finite

    def spy(name: str, dtype: str, raw: bytes) -> None:
        tested.append(name)
        check_finite(name, dtype, raw)

    monkeypatch.setattr(checkpoint_stream, "_check_finite", spy)
    stream = BundleStream()
    stream.feed(safetensors.numpy.save({"h": values}, metadata=bundle_metadata(MANIFEST, {})))
    assert stream.value_error is None and tested == []
    values[140_001] = np.nan
    stream = BundleStream()
    stream.feed(safetensors.numpy.save({"h": values}, metadata=bundle_metadata(MANIFEST, {})))
    assert stream.value_error == "tensor 'h' holds NaN or infinite values" and tested == ["h"]


def _bf16_bundle(tensors: dict[str, np.ndarray]) -> bytes:
    """A bundle of bfloat16 tensors (numpy has no bfloat16: the top halves of float32s)."""
    header: dict[str, object] = {"__metadata__": bundle_metadata(MANIFEST, {})}
    blobs, offset = [], 0
    for name, values in tensors.items():
        blob = (values.astype(np.float32).view(np.uint32) >> 16).astype("<u2").tobytes()
        header[name] = {"dtype": "BF16", "shape": [len(values)],
                        "data_offsets": [offset, offset + len(blob)]}  # fmt: skip
        blobs.append(blob)
        offset += len(blob)
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + b"".join(blobs)


@pytest.mark.parametrize("bad", [None, np.nan, np.inf, -np.inf])
def test_bfloat16_values_are_checked_by_their_exponents(bad: float | None) -> None:
    rng = np.random.default_rng(3)
    tensors = {f"b{i}": rng.standard_normal(40_000).astype(np.float32) * 1e37 for i in range(4)}
    if bad is not None:
        tensors["b2"][39_999] = bad
    stream = _streamed(_bf16_bundle(tensors), rng)
    assert stream.layout is not None
    expected = None if bad is None else "tensor 'b2' holds NaN or infinite values"
    assert stream.value_error == expected
