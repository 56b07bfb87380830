"""benchmarks/medquad_default_dev.py: its grid over the default start's variants, on rows made
up here (no MiniLM, no training)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from tests.benchmark_module import benchmark_module


@pytest.fixture(scope="module")
def dev() -> Iterator[ModuleType]:
    with benchmark_module("medquad_default_dev.py", "medquad_default_dev_benchmark") as module:
        yield module


def _row(
    split: int, setting: str, consolidation: str, test: float, forgetting: float
) -> dict[str, Any]:
    return {
        "split": split,
        "setting": setting,
        "position": 1.0,
        "final_fraction": 0.3,
        "consolidation": consolidation,
        "cv": test - 0.01,
        "cv_worst_forgetting": forgetting / 2,
        "test": test,
        "test_worst_forgetting": forgetting,
    }


def test_each_consolidation_is_a_grid_point_with_its_worst_split_per_setting(
    dev: ModuleType, tmp_path: Path
) -> None:
    rows = [
        _row(100, "sources", "shortest", 0.99, 0.01),
        _row(100, "dirichlet-0.1", "shortest", 0.98, 0.03),
        _row(101, "dirichlet-0.1", "shortest", 0.99, 0.00),
        _row(100, "sources", "6:0.3", 0.99, 0.00),
        _row(100, "dirichlet-0.1", "6:0.3", 0.99, 0.01),
        _row(101, "dirichlet-0.1", "6:0.3", 0.98, 0.02),
    ]
    args = argparse.Namespace(
        out=tmp_path, name="dev", space="budget", max_steps=60, folds=3, merge=None
    )
    dev.write(rows, args, 1.0, [])
    grid = {g["consolidation"]: g for g in json.loads((tmp_path / "dev.json").read_text())["grid"]}
    assert set(grid) == {"shortest", "6:0.3"}
    assert grid["shortest"]["worst_forgetting_max"] == pytest.approx(0.03)
    assert grid["shortest"]["worst_forgetting_max_by_setting"] == {
        "sources": pytest.approx(0.01),
        "dirichlet-0.1": pytest.approx(0.03),
    }
    assert grid["6:0.3"]["worst_forgetting_max_by_setting"]["dirichlet-0.1"] == pytest.approx(0.02)
    assert grid["6:0.3"]["cv_worst_forgetting_max"] == pytest.approx(0.01)
    markdown = (tmp_path / "dev.md").read_text()
    assert "| 1 | 0.3 | 6:0.3 |" in markdown and "dirichlet-0.1 0.020" in markdown
