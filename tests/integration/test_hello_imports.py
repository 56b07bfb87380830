"""What a real site process imports before its hello to a real coordinator (mTLS on loopback):
not the settings libraries' providers (pydantic-settings, dotenv, argparse), nor the dataset
parsers (the hello lists the registrations, it parses no data file), nor numpy (statistics and
releases import it where they compute)."""

from __future__ import annotations

import time
from pathlib import Path

from site_agent._synthetic import generate_site_records, write_site_dataset
from site_agent.registry import register_dataset
from tests.conftest import SITES, Pki
from tests.integration.conftest import Cluster

HELLO = "connected to coordinator"
# pydantic-settings imported every settings source and provider it has (dotenv, argparse...).
NOT_BEFORE_HELLO = {"pydantic_settings", "dotenv", "argparse", "site_agent.loaders", "numpy"}


def imported_before(log: str, line_part: str) -> set[str]:
    """The modules `-X importtime` listed in `log` before its first line holding `line_part`."""
    lines = log.splitlines()
    end = next(i for i, line in enumerate(lines) if line_part in line)
    return {line.rsplit("|", 1)[-1].strip() for line in lines[:end]
            if line.startswith("import time:")}  # fmt: skip


def test_a_site_says_hello_without_the_settings_providers_or_the_dataset_parsers(
    pki: Pki, tmp_path: Path
) -> None:
    site = SITES[0]
    # Registered beforehand, as `baton-site data register` does: the hello only lists it (a
    # legacy `<name>.jsonl` left in the folder would be registered, so parsed, on first sight).
    source = write_site_dataset(tmp_path / "notes.jsonl", generate_site_records(0, 3, n=60, seed=1))
    data_dir = tmp_path / "data"
    register_dataset(data_dir, "notes", source, task_type="seq-classification")
    cluster = Cluster(log_dir=tmp_path / "logs")
    with cluster.running():
        port = cluster.start_coordinator(
            state_dir=tmp_path / "coordinator", pki_dir=pki.directory, port_file=tmp_path / "port"
        )
        managed = cluster.start_command(site, [
            "-X", "importtime", "-m", "site_agent", "serve", "--coordinator", f"localhost:{port}",
            "--ca", str(pki.directory / "ca.crt"), "--cert", str(pki.directory / f"{site}.crt"),
            "--key", str(pki.directory / f"{site}.key"), "--data-dir", str(data_dir),
        ])  # fmt: skip
        deadline = time.monotonic() + 120
        while HELLO not in managed.log_path.read_text(errors="replace"):
            assert managed.process.poll() is None, managed.log_tail()
            assert time.monotonic() < deadline, "the site did not say hello"
            time.sleep(0.05)
        imported = imported_before(managed.log_path.read_text(errors="replace"), HELLO)
    assert "site_agent.agent" in imported  # importtime listed the site's imports
    assert not imported & NOT_BEFORE_HELLO
