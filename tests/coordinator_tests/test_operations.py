"""Operations surfaces of a coordinator in-process: health, readiness, releases, diagnostics."""

from __future__ import annotations

import time
import urllib.error
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sqlalchemy import create_engine

from coordinator.console.admin import AdminClient
from coordinator.plan import parse_plan
from coordinator.server import Coordinator
from protocols.transport import secure_channel
from protocols.v1 import baton_pb2 as pb
from protocols.v1 import baton_pb2_grpc as pb_grpc
from tests.conftest import LoopThread, Pki
from tests.coordinator_tests.conftest import BASE, EngineClock, ScriptedSite


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _health(pki: Pki, port: int) -> int:
    with secure_channel(f"localhost:{port}", pki.tls("admin")) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        response = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=30)
        return int(response.status)


def test_readyz_and_grpc_health_report_not_serving_once_shutdown_begins(
    pki: Pki, coordinator: Coordinator, loop_thread: LoopThread
) -> None:
    port = loop_thread.run(coordinator.serve_http("localhost", 0))
    assert _get(f"http://localhost:{port}/readyz") == (200, "ready\n")
    assert _health(pki, coordinator.port) == health_pb2.HealthCheckResponse.SERVING

    coordinator.accepting = False
    loop_thread.run(coordinator.health.shutting_down())
    assert _get(f"http://localhost:{port}/readyz") == (503, "not ready: shutting down\n")
    assert _get(f"http://localhost:{port}/healthz") == (200, "ok\n")  # the process is up
    assert _health(pki, coordinator.port) == health_pb2.HealthCheckResponse.NOT_SERVING


def test_readyz_fails_when_the_ledger_is_unreachable(
    coordinator: Coordinator, loop_thread: LoopThread, tmp_path: object
) -> None:
    port = loop_thread.run(coordinator.serve_http("localhost", 0))
    ledger = coordinator.engine.ledger
    reachable = ledger.engine
    ledger.engine = create_engine("sqlite:////nonexistent-dir/ledger.sqlite3")
    try:
        status, body = _get(f"http://localhost:{port}/readyz")
    finally:
        ledger.engine = reachable
    assert status == 503 and body.startswith("not ready: ledger unreachable")


def test_released_hop_goes_back_to_pending_without_counting_as_a_failed_attempt(
    sites: dict[str, ScriptedSite], admin: AdminClient, coordinator: Coordinator
) -> None:
    admin.wait_for_sites({"site-a", "site-b"}, timeout=60)
    run_id = admin.start_run(
        parse_plan({"name": "t", "dataset": "notes", "labels": ["x", "y"],
                    "sites": ["site-a", "site-b"], "failure": {"max_retries": 0}})
    )  # fmt: skip
    site = sites["site-a"]
    task = site.next_task()
    stale = pb.HopResult(hop_id=task.hop_id, lease_token="0" * 32, released=True)
    with pytest.raises(grpc.RpcError) as refused:
        site.stub.ReportHopResult(stale, timeout=10)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION

    release = pb.HopResult(hop_id=task.hop_id, lease_token=task.lease_token, released=True,
                           error_code="released", error_message="site shutting down")  # fmt: skip
    assert site.stub.ReportHopResult(release, timeout=10).hop_status == "pending"
    again = site.next_task()  # the site is still connected: leased to it again at once
    assert again.hop_id == task.hop_id and again.lease_token != task.lease_token
    ref = site.upload(again, site.bundle(again))
    assert site.report(again, ref) == "committed"  # max_retries 0: a release is no failure

    events = [e for e in coordinator.engine.ledger.events(run_id) if e.hop_id == task.hop_id]
    assert [e.kind for e in events][:3] == ["hop.leased", "hop.released", "hop.leased"]
    assert events[1].payload["reason"] == "site shutting down"
    assert [e.payload["attempts"] for e in events if e.kind == "hop.leased"] == [1, 1]
    exposition = coordinator.engine.metrics.exposition().decode()
    assert 'baton_hops_total{status="released"} 1.0' in exposition


def test_connection_check_reports_the_coordinators_clock_and_what_runs_expect(
    pki: Pki, sites: dict[str, ScriptedSite], admin: AdminClient, coordinator: Coordinator
) -> None:
    admin.wait_for_sites({"site-a", "site-b"}, timeout=60)
    pinned = BASE  # the base model site-b has (preflight refuses a pin no site holds)
    admin.start_run(parse_plan({"name": "t", "dataset": "notes", "labels": ["x", "y"],
                                "sites": ["site-b"], "base_model_sha256": pinned}))  # fmt: skip
    before = time.time_ns()
    check = sites["site-b"].stub.CheckConnection(pb.ConnectionCheckRequest(), timeout=10)
    assert check.site_name == "site-b"
    assert before <= check.coordinator_time_unix_ns <= time.time_ns()
    assert check.certificate_expires_at > time.time()
    assert list(check.pinned_base_models) == [pinned] and list(check.datasets) == ["notes"]
    other = sites["site-a"].stub.CheckConnection(pb.ConnectionCheckRequest(), timeout=10)
    assert list(other.pinned_base_models) == [] and list(other.datasets) == []
    with (
        secure_channel(f"localhost:{coordinator.port}", pki.tls("admin")) as channel,
        pytest.raises(grpc.RpcError) as refused,
    ):
        pb_grpc.SiteServiceStub(channel).CheckConnection(pb.ConnectionCheckRequest())
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_lease_expiries_retries_and_refusals_are_counted_without_run_labels(
    sites: dict[str, ScriptedSite], admin: AdminClient, coordinator: Coordinator,
    engine_clock: EngineClock,
) -> None:  # fmt: skip
    admin.wait_for_sites({"site-a", "site-b"}, timeout=60)
    run_id = admin.start_run(parse_plan({
        "name": "t", "dataset": "notes", "labels": ["x", "y"], "sites": ["site-a"],
        "failure": {"lease_timeout_seconds": 60, "max_retries": 1, "retry_backoff_seconds": 0},
    }))  # fmt: skip
    site = sites["site-a"]
    first = site.next_task()
    engine_clock.advance(61)  # no heartbeat: the lease expired and the hop was leased again
    second = site.next_task()
    with pytest.raises(grpc.RpcError):
        site.upload(first, site.bundle(first))  # the old lease is fenced: a refusal
    site.report(second, site.upload(second, site.bundle(second)))
    exposition = coordinator.engine.metrics.exposition().decode()
    assert "baton_lease_expiries_total 1.0" in exposition
    assert 'baton_hops_total{status="retried"} 1.0' in exposition
    assert 'baton_hops_total{status="committed"} 1.0' in exposition
    assert 'baton_refusals_total{reason="failed_precondition"} 1.0' in exposition
    assert 'baton_hop_phase_seconds_count{phase="leased"} 2.0' in exposition  # both leases
    assert run_id not in exposition and first.hop_id not in exposition
