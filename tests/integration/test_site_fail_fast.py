"""Real `baton-site serve` processes: a refused certificate stops with exit 3 and one line saying
why; network faults are retried, and the backoff starts over after every good session."""

from __future__ import annotations

import datetime as dt
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography import x509

from coordinator.console.admin import AdminClient
from protocols.transport import TlsFiles
from site_agent.refusal import local_certificate_problem, probe_handshake
from tests.conftest import SITES, Pki
from tests.coordinator_tests.test_refusals import _expired_certificate
from tests.integration.conftest import Cluster


def _site(coordinator: str, tls: TlsFiles, data_dir: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable, "-m", "site_agent", "serve",
            "--coordinator", coordinator,
            "--ca", str(tls.ca_certificate),
            "--cert", str(tls.certificate),
            "--key", str(tls.private_key),
            "--data-dir", str(data_dir),
        ],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
        env={**os.environ, "COLUMNS": "60"},
    )  # fmt: skip


def _stopped(process: subprocess.Popen[str]) -> tuple[int, str]:
    try:
        _, stderr = process.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        process.kill()
        _, stderr = process.communicate()
        pytest.fail(f"the site kept retrying instead of stopping:\n{stderr[-2000:]}")
    return process.returncode, stderr


def _refusal_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr
    assert errors[0].startswith("error: certificate refused: ")
    return errors[0]


def _coordinator(cluster: Cluster, pki: Pki, tmp_path: Path) -> str:
    port = cluster.start_coordinator(
        state_dir=tmp_path / "state", pki_dir=pki.directory, port_file=tmp_path / "port"
    )
    return f"localhost:{port}"


def _mixed_ca(pki: Pki, tmp_path: Path) -> TlsFiles:
    """A site trusting both CAs, holding the foreign CA's certificate: it passes every local
    check, and only the coordinator's TLS handshake refuses it."""
    bundle = tmp_path / "both-cas.crt"
    bundle.write_bytes(
        (pki.directory / "ca.crt").read_bytes() + (pki.foreign / "ca.crt").read_bytes()
    )
    return TlsFiles(bundle, pki.foreign / "site-a.crt", pki.foreign / "site-a.key")


def test_site_with_a_certificate_from_another_ca_stops_with_exit_3(
    pki: Pki, tmp_path: Path
) -> None:
    cluster = Cluster(log_dir=tmp_path / "logs")
    with cluster.running():
        target = _coordinator(cluster, pki, tmp_path)
        code, stderr = _stopped(_site(target, pki.foreign_tls("site-a"), tmp_path / "data"))
    assert code == 3
    line = _refusal_line(stderr)
    assert "not by the consortium CA" in line and str(pki.foreign / "site-a.crt") in line


def test_site_with_an_expired_certificate_stops_with_exit_3(pki: Pki, tmp_path: Path) -> None:
    tls = _expired_certificate(pki, tmp_path)
    cluster = Cluster(log_dir=tmp_path / "logs")
    with cluster.running():
        target = _coordinator(cluster, pki, tmp_path)
        code, stderr = _stopped(_site(target, tls, tmp_path / "data"))
    assert code == 3
    assert "expired on" in _refusal_line(stderr)


def test_site_refused_only_by_the_handshake_stops_with_exit_3_saying_so(
    pki: Pki, tmp_path: Path
) -> None:
    tls = _mixed_ca(pki, tmp_path)
    assert local_certificate_problem(tls) is None
    cluster = Cluster(log_dir=tmp_path / "logs")
    with cluster.running():
        target = _coordinator(cluster, pki, tmp_path)
        code, stderr = _stopped(_site(target, tls, tmp_path / "data"))
    assert code == 3
    line = _refusal_line(stderr)
    assert "rejected this site's certificate in the TLS handshake" in line
    assert "closed the connection right after the TLS handshake" in line


