"""`baton run download`: a final adapter as a PEFT folder, or tabular safetensors."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import numpy as np
import pytest
import safetensors.numpy
from peft import LoraConfig, PeftConfig
from typer.testing import CliRunner

from coordinator.console.admin import AdminClient
from coordinator.console.cli import app
from coordinator.plan import parse_plan
from coordinator.server import Coordinator
from protocols.checkpoint import CheckpointManifest, bundle_metadata
from protocols.v1 import baton_pb2 as pb
from protocols.v1 import baton_pb2_grpc as pb_grpc
from tests.conftest import Pki
from tests.coordinator_tests.conftest import BASE, ScriptedSite

runner = CliRunner()


def _said(result: object) -> str:
    return " ".join(str(getattr(result, "output", "")).split())


def _peft_bundle(site: ScriptedSite, task: pb.HopTask) -> bytes:
    config = json.loads(json.dumps(
        LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["query", "value"])
        .to_dict(), default=sorted))  # fmt: skip
    config["base_model_name_or_path"] = ""
    manifest = CheckpointManifest(
        task_type=task.task_type, base_model_sha256=BASE, run_id=task.run_id,
        hop_id=task.hop_id, producer_site=site.name, parent_sha256=task.input_checkpoint.sha256,
    )  # fmt: skip
    tensors = {"base_model.model.classifier.lora_A.weight": np.ones((4, 2), dtype=np.float32)}
    return safetensors.numpy.save(tensors, metadata=bundle_metadata(manifest, config))


def _admin_args(pki: Pki, coordinator: Coordinator) -> list[str]:
    return ["--coordinator", f"localhost:{coordinator.port}", "--ca", str(pki.directory / "ca.crt"),
            "--cert", str(pki.directory / "admin.crt"),
            "--key", str(pki.directory / "admin.key")]  # fmt: skip


def _run(sites: dict[str, ScriptedSite], admin: AdminClient, plan: dict[str, object],
         peft: bool) -> tuple[str, bytes]:  # fmt: skip
    admin.wait_for_sites({"site-a", "site-b"}, timeout=60)
    run_id = admin.start_run(parse_plan(plan))
    data = b""
    for name in ("site-a", "site-b"):
        site = sites[name]
        task = site.next_task()
        data = _peft_bundle(site, task) if peft else site.bundle(task)
        site.report(task, site.upload(task, data))
    assert admin.run(run_id).status == "completed"
    return run_id, data


def test_lora_run_downloads_as_a_peft_folder_naming_the_base_model_and_labels(
    pki: Pki, sites: dict[str, ScriptedSite], admin: AdminClient, coordinator: Coordinator,
    tmp_path: Path,
) -> None:  # fmt: skip
    plan = {"name": "t", "dataset": "triage", "labels": ["cardiac", "respiratory"],
            "sites": ["site-a", "site-b"]}  # fmt: skip
    run_id, final = _run(sites, admin, plan, peft=True)
    out = tmp_path / "adapter"
    result = runner.invoke(app, ["run", "download", run_id, "--out", str(out),
                                 *_admin_args(pki, coordinator)])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert (out / "adapter_model.safetensors").read_bytes() == final
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "tiny"  # the name sites registered for BASE
    assert config["id2label"] == {"0": "cardiac", "1": "respiratory"}
    assert config["label2id"] == {"cardiac": 0, "respiratory": 1}
    loaded = PeftConfig.from_pretrained(str(out))
    assert isinstance(loaded, LoraConfig) and loaded.r == 4
    assert loaded.base_model_name_or_path == "tiny"
    card = (out / "README.md").read_text()
    assert "base_model: tiny" in card and run_id in card

    named = tmp_path / "named"
    again = runner.invoke(app, ["run", "download", run_id, "--out", str(named), "--base-model",
                                "org/encoder", *_admin_args(pki, coordinator)])  # fmt: skip
    assert again.exit_code == 0, again.output
    assert json.loads((named / "adapter_config.json").read_text())["base_model_name_or_path"] == (
        "org/encoder"
    )
    busy = runner.invoke(app, ["run", "download", run_id, "--out", str(out),
                               *_admin_args(pki, coordinator)])  # fmt: skip
    assert busy.exit_code == 2 and "is not empty" in _said(busy)


def test_tabular_run_downloads_as_safetensors_with_a_manifest_not_a_peft_config(
    pki: Pki, sites: dict[str, ScriptedSite], admin: AdminClient, coordinator: Coordinator,
    tmp_path: Path,
) -> None:  # fmt: skip
    plan = {"name": "t", "task": "tabular", "dataset": "heart", "labels": ["0", "1"],
            "sites": ["site-a", "site-b"]}  # fmt: skip
    run_id, final = _run(sites, admin, plan, peft=False)
    out = tmp_path / "model"
    result = runner.invoke(app, ["run", "download", run_id, "--out", str(out),
                                 *_admin_args(pki, coordinator)])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md",
        "baton_manifest.json",
        "model.safetensors",
    ]
    assert (out / "model.safetensors").read_bytes() == final
    assert json.loads((out / "baton_manifest.json").read_text())["task_type"] == "tabular"
    assert "not a PEFT adapter" in (out / "README.md").read_text()


def test_final_checkpoint_is_for_admins_and_completed_runs_only(
    pki: Pki, sites: dict[str, ScriptedSite], admin: AdminClient, coordinator: Coordinator,
    tmp_path: Path,
) -> None:  # fmt: skip
    admin.wait_for_sites({"site-a", "site-b"}, timeout=60)
    run_id = admin.start_run(parse_plan({"name": "t", "dataset": "notes", "labels": ["x", "y"],
                                         "sites": ["site-a"]}))  # fmt: skip
    result = runner.invoke(app, ["run", "download", run_id, "--out", str(tmp_path / "x"),
                                 *_admin_args(pki, coordinator)])  # fmt: skip
    assert result.exit_code == 2
    assert f"FAILED_PRECONDITION: run {run_id} is running" in _said(result)
    stub = pb_grpc.AdminServiceStub(sites["site-a"].channel)
    with pytest.raises(grpc.RpcError) as refused:
        b"".join(c.data for c in stub.DownloadFinalCheckpoint(
            pb.DownloadFinalCheckpointRequest(run_id=run_id), timeout=10))  # fmt: skip
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
