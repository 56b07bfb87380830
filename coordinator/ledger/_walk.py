"""The chain walk of `Ledger.verify`: every event's link and hash in seq order, in one process
or split into seq ranges walked by processes of their own and joined at the ranges' bounds.

Each event's payload is decoded once, from its stored text, for its hash and its row notes.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from typing import Any

from sqlalchemy import URL, Connection, Text, cast, func, select

from coordinator.ledger._canonical import event_hash
from coordinator.ledger._chain import GENESIS_HASH, ChainBreak, LedgerCore
from coordinator.ledger._integrity import StateIndex
from coordinator.ledger.models import EventRow

__all__ = ["ChainWalk", "walk_chain"]

# A range shorter than this is walked by the process that has it (a process starts in ~0.5 s).
SPLIT_MIN_EVENTS = 50_000

_EVENTS = EventRow.__table__.c
# Every column an event's hash covers (the payload as its stored text), in chain order.
_EVENTS_IN_ORDER = select(
    _EVENTS.seq,
    _EVENTS.at,
    _EVENTS.kind,
    _EVENTS.run_id,
    _EVENTS.hop_id,
    _EVENTS.site,
    cast(_EVENTS.payload, Text),
    _EVENTS.prev_hash,
    _EVENTS.hash,
).order_by(_EVENTS.seq)
_LINK_BROKEN = "previous-hash link broken (event deleted or inserted)"
_ALTERED = "content does not match its hash (event altered)"


# The C scanner `json.loads` ends in, without its wrappers.
_SCAN: Callable[[str, int], tuple[Any, int]] = json.JSONDecoder().scan_once  # type: ignore[attr-defined]
_UNREADABLE = object()  # a payload whose stored text is not JSON


def _decode(text: str) -> Any:
    """`json.loads(text)`; `_UNREADABLE` if that raises."""
    try:
        value, end = _SCAN(text, 0)
        if end == len(text):
            return value
    except (StopIteration, TypeError, ValueError):
        pass
    try:  # leading or trailing whitespace, or not JSON: as json.loads decides
        return json.loads(text)
    except (TypeError, ValueError):
        return _UNREADABLE


def _hash_matches(
    digest: str,
    prev: str,
    at: str,
    kind: str,
    run_id: str | None,
    hop_id: str | None,
    site: str | None,
    payload: Any,
) -> bool:
    """Whether `digest` is `event_hash` of the event's stored fields."""
    if payload is _UNREADABLE:
        return False
    try:
        return event_hash(prev, at, kind, run_id, hop_id, site, payload) == digest
    except (TypeError, ValueError):  # not JSON-encodable (NaN): never hashed like that
        return False


class ChainWalk:
    """A walk over consecutive events, fed in seq order one batch at a time."""

    def __init__(self, index: StateIndex | None, prev: str | None = GENESIS_HASH) -> None:
        self.index = index  # notes each event's row snapshots (None: rows not checked)
        self.prev = prev  # the newest event's hash; None: the first event's link is taken as is
        self.first: tuple[int, str] | None = None  # (seq, prev_hash) of the first event walked
        self.count = 0
        self.last_seq = 0
        self.broken: ChainBreak | None = None  # the first event that does not verify

    def add(self, events: Sequence[Sequence[Any]]) -> None:
        if not events:
            return
        if self.first is None:
            self.first = (events[0][0], events[0][7])
        prev = self.prev if self.prev is not None else events[0][7]
        broken, decode, matches = self.broken, _decode, _hash_matches
        note = self.index.add if self.index is not None else None
        for seq, at, kind, run_id, hop_id, site, text, prev_hash, digest in events:
            payload = decode(text)
            if broken is None:
                if prev_hash != prev:
                    broken = ChainBreak(seq, _LINK_BROKEN)
                elif not matches(digest, prev, at, kind, run_id, hop_id, site, payload):
                    broken = ChainBreak(seq, _ALTERED)
            prev = digest
            if note is not None:
                note(seq, kind, payload)
        self.count += len(events)
        self.last_seq = events[-1][0]
        self.prev, self.broken = prev, broken

    def join(self, later: ChainWalk) -> None:
        """Continues this walk with `later`, the walk of the events right after this one's."""
        if later.first is None:
            return  # it found no events
        seq, link = later.first
        if self.broken is None:
            self.broken = ChainBreak(seq, _LINK_BROKEN) if link != self.prev else later.broken
        self.count += later.count
        self.last_seq = later.last_seq
        self.prev = later.prev
        if self.index is not None and later.index is not None:
            self.index.absorb(later.index)


def _walk_range(
    connection: Connection, walk: ChainWalk, after: int | None, upto: int | None, chunk: int
) -> None:
    """Feeds `walk` the events after seq `after` up to seq `upto` (None: no bound)."""
    query = _EVENTS_IN_ORDER
    if after is not None:
        query = query.where(_EVENTS.seq > after)
    if upto is not None:
        query = query.where(_EVENTS.seq <= upto)
    # yield_per streams (PostgreSQL: a server-side cursor) as plain rows, on the Core connection
    # (a select through a session goes through the ORM's row loading).
    result = connection.execute(query, execution_options={"yield_per": chunk})
    for batch in result.partitions(chunk):
        walk.add(batch)


def _walk_apart(url: str, after: int, upto: int | None, rows: bool, chunk: int) -> ChainWalk:
    """The walk of one range, in a process of its own (its own engine and connection)."""
    core = LedgerCore(url)
    try:
        walk = ChainWalk(StateIndex() if rows else None, prev=None)
        with core.engine.connect() as connection:
            _walk_range(connection, walk, after, upto, chunk)
        return walk
    finally:
        core.close()


def _in_memory(url: URL) -> bool:
    """Whether `url` is an in-memory SQLite database (another process would open another)."""
    database = url.database or ""
    return url.get_backend_name() == "sqlite" and (
        database in ("", ":memory:") or database.startswith("file::memory:")
        or url.query.get("mode") == "memory"
    )  # fmt: skip


def _process_pool(workers: int) -> Executor:
    """`workers` processes of their own, spawned (not forked: this process holds connections).

    Imported here, not at the top: the coordinator imports this module on its way to ready.
    """
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))


def walk_chain(
    connection: Connection, url: str, *, rows: bool, chunk: int, processes: int = 1
) -> ChainWalk:
    """Walks the whole chain; with `processes` > 1 and enough events, the seq range is cut in
    that many parts: this process walks the first while the others walk one each, and each
    part is joined to the one before it (its first link checked against that one's head).
    """
    walk = ChainWalk(StateIndex() if rows else None)
    cuts: list[int] = []
    if processes > 1 and not _in_memory(connection.engine.url):
        low, high = connection.execute(select(func.min(_EVENTS.seq), func.max(_EVENTS.seq))).one()
        if low is not None:
            parts = min(processes, (high - low + 1) // SPLIT_MIN_EVENTS)
            cuts = [low - 1 + (high - low + 1) * i // parts for i in range(1, parts)]
    if not cuts:
        _walk_range(connection, walk, None, None, chunk)
        return walk
    with _process_pool(len(cuts)) as pool:
        later = [
            pool.submit(_walk_apart, url, after, upto, rows, chunk)
            for after, upto in zip(cuts, [*cuts[1:], None], strict=True)
        ]
        _walk_range(connection, walk, None, cuts[0], chunk)
        for part in later:
            walk.join(part.result())
    return walk
