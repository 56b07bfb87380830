"""Real `baton` processes that cannot start: one line on stderr, a meaningful exit, no secret."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import Pki
from tests.integration.conftest import Cluster

SECRET = "s3cr3t-Pa55"


def _serve(
    pki: Pki, state_dir: Path, *extra: str, key: Path | None = None
) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable, "-m", "coordinator", "coordinator", "serve",
            "--state-dir", str(state_dir),
            "--ca", str(pki.directory / "ca.crt"),
            "--cert", str(pki.directory / "coordinator.crt"),
            "--key", str(key or pki.directory / "coordinator.key"),
            # Not the default 8443: a coordinator of another test (another xdist worker) or
            # of anything else on the machine may hold it.
            "--dashboard-port", "0",
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "COLUMNS": "60"},  # a narrow terminal must not wrap the line
    )  # fmt: skip


def _refused(process: subprocess.Popen[str]) -> tuple[int, str]:
    """Exit code and stderr of a coordinator that should refuse to start."""
    try:
        _, stderr = process.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        pytest.fail("the coordinator started instead of refusing")
    return process.returncode, stderr


def _one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr and SECRET not in stderr
    return lines[0]


def test_a_second_coordinator_on_a_taken_port_exits_1_naming_the_port(
    pki: Pki, tmp_path: Path
) -> None:
    cluster = Cluster(log_dir=tmp_path / "logs")
    with cluster.running():
        port = cluster.start_coordinator(
            state_dir=tmp_path / "first", pki_dir=pki.directory, port_file=tmp_path / "port"
        )
        code, stderr = _refused(_serve(pki, tmp_path / "second", "--port", str(port)))
        cluster.check_alive()
    assert code == 1
    assert _one_line(stderr) == f"error: port {port} is already in use"


def test_a_second_coordinator_on_the_same_state_directory_is_refused_naming_the_holder(
    pki: Pki, tmp_path: Path
) -> None:
    cluster = Cluster(log_dir=tmp_path / "logs")
    with cluster.running():
        cluster.start_coordinator(
            state_dir=tmp_path / "state", pki_dir=pki.directory, port_file=tmp_path / "port"
        )
        holder = cluster.process("coordinator").process.pid
        code, stderr = _refused(_serve(pki, tmp_path / "state", "--port", "0"))
        cluster.check_alive()
    assert code == 1
    line = _one_line(stderr)
    assert "another coordinator is using" in line and f"pid {holder} " in line


def test_a_coordinator_restarted_on_its_state_directory_starts_again(
    pki: Pki, tmp_path: Path
) -> None:
    cluster = Cluster(log_dir=tmp_path / "logs")
    with cluster.running():
        for _ in range(2):  # the claim is released on stop (and by the OS on a crash)
            cluster.start_coordinator(
                state_dir=tmp_path / "state", pki_dir=pki.directory, port_file=tmp_path / "port"
            )
            cluster.process("coordinator").kill()


def test_certificate_and_key_that_do_not_match_exit_2_with_one_line(
    pki: Pki, tmp_path: Path
) -> None:
    code, stderr = _refused(
        _serve(pki, tmp_path / "state", "--port", "0", key=pki.directory / "site-a.key")
    )
    assert code == 2
    assert "do not match" in _one_line(stderr)
    assert not (tmp_path / "state").exists()


def test_an_unreadable_key_exits_2_with_one_line(pki: Pki, tmp_path: Path) -> None:
    key = tmp_path / "garbled.key"
    key.write_text("-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n")
    code, stderr = _refused(_serve(pki, tmp_path / "state", "--port", "0", key=key))
    assert code == 2
    assert f"{key} is not an unencrypted PEM private key" in _one_line(stderr)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (f"postgres://baton:{SECRET}@db.example/baton", "unknown dialect 'postgres'"),
        (f"mysql://baton:{SECRET}@db.example/baton", "SQLite and PostgreSQL only"),
        (f"postgresql+psycopg://baton:{SECRET}@127.0.0.1:1/baton", "cannot open the ledger"),
        ("not a url", "is not a URL"),
    ],
    ids=["typo", "dialect", "unreachable", "garbage"],
)
def test_a_bad_database_url_exits_2_with_one_line_and_the_password_masked(
    pki: Pki, tmp_path: Path, url: str, expected: str
) -> None:
    code, stderr = _refused(_serve(pki, tmp_path / "state", "--port", "0", "--database-url", url))
    assert code == 2
    line = _one_line(stderr)
    assert expected in line
    if "baton:" in url:
        assert "baton:***@" in line


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_the_served_ledger_url_is_logged_with_its_password_masked(
    pki: Pki, tmp_path: Path, database_url: str
) -> None:
    from sqlalchemy import make_url

    # The test server trusts local connections: any password is accepted, none may be shown.
    url = make_url(database_url).set(password=SECRET).render_as_string(hide_password=False)
    cluster = Cluster(log_dir=tmp_path / "logs", env={"BATON_DATABASE_URL": url})
    with cluster.running():
        cluster.start_coordinator(
            state_dir=tmp_path / "state", pki_dir=pki.directory, port_file=tmp_path / "port"
        )
        log = cluster.process("coordinator").log_tail()
    assert ":***@" in log and SECRET not in log


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_a_second_coordinator_on_the_same_postgres_database_is_refused_naming_the_holder(
    pki: Pki, tmp_path: Path, database_url: str
) -> None:
    cluster = Cluster(log_dir=tmp_path / "logs", env={"BATON_DATABASE_URL": database_url})
    with cluster.running():
        cluster.start_coordinator(
            state_dir=tmp_path / "first", pki_dir=pki.directory, port_file=tmp_path / "port"
        )
        holder = cluster.process("coordinator").process.pid
        second = _serve(pki, tmp_path / "second", "--port", "0", "--database-url", database_url)
        code, stderr = _refused(second)
        cluster.check_alive()
    assert code == 1
    line = _one_line(stderr)
    assert "another coordinator is using the database" in line
    assert f"baton-coordinator pid {holder} " in line


def test_ledger_verify_on_a_missing_database_file_says_so_and_creates_nothing(
    tmp_path: Path,
) -> None:
    missing = tmp_path / "nowhere" / "ledger.sqlite3"
    result = subprocess.run(
        [sys.executable, "-m", "coordinator", "ledger", "verify",
         "--database-url", f"sqlite:///{missing}"],
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert result.returncode == 2
    expected = f"error: no ledger database at {missing}: check --database-url"
    assert _one_line(result.stderr) == expected
    assert not missing.exists() and not missing.parent.exists()


def test_a_sqlite_ledger_in_a_missing_folder_exits_2_and_creates_nothing(
    pki: Pki, tmp_path: Path
) -> None:
    database = tmp_path / "nowhere" / "ledger.sqlite3"
    process = _serve(pki, tmp_path / "state", "--port", "0", "--database-url",
                     f"sqlite:///{database}")  # fmt: skip
    code, stderr = _refused(process)
    assert code == 2
    assert "does not exist" in _one_line(stderr)
    assert not database.parent.exists()


def test_two_coordinators_sharing_one_sqlite_ledger_file_are_refused(
    pki: Pki, tmp_path: Path
) -> None:
    shared = f"sqlite:///{tmp_path / 'shared.sqlite3'}"
    cluster = Cluster(log_dir=tmp_path / "logs", env={"BATON_DATABASE_URL": shared})
    with cluster.running():
        cluster.start_coordinator(
            state_dir=tmp_path / "first", pki_dir=pki.directory, port_file=tmp_path / "port"
        )
        code, stderr = _refused(_serve(pki, tmp_path / "second", "--port", "0",
                                       "--database-url", shared))  # fmt: skip
    assert code == 1
    assert "another coordinator is using the SQLite ledger" in _one_line(stderr)
