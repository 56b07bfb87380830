"""A leased site cannot fill the coordinator's disk: one partial upload per hop, none orphaned."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator
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
from tests.coordinator_tests.conftest import BASE, EngineClock, ScriptedSite

CAP = 256 * 1024
SPOOLED = 300_000  # floats: a bundle of more than one chunk, streamed through the spool


def _start(admin: AdminClient, site: ScriptedSite, **failure: object) -> pb.HopTask:
    admin.wait_for_sites({"site-a", "site-b"}, timeout=60)
    admin.start_run(parse_plan({
        "name": "t", "dataset": "notes", "labels": ["x", "y"], "sites": ["site-a", "site-b"],
        "failure": {"retry_backoff_seconds": 0, **failure},
    }))  # fmt: skip
    return site.next_task()


def _bundle(site: ScriptedSite, task: pb.HopTask, floats: int, value: float) -> bytes:
    """A well-formed bundle for the hop of about `4 * floats` bytes."""
    manifest = CheckpointManifest(task_type=task.task_type, base_model_sha256=BASE,
                                  run_id=task.run_id, hop_id=task.hop_id, producer_site=site.name,
                                  parent_sha256=task.input_checkpoint.sha256)  # fmt: skip
    return safetensors.numpy.save(
        {"lora_A": np.full((floats,), value, np.float32)},
        metadata=bundle_metadata(manifest, {"r": 4}),
    )


def _upload(
    site: ScriptedSite,
    task: pb.HopTask,
    data: bytes,
    *,
    declared: int | None = None,
    sha: str | None = None,
    stop: threading.Event | None = None,
) -> grpc.Future:
    """Starts an upload of `data` (header may declare another size or digest); a future.

    With `stop`, the stream sends its data and then hangs until `stop` is set (a stalled site).
    """
    digest = sha or sha256_hex(data)
    header = pb.UploadHeader(
        hop_id=task.hop_id,
        lease_token=task.lease_token,
        total_size=len(data) if declared is None else declared,
        sha256=digest,
        signature=sign_digest(site.key_pem, digest),
    )

    def messages() -> Iterator[pb.UploadRequest]:
        yield pb.UploadRequest(header=header)
        for start in range(0, len(data), CHUNK_BYTES):
            yield pb.UploadRequest(data=data[start : start + CHUNK_BYTES])
        if stop is not None:
            stop.wait(60)

    return site.stub.UploadCheckpoint.future(messages(), timeout=120)


def _disk_bytes(state: Path) -> int:
    """Bytes in the coordinator's upload spool and checkpoint store, temporary files included."""
    total = 0
    for folder in (state / "uploads", state / "checkpoints"):
        for root, _, files in os.walk(folder):
            for name in files:
                with contextlib.suppress(FileNotFoundError):  # removed while walking
                    total += os.stat(os.path.join(root, name)).st_size
    return total


class _DiskSampler:
    """Samples the spool + store size on a thread while an attack runs; keeps the maximum."""

    def __init__(self, state: Path) -> None:
        self.state = state
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> _DiskSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self.peak = max(self.peak, _disk_bytes(self.state))

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _disk_bytes(self.state))
            time.sleep(0.001)


def _outcome(future: grpc.Future) -> str:
    try:
        future.result()
    except grpc.RpcError as exc:
        return f"{exc.code().name}: {exc.details()}"
    return "OK"


def _state(coordinator: Coordinator) -> Path:
    return coordinator.engine.runs_dir.parent


