"""The ledger's canonical JSON (sorted keys, no spaces, ASCII) and the hash of one event over it.

Both encoders are the C encoder, built once: `json.dumps` and `JSONEncoder.encode` build it
again on every call, which was a fifth of an event's hash (appends hash each event once, and
`baton ledger verify` each event of the chain).
"""

from __future__ import annotations

import hashlib
import json
import json.encoder
from collections.abc import Callable
from typing import Any, NoReturn

__all__ = ["canonical_json", "event_hash", "snapshot_json"]


def _refuse(value: object) -> NoReturn:
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


_ESCAPE: Callable[[str], str] = json.encoder.encode_basestring_ascii
_MAKE_ENCODER = getattr(json.encoder, "c_make_encoder", None)


def _encoder(*, allow_nan: bool) -> Callable[[Any], str]:
    """`JSONEncoder(sort_keys=True, separators=(",", ":"), allow_nan=...).encode`, built once.

    No cycle check (the C encoder's markers would be one dict shared by every thread): a
    payload that holds itself raises RecursionError rather than ValueError. Ledger payloads
    are built from JSON values and never hold themselves.
    """
    if _MAKE_ENCODER is None:  # an interpreter without the C accelerator
        return json.JSONEncoder(
            sort_keys=True, separators=(",", ":"), check_circular=False, allow_nan=allow_nan
        ).encode
    encode = _MAKE_ENCODER(None, _refuse, _ESCAPE, None, ":", ",", True, False, allow_nan)

    def canonical(value: Any) -> str:
        return "".join(encode(value, 0))

    return canonical


# What an event's hash covers: NaN and the infinities refused (they are not JSON).
canonical_json = _encoder(allow_nan=False)
# A state row value's snapshot digest (as revision 0007 defined it: NaN encoded as NaN).
snapshot_json = _encoder(allow_nan=True)

# The body `event_hash` hashes, `canonical_json` of a dict of its seven fields, whose keys
# sort in this order; the text fields are escaped alone and only the payload is encoded.
_BODY = '{"at":%s,"hop_id":%s,"kind":%s,"payload":%s,"prev":%s,"run_id":%s,"site":%s}'


def event_hash(
    prev_hash: str,
    at: str,
    kind: str,
    run_id: str | None,
    hop_id: str | None,
    site: str | None,
    payload: dict[str, Any],
) -> str:
    """Hash of one event over a canonical JSON encoding, chained to the previous event's hash.

    Raises:
        TypeError: The payload holds a value JSON has no form for.
        ValueError: The payload holds NaN or an infinity.
    """
    try:
        body = _BODY % (
            _ESCAPE(at),
            "null" if hop_id is None else _ESCAPE(hop_id),
            _ESCAPE(kind),
            canonical_json(payload),
            _ESCAPE(prev_hash),
            "null" if run_id is None else _ESCAPE(run_id),
            "null" if site is None else _ESCAPE(site),
        )
    except TypeError:  # a field that is not text (a column of another type): encoded as is
        body = canonical_json(
            {
                "prev": prev_hash,
                "at": at,
                "kind": kind,
                "run_id": run_id,
                "hop_id": hop_id,
                "site": site,
                "payload": payload,
            }
        )
    return hashlib.sha256(body.encode("ascii")).hexdigest()
