"""Preflight: a run its sites would not run is refused before it starts, with every reason."""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime
from pathlib import Path

import grpc
import pytest
from typer.testing import CliRunner

from coordinator.console.admin import AdminClient
from coordinator.console.cli import app
from coordinator.plan import RunPlan, parse_plan
from coordinator.preflight import SiteApprovals, SiteView, preflight_problems
from coordinator.server import Coordinator
from protocols.v1 import baton_pb2 as pb
from tests.conftest import Pki
from tests.coordinator_tests.conftest import BASE, ScriptedSite

runner = CliRunner()
NOTES = {"name": "notes", "task": "seq-classification", "labels": ["x", "y"]}


def _plan(*sites: str, **extra: object) -> RunPlan:
    return parse_plan(
        {"name": "t", "dataset": "notes", "labels": ["x", "y"], "sites": list(sites), **extra}
    )


def _view(name: str, **fields: object) -> SiteView:
    values: dict[str, object] = {
        "connected": True,
        "base_models": [{"name": "tiny", "sha256": BASE}],
        "datasets": [NOTES],
        "approvals": SiteApprovals(not_required=True),
    }
    values.update(fields)
    return SiteView(name=name, **values)  # type: ignore[arg-type]


def test_a_plan_every_site_can_run_has_no_problem() -> None:
    assert preflight_problems(_plan("a", "b"), {"a": _view("a"), "b": _view("b")}) == []


def test_an_offline_site_is_a_problem_unless_offline_is_allowed() -> None:
    dropped = datetime(2026, 11, 30, 2, 14, tzinfo=UTC)
    sites = {"a": _view("a", connected=False, offline_since=dropped, offline_since_exact=True)}
    [problem] = preflight_problems(_plan("a"), sites)
    assert problem == "a: offline since 2026-11-30 02:14 UTC (--allow-offline queues the run)"
    assert preflight_problems(_plan("a"), sites, allow_offline=True) == []


def test_every_data_problem_of_every_site_is_listed() -> None:
    other_model = "cd" * 32
    sites = {
        "a": _view("a", datasets=[{"name": "other", "task": "seq-classification"}]),
        "b": _view("b", datasets=[{**NOTES, "task": "tabular"}], base_models=[]),
        "c": _view("c", datasets=[{**NOTES, "labels": ["x", "y", "z"]}]),
        "d": _view("d", base_models=[{"name": "big", "sha256": other_model}]),
    }
    problems = preflight_problems(_plan("a", "b", "c", "d", base_model_sha256=BASE), sites)
    assert problems == [
        "a: no dataset 'notes' registered (registered: other)",
        "b: dataset 'notes' is registered for tabular tasks, the plan is seq-classification",
        "b: has no base model (seq-classification needs one)",
        "c: dataset 'notes' has label(s) z that the plan does not list (x, y)",
        f"d: base model {BASE[:12]} is not there (it has {other_model[:12]})",
    ]


def test_an_unapproved_bundle_is_a_problem_only_where_the_site_would_refuse_it() -> None:
    plan = _plan("a", "b", "c", "d")
    bundle = plan.approval_bundle().sha256
    sites = {
        "a": _view("a", approvals=SiteApprovals(bundles=frozenset({"0" * 64}))),
        "b": _view("b", approvals=SiteApprovals(bundles=frozenset({bundle}))),
        "c": _view("c", approvals=SiteApprovals(by_policy=True)),  # only the site can tell
        "d": _view("d", approvals=None),  # not reported since the coordinator started
    }
    assert preflight_problems(plan, sites) == [
        f"a: has not approved the run bundle {bundle} "
        f"(at the site, after review: baton-site approve {bundle})"
    ]


def _register_offline(pki: Pki, coordinator: Coordinator, name: str) -> None:
    """A site that said hello and left: registered, not connected."""
    site = ScriptedSite(pki, name, coordinator.port)
    site.connect()
    admin = AdminClient(f"localhost:{coordinator.port}", pki.tls("admin"))
    with admin:
        admin.wait_for_sites({name}, timeout=60)
        site.close()
        deadline = time.monotonic() + 60
        while any(s.connected for s in admin.sites() if s.name == name):
            assert time.monotonic() < deadline, f"{name} never disconnected"
            time.sleep(0.05)


