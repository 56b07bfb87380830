"""The dashboard's New study with run modes: the same request, the same approval preflight."""

from __future__ import annotations

from fastapi.testclient import TestClient

from coordinator.engine import RunEngine
from coordinator.preflight import SiteApprovals
from coordinator.study_request import StudyRequest
from coordinator.study_supervisor import StudySupervisor
from protocols.approval import ApprovalRule
from tests.coordinator_tests.test_dashboard import login
from tests.coordinator_tests.test_dashboard_studies import (  # the fixtures too
    STUDY,
    _study_toml,
    accounts,
    client,
    engine,
    study_client,
    supervisor,
)

__all__ = ["accounts", "client", "engine", "study_client", "supervisor"]


def test_new_study_refuses_a_mode_a_sites_approval_policy_refuses(
    study_client: TestClient, engine: RunEngine, supervisor: StudySupervisor
) -> None:
    sequential_only = ApprovalRule(
        task_types=frozenset({"tabular"}), datasets=frozenset({"heart"}),
        base_models=frozenset({"*"}),
    )  # fmt: skip
    engine.report_approvals("site-a", SiteApprovals(by_policy=True, rules=(sequential_only,)))
    engine.report_approvals("site-b", SiteApprovals(not_required=True))
    csrf = login(study_client, "operator")
    document = _study_toml() + 'modes = ["sequential", "federated"]\nrounds-max = 2\n'
    response = study_client.post("/studies", data={"csrf_token": csrf, "study": document,
                                                   "allow_offline": "true"})  # fmt: skip
    assert response.status_code == 422
    assert "site-a: its approvals do not allow federated (fedavg) runs" in response.text
    assert "site-b:" not in response.text
    assert supervisor.workers() == []


def test_to_argv_carries_the_modes_to_baton_study_start() -> None:
    from typer.main import get_command

    from coordinator.console.study_cli import study_app

    options = {k.replace("-", "_"): v for k, v in STUDY.items()}
    request = StudyRequest.model_validate(
        {**options, "modes": ["federated", "hybrid"], "strategies": ["fedavg", "fedyogi"],
         "rounds_min": 2, "rounds_max": 5, "max_groups": 3, "sites": ["a", "b", "c", "d"]}
    )  # fmt: skip
    start = get_command(study_app).commands["start"]  # type: ignore[attr-defined]
    params = start.make_context("start", request.to_argv()).params
    assert params["modes"] == "federated,hybrid" and params["strategies"] == "fedavg,fedyogi"
    assert (params["rounds_min"], params["rounds_max"], params["max_groups"]) == (2, 5, 3)
