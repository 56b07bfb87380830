"""A finished hop handed back in one call (HandBackHop): stored once, checked, committed once."""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import grpc
import numpy as np
import pytest
import safetensors.numpy
from sqlalchemy import event
from sqlalchemy.exc import OperationalError

from coordinator.console.admin import AdminClient
from coordinator.ledger import CheckpointRow
from coordinator.plan import parse_plan
from coordinator.server import Coordinator
from protocols.checkpoint import CheckpointManifest, bundle_metadata, sha256_hex
from protocols.signing import sign_digest
from protocols.transport import CHUNK_BYTES
from protocols.v1 import baton_pb2 as pb
from tests.coordinator_tests.conftest import BASE, ScriptedSite

T = TypeVar("T")


@pytest.fixture
def site(sites: dict[str, ScriptedSite]) -> ScriptedSite:
    """site-a: the site of the run's first hop."""
    return sites["site-a"]


@pytest.fixture
def task(admin: AdminClient, site: ScriptedSite) -> pb.HopTask:
    """The first hop of a site-a, site-b run, leased to site-a."""
    admin.wait_for_sites({"site-a", "site-b"}, timeout=60)
    admin.start_run(parse_plan({
        "name": "t", "dataset": "notes", "labels": ["x", "y"], "sites": ["site-a", "site-b"],
        "failure": {"retry_backoff_seconds": 0},
    }))  # fmt: skip
    return site.next_task()


@pytest.fixture
def bundle(site: ScriptedSite, task: pb.HopTask) -> bytes:
    """A good bundle of the first hop, of one message (the store writes it with `put`)."""
    return _bundle(site, task, 1024)


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
    whole: bool = False,
) -> str:
    """Hands `data` (from the header's offset) back with a good result, streamed (HandBackHop)
    or, `whole`, in one message (HandBackHopWhole); the hop's status, or "CODE: details" if
    refused."""
    header = header or _header(site, task, data)
    result = result or _result(task)
    try:
        if whole:
            request = pb.HandBackWhole(header=header, bundle=data[header.offset :], result=result)
            response = site.stub.HandBackHopWhole(request, timeout=15)
        else:
            response = site.stub.HandBackHop(_messages(header, data, result), timeout=15)
    except grpc.RpcError as exc:
        return f"{exc.code().name}: {exc.details()}"
    assert response.ledger_head
    return str(response.hop_status)


def _bundle_of(
    site: ScriptedSite,
    task: pb.HopTask,
    values: np.ndarray,
    adapter_config: dict[str, int],
    **manifest_overrides: str,
) -> bytes:
    """A bundle of one tensor, `values`, made by `site` for `task`'s hop."""
    fields = dict(task_type=task.task_type, base_model_sha256=BASE, run_id=task.run_id,
                  hop_id=task.hop_id, producer_site=site.name,
                  parent_sha256=task.input_checkpoint.sha256)  # fmt: skip
    fields.update(manifest_overrides)
    manifest = CheckpointManifest(**fields)
    return safetensors.numpy.save(
        {"lora_A": values}, metadata=bundle_metadata(manifest, adapter_config)
    )


def _bundle(site: ScriptedSite, task: pb.HopTask, floats: int, value: float = 0.5) -> bytes:
    return _bundle_of(site, task, np.full((floats,), value, np.float32), {"r": 4})


