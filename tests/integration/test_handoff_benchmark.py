"""benchmarks/handoff.py on a small real run: Baton's ledger breakdown and the raw floor."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import pytest

BENCHMARK = Path(__file__).resolve().parents[2] / "benchmarks" / "handoff.py"


# Slow (~25 s; make test-all): the benchmark's own harness, run with the benchmarks.
@pytest.mark.slow
def test_handoff_benchmark_breaks_batons_handoffs_into_ledger_phases(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = importlib.util.spec_from_file_location("handoff_benchmark", BENCHMARK)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)

    argv = ["--peers", "baton,raw", "--quick", "--sites", "2", "--out", str(tmp_path), "--warm"]
    assert module.main(argv) == 0

    report = json.loads((tmp_path / "handoff.json").read_text())
    baton, raw = report["peers"]["baton"], report["peers"]["raw"]
    assert baton["status"] == raw["status"] == "ok"
    assert baton["visits"] == 4 and len(baton["handoffs_ms"]) == 3
    # The driver asks for the run's status seldom; its end is the ledger's run.completed.
    assert report["baton_poll_s"] == 1.0
    assert 0 < baton["start_to_first_hop_s"] < baton["wall_s"]
    assert 0 < baton["warm"]["start_to_first_hop_s"] < baton["warm"]["wall_s"]
    # Every handoff is split into phases between ledger events that add up to it.
    per_hop = baton["phases"]["per_hop"]
    assert len(per_hop) == 3
    for handoff, phases in zip(baton["handoffs_ms"], per_hop, strict=True):
        assert sum(phases.values()) == pytest.approx(handoff, abs=0.05)
        assert len(phases) >= 2  # at least one ledger event (the commit) inside the handoff
    assert next(iter(baton["phases"]["phases"])).startswith("this.train_finished -> ")
    # The floor moves a payload of the size of Baton's stored checkpoint.
    assert raw["payload_bytes"] == baton["checkpoint_bytes"] > 0
    assert len(raw["handoffs_ms"]) == 3 and raw["peak_rss_mb"] > 0
    markdown = (tmp_path / "handoff.md").read_text()
    assert "| baton | ok | 3 |" in markdown and "| raw | ok | 3 |" in markdown
    # Each handoff says whether its next site had prepared; none is dropped from the figures.
    assert len(baton["next_site_prepared"]) == 3
    assert baton["prepared"]["handoffs"] == sum(bool(f) for f in baton["next_site_prepared"])
    # The same job again on the cluster still running: every next site has its trainer.
    warm = baton["warm"]
    assert warm["visits"] == 4 and len(warm["handoffs_ms"]) == 3
    assert warm["next_site_prepared"] == [True, True, True]
    assert warm["prepared"]["handoffs"] == 3
    assert "| same job again, warm cluster | 3 |" in markdown


def _benchmark(monkeypatch: pytest.MonkeyPatch) -> Any:
    spec = importlib.util.spec_from_file_location("handoff_benchmark_logs", BENCHMARK)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    return module


def test_a_handoff_counts_as_prepared_only_if_the_preparation_ended_before_the_task(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    module = _benchmark(monkeypatch)
    (tmp_path / "coordinator.0.log").write_text("hop 1 of run r1: prepared\n")
    (tmp_path / "site-a.0.log").write_text(
        "INFO site_agent.agent: hop 1 of run r1: prepared\n"
        "INFO site_agent.agent: hop 1 of run r1: starting\n"
        "INFO site_agent.agent: hop 3 of run r1: starting\n"  # prepared after its task came
        "INFO site_agent.agent: hop 3 of run r1: prepared\n"
        "INFO site_agent.agent: hop 5 of run r0: prepared\n"  # another run's hop 5
        "INFO site_agent.agent: hop 5 of run r1: starting\n"
    )
    (tmp_path / "site-b.0.log").write_text(
        "INFO site_agent.agent: hop 2 of run r1: starting\n"
        "INFO site_agent.agent: tabular trainer loaded in 2.00 s (process CPU so far 2.1 s)\n"
        "INFO site_agent.agent: hop 4 of run r1: starting\n"
    )

    assert module.prepared_before_task(tmp_path, "r1", "minilm") == {
        1: True, 2: False, 3: False, 4: False, 5: False}  # fmt: skip
    # Tabular hops prepare nothing: the trainer loaded before the task is what counts.
    assert module.prepared_before_task(tmp_path, "r1", "tabular") == {
        1: False, 2: False, 3: False, 4: True, 5: False}  # fmt: skip


def test_the_rss_sampler_counts_descendants_and_scans_the_process_table_once_a_second(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import subprocess
    import time

    import psutil

    module = _benchmark(monkeypatch)
    grandchild = "b = bytearray(96 << 20); import time; time.sleep(30)"
    child = (
        "import subprocess, sys, time; "
        f"subprocess.Popen([sys.executable, '-c', {grandchild!r}]); time.sleep(30)"
    )
    process = subprocess.Popen([sys.executable, "-c", child])
    scans = 0
    real_iter = psutil.process_iter

    def counted(*args: Any, **kwargs: Any) -> Any:
        nonlocal scans
        scans += 1
        return real_iter(*args, **kwargs)

    monkeypatch.setattr(module.psutil, "process_iter", counted)
    try:
        sampler = module.RssSampler()
        sampler.roots = [process.pid]
        deadline = time.monotonic() + 20
        while sampler.peak_bytes < 96 << 20 and time.monotonic() < deadline:
            sampler._tree_at = 0.0  # rescan until the grandchild has started
            sampler.sample()
            time.sleep(0.05)
        assert sampler.peak_bytes >= 96 << 20  # the grandchild's buffer is counted
        scans = 0
        for _ in range(5):
            sampler.sample()
        assert scans == 0  # within a second: the known processes' RSS only
    finally:
        for proc in psutil.Process(process.pid).children(recursive=True):
            proc.kill()
        process.kill()
        process.wait()


@pytest.mark.slow
def test_handoff_benchmark_runs_the_demo_minilm_job_for_baton_and_the_floor(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = importlib.util.spec_from_file_location("handoff_benchmark_minilm", BENCHMARK)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)

    argv = ["--task", "minilm", "--peers", "baton,raw,flower", "--quick", "--sites", "2",
            "--out", str(tmp_path)]  # fmt: skip
    assert module.main(argv) == 0

    report = json.loads((tmp_path / "handoff-minilm.json").read_text())
    assert report["task"] == "minilm" and "MiniLM" in report["job"]
    baton, raw = report["peers"]["baton"], report["peers"]["raw"]
    assert baton["status"] == raw["status"] == "ok"
    assert baton["visits"] == 4 and len(baton["handoffs_ms"]) == 3
    # A LoRA adapter of MiniLM is far larger than the tabular model's few hundred bytes.
    assert raw["payload_bytes"] == baton["checkpoint_bytes"] > 50_000
    # Flower's deployment runs the same job (handoff_peers/minilm_job.py) in its own venv.
    flower = report["peers"]["flower"]
    assert flower["status"] == "ok", flower.get("error")
    assert flower["visits"] == 4 and len(flower["handoffs_ms"]) == 3
    assert not (tmp_path / "handoff.json").exists()  # the tabular report is left alone
