"""The cold-cluster benchmark's report: every row has the header's columns; its sites' venv
holds `baton-fl[site]`'s dependencies only."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
from packaging.utils import canonicalize_name

from tests.benchmark_module import benchmark_module

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench() -> Iterator[ModuleType]:
    with benchmark_module("cold_cluster.py", "cold_cluster_benchmark") as module:
        yield module


def test_the_report_table_has_one_cell_per_column_for_a_start_and_a_failed_start(
    bench: ModuleType,
) -> None:
    sites = {"a": 2.5, "b": 2.75, "c": None, "d": 2.0}
    start = {
        "coordinator_ready_s": 1.0, "hello_s": sites, "hello_after_spawn_s": sites,
        "base_model_loaded_s": {"a": 7.0, "b": 7.25, "c": None, "d": None},
        "first_site_model_loaded_s": 7.0, "site_cpu_s_at_hello": sites,
        "site_cpu_s_at_loaded": sites, "all_connected_s": 2.8, "run_started_s": 2.9,
        "first_step_s": 7.5, "first_site": "a", "cpu_s_at_first_step": {"a": 5.5, "b": 5.0},
        "cpu_floor_s": 5.25, "load_average_before": [1.0, 1.0, 1.0],
        "first_site_hop_s": 3.0, "first_site_cpu_s_at_hop": 1.5,
        "coordinator_cpu_s": {"ready": 0.75, "all_connected": 0.8, "first_hop": 0.85},
    }  # fmt: skip
    report = {
        "generated": "now", "command": "cold_cluster.py", "machine": "x", "cores": 2,
        "site_args": "--preload=eager", "starts": [start, {"error": "run failed: boom"}],
    }  # fmt: skip

    table = [line for line in bench.markdown(report).splitlines() if line.startswith("|")]

    assert len({line.count("|") for line in table}) == 1, table
    assert table[2].startswith("| 1 | 1.0 | 2.75 | 2.75 | 7.25 | 7.0 | 2.8 | 7.5 | 5.5 | 10.5 |")
    assert table[2].endswith("| [1.0, 1.0, 1.0] | 3.0 | 1.5 | 0.75 / 0.85 |")
    assert table[3].startswith("| 2 | failed: run failed: boom |")
    assert "`--preload=eager`" in bench.markdown(report)


def test_the_sites_venv_holds_the_site_extras_closure_not_the_dev_or_coordinator_ones(
    bench: ModuleType,
) -> None:
    closure = sys.modules["_site_venv"].site_closure(ROOT / "pyproject.toml")
    names = {canonicalize_name(d.metadata["Name"]) for d in closure}
    assert {"torch", "transformers", "peft", "grpcio", "prometheus-client", "sympy"} <= names
    # dev / demo extras (sentence-transformers pulls scipy) and the coordinator's
    assert not names & {"scipy", "trio", "scikit-learn", "sqlalchemy", "fastapi", "pytest"}
