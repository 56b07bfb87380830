"""The agent's side of a short handoff: it prepares only for approved runs, and a small input
pushed inside its task is checked exactly like a download."""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import subprocess
import sys
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from safetensors.torch import save

from coordinator.plan import RunPlan
from protocols.checkpoint import CheckpointManifest, bundle_metadata, sha256_hex
from protocols.hyperparameter_messages import to_message
from protocols.signing import sign_digest
from protocols.v1 import baton_pb2 as pb
from site_agent._synthetic import SYNTHETIC_LABELS, generate_site_records, write_site_dataset
from site_agent.agent import HopFailure, SiteAgent
from site_agent.base_model import hash_base_model
from site_agent.registry import RegisteredDataset, register_dataset
from site_agent.settings import SiteSettings
from site_agent.tasks import HopOutcome, TaskSpec, TensorSpec
from tests.conftest import Pki


class _RecordingTrainer:
    """A preparing trainer that only records what it was asked (no model is loaded)."""

    base_model_sha256 = ""

    def __init__(self) -> None:
        self.prepared: list[tuple[str, int]] = []

    def model_sha256(self, spec: TaskSpec, dataset: RegisteredDataset) -> str:
        return ""

    def prepare(self, spec: TaskSpec, dataset: RegisteredDataset, seed: int) -> None:
        self.prepared.append((dataset.name, seed))

    def run_hop(self, *args: Any, **kwargs: Any) -> HopOutcome:
        raise AssertionError("a preparation trains nothing")


def _agent(tmp_path: Path, pki: Pki) -> SiteAgent:
    records = generate_site_records(0, 3, n=30, seed=1)
    path = write_site_dataset(tmp_path / "notes.jsonl", records)
    register_dataset(tmp_path / "data", "notes", path, task_type="seq-classification")
    (tmp_path / "model").mkdir()
    return SiteAgent(SiteSettings(
        coordinator="localhost:1", ca_certificate=pki.directory / "ca.crt",
        certificate=pki.directory / "site-a.crt", private_key=pki.directory / "site-a.key",
        data_dir=tmp_path / "data", base_model_dir=tmp_path / "model", require_approval=True,
        state_dir=tmp_path / "state",
    ))  # fmt: skip


def _plan() -> RunPlan:
    return RunPlan.model_validate({
        "name": "prepare", "dataset": "notes", "labels": list(SYNTHETIC_LABELS),
        "sites": ["site-a", "site-b"], "cycles": 1,
        "defaults": {"steps": 3, "batch_size": 4, "learning_rate": 1e-3},
        "lora": {"r": 4, "alpha": 8, "target_modules": ["query", "value"]},
    })  # fmt: skip


