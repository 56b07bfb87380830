"""deploy/helm/baton-coordinator, rendered by Helm's own Go engine (helm-python-sdk, Helm v4)."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest
import typer
import yaml

from coordinator.console.cli import app as baton_app
from coordinator.settings import load_coordinator_settings

helm = pytest.importorskip("helm_python", reason="helm-python-sdk (the dev extra) renders charts")

CHART = Path(__file__).resolve().parents[2] / "deploy" / "helm" / "baton-coordinator"
REQUIRED = {"database": {"existingSecret": "baton-db"}, "tls": {"existingSecret": "baton-tls"}}


def _render(values: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    """Every rendered object by (kind, name)."""
    with helm.Chart.load(CHART) as chart:
        manifests = chart.render(values, name="baton", namespace="hospital")
    objects: dict[tuple[str, str], dict[str, Any]] = {}
    for path, text in manifests.items():
        if path.endswith(".txt"):
            continue
        for document in yaml.safe_load_all(text):
            if document:
                objects[(document["kind"], document["metadata"]["name"])] = document
    return objects


def test_chart_keeps_helm_creates_layout() -> None:
    for relative in ("Chart.yaml", "values.yaml", ".helmignore", "templates/_helpers.tpl",
                     "templates/deployment.yaml", "templates/service.yaml",
                     "templates/serviceaccount.yaml", "templates/NOTES.txt",
                     "templates/tests/test-connection.yaml"):  # fmt: skip
        assert (CHART / relative).is_file(), relative


def test_helm_lint_finds_no_errors() -> None:
    report = helm.lint(CHART, values=REQUIRED)
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] > 1] == []


def test_deployment_takes_database_and_certificates_from_secrets_and_probes_health() -> None:
    objects = _render(REQUIRED)
    deployment = objects[("Deployment", "baton-baton-coordinator")]
    assert deployment["spec"]["replicas"] == 1
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    (env,) = container["env"]
    assert env["name"] == "BATON_DATABASE_URL"
    assert env["valueFrom"]["secretKeyRef"] == {"name": "baton-db", "key": "url"}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["tls"]["secret"]["secretName"] == "baton-tls"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": 50051, "dashboard": 8443, "metrics": 9464}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    args = container["args"]
    assert args[args.index("--metrics-port") + 1] == "9464"
    assert args[args.index("--metrics-host") + 1] == "0.0.0.0"
    assert args[args.index("--dashboard-port") + 1] == "8443"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]


def test_grpc_and_dashboard_services() -> None:
    objects = _render(REQUIRED | {"service": {"type": "LoadBalancer", "port": 443}})
    grpc_service = objects[("Service", "baton-baton-coordinator")]["spec"]
    dashboard = objects[("Service", "baton-baton-coordinator-dashboard")]["spec"]
    assert grpc_service["type"] == "LoadBalancer"
    assert grpc_service["ports"][0] | {} == {"port": 443, "targetPort": "grpc", "protocol": "TCP",
                                             "name": "grpc", "appProtocol": "grpc"}  # fmt: skip
    assert dashboard["type"] == "ClusterIP"
    assert [p["targetPort"] for p in dashboard["ports"]] == ["dashboard", "metrics"]


def test_rendered_coordinator_toml_is_what_baton_coordinator_serve_reads(tmp_path: Path) -> None:
    objects = _render(REQUIRED | {"settings": {"statistics-min-count": 25}})
    text = objects[("ConfigMap", "baton-baton-coordinator")]["data"]["coordinator.toml"]
    serve = typer.main.get_command(baton_app).commands["coordinator"].commands["serve"]  # type: ignore[attr-defined]
    flags = {opt[2:] for param in serve.params for opt in param.opts if opt.startswith("--")}
    assert set(tomllib.loads(text)) - {"statistics-min-count"} <= flags
    config = tmp_path / "coordinator.toml"
    config.write_text(text)
    settings = load_coordinator_settings(config)
    assert settings.host == "0.0.0.0"
    assert settings.tls.certificate == Path("/etc/baton/tls/tls.crt")
    assert settings.statistics_min_count == 25


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"tls": {"existingSecret": "t"}}, "database.existingSecret is required"),
        ({"database": {"existingSecret": "d"}}, "tls.existingSecret is required"),
    ],
)
def test_missing_secrets_fail_the_render_with_their_name(
    values: dict[str, Any], message: str
) -> None:
    with pytest.raises(helm.HelmRenderError, match=message):
        _render(values)


def test_persistence_claim_is_kept_and_can_be_an_existing_one() -> None:
    claim = _render(REQUIRED)[("PersistentVolumeClaim", "baton-baton-coordinator")]
    assert claim["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    objects = _render(REQUIRED | {"persistence": {"existingClaim": "ckpt"}})
    assert not [key for key in objects if key[0] == "PersistentVolumeClaim"]
    pod = objects[("Deployment", "baton-baton-coordinator")]["spec"]["template"]["spec"]
    state = next(v for v in pod["volumes"] if v["name"] == "state")
    assert state["persistentVolumeClaim"]["claimName"] == "ckpt"
