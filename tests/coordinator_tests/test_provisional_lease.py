"""A provisional hop task: to an agent that said it holds one until its lease decision, the next
hop's task (its small input inside) leaves while the commit's transaction runs; the decision
follows on the same stream, granted once the transaction commits, withdrawn if it does not."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest

from coordinator.console.admin import AdminClient
from coordinator.ledger import TransitionRefused
from coordinator.plan import parse_plan
from coordinator.server import Coordinator
from protocols.v1 import baton_pb2 as pb
from tests.conftest import Pki
from tests.coordinator_tests.conftest import WAIT, ScriptedSite
from tests.coordinator_tests.conftest import heartbeat as _training_beat


@pytest.fixture
def sites(pki: Pki, coordinator: Coordinator) -> Iterator[dict[str, ScriptedSite]]:
    clients = {
        "site-a": ScriptedSite(pki, "site-a", coordinator.port, provisional=True),
        "site-b": ScriptedSite(pki, "site-b", coordinator.port, provisional=True),
    }
    for client in clients.values():
        client.connect()
    yield clients
    for client in clients.values():
        client.close()


def _start(admin: AdminClient) -> str:
    admin.wait_for_sites({"site-a", "site-b"}, timeout=60)
    plan = {"name": "t", "dataset": "notes", "labels": ["x", "y"], "sites": ["site-a", "site-b"]}
    return admin.start_run(parse_plan(plan))


def _next(site: ScriptedSite) -> pb.Task:
    return site.tasks.get(timeout=WAIT)


def test_the_next_task_leaves_provisional_and_its_lease_is_granted_once_committed(
    sites: dict[str, ScriptedSite], admin: AdminClient, coordinator: Coordinator
) -> None:
    run_id = _start(admin)
    first = sites["site-a"].next_task()
    assert not first.provisional  # a run's first hop has no input to ride inside it
    data = sites["site-a"].bundle(first)
    ref = sites["site-a"].upload(first, data)
    assert sites["site-a"].report(first, ref, train_loss=0.4) == "committed"

    task, decision = _next(sites["site-b"]), _next(sites["site-b"])
    second = task.hop
    assert second.provisional and second.input_bundle == data
    assert decision.WhichOneof("kind") == "lease_decision"
    assert (decision.lease_decision.hop_id, decision.lease_decision.lease_token) == (
        second.hop_id, second.lease_token)  # fmt: skip
    assert decision.lease_decision.granted
    # Granted, it is a lease like any: its beats are taken, and the ledger leased it once.
    assert second.hop_id in coordinator.engine.hops.leases.sent
    _training_beat(sites["site-b"], second)
    events = coordinator.engine.ledger.events(run_id)
    assert [e.hop_id for e in events if e.kind == "hop.leased"].count(second.hop_id) == 1


def test_a_lease_whose_transaction_fails_is_withdrawn_and_leased_again_later(
    sites: dict[str, ScriptedSite],
    admin: AdminClient,
    coordinator: Coordinator,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    run_id = _start(admin)
    first = sites["site-a"].next_task()
    ref = sites["site-a"].upload(first, sites["site-a"].bundle(first))
    ledger = coordinator.engine.ledger
    lease_hop = ledger.lease_hop

    def refused(*args: object, **kwargs: object) -> object:
        raise TransitionRefused("the hop moved meanwhile")

    monkeypatch.setattr(ledger, "lease_hop", refused)
    with pytest.raises(grpc.RpcError):  # the whole transaction rolled back: nothing committed
        sites["site-a"].report(first, ref, train_loss=0.4)
    task, decision = _next(sites["site-b"]), _next(sites["site-b"])
    assert task.hop.provisional
    assert decision.lease_decision.hop_id == task.hop.hop_id
    assert not decision.lease_decision.granted
    assert task.hop.hop_id not in coordinator.engine.hops.leases.sent
    assert [e.kind for e in ledger.events(run_id)].count("hop.committed") == 0

    monkeypatch.setattr(ledger, "lease_hop", lease_hop)
    assert sites["site-a"].report(first, ref, train_loss=0.4) == "committed"  # retried
    again, granted = _next(sites["site-b"]), _next(sites["site-b"])
    assert again.hop.hop_id == task.hop.hop_id and again.hop.lease_token != task.hop.lease_token
    assert granted.lease_decision.granted
    assert granted.lease_decision.lease_token == again.hop.lease_token
    assert ledger.verify_chain() is None


def test_an_agent_that_did_not_say_it_holds_provisional_tasks_gets_committed_ones(
    pki: Pki, admin: AdminClient, coordinator: Coordinator
) -> None:
    clients = {
        "site-a": ScriptedSite(pki, "site-a", coordinator.port, provisional=True),
        "site-b": ScriptedSite(pki, "site-b", coordinator.port),  # an older agent
    }
    for client in clients.values():
        client.connect()
    try:
        _start(admin)
        first = clients["site-a"].next_task()
        ref = clients["site-a"].upload(first, clients["site-a"].bundle(first))
        assert clients["site-a"].report(first, ref, train_loss=0.4) == "committed"
        second = clients["site-b"].next_task()
        assert second.input_bundle and not second.provisional
        assert clients["site-b"].tasks.empty()  # no decision follows an ordinary task
    finally:
        for client in clients.values():
            client.close()
