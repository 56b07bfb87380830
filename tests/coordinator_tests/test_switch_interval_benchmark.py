"""benchmarks/switch_interval.py times the same transaction-shaped job at both switch intervals,
in one run, and puts the interpreter's setting back as it found it."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from protocols.interpreter import CPYTHON_SWITCH_INTERVAL_SECONDS, SWITCH_INTERVAL_SECONDS
from tests.benchmark_module import benchmark_module


def test_the_benchmark_reports_both_settings_from_one_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = sys.getswitchinterval()
    argv = ["switch_interval.py", "--jobs", "4", "--every-ms", "1", "--statements", "2",
            "--out", str(tmp_path), "--name", "smoke"]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    try:
        with benchmark_module("switch_interval.py", "switch_interval_benchmark") as bench:
            bench.main()
    finally:
        sys.setswitchinterval(before)
    result = json.loads((tmp_path / "smoke.json").read_text())
    assert result["switch_intervals_s"] == [
        CPYTHON_SWITCH_INTERVAL_SECONDS,
        SWITCH_INTERVAL_SECONDS,
    ]
    for figures in result["figures"].values():
        assert figures["jobs"] == 4
        assert 0 <= figures["wake_ms_p50"] <= figures["wake_ms_p99"]
        assert figures["cpu_ms_p50"] > 0
    assert f"| {SWITCH_INTERVAL_SECONDS * 1000:g} ms |" in (tmp_path / "smoke.md").read_text()