def test_site_uploading_many_made_up_bundles_never_holds_more_than_twice_the_cap(
    sites: dict[str, ScriptedSite], admin: AdminClient, coordinator: Coordinator
) -> None:
    site = sites["site-a"]
    task = _start(admin, site)
    coordinator.engine.max_checkpoint_bytes = CAP
    state = _state(coordinator)
    floats = (CAP - 4096) // 4  # each bundle just under the cap
    partials: list[str] = []
    made_up: list[str] = []
    with _DiskSampler(state) as sampler:
        for attempt in range(12):
            data = _bundle(site, task, floats, float(attempt))
            # Cut short: the header declares the full size; a partial stays to be resumed...
            partials.append(_outcome(_upload(site, task, data[: len(data) // 2],
                                             declared=len(data))))  # fmt: skip
            # ...and complete bundles under made-up digests.
            made_up.append(_outcome(_upload(site, task, data, sha=f"{attempt:064x}")))
        # Many streams at once for the same hop, each stalling once its data is sent.
        stall = threading.Event()
        futures = [
            _upload(site, task, _bundle(site, task, floats, 100.0 + n), stop=stall)
            for n in range(8)
        ]
        # Every stream but the one held is refused while that one still stalls.
        _until(lambda: sum(f.done() for f in futures) >= len(futures) - 1)
        stall.set()
        concurrent = sorted(_outcome(f) for f in futures)
        # Valid bundles, one after another, once one is held.
        more = [_outcome(_upload(site, task, _bundle(site, task, floats, 200.0 + n)))
                for n in range(6)]  # fmt: skip
    assert sampler.peak <= 2 * CAP, f"peak {sampler.peak} bytes on disk, cap {CAP}"
    assert all("upload ended after" in o for o in partials), partials
    assert all("hash mismatch" in o for o in made_up), made_up
    assert concurrent[0] == "OK"
    assert all(o.startswith("RESOURCE_EXHAUSTED: another upload for hop") for o in concurrent[1:])
    assert all("already holds uploaded output" in o for o in more), more
    # What stays: the one accepted bundle, no partial upload.
    assert not list((state / "uploads").glob("*"))
    assert len(list(coordinator.engine.store.stored())) == 1


def _cut_upload(site: ScriptedSite, task: pb.HopTask, data: bytes, state: Path) -> None:
    """A site killed mid-upload: half the bundle arrives, then the stream is cut."""
    stall = threading.Event()
    future = _upload(site, task, data[: len(data) // 2], declared=len(data),
                     sha=sha256_hex(data), stop=stall)  # fmt: skip
    _spooled(state, len(data) // 2)
    future.cancel()
    stall.set()


def _until(predicate: Callable[[], bool], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition never held"
        time.sleep(0.05)


def test_partial_upload_of_a_killed_site_is_removed_once_its_lease_expires(
    sites: dict[str, ScriptedSite], admin: AdminClient, coordinator: Coordinator,
    engine_clock: EngineClock,
) -> None:  # fmt: skip
    site = sites["site-a"]
    task = _start(admin, site, lease_timeout_seconds=60, max_retries=1)
    uploads = _state(coordinator) / "uploads"
    _cut_upload(site, task, _bundle(site, task, SPOOLED, 1.0), uploads.parent)
    assert [p.stat().st_size for p in uploads.iterdir()] == [len(_bundle(site, task, SPOOLED, 1.0))
                                                            // 2]  # fmt: skip
    engine_clock.advance(61)  # no heartbeat: the lease expires, the hop is leased again
    retried = site.next_task()
    assert retried.hop_id == task.hop_id and retried.lease_token != task.lease_token
    assert not list(uploads.iterdir())


@pytest.mark.parametrize("ending", ["commit", "fail"])
def test_every_spool_file_and_unused_upload_goes_when_the_hop_ends(
    sites: dict[str, ScriptedSite], admin: AdminClient, coordinator: Coordinator, ending: str
) -> None:
    site = sites["site-a"]
    task = _start(admin, site, on_failure="abort")
    state = _state(coordinator)
    data = _bundle(site, task, SPOOLED, 1.0)
    ref = site.upload(task, data)
    _cut_upload(site, task, data, state)  # the same bytes again, cut: a resumable partial
    assert list((state / "uploads").glob("*"))
    if ending == "commit":
        assert site.report(task, ref) == "committed"
        assert [sha for sha, _, _ in coordinator.engine.store.stored()] == [ref.sha256]
    else:
        result = pb.HopResult(hop_id=task.hop_id, lease_token=task.lease_token, ok=False,
                              error_code="training-failed", error_message="boom")  # fmt: skip
        assert site.stub.ReportHopResult(result, timeout=30).hop_status == "failed"
        assert not list(coordinator.engine.store.stored())
        assert coordinator.engine.ledger.checkpoint(ref.sha256).status == "superseded"
    assert not list((state / "uploads").glob("*"))


def test_checkpoint_of_a_retried_hop_is_marked_superseded_and_its_bytes_freed(
    sites: dict[str, ScriptedSite], admin: AdminClient, coordinator: Coordinator
) -> None:
    site = sites["site-a"]
    task = _start(admin, site, on_failure="retry", max_retries=1)
    ledger = coordinator.engine.ledger
    first = site.upload(task, site.bundle(task, 1.0))
    result = pb.HopResult(hop_id=task.hop_id, lease_token=task.lease_token, ok=False,
                          error_code="training-failed", error_message="boom")  # fmt: skip
    assert site.stub.ReportHopResult(result, timeout=30).hop_status == "pending"
    assert ledger.checkpoint(first.sha256).status == "superseded"
    [event] = [e for e in ledger.events() if e.kind == "checkpoint.superseded"]
    assert event.payload["sha256"] == first.sha256 and "retried" in event.payload["reason"]
    assert first.sha256 not in coordinator.engine.store
    redo = site.next_task()
    with pytest.raises(grpc.RpcError) as refused:  # a superseded upload is never committed
        site.report(redo, first)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    second = site.upload(redo, site.bundle(redo, 2.0))
    assert site.report(redo, second) == "committed"
    assert ledger.checkpoint(second.sha256).status == "stored"
    assert ledger.verify_chain() is None


def test_upload_in_flight_when_its_run_is_aborted_is_refused_and_nothing_is_kept(
    sites: dict[str, ScriptedSite], admin: AdminClient, coordinator: Coordinator
) -> None:
    site = sites["site-a"]
    task = _start(admin, site)
    stall = threading.Event()
    data = _bundle(site, task, SPOOLED, 1.0)
    future = _upload(site, task, data, stop=stall)  # all bytes sent, the stream still open
    header = pb.UploadHeader(hop_id=task.hop_id, lease_token=task.lease_token,
                             sha256=sha256_hex(data))  # fmt: skip
    _until(lambda: site.stub.UploadStatus(header, timeout=30).received == len(data))
    assert admin.control(task.run_id, "abort", "stop").status == "aborted"
    stall.set()
    assert _outcome(future) == f"NOT_FOUND: no active hop {task.hop_id}"
    assert not list((_state(coordinator) / "uploads").glob("*"))
    assert not list(coordinator.engine.store.stored())
    assert coordinator.engine.ledger.checkpoints(task.run_id) == []


def test_watchdog_removes_spool_files_of_ended_hops_and_older_leases(
    sites: dict[str, ScriptedSite], admin: AdminClient, coordinator: Coordinator
) -> None:
    site = sites["site-a"]
    task = _start(admin, site)
    uploads = _state(coordinator) / "uploads"
    data = _bundle(site, task, SPOOLED, 1.0)
    _cut_upload(site, task, data, uploads.parent)  # the live lease's partial: kept to be resumed
    [current] = list(uploads.iterdir())
    # Left by a crash: an older lease of this hop, and a hop that no longer holds a lease.
    older = uploads / f"{task.hop_id}.{'0' * 16}.{'1' * 64}.part"
    ended = uploads / f"{'f' * 32}.{'0' * 16}.{'2' * 64}.part"
    legacy = uploads / f"{task.hop_id}.{'3' * 64}.part"  # named as before leases keyed it
    for leftover in (older, ended, legacy):
        leftover.write_bytes(b"x" * 1000)
    _until(lambda: not any(p.exists() for p in (older, ended, legacy)))
    assert current.exists()


def _spooled(state: Path, size: int, timeout: float = 60) -> Path:
    """The spool file once all `size` bytes of the upload are in it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for path in (state / "uploads").glob("*.part"):
            with contextlib.suppress(FileNotFoundError):
                if path.stat().st_size == size:
                    return path
        time.sleep(0.005)
    raise AssertionError("the upload never reached the spool")


def test_stored_bundle_is_the_spool_file_renamed_not_written_again(
    sites: dict[str, ScriptedSite], admin: AdminClient, coordinator: Coordinator
) -> None:
    site = sites["site-a"]
    task = _start(admin, site)
    state = _state(coordinator)
    data = _bundle(site, task, 3 * CHUNK_BYTES // 4, 0.5)  # a few chunks
    stop = threading.Event()
    future = _upload(site, task, data, stop=stop)
    spooled = _spooled(state, len(data)).stat()
    stop.set()
    assert _outcome(future) == "OK"
    stored = coordinator.engine.store.path(sha256_hex(data)).stat()
    assert (stored.st_ino, stored.st_dev) == (spooled.st_ino, spooled.st_dev)
    assert stored.st_mode & 0o777 == 0o444
    assert not list((state / "uploads").glob("*"))


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
        ("over-cap", f"INVALID_ARGUMENT: checkpoint of {CAP + 8} bytes exceeds the {CAP}-byte cap"),
        ("hash", "INVALID_ARGUMENT: checkpoint hash mismatch: expected " + "00" * 32),
    ],
)
def test_bad_bundle_streamed_to_the_coordinator_is_refused_and_nothing_is_kept(
    sites: dict[str, ScriptedSite],
    admin: AdminClient,
    coordinator: Coordinator,
    case: str,
    refusal: str,
) -> None:
    site = sites["site-a"]
    task = _start(admin, site)
    state = _state(coordinator)
    coordinator.engine.max_checkpoint_bytes = CAP if case == "over-cap" else 8 * CHUNK_BYTES
    good = _bundle(site, task, 1024, 0.5)
    data, sha = {
        "nan": (_nan_bundle(site, task), None),
        "corrupt": (b"\xff" * 8 + good[8:], None),
        "over-cap": (b"\x00" * (CAP + 8), None),
        "hash": (good, "00" * 32),
    }[case]
    assert _outcome(_upload(site, task, data, sha=sha)).startswith(refusal)
    assert not list(coordinator.engine.store.stored())
    assert not list((state / "uploads").glob("*"))
    assert coordinator.engine.ledger.checkpoints(task.run_id) == []
    # The lease still holds: a good bundle is accepted afterwards.
    assert _outcome(_upload(site, task, good)) == "OK"


@pytest.mark.parametrize("floats", [1000, SPOOLED], ids=["whole", "spooled"])
def test_bundle_stored_as_its_stream_is_cut_keeps_its_checkpoint_row(
    sites: dict[str, ScriptedSite], admin: AdminClient, coordinator: Coordinator,
    monkeypatch: pytest.MonkeyPatch, floats: int,
) -> None:  # fmt: skip
    site = sites["site-a"]
    task = _start(admin, site)
    data = _bundle(site, task, floats, 0.5)
    store = coordinator.engine.intake.store
    storing, release = threading.Event(), threading.Event()

    def slowly(write: Callable[..., object]) -> Callable[..., object]:
        def slow(*args: object, **kwargs: object) -> object:
            storing.set()
            release.wait(60)
            return write(*args, **kwargs)

        return slow

    monkeypatch.setattr(store, "place", slowly(store.place))
    monkeypatch.setattr(store, "adopt", slowly(store.adopt))
    future = _upload(site, task, data)
    assert storing.wait(60)
    future.cancel()  # the site goes away while the checked bundle is written into the store
    time.sleep(0.3)  # the handler's cancellation arrives (the unfixed one returns at once)
    release.set()
    ledger = coordinator.engine.ledger
    _until(lambda: bool(ledger.checkpoints(task.run_id)), timeout=30)
    assert [row.sha256 for row in ledger.checkpoints(task.run_id)] == [sha256_hex(data)]
    assert store.path(sha256_hex(data)).read_bytes() == data
    assert not list((_state(coordinator) / "uploads").glob("*.part"))


def test_upload_spool_files_are_claimed_and_freed_off_the_event_loop(
    sites: dict[str, ScriptedSite], admin: AdminClient, coordinator: Coordinator,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    import asyncio

    site = sites["site-a"]
    task = _start(admin, site)
    spool = coordinator.engine.intake.spool
    on_loop: dict[str, bool] = {}

    def recording(name: str, call: Callable[..., object]) -> Callable[..., object]:
        def record(*args: object) -> object:
            on_loop[name] = on_loop.get(name, False) or asyncio._get_running_loop() is not None
            return call(*args)

        return record

    monkeypatch.setattr(spool, "claim", recording("claim", spool.claim))
    monkeypatch.setattr(spool, "discard", recording("discard", spool.discard))
    assert _outcome(_upload(site, task, _bundle(site, task, SPOOLED, 0.5))) == "OK"
    assert on_loop == {"claim": False, "discard": False}
