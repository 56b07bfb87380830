"""The dashboard over FastAPI's TestClient: every route, every role, CSRF, login throttling."""

from __future__ import annotations

import asyncio
import io
import json
import re
import zipfile
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from argon2 import PasswordHasher
from fastapi.testclient import TestClient

from coordinator.dashboard import (
    Account,
    AccountError,
    AccountStore,
    DashboardRole,
    create_app,
)
from coordinator.engine import RunEngine, approval_bundle
from coordinator.ledger import Ledger
from coordinator.store import CheckpointStore
from tests.conftest import Pki

PASSWORD = "correct horse battery"
PLAN = {
    "name": "dash", "task": "tabular", "dataset": "heart", "labels": ["0", "1"],
    "sites": ["site-a", "site-b"], "cycles": 1, "options": {"model": "logistic"},
    "defaults": {"steps": 5, "batch_size": 4, "learning_rate": 0.05},
}  # fmt: skip
PLAN_TOML = """
name = "dash-toml"
task = "tabular"
dataset = "heart"
labels = ["0", "1"]
sites = ["site-a", "site-b"]
cycles = 1
[options]
model = "logistic"
[defaults]
steps = 5
batch_size = 4
learning_rate = 0.05
"""


@pytest.fixture
def engine(pki: Pki, tmp_path: Path, sqlite_ledger_url: str) -> Iterator[RunEngine]:
    ledger = Ledger(sqlite_ledger_url)
    ledger.migrate()
    for site in ("site-a", "site-b"):
        ledger.register_site(site, agent_version="test", capabilities=["tabular"],
                             base_models=[],
                             datasets=[{"name": "heart", "task": "tabular", "labels": ["0", "1"]}],
                             certificate_serial="abc1" if site == "site-a" else "abc2")  # fmt: skip
    engine = RunEngine(ledger, CheckpointStore(tmp_path / "checkpoints"), tmp_path / "runs",
                       ca_pem=(pki.directory / "ca.crt").read_bytes(),
                       max_checkpoint_bytes=1 << 20)  # fmt: skip
    yield engine
    ledger.close()


@pytest.fixture
def accounts(engine: RunEngine) -> AccountStore:
    store = AccountStore(engine.ledger, PasswordHasher(time_cost=1, memory_cost=8192))
    for role in DashboardRole:
        store.add(role.label, role, PASSWORD, by="test")
    return store


@pytest.fixture
def client(engine: RunEngine, accounts: AccountStore) -> Iterator[TestClient]:
    app = create_app(engine, accounts=accounts, stream_seconds=0, stream_interval=0.01)
    with TestClient(app, base_url="https://testserver") as test_client:
        yield test_client


def _form_token(html: str) -> str:
    found = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert found, html[:500]
    return found.group(1)


def login(client: TestClient, name: str, password: str = PASSWORD) -> str:
    """Logs in through the form; returns the session's CSRF token."""
    page = client.get("/login")
    response = client.post("/login", data={"name": name, "password": password,
                                           "csrf_token": _form_token(page.text)})  # fmt: skip
    assert response.status_code == 200, response.text[:300]
    return _form_token(client.get("/").text)


def refused_below(
    client: TestClient,
    method: str,
    path: str,
    role: DashboardRole,
    body: Callable[[str], dict[str, Any]],
) -> None:
    """Checks that every role below `role` is refused `method path` (sent with `body(csrf)`) with
    403 and the role it needs."""
    for lower in DashboardRole:
        if lower >= role:
            continue
        client.cookies.clear()
        csrf = login(client, lower.label)
        response = client.request(method, path, headers={"X-CSRF-Token": csrf}, **body(csrf))
        assert response.status_code == 403, (lower, response.text[:200])
        assert f"this needs the {role.label} role" in response.text


def _start(engine: RunEngine, client: TestClient) -> str:
    return client.portal.call(lambda: engine.start_run(_plan()))  # type: ignore[union-attr]


def _plan():  # type: ignore[no-untyped-def]
    from coordinator.plan import parse_plan

    return parse_plan(PLAN)


# ---- auth ----------------------------------------------------------------------------------------


def test_pages_redirect_to_login_and_api_answers_401_without_credentials(
    client: TestClient,
) -> None:
    for path in ("/", "/runs", "/ledger", "/sites", "/runs/new", "/ledger/verify"):
        response = client.get(path, follow_redirects=False)
        assert response.status_code == 303, path
        assert response.headers["location"].startswith("/login?next=")
    for path in ("/api/v1/overview", "/api/v1/runs", "/api/v1/events", "/api/v1/sites",
                 "/api/v1/ledger/verify", "/api/v1/me"):  # fmt: skip
        assert client.get(path).status_code == 401, path


