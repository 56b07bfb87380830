"""The engine's hop task carries the hop's hyperparameters as the one model defines them."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from coordinator.engine import tasks
from coordinator.engine.tasks import approval_bundle, hop_task
from coordinator.ledger import HopRow, RunRow
from coordinator.plan import RunPlan, parse_plan
from protocols.approval import ApprovalBundle
from protocols.hyperparameter_messages import from_message
from protocols.hyperparameters import HopHyperparameters
from protocols.v1 import baton_pb2 as pb


def _rows(plan: RunPlan, stored: dict[str, object]) -> tuple[RunRow, HopRow]:
    run = RunRow(id="r" * 32, name=plan.name, status="running", plan=json.loads(plan.to_json()),
                 base_model_sha256=None, created_at=datetime.now(UTC))  # fmt: skip
    hop = HopRow(id="h" * 32, run_id=run.id, index=0, site="a", hyperparameters=stored,
                 status="leased", lease_token="t")  # fmt: skip
    return run, hop


def _sent(run: RunRow, hop: HopRow) -> pb.HopHyperparameters:
    task = pb.Task.FromString(hop_task(run, hop, None).SerializeToString())
    return task.hop.hyperparameters


def test_a_plans_schedule_and_options_reach_the_hop_task() -> None:
    plan = parse_plan({
        "task": "tabular", "dataset": "heart", "labels": ["0", "1"], "sites": ["a"],
        "defaults": {"learning_rate": 0.02, "epochs": 1.5, "warmup_steps": 3, "seed": 4,
                     "max_grad_norm": 0.0, "proximal_mu": 0.1, "lr_schedule": "constant"},
    })  # fmt: skip
    (_, planned), *_ = plan.expanded_hops()
    run, hop = _rows(plan, planned.model_dump())  # as the engine stores a new run's hops
    sent = _sent(run, hop)
    assert sent.lr_schedule == "constant"
    assert from_message(sent) == planned


def test_hops_stored_before_a_field_existed_are_sent_with_its_default() -> None:
    plan = parse_plan({"task": "tabular", "dataset": "heart", "labels": ["0", "1"],
                       "sites": ["a"]})  # fmt: skip
    legacy = {"learning_rate": 1e-3, "steps": 30, "batch_size": 16, "weight_decay": 0.0,
              "warmup_steps": 0, "max_grad_norm": 1.0, "seed": 0, "epochs": 0.0,
              "proximal_mu": 0.0}  # fmt: skip
    sent = _sent(*_rows(plan, legacy))
    assert from_message(sent) == HopHyperparameters(learning_rate=1e-3, steps=30)
    assert sent.HasField("lr_schedule") and sent.lr_schedule == "linear"


def test_the_approval_bundle_is_built_once_per_plan_and_follows_a_changed_plan(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    plan = parse_plan({"task": "tabular", "dataset": "heart", "labels": ["0", "1"],
                       "sites": ["a", "b"], "cycles": 2})  # fmt: skip
    run, hop = _rows(plan, plan.expanded_hops()[0][1].model_dump())
    built: list[str] = []
    real = tasks.approval_bundle

    def counting(row: RunRow) -> ApprovalBundle:
        built.append(row.id)
        return real(row)

    monkeypatch.setattr(tasks, "approval_bundle", counting)
    monkeypatch.setattr(tasks, "_APPROVALS", {})  # nothing built by an earlier test
    first = hop_task(run, hop, None).hop.approval_bundle_json
    assert first == approval_bundle(run).canonical_json() and len(built) == 1
    assert hop_task(run, hop, None).hop.approval_bundle_json == first
    assert len(built) == 1  # the same plan: not built again
    run.plan = {**run.plan, "dataset": "other"}
    changed = hop_task(run, hop, None).hop.approval_bundle_json
    assert len(built) == 2 and changed != first
    assert changed == approval_bundle(run).canonical_json()
