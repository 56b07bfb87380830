"""A full disk under the coordinator stalls nothing: sites are told to retry, runs finish.

The coordinator's state directory (SQLite ledger, spool, store, exports) lives on a small tmpfs
that a ballast file fills; the sites are real gRPC clients.
"""

from __future__ import annotations

import errno
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import psycopg.errors
import pytest
import safetensors.numpy
from sqlalchemy import text
from sqlalchemy.exc import OperationalError
from typer.testing import CliRunner

from coordinator.console.admin import AdminClient
from coordinator.console.cli import app
from coordinator.errors import StorageFault
from coordinator.plan import parse_plan
from coordinator.server import Coordinator, build_server
from coordinator.storage_faults import StorageHealth, storage_fault_reason
from protocols.checkpoint import CheckpointManifest, bundle_metadata, sha256_hex
from protocols.v1 import baton_pb2 as pb
from tests.conftest import LoopThread, Pki
from tests.coordinator_tests.conftest import BASE, ScriptedSite, coordinator_settings
from tests.small_disk import Ballast, small_disk

FLOATS = 128 * 1024  # 512 KiB bundles: an export needs more than the room a commit needs


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[Path]:
    """A 24 MiB tmpfs for the coordinator's state directory."""
    with small_disk(tmp_path / "disk") as mount:
        yield mount


def _bundle(site: ScriptedSite, task: pb.HopTask) -> bytes:
    manifest = CheckpointManifest(task_type=task.task_type, base_model_sha256=BASE,
                                  run_id=task.run_id, hop_id=task.hop_id, producer_site=site.name,
                                  parent_sha256=task.input_checkpoint.sha256)  # fmt: skip
    return safetensors.numpy.save(
        {"lora_A": np.full((FLOATS,), task.hop_index + 1.0, np.float32)},
        metadata=bundle_metadata(manifest, {"r": 4}),
    )


