"""A bundle checked as its bytes stream in: sha256 and float values in the same pass, no re-read.

`BundleStream` is fed the bundle's bytes in order (any chunking). It hashes them and, once the
safetensors header has gone by, checks each float tensor's values as they pass. When the last
byte is on disk, `inspect_streamed_bundle` makes the same checks as `inspect_bundle_file`, in the
same order and with the same messages, reading only the file's header: the values were checked
on the way in. Should the header it parsed differ from what safetensors itself validates from the
file (it never should), the values are read from the file after all.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from pathlib import Path

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
        self._floats: list[_FloatTensor] = []
        self._carry = b""  # a float element split across two chunks
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
        self._floats = floats
        self._header_state = "parsed"

    def _check_values(self, view: memoryview, start: int) -> None:
        """Checks the float values in `view` (the bundle's bytes from offset `start`)."""
        end = start + len(view)
        for tensor in self._floats:
            if tensor.end <= start or tensor.start >= end:
                continue
            lo, hi = max(tensor.start, start), min(tensor.end, end)
            part = view[lo - start : hi - start]
            try:
                if self._carry:
                    # The element split by the previous chunk, completed from this one.
                    need = tensor.item - len(self._carry)
                    self._carry += bytes(part[:need])
                    part = part[need:]
                    if len(self._carry) == tensor.item:
                        _check_finite(tensor.name, tensor.dtype, self._carry)
                        self._carry = b""
                whole = len(part) - len(part) % tensor.item
                _check_finite_summed(tensor, part[:whole])
                self._carry += bytes(part[whole:])
            except CheckpointError as exc:
                self.value_error = str(exc)
                return


def _check_finite_summed(tensor: _FloatTensor, raw: memoryview) -> None:
    """`_check_finite` (same refusal), faster for float32 and float64 values: a finite sum
    proves every value finite (a NaN or an infinity makes the sum NaN or infinite) and needs
    no element-wise temporary array; only a sum that is not finite (a bad value, or finite
    values that overflow it) gets the element-wise test."""
    kind = _FLOAT_DTYPES.get(tensor.dtype)
    if kind in ("<f4", "<f8") and len(raw):
        import numpy as np  # imported where values are read, as protocols.checkpoint does

        with np.errstate(over="ignore", invalid="ignore"):
            if np.isfinite(np.frombuffer(raw, dtype=kind).sum()):
                return
    _check_finite(tensor.name, tensor.dtype, raw)  # type: ignore[arg-type]


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
