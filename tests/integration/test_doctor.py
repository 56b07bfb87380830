"""`baton-site doctor` against a served coordinator: all checks pass, or each failure says a fix."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from site_agent.cli import app as baton_site
from site_agent.registry import register_dataset
from tests.conftest import Pki
from tests.connect_proxy import connect_proxy
from tests.integration.conftest import Cluster

_PROXY_VARS = ("grpc_proxy", "https_proxy", "http_proxy", "no_proxy", "no_grpc_proxy")
# For the runs about the path to the coordinator: the gpu check imports torch (~4 CPU s a run).
NO_GPU = ("--skip", "gpu")


def _doctor(
    pki: Pki,
    coordinator: str,
    data_dir: Path,
    *extra: str,
    env: dict[str, str] | None = None,
    ca: Path | None = None,
) -> tuple[int, list[str]]:
    clean = {k: v for k, v in os.environ.items() if k.lower() not in _PROXY_VARS}
    result = subprocess.run(
        [sys.executable, "-m", "site_agent", "doctor", "--coordinator", coordinator,
         "--ca", str(ca or pki.directory / "ca.crt"), "--cert", str(pki.directory / "site-a.crt"),
         "--key", str(pki.directory / "site-a.key"), "--data-dir", str(data_dir),
         "--min-free-gb", "0", *extra],
        capture_output=True, text=True, check=False, env={**clean, **(env or {})}, timeout=120,
    )  # fmt: skip
    assert "Traceback" not in result.stderr, result.stderr
    return result.returncode, result.stdout.splitlines()


def _by_name(lines: list[str]) -> dict[str, str]:
    return {line.split()[1]: line for line in lines}


# One coordinator for the module's tests: the doctor only reads from it (hello, clock).
@pytest.fixture(scope="module")
def served(pki: Pki, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    tmp_path = tmp_path_factory.mktemp("served")
    (tmp_path / "site-a").mkdir()
    csv = tmp_path / "heart.csv"
    csv.write_text("age,chol,label\n" + "".join(f"{50 + i},{200 + i},{i % 2}\n" for i in range(40)))
    register_dataset(tmp_path / "site-a", "heart", csv, task_type="tabular")
    cluster = Cluster(log_dir=tmp_path / "logs")
    with cluster.running():
        port = cluster.start_coordinator(
            state_dir=tmp_path / "coordinator", pki_dir=pki.directory, port_file=tmp_path / "port"
        )
        yield f"localhost:{port}", tmp_path / "site-a"


def test_doctor_passes_against_a_running_coordinator_and_through_a_proxy(
    pki: Pki, served: tuple[str, Path], base_model: Path
) -> None:
    target, data_dir = served
    code, lines = _doctor(pki, target, data_dir, "--base-model", str(base_model))
    assert code == 0, lines
    checks = _by_name(lines)
    assert set(checks) == {"dns", "network", "tls", "clock", "certificate", "gpu", "disk",
                           "data", "base-model"}  # fmt: skip
    assert all(line.startswith("OK ") for line in lines), lines
    assert "site 'site-a'" in checks["tls"] and "heart" in checks["data"]

    # The route through the proxy: the checks of this host alone (gpu: torch) ran above.
    with connect_proxy() as proxy:
        code, lines = _doctor(pki, target, data_dir, *NO_GPU, env={"https_proxy": proxy.url})
    assert code == 0, lines
    assert set(_by_name(lines)) == {"dns", "proxy", "tls", "clock", "certificate", "disk",
                                    "data", "base-model"}  # fmt: skip
    assert f"CONNECT {target} through 127.0.0.1" in _by_name(lines)["proxy"]
    assert proxy.connect_lines == [f"CONNECT {target} HTTP/1.1"] * 2  # the check, then gRPC


def test_doctor_prints_a_fix_for_a_wrong_ca_an_unreachable_host_and_a_dead_proxy(
    pki: Pki, served: tuple[str, Path]
) -> None:
    target, data_dir = served
    # Each failure of the path to the coordinator; the gpu check (torch) ran in the test above.
    code, lines = _doctor(pki, target, data_dir, *NO_GPU, ca=pki.foreign / "ca.crt")
    tls = _by_name(lines)["tls"]
    assert code == 1 and tls.startswith("FAIL")
    assert "-> fix: the coordinator's certificate is not signed by" in tls
    assert "use the consortium's ca.crt" in tls

    code, lines = _doctor(pki, "localhost:1", data_dir, *NO_GPU)
    checks = _by_name(lines)
    assert code == 1
    assert (
        checks["network"].startswith("FAIL")
        and "-> fix: check that the coordinator runs" in (checks["network"])
    )
    assert checks["tls"].startswith("FAIL") and "-> fix:" in checks["tls"]

    code, lines = _doctor(pki, "no-such-host.invalid:50051", data_dir, *NO_GPU)
    dns = _by_name(lines)["dns"]
    assert code == 1 and dns.startswith("FAIL") and "-> fix: check the coordinator's name" in dns

    code, lines = _doctor(pki, target, data_dir, *NO_GPU, env={"https_proxy": "http://127.0.0.1:1"})
    proxy = _by_name(lines)["proxy"]
    assert code == 1 and proxy.startswith("FAIL") and "-> fix: check https_proxy" in proxy


def test_doctor_fails_the_clock_check_when_this_hosts_clock_is_two_minutes_slow(
    pki: Pki, served: tuple[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from site_agent import doctor
    from site_agent.settings import SiteSettings

    target, data_dir = served
    real = time.time_ns
    monkeypatch.setattr(doctor.time, "time_ns", lambda: real() - 120 * 10**9)
    settings = SiteSettings(
        coordinator=target,
        ca_certificate=pki.directory / "ca.crt",
        certificate=pki.directory / "site-a.crt",
        private_key=pki.directory / "site-a.key",
        data_dir=data_dir,
    )
    checks = {
        check.name: check for check in doctor.run_checks(settings, min_free_bytes=0, skip=["gpu"])
    }
    assert checks["tls"].ok
    clock = checks["clock"]
    assert not clock.ok and clock.detail.startswith("this host's clock is 120.")
    assert "behind the coordinator's" in clock.detail and "timedatectl set-ntp true" in clock.fix


def test_doctor_refuses_to_skip_a_check_of_the_path_to_the_coordinator_in_one_line(
    pki: Pki, tmp_path: Path
) -> None:
    result = CliRunner().invoke(baton_site, [
        "doctor", "--coordinator", "localhost:1", "--ca", str(pki.directory / "ca.crt"),
        "--cert", str(pki.directory / "site-a.crt"), "--key", str(pki.directory / "site-a.key"),
        "--data-dir", str(tmp_path), "--skip", "gpu", "--skip", "tls",
    ])  # fmt: skip
    assert result.exit_code == 2
    assert result.stderr == "error: cannot skip tls: only gpu, disk, data, base-model\n"
    assert result.stdout == ""
