"""What a hand back does side by side before its commit: the bundle written beside the store
while it is checked, and the run's tamper check on the ledger writer's thread meanwhile; none
of it lets a refused bundle into the store or a tampered run lease its next hop."""

from __future__ import annotations

import asyncio
import errno
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import event

from coordinator.console.admin import AdminClient
from coordinator.engine import hops as hops_module
from coordinator.ledger import Ledger, RunRow
from coordinator.plan import parse_plan
from coordinator.server import Coordinator
from coordinator.store import CheckpointStore
from protocols.checkpoint import sha256_hex
from protocols.v1 import baton_pb2 as pb
from tests.coordinator_tests.conftest import ScriptedSite
from tests.coordinator_tests.test_hand_back import (
    _bundle,
    _bundle_of,
    _files,
    _hand_back,
    _header,
    _result,
    _state,
    _stored,
    _stored_and_committed,
    site,
    task,
)
from tests.coordinator_tests.test_ledger_integrity import _paused, _sql

__all__ = ["site", "task"]  # fixtures

WAIT = 10.0


def _entering(event: threading.Event, call: Callable[..., object]) -> Callable[..., object]:
    def entered(*args: object, **kwargs: object) -> object:
        event.set()
        return call(*args, **kwargs)

    return entered


def _waiting_for(
    event: threading.Event, seen: list[bool], call: Callable[..., object]
) -> Callable[..., object]:
    """`call`, once `event` is set (or WAIT seconds passed); `seen` notes which it was."""

    def waited(*args: object, **kwargs: object) -> object:
        seen.append(event.wait(WAIT))
        return call(*args, **kwargs)

    return waited


def test_a_staged_bundle_is_stored_only_once_placed(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "store")
    data = b"adapter bytes"
    sha = sha256_hex(data)
    staged = store.stage(data, sha)
    assert staged is not None and staged.read_bytes() == data
    assert sha not in store and list(store.stored()) == []  # not stored under its name yet
    store.place(staged, sha)
    assert store.read(sha) == data and not staged.exists()
    assert store.stage(data, sha) is None  # content-addressed: stored already
    store.place(None, sha)


def test_a_staged_bundle_is_dropped_or_refused_under_another_name(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "store")
    data, other = b"refused bytes", sha256_hex(b"other bytes")
    staged = store.stage(data, sha256_hex(data))
    assert staged is not None
    with pytest.raises(ValueError, match="was not staged for checkpoint"):
        store.place(staged, other)
    store.unstage(staged)
    assert not staged.exists() and _files(tmp_path / "store") == []
    store.unstage(None)


class _DiskSteps:
    """Records, in order, the fsyncs and renames of files under `root` (once each is done) and,
    with `ledger`, the COMMIT of the transaction that commits a hop (as it starts): each step
    as (what, file or directory name, thread name)."""

    def __init__(
        self, root: Path, monkeypatch: pytest.MonkeyPatch, ledger: Ledger | None = None
    ) -> None:
        self.steps: list[tuple[str, str, str]] = []
        self._listened: tuple[object, Callable[[object], None]] | None = None
        self.fail_fsync_of: Callable[[Path], bool] = lambda _path: False
        real_fsync, real_replace = os.fsync, os.replace

        def fsync(fd: int) -> None:
            path = Path(os.readlink(f"/proc/self/fd/{fd}"))
            if path.is_relative_to(root) and self.fail_fsync_of(path):
                raise OSError(errno.EIO, "Input/output error")
            real_fsync(fd)
            if path.is_relative_to(root):
                self.note("fsync", path.name)

        def replace(source: str | Path, target: str | Path) -> None:
            real_replace(source, target)
            if Path(target).is_relative_to(root):
                self.note("rename", f"{Path(source).name} -> {Path(target).name}")

        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(os, "replace", replace)
        if ledger is not None:
            committing = threading.Event()
            real_commit_hop = ledger.commit_hop

            def commit_hop(hop_id: str, **fields: object) -> object:
                committing.set()
                return real_commit_hop(hop_id, **fields)  # type: ignore[arg-type]

            def commit(_connection: object) -> None:
                if committing.is_set() and threading.current_thread().name.startswith("ledger"):
                    committing.clear()
                    self.note("COMMIT", "hop")

            monkeypatch.setattr(ledger, "commit_hop", commit_hop)
            event.listen(ledger.engine, "commit", commit)
            self._listened = (ledger.engine, commit)

    def note(self, what: str, name: str) -> None:
        self.steps.append((what, name, threading.current_thread().name))

    def without_threads(self) -> list[tuple[str, str]]:
        return [(what, name) for what, name, _ in self.steps]

    def stop(self) -> None:
        if self._listened is not None:
            event.remove(self._listened[0], "commit", self._listened[1])


