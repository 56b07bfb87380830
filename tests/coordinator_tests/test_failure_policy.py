"""Leases, failure policies and restarts of the run engine, over the real mTLS service."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from coordinator.console.admin import AdminClient
from coordinator.plan import parse_plan
from coordinator.server import Coordinator, build_server
from coordinator.settings import CoordinatorSettings
from protocols.v1 import baton_pb2 as pb
from tests.conftest import LoopThread, Pki
from tests.coordinator_tests.conftest import EngineClock, ScriptedSite, coordinator_settings

LEASE = 60.0  # seconds: the tests move the engine's clock past it instead of waiting


def _settings(pki: Pki, state_dir: Path, url: str, port: int = 0) -> CoordinatorSettings:
    return coordinator_settings(
        pki, state_dir, port=port, database_url=url, heartbeat_interval_ms=200
    )


@pytest.fixture
def cluster(
    pki: Pki, tmp_path: Path, loop_thread: LoopThread, database_url: str
) -> Iterator[dict[str, object]]:
    coordinator = loop_thread.run(build_server(_settings(pki, tmp_path / "state", database_url)))
    sites = {name: ScriptedSite(pki, name, coordinator.port) for name in ("site-a", "site-b")}
    for site in sites.values():
        site.connect()
    # site-c registers once, then goes away: the plan may name it, it is simply offline.
    offline = ScriptedSite(pki, "site-c", coordinator.port)
    offline.hello()
    offline.close()
    admin = AdminClient(f"localhost:{coordinator.port}", pki.tls("admin"))
    admin.wait_for_sites({"site-a", "site-b"}, timeout=60)
    yield {"coordinator": coordinator, "admin": admin, **sites}
    admin.close()
    for site in sites.values():
        site.close()
    loop_thread.run(coordinator.stop(0))


def _start(
    admin: AdminClient, sites: list[str], *, allow_offline: bool = False, **failure: object
) -> str:
    document = {"name": "t", "dataset": "notes", "labels": ["x", "y"], "sites": sites,
                "failure": {"retry_backoff_seconds": 0, **failure}}  # fmt: skip
    return admin.start_run(parse_plan(document), allow_offline=allow_offline)


def _wait(admin: AdminClient, run_id: str, predicate, timeout: float = 60) -> pb.RunStatus:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = admin.run(run_id)
        if predicate(run):
            return run
        time.sleep(0.05)
    raise TimeoutError(f"run never reached the expected state: {admin.run(run_id)}")


def _fail(site: ScriptedSite, task: pb.HopTask, code: str = "training-failed") -> str:
    result = pb.HopResult(hop_id=task.hop_id, lease_token=task.lease_token, ok=False,
                          error_code=code, error_message="boom")  # fmt: skip
    return site.stub.ReportHopResult(result, timeout=30).hop_status


def _finish(site: ScriptedSite, task: pb.HopTask) -> None:
    assert site.report(task, site.upload(task, site.bundle(task))) == "committed"


def test_expired_lease_is_retried_with_a_new_token_and_the_old_one_is_fenced(
    cluster, engine_clock: EngineClock
) -> None:  # type: ignore[no-untyped-def]
    admin, site = cluster["admin"], cluster["site-a"]
    run_id = _start(admin, ["site-a"], lease_timeout_seconds=LEASE, max_retries=1)
    first = site.next_task()
    engine_clock.advance(LEASE + 1)  # no heartbeat: the lease expires and the hop is leased again
    second = site.next_task()
    assert second.hop_id == first.hop_id and second.lease_token != first.lease_token
    with pytest.raises(grpc.RpcError) as fenced:
        site.upload(first, site.bundle(first))
    assert fenced.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    _finish(site, second)
    run = _wait(admin, run_id, lambda r: r.status == "completed")
    ledger = cluster["coordinator"].engine.ledger
    kinds = [e.kind for e in ledger.events(run_id)]
    assert kinds.count("hop.retry") == 1 and kinds.count("hop.committed") == 1
    assert ledger.run(run_id).hops[0].attempts == 2
    assert run.hops[0].status == "committed"


def test_heartbeats_keep_a_lease_alive(cluster, engine_clock: EngineClock, loop_thread) -> None:  # type: ignore[no-untyped-def]
    admin, site = cluster["admin"], cluster["site-a"]
    run_id = _start(admin, ["site-a"], lease_timeout_seconds=LEASE)
    task = site.next_task()
    for step in range(4):  # 4 x 2/3 of a lease: well past it, a beat within each lease
        beat = pb.Heartbeat(hop_id=task.hop_id, lease_token=task.lease_token,
                            phase="training", step=step, total_steps=4)  # fmt: skip
        assert not site.stub.SendHeartbeat(beat, timeout=30).cancel
        engine_clock.advance(LEASE * 2 / 3)
        loop_thread.run(cluster["coordinator"].engine.check_deadlines())  # a watchdog pass
    assert admin.run(run_id).hops[0].status == "training"
    _finish(site, task)
    assert _wait(admin, run_id, lambda r: r.status == "completed").hops[0].status == "committed"


def test_skip_policy_passes_the_last_committed_adapter_on(cluster) -> None:  # type: ignore[no-untyped-def]
    admin, a, b = cluster["admin"], cluster["site-a"], cluster["site-b"]
    run_id = _start(admin, ["site-a", "site-b", "site-a"], on_failure="skip")
    first = a.next_task()
    ref = a.upload(first, a.bundle(first))
    a.report(first, ref)
    assert _fail(b, b.next_task()) == "skipped"
    third = a.next_task()
    assert third.input_checkpoint.sha256 == ref.sha256
    _finish(a, third)
    run = _wait(admin, run_id, lambda r: r.status == "completed")
    assert [h.status for h in run.hops] == ["committed", "skipped", "committed"]
    assert run.final_sha256 == run.hops[2].output_sha256


def test_abort_policy_fails_the_run_and_records_why(cluster) -> None:  # type: ignore[no-untyped-def]
    admin, a = cluster["admin"], cluster["site-a"]
    run_id = _start(admin, ["site-a", "site-b"], on_failure="abort")
    assert _fail(a, a.next_task(), "base-model-mismatch") == "failed"
    run = admin.run(run_id)
    assert run.status == "failed" and "base-model-mismatch" in run.error
    assert run.hops[0].status == "failed" and run.hops[1].status == "pending"


def test_pause_policy_waits_for_an_admin_to_resume(cluster) -> None:  # type: ignore[no-untyped-def]
    admin, a = cluster["admin"], cluster["site-a"]
    run_id = _start(admin, ["site-a"], on_failure="pause")
    _fail(a, a.next_task())
    assert admin.run(run_id).status == "paused"
    admin._stub.ResumeRun(pb.RunControlRequest(run_id=run_id), timeout=30)
    _finish(a, a.next_task())
    assert _wait(admin, run_id, lambda r: r.status == "completed").status == "completed"


def test_offline_site_is_waited_for_then_the_policy_applies(cluster) -> None:  # type: ignore[no-untyped-def]
    admin, a = cluster["admin"], cluster["site-a"]
    run_id = _start(admin, ["site-c", "site-a"], allow_offline=True, on_failure="skip",
                    site_wait_seconds=0.5)  # fmt: skip
    task = a.next_task()  # arrives only once site-c's hop was skipped
    assert not task.HasField("input_checkpoint")
    _finish(a, task)
    run = _wait(admin, run_id, lambda r: r.status == "completed")
    assert run.hops[0].status == "skipped" and "site-c" in run.hops[0].error


def test_retried_report_of_a_committed_hop_commits_nothing_more(cluster) -> None:  # type: ignore[no-untyped-def]
    admin, a = cluster["admin"], cluster["site-a"]
    run_id = _start(admin, ["site-a"])
    task = a.next_task()
    ref = a.upload(task, a.bundle(task))
    assert a.report(task, ref) == "committed"
    assert a.report(task, ref) == "committed"
    kinds = [e.kind for e in cluster["coordinator"].engine.ledger.events(run_id)]
    assert kinds.count("hop.committed") == 1


def test_run_continues_after_the_coordinator_restarts(
    pki: Pki, tmp_path: Path, loop_thread: LoopThread, database_url: str
) -> None:
    state = tmp_path / "state"
    coordinator: Coordinator = loop_thread.run(build_server(_settings(pki, state, database_url)))
    port = coordinator.port
    site = ScriptedSite(pki, "site-a", port)
    site.connect()
    with AdminClient(f"localhost:{port}", pki.tls("admin")) as admin:
        admin.wait_for_sites({"site-a"}, timeout=60)
        run_id = _start(admin, ["site-a", "site-a"])
    task = site.next_task()
    loop_thread.run(coordinator.stop(0))  # the coordinator dies while the site trains

    coordinator = loop_thread.run(build_server(_settings(pki, state, database_url, port)))
    try:
        # The site finishes its hop and reports to the restarted coordinator.
        ref = site.upload(task, site.bundle(task))
        assert site.report(task, ref) == "committed"
        site.close()
        site = ScriptedSite(pki, "site-a", port)
        site.connect()
        second = site.next_task()
        assert second.input_checkpoint.sha256 == ref.sha256
        _finish(site, second)
        with AdminClient(f"localhost:{port}", pki.tls("admin")) as admin:
            run = _wait(admin, run_id, lambda r: r.status == "completed")
        assert [h.status for h in run.hops] == ["committed", "committed"]
        assert coordinator.engine.ledger.verify_chain() is None
    finally:
        site.close()
        loop_thread.run(coordinator.stop(0))