def test_site_with_a_revoked_certificate_stops_with_exit_3_and_the_reason(
    pki: Pki, tmp_path: Path
) -> None:
    serial = format(
        x509.load_pem_x509_certificate((pki.directory / "site-c.crt").read_bytes()).serial_number,
        "x",
    )
    cluster = Cluster(log_dir=tmp_path / "logs")
    with cluster.running():
        target = _coordinator(cluster, pki, tmp_path)
        with AdminClient(target, pki.tls("admin")) as admin:
            admin.revoke(serial, "laptop stolen")
        code, stderr = _stopped(_site(target, pki.tls("site-c"), tmp_path / "data"))
    assert code == 3
    line = _refusal_line(stderr)
    assert "was revoked: laptop stolen" in line


def test_the_handshake_probe_accepts_a_good_certificate_and_ignores_a_closed_port(
    pki: Pki, tmp_path: Path
) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    assert probe_handshake(f"127.0.0.1:{closed}", pki.tls("site-a")) is None
    cluster = Cluster(log_dir=tmp_path / "logs")
    with cluster.running():
        target = _coordinator(cluster, pki, tmp_path)
        assert probe_handshake(target, pki.tls("site-a")) is None
        assert "rejected" in str(probe_handshake(target, _mixed_ca(pki, tmp_path)))


def test_local_check_judges_validity_against_the_given_clock(pki: Pki) -> None:
    tls = pki.tls("site-a")
    assert local_certificate_problem(tls) is None
    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=20 * 365)
    assert "expired on" in str(local_certificate_problem(tls, now=later))
    earlier = dt.datetime.now(dt.UTC) - dt.timedelta(days=2)
    assert "check this machine's clock" in str(local_certificate_problem(tls, now=earlier))


def test_site_backoff_starts_over_after_a_good_session_across_a_coordinator_restart(
    pki: Pki, tmp_path: Path
) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    target = f"localhost:{port}"
    cluster = Cluster(log_dir=tmp_path / "logs")
    with cluster.running():
        site = cluster.start_site("site-a", coordinator=target, pki_dir=pki.directory,
                                  data_dir=tmp_path / "data")  # fmt: skip
        # No coordinator yet: its start opened the one-minute window, so the site backs off
        # 0.5 then 1 s, capped at 1 s (not 2, 4 s...), each wait jittered (half to all of it).
        _wait_for(site.log_path, lambda log: len(_waits(log)) >= 4)
        before = _waits(site.log_path.read_text())
        assert 0.25 <= before[0] <= 0.5 and all(0.5 <= w <= 1.0 for w in before[1:4]), before
        cluster.start_coordinator(state_dir=tmp_path / "state", pki_dir=pki.directory,
                                  port_file=tmp_path / "port", port=port)  # fmt: skip
        with AdminClient(target, pki.tls("admin")) as admin:
            admin.wait_for_sites({"site-a"}, timeout=60)
        seen = len(_waits(site.log_path.read_text()))
        cluster.process("coordinator").kill()
        _wait_for(site.log_path, lambda log: len(_waits(log)) >= seen + 3)
        after = _waits(site.log_path.read_text())[seen:]
        # Without the reset the first wait would continue the old sequence (0.5-1 s, or 8 s
        # or more past the start's window); with it, the site retries at once (jittered
        # 0.1-0.2 s) and stays under the 1 s recovery cap.
        assert 0.1 <= after[0] <= 0.2 and all(wait <= 1.0 for wait in after[:3]), after
        cluster.start_coordinator(state_dir=tmp_path / "state", pki_dir=pki.directory,
                                  port_file=tmp_path / "port", port=port)  # fmt: skip
        with AdminClient(target, pki.tls("admin")) as admin:
            admin.wait_for_sites({"site-a"}, timeout=60)


def _waits(log: str) -> list[float]:
    return [float(m) for m in re.findall(r"retrying in ([0-9.]+) s", log)]


