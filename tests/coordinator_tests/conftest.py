"""Fixtures for coordinator tests: a real mTLS coordinator and sites that follow the protocol."""

from __future__ import annotations

import queue
import subprocess
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import safetensors.numpy
from alembic.config import Config

from coordinator.console.admin import AdminClient
from coordinator.engine import hops as engine_hops
from coordinator.engine import leases as engine_leases
from coordinator.engine import rounds as engine_rounds
from coordinator.engine import statistics_rounds as engine_statistics
from coordinator.ledger import Ledger, StatisticsRequestRow
from coordinator.ledger._repository import _MIGRATIONS
from coordinator.server import Coordinator, build_server
from coordinator.settings import CoordinatorSettings
from coordinator.statistics import SiteAggregates
from protocols.checkpoint import CheckpointManifest, bundle_metadata, sha256_hex
from protocols.signing import sign_digest
from protocols.transport import CHUNK_BYTES, secure_channel
from protocols.v1 import baton_pb2 as pb
from protocols.v1 import baton_pb2_grpc as pb_grpc
from tests.conftest import LoopThread, Pki

BASE = "ab" * 32
# How long a scripted site waits for a task or a call: generous, since only a failing test waits
# it out, and a slow step on a loaded CI machine must never look like a failure.
WAIT = 60.0


class ScriptedSite:
    """A site client that follows the protocol by hand (the protocol is what is under test)."""

    DATASETS = (
        ("notes", "seq-classification", ["x", "y"]),
        ("other", "seq-classification", ["x", "y"]),
        ("triage", "seq-classification", ["cardiac", "respiratory"]),
        ("heart", "tabular", []),
    )

    def __init__(
        self, pki: Pki, name: str, port: int, *, foreign: bool = False, provisional: bool = False
    ) -> None:
        tls = pki.foreign_tls(name) if foreign else pki.tls(name)
        self.name = name
        self.provisional = provisional  # says at hello it holds a provisional hop task
        self.key_pem = tls.private_key.read_bytes()
        self.channel = secure_channel(f"localhost:{port}", tls)
        self.stub = pb_grpc.SiteServiceStub(self.channel)
        self.tasks: queue.Queue[pb.Task] = queue.Queue()
        self.heads: list[pb.SignedLedgerHead] = []  # signed ledger heads, kept apart from work
        self.preparations: queue.Queue[pb.HopTask] = queue.Queue()  # "you are next": not work
        self.loads_ahead: queue.Queue[pb.PrepareAhead] = queue.Queue()  # a first visit to come
        self._stream: grpc.Call | None = None

    def hello(self) -> pb.HelloResponse:
        request = pb.HelloRequest(agent_version="test", protocol_version=1,
                                  capabilities=["seq-classification"],
                                  accepts_provisional_hops=self.provisional)  # fmt: skip
        request.base_models.add(name="tiny", sha256=BASE)
        # What preflight checks: the datasets these tests' plans use; approval is the site's own
        # business (not under test here).
        for name, task, labels in self.DATASETS:
            request.datasets.add(name=name, task=task, labels=labels, train_examples=10,
                                 validation_examples=4)  # fmt: skip
        request.approval_not_required = True
        return self.stub.Hello(request, timeout=WAIT)

    def connect(self) -> None:
        self.hello()
        stream = self.stub.StreamTasks(pb.TaskStreamRequest())
        self._stream = stream

        def pump() -> None:
            try:
                for task in stream:
                    if task.WhichOneof("kind") == "ledger_head":
                        self.heads.append(task.ledger_head)
                    elif task.WhichOneof("kind") == "prepare":
                        self.preparations.put(task.prepare.hop)
                    elif task.WhichOneof("kind") == "prepare_ahead":
                        self.loads_ahead.put(task.prepare_ahead)
                    else:
                        self.tasks.put(task)
            except grpc.RpcError:
                pass

        threading.Thread(target=pump, daemon=True).start()

    def next_task(self) -> pb.HopTask:
        task = self.tasks.get(timeout=WAIT)
        assert task.WhichOneof("kind") == "hop", task
        return task.hop

    def next_preparation(self) -> pb.HopTask:
        return self.preparations.get(timeout=WAIT)

    def next_evaluation(self) -> pb.EvaluationTask:
        task = self.tasks.get(timeout=WAIT)
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

    def upload(
        self,
        task: pb.HopTask,
        data: bytes,
        *,
        sha: str | None = None,
        signature: bytes | None = None,
    ) -> pb.CheckpointRef:
        """Uploads `data` with a header claiming `sha` (default: its real hash), signed."""
        digest = sha or sha256_hex(data)
        signed = sign_digest(self.key_pem, digest) if signature is None else signature

        def messages() -> Iterator[pb.UploadRequest]:
            yield pb.UploadRequest(header=pb.UploadHeader(
                hop_id=task.hop_id, lease_token=task.lease_token, total_size=len(data),
                sha256=digest, signature=signed))  # fmt: skip
            for start in range(0, len(data), CHUNK_BYTES):
                yield pb.UploadRequest(data=data[start : start + CHUNK_BYTES])

        return self.stub.UploadCheckpoint(messages(), timeout=WAIT).checkpoint

    def report(self, task: pb.HopTask, ref: pb.CheckpointRef, **metrics: float) -> str:
        result = pb.HopResult(hop_id=task.hop_id, lease_token=task.lease_token, ok=True,
                              output_checkpoint=ref, metrics=metrics or {"accuracy": 0.5},
                              train_started_at_ns=1, train_finished_at_ns=2)  # fmt: skip
        return self.stub.ReportHopResult(result, timeout=WAIT).hop_status

    def download(self, sha256: str) -> bytes:
        chunks = self.stub.DownloadCheckpoint(pb.DownloadRequest(sha256=sha256), timeout=WAIT)
        return b"".join(c.data for c in chunks)

    def close(self) -> None:
        if self._stream is not None:
            self._stream.cancel()
        self.channel.close()


