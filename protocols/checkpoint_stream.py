"""A bundle checked as its bytes stream in: sha256 and float values in the same pass, no re-read.

`BundleStream` is fed the bundle's bytes in order (any chunking). It hashes them and, once the
safetensors header has gone by, checks each float tensor's values as they pass. When the last
byte is on disk, `inspect_streamed_bundle` makes the same checks as `inspect_bundle_file`, in the
same order and with the same messages, reading only the file's header: the values were checked
on the way in. Should the header it parsed differ from what safetensors itself validates from the
file (it never should), the values are read from the file after all.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from protocols.checkpoint import (
    _FLOAT_DTYPES,
    DEFAULT_MAX_BUNDLE_BYTES,
    Bundle,
    CheckpointError,
    _check_finite,
    _check_finite_file,
    _inspect_file,
    _Layout,
)

__all__ = ["BundleStream", "inspect_streamed_bundle"]

# No bundle header (tensor names, shapes and the manifest) comes near this; a larger claim is
# refused before it is buffered.
_MAX_HEADER_BYTES = 16 * 1024 * 1024
_ITEM_BYTES = {"<f8": 8, "<f4": 4, "<f2": 2, "bf16": 2}


@dataclass
class _FloatTensor:
    name: str
    dtype: str
    start: int  # absolute file offsets
    end: int
    item: int  # bytes per element


@dataclass
class _Run:
    """Float tensors of one dtype laid end to end in the file (safetensors groups tensors by
    dtype): the part of a chunk inside a run is checked with one sum, whatever the number of
    tensors it spans; a tensor is looked at alone only when that sum is not finite."""

    dtype: str
    item: int
    start: int
    end: int
    tensors: list[_FloatTensor]
    starts: list[int]  # the tensors' starts, to find a tensor by offset


def _runs(floats: list[_FloatTensor]) -> list[_Run]:
    """`floats` (in file order) grouped into runs of adjoining tensors of one dtype. A tensor
    that is not a whole number of elements (a bundle the format check refuses) stands alone."""
    runs: list[_Run] = []
    joinable = False  # whether the last run may take the next tensor
    for tensor in floats:
        if tensor.end == tensor.start:
            continue  # no values
        run = runs[-1] if runs else None
        if joinable and run is not None and (run.dtype, run.end) == (tensor.dtype, tensor.start):
            run.tensors.append(tensor)
            run.starts.append(tensor.start)
            run.end = tensor.end
        else:
            runs.append(_Run(tensor.dtype, tensor.item, tensor.start, tensor.end, [tensor],
                             [tensor.start]))  # fmt: skip
        joinable = (tensor.end - tensor.start) % tensor.item == 0
    return runs


class BundleStream:
    """Hashes a bundle's bytes and checks its float values as they arrive, in order.

    Not thread-safe: feed it from one thread at a time (an upload feeds it from a worker thread,
    one chunk after the other).
    """

    def __init__(self) -> None:
        self.hasher = hashlib.sha256()
        self.position = 0  # bytes fed so far
        self._head = bytearray()  # the 8-byte length and the header, until parsed
        self._header_len = 0
        self._header_state = "reading"  # then "parsed", or "failed" (the file check says why)
        self.layout: list[tuple[str, str, list[int], int, int]] | None = None
        self._runs: list[_Run] = []
        self._run_ends: list[int] = []
        self._carry = b""  # a float element split across two chunks
        self._carry_at = 0  # the file offset of its first byte
        self._carry_run: _Run | None = None  # the run it lies in
        self._scratch: list[Any] = []  # the half-precision check's array, once needed
        self.value_error: str | None = None  # the first non-finite tensor's refusal

    def feed(self, chunk: bytes | memoryview) -> None:
        """Takes the next bytes of the bundle."""
        view = memoryview(chunk)
        self.hasher.update(view)
        self.position += len(view)
        if self._header_state == "reading":
            view = self._take_header(view)
        if self.layout is not None and self.value_error is None and len(view):
            self._check_values(view, self.position - len(view))

    def _take_header(self, view: memoryview) -> memoryview:
        """Buffers the header's bytes; returns what of `view` lies past it."""
        if len(self._head) < 8:
            need = 8 - len(self._head)
            self._head += view[:need]
            view = view[need:]
            if len(self._head) < 8:
                return view
            (self._header_len,) = struct.unpack("<Q", self._head)
            if self._header_len > _MAX_HEADER_BYTES:
                self._header_state = "failed"
                return view[:0]
        need = 8 + self._header_len - len(self._head)
        self._head += view[:need]
        view = view[need:]
        if len(self._head) == 8 + self._header_len:
            self._parse_header()
            self._head = bytearray()
        return view

    def _parse_header(self) -> None:
        self._header_state = "failed"  # until it parses
        try:
            header = json.loads(bytes(self._head[8:]))
            header.pop("__metadata__", None)
            tensors = sorted(
                (
                    (name, info["dtype"], list(info["shape"]), *info["data_offsets"])
                    for name, info in header.items()
                ),
                key=lambda t: t[3],
            )
        except (ValueError, KeyError, TypeError, AttributeError):
            return
        data_start = 8 + self._header_len
        floats = []
        for name, dtype, _shape, begin, end in tensors:
            kind = _FLOAT_DTYPES.get(dtype) if isinstance(dtype, str) else None
            if kind is None:
                continue
            if not isinstance(begin, int) or not isinstance(end, int) or end < begin:
                return
            floats.append(_FloatTensor(name, dtype, data_start + begin, data_start + end,
                                       _ITEM_BYTES[kind]))  # fmt: skip
        self.layout = tensors
        self._runs = _runs(floats)
        self._run_ends = [run.end for run in self._runs]
        self._header_state = "parsed"

    def _check_values(self, view: memoryview, start: int) -> None:
        """Checks the float values in `view` (the bundle's bytes from offset `start`)."""
        end = start + len(view)
        index = bisect.bisect_right(self._run_ends, start)  # the first run ending after start
        try:
            while index < len(self._runs) and self._runs[index].start < end:
                run = self._runs[index]
                index += 1
                at = max(run.start, start)
                part = view[at - start : min(run.end, end) - start]
                if self._carry and self._carry_run is run:
                    # The element split by the previous chunk, completed from this one.
                    need = run.item - len(self._carry)
                    self._carry += bytes(part[:need])
                    part, at = part[need:], at + need
                    if len(self._carry) < run.item:
                        continue
                    _check_span(run, self._carry_at, memoryview(self._carry), self._scratch)
                self._carry = b""
                whole = len(part) - len(part) % run.item
                _check_span(run, at, part[:whole], self._scratch)
                if whole < len(part):
                    self._carry, self._carry_at = bytes(part[whole:]), at + whole
                    self._carry_run = run
        except CheckpointError as exc:
            self.value_error = str(exc)