def _until(predicate: Callable[[], object], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition never held"
        time.sleep(0.05)


def _unavailable(call: Callable[[], object]) -> str:
    with pytest.raises(grpc.RpcError) as refused:
        call()
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, refused.value.details()
    details = refused.value.details()
    assert details.startswith("coordinator storage full: ") and details.endswith("; retrying")
    return details


def _truncate_wal(coordinator: Coordinator) -> None:
    """Empties SQLite's write-ahead log: the next commit must grow it (and meets the full disk)."""
    with coordinator.engine.ledger.engine.connect() as connection:
        connection.execute(text("PRAGMA wal_checkpoint(TRUNCATE)"))


def test_full_disk_answers_retryable_and_the_run_completes_once_space_is_freed(
    pki: Pki, disk: Path, loop_thread: LoopThread
) -> None:
    settings = coordinator_settings(pki, disk / "state", heartbeat_interval_ms=200)
    coordinator = loop_thread.run(build_server(settings))
    a, b = (ScriptedSite(pki, name, coordinator.port) for name in ("site-a", "site-b"))
    admin = AdminClient(f"localhost:{coordinator.port}", pki.tls("admin"))
    ballast = Ballast(disk)
    ledger = coordinator.engine.ledger
    try:
        a.connect()
        b.connect()
        admin.wait_for_sites({"site-a", "site-b"}, timeout=60)
        run_id = admin.start_run(parse_plan({"name": "t", "dataset": "notes", "labels": ["x", "y"],
                                             "sites": ["site-a", "site-b"]}))  # fmt: skip
        first = a.next_task()
        data = _bundle(a, first)

        # An upload into a full disk: retryable, and the partial file is not kept.
        ballast.fill()
        assert "No space left on device" in _unavailable(lambda: a.upload(first, data))
        assert not list((settings.state_dir / "uploads").glob("*"))
        fault = admin.run(run_id).storage_fault
        assert fault.startswith("since ") and "coordinator storage full" in fault
        ballast.free()
        _until(lambda: not admin.run(run_id).storage_fault)  # recovered within seconds
        ref = a.upload(first, data)

        # A commit into a full disk: retryable; the site keeps its result and reports it again.
        _truncate_wal(coordinator)
        ballast.fill()
        assert "database or disk is full" in _unavailable(lambda: a.report(first, ref))
        assert admin.run(run_id).hops[0].status == "uploaded"
        ballast.free()
        _until(lambda: not admin.run(run_id).storage_fault)
        assert a.report(first, ref) == "committed"

        # The final export into a full disk: committed, and the run completes once space is back.
        second = b.next_task()
        final = b.upload(second, _bundle(b, second))
        ballast.fill(room=256 * 1024)
        assert b.report(second, final) == "committed"
        stalled = admin.run(run_id)
        assert stalled.status == "running" and stalled.storage_fault
        assert [h.status for h in stalled.hops] == ["committed", "committed"]
        admin_tls = pki.tls("admin")
        shown = CliRunner().invoke(app, [
            "run", "status", run_id, "--coordinator", f"localhost:{coordinator.port}",
            "--ca", str(admin_tls.ca_certificate), "--cert", str(admin_tls.certificate),
            "--key", str(admin_tls.private_key),
        ])  # fmt: skip
        assert shown.exit_code == 0, shown.output
        line = " ".join(shown.output.split())  # rich wraps at the terminal's width
        assert "storage fault since " in line
        assert "coordinator storage full: No space left on device (during export of run" in line
        ballast.free()
        _until(lambda: admin.run(run_id).status == "completed")
        _until(lambda: not admin.run(run_id).storage_fault)
    finally:
        ballast.free()
        admin.close()
        a.close()
        b.close()
        loop_thread.run(coordinator.stop(0))
    exported = settings.runs_dir / run_id / "final_adapter" / "adapter_model.safetensors"
    assert sha256_hex(exported.read_bytes()) == final.sha256
    reopened = type(ledger)(ledger.url)
    try:
        assert reopened.verify_chain() is None
        run = reopened.run(run_id)
        assert [h.output_sha256 for h in run.hops] == [ref.sha256, final.sha256]
        kinds = [e.kind for e in reopened.events()]
        assert kinds.count("storage.fault") == kinds.count("storage.recovered") == 3
        assert kinds.count("hop.committed") == 2
    finally:
        reopened.close()


@pytest.mark.parametrize(
    ("error", "storage"),
    [
        (OSError(errno.ENOSPC, "No space left on device"), True),
        (OSError(errno.EDQUOT, "Disk quota exceeded"), True),
        (OSError(errno.EIO, "Input/output error"), True),
        (OSError(errno.ENOENT, "No such file or directory"), False),
        (OperationalError("INSERT", {}, sqlite3.OperationalError("database or disk is full")),
         True),
        (OperationalError("SELECT", {}, sqlite3.OperationalError("no such table: runs")), False),
        (OperationalError("INSERT", {}, psycopg.errors.DiskFull("could not extend file")), True),
        (OperationalError("SELECT", {}, psycopg.errors.UndefinedTable("no such table")), False),
        (ValueError("database or disk is full"), False),
    ],
    ids=["enospc", "edquot", "eio", "enoent", "sqlite-full", "sqlite-schema", "postgresql-full",
         "postgresql-schema", "not-storage"],
)  # fmt: skip
def test_storage_faults_are_told_apart_from_other_errors(error: Exception, storage: bool) -> None:
    assert (storage_fault_reason(error) is not None) is storage


def test_failure_and_evaluation_reports_into_a_full_disk_are_retryable(
    pki: Pki, disk: Path, loop_thread: LoopThread
) -> None:
    settings = coordinator_settings(pki, disk / "state")
    coordinator = loop_thread.run(build_server(settings))
    site = ScriptedSite(pki, "site-a", coordinator.port)
    admin = AdminClient(f"localhost:{coordinator.port}", pki.tls("admin"))
    ballast = Ballast(disk)
    plan = {"name": "t", "dataset": "notes", "labels": ["x", "y"], "sites": ["site-a"],
            "failure": {"on_failure": "abort"}}  # fmt: skip
    try:
        site.connect()
        admin.wait_for_sites({"site-a"}, timeout=60)
        done = admin.start_run(parse_plan(plan))
        task = site.next_task()
        assert site.report(task, site.upload(task, site.bundle(task))) == "committed"
        _until(lambda: admin.run(done).status == "completed")
        admin.evaluate_run(done, "validation", ["site-a"])
        evaluation = site.next_evaluation()
        scored = pb.EvaluationResult(evaluation_id=evaluation.evaluation_id, ok=True,
                                     lease_token=evaluation.lease_token,
                                     metrics={"accuracy": 0.5})  # fmt: skip
        failing = admin.start_run(parse_plan(plan))
        task = site.next_task()
        failed = pb.HopResult(hop_id=task.hop_id, lease_token=task.lease_token, ok=False,
                              error_code="training-failed", error_message="boom")  # fmt: skip

        _truncate_wal(coordinator)
        ballast.fill()
        _unavailable(lambda: site.stub.ReportEvaluation(scored, timeout=30))
        _unavailable(lambda: site.stub.ReportHopResult(failed, timeout=30))
        ballast.free()
        assert site.stub.ReportEvaluation(scored, timeout=30).status == "done"
        assert site.stub.ReportHopResult(failed, timeout=30).hop_status == "failed"
        assert admin.run(failing).status == "failed"
    finally:
        ballast.free()
        admin.close()
        site.close()
        loop_thread.run(coordinator.stop(0))


class _Events:
    def __init__(self) -> None:
        self.kinds: list[str] = []

    def record_event(self, kind: str, **fields: object) -> None:
        self.kinds.append(kind)


def test_a_fault_of_a_large_write_ends_only_once_its_size_is_free(disk: Path) -> None:
    events = _Events()
    health = StorageHealth(events, disk / "probe")
    ballast = Ballast(disk)
    ballast.fill(room=256 * 1024)  # room for the probe, not for the 1 MiB write below
    try:
        with pytest.raises(StorageFault), health.guard("export", needs_bytes=1024 * 1024):
            (disk / "export").write_bytes(b"\0" * 1024 * 1024)
        assert not health.check() and health.fault is not None  # the small probe would succeed
        ballast.free()
        assert health.check() and health.fault is None
        assert events.kinds == ["storage.fault", "storage.recovered"]
    finally:
        ballast.free()