def _nan_bundle(site: ScriptedSite, task: pb.HopTask) -> bytes:
    values = np.ones(CHUNK_BYTES // 2, np.float32)  # two chunks; the NaN is in the second
    values[-1] = np.nan
    return _bundle_of(site, task, values, {})


def _state(coordinator: Coordinator) -> Path:
    return coordinator.engine.runs_dir.parent


def _files(folder: Path) -> list[Path]:
    return [Path(root) / name for root, _, names in os.walk(folder) for name in names]


def _stored(coordinator: Coordinator) -> list[str]:
    """The names (hashes) of the checkpoint files in the coordinator's store, sorted."""
    return sorted(p.name for p in _files(_state(coordinator) / "checkpoints"))


def _spooled(coordinator: Coordinator) -> list[Path]:
    """The upload spool's files (partial bundles)."""
    return _files(_state(coordinator) / "uploads")


def _hop_events(coordinator: Coordinator, run_id: str, hop_id: str) -> list[str]:
    return [e.kind for e in coordinator.engine.ledger.events(run_id) if e.hop_id == hop_id]


def _stored_and_committed(coordinator: Coordinator, task: pb.HopTask) -> tuple[int, int]:
    """How many times the ledger has the hop's bundle stored, and the hop committed."""
    events = _hop_events(coordinator, task.run_id, task.hop_id)
    return events.count("checkpoint.stored"), events.count("hop.committed")


def _stored_row(coordinator: Coordinator, task: pb.HopTask, data: bytes) -> CheckpointRow:
    """The ledger's row of bundle `data`: stored, the output of `task`'s hop."""
    row = coordinator.engine.ledger.checkpoint(sha256_hex(data))
    assert row is not None and row.status == "stored" and row.hop_id == task.hop_id
    return row


def _resume_offset(site: ScriptedSite, header: pb.UploadHeader) -> int:
    """Sets `header` to resume from what the coordinator holds of the bundle (as a site whose
    call was cut asks), and returns that offset."""
    header.offset = site.stub.UploadStatus(header, timeout=30).received
    return header.offset


def _refused_parts(
    site: ScriptedSite, task: pb.HopTask, good: bytes, case: str
) -> tuple[bytes, pb.UploadHeader | None, pb.HopResult | None]:
    """The bundle, header (None: the bundle's own) and result (None: a good one) of a hand back
    refused for `case`, one of corrupt, hash, lineage, signature (the bundle), failed, other
    lease, result and metrics (the result); `good`: a good bundle of the hop."""
    data, header, result = good, None, None
    if case == "corrupt":
        data = b"\xff" * 8 + good[8:]
    elif case == "hash":
        header = _header(site, task, good, sha256="00" * 32)
    elif case == "lineage":
        data = _bundle_of(site, task, np.ones(4, np.float32), {}, hop_id="f00", parent_sha256="")
    elif case == "signature":
        header = _header(site, task, good, signature=sign_digest(site.key_pem, "22" * 32))
    elif case == "failed":
        result = _result(task, ok=False, error_code="training-failed")
    elif case == "other lease":
        result = _result(task, lease_token="0" * 32)
    elif case == "result":
        result = _result(task, output_checkpoint=pb.CheckpointRef(sha256="11" * 32))
    elif case == "metrics":
        result = _result(task, metrics={"accuracy": float("nan")})
    else:
        raise ValueError(f"no refusal case {case!r}")
    return data, header, result


def _committed_once_after_a_lost_answer(
    site: ScriptedSite, task: pb.HopTask, coordinator: Coordinator, data: bytes, whole: bool
) -> None:
    """Hands `data` back (`whole`: in one message) and, the answer lost, again twice; each time
    committed, the bundle stored and the hop committed once. Then another bundle for the
    committed hop is refused, as any upload after the commit."""
    header = _header(site, task, data)
    assert _hand_back(site, task, data, header=header, whole=whole) == "committed"
    # The answer was lost: the site asks what the coordinator holds and resumes from there
    # (nothing more to send)...
    assert _resume_offset(site, header) == len(data)
    assert _hand_back(site, task, data, header=header, whole=whole) == "committed"
    header.offset = 0  # ...or sends everything again
    assert _hand_back(site, task, data, header=header, whole=whole) == "committed"
    assert _stored_and_committed(coordinator, task) == (1, 1)
    other = _bundle(site, task, 16, 2.0)
    assert _hand_back(site, task, other, whole=whole).startswith(
        f"FAILED_PRECONDITION: lease token for hop {task.hop_id} is not current"
    )


def _refused_to_another_site(
    sites: dict[str, ScriptedSite], task: pb.HopTask, data: bytes, whole: bool
) -> None:
    """site-b hands back site-a's hop (`whole`: in one message) and is refused."""
    assert _hand_back(sites["site-b"], task, data, whole=whole) == (
        f"PERMISSION_DENIED: hop {task.hop_id} is not leased to site site-b"
    )


def test_hand_back_commits_in_one_call_with_the_events_of_upload_then_report(
    sites: dict[str, ScriptedSite], site: ScriptedSite, task: pb.HopTask, coordinator: Coordinator
) -> None:
    site_b = sites["site-b"]
    data = _bundle(site, task, 3 * CHUNK_BYTES // 4)  # a few chunks
    assert _hand_back(site, task, data) == "committed"
    second = site_b.next_task()  # the next hop is leased from the handed-back output
    assert second.input_checkpoint.sha256 == sha256_hex(data)
    assert sha256_hex(site_b.download(second.input_checkpoint.sha256)) == sha256_hex(data)
    # The same hop done the older way (upload, then report) leaves the same events.
    ref = site_b.upload(second, _bundle(site_b, second, 3 * CHUNK_BYTES // 4, 2.0))
    assert site_b.report(second, ref) == "committed"
    handed = _hop_events(coordinator, task.run_id, task.hop_id)
    assert handed == _hop_events(coordinator, task.run_id, second.hop_id)
    assert handed[-3:] == ["checkpoint.stored", "hop.uploaded", "hop.committed"]
    hop = coordinator.engine.ledger.hop(task.hop_id)
    assert hop is not None and hop.metrics == {"accuracy": 0.5}
    assert (hop.train_started_at_ns, hop.train_finished_at_ns) == (1, 2)
    # One file per checkpoint in the store, nothing left in the spool.
    assert _stored(coordinator) == sorted([sha256_hex(data), ref.sha256])
    assert _spooled(coordinator) == []
    assert coordinator.engine.ledger.verify_chain() is None


def test_hand_back_writes_the_checkpoint_the_commit_and_the_next_lease_in_one_transaction(
    sites: dict[str, ScriptedSite],
    site: ScriptedSite,
    task: pb.HopTask,
    bundle: bytes,
    coordinator: Coordinator,
) -> None:
    ledger = coordinator.engine.ledger
    transactions: list[tuple[str, ...]] = []
    ledger.head_observers.append(lambda _seq, _hash, kinds: transactions.append(kinds))
    try:
        assert _hand_back(site, task, bundle) == "committed"
    finally:
        ledger.head_observers.pop()
    # One durable commit for the whole handoff, its events still chained one by one.
    assert ("checkpoint.stored", "hop.uploaded", "hop.committed", "hop.leased") in transactions
    assert sites["site-b"].next_task().input_checkpoint.sha256
    assert ledger.verify_chain() is None and ledger.verify().ok


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
    site: ScriptedSite, task: pb.HopTask, coordinator: Coordinator, case: str, refusal: str
) -> None:
    good = _bundle(site, task, 1024)
    if case == "nan":
        data, header, result = _nan_bundle(site, task), None, None
    else:
        data, header, result = _refused_parts(site, task, good, case)
    assert _hand_back(site, task, data, header=header, result=result).startswith(refusal)
    ledger = coordinator.engine.ledger
    hop = ledger.hop(task.hop_id)
    assert hop is not None and hop.status != "committed"
    assert "hop.committed" not in _hop_events(coordinator, task.run_id, task.hop_id)
    assert _spooled(coordinator) == []
    if case in ("result", "metrics"):  # the bundle was good: stored, waiting for a result
        assert _stored(coordinator) == [sha256_hex(good)]
    else:
        assert _stored(coordinator) == []
        assert ledger.checkpoints(task.run_id) == []
    # The lease still holds: the good bundle is handed back and committed.
    assert _hand_back(site, task, good) == "committed"
    assert _stored(coordinator) == [sha256_hex(good)]


def test_hand_back_retried_after_a_lost_answer_is_committed_once(
    site: ScriptedSite, task: pb.HopTask, coordinator: Coordinator
) -> None:
    _committed_once_after_a_lost_answer(
        site, task, coordinator, _bundle(site, task, CHUNK_BYTES // 2), whole=False
    )
    assert len(_stored(coordinator)) == 1
    assert _spooled(coordinator) == []


def test_hand_back_of_another_sites_hop_or_an_old_lease_is_refused(
    sites: dict[str, ScriptedSite], site: ScriptedSite, task: pb.HopTask, coordinator: Coordinator
) -> None:
    data = _bundle(site, task, 64)
    _refused_to_another_site(sites, task, data, whole=False)
    stale = pb.HopTask()
    stale.CopyFrom(task)
    stale.lease_token = "0" * 32
    assert _hand_back(site, stale, data) == (
        f"FAILED_PRECONDITION: lease token for hop {task.hop_id} is not current"
    )
    assert _stored(coordinator) == []
    assert _hand_back(site, task, data) == "committed"


def test_cut_hand_back_resumes_from_what_the_coordinator_holds(
    site: ScriptedSite, task: pb.HopTask, coordinator: Coordinator
) -> None:
    data = _bundle(site, task, CHUNK_BYTES)  # four chunks
    header = _header(site, task, data)
    stall = threading.Event()
    cut = site.stub.HandBackHop.future(_messages(header, data[: 2 * CHUNK_BYTES], None, stall))

    def spooled() -> int:
        return sum(p.stat().st_size for p in _spooled(coordinator))

    for _ in range(200):
        if spooled() == 2 * CHUNK_BYTES:
            break
        stall.wait(0.05)
    cut.cancel()
    stall.set()
    assert _resume_offset(site, header) == 2 * CHUNK_BYTES
    # The cut call may still be ending on the coordinator (one upload per hop at a time): a
    # site tries a RESOURCE_EXHAUSTED answer again (`site_agent.transfers`), and so does this.
    answers: list[str] = []

    def resumed() -> bool:
        answers.append(_hand_back(site, task, data, header=header))
        return not answers[-1].startswith("RESOURCE_EXHAUSTED")

    _until(resumed, timeout=30)
    assert answers[-1] == "committed"
    assert _stored(coordinator) == [sha256_hex(data)]
    assert _spooled(coordinator) == []


def test_hand_back_must_end_with_the_result_of_its_own_hop(
    site: ScriptedSite, task: pb.HopTask
) -> None:
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
    assert _resume_offset(site, header) == len(data)
    assert _hand_back(site, task, data, header=header) == "committed"


def test_a_bundle_of_one_message_goes_straight_into_the_store(
    site: ScriptedSite,
    task: pb.HopTask,
    coordinator: Coordinator,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def spooled(*_: object) -> None:
        raise AssertionError("a one-message bundle went through the spool")

    monkeypatch.setattr(coordinator.engine.spool, "claim", spooled)
    cut = _nan_bundle(site, task)[: CHUNK_BYTES // 2]  # one message, not safetensors
    assert _hand_back(site, task, cut).startswith(
        "INVALID_ARGUMENT: checkpoint is not a valid safetensors file"
    )
    data = _bundle(site, task, 75_000)  # a LoRA adapter's size (~300 KB)
    assert _hand_back(site, task, data) == "committed"
    assert _stored(coordinator) == [sha256_hex(data)]
    assert _spooled(coordinator) == []


def _until(predicate: Callable[[], object], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition never held"
        time.sleep(0.05)


def _held_until(release: threading.Event, entered: threading.Event) -> Callable[..., object]:
    """A wrapper that signals `entered`, then waits for `release` before calling through."""

    def wrap(real: Callable[..., object]) -> Callable[..., object]:
        def held(*args: object, **kwargs: object) -> object:
            entered.set()
            assert release.wait(60), "never released"
            return real(*args, **kwargs)

        return held

    return wrap  # type: ignore[return-value]


def _recorded_alone(coordinator: Coordinator, monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """Set once the intake's `record_alone` (the clean-up after a failed hand back) has ended."""
    done = threading.Event()
    intake = coordinator.engine.intake
    real = intake.record_alone

    async def record_alone(row: CheckpointRow) -> None:
        try:
            await real(row)
        finally:
            done.set()

    monkeypatch.setattr(intake, "record_alone", record_alone)
    return done


def test_hand_back_into_a_full_ledger_is_retryable_even_when_its_clean_up_fails_too(
    site: ScriptedSite,
    task: pb.HopTask,
    bundle: bytes,
    coordinator: Coordinator,
    caplog: pytest.LogCaptureFixture,
) -> None:
    ledger = coordinator.engine.ledger

    def full(_conn: object, _cursor: object, statement: str, params: object, *_: object) -> None:
        if statement.lstrip().split(" ", 1)[0].upper() in ("INSERT", "UPDATE", "DELETE"):
            raise OperationalError(
                statement, params, sqlite3.OperationalError("database or disk is full")
            )

    # The disk fills once the bundle is in the store: the commit fails, and so does the
    # clean-up that records the bundle's row alone.
    event.listen(ledger.engine, "before_cursor_execute", full)
    try:
        with caplog.at_level(logging.ERROR, logger="coordinator.engine.uploads"):
            refused = _hand_back(site, task, bundle)
    finally:
        event.remove(ledger.engine, "before_cursor_execute", full)
    # The site is told to retry (it keeps its finished hop), not refused for good.
    assert refused == (
        "UNAVAILABLE: coordinator storage full: ledger database: database or disk is full; retrying"
    )
    assert (
        f"checkpoint {sha256_hex(bundle)} of hop {task.hop_id} stays in the store without its row"
        in caplog.text
    )
    hop = ledger.hop(task.hop_id)
    assert hop is not None and hop.status in ("leased", "training")
    # Space is back: the retried hand back commits the hop, bytes and row as one.
    assert _hand_back(site, task, bundle) == "committed"
    assert _stored(coordinator) == [sha256_hex(bundle)]
    row = _stored_row(coordinator, task, bundle)
    hop = ledger.hop(task.hop_id)
    assert hop is not None and hop.status == "committed" and hop.output_sha256 == row.sha256
    assert _stored_and_committed(coordinator, task) == (1, 1)
    assert ledger.verify_chain() is None and ledger.verify().ok


def test_hand_back_cut_while_its_bundle_is_stored_keeps_the_bundles_row(
    site: ScriptedSite,
    task: pb.HopTask,
    bundle: bytes,
    coordinator: Coordinator,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    header = _header(site, task, bundle)
    entered, release = threading.Event(), threading.Event()
    store = coordinator.engine.store
    monkeypatch.setattr(store, "place", _held_until(release, entered)(store.place))
    cleaned = _recorded_alone(coordinator, monkeypatch)
    call = site.stub.HandBackHop.future(_messages(header, bundle, _result(task)))
    try:
        assert entered.wait(60), "the bundle was never written"
        call.cancel()  # the site's deadline passed while the bundle was being written
    finally:
        release.set()
    assert cleaned.wait(60), "the bundle's row was never recorded"
    row = _stored_row(coordinator, task, bundle)
    assert _stored(coordinator) == [row.sha256]
    # The site resumes at the bundle's end, without sending its bytes again.
    assert _resume_offset(site, header) == len(bundle)
    assert _hand_back(site, task, bundle, header=header) == "committed"
    assert _stored_and_committed(coordinator, task) == (1, 1)
    assert coordinator.engine.ledger.verify_chain() is None


def test_clean_up_after_a_hand_back_cut_during_its_commit_waits_for_that_commit(
    site: ScriptedSite,
    task: pb.HopTask,
    bundle: bytes,
    coordinator: Coordinator,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ledger = coordinator.engine.ledger
    entered, release = threading.Event(), threading.Event()
    # The commit holds its transaction open (its checkpoint row written, not yet committed).
    monkeypatch.setattr(ledger, "commit_hop", _held_until(release, entered)(ledger.commit_hop))
    writers: list[str] = []
    real_record = ledger.record_checkpoint

    def record_checkpoint(row: CheckpointRow) -> None:
        writers.append(threading.current_thread().name)
        real_record(row)

    monkeypatch.setattr(ledger, "record_checkpoint", record_checkpoint)
    cleaning = threading.Event()
    intake, writer = coordinator.engine.intake, coordinator.engine.writer
    real_alone, real_run = intake.record_alone, writer.run

    async def record_alone(row: CheckpointRow) -> None:
        cleaning.set()
        await real_alone(row)

    async def run(write: Callable[..., T], *args: object, **kwargs: object) -> T:
        # The clean-up's own write, not another caller's (a watchdog pass writes through too).
        if cleaning.is_set() and getattr(write, "__name__", "") == "_record_alone_locked":
            queued.set()  # the clean-up waits for the writer thread
        return await real_run(write, *args, **kwargs)

    queued = threading.Event()
    monkeypatch.setattr(intake, "record_alone", record_alone)
    monkeypatch.setattr(writer, "run", run)
    cleaned = _recorded_alone(coordinator, monkeypatch)
    messages = _messages(_header(site, task, bundle), bundle, _result(task))
    call = site.stub.HandBackHop.future(messages)
    try:
        assert entered.wait(60), "the hop was never committed"
        call.cancel()  # the site's deadline passed during the commit
        # The clean-up either writes beside the commit in flight, or waits for it.
        _until(lambda: queued.is_set() or len(writers) > 1)
    finally:
        release.set()
    assert cleaned.wait(60), "the clean-up never ended"
    # Only the commit wrote the row (on the writer thread); the clean-up found it committed.
    assert writers == ["ledger-writer_0"]
    hop = ledger.hop(task.hop_id)
    assert hop is not None and hop.status == "committed"
    assert _stored_and_committed(coordinator, task) == (1, 1)
    assert _stored(coordinator) == [sha256_hex(bundle)]
    assert ledger.verify_chain() is None
