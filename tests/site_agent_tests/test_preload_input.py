"""A prepared hop's input sent ahead of its lease (`PreloadInput`): checked and loaded into the
prepared model while the coordinator commits, trained from only by a lease that names it."""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load, save

import site_agent.tasks._lora_trainer as lora_trainer
from coordinator.plan import RunPlan
from protocols.checkpoint import CheckpointManifest, bundle_metadata, sha256_hex
from protocols.hyperparameter_messages import to_message
from protocols.signing import sign_digest
from protocols.v1 import baton_pb2 as pb
from site_agent._synthetic import SYNTHETIC_LABELS, generate_site_records, write_site_dataset
from site_agent.agent import SiteAgent
from site_agent.registry import register_dataset
from site_agent.settings import SiteSettings
from site_agent.tasks import create_trainer
from site_agent.tasks._spec import PreloadingTrainer
from tests.conftest import Pki

PLAN = RunPlan.model_validate({
    "name": "preload", "dataset": "notes", "labels": list(SYNTHETIC_LABELS),
    "sites": ["site-b", "site-a"], "cycles": 1,
    "defaults": {"steps": 2, "batch_size": 4, "learning_rate": 1e-2},
    "lora": {"r": 4, "alpha": 8, "target_modules": ["query", "value"]},
})  # fmt: skip


class _NoDownloads:
    def DownloadCheckpoint(self, request: object, timeout: float) -> object:
        raise AssertionError("the input was not expected to be downloaded")


class _Beat:
    """What a hop's start and steps tell its heartbeat (nothing is sent here)."""

    def __init__(self) -> None:
        self.cancelled = threading.Event()
        self.phases: list[str] = []

    def phase(self, phase: str, *, tell: bool = True) -> None:
        self.phases.append(phase)

    def training_step(self, step: int, total: int, loss: float) -> None:
        pass


def _agent(tmp_path: Path, pki: Pki, model: Path) -> SiteAgent:
    records = generate_site_records(0, 3, n=24, seed=1)
    path = write_site_dataset(tmp_path / "notes.jsonl", records)
    register_dataset(tmp_path / "data", "notes", path, task_type="seq-classification")
    agent = SiteAgent(SiteSettings(
        coordinator="localhost:1", ca_certificate=pki.directory / "ca.crt",
        certificate=pki.directory / "site-a.crt", private_key=pki.directory / "site-a.key",
        data_dir=tmp_path / "data", base_model_dir=model, require_approval=True,
        state_dir=tmp_path / "state",
    ))  # fmt: skip
    agent.site_name = "site-a"
    agent.approvals.approve([PLAN.approval_bundle().sha256])
    trainer = create_trainer("seq-classification", base_model_dir=model, device="cpu")
    assert isinstance(trainer, PreloadingTrainer)
    agent._trainers["seq-classification"] = trainer
    return agent


def _hop(hop_id: str = "hop1", index: int = 1, seed: int = 5) -> pb.HopTask:
    return pb.HopTask(
        run_id="run1", hop_id=hop_id, hop_index=index, task_type="seq-classification",
        dataset="notes", labels=list(SYNTHETIC_LABELS),
        lora=pb.LoraConfig(r=4, alpha=8, dropout=0.0, target_modules=["query", "value"]),
        hyperparameters=to_message(dataclasses.replace(PLAN.expanded_hops()[1][1], seed=seed)),
        task_options_json="{}", approval_bundle_json=PLAN.approval_bundle().canonical_json(),
    )  # fmt: skip


def _signed_input(agent: SiteAgent, pki: Pki, scale: float) -> tuple[bytes, pb.CheckpointRef]:
    """A bundle site-b handed back for hop 0, signed by site-b: the adapter this site's hops
    expect, its values drawn from a seeded generator and scaled."""
    _, spec, trainer = agent._hop_setup(_hop())
    dataset = agent._dataset("notes", "seq-classification")
    generator = torch.Generator().manual_seed(int(scale * 100))
    tensors = {
        t.name: torch.randn(t.shape, generator=generator) * scale
        for t in trainer.trainable_state(spec, dataset)
    }
    manifest = CheckpointManifest(task_type="seq-classification",
                                  base_model_sha256=trainer.base_model_sha256, run_id="run1",
                                  hop_id="hop0", producer_site="site-b")  # fmt: skip
    data = save(tensors, metadata=bundle_metadata(manifest, {"r": 4}))
    digest = sha256_hex(data)
    ref = pb.CheckpointRef(
        sha256=digest, size=len(data),
        signature=sign_digest((pki.directory / "site-b.key").read_bytes(), digest),
        producer_certificate=(pki.directory / "site-b.crt").read_bytes(),
    )  # fmt: skip
    return data, ref


def _sent_ahead(data: bytes, ref: pb.CheckpointRef, hop: pb.HopTask) -> pb.PreloadInput:
    return pb.PreloadInput(run_id=hop.run_id, hop_id=hop.hop_id, hop_index=hop.hop_index,
                           checkpoint=ref, bundle=data)  # fmt: skip


def _lease(
    hop: pb.HopTask, ref: pb.CheckpointRef | None, bundle: bytes = b"", token: str = "t1"
) -> pb.HopTask:
    task = pb.HopTask()
    task.CopyFrom(hop)
    task.lease_token = token
    if ref is not None:
        task.input_checkpoint.CopyFrom(ref)
    task.input_bundle = bundle
    return task


