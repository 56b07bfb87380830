"""The site-training benchmark runs end to end (quick mode, tiny model) and writes its results."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCHMARK = Path(__file__).resolve().parents[2] / "benchmarks" / "site_training.py"


def test_quick_benchmark_writes_json_and_markdown(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = importlib.util.spec_from_file_location("site_training_benchmark", BENCHMARK)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up
    spec.loader.exec_module(module)

    assert module.main(["--quick", "--tiny-model", "--out-dir", str(tmp_path)]) == 0

    report = json.loads((tmp_path / "site_training.json").read_text())
    assert report["repetitions"] == 2 and report["steps_per_repetition"] == 3
    assert len(report["agent_step_s"]) == len(report["bare_step_s"]) == 6
    assert report["ratio"] > 0 and report["batch_size"] == 16 and report["max_length"] == 64
    assert "| bare torch + peft |" in (tmp_path / "site_training.md").read_text()
