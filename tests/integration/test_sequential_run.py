"""End to end: a coordinator and three site agents, each its own OS process, mTLS on loopback."""

from __future__ import annotations

import itertools
from pathlib import Path

import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification

from coordinator.console.admin import AdminClient
from coordinator.ledger import Ledger
from coordinator.plan import parse_plan
from protocols.checkpoint import inspect_bundle, sha256_hex
from site_agent._synthetic import SYNTHETIC_LABELS
from site_agent.tasks import hash_base_model
from tests.conftest import SITES, Pki
from tests.integration.conftest import Cluster, wait_for_run


def test_three_site_processes_run_a_sequential_plan_over_mtls(
    pki: Pki, tmp_path: Path, base_model: Path, site_data: dict[str, Path]
) -> None:
    plan = parse_plan({
        "name": "integration", "dataset": "notes", "labels": list(SYNTHETIC_LABELS),
        "sites": list(SITES), "base_model_sha256": hash_base_model(base_model),
        "defaults": {"steps": 4, "batch_size": 8, "learning_rate": 1e-2},
        "lora": {"r": 4, "alpha": 8, "target_modules": ["query", "value"]},
    })  # fmt: skip
    cluster = Cluster(log_dir=tmp_path / "logs")
    with cluster.running():
        port = cluster.start_coordinator(
            state_dir=tmp_path / "coordinator", pki_dir=pki.directory,
            port_file=tmp_path / "port",
        )  # fmt: skip
        for site in SITES:
            cluster.start_site(site, coordinator=f"localhost:{port}", pki_dir=pki.directory,
                               data_dir=site_data[site], base_model_dir=base_model,
                               threads=1, approve=[plan.approval_bundle().sha256])  # fmt: skip
        with AdminClient(f"localhost:{port}", pki.tls("admin")) as admin:
            admin.wait_for_sites(set(SITES), timeout=120)
            run = wait_for_run(admin, cluster, admin.start_run(plan))
            admin.evaluate_run(run.run_id, "test")
            evaluated = admin.wait_for_evaluations(run.run_id, timeout=60)

    assert run.status == "completed", run.error
    assert [h.site for h in run.hops] == list(SITES)
    # Each site scored the final adapter on its own test split, and only aggregates came back.
    assert sorted(e.site for e in evaluated.evaluations) == sorted(SITES)
    for evaluation in evaluated.evaluations:
        assert evaluation.status == "done", evaluation.error
        assert evaluation.checkpoint_sha256 == run.final_sha256
        assert 0 <= evaluation.metrics["accuracy"] <= 1 and evaluation.metrics["examples"] > 0

    ledger = Ledger(f"sqlite:///{tmp_path / 'coordinator' / 'ledger.sqlite3'}")
    try:
        hops = ledger.run(run.run_id).hops
        # Every hop trained from the previous hop's output: the hashes chain.
        assert hops[0].input_sha256 is None
        for before, after in itertools.pairwise(hops):
            assert after.input_sha256 == before.output_sha256
        assert len({h.output_sha256 for h in hops}) == len(hops)
        for hop in hops:
            assert hop.status == "committed"
            assert {"loss", "accuracy", "macro_f1", "examples"} <= set(hop.metrics)
            assert hop.metrics["examples"] > 0
            assert hop.train_finished_at_ns > hop.train_started_at_ns > 0
            checkpoint = ledger.checkpoint(hop.output_sha256 or "")
            assert checkpoint is not None and checkpoint.producer_site == hop.site
            assert checkpoint.parent_sha256 == hop.input_sha256
        assert ledger.verify_chain() is None
        assert ledger.run(run.run_id).final_sha256 == hops[-1].output_sha256
    finally:
        ledger.close()

    final_dir = Path(run.final_adapter_dir)
    data = (final_dir / "adapter_model.safetensors").read_bytes()
    assert sha256_hex(data) == run.final_sha256
    assert inspect_bundle(data).manifest.producer_site == SITES[-1]
    base = AutoModelForSequenceClassification.from_pretrained(
        base_model, num_labels=len(SYNTHETIC_LABELS)
    )
    model = PeftModel.from_pretrained(base, final_dir)
    saved = load_file(final_dir / "adapter_model.safetensors")
    lora_a = next(k for k in saved if "lora_A" in k)
    loaded = dict(model.named_parameters())
    match = next(v for k, v in loaded.items() if k.replace(".default", "") == lora_a)
    assert torch.equal(match.detach(), saved[lora_a])