def _trained(agent: SiteAgent, task: pb.HopTask) -> dict[str, torch.Tensor]:
    """Runs a leased hop at the agent; the adapter it hands back."""
    result = agent._train_hop(_NoDownloads(), task, _Beat())  # type: ignore[arg-type]
    assert result is not None and result.ok
    assert agent._handing_back is not None
    _header, payload = agent._handing_back
    agent._handing_back = None
    return load(payload)


def _counting_loads(monkeypatch: pytest.MonkeyPatch) -> list[Mapping[str, torch.Tensor]]:
    loads: list[Mapping[str, torch.Tensor]] = []
    real = lora_trainer._load_into

    def counting(prepared: Any, incoming: Mapping[str, torch.Tensor]) -> None:
        loads.append(incoming)
        real(prepared, incoming)

    monkeypatch.setattr(lora_trainer, "_load_into", counting)
    return loads


def _reference(tmp_path: Path, pki: Pki, model: Path, data: bytes, ref: pb.CheckpointRef,
               hop: pb.HopTask | None = None) -> dict[str, torch.Tensor]:  # fmt: skip
    """The adapter the same hop hands back at a site that was sent nothing ahead."""
    other = _agent(tmp_path / "reference", pki, model)
    hop = hop or _hop()
    other._prepare(hop)
    return _trained(other, _lease(hop, ref, data))


def _same(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_an_input_sent_ahead_is_checked_and_loaded_once_and_its_lease_trains_from_it(
    tmp_path: Path, pki: Pki, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    agent = _agent(tmp_path, pki, tiny_model_dir)
    data, ref = _signed_input(agent, pki, 0.5)
    expected = _reference(tmp_path, pki, tiny_model_dir, data, ref)
    loads = _counting_loads(monkeypatch)
    hop = _hop()
    agent._prepare(hop)

    agent._receive_preload(_sent_ahead(data, ref, hop))
    assert agent._preloading is not None
    agent._preloading[1].result(timeout=60)  # checked and loaded while the coordinator commits
    assert len(loads) == 1
    # The lease carries no bundle: the one sent ahead is used, with no download and no load.
    trained = _trained(agent, _lease(hop, ref))

    assert len(loads) == 1
    assert _same(trained, expected)
    assert agent._preloading is None  # one lease uses it at most


def test_a_lease_naming_another_input_loads_that_one_over_the_input_sent_ahead(
    tmp_path: Path, pki: Pki, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    agent = _agent(tmp_path, pki, tiny_model_dir)
    sent, sent_ref = _signed_input(agent, pki, 0.5)
    leased, leased_ref = _signed_input(agent, pki, 0.25)  # the hop before was redone, say
    expected = _reference(tmp_path, pki, tiny_model_dir, leased, leased_ref)
    loads = _counting_loads(monkeypatch)
    hop = _hop()
    agent._prepare(hop)
    agent._receive_preload(_sent_ahead(sent, sent_ref, hop))

    trained = _trained(agent, _lease(hop, leased_ref, leased))

    assert len(loads) == 2  # the one sent ahead, then the leased one over it
    assert _same(trained, expected)


def test_an_input_sent_ahead_that_fails_a_check_is_refused_and_the_hop_runs_as_without_it(
    tmp_path: Path, pki: Pki, tiny_model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    agent = _agent(tmp_path, pki, tiny_model_dir)
    data, ref = _signed_input(agent, pki, 0.5)
    expected = _reference(tmp_path, pki, tiny_model_dir, data, ref)
    hop = _hop()
    agent._prepare(hop)
    tampered = bytearray(data)
    tampered[-1] ^= 0x01

    with caplog.at_level(logging.INFO, logger="site_agent.agent"):
        agent._receive_preload(_sent_ahead(bytes(tampered), ref, hop))
        assert agent._preloading is not None
        assert agent._preloading[1].result(timeout=60) is None
        trained = _trained(agent, _lease(hop, ref, data))

    refusals = [r.getMessage() for r in caplog.records if "sent ahead refused" in r.getMessage()]
    assert len(refusals) == 1 and "checkpoint-integrity" in refusals[0]
    assert "\n" not in refusals[0]
    assert _same(trained, expected)


def test_a_preloaded_model_never_trains_a_hop_whose_lease_did_not_take_that_input(
    tmp_path: Path, pki: Pki, tiny_model_dir: Path
) -> None:
    # The commit after which the input was sent failed: the lease that comes is another hop's,
    # a first hop with no input, prepared with the same model and seed.
    agent = _agent(tmp_path, pki, tiny_model_dir)
    data, ref = _signed_input(agent, pki, 0.5)
    first = _hop("hop0", index=0)
    reference = _agent(tmp_path / "reference", pki, tiny_model_dir)
    reference._prepare(first)
    expected = _trained(reference, _lease(first, None))
    hop = _hop()
    agent._prepare(hop)
    agent._receive_preload(_sent_ahead(data, ref, hop))
    assert agent._preloading is not None
    assert agent._preloading[1].result(timeout=60) is not None  # loaded into the prepared model

    trained = _trained(agent, _lease(first, None))

    assert _same(trained, expected)  # the fresh seeded adapter, not the input sent ahead
    assert agent._preloading is None
