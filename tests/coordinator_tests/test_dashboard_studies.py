"""Dashboard sessions in SQL (restart, revocation) and study workers (start, stop, orphans)."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import psutil
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from typer.testing import CliRunner

from coordinator.dashboard import AccountStore, DashboardRole, SessionStore, create_app
from coordinator.engine import RunEngine
from coordinator.ledger import DashboardSessionRow, StudyWorkerRow
from coordinator.study_request import (
    StopMode,
    StudyRequest,
    StudyRequestError,
    parse_study_document,
    prepare_search,
)
from coordinator.study_supervisor import StudySupervisor, StudyWorkerCredentials
from tests.conftest import Pki
from tests.coordinator_tests.test_dashboard import (  # the fixtures too
    PASSWORD,
    _form_token,
    accounts,
    client,
    engine,
    login,
    refused_below,
)

__all__ = ["accounts", "client", "engine"]  # fixtures shared with test_dashboard.py

# An unreachable coordinator: the worker waits for its sites until stopped (site-timeout).
STUDY = {
    "name": "heart-order", "dataset": "heart", "task": "tabular", "labels": ["0", "1"],
    "sites": ["site-a", "site-b"], "trials": 2, "lr-min": 0.01, "lr-max": 0.1,
    "steps-min": 2, "steps-max": 4, "batch-size": 4, "options": {"model": "logistic"},
    "site-timeout": 120,
}  # fmt: skip


def _study_toml() -> str:
    return """