def test_login_sets_a_secure_httponly_strict_session_cookie(client: TestClient) -> None:
    page = client.get("/login")
    response = client.post("/login", data={"name": "viewer", "password": PASSWORD,
                                           "csrf_token": _form_token(page.text)},
                           follow_redirects=False)  # fmt: skip
    assert response.status_code == 303
    cookie = response.headers["set-cookie"]
    assert "baton_session=" in cookie
    assert "HttpOnly" in cookie and "Secure" in cookie and "SameSite=strict" in cookie
    assert client.get("/api/v1/me").json() == {"account": "viewer", "role": "viewer"}


def test_login_without_the_form_token_is_refused(client: TestClient) -> None:
    client.get("/login")
    response = client.post("/login", data={"name": "viewer", "password": PASSWORD})
    assert response.status_code == 403
    assert "the login form expired" in response.text


def test_failed_logins_are_ledgered_without_the_password_and_then_throttled(
    client: TestClient, engine: RunEngine
) -> None:
    token = _form_token(client.get("/login").text)
    for _ in range(5):
        response = client.post("/login", data={"name": "admin", "password": "wrong password!",
                                               "csrf_token": token})  # fmt: skip
        assert response.status_code == 401
        assert "wrong account name or password" in response.text
    response = client.post("/login", data={"name": "admin", "password": PASSWORD,
                                           "csrf_token": token})  # fmt: skip
    assert response.status_code == 429
    assert "too many failed logins: try again in" in response.text
    assert int(response.headers["retry-after"]) > 0
    failed = [e for e in engine.ledger.events() if e.kind == "dashboard.login-failed"]
    assert len(failed) == 5
    assert failed[0].payload == {"account": "admin", "client": "testclient"}
    assert all("wrong password" not in json.dumps(e.payload) for e in engine.ledger.events())
    # The throttle is per account: another account still logs in from elsewhere.
    login(client, "viewer")


def test_failed_logins_are_throttled_per_client_address_across_accounts(
    client: TestClient,
) -> None:
    app_state = client.app.state.dashboard  # type: ignore[attr-defined]
    app_state.throttle.max_per_client = 3
    token = _form_token(client.get("/login").text)
    for name in ("nobody-1", "nobody-2", "nobody-3"):
        response = client.post("/login", data={"name": name, "password": "x" * 12,
                                               "csrf_token": token})  # fmt: skip
        assert response.status_code == 401
    response = client.post("/login", data={"name": "viewer", "password": PASSWORD,
                                           "csrf_token": token})  # fmt: skip
    assert response.status_code == 429


def test_logout_ends_the_session(client: TestClient) -> None:
    csrf = login(client, "viewer")
    assert client.post("/logout", data={"csrf_token": csrf}).status_code == 200
    assert client.get("/api/v1/me").status_code == 401


def test_one_time_login_link_works_once(client: TestClient, accounts: AccountStore) -> None:
    token = accounts.issue_token("admin", kind="login", valid_for=timedelta(hours=1), by="test")
    assert client.get(f"/login/link?token={token}").status_code == 200
    assert client.get("/api/v1/me").json()["account"] == "admin"
    client.cookies.clear()
    response = client.get(f"/login/link?token={token}")
    assert response.status_code == 401
    assert "invalid, expired or used already" in response.text


def test_api_token_authenticates_scripts_without_csrf(
    client: TestClient, accounts: AccountStore, engine: RunEngine
) -> None:
    token = accounts.issue_token("operator", by="test")
    headers = {"Authorization": f"Bearer {token}"}
    assert client.get("/api/v1/me", headers=headers).json()["role"] == "operator"
    response = client.post("/api/v1/runs", json={"plan": json.dumps(PLAN)}, headers=headers)
    assert response.status_code == 409  # preflight: the sites are offline
    assert "site-a: offline" in response.json()["detail"]
    response = client.post(
        "/api/v1/runs", json={"plan": json.dumps(PLAN), "allow_offline": True}, headers=headers
    )
    assert response.status_code == 201, response.text
    run_id = response.json()["run_id"]
    created = [e for e in engine.ledger.events(run_id) if e.kind == "run.created"]
    assert created[0].payload["by"] == "dashboard:operator"
    bad = {"Authorization": "Bearer baton_not-a-token"}
    assert client.get("/api/v1/me", headers=bad).status_code == 401
    # A login-link token is not an API token.
    link = accounts.issue_token("operator", kind="login", by="test")
    assert client.get("/api/v1/me", headers={"Authorization": f"Bearer {link}"}).status_code == 401


