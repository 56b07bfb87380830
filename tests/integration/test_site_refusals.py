"""Site-side trust with real processes: unapproved bundles are refused; data never leaves."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import grpc
import pytest

from coordinator.console.admin import AdminClient
from coordinator.plan import parse_plan
from site_agent._synthetic import SYNTHETIC_LABELS, generate_site_records, write_site_dataset
from site_agent.tasks import hash_base_model
from tests.conftest import SITES, Pki
from tests.integration.conftest import Cluster, wait_for_run

CANARY = "zqxcanary7731"


def _plan(sites: list[str], **extra: object) -> dict[str, object]:
    return {
        "name": "refusals", "dataset": "notes", "labels": list(SYNTHETIC_LABELS), "sites": sites,
        "defaults": {"steps": 3, "batch_size": 8},
        "lora": {"r": 4, "alpha": 8, "target_modules": ["query", "value"]}, **extra,
    }  # fmt: skip


def test_site_refuses_an_unapproved_bundle_before_loading_and_the_ledger_says_why(
    pki: Pki, tmp_path: Path, base_model: Path, site_data: dict[str, Path]
) -> None:
    plan = parse_plan(_plan([SITES[0]], failure={"on_failure": "abort"}))
    cluster = Cluster(log_dir=tmp_path / "logs")
    with cluster.running():
        port = cluster.start_coordinator(
            state_dir=tmp_path / "coordinator", pki_dir=pki.directory, port_file=tmp_path / "port"
        )
        # This site approves by policy, and its rules cover another dataset: the coordinator
        # cannot know that before the hop (preflight lets it through), the site refuses it.
        policy = tmp_path / "policy.toml"
        policy.write_text('[[allow]]\ntask_types = ["seq-classification"]\n'
                          'datasets = ["another-dataset"]\nbase_models = ["*"]\n')  # fmt: skip
        cluster.start_site(SITES[0], coordinator=f"localhost:{port}", pki_dir=pki.directory,
                           data_dir=site_data[SITES[0]], base_model_dir=base_model, threads=1,
                           extra=["--approval-policy", str(policy)])  # fmt: skip
        with AdminClient(f"localhost:{port}", pki.tls("admin")) as admin:
            admin.wait_for_sites({SITES[0]}, timeout=120)
            run = wait_for_run(admin, cluster, admin.start_run(plan))
    assert run.status == "failed"
    bundle = plan.approval_bundle().sha256
    assert "not-approved" in run.error and bundle in run.error
    approvals = json.loads((site_data[SITES[0]] / ".baton-site" / "approvals.json").read_text())
    assert bundle in approvals["seen"] and bundle not in approvals["approved"]
    log = cluster.process(SITES[0]).log_path.read_text()
    assert "hop on" not in log  # the trainer never started


def test_a_canary_planted_in_site_data_never_leaves_the_site(
    pki: Pki, tmp_path: Path, base_model: Path
) -> None:
    # Two sites, each with a canary: the adapter leaves the first for the second and the
    # coordinator (a third site would add a LoRA site start, ~10 CPU s, and no other path out).
    sites = list(SITES[:2])
    data = {}
    for index, site in enumerate(sites):
        records = generate_site_records(index, len(sites), n=40, seed=3)
        records[0] = {**records[0], "text": f"{records[0]['text']} {CANARY}"}
        write_site_dataset(tmp_path / site / "notes.jsonl", records)
        data[site] = tmp_path / site
    plan = parse_plan(_plan(sites))
    state = tmp_path / "coordinator"
    cluster = Cluster(log_dir=tmp_path / "logs")
    with cluster.running():
        port = cluster.start_coordinator(state_dir=state, pki_dir=pki.directory,
                                         port_file=tmp_path / "port")  # fmt: skip
        for site in sites:
            cluster.start_site(site, coordinator=f"localhost:{port}", pki_dir=pki.directory,
                               data_dir=data[site], base_model_dir=base_model, threads=1,
                               approve=[plan.approval_bundle().sha256],
                               extra=["--log-level", "DEBUG"])  # fmt: skip
        with AdminClient(f"localhost:{port}", pki.tls("admin")) as admin:
            admin.wait_for_sites(set(sites), timeout=120)
            run = wait_for_run(admin, cluster, admin.start_run(plan))
            admin.evaluate_run(run.run_id, "validation")
            admin.wait_for_evaluations(run.run_id, timeout=60)
    assert run.status == "completed", run.error
    # Everything that crossed the wire or was written outside the sites' data folders:
    # logs of every process, every stored checkpoint, the exported adapter, the ledger database.
    leaving = [p for p in (tmp_path / "logs").iterdir()]
    leaving += [p for p in state.rglob("*") if p.is_file()]
    assert any(p.name.endswith(".sqlite3") for p in leaving)
    for path in leaving:
        assert CANARY.encode() not in path.read_bytes(), path
    with sqlite3.connect(state / "ledger.sqlite3") as db:
        for (table,) in db.execute("SELECT name FROM sqlite_master WHERE type='table'"):
            for row in db.execute(f'SELECT * FROM "{table}"'):
                assert CANARY not in repr(row), table


def test_a_run_pinned_to_a_base_model_the_site_lacks_is_refused_before_it_starts(
    pki: Pki, tmp_path: Path, base_model: Path, site_data: dict[str, Path]
) -> None:
    pinned = "f" * 64  # the run is pinned to weights this site does not hold
    plan = parse_plan(_plan([SITES[0]], base_model_sha256=pinned, failure={"on_failure": "abort"}))
    cluster = Cluster(log_dir=tmp_path / "logs")
    with cluster.running():
        port = cluster.start_coordinator(
            state_dir=tmp_path / "coordinator", pki_dir=pki.directory, port_file=tmp_path / "port"
        )
        cluster.start_site(SITES[0], coordinator=f"localhost:{port}", pki_dir=pki.directory,
                           data_dir=site_data[SITES[0]], base_model_dir=base_model, threads=1,
                           approve=[plan.approval_bundle().sha256])  # fmt: skip
        with AdminClient(f"localhost:{port}", pki.tls("admin")) as admin:
            admin.wait_for_sites({SITES[0]}, timeout=120)
            # The site told its base model's hash at hello: preflight refuses the run. (The
            # site's own check, base-model-mismatch, stays for a hop sent to it anyway.)
            with pytest.raises(grpc.RpcError) as refused:
                admin.start_run(plan)
            assert admin.runs() == []
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    held = hash_base_model(base_model)
    assert refused.value.details() == (
        f"{SITES[0]}: base model {pinned[:12]} is not there (it has {held[:12]})"
    )
    assert "hop on" not in cluster.process(SITES[0]).log_path.read_text()