name = "heart-order"
dataset = "heart"
task = "tabular"
labels = ["0", "1"]
sites = ["site-a", "site-b"]
trials = 2
lr-min = 0.01
lr-max = 0.1
steps-min = 2
steps-max = 4
batch-size = 4
site-timeout = 120
options = { model = "logistic" }
"""


@pytest.fixture
def supervisor(engine: RunEngine, pki: Pki, tmp_path: Path) -> Iterator[StudySupervisor]:
    credentials = StudyWorkerCredentials(
        coordinator="localhost:1",  # nothing listens: the worker waits for its sites
        ca_certificate=pki.directory / "ca.crt",
        certificate=pki.directory / "admin.crt",
        private_key=pki.directory / "admin.key",
    )
    supervisor = StudySupervisor(engine.ledger, database_url=engine.ledger.url,
                                 credentials=credentials, log_dir=tmp_path / "workers",
                                 kill_after=20)  # fmt: skip
    yield supervisor
    for worker in supervisor.workers():
        process = psutil.Process(worker.pid) if worker.alive and worker.pid else None
        if process is not None:
            process.kill()


@pytest.fixture
def study_client(
    engine: RunEngine, accounts: AccountStore, supervisor: StudySupervisor
) -> Iterator[TestClient]:
    app = create_app(engine, accounts=accounts, supervisor=supervisor, stream_seconds=0)
    with TestClient(app, base_url="https://testserver") as test_client:
        yield test_client


def _wait_for(condition, timeout: float = 60.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


# ---- sessions ------------------------------------------------------------------------------------


def test_sessions_survive_a_restart_of_the_app_and_store_only_a_hash(
    engine: RunEngine, accounts: AccountStore
) -> None:
    first = TestClient(create_app(engine, accounts=accounts), base_url="https://testserver")
    with first:
        csrf = login(first, "operator")
        cookie = first.cookies["baton_session"]
    second = TestClient(create_app(engine, accounts=accounts), base_url="https://testserver")
    with second:
        second.cookies.set("baton_session", cookie)
        assert second.get("/api/v1/me").json() == {"account": "operator", "role": "operator"}
        # The CSRF token of the session survives with it.
        assert second.post("/logout", data={"csrf_token": csrf}).status_code == 200
        assert second.get("/api/v1/me").status_code == 401
    with engine.ledger.transaction() as db:
        assert list(db.scalars(select(DashboardSessionRow))) == []


def test_the_database_holds_the_tokens_hash_not_the_token(
    client: TestClient, engine: RunEngine
) -> None:
    login(client, "viewer")
    cookie = client.cookies["baton_session"]
    with engine.ledger.transaction() as db:
        [row] = db.scalars(select(DashboardSessionRow))
        assert row.token_sha256 != cookie and cookie not in json.dumps(
            [row.account, row.role, row.via, row.client, row.csrf_token]
        )
        assert (row.account, row.role, row.via) == ("viewer", "viewer", "password")


def test_an_expired_session_is_refused_and_deleted(
    engine: RunEngine, accounts: AccountStore
) -> None:
    app = create_app(engine, accounts=accounts)
    app.state.dashboard.sessions.lifetime = timedelta(seconds=-1)
    with TestClient(app, base_url="https://testserver") as client:
        page = client.get("/login")
        client.post("/login", data={"name": "viewer", "password": PASSWORD,
                                    "csrf_token": _form_token(page.text)})  # fmt: skip
        assert client.get("/api/v1/me").status_code == 401
    with engine.ledger.transaction() as db:
        assert list(db.scalars(select(DashboardSessionRow))) == []


def test_admin_sees_and_revokes_an_accounts_sessions(
    engine: RunEngine, accounts: AccountStore
) -> None:
    app = create_app(engine, accounts=accounts)
    with (
        TestClient(app, base_url="https://testserver") as admin,
        TestClient(app, base_url="https://testserver") as first,
        TestClient(app, base_url="https://testserver") as second,
    ):
        csrf = login(admin, "admin")
        login(first, "operator")
        login(second, "operator")
        listed = admin.get("/api/v1/sessions?account=operator").json()
        assert [s["account"] for s in listed] == ["operator", "operator"]
        assert "operator" in admin.get("/sessions").text
        one = next(s["key"] for s in listed if s["key"] == SessionStore.key_of(
            first.cookies["baton_session"]))  # fmt: skip
        response = admin.post("/sessions/revoke", data={"csrf_token": csrf, "account": "operator",
                                                        "session": one})  # fmt: skip
        assert response.status_code == 200 and "1 session(s) of operator ended" in response.text
        assert first.get("/api/v1/me").status_code == 401
        assert second.get("/api/v1/me").status_code == 200
        ended = admin.post("/api/v1/sessions/revoke", json={"account": "operator"},
                           headers={"X-CSRF-Token": csrf})  # fmt: skip
        assert ended.json() == {"ended": 1}
        assert second.get("/api/v1/me").status_code == 401
        assert admin.get("/api/v1/me").status_code == 200
    events = [e for e in engine.ledger.events() if e.kind == "dashboard.sessions-revoked"]
    assert [(e.payload["sessions"], e.payload["by"]) for e in events] == [
        (1, "dashboard:admin"), (1, "dashboard:admin")]  # fmt: skip


def test_admin_cli_lists_and_revokes_sessions(tmp_path: Path) -> None:
    from coordinator.console.cli import app
    from coordinator.dashboard import Account
    from coordinator.ledger import Ledger

    state = tmp_path / "state"
    state.mkdir()
    ledger = Ledger(f"sqlite:///{state / 'ledger.sqlite3'}")
    ledger.migrate()
    store = SessionStore(ledger)
    ops = Account("ops", DashboardRole.OPERATOR)
    session = store.create(ops, via="password", client="10.1.2.3")
    ledger.close()
    runner = CliRunner()
    listed = runner.invoke(app, ["admin", "sessions", "ops", "--state-dir", str(state)])
    assert listed.exit_code == 0, listed.output
    key = SessionStore.key_of(session.id)
    assert key in listed.output and "ops (operator, password)" in listed.output
    assert "10.1.2.3" in listed.output and session.id not in listed.output
    wrong = runner.invoke(app, ["admin", "revoke", "ops", "--session", "0" * 16,
                                "--state-dir", str(state)])  # fmt: skip
    assert wrong.exit_code == 2 and f"no active session {'0' * 16}" in wrong.output
    revoked = runner.invoke(app, ["admin", "revoke", "ops", "--state-dir", str(state)])
    assert revoked.exit_code == 0 and "1 session(s) of ops ended" in revoked.output
    again = runner.invoke(app, ["admin", "sessions", "--state-dir", str(state)])
    assert "no active session" in again.output


# ---- study requests: the CLI's checks ----------------------------------------------------------


def test_a_study_file_is_checked_as_the_cli_checks_it() -> None:
    request = parse_study_document(_study_toml())
    assert request == StudyRequest.model_validate(
        {k.replace("-", "_"): v for k, v in STUDY.items()}
    )
    prepared = prepare_search(request)
    # The template's explicit hops, in the study's site order (what the preflight checks).
    assert [site for site, _ in prepared.first_plan.expanded_hops()] == ["site-a", "site-b"]
    assert prepared.bundle.sha256 == prepared.first_plan.approval_bundle().sha256
    with pytest.raises(StudyRequestError, match="trials: Input should be greater than or equal"):
        parse_study_document(_study_toml().replace("trials = 2", "trials = 0"))
    with pytest.raises(StudyRequestError, match="colour: Extra inputs are not permitted"):
        parse_study_document(_study_toml() + 'colour = "red"\n')
    with pytest.raises(StudyRequestError, match="neither valid JSON nor TOML"):
        parse_study_document("name = ")
    with pytest.raises(StudyRequestError, match="sites"):
        prepare_search(request.model_copy(update={"sites": ["site-a", "site-a"]}))


def test_to_argv_is_what_baton_study_start_parses() -> None:
    from typer.main import get_command

    from coordinator.console.study_cli import study_app

    options = {k.replace("-", "_"): v for k, v in STUDY.items()}
    extra = {"seed": 3, "direction": "minimize", "lora": {"r": 4}, "cv_folds": 3}
    request = StudyRequest.model_validate({**options, **extra, "warm_start": True})
    command = get_command(study_app)
    start = command.commands["start"]  # type: ignore[attr-defined]
    context = start.make_context("start", request.to_argv())
    params = context.params
    assert list(params["sites"]) == ["site-a", "site-b"] and list(params["labels"]) == ["0", "1"]
    assert (params["lr_min"], params["lr_max"], params["steps_max"]) == (0.01, 0.1, 4)
    assert params["seed"] == 3 and params["direction"] == "minimize"
    assert json.loads(params["lora"]) == {"r": 4} and params["cv_folds"] == 3
    assert params["warm_start"] is True and params["trials"] == 2


# ---- study workers -----------------------------------------------------------------------------


def test_a_coordinator_without_a_worker_certificate_refuses_to_start_studies(
    client: TestClient, engine: RunEngine
) -> None:
    csrf = login(client, "operator")
    page = client.get("/studies/new")
    assert "has no admin certificate for study workers" in page.text
    response = client.post("/studies", data={"csrf_token": csrf, "study": _study_toml(),
                                             "allow_offline": "true"})  # fmt: skip
    assert response.status_code == 422
    assert "set study_admin_certificate and study_admin_key" in response.text
    assert not [e for e in engine.ledger.events() if e.kind.startswith("study.")]


def test_a_bad_study_is_shown_back_with_the_clis_message_and_starts_nothing(
    study_client: TestClient, engine: RunEngine, supervisor: StudySupervisor
) -> None:
    csrf = login(study_client, "operator")
    bad = _study_toml().replace("lr-min = 0.01", "lr-min = 0.5")
    response = study_client.post("/studies", data={"csrf_token": csrf, "study": bad,
                                                   "allow_offline": "true"})  # fmt: skip
    assert response.status_code == 422
    assert "lr-min = 0.5" in response.text  # the study is shown back to fix
    # The CLI's own message, in the page's error block.
    assert '<pre class="error" role="alert">invalid range [0.5, 0.1]</pre>' in response.text
    offline = study_client.post("/studies", data={"csrf_token": csrf, "study": _study_toml()})
    assert offline.status_code == 422 and "site-a: offline" in offline.text
    api = study_client.post("/api/v1/studies", json={"name": "x"},
                            headers={"X-CSRF-Token": csrf})  # fmt: skip
    assert api.status_code == 422
    assert supervisor.workers() == []
    assert not [e for e in engine.ledger.events() if e.kind.startswith("study.")]


def test_operator_starts_and_stops_a_study_worker_from_the_dashboard(
    study_client: TestClient, engine: RunEngine, supervisor: StudySupervisor
) -> None:
    csrf = login(study_client, "operator")
    response = study_client.post("/studies", data={"csrf_token": csrf, "study": _study_toml(),
                                                   "allow_offline": "true"},
                                 follow_redirects=False)  # fmt: skip
    assert response.status_code == 303, response.text[:500]
    assert response.headers["location"] == "/studies/heart-order"
    page = study_client.get("/studies/heart-order").text
    assert "study heart-order started (worker pid" in page
    assert "running" in page and 'id="stop-study"' in page
    assert "heart-order" in study_client.get("/studies").text
    [active] = study_client.get("/api/v1/overview").json()["active_studies"]
    assert (active["name"], active["started_by"]) == ("heart-order", "dashboard:operator")
    assert 'href="/studies/heart-order"' in study_client.get("/").text
    [worker] = study_client.get("/api/v1/studies/heart-order/workers").json()
    assert worker["status"] == "running" and worker["alive"]
    assert worker["started_by"] == "dashboard:operator"
    # A second start of the same study is refused while its worker runs.
    again = study_client.post("/api/v1/studies?allow_offline=true",
                              json={k.replace("-", "_"): v for k, v in STUDY.items()},
                              headers={"X-CSRF-Token": csrf})  # fmt: skip
    assert again.status_code == 409 and "is already running" in again.json()["detail"]
    # The worker is `baton study start` itself, with the options and the admin identity.
    process = psutil.Process(worker["pid"])
    command = process.cmdline()
    assert command[1:5] == ["-m", "coordinator", "study", "start"]
    assert "--lr-max" in command and "--storage" not in command  # storage URL via environment
    stopped = study_client.post("/studies/heart-order/stop",
                                data={"csrf_token": csrf, "mode": "abort-trial"})  # fmt: skip
    assert "study heart-order stops now" in stopped.text
    _wait_for(lambda: supervisor.workers("heart-order")[0].ended_at is not None)
    [ended] = study_client.get("/api/v1/studies/heart-order/workers").json()
    assert ended["status"] == "stopped" and not ended["alive"]
    assert ended["stop_mode"] == "abort-trial" and ended["stopped_by"] == "dashboard:operator"
    kinds = [(e.kind, e.payload.get("by")) for e in engine.ledger.events()
             if e.kind.startswith("study.")]  # fmt: skip
    assert kinds == [
        ("study.started", "dashboard:operator"),
        ("study.stop-requested", "dashboard:operator"),
        ("study.ended", None),
    ]
    assert study_client.get("/api/v1/overview").json()["active_studies"] == []
    refused = study_client.post("/api/v1/studies/heart-order/stop", json={"mode": "finish-trial"},
                                headers={"X-CSRF-Token": csrf})  # fmt: skip
    assert refused.status_code == 404 and "has no running worker" in refused.json()["detail"]


def _orphan_process() -> psutil.Process:
    """A process that is not this one's child, as a worker left by an earlier coordinator."""
    spawn = ("import subprocess, sys; print(subprocess.Popen([sys.executable, '-c', "
             "'import time; time.sleep(60)'], stdout=subprocess.DEVNULL, "
             "stderr=subprocess.DEVNULL, start_new_session=True).pid)")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", spawn], capture_output=True, text=True, check=True)
    return psutil.Process(int(out.stdout))