def test_accounts_refuse_weak_passwords_bad_names_and_duplicates(accounts: AccountStore) -> None:
    with pytest.raises(AccountError, match="at least 12 characters"):
        accounts.add("new", DashboardRole.VIEWER, "short", by="test")
    with pytest.raises(AccountError, match="must be 1-64 characters"):
        accounts.add("Bad Name", DashboardRole.VIEWER, PASSWORD, by="test")
    with pytest.raises(AccountError, match="exists already"):
        accounts.add("viewer", DashboardRole.VIEWER, PASSWORD, by="test")
    with pytest.raises(AccountError, match="unknown role"):
        DashboardRole.parse("root")


# ---- CSRF and roles ------------------------------------------------------------------------------


def test_state_changing_requests_with_a_session_need_its_csrf_token(
    client: TestClient, engine: RunEngine
) -> None:
    csrf = login(client, "operator")
    run_id = _start(engine, client)
    for data in ({}, {"csrf_token": "forged"}):
        response = client.post(f"/runs/{run_id}/pause", data=data)
        assert response.status_code == 403
        assert "missing or wrong CSRF token" in response.text
    assert client.post("/api/v1/runs/" + run_id + "/pause").status_code == 403
    assert engine.ledger.run(run_id).status == "running"
    response = client.post(f"/api/v1/runs/{run_id}/pause", headers={"X-CSRF-Token": csrf})
    assert response.status_code == 200
    assert response.json()["status"] == "paused"


@pytest.mark.parametrize(
    ("method", "path", "role"),
    [
        ("GET", "/runs/new", DashboardRole.OPERATOR),
        ("POST", "/runs", DashboardRole.OPERATOR),
        ("POST", "/runs/RUN/pause", DashboardRole.OPERATOR),
        ("POST", "/runs/RUN/resume", DashboardRole.OPERATOR),
        ("POST", "/runs/RUN/skip", DashboardRole.OPERATOR),
        ("POST", "/runs/RUN/abort", DashboardRole.OPERATOR),
        ("POST", "/runs/RUN/evaluations", DashboardRole.OPERATOR),
        ("GET", "/runs/RUN/adapter.zip", DashboardRole.OPERATOR),
        ("POST", "/sites/revoke", DashboardRole.ADMIN),
        ("POST", "/api/v1/runs", DashboardRole.OPERATOR),
        ("POST", "/api/v1/runs/RUN/pause", DashboardRole.OPERATOR),
        ("POST", "/api/v1/runs/RUN/abort", DashboardRole.OPERATOR),
        ("POST", "/api/v1/runs/RUN/evaluations", DashboardRole.OPERATOR),
        ("GET", "/api/v1/runs/RUN/adapter.zip", DashboardRole.OPERATOR),
        ("POST", "/api/v1/certificates/revoke", DashboardRole.ADMIN),
    ],
)
def test_each_action_is_refused_below_its_role_and_changes_nothing(
    client: TestClient, engine: RunEngine, method: str, path: str, role: DashboardRole
) -> None:
    run_id = _start(engine, client)
    before = len(engine.ledger.events())

    def body(csrf: str) -> dict[str, Any]:
        if "/api/" in path:
            return {"json": {"plan": "{}", "serial": "abc1"}}
        return {"data": {"csrf_token": csrf, "plan": "x", "serial": "abc1"}}

    refused_below(client, method, path.replace("RUN", run_id), role, body)
    assert len(engine.ledger.events()) == before
    assert engine.ledger.run(run_id).status == "running"


@pytest.mark.parametrize("role", list(DashboardRole))
def test_every_page_and_read_endpoint_answers_every_role(
    client: TestClient, engine: RunEngine, role: DashboardRole
) -> None:
    run_id = _start(engine, client)
    login(client, role.label)
    for path in ("/", "/runs", "/runs?status=running&limit=5", f"/runs/{run_id}", "/ledger",
                 f"/ledger?run={run_id}&kind=run.created", "/ledger/verify", "/sites",
                 "/api/v1/overview", "/api/v1/runs", f"/api/v1/runs/{run_id}", "/api/v1/events",
                 "/api/v1/sites", "/api/v1/ledger/verify", "/api/v1/me",
                 "/api/v1/openapi.json"):  # fmt: skip
        response = client.get(path)
        assert response.status_code == 200, (path, response.text[:300])
    export = client.get("/ledger/export.jsonl")
    lines = [json.loads(line) for line in export.text.splitlines()]
    assert [e["seq"] for e in lines] == sorted(e["seq"] for e in lines)
    assert lines[-1]["hash"] == engine.ledger.head()


