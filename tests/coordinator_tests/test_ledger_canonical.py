"""The ledger's canonical JSON, built once: the same bytes (so the same hashes) as the
`json.dumps` definition every stored event was hashed with, and the same refusals."""

from __future__ import annotations

import hashlib
import json
import json.encoder
import math
from typing import Any

import pytest

from coordinator.ledger import GENESIS_HASH, event_hash
from coordinator.ledger._canonical import snapshot_json
from tests.coordinator_tests.test_ledger_verify import PAYLOADS

# What a payload can hold, and what the text fields can be: escapes, control characters, lone
# surrogates, every plane, numbers at their limits, deep and wide nesting, empty containers.
CORPUS: list[Any] = [
    *PAYLOADS,
    {"ints": [2**63 - 1, -(2**63), 2**64, 10**100, -(10**300), True, False]},
    {"floats": [5e-324, 1.7976931348623157e308, 1e16, 1e15, 0.1 + 0.2, -0.0, 123456789.0]},
    {"text": "".join(map(chr, range(0x00, 0x80))) + "\ud800 \udfff \u0600 \ufeff \U0010ffff"},
    {"keys": {"": 1, "\x7f": 2, "é": 3, "e": 4, "E": 5, "10": 6, "9": 7, "a b": 8}},
    {"deep": json.loads("[" * 200 + "]" * 200), "wide": {f"k{i}": i for i in range(500)}},
    {"mixed": [None, "", 0, 0.0, [], {}, [[]], [{}], {"a": [None]}]},
    {"metrics": {"loss": 0.6931471805599453, "accuracy": 1.0}, "index": 0, "state_rows": []},
]
FIELDS: list[tuple[str, str, str, str | None, str | None, str | None]] = [
    (GENESIS_HASH, "2026-01-01T00:00:00.000000+00:00", "hop.committed", "r" * 32, "h1", "s"),
    ("f" * 64, "", "", None, None, None),
    ("a" * 64, 'at "quoted" \\', "kind\n\t\x00", "run-é", "hop-\ud83d", "site-\U0001f600"),
]


def _reference(
    prev: Any, at: Any, kind: Any, run_id: Any, hop_id: Any, site: Any, payload: Any
) -> str:
    """`event_hash` as the chain was defined: one `json.dumps` of the seven fields."""
    body = json.dumps(
        {"prev": prev, "at": at, "kind": kind, "run_id": run_id, "hop_id": hop_id,
         "site": site, "payload": payload},
        sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False,
    )  # fmt: skip
    return hashlib.sha256(body.encode("ascii")).hexdigest()


@pytest.mark.parametrize("payload", CORPUS, ids=range(len(CORPUS)))
@pytest.mark.parametrize("fields", FIELDS, ids=range(len(FIELDS)))
def test_event_hash_is_the_json_dumps_hash_of_every_payload(
    payload: Any, fields: tuple[str, ...]
) -> None:
    assert event_hash(*fields, payload) == _reference(*fields, payload)


@pytest.mark.parametrize(
    "fields",
    [(GENESIS_HASH, 5, "k", None, None, None), (GENESIS_HASH, "at", "k", 7, 1.5, True),
     (GENESIS_HASH, "at", "k", ["r"], {"h": 1}, None)],
)  # fmt: skip
def test_fields_that_are_not_text_hash_as_json_dumps_encodes_them(fields: tuple[Any, ...]) -> None:
    # verify reads columns as the database hands them: whatever they are, the verdict is the
    # canonical encoding's
    assert event_hash(*fields, {"a": 1}) == _reference(*fields, {"a": 1})


@pytest.mark.parametrize(
    ("payload", "error"),
    [({"x": math.nan}, ValueError), ({"x": [math.inf]}, ValueError),
     ({"x": {"y": -math.inf}}, ValueError), ({"x": 10**5000}, ValueError),
     ({"x": object()}, TypeError), ({"x": {1, 2}}, TypeError), ({"x": b"bytes"}, TypeError),
     ({1: "a", "b": 2}, TypeError)],
)  # fmt: skip
def test_what_json_dumps_refuses_event_hash_refuses(payload: Any, error: type[Exception]) -> None:
    with pytest.raises(error):
        _reference(*FIELDS[0], payload)
    with pytest.raises(error):
        event_hash(*FIELDS[0], payload)


@pytest.mark.parametrize(
    "value", [*CORPUS, {"nan": math.nan, "inf": [math.inf, -math.inf]}, "s", 1]
)
def test_snapshot_json_is_the_json_dumps_text_nan_included(value: Any) -> None:
    assert snapshot_json(value) == json.dumps(value, sort_keys=True, separators=(",", ":"))


def test_hashing_events_builds_no_encoder_per_event(monkeypatch: pytest.MonkeyPatch) -> None:
    # JSONEncoder.encode builds the C encoder on every call; the ledger builds its one at import.
    built: list[object] = []
    real = json.encoder.c_make_encoder
    assert real is not None

    def counting(*args: Any) -> Any:
        built.append(args)
        return real(*args)

    monkeypatch.setattr(json.encoder, "c_make_encoder", counting)
    for payload in CORPUS:
        event_hash(*FIELDS[0], payload)
    assert built == []