# float32 and float64 values are checked by their sum; half-precision ones (float16, bfloat16:
# no numpy sum of them is both fast and safe from overflow) by their exponent bits, all set only
# in an infinity or a NaN, looked at through a reused scratch array, this many values at a time.
_SUMMED = ("<f4", "<f8")
_EXPONENT_BITS = {"<f2": 0x7C00, "bf16": 0x7F80}
_HALF_BLOCK = 64 * 1024


def _check_span(run: _Run, at: int, raw: memoryview, scratch: list[Any]) -> None:
    """Checks whole elements of `run` (file offset `at` on) with no copy and no temporary array
    of their size: one sum of them all proves float32/float64 values finite (a NaN or an
    infinity makes it NaN or infinite); half-precision values are proven finite by their
    exponents (in `scratch`'s array, made on first use). Only values not proven so (a bad value,
    or finite values whose sum overflows) get each tensor's element-wise test, which names the
    first tensor holding a bad value."""
    if not len(raw):
        return
    import numpy as np  # imported where values are read, as protocols.checkpoint does

    kind = _FLOAT_DTYPES.get(run.dtype) or ""
    if kind in _SUMMED:
        with np.errstate(over="ignore", invalid="ignore"):
            if np.isfinite(np.frombuffer(raw, dtype=kind).sum()):
                return
    elif kind in _EXPONENT_BITS:
        if not scratch:
            scratch.append(np.empty(_HALF_BLOCK, np.uint16))
        block, bits = scratch[0], _EXPONENT_BITS[kind]
        halves = np.frombuffer(raw, dtype="<u2")
        for first in range(0, len(halves), _HALF_BLOCK):
            part = halves[first : first + _HALF_BLOCK]
            if np.bitwise_and(part, bits, out=block[: len(part)]).max() == bits:
                break
        else:
            return
    end = at + len(raw)
    for position in range(max(bisect.bisect_right(run.starts, at) - 1, 0), len(run.tensors)):
        tensor = run.tensors[position]
        if tensor.start >= end:
            break
        lo, hi = max(tensor.start, at), min(tensor.end, end)
        _check_finite(tensor.name, tensor.dtype, raw[lo - at : hi - at])  # type: ignore[arg-type]


def inspect_streamed_bundle(
    path: Path,
    stream: BundleStream,
    *,
    expected_sha256: str | None = None,
    max_bytes: int = DEFAULT_MAX_BUNDLE_BYTES,
) -> Bundle:
    """`inspect_bundle_file` for a bundle whose every byte went through `stream`.

    The same checks in the same order (size, hash, format, manifest, values) with the same
    messages; only the file's header is read.

    Raises:
        CheckpointError: On any size, hash, format, manifest or value problem.
    """

    def digest(size: int) -> str:
        if stream.position != size:
            raise CheckpointError(f"checkpoint is {size} bytes; {stream.position} were checked")
        return stream.hasher.hexdigest()

    def check_values(header_len: int, tensors: _Layout) -> None:
        if stream.layout == tensors:
            if stream.value_error is not None:
                raise CheckpointError(stream.value_error)
        else:  # never expected: the values are read from the file instead
            _check_finite_file(path, 8 + header_len, tensors)

    return _inspect_file(
        path,
        digest=digest,
        check_values=check_values,
        expected_sha256=expected_sha256,
        max_bytes=max_bytes,
    )
