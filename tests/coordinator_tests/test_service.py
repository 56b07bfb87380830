"""The coordinator's gRPC service over real mTLS on loopback, driven by scripted site clients."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import safetensors.numpy

from coordinator.console.admin import AdminClient
from coordinator.engine.hops import Hops
from coordinator.ledger import HopRow, Ledger
from coordinator.plan import parse_plan
from coordinator.server import Coordinator
from protocols.checkpoint import CheckpointManifest, bundle_metadata, sha256_hex
from protocols.signing import sign_digest
from protocols.v1 import baton_pb2 as pb
from tests.conftest import Pki
from tests.coordinator_tests.conftest import BASE, WAIT, ScriptedSite, committing_threads


def _plan(*sites: str) -> dict[str, object]:
    return {"name": "t", "dataset": "notes", "labels": ["x", "y"], "sites": list(sites)}


def _ledger(coordinator: Coordinator) -> Ledger:
    return coordinator.engine.ledger


def test_two_hop_run_chains_checkpoints_and_records_every_step(
    sites: dict[str, ScriptedSite], admin: AdminClient, coordinator: Coordinator
) -> None:
    admin.wait_for_sites({"site-a", "site-b"}, timeout=60)
    run_id = admin.start_run(parse_plan(_plan("site-a", "site-b")))

    first = sites["site-a"].next_task()
    assert first.run_id == run_id and first.hop_index == 0
    assert not first.HasField("input_checkpoint")
    ref_a = sites["site-a"].upload(first, sites["site-a"].bundle(first, 1.0))
    assert sites["site-a"].report(first, ref_a, accuracy=0.6) == "committed"

    second = sites["site-b"].next_task()
    assert second.input_checkpoint.sha256 == ref_a.sha256
    assert second.base_model_sha256 == BASE  # pinned by the first committed hop
    assert sha256_hex(sites["site-b"].download(ref_a.sha256)) == ref_a.sha256
    ref_b = sites["site-b"].upload(second, sites["site-b"].bundle(second, 2.0))
    sites["site-b"].report(second, ref_b, accuracy=0.7)

    run = admin.run(run_id)
    assert run.status == "completed"
    assert [h.input_sha256 for h in run.hops] == ["", ref_a.sha256]
    assert [h.output_sha256 for h in run.hops] == [ref_a.sha256, ref_b.sha256]
    assert [h.metrics["accuracy"] for h in run.hops] == pytest.approx([0.6, 0.7])
    final = Path(run.final_adapter_dir)
    assert sha256_hex((final / "adapter_model.safetensors").read_bytes()) == ref_b.sha256
    assert json.loads((final / "adapter_config.json").read_text()) == {"r": 4}
    ledger = _ledger(coordinator)
    assert ledger.verify_chain() is None
    kinds = [e.kind for e in ledger.events(run_id)]
    hop_events = ["hop.leased", "checkpoint.stored", "hop.uploaded", "hop.committed"]
    assert kinds == ["run.created", *hop_events, *hop_events, "run.completed"]


def test_a_watchdog_pass_during_a_commit_leaves_the_next_task_pinned(
    sites: dict[str, ScriptedSite],
    admin: AdminClient,
    coordinator: Coordinator,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A watchdog pass starts while the first hop's commit is on the ledger writer's thread; its
    # outside-write check is held back until the commit is durable, but not yet applied on the
    # loop. Taken for an outside write, it would read the runs again and the commit would go on
    # with stale rows: the next task sent without the base model the first hop pinned.
    engine = coordinator.engine
    ledger_type = type(engine.ledger)
    original_commit = Hops._commit_and_lease
    original_last_seq = ledger_type.last_seq
    original_check = engine.storage.check
    in_commit, pass_started, committed = threading.Event(), threading.Event(), threading.Event()

    def storage_check() -> None:  # the first step of every watchdog pass
        original_check()
        pass_started.set()

    def last_seq(ledger: Ledger) -> int:  # the outside-write check's one query
        if in_commit.is_set():
            assert committed.wait(WAIT)
        return original_last_seq(ledger)

    def commit_during_a_watchdog_pass(self: Hops, *args: Any, **kwargs: Any) -> HopRow | None:
        assert self.writer.loop is not None
        in_commit.set()
        pass_started.clear()
        asyncio.run_coroutine_threadsafe(engine.check_deadlines(), self.writer.loop)
        assert pass_started.wait(WAIT)  # it is now at its outside-write check, or waiting
        try:
            return original_commit(self, *args, **kwargs)
        finally:
            committed.set()
            in_commit.clear()

    monkeypatch.setattr(engine.storage, "check", storage_check)
    monkeypatch.setattr(ledger_type, "last_seq", last_seq)
    monkeypatch.setattr(Hops, "_commit_and_lease", commit_during_a_watchdog_pass)
    admin.wait_for_sites({"site-a", "site-b"}, timeout=60)
    admin.start_run(parse_plan(_plan("site-a", "site-b")))
    first = sites["site-a"].next_task()
    ref = sites["site-a"].upload(first, sites["site-a"].bundle(first, 1.0))
    assert sites["site-a"].report(first, ref) == "committed"
    assert committed.is_set()  # the commit did run during a watchdog pass

    second = sites["site-b"].next_task()
    assert second.input_checkpoint.sha256 == ref.sha256
    assert second.base_model_sha256 == BASE


def test_site_cannot_upload_or_report_for_another_sites_hop(
    sites: dict[str, ScriptedSite], admin: AdminClient, coordinator: Coordinator
) -> None:
    admin.wait_for_sites({"site-a", "site-b"}, timeout=60)
    admin.start_run(parse_plan(_plan("site-a", "site-b")))
    task = sites["site-a"].next_task()
    with pytest.raises(grpc.RpcError) as refused:
        sites["site-b"].upload(task, sites["site-b"].bundle(task))
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert sites["site-b"].tasks.empty()


def test_upload_with_stale_lease_token_is_refused(
    sites: dict[str, ScriptedSite], admin: AdminClient
) -> None:
    admin.wait_for_sites({"site-a", "site-b"}, timeout=60)
    admin.start_run(parse_plan(_plan("site-a", "site-b")))
    task = sites["site-a"].next_task()
    stale = pb.HopTask()
    stale.CopyFrom(task)
    stale.lease_token = "0" * 32
    with pytest.raises(grpc.RpcError) as refused:
        sites["site-a"].upload(stale, sites["site-a"].bundle(task))
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda site, task: (site.bundle(task), "0" * 64), "hash mismatch"),
        (lambda site, task: (b"\x00" * 64, None), "not a valid safetensors"),
        (lambda site, task: (site.bundle(task, float("nan")), None), "NaN"),
        (lambda site, task: (site.bundle(task, hop_id="f" * 32), None), "hop_id"),
    ],
    ids=["tampered-hash", "garbage", "nan", "wrong-hop-in-manifest"],
)
def test_bad_upload_is_refused_and_nothing_is_committed(
    sites: dict[str, ScriptedSite],
    admin: AdminClient,
    coordinator: Coordinator,
    mutate,  # type: ignore[no-untyped-def]
    message: str,
) -> None:
    admin.wait_for_sites({"site-a", "site-b"}, timeout=60)
    run_id = admin.start_run(parse_plan(_plan("site-a", "site-b")))
    site = sites["site-a"]
    task = site.next_task()
    data, sha = mutate(site, task)
    with pytest.raises(grpc.RpcError) as refused:
        site.upload(task, data, sha=sha)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in refused.value.details()
    run = admin.run(run_id)
    assert run.hops[0].status == "leased" and not run.hops[0].output_sha256
    # The lease survives a refused upload: the site can still send a good one.
    good = site.upload(task, site.bundle(task))
    assert site.report(task, good) == "committed"


def test_malformed_plan_gets_a_clear_error(
    sites: dict[str, ScriptedSite], admin: AdminClient
) -> None:
    with pytest.raises(grpc.RpcError) as refused:
        admin._stub.StartRun(pb.StartRunRequest(plan_json='{"dataset": "x"}'), timeout=30)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "either 'hops' or 'sites'" in refused.value.details()
    with pytest.raises(grpc.RpcError) as unknown:
        admin.start_run(parse_plan(_plan("site-a", "nowhere")))
    assert unknown.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "nowhere" in unknown.value.details()


def test_site_certificate_cannot_call_admin_service(pki: Pki, coordinator: Coordinator) -> None:
    with (
        AdminClient(f"localhost:{coordinator.port}", pki.tls("site-a")) as impostor,
        pytest.raises(grpc.RpcError) as refused,
    ):
        impostor.runs()
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_certificate_from_another_ca_is_refused(pki: Pki, coordinator: Coordinator) -> None:
    site = ScriptedSite(pki, "site-a", coordinator.port, foreign=True)
    with pytest.raises(grpc.RpcError) as refused:
        site.hello()
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    site.close()
    assert _ledger(coordinator).sites() == []


def test_site_may_only_download_the_input_of_its_current_hop(
    sites: dict[str, ScriptedSite], admin: AdminClient
) -> None:
    admin.wait_for_sites({"site-a", "site-b"}, timeout=60)
    admin.start_run(parse_plan(_plan("site-a", "site-b", "site-a")))
    first = sites["site-a"].next_task()
    ref = sites["site-a"].upload(first, sites["site-a"].bundle(first))
    sites["site-a"].report(first, ref)
    sites["site-b"].next_task()
    with pytest.raises(grpc.RpcError) as refused:
        sites["site-a"].download(ref.sha256)
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_task_is_resent_when_a_site_reconnects(
    pki: Pki, sites: dict[str, ScriptedSite], admin: AdminClient, coordinator: Coordinator
) -> None:
    admin.wait_for_sites({"site-a", "site-b"}, timeout=60)
    admin.start_run(parse_plan(_plan("site-a", "site-b")))
    task = sites["site-a"].next_task()
    sites["site-a"].close()
    again = ScriptedSite(pki, "site-a", coordinator.port)
    again.connect()
    try:
        resent = again.next_task()
        assert resent.hop_id == task.hop_id and resent.lease_token == task.lease_token
    finally:
        again.close()


def test_sites_evaluate_the_final_checkpoint_and_the_ledger_records_it(
    sites: dict[str, ScriptedSite], admin: AdminClient, coordinator: Coordinator
) -> None:
    admin.wait_for_sites({"site-a", "site-b"}, timeout=60)
    run_id = admin.start_run(parse_plan(_plan("site-a")))
    with pytest.raises(grpc.RpcError) as early:
        admin.evaluate_run(run_id, "test")
    assert early.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "only a completed run" in early.value.details()
    task = sites["site-a"].next_task()
    ref = sites["site-a"].upload(task, sites["site-a"].bundle(task))
    sites["site-a"].report(task, ref)

    committed_on = committing_threads(_ledger(coordinator))
    [evaluation_id] = admin.evaluate_run(run_id, "test")
    evaluation = sites["site-a"].next_evaluation()
    assert evaluation.evaluation_id == evaluation_id and evaluation.split == "test"
    assert evaluation.checkpoint.sha256 == ref.sha256
    assert sha256_hex(sites["site-a"].download(ref.sha256)) == ref.sha256

    def result(accuracy: float) -> pb.EvaluationResult:
        return pb.EvaluationResult(
            evaluation_id=evaluation_id,
            lease_token=evaluation.lease_token,
            ok=True,
            metrics={"accuracy": accuracy, "examples": 8},
        )

    with pytest.raises(grpc.RpcError) as wrong_site:
        sites["site-b"].stub.ReportEvaluation(result(1.0), timeout=30)
    assert wrong_site.value.code() == grpc.StatusCode.PERMISSION_DENIED
    sites["site-a"].stub.ReportEvaluation(result(0.75), timeout=30)
    run = admin.wait_for_evaluations(run_id, timeout=30)
    [done] = run.evaluations
    assert (done.site, done.split, done.status) == ("site-a", "test", "done")
    assert done.metrics["accuracy"] == pytest.approx(0.75)
    assert [e.kind for e in _ledger(coordinator).events(run_id)][-2:] == [
        "evaluation.requested", "evaluation.done"]  # fmt: skip
    kinds = ("evaluation.requested", "evaluation.done")  # committed off the event loop
    assert {k: committed_on.get(k) for k in kinds} == {k: {"ledger-writer_0"} for k in kinds}
    with pytest.raises(grpc.RpcError) as replay:
        sites["site-a"].stub.ReportEvaluation(result(0.1), timeout=30)
    assert replay.value.code() == grpc.StatusCode.FAILED_PRECONDITION


@pytest.mark.parametrize("signer", ["none", "other-site", "garbage"])
def test_upload_without_its_producers_signature_is_refused(
    pki: Pki, sites: dict[str, ScriptedSite], admin: AdminClient, signer: str
) -> None:
    admin.wait_for_sites({"site-a", "site-b"}, timeout=60)
    run_id = admin.start_run(parse_plan(_plan("site-a")))
    site = sites["site-a"]
    task = site.next_task()
    data = site.bundle(task)
    signature = {
        "none": b"",
        "other-site": sign_digest(pki.tls("site-b").private_key.read_bytes(), sha256_hex(data)),
        "garbage": b"\x30\x00",
    }[signer]
    with pytest.raises(grpc.RpcError) as refused:
        site.upload(task, data, signature=signature)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "checkpoint-integrity" in refused.value.details()
    assert admin.run(run_id).hops[0].status == "leased"


def test_next_site_receives_the_producers_signature_and_certificate(
    pki: Pki, sites: dict[str, ScriptedSite], admin: AdminClient
) -> None:
    from protocols.signing import verify_custody

    admin.wait_for_sites({"site-a", "site-b"}, timeout=60)
    admin.start_run(parse_plan(_plan("site-a", "site-b")))
    first = sites["site-a"].next_task()
    ref = sites["site-a"].upload(first, sites["site-a"].bundle(first))
    sites["site-a"].report(first, ref)
    incoming = sites["site-b"].next_task().input_checkpoint
    verify_custody(incoming.sha256, incoming.signature, incoming.producer_certificate,
                   ca_pem=(pki.directory / "ca.crt").read_bytes(), producer="site-a")  # fmt: skip


def test_upload_cut_mid_stream_resumes_from_the_bytes_received(
    sites: dict[str, ScriptedSite], admin: AdminClient, coordinator: Coordinator
) -> None:
    import time

    from protocols.transport import CHUNK_BYTES

    admin.wait_for_sites({"site-a", "site-b"}, timeout=60)
    run_id = admin.start_run(parse_plan(_plan("site-a")))
    site = sites["site-a"]
    task = site.next_task()
    fields = dict(task_type=task.task_type, base_model_sha256=BASE, run_id=task.run_id,
                  hop_id=task.hop_id, producer_site="site-a", parent_sha256="")  # fmt: skip
    data = safetensors.numpy.save(
        {"lora_A": np.full((700_000,), 0.5, np.float32)},  # 2.8 MB: three chunks
        metadata=bundle_metadata(CheckpointManifest(**fields), {}),
    )
    header = pb.UploadHeader(hop_id=task.hop_id, lease_token=task.lease_token,
                             total_size=len(data), sha256=sha256_hex(data),
                             signature=sign_digest(site.key_pem, sha256_hex(data)))  # fmt: skip

    uploads = coordinator.engine.uploads_dir

    def cut_after_one_chunk() -> Iterator[pb.UploadRequest]:
        yield pb.UploadRequest(header=header)
        yield pb.UploadRequest(data=data[:CHUNK_BYTES])
        # The first chunk lands (its spool file holds it), then the connection drops.
        deadline = time.monotonic() + 60
        while CHUNK_BYTES not in [p.stat().st_size for p in uploads.glob("*.part")]:
            assert time.monotonic() < deadline, "the first chunk never landed"
            time.sleep(0.02)
        raise ConnectionError("cable pulled")

    with pytest.raises(grpc.RpcError):
        site.stub.UploadCheckpoint(cut_after_one_chunk(), timeout=120)
    received = site.stub.UploadStatus(header, timeout=30).received
    assert received == CHUNK_BYTES
    header.offset = received

    def rest() -> Iterator[pb.UploadRequest]:
        yield pb.UploadRequest(header=header)
        for start in range(received, len(data), CHUNK_BYTES):
            yield pb.UploadRequest(data=data[start : start + CHUNK_BYTES])

    ref = site.stub.UploadCheckpoint(rest(), timeout=120).checkpoint
    assert ref.sha256 == sha256_hex(data)
    assert site.report(task, ref) == "committed"
    assert admin.run(run_id).status == "completed"
    assert not list(coordinator.engine.uploads_dir.glob("*.part"))