class EngineClock:
    """The run engine's clocks (leases, backoffs, round deadlines, statistics expiry), moved on.

    A test of an expiry sets a generous timeout and advances this clock past it instead of
    waiting: a slow step on a loaded machine can then never overrun the timeout by accident.
    """

    def __init__(self) -> None:
        self.offset = 0.0

    def advance(self, seconds: float) -> None:
        self.offset += seconds

    def monotonic(self) -> float:
        return time.monotonic() + self.offset

    def datetime(self) -> type[datetime]:
        clock = self

        class _Shifted(datetime):
            @classmethod
            def now(cls, tz=None):  # type: ignore[no-untyped-def]
                return datetime.now(tz) + timedelta(seconds=clock.offset)

        return _Shifted


@pytest.fixture
def engine_clock(monkeypatch: pytest.MonkeyPatch) -> EngineClock:
    """Replaces the clocks the run engine's deadlines read (the watchdog included)."""
    clock = EngineClock()
    for module in (engine_hops, engine_leases, engine_rounds):
        monkeypatch.setattr(module, "time", clock)
    for module in (engine_rounds, engine_statistics):
        monkeypatch.setattr(module, "datetime", clock.datetime())
    return clock


def committing_threads(ledger: Ledger) -> dict[str, set[str]]:
    """From now on, each event kind the ledger commits -> the names of the threads that
    committed it (the engine's ledger writer is ``ledger-writer_0``; the loop's is not)."""
    seen: dict[str, set[str]] = {}

    def observe(_seq: int, _hash: str, kinds: tuple[str, ...]) -> None:
        for kind in kinds:
            seen.setdefault(kind, set()).add(threading.current_thread().name)

    ledger.head_observers.append(observe)
    return seen


@pytest.fixture
def ledger(database_url: str) -> Iterator[Ledger]:
    """A migrated ledger on the test database (each of the databases `database_url` names)."""
    ledger = Ledger(database_url)
    ledger.migrate()
    yield ledger
    ledger.close()


