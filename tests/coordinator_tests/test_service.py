"""The coordinator's gRPC service over real mTLS on loopback, driven by scripted site clients."""

from __future__ import annotations

import json
import queue
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import safetensors.numpy

from coordinator.admin import AdminClient
from coordinator.ledger import Ledger
from coordinator.plan import parse_plan
from coordinator.server import Coordinator, build_server
from coordinator.settings import CoordinatorSettings
from protocols.checkpoint import CheckpointManifest, bundle_metadata, sha256_hex
from protocols.transport import CHUNK_BYTES, secure_channel
from protocols.v1 import baton_pb2 as pb
from protocols.v1 import baton_pb2_grpc as pb_grpc
from tests.conftest import LoopThread, Pki

BASE = "ab" * 32


class ScriptedSite:
    """A site client that follows the protocol by hand (the protocol is what is under test)."""

    def __init__(self, pki: Pki, name: str, port: int, *, foreign: bool = False) -> None:
        tls = pki.foreign_tls(name) if foreign else pki.tls(name)
        self.name = name
        self.channel = secure_channel(f"localhost:{port}", tls)
        self.stub = pb_grpc.SiteServiceStub(self.channel)
        self.tasks: queue.Queue[pb.Task] = queue.Queue()
        self._stream: grpc.Call | None = None

    def hello(self) -> pb.HelloResponse:
        request = pb.HelloRequest(agent_version="test", protocol_version=1,
                                  capabilities=["seq-classification"])  # fmt: skip
        request.base_models.add(name="tiny", sha256=BASE)
        return self.stub.Hello(request, timeout=5)

    def connect(self) -> None:
        self.hello()
        stream = self.stub.StreamTasks(pb.TaskStreamRequest())
        self._stream = stream

        def pump() -> None:
            try:
                for task in stream:
                    self.tasks.put(task)
            except grpc.RpcError:
                pass

        threading.Thread(target=pump, daemon=True).start()

    def next_task(self) -> pb.HopTask:
        task = self.tasks.get(timeout=10)
        assert task.WhichOneof("kind") == "hop", task
        return task.hop

    def next_evaluation(self) -> pb.EvaluationTask:
        task = self.tasks.get(timeout=10)
        assert task.WhichOneof("kind") == "evaluation", task
        return task.evaluation

    def bundle(self, task: pb.HopTask, value: float = 1.0, **manifest_overrides: str) -> bytes:
        fields = dict(task_type=task.task_type, base_model_sha256=BASE, run_id=task.run_id,
                      hop_id=task.hop_id, producer_site=self.name,
                      parent_sha256=task.input_checkpoint.sha256)  # fmt: skip
        fields.update(manifest_overrides)
        tensors = {"lora_A": np.full((4, 2), value, dtype=np.float32)}
        return safetensors.numpy.save(
            tensors, metadata=bundle_metadata(CheckpointManifest(**fields), {"r": 4})
        )

    def upload(self, task: pb.HopTask, data: bytes, *, sha: str | None = None) -> pb.CheckpointRef:
        def messages() -> Iterator[pb.UploadRequest]:
            yield pb.UploadRequest(header=pb.UploadHeader(
                hop_id=task.hop_id, lease_token=task.lease_token, total_size=len(data),
                sha256=sha or sha256_hex(data)))  # fmt: skip
            for start in range(0, len(data), CHUNK_BYTES):
                yield pb.UploadRequest(data=data[start : start + CHUNK_BYTES])

        return self.stub.UploadCheckpoint(messages(), timeout=10).checkpoint

    def report(self, task: pb.HopTask, ref: pb.CheckpointRef, **metrics: float) -> str:
        result = pb.HopResult(hop_id=task.hop_id, lease_token=task.lease_token, ok=True,
                              output_checkpoint=ref, metrics=metrics or {"accuracy": 0.5},
                              train_started_at_ns=1, train_finished_at_ns=2)  # fmt: skip
        return self.stub.ReportHopResult(result, timeout=10).hop_status

    def download(self, sha256: str) -> bytes:
        chunks = self.stub.DownloadCheckpoint(pb.DownloadRequest(sha256=sha256), timeout=10)
        return b"".join(c.data for c in chunks)

    def close(self) -> None:
        if self._stream is not None:
            self._stream.cancel()
        self.channel.close()