def test_a_worker_left_by_an_earlier_coordinator_is_marked_orphaned_and_still_stoppable(
    engine: RunEngine, tmp_path: Path
) -> None:
    from datetime import UTC, datetime

    orphan = _orphan_process()
    try:
        with engine.ledger.transaction() as db:
            for worker_id, pid in (("a" * 32, orphan.pid), ("b" * 32, 2**22 + 7)):
                db.add(StudyWorkerRow(
                    id=worker_id, study=f"s-{worker_id[0]}", status="running", pid=pid,
                    process_started_at=orphan.create_time(), options={},
                    started_by="dashboard:x", started_at=datetime.now(UTC),
                    log_path=str(tmp_path / "none.log")))  # fmt: skip
        restarted = StudySupervisor(engine.ledger, database_url=engine.ledger.url,
                                    credentials=None, log_dir=tmp_path)  # fmt: skip
        assert sorted(restarted.adopt_orphans()) == ["a" * 32, "b" * 32]
        alive, gone = restarted.workers("s-a")[0], restarted.workers("s-b")[0]
        assert alive.status == gone.status == "orphaned"
        assert alive.alive and not gone.alive and gone.ended_at is not None
        orphaned = [e.payload for e in engine.ledger.events() if e.kind == "study.orphaned"]
        assert sorted((p["study"], p["alive"]) for p in orphaned) == [
            ("s-a", True), ("s-b", False)]  # fmt: skip
        restarted.stop("s-a", StopMode.FINISH_TRIAL, by="dashboard:admin")
        _wait_for(lambda: restarted.workers("s-a")[0].ended_at is not None)
        with contextlib.suppress(psutil.NoSuchProcess):  # SIGTERM reached it
            assert orphan.status() == psutil.STATUS_ZOMBIE  # (when init does not reap it)
        assert restarted.workers("s-a")[0].status == "stopped"
        assert restarted.adopt_orphans() == []  # nothing left to adopt at the next start
    finally:
        with contextlib.suppress(psutil.Error):
            orphan.kill()


