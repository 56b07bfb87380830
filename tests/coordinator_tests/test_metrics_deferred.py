"""The coordinator's metric families are made on first use, after ready: an update, a scrape or
`build` (any thread) makes them once, and nothing counted before or meanwhile is lost."""

from __future__ import annotations

import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from coordinator.metrics import HOP_STATUSES, CoordinatorMetrics
from tests.conftest import Pki
from tests.coordinator_tests.conftest import serving_process

_FIRST_USE_PROBE = """
import sys
from coordinator.metrics import CoordinatorMetrics
metrics = CoordinatorMetrics()
metrics.track_connected_sites(lambda: 3)
metrics.hop_phase("hop-1", "leased")  # the phase's start only: nothing to observe yet
print("before the first update:", "prometheus_client" in sys.modules)
metrics.hop_settled("committed")
print("after it:", "prometheus_client" in sys.modules)
sys.stdout.write(metrics.exposition().decode())
"""


def _samples(exposition: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(exposition)
        for sample in family.samples
    }


def test_the_metrics_are_made_by_their_first_update_with_every_label_and_the_site_count() -> None:
    out = subprocess.run(
        [sys.executable, "-c", _FIRST_USE_PROBE], capture_output=True, text=True, check=True
    ).stdout
    first, second, exposition = out.split("\n", 2)
    assert first == "before the first update: False"
    assert second == "after it: True"
    samples = _samples(exposition)
    assert samples[("baton_hops_total", (("status", "committed"),))] == 1
    for status in HOP_STATUSES:
        assert ("baton_hops_total", (("status", status),)) in samples
    assert samples[("baton_connected_sites", ())] == 3
    assert samples[("baton_refusals_total", (("reason", "unauthenticated"),))] == 0


def test_updates_from_many_threads_while_the_metrics_are_made_are_all_counted() -> None:
    metrics = CoordinatorMetrics()
    connected = [0]
    metrics.track_connected_sites(lambda: connected[0])
    start = threading.Barrier(9)

    def update() -> None:
        start.wait()
        for _ in range(500):
            metrics.hop_settled("committed")
            metrics.refusal("UNAUTHENTICATED")

    def build() -> None:
        start.wait()
        metrics.build()

    threads = [threading.Thread(target=update) for _ in range(8)]
    threads.append(threading.Thread(target=build))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    metrics.build()  # again: nothing is made twice
    connected[0] = 2
    samples = _samples(metrics.exposition().decode())
    assert samples[("baton_hops_total", (("status", "committed"),))] == 4000
    assert samples[("baton_refusals_total", (("reason", "unauthenticated"),))] == 4000
    assert samples[("baton_connected_sites", ())] == 2


def test_a_scrape_right_after_ready_gets_every_family(pki: Pki, tmp_path: Path) -> None:
    port_file, metrics_port_file = tmp_path / "port", tmp_path / "metrics.port"
    process = serving_process(
        [sys.executable, "-m", "coordinator", "coordinator", "serve", "--port", "0",
         "--port-file", str(port_file), "--metrics-port", "0",
         "--metrics-port-file", str(metrics_port_file), "--state-dir", str(tmp_path / "state"),
         "--no-dashboard", "--log-level", "WARNING", "--ca", str(pki.directory / "ca.crt"),
         "--cert", str(pki.directory / "coordinator.crt"),
         "--key", str(pki.directory / "coordinator.key")],
        port_file,
    )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{metrics_port_file.read_text()}/metrics"
        with urllib.request.urlopen(url, timeout=30) as response:
            exposition = response.read().decode()
    finally:
        process.terminate()
        process.communicate(timeout=60)
    samples = _samples(exposition)
    assert samples[("baton_connected_sites", ())] == 0
    for status in HOP_STATUSES:
        assert samples[("baton_hops_total", (("status", status),))] == 0
    names = {name for name, _ in samples}
    assert {"baton_handoff_seconds_count", "baton_lease_expiries_total"} <= names