def _wait_for(path: Path, condition: object, timeout: float = 60.0) -> None:
    assert callable(condition)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.is_file() and condition(path.read_text(errors="replace")):
            return
        time.sleep(0.1)
    raise TimeoutError(f"{path} never showed the expected lines:\n{path.read_text()[-2000:]}")


def test_an_approval_given_at_a_connected_site_reaches_the_coordinators_preflight(
    pki: Pki, tmp_path: Path, base_model: Path, site_data: dict[str, Path]
) -> None:
    import grpc

    from coordinator.plan import parse_plan
    from site_agent._synthetic import SYNTHETIC_LABELS

    site = SITES[0]
    plan = parse_plan({
        "name": "preflight", "dataset": "notes", "labels": list(SYNTHETIC_LABELS),
        "sites": [site], "defaults": {"steps": 1, "batch_size": 8},
        "lora": {"r": 4, "alpha": 8, "target_modules": ["query", "value"]},
    })  # fmt: skip
    bundle = plan.approval_bundle().sha256
    cluster = Cluster(log_dir=tmp_path / "logs")
    with cluster.running():
        target = _coordinator(cluster, pki, tmp_path)
        cluster.start_site(site, coordinator=target, pki_dir=pki.directory,
                           data_dir=site_data[site], base_model_dir=base_model,
                           threads=1)  # fmt: skip
        with AdminClient(target, pki.tls("admin")) as admin:
            admin.wait_for_sites({site}, timeout=120)
            with pytest.raises(grpc.RpcError) as refused:
                admin.start_run(plan)
            # The real site's hello told the dataset, its labels and the base model: only the
            # approval is missing.
            assert refused.value.details().splitlines() == [
                f"{site}: has not approved the run bundle {bundle} "
                f"(at the site, after review: baton-site approve {bundle})"
            ]
            approved = subprocess.run(
                [sys.executable, "-m", "site_agent", "approve", bundle,
                 "--data-dir", str(site_data[site])],
                capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
            )  # fmt: skip
            assert approved.returncode == 0, approved.stderr
            _wait_for(cluster.process(site).log_path, lambda log: "reported 1 approved" in log)
            assert admin.start_run(plan)
        # The claim is made: the run started. Its hop is not under test; killed now, the site
        # does not load torch and the model for it (~10 CPU s) before a SIGTERM would end it.
        cluster.process(site).kill()


def test_site_with_a_key_that_does_not_match_its_certificate_exits_2_with_one_line(
    pki: Pki, tmp_path: Path
) -> None:
    tls = TlsFiles(pki.directory / "ca.crt", pki.directory / "site-a.crt",
                   pki.directory / "site-b.key")  # fmt: skip
    code, stderr = _stopped(_site("localhost:1", tls, tmp_path / "data"))
    assert code == 2
    assert "Traceback" not in stderr
    [line] = [line for line in stderr.splitlines() if line.strip()]
    assert line.startswith("error: certificate ") and "do not match" in line


def test_site_with_bad_settings_exits_2_with_one_line(tmp_path: Path) -> None:
    process = subprocess.run(
        [sys.executable, "-m", "site_agent", "serve", "--coordinator", "x"],
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert process.returncode == 2
    [line] = [line for line in process.stderr.splitlines() if line.strip()]
    assert line.startswith("error: bad site settings: coordinator: ")
    assert "ca_certificate: Field required" in line


def test_site_that_does_not_trust_the_coordinator_stops_with_exit_3(
    pki: Pki, tmp_path: Path
) -> None:
    # A site set up entirely under another CA: its own certificate chains, the coordinator's not.
    tls = TlsFiles(pki.foreign / "ca.crt", pki.foreign / "site-a.crt", pki.foreign / "site-a.key")
    cluster = Cluster(log_dir=tmp_path / "logs")
    with cluster.running():
        target = _coordinator(cluster, pki, tmp_path)
        code, stderr = _stopped(_site(target, tls, tmp_path / "data"))
    assert code == 3
    assert "does not trust the coordinator's certificate" in _refusal_line(stderr)