@pytest.mark.parametrize(
    ("method", "path", "role"),
    [
        ("GET", "/studies/new", DashboardRole.OPERATOR),
        ("POST", "/studies", DashboardRole.OPERATOR),
        ("POST", "/studies/heart-order/stop", DashboardRole.OPERATOR),
        ("POST", "/api/v1/studies", DashboardRole.OPERATOR),
        ("POST", "/api/v1/studies/heart-order/stop", DashboardRole.OPERATOR),
        ("GET", "/sessions", DashboardRole.ADMIN),
        ("POST", "/sessions/revoke", DashboardRole.ADMIN),
        ("GET", "/api/v1/sessions", DashboardRole.ADMIN),
        ("POST", "/api/v1/sessions/revoke", DashboardRole.ADMIN),
    ],
)
def test_study_and_session_actions_are_refused_below_their_role(
    study_client: TestClient, engine: RunEngine, method: str, path: str, role: DashboardRole
) -> None:
    before = len(engine.ledger.events())
    fields = {"mode": "abort-trial", "account": "admin"}

    def body(csrf: str) -> dict[str, Any]:
        if "/api/" in path:
            return {"json": {**{k.replace("-", "_"): v for k, v in STUDY.items()}, **fields}}
        form = {"csrf_token": csrf, "study": _study_toml(), "allow_offline": "true"}
        return {"data": {**form, **fields}}

    refused_below(study_client, method, path, role, body)
    assert len(engine.ledger.events()) == before


