"""A plainly laid out bundle is checked where it lies (its values views of its bytes), with the
verdicts of safetensors' own parser: whatever the in-place reading takes, that parser takes the
same way; whatever it does not take gets that parser's verdict and message."""

from __future__ import annotations

import json
import struct
from typing import Any

import numpy as np
import pytest
import safetensors
import safetensors.numpy
from hypothesis import given, settings
from hypothesis import strategies as st

from protocols.checkpoint import (
    CheckpointError,
    _plain_layout,
    _read_parsed,
    bundle_metadata,
    read_bundle,
    sha256_hex,
)
from tests.protocols_tests.test_checkpoint import MANIFEST

METADATA = bundle_metadata(MANIFEST, {"r": 8})


def _adapter() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    tensors = {f"layer.{i}.lora_{ab}.weight": rng.standard_normal((8, 24), np.float32)
               for i in range(4) for ab in "AB"}  # fmt: skip
    tensors["classifier.bias"] = rng.standard_normal(3).astype(np.float32)
    tensors["empty"] = np.zeros((0, 4), np.float32)
    return tensors


def _verdict(data: bytes, reader: Any) -> str:
    try:
        bundle, values = reader(data)
    except CheckpointError as exc:
        return f"refused: {exc}"
    held = sorted((n, v.dtype, v.shape, bytes(v.data)) for n, v in values.items())
    return f"accepted: {bundle} {held}"


def _by_parser(data: bytes) -> Any:
    return _read_parsed(data, sha256_hex(data))


def test_a_plain_bundles_values_are_views_of_its_bytes_equal_to_the_parsers_copies() -> None:
    data = safetensors.numpy.save(_adapter(), metadata=METADATA)
    bundle, values = read_bundle(data, expected_sha256=sha256_hex(data))
    assert all(isinstance(v.data, memoryview) and v.data.obj is data for v in values.values())
    parsed_bundle, parsed = _by_parser(data)
    assert bundle == parsed_bundle
    assert {n: (v.dtype, v.shape, bytes(v.data)) for n, v in values.items()} == {
        n: (v.dtype, v.shape, bytes(v.data)) for n, v in parsed.items()
    }


@pytest.mark.parametrize("where", ["first", "middle", "last"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_a_non_finite_value_is_refused_with_the_parsers_one_line_error(
    where: str, bad: float
) -> None:
    tensors = _adapter()
    name = {"first": "classifier.bias", "middle": "layer.2.lora_A.weight",
            "last": "layer.3.lora_B.weight"}[where]  # fmt: skip
    tensors[name].flat[-1] = bad
    data = safetensors.numpy.save(tensors, metadata=METADATA)
    assert _plain_layout(data) is not None
    message = f"tensor {name!r} holds NaN or infinite values"
    with pytest.raises(CheckpointError) as refused:
        read_bundle(data)
    assert str(refused.value) == message == _verdict(data, _by_parser).removeprefix("refused: ")


def _header(tensors: dict[str, Any], metadata: Any = None, pad: int = 0) -> bytes:
    document = dict(tensors)
    if metadata is not None:
        document["__metadata__"] = metadata
    return json.dumps(document).encode() + b" " * pad


def _file(header: bytes, data: bytes) -> bytes:
    return struct.pack("<Q", len(header)) + header + data


_ODD = {
    "duplicate key": _file(b'{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},'
                           b'"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}', b"\0" * 4),
    "extra field": _file(_header({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4],
                                        "x": 1}}), b"\0" * 4),
    "unknown dtype": _file(_header({"w": {"dtype": "F8_E4M3", "shape": [4],
                                          "data_offsets": [0, 4]}}), b"\0" * 4),
    "bool dim": _file(_header({"w": {"dtype": "F32", "shape": [True],
                                     "data_offsets": [0, 4]}}), b"\0" * 4),
    "float offset": _file(_header({"w": {"dtype": "F32", "shape": [1],
                                         "data_offsets": [0, 4.0]}}), b"\0" * 4),
    "gap": _file(_header({"w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}),
                 b"\0" * 8),
    "short": _file(_header({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}),
                   b"\0" * 4),
    "overflowing shape": _file(_header({"w": {"dtype": "F32", "shape": [2**40, 2**40, 0],
                                              "data_offsets": [0, 0]}}), b""),
    "lone surrogate": _file(b'{"\\ud800":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}',
                            b"\0" * 4),
    "metadata not strings": _file(_header({"w": {"dtype": "F32", "shape": [1],
                                                 "data_offsets": [0, 4]}}, {"a": 1}), b"\0" * 4),
    "leading space": _file(b" " + _header({"w": {"dtype": "F32", "shape": [1],
                                                 "data_offsets": [0, 4]}}), b"\0" * 4),
    "utf-16": _file(_header({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}})
                    .decode().encode("utf-16"), b"\0" * 4),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(_ODD))
def test_what_the_in_place_reading_does_not_take_gets_the_parsers_verdict(case: str) -> None:
    data = _ODD[case]
    assert _plain_layout(data) is None
    assert _verdict(data, read_bundle) == _verdict(data, _by_parser)


def _agrees_with_safetensors(data: bytes) -> None:
    layout = _plain_layout(data)
    if layout is not None:
        parsed = safetensors.deserialize(data)  # takes it: raises otherwise
        header_len, _, entries = layout
        body = data[8 + header_len :]
        assert sorted((n, d, s, body[a:b]) for n, d, s, a, b in entries) == sorted(
            (n, i["dtype"], tuple(i["shape"]), i["data"]) for n, i in parsed
        )
    assert _verdict(data, read_bundle) == _verdict(data, _by_parser)


_DTYPES = st.sampled_from(["F32", "F16", "BF16", "F64", "I64", "U8", "BOOL", "I32"])
_SIZES = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I64": 8, "U8": 1, "BOOL": 1, "I32": 4}


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.tuples(_DTYPES, st.lists(st.integers(0, 3), max_size=3)), min_size=0, max_size=4),
    st.integers(0, 9),
    st.integers(-2, 2),
    st.booleans(),
)
def test_generated_headers_get_the_same_verdict_as_safetensors_gives(
    specs: list[tuple[str, list[int]]], pad: int, skew: int, with_metadata: bool
) -> None:
    tensors: dict[str, Any] = {}
    at = 0
    for index, (dtype, shape) in enumerate(specs):
        size = int(np.prod(shape, dtype=np.int64)) * _SIZES[dtype]
        tensors[f"t{index}"] = {"dtype": dtype, "shape": shape, "data_offsets": [at, at + size]}
        at += size
    metadata = METADATA if with_metadata else None
    data = _file(_header(tensors, metadata, pad), b"\x01" * max(at + skew, 0))
    _agrees_with_safetensors(data)


@settings(max_examples=300, deadline=None)
@given(st.integers(min_value=0, max_value=10_000), st.binary(min_size=1, max_size=8))
def test_corrupted_bundles_get_the_same_verdict_as_safetensors_gives(
    position: int, noise: bytes
) -> None:
    data = bytearray(safetensors.numpy.save(_adapter(), metadata=METADATA))
    position %= min(len(data), 8 + struct.unpack("<Q", data[:8])[0] + 64)  # mostly the header
    data[position : position + len(noise)] = noise
    _agrees_with_safetensors(bytes(data))