def coordinator_settings(pki: Pki, state_dir: Path, **fields: Any) -> CoordinatorSettings:
    """A coordinator's settings on port 0 with the test PKI's coordinator certificate and its
    state in `state_dir`; `fields` set (or override) the others."""
    tls = pki.tls("coordinator")
    return CoordinatorSettings(**{
        "port": 0, "state_dir": state_dir, "ca_certificate": tls.ca_certificate,
        "certificate": tls.certificate, "private_key": tls.private_key, **fields,
    })  # fmt: skip


@pytest.fixture
def coordinator(
    pki: Pki, tmp_path: Path, loop_thread: LoopThread, database_url: str
) -> Iterator[Coordinator]:
    settings = coordinator_settings(
        pki, tmp_path / "state", database_url=database_url, heartbeat_interval_ms=200
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


def next_statistics_task(site: ScriptedSite) -> pb.StatisticsTask:
    """The next task the coordinator sends ``site``, which must be a statistics task."""
    task = site.tasks.get(timeout=WAIT)
    assert task.WhichOneof("kind") == "statistics", task
    return task.statistics


def statistics_result(task: pb.StatisticsTask, aggregates: SiteAggregates) -> pb.StatisticsResult:
    """A site's answer to ``task`` releasing ``aggregates`` (with their label counts and folds)."""
    result = pb.StatisticsResult(
        statistics_id=task.statistics_id,
        lease_token=task.lease_token,
        ok=True,
        count=aggregates.count,
        feature_names=aggregates.feature_names,
        feature_sums=aggregates.feature_sums,
        feature_sums_of_squares=aggregates.feature_sums_of_squares,
    )
    result.label_counts.update(aggregates.label_counts)
    for fold in aggregates.folds:
        result.folds.add(fold=fold.fold, count=fold.count, feature_sums=fold.feature_sums,
                         feature_sums_of_squares=fold.feature_sums_of_squares)  # fmt: skip
    return result


def statistics_request(ledger: Ledger, statistics_id: str) -> StatisticsRequestRow:
    """The ledger's row of a statistics request that must exist."""
    row = ledger.statistics_request(statistics_id)
    assert row is not None
    return row


def request_heart_statistics(
    admin: AdminClient, sites: tuple[str, ...] = ("site-a", "site-b"), **options: int
) -> pb.StatisticsStatus:
    """Once both scripted sites are connected, requests tabular statistics of "heart" at
    ``sites`` (``options``: the admin client's min_count, cv_folds, ...)."""
    admin.wait_for_sites({"site-a", "site-b"}, timeout=WAIT)
    return admin.collect_statistics("heart", "tabular", list(sites), **options)


@pytest.fixture
def quiet(coordinator: Coordinator, loop_thread: LoopThread) -> Coordinator:
    """The coordinator without its watchdog, so every query a test sees is the call's own."""

    async def stop() -> None:
        coordinator._watchdog.cancel()

    loop_thread.run(stop())
    return coordinator


def heartbeat(site: ScriptedSite, task: pb.HopTask, phase: str = "training") -> bool:
    """Sends one heartbeat for ``task``'s hop; returns whether the coordinator cancels it."""
    beat = pb.Heartbeat(hop_id=task.hop_id, lease_token=task.lease_token, phase=phase)
    response: pb.HeartbeatResponse = site.stub.SendHeartbeat(beat, timeout=10)
    return response.cancel


def serving_process(command: list[str], port_file: Path) -> subprocess.Popen[str]:
    """`command` (a `coordinator serve`, output piped) started, once it wrote `port_file`."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not port_file.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            error = process.communicate()[1][-2000:]
            raise AssertionError(f"the coordinator did not start: {error}")
        time.sleep(0.02)
    return process


def alembic_config(url: str, scripts: Path | None = None) -> Config:
    """Alembic's configuration for the ledger at `url` (the project's migration scripts, or
    `scripts`)."""
    config = Config()
    config.set_main_option("script_location", str(scripts or _MIGRATIONS))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))  # configparser syntax
    return config
