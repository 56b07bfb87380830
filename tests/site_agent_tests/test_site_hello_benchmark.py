"""The site-hello benchmark: a real site start (fresh interpreter, first registration, model hash)
measured per arm, its report naming what the start loaded."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from tests.benchmark_module import benchmark_module

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench() -> Iterator[ModuleType]:
    with benchmark_module("site_hello.py", "site_hello_benchmark") as module:
        yield module


def test_each_start_builds_a_hello_with_its_dataset_and_the_report_names_what_it_loaded(
    bench: ModuleType, tmp_path: Path
) -> None:
    report = bench.main(
        ["--rounds", "2", "--this-venv", "--out", str(tmp_path), "--name", "hello",
         f"here={ROOT}"]
    )  # fmt: skip

    arm = report["arms"]["here"]
    assert len(arm["cpu_s"]) == len(arm["wall_s"]) == 2
    assert all(cpu > 0 for cpu in arm["cpu_s"])
    # A site's start registers text data and hashes its model without numpy or torch.
    assert "numpy" not in arm["heavy"] and "torch" not in arm["heavy"]
    assert "cryptography.x509" in arm["heavy"]  # what the check of its certificate needs
    assert json.loads((tmp_path / "hello.json").read_text())["arms"]["here"] == arm
    assert "| here |" in (tmp_path / "hello.md").read_text()


def test_an_arm_must_name_its_checkout(bench: ModuleType, tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        bench.main(["--out", str(tmp_path), "no-checkout"])
