"""The start-imports A/B's probe imports the arm's checkout, whatever directory the A/B runs in."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.benchmark_module import benchmark_module

ROOT = Path(__file__).resolve().parents[2]


def test_a_probe_imports_its_own_checkout_not_the_working_directorys(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    checkout = tmp_path / "other"
    (checkout / "coordinator").mkdir(parents=True)
    (checkout / "coordinator" / "__init__.py").write_text("")
    monkeypatch.chdir(ROOT)  # holds a coordinator package of its own
    code = f"import coordinator\nassert coordinator.__file__.startswith({str(checkout)!r})\n"
    with benchmark_module("start_imports_ab.py", "start_imports_ab_benchmark") as bench:
        # The probe's own assert fails its process, which `cpu_seconds` raises (check=True).
        bench.cpu_seconds(sys.executable, code, str(checkout))
        elsewhere = code.replace(str(checkout), str(ROOT / "coordinator"))
        with pytest.raises(subprocess.CalledProcessError):
            bench.cpu_seconds(sys.executable, elsewhere, str(checkout))
