"""A finished hop handed back in one call (HandBackHop): stored once, checked, committed once."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import safetensors.numpy

from coordinator.console.admin import AdminClient
from coordinator.plan import parse_plan
from coordinator.server import Coordinator
from protocols.checkpoint import CheckpointManifest, bundle_metadata, sha256_hex
from protocols.signing import sign_digest
from protocols.transport import CHUNK_BYTES
from protocols.v1 import baton_pb2 as pb
from tests.coordinator_tests.conftest import BASE, ScriptedSite


def _start(admin: AdminClient, site: ScriptedSite) -> pb.HopTask:
    admin.wait_for_sites({"site-a", "site-b"}, timeout=60)
    admin.start_run(parse_plan({
        "name": "t", "dataset": "notes", "labels": ["x", "y"], "sites": ["site-a", "site-b"],
        "failure": {"retry_backoff_seconds": 0},
    }))  # fmt: skip
    return site.next_task()


def _header(site: ScriptedSite, task: pb.HopTask, data: bytes, **fields: object) -> pb.UploadHeader:
    digest = str(fields.pop("sha256", sha256_hex(data)))
    header = pb.UploadHeader(hop_id=task.hop_id, lease_token=task.lease_token,
                             total_size=len(data), sha256=digest,
                             signature=sign_digest(site.key_pem, digest))  # fmt: skip
    for name, value in fields.items():
        setattr(header, name, value)
    return header


def _result(task: pb.HopTask, **fields: object) -> pb.HopResult:
    values: dict[str, object] = {"hop_id": task.hop_id, "lease_token": task.lease_token,
                                 "ok": True, "metrics": {"accuracy": 0.5},
                                 "train_started_at_ns": 1, "train_finished_at_ns": 2}  # fmt: skip
    return pb.HopResult(**{**values, **fields})  # type: ignore[arg-type]


def _messages(
    header: pb.UploadHeader,
    data: bytes,
    result: pb.HopResult | None,
    stall: threading.Event | None = None,
) -> Iterator[pb.HandBackRequest]:
    yield pb.HandBackRequest(header=header)
    for start in range(header.offset, len(data), CHUNK_BYTES):
        yield pb.HandBackRequest(data=data[start : start + CHUNK_BYTES])
    if stall is not None:
        stall.wait(10)
    if result is not None:
        yield pb.HandBackRequest(result=result)


def _hand_back(
    site: ScriptedSite,
    task: pb.HopTask,
    data: bytes,
    *,
    header: pb.UploadHeader | None = None,
    result: pb.HopResult | None = None,
) -> str:
    """Hands `data` back with a good result; the hop's status, or "CODE: details" if refused."""
    header = header or _header(site, task, data)
    try:
        response = site.stub.HandBackHop(
            _messages(header, data, result or _result(task)), timeout=15
        )
    except grpc.RpcError as exc:
        return f"{exc.code().name}: {exc.details()}"
    assert response.ledger_head
    return str(response.hop_status)


def _bundle(site: ScriptedSite, task: pb.HopTask, floats: int, value: float = 0.5) -> bytes:
    manifest = CheckpointManifest(task_type=task.task_type, base_model_sha256=BASE,
                                  run_id=task.run_id, hop_id=task.hop_id, producer_site=site.name,
                                  parent_sha256=task.input_checkpoint.sha256)  # fmt: skip
    values = np.full((floats,), value, np.float32)
    return safetensors.numpy.save({"lora_A": values}, metadata=bundle_metadata(manifest, {"r": 4}))


def _state(coordinator: Coordinator) -> Path:
    return coordinator.engine.runs_dir.parent


def _files(folder: Path) -> list[Path]:
    return [Path(root) / name for root, _, names in os.walk(folder) for name in names]


def _hop_events(coordinator: Coordinator, run_id: str, hop_id: str) -> list[str]:
    return [e.kind for e in coordinator.engine.ledger.events(run_id) if e.hop_id == hop_id]


