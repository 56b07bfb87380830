"""`Cluster.stop`: every site at once, then the coordinators (a restarted one too)."""

from __future__ import annotations

import time
from pathlib import Path

from coordinator.console.processes import Cluster

# Each process writes "<name> ready" once its handler is set, and its name when SIGTERM comes.
_SCRIPT = """
import signal, sys, time
name, path = sys.argv[1], sys.argv[2]
def stop(*_):
    with open(path, "a") as out:
        out.write(name + "\\n")
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
with open(path, "a") as out:
    out.write(name + " ready\\n")
while True:
    time.sleep(0.05)
"""


def _lines(record: Path) -> list[str]:
    return record.read_text().splitlines() if record.exists() else []


def test_sites_stop_before_any_coordinator_even_a_restarted_one(tmp_path: Path) -> None:
    record = tmp_path / "record"
    script = tmp_path / "process.py"
    script.write_text(_SCRIPT)
    cluster = Cluster(log_dir=tmp_path / "logs")
    # The order a test that restarted its coordinator leaves: the new coordinator is the newest.
    names = ["coordinator", "site-a", "site-b", "coordinator"]
    for index, name in enumerate(names):
        cluster._spawn(name, [str(script), f"{name}-{index}", str(record)])
    deadline = time.monotonic() + 60
    while sum(line.endswith(" ready") for line in _lines(record)) < len(names):
        assert time.monotonic() < deadline, "the test processes did not start"
        time.sleep(0.05)

    cluster.stop()

    stopped = [line for line in _lines(record) if not line.endswith(" ready")]
    assert sorted(stopped[:2]) == ["site-a-1", "site-b-2"]
    assert stopped[2:] == ["coordinator-3", "coordinator-0"]
    assert all(managed.process.poll() is not None for managed in cluster.processes)
