"""A small finished hop handed back in one message (HandBackHopWhole): the checks, the ledger
events and the one transaction of the streamed hand back (HandBackHop), over real mTLS gRPC."""

from __future__ import annotations

import functools

import grpc
import pytest

from coordinator.server import Coordinator
from protocols.checkpoint import sha256_hex
from protocols.transport import WHOLE_HAND_BACK_BYTES
from protocols.v1 import baton_pb2 as pb
from tests.coordinator_tests.conftest import ScriptedSite
from tests.coordinator_tests.test_hand_back import (
    _bundle,
    _committed_once_after_a_lost_answer,
    _hand_back,
    _header,
    _hop_events,
    _refused_parts,
    _refused_to_another_site,
    _result,
    _spooled,
    _stored,
    _stored_and_committed,
    site,
    task,
)

__all__ = ["site", "task"]  # fixtures


_whole = functools.partial(_hand_back, whole=True)


def test_a_hand_back_in_one_message_leaves_the_events_and_the_transaction_of_the_stream(
    sites: dict[str, ScriptedSite], site: ScriptedSite, task: pb.HopTask, coordinator: Coordinator
) -> None:
    ledger = coordinator.engine.ledger
    transactions: list[tuple[str, ...]] = []
    ledger.head_observers.append(lambda _seq, _hash, kinds: transactions.append(kinds))
    data = _bundle(site, task, 75_000)  # a MiniLM r=8 adapter's ~300 KB
    try:
        assert _whole(site, task, data) == "committed"
    finally:
        ledger.head_observers.pop()
    # One durable commit: the row, the hop's states and the next lease, chained one by one.
    assert ("checkpoint.stored", "hop.uploaded", "hop.committed", "hop.leased") in transactions
    site_b = sites["site-b"]
    second = site_b.next_task()
    assert second.input_checkpoint.sha256 == sha256_hex(data)
    assert second.input_bundle == data  # pushed inside the next task, byte for byte
    # The next hop handed back as a stream leaves the very same events.
    streamed = _bundle(site_b, second, 75_000, 2.0)
    header = _header(site_b, second, streamed)
    parts = [pb.HandBackRequest(header=header), pb.HandBackRequest(data=streamed),
             pb.HandBackRequest(result=_result(second))]  # fmt: skip
    assert site_b.stub.HandBackHop(iter(parts), timeout=15).hop_status == "committed"
    handed = _hop_events(coordinator, task.run_id, task.hop_id)
    assert handed == _hop_events(coordinator, task.run_id, second.hop_id)
    assert handed[-3:] == ["checkpoint.stored", "hop.uploaded", "hop.committed"]
    hop = ledger.hop(task.hop_id)
    assert hop is not None and hop.metrics == {"accuracy": 0.5}
    assert (hop.train_started_at_ns, hop.train_finished_at_ns) == (1, 2)
    assert _stored(coordinator) == sorted([sha256_hex(data), sha256_hex(streamed)])
    assert _spooled(coordinator) == []
    assert ledger.verify_chain() is None and ledger.verify().ok


# Refusals of the bundle (nothing is stored), then of the result (the good bundle is stored).
_BUNDLE_REFUSALS = {
    "nan": "INVALID_ARGUMENT: tensor 'lora_A' holds NaN or infinite values",
    "corrupt": "INVALID_ARGUMENT: checkpoint is not a valid safetensors file",
    "hash": "INVALID_ARGUMENT: checkpoint hash mismatch: expected " + "00" * 32,
    "lineage": "INVALID_ARGUMENT: checkpoint manifest hop_id is 'f00', expected",
    "signature": "INVALID_ARGUMENT: checkpoint-integrity:",
    "short": "INVALID_ARGUMENT: upload ended after 1000 of ",
    "long": "INVALID_ARGUMENT: upload is longer than its header declared",
    "oversized": f"INVALID_ARGUMENT: a hand back in one message carries at most "
    f"{WHOLE_HAND_BACK_BYTES} bytes of bundle, this one {WHOLE_HAND_BACK_BYTES + 1}; "
    "stream it with HandBackHop",
    "no result": "INVALID_ARGUMENT: a hand back in one message carries its upload header and "
    "its result",
}
_RESULT_REFUSALS = {
    "failed": "INVALID_ARGUMENT: a hand back carries a successful hop's result",
    "other lease": "INVALID_ARGUMENT: the hand back's result names another hop or lease",
    "result": "INVALID_ARGUMENT: the hand back's result names output " + "11" * 32,
    "metrics": "INVALID_ARGUMENT: metrics must be finite; not finite: accuracy",
}


