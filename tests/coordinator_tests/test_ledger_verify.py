"""`Ledger.verify`'s chain walk: every value an event's hash covers, and stored text that no longer
decodes or encodes, give the verdict `event_hash` gives."""

from __future__ import annotations

import multiprocessing
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, ClassVar

import pytest
from sqlalchemy import text, update

from coordinator.ledger import EventRow, Ledger, _walk
from tests.coordinator_tests.test_ledger_integrity import populate

# Payloads covering what the canonical encoding meets: escapes, non-ASCII, numbers of every
# shape, nesting, empty containers and null.
PAYLOADS: list[dict[str, Any]] = [
    {"text": 'quote " backslash \\ tab \t newline \n nul \x00 é ✓ \u2028 \U0001f600'},
    {"floats": [0.1, 1e-7, 1e300, -0.0, 2.5e-308, 1 / 3], "ints": [0, -1, 2**70]},
    {"nested": {"b": [{"z": True, "a": False}], "a": None}, "empty": [{}, []]},
    {"ünïcode-kéy": "v", "Z": 1, "a": 2, "_": 3},
    {},
]


@pytest.fixture
def ledger(database_url: str) -> Iterator[Ledger]:
    ledger = Ledger(database_url)
    ledger.migrate()
    fields = [{}, {"run_id": "r" * 32}, {"hop_id": "h1", "site": "site-é"},
              {"run_id": "r2", "hop_id": "h2", "site": "s"}, {"site": 'q"uote'}]  # fmt: skip
    for payload, extra in zip(PAYLOADS, fields, strict=True):
        ledger.record_event("test.kind", payload=payload, **extra)
    yield ledger
    ledger.close()


def test_events_of_every_value_type_verify_in_batches_of_any_size(ledger: Ledger) -> None:
    for chunk in (1, 2, 1000):
        result = ledger.verify(rows=False, chunk=chunk)
        assert result.chain_break is None
        assert (result.events, result.last_seq, result.head) == (5, 5, ledger.head())


@pytest.mark.parametrize("seq", [1, 2, 3, 4, 5])
def test_each_altered_event_is_named_whatever_it_holds(ledger: Ledger, seq: int) -> None:
    with ledger.transaction() as session:
        event = session.get(EventRow, seq)
        assert event is not None
        session.execute(
            update(EventRow)
            .where(EventRow.seq == seq)
            .values(payload={**event.payload, "added": 1})
        )
    for chunk in (1, 1000):
        broken = ledger.verify(rows=False, chunk=chunk).chain_break
        assert broken is not None and broken.seq == seq and "altered" in broken.reason


@pytest.mark.parametrize(
    ("column", "value"),
    [("at", "2026-01-01T00:00:00.000000+00:00"), ("kind", "test.other"), ("run_id", None),
     ("hop_id", "h9"), ("site", "site-e")],
)  # fmt: skip
def test_an_altered_column_other_than_the_payload_is_named(
    ledger: Ledger, column: str, value: str | None
) -> None:
    with ledger.transaction() as session:
        session.execute(update(EventRow).where(EventRow.seq == 4).values({column: value}))
    broken = ledger.verify_chain()
    assert broken is not None and broken.seq == 4 and "altered" in broken.reason


@pytest.mark.parametrize("stored", ['{"index": ', '{"index": NaN}', '{"index": Infinity}', "[1, 2"])
def test_a_payload_stored_as_text_no_json_encoder_accepts_is_named_altered(
    tmp_path: Path, stored: str
) -> None:
    # SQLite keeps JSON as text, so an edit can leave text that no longer decodes, or that
    # decodes to a value (NaN) the canonical encoding refuses: verify named neither, it raised.
    ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.sqlite3'}")
    ledger.migrate()
    for index in range(4):
        ledger.record_event("test.event", payload={"index": index})
    with ledger.transaction() as session:
        session.execute(
            text("UPDATE events SET payload = :stored WHERE seq = 2"), {"stored": stored}
        )
    result = ledger.verify()
    ledger.close()
    assert result.chain_break is not None
    assert result.chain_break.seq == 2 and "altered" in result.chain_break.reason
    assert (result.events, result.last_seq) == (4, 4)