def test_unknown_run_is_404_on_pages_and_api(client: TestClient) -> None:
    login(client, "viewer")
    assert client.get("/runs/nope").status_code == 404
    assert client.get("/api/v1/runs/nope").json() == {"detail": "no run 'nope'"}


# ---- pages show the ledger's state ---------------------------------------------------------------


def test_overview_shows_sites_certificates_and_active_runs(
    client: TestClient, engine: RunEngine
) -> None:
    run_id = _start(engine, client)
    login(client, "viewer")
    overview = client.get("/api/v1/overview").json()
    assert [s["name"] for s in overview["sites"]] == ["site-a", "site-b"]
    assert overview["sites_online"] == 0
    assert [r["run_id"] for r in overview["active_runs"]] == [run_id]
    assert overview["run_counts"] == {"running": 1}
    page = client.get("/").text
    assert "site-a" in page and run_id[:12] in page and "offline" in page


def test_run_page_shows_where_the_model_waits_and_hop_timeline(
    client: TestClient, engine: RunEngine
) -> None:
    run_id = _start(engine, client)
    login(client, "viewer")
    detail = client.get(f"/api/v1/runs/{run_id}").json()
    assert detail["holder"] == "waiting for site-a to take hop 0"
    assert detail["approval_bundle_sha256"] == approval_bundle(engine.ledger.run(run_id)).sha256
    assert [(h["index"], h["site"], h["status"]) for h in detail["hops"]] == [
        (0, "site-a", "pending"), (1, "site-b", "pending")]  # fmt: skip
    page = client.get(f"/runs/{run_id}").text
    assert "waiting for site-a to take hop 0" in page
    assert 'data-live-src="/runs/' in page


def test_runs_are_paged_in_sql(client: TestClient, engine: RunEngine) -> None:
    ids = [_start(engine, client) for _ in range(5)]
    login(client, "viewer")
    first = client.get("/api/v1/runs?limit=2").json()
    second = client.get("/api/v1/runs?limit=2&offset=2").json()
    assert first["total"] == 5
    assert [r["run_id"] for r in first["runs"] + second["runs"]] == ids[::-1][:4]
    assert client.get("/api/v1/runs?limit=0").status_code == 422


def test_ledger_view_filters_and_pages_by_sequence(client: TestClient, engine: RunEngine) -> None:
    run_id = _start(engine, client)
    login(client, "viewer")
    page = client.get("/api/v1/events?limit=2").json()
    assert len(page["events"]) == 2
    older = client.get(f"/api/v1/events?limit=2&before={page['next_before']}").json()
    assert older["events"][0]["seq"] < page["events"][-1]["seq"]
    created = client.get(f"/api/v1/events?run={run_id}&kind=run.created").json()["events"]
    assert [e["kind"] for e in created] == ["run.created"]
    by_site = client.get("/api/v1/events?site=site-b").json()["events"]
    assert {e["site"] for e in by_site} == {"site-b"}


def test_verify_reports_a_tampered_event(client: TestClient, engine: RunEngine) -> None:
    login(client, "viewer")
    assert client.get("/api/v1/ledger/verify").json()["ok"] is True
    assert "ledger verifies:" in client.get("/ledger/verify").text
    with engine.ledger.engine.begin() as connection:
        from sqlalchemy import text

        connection.execute(text("UPDATE events SET kind = 'forged' WHERE seq = 2"))
    result = client.get("/api/v1/ledger/verify").json()
    assert result["ok"] is False and result["broken_seq"] == 2
    assert "ledger does not verify at event 2" in client.get("/ledger/verify").text


# ---- actions -------------------------------------------------------------------------------------


def test_operator_starts_a_run_from_pasted_toml(client: TestClient, engine: RunEngine) -> None:
    csrf = login(client, "operator")
    assert "Run plan (TOML or JSON)" in client.get("/runs/new").text
    response = client.post("/runs", data={"plan": PLAN_TOML, "csrf_token": csrf,
                                          "allow_offline": "true"},
                           follow_redirects=False)  # fmt: skip
    assert response.status_code == 303
    run_id = response.headers["location"].rsplit("/", 1)[1]
    assert engine.ledger.run(run_id).name == "dash-toml"