@pytest.mark.parametrize("role", list(DashboardRole))
def test_study_pages_answer_every_role(
    study_client: TestClient, role: DashboardRole, supervisor: StudySupervisor
) -> None:
    login(study_client, role.label)
    for path in ("/studies", "/api/v1/studies", "/api/v1/studies/heart-order/workers"):
        assert study_client.get(path).status_code == 200, path
    assert study_client.get("/studies/heart-order").status_code == 404  # no study, no worker


def test_sites_show_the_approvals_they_reported_at_hello(client: TestClient) -> None:
    from coordinator.dashboard._service import _approvals_text
    from coordinator.preflight import SiteApprovals

    login(client, "viewer")
    sites = client.get("/api/v1/sites").json()
    assert {s["approvals"] for s in sites} == {"not reported since the coordinator started"}
    assert "not reported since the coordinator started" in client.get("/sites").text
    assert _approvals_text(SiteApprovals(frozenset({"a", "b"}))) == "2 bundle(s) approved"
    assert _approvals_text(SiteApprovals(frozenset(), by_policy=True)) == (
        "0 bundle(s) approved; local rules may approve others")  # fmt: skip
    assert _approvals_text(SiteApprovals(not_required=True)).startswith("runs any bundle")


def test_sigterm_lets_a_worker_finish_its_trial_then_stop() -> None:
    import os
    import signal

    from coordinator.study_request import FinishTrialThenStop

    previous = signal.getsignal(signal.SIGTERM)
    try:
        stop = FinishTrialThenStop().install()
        stop.check()  # nothing asked yet: the search goes on
        os.kill(os.getpid(), signal.SIGTERM)  # not fatal any more: only noted
        with pytest.raises(FinishTrialThenStop.Stopped):
            stop.check()  # after the trial is recorded
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert StopMode.FINISH_TRIAL.signal is signal.SIGTERM
    assert StopMode.ABORT_TRIAL.signal is signal.SIGINT


