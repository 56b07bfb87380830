"""Federated rounds over the real gRPC service with scripted sites (the protocol under test)."""

from __future__ import annotations

import time

import grpc
import numpy as np
import pytest
import safetensors.numpy

from coordinator.console.admin import AdminClient
from coordinator.plan import parse_plan
from coordinator.server import Coordinator
from protocols.signing import verify_aggregate_custody
from protocols.v1 import baton_pb2 as pb
from tests.conftest import Pki
from tests.coordinator_tests.conftest import EngineClock, ScriptedSite, committing_threads


def _plan(**federated: object) -> dict[str, object]:
    return {"name": "fed", "dataset": "notes", "labels": ["x", "y"], "mode": "federated",
            "sites": ["site-a", "site-b"],
            "federated": {"rounds": 2, "min_sites": 2, **federated}}  # fmt: skip


def _wait(admin: AdminClient, run_id: str, status: str) -> pb.RunStatus:
    deadline = time.monotonic() + 60
    while (run := admin.run(run_id)).status != status:
        assert time.monotonic() < deadline, f"run is {run.status}: {run.error}"
        time.sleep(0.05)
    return run


def test_a_rounds_hops_are_leased_together_and_the_next_round_trains_from_the_aggregate(
    sites: dict[str, ScriptedSite], admin: AdminClient, coordinator: Coordinator, pki: Pki
) -> None:
    admin.wait_for_sites({"site-a", "site-b"}, timeout=60)
    committed_on = committing_threads(coordinator.engine.ledger)
    run_id = admin.start_run(parse_plan(_plan()))
    a, b = sites["site-a"].next_task(), sites["site-b"].next_task()  # both before any result
    assert (a.round, b.round) == (1, 1) and not a.HasField("input_checkpoint")
    ref_a = sites["site-a"].upload(a, sites["site-a"].bundle(a, 1.0))
    assert sites["site-a"].report(a, ref_a, train_examples=10.0) == "committed"
    assert sites["site-a"].tasks.empty()  # round 2 waits for site-b's contribution
    ref_b = sites["site-b"].upload(b, sites["site-b"].bundle(b, 4.0))
    sites["site-b"].report(b, ref_b, train_examples=30.0)
    a2, b2 = sites["site-a"].next_task(), sites["site-b"].next_task()
    assert (a2.round, b2.round) == (2, 2)
    aggregate = a2.input_checkpoint
    assert b2.input_checkpoint.sha256 == aggregate.sha256
    data = sites["site-a"].download(aggregate.sha256)
    verify_aggregate_custody(aggregate.sha256, aggregate.signature,
                             aggregate.producer_certificate,
                             ca_pem=pki.tls("coordinator").ca_certificate.read_bytes())  # fmt: skip
    np.testing.assert_allclose(safetensors.numpy.load(data)["lora_A"], (10 + 120) / 40)
    run = admin.run(run_id)
    [first, second] = run.rounds
    assert (first.status, second.status) == ("aggregated", "training")
    assert [(c.member, c.examples) for c in first.contributions] == [("site-a", 10.0),
                                                                     ("site-b", 30.0)]  # fmt: skip
    # A contribution must name the round's input as its parent.
    stale = sites["site-b"].bundle(b2, 2.0, parent_sha256=ref_b.sha256)
    with pytest.raises(grpc.RpcError) as refused:
        sites["site-b"].upload(b2, stale)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "parent_sha256" in str(refused.value.details())
    for site, task in (("site-a", a2), ("site-b", b2)):
        ref = sites[site].upload(task, sites[site].bundle(task, 3.0))
        sites[site].report(task, ref, train_examples=5.0)
    run = _wait(admin, run_id, "completed")
    assert run.final_sha256 == run.rounds[1].output_sha256
    assert coordinator.engine.ledger.verify().ok
    # The rounds' writes, the export's completion included, commit off the event loop.
    kinds = ("round.started", "round.aggregated", "run.completed")
    assert {k: committed_on.get(k) for k in kinds} == {k: {"ledger-writer_0"} for k in kinds}


def test_a_round_short_of_min_sites_fails_the_run_with_the_reason(
    sites: dict[str, ScriptedSite], admin: AdminClient
) -> None:
    admin.wait_for_sites({"site-a", "site-b"}, timeout=60)
    plan = {**_plan(), "failure": {"on_failure": "skip"}}
    run_id = admin.start_run(parse_plan(plan))
    a, b = sites["site-a"].next_task(), sites["site-b"].next_task()
    ref_a = sites["site-a"].upload(a, sites["site-a"].bundle(a, 1.0))
    sites["site-a"].report(a, ref_a, train_examples=10.0)
    failed = pb.HopResult(hop_id=b.hop_id, lease_token=b.lease_token, ok=False,
                          error_code="training-failed", error_message="out of memory")  # fmt: skip
    sites["site-b"].stub.ReportHopResult(failed, timeout=10)
    run = _wait(admin, run_id, "failed")
    assert "round 1 has 1 contribution(s), fewer than min_sites 2" in run.error
    assert run.rounds[0].status == "failed"


def test_stragglers_abort_the_run_at_the_round_deadline(
    sites: dict[str, ScriptedSite], admin: AdminClient, engine_clock: EngineClock
) -> None:
    admin.wait_for_sites({"site-a", "site-b"}, timeout=60)
    run_id = admin.start_run(parse_plan(_plan(stragglers="abort", round_deadline_seconds=60)))
    a, _ = sites["site-a"].next_task(), sites["site-b"].next_task()
    ref_a = sites["site-a"].upload(a, sites["site-a"].bundle(a, 1.0))
    sites["site-a"].report(a, ref_a, train_examples=10.0)
    assert admin.run(run_id).status == "running"  # site-a made it in time
    engine_clock.advance(61)  # site-b never reports: the round's deadline passes
    run = _wait(admin, run_id, "failed")
    assert "round 1: site-b missed the round deadline" in run.error
