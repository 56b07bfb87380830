"""`Cluster.stop`: every site at once, then the coordinators (a restarted one too)."""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any

from coordinator.console.processes import Cluster

# Each process writes "<name> ready" once its handler is set, and its name on every SIGTERM;
# it exits 1 s after the first (as a site hands back its hop), so a second SIGTERM is seen.
_SCRIPT = """
import signal, sys, time
name, path = sys.argv[1], sys.argv[2]
terms = []
def stop(*_):
    with open(path, "a") as out:
        out.write(name + "\\n")
    terms.append(time.monotonic())
signal.signal(signal.SIGTERM, stop)
with open(path, "a") as out:
    out.write(name + " ready\\n")
while not terms or time.monotonic() < terms[0] + 1:
    time.sleep(0.05)
"""


def _lines(record: Path) -> list[str]:
    return record.read_text().splitlines() if record.exists() else []


def test_sites_stop_together_with_one_sigterm_each_before_any_coordinator(tmp_path: Path) -> None:
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

    sent: list[tuple[str, int]] = []
    for managed in cluster.processes:
        send = managed.process.send_signal

        def counted(signum: int, name: str = managed.name, send: Any = send) -> None:
            sent.append((name, signum))
            send(signum)

        managed.process.send_signal = counted  # type: ignore[method-assign]

    cluster.stop()

    # A second SIGTERM makes a site stop at once (its hop cancelled, not handed back).
    assert sorted(sent) == sorted((name, signal.SIGTERM) for name in names)

    stopped = [line for line in _lines(record) if not line.endswith(" ready")]
    assert sorted(stopped[:2]) == ["site-a-1", "site-b-2"]
    assert stopped[2:] == ["coordinator-3", "coordinator-0"]
    assert all(managed.process.poll() is not None for managed in cluster.processes)