def test_a_staged_bundle_is_not_fsynced_and_a_crash_before_it_is_placed_leaves_no_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "store"
    store = CheckpointStore(root)
    disk = _DiskSteps(root, monkeypatch)
    data = b"adapter bytes"
    sha = sha256_hex(data)
    staged = store.stage(data, sha)
    assert staged is not None and disk.steps == []  # written only: its fsync is `place`'s
    # A crash now (before `place`): a restarted store holds no name for the bytes, so it does
    # not trust them; it stages them anew, and the start-up sweep removes the leftovers.
    restarted = CheckpointStore(root)
    assert sha not in restarted and list(restarted.stored()) == []
    again = restarted.stage(data, sha)
    assert again is not None and again != staged
    assert restarted.sweep_temporary(time.time() + 1) == (2, 2 * len(data))
    assert _files(root) == []


def _staged_and_watched(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[CheckpointStore, Path, str, _DiskSteps]:
    """A store holding one staged bundle: the store, the staged file, its sha256, and its
    disk steps recorded from now on."""
    root = tmp_path / "store"
    store = CheckpointStore(root)
    data = b"adapter bytes"
    sha = sha256_hex(data)
    staged = store.stage(data, sha)
    assert staged is not None
    return store, staged, sha, _DiskSteps(root, monkeypatch)


def test_a_staged_bundle_is_fsynced_before_it_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store, staged, sha, disk = _staged_and_watched(tmp_path, monkeypatch)
    store.place(staged, sha)
    bytes_first, then_the_name = ("fsync", staged.name), ("fsync", sha[:2])
    assert disk.without_threads() == [
        bytes_first,
        ("rename", f"{staged.name} -> {sha}"),
        then_the_name,
    ]
    assert store.read(sha) == b"adapter bytes"


def test_a_staged_bundle_whose_fsync_fails_is_dropped_not_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store, staged, sha, disk = _staged_and_watched(tmp_path, monkeypatch)
    disk.fail_fsync_of = lambda path: path == staged
    with pytest.raises(OSError, match="Input/output error"):
        store.place(staged, sha)
    # Not named (a later fsync could pass on lost bytes: the file is gone, not retried).
    assert sha not in store and _files(store.root) == [] and disk.steps == []


def test_a_bundle_in_one_message_is_written_while_it_is_checked(
    site: ScriptedSite, task: pb.HopTask, coordinator: Coordinator, monkeypatch: pytest.MonkeyPatch
) -> None:
    intake = coordinator.engine.intake
    staging, seen = threading.Event(), list[bool]()
    monkeypatch.setattr(intake.store, "stage", _entering(staging, intake.store.stage))
    monkeypatch.setattr(
        intake, "_inspected_bytes", _waiting_for(staging, seen, intake._inspected_bytes)
    )
    data = _bundle(site, task, 75_000)
    assert _hand_back(site, task, data, whole=True) == "committed"
    assert seen == [True]  # the write had begun before the check was over
    assert _stored(coordinator) == [sha256_hex(data)]  # no temporary file left beside it
    assert _stored_and_committed(coordinator, task) == (1, 1)


def test_a_bundle_refused_while_it_was_written_leaves_nothing_in_the_store(
    site: ScriptedSite, task: pb.HopTask, coordinator: Coordinator, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = coordinator.engine.intake.store
    staged = threading.Event()

    def stage_noting(data: bytes, sha256: str) -> Path | None:
        path = CheckpointStore.stage(store, data, sha256)
        staged.set()
        return path

    monkeypatch.setattr(store, "stage", stage_noting)
    good = _bundle(site, task, 4096)
    tampered = _bundle(site, task, 4096, 2.0)
    # Named and signed for another digest than its bytes': refused while it is written.
    refused = _hand_back(site, task, tampered, whole=True,
                         header=_header_for(site, task, tampered, sha256_hex(good)))  # fmt: skip
    assert refused.startswith("INVALID_ARGUMENT: checkpoint hash mismatch"), refused
    assert staged.wait(WAIT)
    assert _stored(coordinator) == []
    assert list(Path(_state(coordinator) / "checkpoints").rglob("*.tmp")) == []
    assert _hand_back(site, task, good, whole=True) == "committed"
    assert _stored(coordinator) == [sha256_hex(good)]


def _header_for(site: ScriptedSite, task: pb.HopTask, data: bytes, sha256: str) -> pb.UploadHeader:
    from protocols.signing import sign_digest

    return pb.UploadHeader(hop_id=task.hop_id, lease_token=task.lease_token,
                           total_size=len(data), sha256=sha256,
                           signature=sign_digest(site.key_pem, sha256))  # fmt: skip


def test_the_run_is_checked_against_its_events_while_the_bundle_is_checked(
    site: ScriptedSite, task: pb.HopTask, coordinator: Coordinator, monkeypatch: pytest.MonkeyPatch
) -> None:
    hops, store = coordinator.engine.hops, coordinator.engine.intake.store
    checking, seen, checks = threading.Event(), list[bool](), list[str]()

    def mismatches(run: RunRow, checkpoint_sha: str | None) -> object:
        checks.append(threading.current_thread().name)
        checking.set()
        return real(run, checkpoint_sha)

    real = hops._mismatches
    monkeypatch.setattr(hops, "_mismatches", mismatches)
    monkeypatch.setattr(store, "place", _waiting_for(checking, seen, store.place))
    data = _bundle(site, task, 75_000)
    assert _hand_back(site, task, data, whole=True) == "committed"
    assert seen == [True]  # checked before the bundle was in the store, not after
    assert len(checks) == 1 and checks[0].startswith("ledger-writer")  # once, off the loop
    hop = coordinator.engine.ledger.hop(task.hop_id)
    assert hop is not None and hop.status == "committed"


def test_a_hop_edited_before_a_hand_back_pauses_the_run_instead_of_leasing_the_next(
    sites: dict[str, ScriptedSite], admin: AdminClient, coordinator: Coordinator
) -> None:
    admin.wait_for_sites({"site-a", "site-b"}, timeout=60)
    run_id = admin.start_run(parse_plan({
        "name": "t", "dataset": "notes", "labels": ["x", "y"], "sites": ["site-a", "site-b"],
        "cycles": 2,
    }))  # fmt: skip
    first = sites["site-a"].next_task()
    assert _hand_back(sites["site-a"], first, _bundle(sites["site-a"], first, 64), whole=True) == (
        "committed"
    )
    ledger = coordinator.engine.ledger
    _sql(ledger, "UPDATE hops SET metrics = '{\"accuracy\": 0.99}' WHERE id = :hop",
         hop=first.hop_id)  # fmt: skip
    second = sites["site-b"].next_task()  # leased with the first hop's commit
    data = _bundle(sites["site-b"], second, 64)
    assert _hand_back(sites["site-b"], second, data, whole=True) == "committed"
    status = _paused(admin, run_id)
    assert status.error.startswith(
        f"ledger mismatch: hops row {first.hop_id} column metrics: ledger event #"
    )
    assert [h.status for h in status.hops] == ["committed", "committed", "pending", "pending"]
    assert sites["site-a"].tasks.empty()


def test_the_next_hops_lineage_check_reads_its_input_as_it_was_stored(
    sites: dict[str, ScriptedSite], site: ScriptedSite, task: pb.HopTask,
    coordinator: Coordinator, monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    first = _bundle(site, task, 64)
    assert _hand_back(site, task, first, whole=True) == "committed"
    ledger = coordinator.engine.ledger
    looked_up: list[str] = []

    def checkpoint(sha256: str) -> object:
        looked_up.append(sha256)
        return real(sha256)

    real = ledger.checkpoint
    monkeypatch.setattr(ledger, "checkpoint", checkpoint)
    site_b = sites["site-b"]
    second = site_b.next_task()
    reshaped = _bundle_of(site_b, second, np.ones((8, 8), np.float32), {"r": 4})
    refused = _hand_back(site_b, second, reshaped, whole=True)
    assert refused.startswith("INVALID_ARGUMENT: checkpoint tensors (names, dtypes, shapes) "
                              "differ from the hop's input"), refused  # fmt: skip
    good = _bundle(site_b, second, 64, 2.0)
    assert _hand_back(site_b, second, good, whole=True) == "committed"
    assert sha256_hex(first) not in looked_up  # held as it was stored, not queried


@pytest.mark.parametrize("stale_by", ["age", "event"])
def test_an_early_check_gone_stale_is_made_again_before_the_next_lease(
    site: ScriptedSite, task: pb.HopTask, admin: AdminClient, coordinator: Coordinator,
    monkeypatch: pytest.MonkeyPatch, stale_by: str,
) -> None:  # fmt: skip
    """A row edited after the early check, before the commit: found by the commit's own check
    when the early one is older than CHECK_AHEAD_SECONDS (a bundle streamed for long) or an
    event was appended since it read the rows."""
    hops, store, ledger = (
        coordinator.engine.hops,
        coordinator.engine.intake.store,
        coordinator.engine.ledger,
    )
    hop = ledger.hop(task.hop_id)
    assert hop is not None
    following = ledger.run(hop.run_id).hops[1].id
    checked = threading.Event()

    def early_check(run: RunRow) -> object:
        try:
            return real_check(run)
        finally:
            checked.set()

    def edited_then_staged(data: bytes, sha256: str) -> Path | None:
        # While the bundle is written (awaited before the commit; its placing in the store
        # runs beside the commit's SQL, too late to edit before the commit's check).
        assert checked.wait(WAIT)  # the early check has read the rows
        _sql(ledger, "UPDATE hops SET hyperparameters = :value WHERE id = :hop",
             value='{"learning_rate": 0.5}', hop=following)  # fmt: skip
        if stale_by == "event":
            ledger.record_event("test.marker")
        return real_stage(data, sha256)

    real_check, real_stage = hops._early_check, store.stage
    monkeypatch.setattr(hops, "_early_check", early_check)
    monkeypatch.setattr(store, "stage", edited_then_staged)
    if stale_by == "age":
        monkeypatch.setattr(hops_module, "CHECK_AHEAD_SECONDS", -1.0)
    assert _hand_back(site, task, _bundle(site, task, 64), whole=True) == "committed"
    status = _paused(admin, hop.run_id)
    assert f"hops row {following} column hyperparameters" in status.error
    assert [h.status for h in status.hops] == ["committed", "pending"]


@pytest.mark.parametrize("current", [True, False], ids=["current", "stale"])
def test_a_hand_backs_tamper_check_starts_when_its_last_step_begins(
    site: ScriptedSite, task: pb.HopTask, coordinator: Coordinator,
    monkeypatch: pytest.MonkeyPatch, current: bool,
) -> None:  # fmt: skip
    """A beat during a hop's last step (step total - 1 done) starts the run's tamper check for
    its hand back; the hand back uses it while it is current, and checks again as it arrives
    if not."""
    hops = coordinator.engine.hops
    checks: list[str] = []
    real_check = hops._early_check

    def early_check(run: RunRow) -> object:
        checks.append(run.id)
        return real_check(run)

    monkeypatch.setattr(hops, "_early_check", early_check)
    if not current:
        monkeypatch.setattr(hops_module, "CHECK_AHEAD_SECONDS", -1.0)

    def beat(step: int) -> None:
        site.stub.SendHeartbeat(pb.Heartbeat(
            hop_id=task.hop_id, lease_token=task.lease_token, phase="training", step=step,
            total_steps=10,
        ), timeout=WAIT)  # fmt: skip

    beat(1)  # the hop trains
    beat(5)
    assert checks == []
    beat(9)  # during its last step
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline and not (
        task.hop_id in hops._last_step_checks and hops._last_step_checks[task.hop_id].done()
    ):
        time.sleep(0.01)
    beat(9)  # a beat again (a regular one) starts no second check
    assert len(checks) == 1
    assert _hand_back(site, task, _bundle(site, task, 64), whole=True) == "committed"
    assert len(checks) == (1 if current else 2)
    assert hops._last_step_checks == {}


# A bundle of one message (placed from its staged file) and a streamed one (its spool file
# renamed into the store): the name's fsync is the commit's in both.
_SIZES = pytest.mark.parametrize(("whole", "floats"), [(True, 4096), (False, 1024 * 1024)],
                                 ids=["one message", "streamed"])  # fmt: skip


@_SIZES
def test_the_bundles_name_is_made_durable_beside_the_commit_and_before_it(
    site: ScriptedSite,
    task: pb.HopTask,
    coordinator: Coordinator,
    monkeypatch: pytest.MonkeyPatch,
    whole: bool,
    floats: int,
) -> None:
    # The directory fsync that makes the stored bundle's name durable runs on its own thread
    # while the commit's statements run on the ledger writer's; the COMMIT waits for it.
    engine = coordinator.engine
    store, ledger = engine.intake.store, engine.ledger
    in_commit, synced, overlapped = threading.Event(), threading.Event(), list[bool]()
    original_sync, original_commit = store.sync_name, ledger.commit_hop

    def sync_name(sha256: str) -> None:
        overlapped.append(in_commit.wait(WAIT))  # the commit's statements have begun
        original_sync(sha256)
        synced.set()

    def commit_hop(hop_id: str, **fields: object) -> object:
        in_commit.set()
        return original_commit(hop_id, **fields)  # type: ignore[arg-type]

    monkeypatch.setattr(store, "sync_name", sync_name)
    monkeypatch.setattr(ledger, "commit_hop", commit_hop)
    committed_before_synced: list[bool] = []

    def observe(_seq: int, _hash: str, kinds: tuple[str, ...]) -> None:
        if "hop.committed" in kinds:
            committed_before_synced.append(not synced.is_set())

    ledger.head_observers.append(observe)
    data = _bundle(site, task, floats)
    assert _hand_back(site, task, data, whole=whole) == "committed"
    assert overlapped == [True] and committed_before_synced == [False]
    assert _stored(coordinator) == [sha256_hex(data)]
    assert _stored_and_committed(coordinator, task) == (1, 1)


@_SIZES
def test_a_bundle_whose_name_cannot_be_made_durable_is_not_committed(
    site: ScriptedSite,
    task: pb.HopTask,
    coordinator: Coordinator,
    monkeypatch: pytest.MonkeyPatch,
    whole: bool,
    floats: int,
) -> None:
    store = coordinator.engine.intake.store
    calls: list[str] = []

    def failing_sync(sha256: str) -> None:
        calls.append(sha256)
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(store, "sync_name", failing_sync)
    data = _bundle(site, task, floats)
    refused = _hand_back(site, task, data, whole=whole)
    assert refused.startswith("UNAVAILABLE"), refused  # a storage fault: the site retries
    assert len(calls) >= 2  # tried beside the commit, then once more before giving up
    assert _stored_and_committed(coordinator, task) == (0, 0)
    assert coordinator.engine.ledger.checkpoint(sha256_hex(data)) is None
    monkeypatch.undo()  # the disk is back: the same hand back commits
    assert _hand_back(site, task, data, whole=whole) == "committed"
    assert _stored_and_committed(coordinator, task) == (1, 1)


def test_a_committed_hops_clean_up_does_not_hold_back_its_answer(
    site: ScriptedSite, task: pb.HopTask, coordinator: Coordinator, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = coordinator.engine
    release, answered = threading.Event(), list[bool]()
    original = engine.ledger.supersede_checkpoints

    def supersede_checkpoints(hop_id: str, reason: str) -> object:
        answered.append(release.wait(WAIT))  # set once the site has its answer
        return original(hop_id, reason)

    monkeypatch.setattr(engine.ledger, "supersede_checkpoints", supersede_checkpoints)
    data = _bundle(site, task, 4096)
    # Uploaded on its own first (recorded alone): the hop's commit then looks for other uploads.
    site.upload(task, data)
    assert _hand_back(site, task, data, whole=True) == "committed"
    release.set()
    loop = engine.writer.loop
    assert loop is not None
    asyncio.run_coroutine_threadsafe(engine.quiesce(), loop).result(WAIT)
    assert answered == [True]


def test_a_hand_backs_bundle_is_fsynced_after_its_checks_beside_the_commit_and_before_it(
    site: ScriptedSite, task: pb.HopTask, coordinator: Coordinator, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Staged (written) while it is checked; once the checks hold, on a store-sync thread while
    # the commit's statements run: its bytes fsynced, renamed into the store, the directory
    # fsynced; only then the COMMIT that names it.
    intake = coordinator.engine.intake
    disk = _DiskSteps(_state(coordinator) / "checkpoints", monkeypatch, coordinator.engine.ledger)
    real_checked = intake._checked_upload

    def checked_upload(*args: object) -> object:
        bundle = real_checked(*args)  # type: ignore[arg-type]
        disk.note("checked", "")
        return bundle

    monkeypatch.setattr(intake, "_checked_upload", checked_upload)
    data = _bundle(site, task, 4096)
    sha = sha256_hex(data)
    try:
        assert _hand_back(site, task, data, whole=True) == "committed"
    finally:
        disk.stop()
    staged = next(name for what, name, _ in disk.steps if what == "fsync" and name != sha[:2])
    assert staged.startswith(f".{sha}.") and staged.endswith(".tmp")
    assert disk.without_threads() == [
        ("checked", ""),
        ("fsync", staged),
        ("rename", f"{staged} -> {sha}"),
        ("fsync", sha[:2]),
        ("COMMIT", "hop"),
    ]
    threads = [thread for what, _, thread in disk.steps if what in ("fsync", "rename")]
    assert all(thread.startswith("store-sync") for thread in threads), threads
    assert _stored(coordinator) == [sha]
    assert _stored_and_committed(coordinator, task) == (1, 1)


def test_a_refused_bundle_costs_no_fsync(
    site: ScriptedSite, task: pb.HopTask, coordinator: Coordinator, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = _state(coordinator) / "checkpoints"
    disk = _DiskSteps(root, monkeypatch)
    good, tampered = _bundle(site, task, 4096), _bundle(site, task, 4096, 2.0)
    refused = _hand_back(site, task, tampered, whole=True,
                         header=_header_for(site, task, tampered, sha256_hex(good)))  # fmt: skip
    assert refused.startswith("INVALID_ARGUMENT: checkpoint hash mismatch"), refused
    assert disk.steps == [] and _files(root) == []


def test_a_hand_back_whose_bytes_cannot_be_fsynced_is_not_committed_and_leaves_no_name(
    site: ScriptedSite, task: pb.HopTask, coordinator: Coordinator, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = _state(coordinator) / "checkpoints"
    disk = _DiskSteps(root, monkeypatch)
    disk.fail_fsync_of = lambda path: path.name.endswith(".tmp")
    data = _bundle(site, task, 4096)
    refused = _hand_back(site, task, data, whole=True)
    assert refused.startswith("UNAVAILABLE"), refused  # a storage fault: the site retries
    assert _files(root) == []  # neither named nor left beside the store
    assert _stored_and_committed(coordinator, task) == (0, 0)
    assert coordinator.engine.ledger.checkpoint(sha256_hex(data)) is None
    disk.fail_fsync_of = lambda _path: False  # the disk is back: the same hand back commits
    assert _hand_back(site, task, data, whole=True) == "committed"
    assert _stored(coordinator) == [sha256_hex(data)]
    assert _stored_and_committed(coordinator, task) == (1, 1)


def test_a_name_the_store_held_already_is_fsynced_before_the_commit_that_refers_to_it(
    site: ScriptedSite, task: pb.HopTask, coordinator: Coordinator, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A coordinator killed between a rename and its directory's fsync leaves the name (its bytes
    # fsynced), maybe not durable: the hand back that finds it fsyncs it before its COMMIT.
    store = coordinator.engine.intake.store
    data = _bundle(site, task, 4096)
    sha = sha256_hex(data)
    staged = store.stage(data, sha)
    store.place(staged, sha, sync=False)
    disk = _DiskSteps(_state(coordinator) / "checkpoints", monkeypatch, coordinator.engine.ledger)
    try:
        assert _hand_back(site, task, data, whole=True) == "committed"
    finally:
        disk.stop()
    assert disk.without_threads() == [("fsync", sha[:2]), ("COMMIT", "hop")]
    assert _stored(coordinator) == [sha] and _stored_and_committed(coordinator, task) == (1, 1)


def _until(predicate: Callable[[], object], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition never held"
        time.sleep(0.02)


def _quiesced(coordinator: Coordinator) -> None:
    """Waits for the transition in flight and the committed hops' clean-ups."""
    loop = coordinator.engine.writer.loop
    assert loop is not None
    asyncio.run_coroutine_threadsafe(coordinator.engine.quiesce(), loop).result(WAIT)


@pytest.mark.parametrize("whole", [True, False], ids=["whole", "stream"])
def test_a_hand_back_that_found_no_other_upload_commits_without_a_clean_up_transaction(
    site: ScriptedSite,
    task: pb.HopTask,
    coordinator: Coordinator,
    monkeypatch: pytest.MonkeyPatch,
    whole: bool,
) -> None:
    ledger = coordinator.engine.ledger
    superseding: list[str] = []
    original = ledger.supersede_checkpoints

    def supersede_checkpoints(hop_id: str, reason: str) -> object:
        superseding.append(hop_id)
        return original(hop_id, reason)

    monkeypatch.setattr(ledger, "supersede_checkpoints", supersede_checkpoints)
    assert _hand_back(site, task, _bundle(site, task, 64), whole=whole) == "committed"
    _quiesced(coordinator)
    assert superseding == []  # the hop's one upload is its output: nothing to look for
    assert _stored_and_committed(coordinator, task) == (1, 1)
    assert ledger.verify().ok


def test_an_upload_recorded_after_a_hand_backs_receipt_is_superseded_by_its_commit(
    site: ScriptedSite, task: pb.HopTask, coordinator: Coordinator, monkeypatch: pytest.MonkeyPatch
) -> None:
    hops = coordinator.engine.hops
    entered, release = threading.Event(), threading.Event()
    next_to_lease = hops._next_to_lease

    async def held(*args: object, **kwargs: object) -> object:
        # The hand back's bundle is checked and on its way into the store; its commit waits.
        entered.set()
        await asyncio.to_thread(release.wait, WAIT)
        return await next_to_lease(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(hops, "_next_to_lease", held)
    data, other = _bundle(site, task, 64, 0.5), _bundle(site, task, 64, 0.25)
    call = site.stub.HandBackHopWhole.future(
        pb.HandBackWhole(header=_header(site, task, data), bundle=data, result=_result(task)),
        timeout=WAIT,
    )
    ledger = coordinator.engine.ledger
    try:
        assert entered.wait(WAIT), "the hand back never reached its commit"
        # A second upload under the same lease, recorded alone meanwhile (its answer waits
        # for the engine's lock, which the commit holds).
        upload = site.stub.UploadCheckpoint.future(_upload_messages(site, task, other),
                                                   timeout=WAIT)  # fmt: skip
        _until(lambda: ledger.checkpoint(sha256_hex(other)) is not None, WAIT)
    finally:
        release.set()
    assert call.result().hop_status == "committed"
    upload.result()
    _quiesced(coordinator)
    superseded = ledger.checkpoint(sha256_hex(other))
    assert superseded is not None and superseded.status == "superseded"
    assert _stored(coordinator) == [sha256_hex(data)]  # its bytes freed
    assert ledger.verify().ok


def _upload_messages(
    site: ScriptedSite, task: pb.HopTask, data: bytes
) -> Iterator[pb.UploadRequest]:
    yield pb.UploadRequest(header=_header(site, task, data))
    yield pb.UploadRequest(data=data)


def test_a_hand_backs_bundle_in_one_message_is_kept_on_the_event_loop(
    site: ScriptedSite, task: pb.HopTask, coordinator: Coordinator, monkeypatch: pytest.MonkeyPatch
) -> None:
    intake = coordinator.engine.intake
    on_loop: list[bool] = []
    remember = intake._remember_tensors

    def noted(sha256: str, tensors: list[list[object]]) -> None:
        on_loop.append(asyncio._get_running_loop() is not None)
        remember(sha256, tensors)

    monkeypatch.setattr(intake, "_remember_tensors", noted)
    data = _bundle(site, task, 64)
    assert _hand_back(site, task, data, whole=True) == "committed"
    assert on_loop == [True]  # no worker-thread round trip between its checks and its commit
    assert _stored(coordinator) == [sha256_hex(data)]
    assert _stored_and_committed(coordinator, task) == (1, 1)


def test_a_bundle_in_one_message_is_checked_on_the_loop_while_the_run_is_checked_on_the_writer(
    site: ScriptedSite, task: pb.HopTask, coordinator: Coordinator, monkeypatch: pytest.MonkeyPatch
) -> None:
    hops, intake = coordinator.engine.hops, coordinator.engine.intake
    checking, seen, on_loop = threading.Event(), list[bool](), list[bool]()
    real_mismatches, real_inspected = hops._mismatches, intake._inspected_bytes

    def mismatches(run: RunRow, checkpoint_sha: str | None) -> object:
        checking.set()
        return real_mismatches(run, checkpoint_sha)

    def inspected(data: bytes, expected_sha256: str) -> object:
        on_loop.append(asyncio._get_running_loop() is not None)
        # The loop is held here: the run's check must be on the writer's thread already,
        # handed over as the hand back arrived, not a turn of the loop later.
        seen.append(checking.wait(WAIT))
        return real_inspected(data, expected_sha256)

    monkeypatch.setattr(hops, "_mismatches", mismatches)
    monkeypatch.setattr(intake, "_inspected_bytes", inspected)
    data = _bundle(site, task, 75_000)
    assert _hand_back(site, task, data, whole=True) == "committed"
    assert on_loop == [True]  # no worker-thread round trip for a bundle of one message
    assert seen == [True]
    assert _stored_and_committed(coordinator, task) == (1, 1)