def test_a_bad_plan_is_shown_back_with_its_error_and_starts_nothing(
    client: TestClient, engine: RunEngine
) -> None:
    csrf = login(client, "operator")
    response = client.post("/runs", data={"plan": "name = [", "csrf_token": csrf})
    assert response.status_code == 422
    assert "run plan is neither JSON nor valid TOML" in response.text
    bad_site = json.dumps({**PLAN, "sites": ["site-z"]})
    response = client.post("/runs", data={"plan": bad_site, "csrf_token": csrf})
    assert "never registered: site-z" in response.text
    assert engine.ledger.run_status_counts() == {}


def test_pause_resume_abort_are_ledgered_with_the_acting_account(
    client: TestClient, engine: RunEngine
) -> None:
    run_id = _start(engine, client)
    csrf = login(client, "operator")
    for action, status in (("pause", "paused"), ("resume", "running"), ("abort", "aborted")):
        response = client.post(f"/runs/{run_id}/{action}",
                               data={"csrf_token": csrf, "reason": "test"})  # fmt: skip
        assert response.status_code == 200
        assert engine.ledger.run(run_id).status == status
    kinds = {e.kind: e.payload for e in engine.ledger.events(run_id)}
    for kind in ("run.paused", "run.running", "run.aborted"):
        assert kinds[kind]["by"] == "dashboard:operator", kind
    # Refused actions come back as a message, not an error page, and change nothing.
    page = client.post(f"/runs/{run_id}/resume", data={"csrf_token": csrf}).text
    assert "resume refused: run " in page and "is aborted, not paused" in page


def test_skip_moves_a_paused_run_past_its_failed_hop(client: TestClient, engine: RunEngine) -> None:
    run_id = _start(engine, client)
    run = engine.ledger.run(run_id)
    engine.ledger.transition_hop(
        run.hops[0].id, expected=("pending",), status="failed", event="hop.failed",
        error_code="oom", error="out of memory",
    )  # fmt: skip
    engine.ledger.transition_run(run_id, expected=("running",), status="paused")
    csrf = login(client, "operator")
    detail = client.get(f"/api/v1/runs/{run_id}").json()
    assert detail["hops"][0]["error_code"] == "oom"
    assert "<code>oom</code> out of memory" in client.get(f"/runs/{run_id}").text
    client.post(f"/runs/{run_id}/skip", data={"csrf_token": csrf})
    run = engine.ledger.run(run_id)
    assert run.status == "running" and run.hops[0].status == "skipped"
    skipped = [e for e in engine.ledger.events(run_id) if e.kind == "hop.skipped"]
    assert skipped[0].payload["by"] == "dashboard:operator"


def test_admin_revokes_a_certificate_and_the_site_shows_revoked(
    client: TestClient, engine: RunEngine
) -> None:
    csrf = login(client, "admin")
    response = client.post("/sites/revoke", data={"csrf_token": csrf, "serial": "ABC2",
                                                  "reason": "laptop stolen"})  # fmt: skip
    assert "certificate ABC2 revoked" in response.text
    assert engine.ledger.revocations() == {"abc2": "laptop stolen"}
    event = next(e for e in engine.ledger.events() if e.kind == "certificate.revoked")
    assert event.payload["by"] == "dashboard:admin"
    sites = {s["name"]: s for s in client.get("/api/v1/sites").json()}
    assert sites["site-b"]["revoked"] == "laptop stolen" and sites["site-a"]["revoked"] is None
    bad = client.post("/sites/revoke", data={"csrf_token": csrf, "serial": "xyz"})
    assert "revocation refused: not a hexadecimal certificate serial" in bad.text


