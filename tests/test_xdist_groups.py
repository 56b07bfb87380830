"""`make test XDIST=2`: the tests tests/xdist_groups.py groups run on one worker, in a real
two-worker pytest-xdist run of a small project."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Collected first, so that a scheduler that ignored the groups would hand them out one test per
# worker in turn.
_RAY = """
import os, pytest

@pytest.mark.ray
@pytest.mark.parametrize("n", [1, 2])
def test_ray(n):
    with open(os.environ["RECORD"], "a") as out:
        out.write(f"ray {os.environ['PYTEST_XDIST_WORKER']}\\n")
"""
_SHARED = """
import os, pytest

@pytest.fixture(scope="module")
def model():
    with open(os.environ["RECORD"], "a") as out:
        out.write("model built\\n")

@pytest.mark.parametrize("n", [1, 2, 3])
def test_uses_the_model(model, n):
    with open(os.environ["RECORD"], "a") as out:
        out.write(f"shared {os.environ['PYTEST_XDIST_WORKER']}\\n")
"""
_PLAIN = """
@__import__("pytest").mark.parametrize("n", range(4))
def test_plain(n):
    pass
"""


def test_ray_tests_and_a_modules_fixture_users_each_run_on_one_worker(tmp_path: Path) -> None:
    pytest.importorskip("xdist")
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n    ray: starts Ray\n")
    for name, source in (("test_a_ray", _RAY), ("test_b_shared", _SHARED), ("test_c", _PLAIN)):
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
    record = tmp_path / "record"
    # Without the installed plugins this small project does not use: schemathesis's alone takes
    # ~4 CPU s to import, in the run and in each of its two workers.
    unused = [arg for name in ("schemathesis", "hypothesispytest", "anyio")
              for arg in ("-p", f"no:{name}")]  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "tests.xdist_groups",
         *unused, "-n", "2", "--dist", "loadgroup", "--max-worker-restart=0", str(tmp_path)],
        cwd=tmp_path, capture_output=True, text=True, timeout=240, check=False,
        env={**os.environ, "PYTHONPATH": str(ROOT), "RECORD": str(record)},
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "9 passed" in done.stdout, done.stdout
    lines = record.read_text().splitlines()
    workers = {kind: {line.split()[1] for line in lines if line.startswith(kind)}
               for kind in ("ray", "shared")}  # fmt: skip
    assert len(workers["ray"]) == 1, lines
    assert len(workers["shared"]) == 1, lines
    assert lines.count("model built") == 1


class _Item:
    def __init__(self, nodeid: str) -> None:
        self.nodeid = nodeid

    def get_closest_marker(self, name: str) -> object:
        return object() if name == "xdist_group" else None  # grouped already: kept as it is


class _Plugins:
    def hasplugin(self, name: str) -> bool:
        return name == "xdist"


class _WorkerConfig:
    pluginmanager = _Plugins()
    workerinput: dict[str, object] = {}


def test_a_worker_lists_the_tests_that_start_processes_first_in_their_own_order() -> None:
    from tests import xdist_groups

    ids = ["tests/coordinator_tests/test_a.py::test_one", "tests/integration/test_b.py::test_two",
           "tests/site_agent_tests/test_c.py::test_three", "tests/test_xdist_groups.py::test_four",
           "tests/integration/test_a.py::test_five"]  # fmt: skip
    items = [_Item(i) for i in ids]
    xdist_groups.pytest_collection_modifyitems(_WorkerConfig(), items)  # type: ignore[arg-type]
    assert [item.nodeid for item in items] == [ids[1], ids[3], ids[4], ids[0], ids[2]]