def test_the_next_task_carries_a_bundle_handed_back_a_moment_ago_without_reading_the_store(
    sites: dict[str, ScriptedSite],
    site: ScriptedSite,
    task: pb.HopTask,
    coordinator: Coordinator,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    store = coordinator.engine.store
    read_back: list[str] = []
    read = store.read
    monkeypatch.setattr(store, "read", lambda sha256: read_back.append(sha256) or read(sha256))
    data = _bundle(site, task, 75_000)

    assert _whole(site, task, data) == "committed"

    second = sites["site-b"].next_task()
    assert second.input_bundle == data  # the bytes the coordinator checked and stored
    assert read_back == []  # kept in memory from the hand back, not read back from the store
    assert _stored(coordinator) == [sha256_hex(data)]
    # Taken once: a task sent again (a reconnect) reads the store, as any later read does.
    assert coordinator.engine.intake.recent_bundles.take(sha256_hex(data)) is None


def _refused_request(
    site: ScriptedSite, task: pb.HopTask, good: bytes, case: str
) -> pb.HandBackWhole:
    """A hand back in one message that is refused for `case` (`good`: a good bundle)."""
    header = _header(site, task, good)
    if case == "no result":
        return pb.HandBackWhole(header=header, bundle=good)
    data, result = good, _result(task)
    if case == "nan":
        data = _bundle(site, task, 1024, float("nan"))
        header = _header(site, task, data)
    elif case == "short":
        data = good[:1000]
    elif case == "long":
        data = good + b"\0"
    elif case == "oversized":
        header.total_size = WHOLE_HAND_BACK_BYTES + 1
    else:
        data, own_header, own_result = _refused_parts(site, task, good, case)
        header = _header(site, task, data) if own_header is None else own_header
        result = _result(task) if own_result is None else own_result
    return pb.HandBackWhole(header=header, bundle=data, result=result)


def test_refused_hand_backs_in_one_message_commit_nothing_and_lose_nothing(
    site: ScriptedSite, task: pb.HopTask, coordinator: Coordinator
) -> None:
    ledger = coordinator.engine.ledger
    good = _bundle(site, task, 1024)
    for case, refusal in (*_BUNDLE_REFUSALS.items(), *_RESULT_REFUSALS.items()):
        with pytest.raises(grpc.RpcError) as refused:
            site.stub.HandBackHopWhole(_refused_request(site, task, good, case), timeout=15)
        answer = f"{refused.value.code().name}: {refused.value.details()}"
        assert answer.startswith(refusal), (case, answer)
        hop = ledger.hop(task.hop_id)
        assert hop is not None and hop.status != "committed"
        assert "hop.committed" not in _hop_events(coordinator, task.run_id, task.hop_id)
        assert _spooled(coordinator) == []
        if case in _RESULT_REFUSALS:
            # The bundle was good: stored and recorded, waiting for a good result.
            assert _stored(coordinator) == [sha256_hex(good)]
            assert [row.sha256 for row in ledger.checkpoints(task.run_id)] == [sha256_hex(good)]
        else:
            assert _stored(coordinator) == [], case
            assert ledger.checkpoints(task.run_id) == []
    # The lease still holds: the good bundle is handed back and committed.
    assert _whole(site, task, good) == "committed"
    assert _stored_and_committed(coordinator, task) == (1, 1)
    assert _stored(coordinator) == [sha256_hex(good)]
    assert ledger.verify_chain() is None


def test_a_hand_back_in_one_message_retried_after_a_lost_answer_is_committed_once(
    site: ScriptedSite, task: pb.HopTask, coordinator: Coordinator
) -> None:
    data = _bundle(site, task, 4096)
    _committed_once_after_a_lost_answer(site, task, coordinator, data, whole=True)
    assert _stored(coordinator) == [sha256_hex(data)]


def test_a_hand_back_in_one_message_of_another_sites_hop_is_refused(
    sites: dict[str, ScriptedSite], site: ScriptedSite, task: pb.HopTask, coordinator: Coordinator
) -> None:
    data = _bundle(site, task, 64)
    _refused_to_another_site(sites, task, data, whole=True)
    assert _stored(coordinator) == []
    assert _whole(site, task, data) == "committed"


def test_a_malformed_hand_back_in_one_message_is_refused_and_recorded(
    site: ScriptedSite, task: pb.HopTask, coordinator: Coordinator
) -> None:
    call = site.channel.unary_unary("/baton.v1.SiteService/HandBackHopWhole")
    with pytest.raises(grpc.RpcError) as refused:
        call(b"\x0a\xff\xff", timeout=15)  # the header's length runs past the message
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert str(refused.value.details()).startswith("malformed HandBackHopWhole message: ")
    ledger = coordinator.engine.ledger
    refusals = [e for e in ledger.events() if e.kind == "access.refused"]
    assert refusals and refusals[-1].payload["method"].endswith("/HandBackHopWhole")
    hop = ledger.hop(task.hop_id)
    assert hop is not None and hop.status != "committed"
    assert _whole(site, task, _bundle(site, task, 64)) == "committed"