def test_start_run_is_refused_with_every_problem_and_nothing_is_created(
    pki: Pki, coordinator: Coordinator, sites: dict[str, ScriptedSite], admin: AdminClient
) -> None:
    _register_offline(pki, coordinator, "site-c")
    plan = parse_plan({"name": "t", "dataset": "notes", "labels": ["x", "w"],
                       "sites": ["site-a", "site-c"]})  # fmt: skip
    with pytest.raises(grpc.RpcError) as refused:
        admin.start_run(plan)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    problems = refused.value.details().splitlines()
    assert (
        problems[0] == "site-a: dataset 'notes' has label(s) y that the plan does not list (x, w)"
    )
    assert problems[1].startswith("site-c: offline since ")
    assert len(problems) == 3 and problems[2].startswith("site-c: dataset 'notes' has label(s) y")
    # --allow-offline forgives only the offline site: the labels still refuse.
    with pytest.raises(grpc.RpcError) as still:
        admin.start_run(plan, allow_offline=True)
    assert "offline" not in still.value.details() and len(still.value.details().splitlines()) == 2
    assert admin.runs() == []
    refusals = [e for e in coordinator.engine.ledger.events() if e.kind == "access.refused"]
    assert [e.payload["method"] for e in refusals] == ["StartRun", "StartRun"]


def test_a_site_that_did_not_approve_the_bundle_refuses_the_start(
    pki: Pki, coordinator: Coordinator, admin: AdminClient
) -> None:
    site = ScriptedSite(pki, "site-a", coordinator.port)
    request = pb.HelloRequest(protocol_version=1, approved_bundles=["0" * 64])
    request.base_models.add(name="tiny", sha256=BASE)
    request.datasets.add(name="notes", task="seq-classification", labels=["x", "y"])
    site.connect()
    admin.wait_for_sites({"site-a"}, timeout=60)  # online: the refusal is the approval's
    site.stub.Hello(request, timeout=30)  # this site's approvals: some other bundle
    plan = _plan("site-a")
    with pytest.raises(grpc.RpcError) as refused:
        admin.start_run(plan)
    assert "has not approved the run bundle" in refused.value.details()
    request.approved_bundles.append(plan.approval_bundle().sha256)
    site.stub.Hello(request, timeout=30)  # what an agent does when its approvals change
    assert admin.start_run(plan)
    site.close()


def test_cli_prints_each_problem_then_queues_with_allow_offline_and_status_says_why(
    pki: Pki,
    coordinator: Coordinator,
    sites: dict[str, ScriptedSite],
    admin: AdminClient,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    _register_offline(pki, coordinator, "site-c")
    tls = pki.tls("admin")
    connection = ["--coordinator", f"localhost:{coordinator.port}", "--ca",
                  str(tls.ca_certificate), "--cert", str(tls.certificate), "--key",
                  str(tls.private_key)]  # fmt: skip
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(_plan("site-c", "site-a").to_json())

    refused = runner.invoke(app, ["run", "start", str(plan_file), *connection])
    assert refused.exit_code == 2
    lines = refused.output.splitlines()
    assert lines[0] == "error: run not started: 1 problem(s)"
    assert lines[1].startswith("  site-c: offline since ") and lines[1].endswith(
        "UTC (--allow-offline queues the run)"
    )
    assert admin.runs() == []

    with caplog.at_level(logging.INFO, logger="coordinator.engine"):
        started = runner.invoke(
            app, ["run", "start", str(plan_file), "--allow-offline", *connection]
        )
        assert started.exit_code == 0, started.output
        run_id = started.output.split("run started: ")[1].split()[0]
        status = runner.invoke(app, ["run", "status", run_id, *connection])
        for _ in range(5):  # every connect and watchdog tick dispatches again
            sites["site-b"].close()
            sites["site-b"] = ScriptedSite(pki, "site-b", coordinator.port)
            sites["site-b"].connect()
            admin.wait_for_sites({"site-b"}, timeout=60)
    assert status.exit_code == 0, status.output
    assert "hop 0: waiting for site-c: offline since " in status.output
    waits = [r for r in caplog.records if "waits for site site-c" in r.getMessage()]
    assert len(waits) == 1