class _CountingPool(ProcessPoolExecutor):
    """The real process pool (spawned processes), counting the ranges handed to them.

    One pool per size stays open across a test's verifies and is shut down by `populated`:
    spawning its processes again for each of them (each imports the ledger) made a test
    of five multi-process verifies cost seconds of CPU per process. Each part still runs in a
    process of its own, with its own engine and connection (`_walk_apart`).
    """

    ranges: ClassVar[list[tuple[object, ...]]] = []
    kept: ClassVar[dict[int, _CountingPool]] = {}

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Any:
        self.ranges.append(args[1:3])
        return super().submit(fn, *args, **kwargs)

    def __exit__(self, *exc: object) -> bool:
        return False  # walk_chain's `with` leaves it open for the test's next verify

    @classmethod
    def close_all(cls) -> None:
        pools, cls.kept = cls.kept, {}
        for pool in pools.values():
            pool.shutdown()


def _counting_pool(workers: int) -> _CountingPool:
    if workers not in _CountingPool.kept:
        context = multiprocessing.get_context("spawn")
        _CountingPool.kept[workers] = _CountingPool(workers, mp_context=context)
    return _CountingPool.kept[workers]


@pytest.fixture
def populated(database_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Ledger]:
    """A ledger with a row in every state table, and chains of 3 events or more cut in parts."""
    ledger = Ledger(database_url)
    ledger.migrate()
    populate(ledger)
    for index in range(6):
        ledger.record_event("test.event", payload={"index": index})
    monkeypatch.setattr(_walk, "SPLIT_MIN_EVENTS", 3)
    monkeypatch.setattr(_walk, "_process_pool", _counting_pool)
    _CountingPool.ranges = []
    yield ledger
    _CountingPool.close_all()
    ledger.close()


def _edit(ledger: Ledger, statement: str) -> None:
    with ledger.engine.begin() as connection:
        connection.execute(text(statement))


def test_a_chain_walked_in_parts_by_processes_gives_the_verdict_of_one_walk(
    populated: Ledger,
) -> None:
    last = populated.last_event()
    assert last is not None and last.seq >= 12
    cut = last.seq // 3  # the first of the three parts ends here
    one = populated.verify()
    assert one.ok and one.events == last.seq and not _CountingPool.ranges
    assert populated.verify(processes=3) == one
    assert _CountingPool.ranges == [(cut, 2 * last.seq // 3), (2 * last.seq // 3, None)]

    # Rows edited and deleted, a row put back without an event: the same findings, in order.
    _edit(populated, "UPDATE hops SET status = 'forged' WHERE \"index\" = 1")
    _edit(populated, "DELETE FROM revocations")
    _edit(populated, "UPDATE sites SET agent_version = '9' WHERE name = 'site-b'")
    one = populated.verify()
    assert len(one.row_mismatches) == 3 and one.chain_break is None
    assert populated.verify(processes=3) == one

    # An event of the last part altered; then the first event of the second part deleted.
    _edit(populated, f"UPDATE events SET kind = 'forged' WHERE seq = {last.seq - 1}")
    one = populated.verify()
    assert one.chain_break is not None and one.chain_break.seq == last.seq - 1
    assert populated.verify(processes=3) == one
    _edit(populated, f"DELETE FROM events WHERE seq = {cut + 1}")
    one = populated.verify()
    assert one.chain_break is not None and one.chain_break.seq == cut + 2
    assert populated.verify(processes=3) == one
    assert populated.verify(processes=2, rows=False) == populated.verify(rows=False)


def test_the_last_event_of_a_part_deleted_is_named_at_the_next_part(populated: Ledger) -> None:
    last = populated.last_event()
    assert last is not None
    cut = last.seq // 2
    _edit(populated, f"DELETE FROM events WHERE seq = {cut}")
    result = populated.verify(processes=2)
    assert _CountingPool.ranges == [(cut, None)]
    assert result.chain_break is not None and result.chain_break.seq == cut + 1
    assert "deleted or inserted" in result.chain_break.reason
    assert result == populated.verify()


def test_an_in_memory_ledger_is_walked_by_this_process_alone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Another process would open an empty database of its own: its part would have no events.
    ledger = Ledger("sqlite://")
    ledger.migrate()
    for index in range(9):
        ledger.record_event("test.event", payload={"index": index})
    monkeypatch.setattr(_walk, "SPLIT_MIN_EVENTS", 3)
    monkeypatch.setattr(_walk, "_process_pool", _counting_pool)
    _CountingPool.ranges = []
    result = ledger.verify(processes=3)
    ledger.close()
    _CountingPool.close_all()  # none was opened, unless the assertion below fails
    assert result.ok and result.events == 9 and not _CountingPool.ranges