@pytest.fixture
def coordinator(
    pki: Pki, tmp_path: Path, loop_thread: LoopThread, database_url: str
) -> Iterator[Coordinator]:
    tls = pki.tls("coordinator")
    settings = CoordinatorSettings(
        port=0,
        database_url=database_url,
        state_dir=tmp_path / "state",
        ca_certificate=tls.ca_certificate,
        certificate=tls.certificate,
        private_key=tls.private_key,
        heartbeat_interval_ms=200,
    )
    server = loop_thread.run(build_server(settings))
    yield server
    loop_thread.run(server.stop(0))


@pytest.fixture
def sites(pki: Pki, coordinator: Coordinator) -> Iterator[dict[str, ScriptedSite]]:
    clients = {name: ScriptedSite(pki, name, coordinator.port) for name in ("site-a", "site-b")}
    for client in clients.values():
        client.connect()
    yield clients
    for client in clients.values():
        client.close()


@pytest.fixture
def admin(pki: Pki, coordinator: Coordinator) -> Iterator[AdminClient]:
    client = AdminClient(f"localhost:{coordinator.port}", pki.tls("admin"))
    yield client
    client.close()


def _plan(*sites: str) -> dict[str, object]:
    return {"name": "t", "dataset": "notes", "labels": ["x", "y"], "sites": list(sites)}


def _ledger(coordinator: Coordinator) -> Ledger:
    return coordinator.engine.ledger


def test_two_hop_run_chains_checkpoints_and_records_every_step(
    sites: dict[str, ScriptedSite], admin: AdminClient, coordinator: Coordinator
) -> None:
    admin.wait_for_sites({"site-a", "site-b"}, timeout=10)
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


def test_site_cannot_upload_or_report_for_another_sites_hop(
    sites: dict[str, ScriptedSite], admin: AdminClient, coordinator: Coordinator
) -> None:
    admin.wait_for_sites({"site-a", "site-b"}, timeout=10)
    admin.start_run(parse_plan(_plan("site-a", "site-b")))
    task = sites["site-a"].next_task()
    with pytest.raises(grpc.RpcError) as refused:
        sites["site-b"].upload(task, sites["site-b"].bundle(task))
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert sites["site-b"].tasks.empty()


def test_upload_with_stale_lease_token_is_refused(
    sites: dict[str, ScriptedSite], admin: AdminClient
) -> None:
    admin.wait_for_sites({"site-a", "site-b"}, timeout=10)
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
    admin.wait_for_sites({"site-a", "site-b"}, timeout=10)
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
        admin._stub.StartRun(pb.StartRunRequest(plan_json='{"dataset": "x"}'), timeout=5)
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
    admin.wait_for_sites({"site-a", "site-b"}, timeout=10)
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
    admin.wait_for_sites({"site-a", "site-b"}, timeout=10)
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
    admin.wait_for_sites({"site-a", "site-b"}, timeout=10)
    run_id = admin.start_run(parse_plan(_plan("site-a")))
    with pytest.raises(grpc.RpcError) as early:
        admin.evaluate_run(run_id, "test")
    assert early.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "only a completed run" in early.value.details()
    task = sites["site-a"].next_task()
    ref = sites["site-a"].upload(task, sites["site-a"].bundle(task))
    sites["site-a"].report(task, ref)

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
        sites["site-b"].stub.ReportEvaluation(result(1.0), timeout=5)
    assert wrong_site.value.code() == grpc.StatusCode.PERMISSION_DENIED
    sites["site-a"].stub.ReportEvaluation(result(0.75), timeout=5)
    run = admin.wait_for_evaluations(run_id, timeout=5)
    [done] = run.evaluations
    assert (done.site, done.split, done.status) == ("site-a", "test", "done")
    assert done.metrics["accuracy"] == pytest.approx(0.75)
    assert [e.kind for e in _ledger(coordinator).events(run_id)][-2:] == [
        "evaluation.requested", "evaluation.done"]  # fmt: skip
    with pytest.raises(grpc.RpcError) as replay:
        sites["site-a"].stub.ReportEvaluation(result(0.1), timeout=5)
    assert replay.value.code() == grpc.StatusCode.FAILED_PRECONDITION