def test_completed_run_offers_its_adapter_as_a_peft_zip(
    client: TestClient, engine: RunEngine
) -> None:
    run_id = _start(engine, client)
    folder = engine.final_adapter_dir(run_id)
    folder.mkdir(parents=True)
    (folder / "adapter_model.safetensors").write_bytes(b"weights")
    (folder / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    assert client.portal is not None
    client.portal.call(lambda: engine.abort_run(run_id, "x"))
    login(client, "operator")
    assert client.get(f"/runs/{run_id}/adapter.zip").status_code == 404  # aborted: no final
    engine.ledger.transition_run(run_id, expected=("aborted",), status="completed",
                                 final_sha256="ab" * 32)  # fmt: skip
    response = client.get(f"/runs/{run_id}/adapter.zip")
    assert response.headers["content-type"] == "application/zip"
    names = zipfile.ZipFile(io.BytesIO(response.content)).namelist()
    assert sorted(n.split("/")[1] for n in names) == ["adapter_config.json",
                                                      "adapter_model.safetensors"]  # fmt: skip
    assert "Download final adapter" in client.get(f"/runs/{run_id}").text
    api = client.get(f"/api/v1/runs/{run_id}/adapter.zip")
    assert api.status_code == 200 and api.content[:2] == b"PK"


def test_run_stream_sends_the_live_timeline_as_server_sent_events(
    client: TestClient, engine: RunEngine
) -> None:
    run_id = _start(engine, client)
    login(client, "viewer")
    with client.stream("GET", f"/runs/{run_id}/stream") as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        body = "".join(response.iter_text())
    assert "event: update" in body and "waiting for site-a to take hop 0" in body
    with client.stream("GET", "/overview/stream") as response:
        assert "site-a" in "".join(response.iter_text())


def test_security_headers_forbid_framing_and_foreign_scripts(client: TestClient) -> None:
    response = client.get("/login")
    assert "script-src 'self'" in response.headers["content-security-policy"]
    assert response.headers["x-frame-options"] == "DENY"
    assert client.get("/static/live.js").status_code == 200


def test_login_redirect_never_leaves_the_dashboard(client: TestClient) -> None:
    page = client.get("/login?next=//evil.example/")
    response = client.post("/login", data={"name": "viewer", "password": PASSWORD, "next":
                                           "//evil.example/", "csrf_token": _form_token(page.text)},
                           follow_redirects=False)  # fmt: skip
    assert response.headers["location"] == "/"


def test_create_app_builds_nothing_at_import_time() -> None:
    import coordinator.dashboard._app as module

    assert not any(type(v).__name__ == "FastAPI" for v in vars(module).values())
    asyncio.get_event_loop_policy()  # module import left no loop or server running


# ---- studies -------------------------------------------------------------------------------------


@pytest.fixture
def study(engine: RunEngine) -> str:
    from coordinator.console.study import RunTemplate, attach_run_template, study_storage_url
    from ordering import IntRange, OrderingStudy, SearchSpace, SyntheticObjective

    objective = SyntheticObjective(2, seed=0)  # sites site-0 and site-1
    for site in objective.sites:
        engine.ledger.register_site(
            site, agent_version="test", capabilities=["tabular"], base_models=[],
            datasets=[{"name": "heart", "task": "tabular", "labels": ["0", "1"]}],
            certificate_serial="1",
        )  # fmt: skip
    storage = study_storage_url(engine.ledger.url)
    space = SearchSpace(sites=objective.sites, steps=IntRange(5, 20))
    created = OrderingStudy.create(storage, "order-search", space, "lehmer", seed=0)
    attach_run_template(created, RunTemplate(dataset="heart", labels=("0", "1"), task="tabular",
                                             options={"model": "logistic"}))  # fmt: skip
    created.optimize(objective, n_trials=4)
    return "order-search"


def test_study_view_shows_trials_best_so_far_and_compute_per_site(
    client: TestClient, study: str
) -> None:
    login(client, "viewer")
    assert [s["name"] for s in client.get("/api/v1/studies").json()] == [study]
    detail = client.get(f"/api/v1/studies/{study}").json()
    assert len(detail["trials"]) == 4
    assert all(t["order"] in ("site-0 > site-1", "site-1 > site-0") for t in detail["trials"])
    assert "steps" in detail["trials"][0]["hyperparameters"]
    values = [v for _, v in detail["best_so_far"]]
    assert values == sorted(values)  # maximize: never goes down
    assert set(detail["compute_seconds_by_site"]) == {"site-0", "site-1"}
    page = client.get(f"/studies/{study}").text
    assert "Best so far" in page and "<svg" in page
    assert detail["best_plan"].replace(">", "&gt;") in page
    assert client.get("/studies").status_code == 200
    assert client.get("/api/v1/studies/nope").status_code == 404


def test_operator_starts_a_run_of_a_studys_best_plan(
    client: TestClient, engine: RunEngine, study: str
) -> None:
    csrf = login(client, "operator")
    response = client.post(f"/studies/{study}/start-best",
                           data={"csrf_token": csrf, "allow_offline": "true"},
                           follow_redirects=False)  # fmt: skip
    assert response.status_code == 303
    run_id = response.headers["location"].rsplit("/", 1)[1]
    created = next(e for e in engine.ledger.events(run_id) if e.kind == "run.created")
    assert created.payload["by"] == "dashboard:operator"
    assert created.payload["name"] == "order-search-best"
    client.cookies.clear()
    viewer_csrf = login(client, "viewer")
    refused = client.post(f"/studies/{study}/start-best", data={"csrf_token": viewer_csrf})
    assert refused.status_code == 403


def test_no_study_storage_means_an_empty_list_and_no_file_created(
    client: TestClient, engine: RunEngine
) -> None:
    login(client, "viewer")
    assert client.get("/api/v1/studies").json() == []
    assert not any("studies" in p.name for p in Path(engine.ledger.url[10:]).parent.iterdir())


def test_the_dashboard_imports_optuna_only_when_a_study_page_is_asked_for() -> None:
    import subprocess
    import sys

    code = ("import sys, coordinator.dashboard, coordinator.server; "
            "print('optuna' in sys.modules)")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False", out.stderr


def test_demo_login_link_makes_a_demo_admin_and_a_link_that_works_once(
    tmp_path: Path, client: TestClient
) -> None:
    from coordinator.console.demo import demo_login_link

    state = tmp_path / "demo-state"
    state.mkdir()
    ledger = Ledger(f"sqlite:///{state / 'ledger.sqlite3'}")
    ledger.migrate()
    ledger.close()
    link = demo_login_link(state, "https://localhost:9999")
    prefix = "https://localhost:9999/login/link?token="
    assert link.startswith(prefix)
    ledger = Ledger(f"sqlite:///{state / 'ledger.sqlite3'}")
    try:
        store = AccountStore(ledger)
        expected = Account("demo-admin", DashboardRole.ADMIN)
        assert store.get("demo-admin") == expected
        assert store.account_for_token(link.removeprefix(prefix), kind="login") == expected
        assert store.account_for_token(link.removeprefix(prefix), kind="login") is None
        assert "password" not in json.dumps([e.payload for e in ledger.events()])
    finally:
        ledger.close()


def test_bad_login_links_are_throttled_per_client_address(
    client: TestClient, engine: RunEngine
) -> None:
    client.app.state.dashboard.throttle.max_per_client = 2  # type: ignore[attr-defined]
    for _ in range(2):
        assert client.get("/login/link?token=baton_guess").status_code == 401
    assert client.get("/login/link?token=baton_guess").status_code == 429
    failed = [e for e in engine.ledger.events() if e.kind == "dashboard.login-failed"]
    assert len(failed) == 2  # throttled attempts do not grow the ledger


def test_ledger_page_queries_work_on_every_backend(database_url: str) -> None:
    from coordinator.ledger import HopRow

    ledger = Ledger(database_url)
    ledger.migrate()
    try:
        for number in range(3):
            hops = [HopRow(id=f"h{number}{i}", index=i, site=f"s{i}", hyperparameters={},
                           status="pending", metrics={}) for i in range(2)]  # fmt: skip
            ledger.create_run(f"r{number}", f"run {number}", {}, hops, None, by="x")
        ledger.transition_run("r1", expected=("running",), status="paused")
        ledger.record_event("site.hello", site="s1")
        assert [r.id for r in ledger.runs_page(limit=2)] == ["r2", "r1"]
        assert [r.id for r in ledger.runs_page(limit=2, offset=2)] == ["r0"]
        assert [r.id for r in ledger.runs_page(limit=5, status="paused")] == ["r1"]
        assert ledger.run_status_counts() == {"running": 2, "paused": 1}
        assert ledger.hop_counts(["r0", "r2"]) == {"r0": {"pending": 2}, "r2": {"pending": 2}}
        assert ledger.hop_counts([]) == {}
        newest = ledger.events_page(limit=2)
        assert [e.kind for e in newest] == ["site.hello", "run.paused"]
        older = ledger.events_page(limit=10, before=newest[-1].seq)
        assert [e.kind for e in older] == ["run.created"] * 3
        assert [e.seq for e in ledger.events_page(limit=10, after=2, ascending=True)] == [3, 4, 5]
        assert [e.run_id for e in ledger.events_page(limit=10, run_id="r1")] == ["r1", "r1"]
        assert [e.kind for e in ledger.events_page(limit=10, site="s1")] == ["site.hello"]
        assert len(ledger.events_page(limit=10, kind="run.created")) == 3
        assert ledger.event_count() == 5
        assert ledger.checkpoints_of_run("r0") == []
    finally:
        ledger.close()


def test_admin_cli_adds_accounts_and_refuses_bad_input_with_one_line(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from coordinator.console.cli import app

    runner = CliRunner()
    state = str(tmp_path / "state")
    (tmp_path / "short").write_text("short\n")
    weak = runner.invoke(app, ["admin", "add", "a", "--password-file", str(tmp_path / "short"),
                               "--state-dir", state])  # fmt: skip
    assert weak.exit_code == 2
    assert "password must have at least 12 characters" in weak.output
    role = runner.invoke(app, ["admin", "add", "a", "--role", "root", "--state-dir", state])
    assert role.exit_code == 2 and "unknown role 'root'" in role.output
    missing = runner.invoke(app, ["admin", "token", "nobody", "--state-dir", state])
    assert missing.exit_code == 2 and "no account 'nobody'" in missing.output
    prompted = runner.invoke(app, ["admin", "add", "b", "--role", "admin", "--state-dir", state],
                             input="a long enough password\na long enough password\n")  # fmt: skip
    assert prompted.exit_code == 0, prompted.output
    assert "account b (admin) added" in prompted.output
    again = runner.invoke(app, ["admin", "add", "b", "--state-dir", state],
                          input="a long enough password\na long enough password\n")  # fmt: skip
    assert again.exit_code == 2 and "account 'b' exists already" in again.output
    assert "Traceback" not in weak.output + role.output + missing.output + again.output
    link = runner.invoke(app, ["admin", "login-link", "b", "--url", "https://h:1/",
                               "--state-dir", state])  # fmt: skip
    assert link.stdout.startswith("https://h:1/login/link?token=baton_")


def _presenting(app: object, pem: str) -> object:
    """The app as the dashboard's TLS protocol hands it a verified client certificate."""

    async def with_certificate(scope, receive, send):  # type: ignore[no-untyped-def]
        scope.setdefault("extensions", {})["tls"] = {"client_cert_chain": [pem]}
        await app(scope, receive, send)  # type: ignore[operator]

    return with_certificate


def test_admin_certificate_logs_in_as_admin_and_other_certificates_do_not(
    engine: RunEngine, accounts: AccountStore, pki: Pki
) -> None:
    app = create_app(engine, accounts=accounts)
    admin_pem = (pki.directory / "admin.crt").read_text()
    with TestClient(_presenting(app, admin_pem), base_url="https://testserver") as client:  # type: ignore[arg-type]
        assert client.get("/login/certificate").status_code == 200
        assert client.get("/api/v1/me").json() == {"account": "admin", "role": "admin"}
    site_pem = (pki.directory / "site-a.crt").read_text()
    with TestClient(_presenting(app, site_pem), base_url="https://testserver") as client:  # type: ignore[arg-type]
        response = client.get("/login/certificate")
        assert response.status_code == 401
        assert "certificate login refused: a site certificate cannot log in here" in response.text
    from protocols.pki import identity_from_pem

    serial = format(identity_from_pem(admin_pem.encode()).serial, "x")
    with TestClient(_presenting(app, admin_pem), base_url="https://testserver") as client:  # type: ignore[arg-type]
        assert client.portal is not None
        client.portal.call(lambda: engine.revoke(serial, "lost", by="test"))
        assert "this certificate is revoked" in client.get("/login/certificate").text
    with TestClient(app, base_url="https://testserver") as client:
        assert "presented no certificate" in client.get("/login/certificate").text
    kinds = [e.kind for e in engine.ledger.events()]
    assert kinds.count("dashboard.certificate-login") == 1
    assert kinds.count("dashboard.login-failed") == 3


def test_a_federated_runs_page_lists_its_rounds(client: TestClient, engine: RunEngine) -> None:
    from coordinator.plan import parse_plan

    plan = parse_plan({**PLAN, "name": "fed", "mode": "federated", "cycles": 1,
                       "federated": {"rounds": 2}})  # fmt: skip
    run_id = client.portal.call(lambda: engine.start_run(plan))  # type: ignore[union-attr]
    login(client, "viewer")
    detail = client.get(f"/api/v1/runs/{run_id}").json()
    assert [(r["number"], r["status"], r["members"]) for r in detail["rounds"]] == [
        (1, "training", ["site-a", "site-b"]), (2, "pending", ["site-a", "site-b"])]  # fmt: skip
    page = client.get(f"/runs/{run_id}").text
    assert 'id="rounds"' in page and "fresh" in page