def _next_hop(plan: RunPlan, seed: int = 5) -> pb.HopTask:
    return pb.HopTask(
        run_id="run1", hop_id="hop1", hop_index=1, task_type="seq-classification",
        dataset="notes", labels=list(SYNTHETIC_LABELS),
        lora=pb.LoraConfig(r=4, alpha=16 // 2, dropout=0.0, target_modules=["query", "value"]),
        hyperparameters=to_message(dataclasses.replace(plan.expanded_hops()[1][1], seed=seed)),
        task_options_json="{}", approval_bundle_json=plan.approval_bundle().canonical_json(),
    )  # fmt: skip


def test_a_site_prepares_only_for_a_run_it_approved(tmp_path: Path, pki: Pki) -> None:
    agent = _agent(tmp_path, pki)
    trainer = _RecordingTrainer()
    agent._trainers["seq-classification"] = trainer  # type: ignore[assignment]
    plan = _plan()

    agent._prepare(_next_hop(plan))
    assert trainer.prepared == []  # not approved: nothing of the site's data was read

    agent.approvals.approve([plan.approval_bundle().sha256])
    agent._prepare(_next_hop(plan, seed=7))
    assert trainer.prepared == [("notes", 7)]


def test_a_preparation_outside_the_approved_bundle_is_refused(tmp_path: Path, pki: Pki) -> None:
    agent = _agent(tmp_path, pki)
    trainer = _RecordingTrainer()
    agent._trainers["seq-classification"] = trainer  # type: ignore[assignment]
    plan = _plan()
    agent.approvals.approve([plan.approval_bundle().sha256])
    hop = _next_hop(plan)
    hop.dataset = "other-notes"  # the task names another dataset than the approved bundle

    agent._prepare(hop)

    assert trainer.prepared == []


class _NoDownloads:
    def DownloadCheckpoint(self, request: object, timeout: float) -> object:
        raise AssertionError("a pushed input is not downloaded")


def _signed_input(pki: Pki, tensors: Mapping[str, torch.Tensor]) -> pb.HopTask:
    manifest = CheckpointManifest(task_type="seq-classification", base_model_sha256="b" * 64,
                                  run_id="run1", hop_id="hop0", producer_site="site-b")  # fmt: skip
    data = save(dict(tensors), metadata=bundle_metadata(manifest, {"r": 4}))
    digest = sha256_hex(data)
    ref = pb.CheckpointRef(
        sha256=digest,
        size=len(data),
        signature=sign_digest((pki.directory / "site-b.key").read_bytes(), digest),
        producer_certificate=(pki.directory / "site-b.crt").read_bytes(),
    )
    return pb.HopTask(input_checkpoint=ref, input_bundle=data)


def test_an_input_pushed_inside_the_task_is_loaded_without_a_download(
    tmp_path: Path, pki: Pki
) -> None:
    agent = _agent(tmp_path, pki)
    tensors = {"lora_A": torch.ones(2, 3), "lora_B": torch.zeros(3, 2)}
    task = _signed_input(pki, tensors)

    loaded = agent._incoming(_NoDownloads(), task, "b" * 64)  # type: ignore[arg-type]

    assert loaded.keys() == tensors.keys()
    assert all(torch.equal(loaded[k], v) for k, v in tensors.items())


def test_a_tampered_pushed_input_is_refused_like_a_tampered_download(
    tmp_path: Path, pki: Pki
) -> None:
    agent = _agent(tmp_path, pki)
    task = _signed_input(pki, {"lora_A": torch.ones(2, 3)})
    tampered = bytearray(task.input_bundle)
    tampered[-1] ^= 0x01
    task.input_bundle = bytes(tampered)

    with pytest.raises(HopFailure) as refused:
        agent._incoming(_NoDownloads(), task, "b" * 64)  # type: ignore[arg-type]

    assert refused.value.code == "checkpoint-integrity"
    assert json.dumps(str(refused.value))  # one readable line, no tensor data


def test_the_hello_names_the_base_model_without_importing_torch(
    tmp_path: Path, pki: Pki, tiny_model_dir: Path
) -> None:
    # A fresh interpreter: the hello (with the base model's hash) is ready before torch loads,
    # so a site says hello at once and loads its model in the background.
    script = f"""
import sys
from pathlib import Path
from site_agent.agent import SiteAgent
from site_agent.settings import SiteSettings
agent = SiteAgent(SiteSettings(
    coordinator="localhost:1", ca_certificate=Path({str(pki.directory / "ca.crt")!r}),
    certificate=Path({str(pki.directory / "site-a.crt")!r}),
    private_key=Path({str(pki.directory / "site-a.key")!r}),
    data_dir=Path({str(tmp_path / "data")!r}), base_model_dir=Path({str(tiny_model_dir)!r}),
))
hello = agent._hello()
assert "torch" not in sys.modules, "hello imported torch"
print(hello.base_models[0].sha256)
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == hash_base_model(tiny_model_dir)


class _HandoffTrainer(_RecordingTrainer):
    """Trains two steps of one tensor, noting whether the garbage collector may run at each."""

    def __init__(self, seen: dict[str, bool]) -> None:
        super().__init__()
        self.seen = seen

    def model_sha256(self, spec: TaskSpec, dataset: RegisteredDataset) -> str:
        return "b" * 64

    def trainable_state(self, spec: TaskSpec, dataset: RegisteredDataset) -> tuple[TensorSpec]:
        return (TensorSpec(name="w", dtype="F32", shape=(2, 2)),)

    def run_hop(self, *args: Any, **kwargs: Any) -> HopOutcome:
        progress = args[4]
        self.seen["setting up"] = gc.isenabled()
        progress(1, 2, 0.5)
        self.seen["training"] = gc.isenabled()
        progress(2, 2, 0.4)
        self.seen["after the last step"] = gc.isenabled()

        def validate() -> dict[str, float]:
            self.seen["validating"] = gc.isenabled()
            return {"accuracy": 0.5}

        deferred = validate if kwargs.get("defer_validation") else None
        return HopOutcome(tensors={"w": torch.ones(2, 2)}, adapter_config={"r": 4}, metrics={},
                          train_started_at_ns=1, train_finished_at_ns=2,
                          validate=deferred)  # fmt: skip


class _Coordinator:
    """Takes heartbeats, hand backs and validations, noting whether the collector may run."""

    def __init__(self, seen: dict[str, bool]) -> None:
        self.seen = seen

    def SendHeartbeat(self, beat: pb.Heartbeat, timeout: float) -> pb.HeartbeatResponse:
        return pb.HeartbeatResponse()

    def HandBackHop(self, parts: Any, timeout: float) -> pb.HopResultResponse:
        assert list(parts)[-1].result.ok
        return self._handed_back()

    def HandBackHopWhole(self, request: pb.HandBackWhole, timeout: float) -> pb.HopResultResponse:
        assert request.result.ok
        return self._handed_back()

    def _handed_back(self) -> pb.HopResultResponse:
        self.seen["handing back"] = gc.isenabled()
        return pb.HopResultResponse(hop_status="committed")

    def ReportHopValidation(
        self, report: pb.HopValidation, timeout: float
    ) -> pb.HopValidationResponse:
        self.seen["reporting the validation"] = gc.isenabled()
        return pb.HopValidationResponse()


def _agent_with_a_handoff_trainer(
    tmp_path: Path, pki: Pki, seen: dict[str, bool]
) -> tuple[SiteAgent, pb.HopTask]:
    """An agent whose trainer notes the collector's state in ``seen``, and an approved hop."""
    agent = _agent(tmp_path, pki)
    agent._trainers["seq-classification"] = _HandoffTrainer(seen)  # type: ignore[assignment]
    plan = _plan()
    agent.approvals.approve([plan.approval_bundle().sha256])
    return agent, _next_hop(plan)


def test_no_garbage_collection_holds_up_the_hand_back_of_a_finished_hop(
    tmp_path: Path, pki: Pki
) -> None:
    seen: dict[str, bool] = {}
    agent, task = _agent_with_a_handoff_trainer(tmp_path, pki, seen)
    task.validation_after_commit = True
    assert gc.isenabled()

    agent._run_hop(_Coordinator(seen), task, 3600)  # type: ignore[arg-type]

    # Off from the last step to the hand back's answer (what the next site waits for); on
    # again for the validation pass (whose thread runs the collection held off) and after.
    assert seen == {"setting up": True, "training": True, "after the last step": False,
                    "handing back": False, "validating": True,
                    "reporting the validation": True}  # fmt: skip
    assert gc.isenabled()


def test_a_prepared_site_collects_its_garbage_before_the_handoff_to_it(
    tmp_path: Path, pki: Pki
) -> None:
    agent = _agent(tmp_path, pki)
    trainer = _RecordingTrainer()
    agent._trainers["seq-classification"] = trainer  # type: ignore[assignment]
    plan = _plan()
    agent.approvals.approve([plan.approval_bundle().sha256])
    full: list[int] = []

    def note(phase: str, info: dict[str, int]) -> None:
        if phase == "start" and info["generation"] == 2:
            full.append(len(trainer.prepared))

    gc.callbacks.append(note)
    try:
        agent._prepare(_next_hop(plan))
    finally:
        gc.callbacks.remove(note)

    # A full collection, once the model is prepared: none is owed when the hop arrives.
    assert 1 in full


def test_an_incoming_bundle_is_parsed_and_checked_once(
    tmp_path: Path, pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The bundle's hash, format and finite-value checks run once at the next site (in the
    # integrity check before the signature), and its tensors are built from what that one
    # parse read: a plainly laid out bundle is read where it lies (no copy by safetensors'
    # parser), and not parsed again for the load.
    import safetensors
    import safetensors.torch

    import protocols.checkpoint
    import site_agent.transfers

    agent = _agent(tmp_path, pki)
    tensors = {"lora_A": torch.arange(6.0).reshape(2, 3), "lora_B": torch.zeros(3, 2)}
    task = _signed_input(pki, tensors)
    inspected: list[int] = []
    parsed: list[str] = []

    def counting(data: bytes, **kwargs: Any) -> Any:
        inspected.append(len(data))
        return protocols.checkpoint.read_bundle(data, **kwargs)

    deserialize, load = safetensors.deserialize, safetensors.torch.load
    monkeypatch.setattr(site_agent.transfers, "read_bundle", counting)
    monkeypatch.setattr(safetensors, "deserialize",
                        lambda data: parsed.append("deserialize") or deserialize(data))  # fmt: skip
    monkeypatch.setattr(safetensors.torch, "load",
                        lambda data: parsed.append("load") or load(data))  # fmt: skip

    loaded = agent._incoming(_NoDownloads(), task, "b" * 64)  # type: ignore[arg-type]

    assert inspected == [len(task.input_bundle)]
    assert parsed == []
    assert sorted(loaded) == ["lora_A", "lora_B"]
    for name, tensor in tensors.items():
        assert torch.equal(loaded[name], tensor) and loaded[name].dtype == torch.float32
    loaded["lora_A"].add_(1.0)  # writable: the prepared model's slots copy from it, no alias


class _AwayOnce(_Coordinator):
    """A coordinator that is away for the first hand back, then takes it."""

    def __init__(self, seen: dict[str, bool]) -> None:
        super().__init__(seen)
        self.attempts = 0

    def UploadStatus(self, header: pb.UploadHeader, timeout: float) -> pb.UploadProgress:
        return pb.UploadProgress(received=0)

    def _handed_back(self) -> pb.HopResultResponse:
        self.attempts += 1
        if self.attempts == 1:
            self.seen["first hand back"] = gc.isenabled()
            raise _Unavailable(grpc.StatusCode.UNAVAILABLE)
        self.seen["retried hand back"] = gc.isenabled()
        return super()._handed_back()


class _Unavailable(grpc.RpcError):
    """What a channel raises while the coordinator is away."""

    def __init__(self, code: grpc.StatusCode) -> None:
        super().__init__(str(code))
        self._code = code

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return "coordinator away"


def test_a_hand_back_retried_through_an_outage_lets_the_collector_run(
    tmp_path: Path, pki: Pki
) -> None:
    seen: dict[str, bool] = {}
    agent, task = _agent_with_a_handoff_trainer(tmp_path, pki, seen)
    coordinator = _AwayOnce(seen)

    agent._run_hop(coordinator, task, 3600)  # type: ignore[arg-type]

    # Held for the first attempt (the handoff); an outage is no handoff: released at its retry.
    assert coordinator.attempts == 2
    assert seen["first hand back"] is False
    assert seen["retried hand back"] is True
    assert gc.isenabled()


def test_a_trainer_loaded_during_a_hop_freezes_the_heap_only_once_the_hop_is_over(
    tmp_path: Path, pki: Pki, counted_collector: Any
) -> None:
    seen: dict[str, bool] = {}
    agent = _agent(tmp_path, pki)
    plan = _plan()
    agent.approvals.approve([plan.approval_bundle().sha256])
    frozen: dict[str, int] = {"before": gc.get_freeze_count()}

    class _LoadsBeside(_HandoffTrainer):
        def run_hop(self, *args: Any, **kwargs: Any) -> HopOutcome:
            # Another task type's trainer finishes loading on another thread mid-hop.
            loader = threading.Thread(target=agent.trainer, args=("tabular",))
            loader.start()
            loader.join()
            frozen["during the hop"] = gc.get_freeze_count()
            return super().run_hop(*args, **kwargs)

    agent._trainers["seq-classification"] = _LoadsBeside(seen)  # type: ignore[assignment]

    agent._run_hop(_Coordinator(seen), _next_hop(plan), 3600)  # type: ignore[arg-type]

    assert "tabular" in agent._trainers
    assert frozen["during the hop"] == frozen["before"]  # nothing of the hop's frozen
    assert gc.get_freeze_count() > frozen["before"]  # settled once the hop was over
    # ... with a collection first: the hop's cyclic garbage is not kept out of collections
    assert counted_collector.calls == ["collect", "freeze"]


class _SlowHeads:
    """Kept heads whose keep waits until released (a slow disk's fsync), in the order kept."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.release = threading.Event()
        self.kept: list[int] = []

    def keep(self, message: pb.SignedLedgerHead) -> None:
        self.started.set()
        assert self.release.wait(30)
        self.kept.append(message.seq)


def test_a_signed_head_is_kept_beside_the_task_stream_in_the_order_received(
    tmp_path: Path, pki: Pki
) -> None:
    # A head reaches the next site just before its hop's task now and then (signed after a
    # commit): its check and fsync must not hold the task up.
    agent = _agent(tmp_path, pki)
    heads = _SlowHeads()
    agent.heads = heads  # type: ignore[assignment]

    agent._keep_head(pb.SignedLedgerHead(seq=100))
    agent._keep_head(pb.SignedLedgerHead(seq=200))  # returned while the first is being kept

    assert heads.started.wait(30) and heads.kept == []
    agent.stop()  # a head received is still kept: `close` (then the process ends) waits for it
    closing = threading.Thread(target=agent.close)
    closing.start()
    closing.join(0.5)
    assert closing.is_alive()  # held by the first head's keep
    heads.release.set()
    closing.join(30)
    assert not closing.is_alive() and heads.kept == [100, 200]


class _AdapterTrainer(_RecordingTrainer):
    """A recording trainer whose hops move two float32 tensors."""

    def trainable_state(self, spec: TaskSpec, dataset: RegisteredDataset) -> tuple[TensorSpec, ...]:
        return (TensorSpec("a.lora_A.weight", "F32", (4, 8)),
                TensorSpec("a.lora_B.weight", "F32", (8, 4)))  # fmt: skip


def test_a_preparation_rehearses_the_handoffs_checks_on_a_dummy_adapter(
    tmp_path: Path, pki: Pki, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import site_agent.hop_runner
    import site_agent.transfers

    agent = _agent(tmp_path, pki)
    agent.site_name = "site-a"
    agent._trainers["seq-classification"] = _AdapterTrainer()  # type: ignore[assignment]
    plan = _plan()
    agent.approvals.approve([plan.approval_bundle().sha256])
    checked: list[tuple[str, bytes]] = []
    for module, name in ((site_agent.hop_runner, "inspect_bundle"),
                         (site_agent.transfers, "read_bundle")):  # fmt: skip
        real = getattr(module, name)

        def recording(data: bytes, *args: Any, _real: Any = real, _name: str = name,
                      **kwargs: Any) -> Any:  # fmt: skip
            checked.append((_name, data))
            return _real(data, *args, **kwargs)

        monkeypatch.setattr(module, name, recording)

    with caplog.at_level(logging.DEBUG, logger="site_agent.hop_runner"):
        agent._prepare(_next_hop(plan))

    assert "not rehearsed" not in caplog.text  # the custody signature held too
    # The hand back's egress check, then the incoming check, on the same zeros of the hop's
    # shape; nothing is left to hand back.
    assert [name for name, _ in checked] == ["inspect_bundle", "read_bundle"]
    assert checked[0][1] == checked[1][1]
    assert agent._handing_back is None
