"""Commit first at the coordinator: the next site is told it is next, its small input rides in
its task, and a hop's validation metrics arrive after its commit as their own ledger event."""

from __future__ import annotations

import grpc
import pytest

from coordinator.admin import AdminClient
from coordinator.plan import parse_plan
from coordinator.server import Coordinator
from protocols.v1 import baton_pb2 as pb
from tests.coordinator_tests.conftest import ScriptedSite


def _plan(*sites: str) -> dict[str, object]:
    return {"name": "t", "dataset": "notes", "labels": ["x", "y"], "sites": list(sites)}


def test_validation_metrics_reported_after_the_commit_are_their_own_event(
    sites: dict[str, ScriptedSite], admin: AdminClient, coordinator: Coordinator
) -> None:
    admin.wait_for_sites({"site-a", "site-b"}, timeout=10)
    run_id = admin.start_run(parse_plan(_plan("site-a", "site-b")))
    first = sites["site-a"].next_task()
    ref = sites["site-a"].upload(first, sites["site-a"].bundle(first))
    sites["site-a"].report(first, ref, train_loss=0.4)
    sites["site-b"].next_task()  # the next hop is leased before validation arrives

    sites["site-a"].stub.ReportHopValidation(
        pb.HopValidation(hop_id=first.hop_id, ok=True, metrics={"accuracy": 0.75}), timeout=10
    )

    hop = admin.run(run_id).hops[0]
    assert dict(hop.metrics) == pytest.approx({"train_loss": 0.4, "accuracy": 0.75})
    ledger = coordinator.engine.ledger
    assert ledger.verify_chain() is None
    kinds = [(e.kind, e.hop_id) for e in ledger.events(run_id)]
    committed = kinds.index(("hop.committed", first.hop_id))
    validated = kinds.index(("hop.validated", first.hop_id))
    assert committed < [k for k, _ in kinds].index("hop.leased", committed) < validated
    # A retried report (the site did not see the answer) writes nothing more.
    sites["site-a"].stub.ReportHopValidation(
        pb.HopValidation(hop_id=first.hop_id, ok=True, metrics={"accuracy": 0.75}), timeout=10
    )
    assert [e.kind for e in ledger.events(run_id)].count("hop.validated") == 1


def test_validation_is_refused_from_another_site_or_with_non_finite_metrics(
    sites: dict[str, ScriptedSite], admin: AdminClient
) -> None:
    admin.wait_for_sites({"site-a", "site-b"}, timeout=10)
    run_id = admin.start_run(parse_plan(_plan("site-a", "site-b")))
    first = sites["site-a"].next_task()
    ref = sites["site-a"].upload(first, sites["site-a"].bundle(first))
    sites["site-a"].report(first, ref, train_loss=0.4)

    with pytest.raises(grpc.RpcError) as other_site:
        sites["site-b"].stub.ReportHopValidation(
            pb.HopValidation(hop_id=first.hop_id, ok=True, metrics={"accuracy": 1.0}), timeout=10
        )
    assert other_site.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.RpcError) as not_finite:
        sites["site-a"].stub.ReportHopValidation(
            pb.HopValidation(hop_id=first.hop_id, ok=True, metrics={"loss": float("nan")}),
            timeout=10,
        )
    assert not_finite.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert dict(admin.run(run_id).hops[0].metrics) == pytest.approx({"train_loss": 0.4})