def test_hand_back_commits_in_one_call_with_the_events_of_upload_then_report(
    sites: dict[str, ScriptedSite], admin: AdminClient, coordinator: Coordinator
) -> None:
    site_a, site_b = sites["site-a"], sites["site-b"]
    first = _start(admin, site_a)
    data = _bundle(site_a, first, 3 * CHUNK_BYTES // 4)  # a few chunks
    assert _hand_back(site_a, first, data) == "committed"
    second = site_b.next_task()  # the next hop is leased from the handed-back output
    assert second.input_checkpoint.sha256 == sha256_hex(data)
    assert sha256_hex(site_b.download(second.input_checkpoint.sha256)) == sha256_hex(data)
    # The same hop done the older way (upload, then report) leaves the same events.
    ref = site_b.upload(second, _bundle(site_b, second, 3 * CHUNK_BYTES // 4, 2.0))
    assert site_b.report(second, ref) == "committed"
    handed = _hop_events(coordinator, first.run_id, first.hop_id)
    assert handed == _hop_events(coordinator, first.run_id, second.hop_id)
    assert handed[-3:] == ["checkpoint.stored", "hop.uploaded", "hop.committed"]
    hop = coordinator.engine.ledger.hop(first.hop_id)
    assert hop is not None and hop.metrics == {"accuracy": 0.5}
    assert (hop.train_started_at_ns, hop.train_finished_at_ns) == (1, 2)
    # One file per checkpoint in the store, nothing left in the spool.
    state = _state(coordinator)
    assert sorted(p.name for p in _files(state / "checkpoints")) == sorted(
        [sha256_hex(data), ref.sha256]
    )
    assert _files(state / "uploads") == []
    assert coordinator.engine.ledger.verify_chain() is None


def test_hand_back_writes_the_checkpoint_the_commit_and_the_next_lease_in_one_transaction(
    sites: dict[str, ScriptedSite], admin: AdminClient, coordinator: Coordinator
) -> None:
    site_a = sites["site-a"]
    first = _start(admin, site_a)
    ledger = coordinator.engine.ledger
    transactions: list[tuple[str, ...]] = []
    ledger.head_observers.append(lambda _seq, _hash, kinds: transactions.append(kinds))
    try:
        assert _hand_back(site_a, first, _bundle(site_a, first, 1024)) == "committed"
    finally:
        ledger.head_observers.pop()
    # One durable commit for the whole handoff, its events still chained one by one.
    assert ("checkpoint.stored", "hop.uploaded", "hop.committed", "hop.leased") in transactions
    assert sites["site-b"].next_task().input_checkpoint.sha256
    assert ledger.verify_chain() is None and ledger.verify().ok


def _nan_bundle(site: ScriptedSite, task: pb.HopTask) -> bytes:
    values = np.ones(CHUNK_BYTES // 2, np.float32)  # two chunks; the NaN is in the second
    values[-1] = np.nan
    manifest = CheckpointManifest(task_type=task.task_type, base_model_sha256=BASE,
                                  run_id=task.run_id, hop_id=task.hop_id, producer_site=site.name,
                                  parent_sha256=task.input_checkpoint.sha256)  # fmt: skip
    return safetensors.numpy.save({"lora_A": values}, metadata=bundle_metadata(manifest, {}))


@pytest.mark.parametrize(
    ("case", "refusal"),
    [
        ("nan", "INVALID_ARGUMENT: tensor 'lora_A' holds NaN or infinite values"),
        ("corrupt", "INVALID_ARGUMENT: checkpoint is not a valid safetensors file"),
        ("hash", "INVALID_ARGUMENT: checkpoint hash mismatch: expected " + "00" * 32),
        ("lineage", "INVALID_ARGUMENT: checkpoint manifest hop_id is 'f00', expected"),
        ("signature", "INVALID_ARGUMENT: checkpoint-integrity:"),
        ("result", "INVALID_ARGUMENT: the hand back's result names output " + "11" * 32),
        ("metrics", "INVALID_ARGUMENT: metrics must be finite; not finite: accuracy"),
    ],
)
def test_refused_hand_back_commits_nothing_and_the_hop_can_be_handed_back_again(
    sites: dict[str, ScriptedSite],
    admin: AdminClient,
    coordinator: Coordinator,
    case: str,
    refusal: str,
) -> None:
    site = sites["site-a"]
    task = _start(admin, site)
    good = _bundle(site, task, 1024)
    data, header, result = good, None, None
    if case == "nan":
        data = _nan_bundle(site, task)
    elif case == "corrupt":
        data = b"\xff" * 8 + good[8:]
    elif case == "hash":
        header = _header(site, task, good, sha256="00" * 32)
    elif case == "lineage":
        manifest = CheckpointManifest(task_type=task.task_type, base_model_sha256=BASE,
                                      run_id=task.run_id, hop_id="f00", producer_site=site.name,
                                      parent_sha256="")  # fmt: skip
        data = safetensors.numpy.save({"lora_A": np.ones(4, np.float32)},
                                      metadata=bundle_metadata(manifest, {}))  # fmt: skip
    elif case == "signature":
        header = _header(site, task, good, signature=sign_digest(site.key_pem, "22" * 32))
    elif case == "result":
        result = _result(task, output_checkpoint=pb.CheckpointRef(sha256="11" * 32))
    else:
        result = _result(task, metrics={"accuracy": float("nan")})
    assert _hand_back(site, task, data, header=header, result=result).startswith(refusal)
    ledger = coordinator.engine.ledger
    hop = ledger.hop(task.hop_id)
    assert hop is not None and hop.status != "committed"
    assert "hop.committed" not in _hop_events(coordinator, task.run_id, task.hop_id)
    assert _files(_state(coordinator) / "uploads") == []
    if case in ("result", "metrics"):  # the bundle was good: stored, waiting for a result
        assert [p.name for p in _files(_state(coordinator) / "checkpoints")] == [sha256_hex(good)]
    else:
        assert _files(_state(coordinator) / "checkpoints") == []
        assert ledger.checkpoints(task.run_id) == []
    # The lease still holds: the good bundle is handed back and committed.
    assert _hand_back(site, task, good) == "committed"
    assert [p.name for p in _files(_state(coordinator) / "checkpoints")] == [sha256_hex(good)]


def test_hand_back_retried_after_a_lost_answer_is_committed_once(
    sites: dict[str, ScriptedSite], admin: AdminClient, coordinator: Coordinator
) -> None:
    site = sites["site-a"]
    task = _start(admin, site)
    data = _bundle(site, task, CHUNK_BYTES // 2)
    header = _header(site, task, data)
    assert _hand_back(site, task, data, header=header) == "committed"
    # The answer was lost: the site asks what the coordinator holds, and resumes from there.
    assert site.stub.UploadStatus(header, timeout=30).received == len(data)
    header.offset = len(data)
    assert _hand_back(site, task, data, header=header) == "committed"
    header.offset = 0  # or sends everything again
    assert _hand_back(site, task, data, header=header) == "committed"
    events = _hop_events(coordinator, task.run_id, task.hop_id)
    assert events.count("hop.committed") == 1 and events.count("checkpoint.stored") == 1
    assert len(_files(_state(coordinator) / "checkpoints")) == 1
    assert _files(_state(coordinator) / "uploads") == []
    # Another bundle for the committed hop is refused, as any upload after the commit.
    other = _bundle(site, task, 16, 2.0)
    assert _hand_back(site, task, other).startswith(
        f"FAILED_PRECONDITION: lease token for hop {task.hop_id} is not current"
    )


def test_hand_back_of_another_sites_hop_or_an_old_lease_is_refused(
    sites: dict[str, ScriptedSite], admin: AdminClient, coordinator: Coordinator
) -> None:
    site_a, site_b = sites["site-a"], sites["site-b"]
    task = _start(admin, site_a)
    data = _bundle(site_a, task, 64)
    assert _hand_back(site_b, task, data) == (
        f"PERMISSION_DENIED: hop {task.hop_id} is not leased to site site-b"
    )
    stale = pb.HopTask()
    stale.CopyFrom(task)
    stale.lease_token = "0" * 32
    assert _hand_back(site_a, stale, data) == (
        f"FAILED_PRECONDITION: lease token for hop {task.hop_id} is not current"
    )
    assert _files(_state(coordinator) / "checkpoints") == []
    assert _hand_back(site_a, task, data) == "committed"


def test_cut_hand_back_resumes_from_what_the_coordinator_holds(
    sites: dict[str, ScriptedSite], admin: AdminClient, coordinator: Coordinator
) -> None:
    site = sites["site-a"]
    task = _start(admin, site)
    data = _bundle(site, task, CHUNK_BYTES)  # four chunks
    header = _header(site, task, data)
    stall = threading.Event()
    cut = site.stub.HandBackHop.future(_messages(header, data[: 2 * CHUNK_BYTES], None, stall))
    uploads = _state(coordinator) / "uploads"

    def spooled() -> int:
        return sum(p.stat().st_size for p in _files(uploads))

    for _ in range(200):
        if spooled() == 2 * CHUNK_BYTES:
            break
        stall.wait(0.05)
    cut.cancel()
    stall.set()
    header.offset = site.stub.UploadStatus(header, timeout=30).received
    assert header.offset == 2 * CHUNK_BYTES
    assert _hand_back(site, task, data, header=header) == "committed"
    assert [p.name for p in _files(_state(coordinator) / "checkpoints")] == [sha256_hex(data)]
    assert _files(uploads) == []


def test_hand_back_must_end_with_the_result_of_its_own_hop(
    sites: dict[str, ScriptedSite], admin: AdminClient, coordinator: Coordinator
) -> None:
    site = sites["site-a"]
    task = _start(admin, site)
    data = _bundle(site, task, 64)
    header = _header(site, task, data)
    with pytest.raises(grpc.RpcError) as missing:
        site.stub.HandBackHop(_messages(header, data, None), timeout=15)
    assert missing.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "a hand back ends with the hop's result and none came" in str(missing.value.details())
    failed = _result(task, ok=False, error_code="training-failed")
    assert _hand_back(site, task, data, header=header, result=failed).startswith(
        "INVALID_ARGUMENT: a hand back carries a successful hop's result"
    )
    # The bundle stayed stored: the hop is handed back from its end, without its bytes again.
    header.offset = site.stub.UploadStatus(header, timeout=30).received
    assert header.offset == len(data)
    assert _hand_back(site, task, data, header=header) == "committed"


def test_a_bundle_of_one_message_goes_straight_into_the_store(
    sites: dict[str, ScriptedSite],
    admin: AdminClient,
    coordinator: Coordinator,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    site = sites["site-a"]
    task = _start(admin, site)

    def spooled(*_: object) -> None:
        raise AssertionError("a one-message bundle went through the spool")

    monkeypatch.setattr(coordinator.engine.spool, "claim", spooled)
    cut = _nan_bundle(site, task)[: CHUNK_BYTES // 2]  # one message, not safetensors
    assert _hand_back(site, task, cut).startswith(
        "INVALID_ARGUMENT: checkpoint is not a valid safetensors file"
    )
    data = _bundle(site, task, 75_000)  # a LoRA adapter's size (~300 KB)
    assert _hand_back(site, task, data) == "committed"
    assert [p.name for p in _files(_state(coordinator) / "checkpoints")] == [sha256_hex(data)]
    assert _files(_state(coordinator) / "uploads") == []
