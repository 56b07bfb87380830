"""Commit first at the coordinator: the sites of a run's first visits load ahead, the next site
is told it is next, its small input rides in its task, and a hop's validation metrics arrive
after its commit as their own ledger event."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest

from coordinator.console.admin import AdminClient
from coordinator.console.study import RunExecutor, RunTemplate
from coordinator.plan import parse_plan
from coordinator.server import Coordinator
from protocols.checkpoint import sha256_hex
from protocols.v1 import baton_pb2 as pb
from tests.conftest import LoopThread, Pki
from tests.coordinator_tests.conftest import ScriptedSite
from tests.coordinator_tests.conftest import heartbeat as _training_beat


def _plan(*sites: str) -> dict[str, object]:
    return {"name": "t", "dataset": "notes", "labels": ["x", "y"], "sites": list(sites)}


def test_validation_metrics_reported_after_the_commit_are_their_own_event(
    sites: dict[str, ScriptedSite], admin: AdminClient, coordinator: Coordinator
) -> None:
    admin.wait_for_sites({"site-a", "site-b"}, timeout=60)
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
    admin.wait_for_sites({"site-a", "site-b"}, timeout=60)
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


def test_the_next_site_prepares_and_gets_its_input_inside_its_task(
    sites: dict[str, ScriptedSite], admin: AdminClient
) -> None:
    admin.wait_for_sites({"site-a", "site-b"}, timeout=60)
    run_id = admin.start_run(parse_plan(_plan("site-a", "site-b")))

    first = sites["site-a"].next_task()
    _training_beat(sites["site-a"], first)
    prepare = sites["site-b"].next_preparation()
    # "You are next": the hop site-b will get, without a lease or an input yet.
    assert (prepare.run_id, prepare.hop_index, prepare.dataset) == (run_id, 1, "notes")
    assert prepare.approval_bundle_json == first.approval_bundle_json
    assert not prepare.lease_token and not prepare.HasField("input_checkpoint")
    assert first.validation_after_commit  # not the last hop

    data = sites["site-a"].bundle(first, 1.0)
    ref = sites["site-a"].upload(first, data)
    assert sites["site-a"].report(first, ref, train_loss=0.4) == "committed"

    second = sites["site-b"].next_task()
    assert second.input_checkpoint.sha256 == ref.sha256
    assert second.input_bundle == data and sha256_hex(second.input_bundle) == ref.sha256
    assert second.input_checkpoint.signature  # the custody proof travels with it
    assert not second.validation_after_commit  # the last hop's metrics complete the run


def test_the_next_task_leaves_for_its_site_before_the_committed_hops_clean_up(
    sites: dict[str, ScriptedSite],
    admin: AdminClient,
    coordinator: Coordinator,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    admin.wait_for_sites({"site-a", "site-b"}, timeout=60)
    admin.start_run(parse_plan(_plan("site-a", "site-b")))
    first = sites["site-a"].next_task()
    engine = coordinator.engine
    session = engine.sessions.get("site-b")
    assert session is not None
    at_clean_up: list[tuple[set[str], list[str | None]]] = []
    hop_committed = engine.intake.hop_committed

    def clean_up(hop_id: str) -> None:
        # When the committed hop is cleaned up (its spool files, then a ledger transaction on
        # the writer's thread), the next hop's task was sent, and site-b's stream took it from
        # its queue already.
        queued = list(session.queue._queue)  # type: ignore[attr-defined]
        at_clean_up.append(
            (set(engine.hops.leases.sent), [t.WhichOneof("kind") if t else None for t in queued])
        )
        hop_committed(hop_id)

    monkeypatch.setattr(engine.intake, "hop_committed", clean_up)
    ref = sites["site-a"].upload(first, sites["site-a"].bundle(first))
    assert sites["site-a"].report(first, ref, train_loss=0.4) == "committed"

    second = sites["site-b"].next_task()
    assert second.hop_index == 1
    sent, queued = at_clean_up[0]
    assert second.hop_id in sent
    assert "hop" not in queued


def test_the_next_site_is_told_it_is_next_only_once_the_current_hop_trains(
    sites: dict[str, ScriptedSite], admin: AdminClient
) -> None:
    admin.wait_for_sites({"site-a", "site-b"}, timeout=10)
    admin.start_run(parse_plan(_plan("site-a", "site-b", "site-a")))
    first = sites["site-a"].next_task()
    # Leased but not training: a preparation now would take CPU from site-a's start.
    site_a = sites["site-a"]
    site_a.stub.SendHeartbeat(
        pb.Heartbeat(hop_id=first.hop_id, lease_token=first.lease_token, phase="downloading"),
        timeout=10,
    )
    assert sites["site-b"].preparations.empty()

    _training_beat(site_a, first)
    assert sites["site-b"].next_preparation().hop_index == 1
    _training_beat(site_a, first)  # told once per hop and session
    ref = site_a.upload(first, site_a.bundle(first))
    assert site_a.report(first, ref, train_loss=0.4) == "committed"
    second = sites["site-b"].next_task()
    assert site_a.preparations.empty()  # site-a's next hop: only once site-b trains
    _training_beat(sites["site-b"], second)
    assert site_a.next_preparation().hop_index == 2
    assert sites["site-b"].preparations.empty()


def test_a_study_waits_for_a_cycles_validation_metrics_that_follow_its_commits() -> None:
    executor = RunExecutor(
        None,  # type: ignore[arg-type]  # only reads a run it is given
        RunTemplate(dataset="notes", labels=("x", "y"), metric="accuracy"),
    )
    run = pb.RunStatus(hops=[
        pb.HopStatus(index=0, status="committed", metrics={"train_loss": 0.5}),
        pb.HopStatus(index=1, status="skipped"),
        pb.HopStatus(index=2, status="committed", metrics={"accuracy": 0.7}),
    ])  # fmt: skip

    assert not executor._cycle_done(run, 0, 3)  # hop 0's validation has not arrived yet

    run.hops[0].metrics["accuracy"] = 0.5
    assert executor._cycle_done(run, 0, 3)
    assert executor._cycle_value(run, 0, 3) == pytest.approx(0.6)


def _commit(site: ScriptedSite, task: pb.HopTask) -> None:
    assert site.report(task, site.upload(task, site.bundle(task)), train_loss=0.4) == "committed"


@pytest.fixture
def site_c(pki: Pki, coordinator: Coordinator) -> Iterator[ScriptedSite]:
    """A third scripted site: the one whose first visit of an a-b-c run is two hops ahead."""
    site = ScriptedSite(pki, "site-c", coordinator.port)
    site.connect()
    yield site
    site.close()


def test_every_later_site_of_a_run_is_told_its_first_visit_is_coming_when_the_first_hop_trains(
    sites: dict[str, ScriptedSite], site_c: ScriptedSite, admin: AdminClient
) -> None:
    admin.wait_for_sites({"site-a", "site-b", "site-c"}, timeout=60)
    plan = {**_plan("site-a", "site-b", "site-c"), "cycles": 2}  # a0 b1 c2 a3 b4 c5
    run_id = admin.start_run(parse_plan(plan))
    first = sites["site-a"].next_task()
    # Leased, not training: the first hop's site loads alone (a cold cluster's first step).
    site_a = sites["site-a"]
    site_a.stub.SendHeartbeat(
        pb.Heartbeat(hop_id=first.hop_id, lease_token=first.lease_token, phase="downloading"),
        timeout=10,
    )
    assert site_c.loads_ahead.empty() and sites["site-b"].loads_ahead.empty()

    _training_beat(site_a, first)
    ahead = site_c.loads_ahead.get(timeout=60)  # two hops ahead: loads at low priority
    assert (ahead.hop.run_id, ahead.hop.hop_index, ahead.hops_ahead) == (run_id, 2, 2)
    assert ahead.hop.approval_bundle_json == first.approval_bundle_json  # the site checks it
    assert not ahead.hop.lease_token and not ahead.hop.HasField("input_checkpoint")
    assert sites["site-b"].next_preparation().hop_index == 1  # the next one: "you are next"

    _commit(site_a, first)
    second = sites["site-b"].next_task()
    _training_beat(sites["site-b"], second)
    assert site_c.next_preparation().hop_index == 2
    _commit(sites["site-b"], second)
    third = site_c.next_task()
    assert third.hop_index == 2

    # Once per first visit, and only for one: site-c's stream keeps its order, so a second
    # notice would have come before its task; site-b, told it is next, needs none.
    assert site_c.loads_ahead.empty()
    assert sites["site-b"].loads_ahead.empty() and site_a.loads_ahead.empty()


def test_an_aborted_run_leaves_no_record_of_the_notices_of_hops_it_never_sent(
    sites: dict[str, ScriptedSite],
    site_c: ScriptedSite,
    admin: AdminClient,
    coordinator: Coordinator,
    loop_thread: LoopThread,
) -> None:
    admin.wait_for_sites({"site-a", "site-b", "site-c"}, timeout=60)
    run_id = admin.start_run(parse_plan(_plan("site-a", "site-b", "site-c")))
    first = sites["site-a"].next_task()
    _training_beat(sites["site-a"], first)
    assert sites["site-b"].next_preparation().hop_index == 1
    assert site_c.loads_ahead.get(timeout=60).hop.hop_index == 2
    hops = coordinator.engine.hops
    told = {hop.index: hop.hop_id for hop in admin.run(run_id).hops}

    loop_thread.run(coordinator.engine.check_deadlines())  # a watchdog pass
    # The run goes on: its hops' notices stay (each is sent once per hop and session).
    assert set(hops._told) == {told[1]} and set(hops._told_ahead) == {told[2]}
    _training_beat(sites["site-a"], first)
    assert sites["site-b"].preparations.empty() and site_c.loads_ahead.empty()

    assert admin.control(run_id, "abort", "stop").status == "aborted"
    loop_thread.run(coordinator.engine.check_deadlines())
    # Neither hop will be sent now: their records go with the run, not one entry a run for good.
    assert not hops._told and not hops._told_ahead


def test_an_aborted_run_leaves_no_record_of_its_hop_waiting_for_an_absent_site(
    pki: Pki,
    sites: dict[str, ScriptedSite],
    admin: AdminClient,
    coordinator: Coordinator,
    loop_thread: LoopThread,
) -> None:
    site_c = ScriptedSite(pki, "site-c", coordinator.port)
    site_c.hello()  # registered, then away: no task stream
    site_c.close()
    admin.wait_for_sites({"site-a", "site-b"}, timeout=60)
    run_id = admin.start_run(parse_plan(_plan("site-c", "site-a")), allow_offline=True)
    first = admin.run(run_id).hops[0].hop_id
    leases = coordinator.engine.leases
    loop_thread.run(coordinator.engine.check_deadlines())  # a watchdog pass: site-c is away
    assert first in leases.waiting_since and first in leases.wait_logged

    assert admin.control(run_id, "abort", "stop").status == "aborted"
    loop_thread.run(coordinator.engine.check_deadlines())
    assert first not in leases.waiting_since and first not in leases.wait_logged