def test_sessions_and_worker_rows_work_on_every_backend(database_url: str, tmp_path: Path) -> None:
    from coordinator.dashboard import Account
    from coordinator.ledger import Ledger

    ledger = Ledger(database_url)
    ledger.migrate()
    try:
        store = SessionStore(ledger, touch_every=timedelta(0))
        first = store.create(Account("ops", DashboardRole.OPERATOR), via="link", client="::1")
        store.create(Account("ops", DashboardRole.OPERATOR), via="password", client="::1")
        again = store.get(first.id)
        assert again is not None and again.csrf_token == first.csrf_token
        assert again.account == Account("ops", DashboardRole.OPERATOR)
        assert [s.via for s in store.active("ops")] == ["link", "password"]  # last seen first
        assert store.revoke("ops", SessionStore.key_of(first.id), by="test") == 1
        assert store.get(first.id) is None and len(store.active()) == 1
        assert store.revoke("ops", None, by="test") == 1 and store.active() == []
        supervisor = StudySupervisor(ledger, database_url=database_url, credentials=None,
                                     log_dir=tmp_path)  # fmt: skip
        assert supervisor.workers() == [] and supervisor.adopt_orphans() == []
        assert ledger.verify().ok
    finally:
        ledger.close()


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("steps-min", "9", "invalid range [9, 4]"),
        ("cv-folds", "1", "cross_validation.folds: Input should be greater than or equal to 2"),
        ("name", "a/b", "name: Value error, a study name is 1-100 letters, digits"),
    ],
)
def test_the_cli_and_the_new_study_form_refuse_bad_input_with_the_same_message(
    study_client: TestClient,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    option: str,
    value: str,
    message: str,
) -> None:
    from coordinator.console.study_cli import study_app

    monkeypatch.setattr("coordinator.console.study_cli.configure_logging", lambda *args: None)
    monkeypatch.setattr("coordinator.console.study_cli._quiet_optuna", lambda: None)
    monkeypatch.setenv("COLUMNS", "400")  # one line per message
    cli_options = {**STUDY, option: value}
    argv = ["start", "--storage", f"sqlite:///{tmp_path / 's.sqlite3'}", "--dry-run"]
    for key, given in cli_options.items():
        if key == "options":
            argv += [f"--{key}", json.dumps(given)]
        elif isinstance(given, list):
            argv += [a for item in given for a in (f"--{key}", item)]
        else:
            argv += [f"--{key}", str(given)]
    cli = CliRunner().invoke(study_app, argv)
    assert cli.exit_code == 2, cli.output
    assert message in cli.output
    csrf = login(study_client, "operator")
    document = json.dumps({**STUDY, option: json.loads(value) if value.isdigit() else value})
    page = study_client.post("/studies", data={"csrf_token": csrf, "study": document,
                                               "allow_offline": "true"})  # fmt: skip
    assert page.status_code == 422
    assert message in page.text


def test_pages_never_create_the_study_schema_a_starting_worker_is_creating(
    database_url: str,
) -> None:
    from sqlalchemy import create_engine, inspect

    from coordinator.console.study import study_storage_url
    from coordinator.dashboard._studies import list_studies, study_detail
    from coordinator.errors import NotFound
    from coordinator.ledger import Ledger

    ledger = Ledger(database_url)
    ledger.migrate()
    try:
        storage = study_storage_url(database_url)  # PostgreSQL: the (empty) schema exists now
        engine = create_engine(storage)
        with engine.begin() as connection:  # SQLite: the file exists, as a worker just made it
            connection.exec_driver_sql("CREATE TABLE IF NOT EXISTS placeholder (x INTEGER)")
        assert list_studies(database_url) == []
        with pytest.raises(NotFound):
            study_detail(database_url, "starting")
        with engine.connect() as connection:
            assert not inspect(connection).has_table("alembic_version")  # left to the worker
        engine.dispose()
    finally:
        ledger.close()
