"""schemathesis against the dashboard's OpenAPI schema: no input makes the API answer 5xx."""

from __future__ import annotations

from typing import Any

import schemathesis
from hypothesis import HealthCheck, given, settings

from coordinator.dashboard import AccountStore, create_app
from coordinator.engine import RunEngine
from tests.coordinator_tests.test_dashboard import accounts, engine

__all__ = ["accounts", "engine"]


def test_api_never_answers_with_a_server_error(engine: RunEngine, accounts: AccountStore) -> None:
    app = create_app(engine, accounts=accounts, stream_seconds=0)
    schema = schemathesis.openapi.from_asgi("/api/v1/openapi.json", app)
    headers = {"Authorization": f"Bearer {accounts.issue_token('admin', by='schemathesis')}"}
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 12
    answered: list[tuple[str, int]] = []
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=6, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))  # fmt: skip
        def never_a_server_error(case: Any) -> None:
            response = case.call(headers=headers)
            answered.append((case.formatted_path, response.status_code))
            assert response.status_code < 500, (case.method, case.formatted_path,
                                                response.text[:300])  # fmt: skip

        never_a_server_error()
    assert {path for path, _ in answered} >= {"/api/v1/runs", "/api/v1/events", "/api/v1/sites"}
    assert any(code == 200 for _, code in answered) and any(code == 422 for _, code in answered)
