"""`make wheelhouse`: every wheel a site agent needs, installable with no index at all.

The fast test builds the wheelhouse and checks pip's offline resolution of it (the script's own
`pip install --no-index --dry-run --report`); the slow one installs it into a fresh virtual
environment and runs `baton-site --help`. TORCH_INDEX is emptied here: PyTorch's CPU index is not
reachable from the test machines, whose pip configuration already serves the CPU torch wheel.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "deploy" / "wheelhouse.sh"
# pip with no configuration file and no PIP_* variable: only the wheelhouse can serve a wheel.
BARE_PIP_ENV = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")} | {
    "PIP_CONFIG_FILE": os.devnull
}


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    out = tmp_path_factory.mktemp("wheelhouse")
    result = subprocess.run(
        ["make", "--no-print-directory", "wheelhouse", f"WHEELHOUSE={out}", "TORCH_INDEX=",
         f"PYTHON={sys.executable}"],
        cwd=ROOT, capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_wheelhouse_resolves_the_site_agent_offline_with_checksums(wheelhouse: Path) -> None:
    wheels = {p.name for p in wheelhouse.glob("*.whl")}
    checked = subprocess.run(["sha256sum", "--check", "--strict", "SHA256SUMS"], cwd=wheelhouse,
                             capture_output=True, text=True, check=False)  # fmt: skip
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert {line.split()[1] for line in (wheelhouse / "SHA256SUMS").read_text().splitlines()} == (
        wheels
    )
    report = json.loads((wheelhouse / "resolution.json").read_text())
    resolved = {item["metadata"]["name"].lower(): item for item in report["install"]}
    assert {"baton-fl", "torch", "peft", "transformers", "grpcio"} <= set(resolved)
    for item in resolved.values():
        assert Path(unquote(urlparse(item["download_info"]["url"]).path)).parent == wheelhouse
    assert "+cpu" in resolved["torch"]["metadata"]["version"]
    assert not [name for name in resolved if name.startswith("nvidia-")]
    assert "sqlalchemy" not in resolved  # coordinator-only dependencies stay out


def test_verify_refuses_a_wheelhouse_with_a_missing_or_altered_wheel(
    wheelhouse: Path, tmp_path: Path
) -> None:
    def verify(folder: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["bash", str(SCRIPT), "--verify", str(folder)], capture_output=True,
                              text=True, timeout=300, check=False,
                              env=os.environ | {"PYTHON": sys.executable})  # fmt: skip

    assert verify(wheelhouse).returncode == 0
    partial = tmp_path / "partial"
    shutil.copytree(wheelhouse, partial, ignore=shutil.ignore_patterns("torch-*"))
    sums = (partial / "SHA256SUMS").read_text().splitlines()
    (partial / "SHA256SUMS").write_text("".join(f"{s}\n" for s in sums if "torch-" not in s))
    refused = verify(partial)
    assert refused.returncode != 0
    assert "No matching distribution found for torch" in refused.stderr
    altered = next(partial.glob("peft-*.whl"))
    altered.write_bytes(altered.read_bytes() + b"x")
    tampered = verify(partial)
    assert tampered.returncode != 0
    assert f"{altered.name}: FAILED" in tampered.stdout + tampered.stderr


@pytest.mark.slow
def test_wheelhouse_installs_into_a_fresh_environment_without_an_index(
    wheelhouse: Path, tmp_path: Path
) -> None:
    environment = tmp_path / "site-venv"
    venv.EnvBuilder(with_pip=True).create(environment)
    install = subprocess.run(
        [str(environment / "bin" / "pip"), "--isolated", "install", "--quiet", "--no-index",
         "--find-links", str(wheelhouse), "baton-fl[site]"],
        capture_output=True, text=True, timeout=1200, check=False, env=BARE_PIP_ENV,
    )  # fmt: skip
    assert install.returncode == 0, install.stderr[-3000:]
    shown = subprocess.run([str(environment / "bin" / "baton-site"), "--help"],
                           capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    assert "serve" in shown.stdout
