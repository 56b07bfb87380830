"""The README's "Manual setup" section, run as written: its bash blocks in a fresh folder."""

from __future__ import annotations

import contextlib
import os
import random
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"


def manual_setup_script() -> str:
    """Every ```bash block of the README's "## Manual setup" section, in order."""
    text = README.read_text()
    section = text.split("\n## Manual setup\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"^```bash\n(.*?)^```$", section, flags=re.DOTALL | re.MULTILINE)
    assert blocks, "the Manual setup section has no bash block"
    return "\n".join(blocks)


def _heart_csv(path: Path, seed: int, shift: float) -> None:
    rng = random.Random(seed)
    lines = ["age,sex,trestbps,chol,thalach,oldpeak,label"]
    for _ in range(120):
        age, sex = rng.gauss(54 + shift, 9), rng.randint(0, 1)
        thalach, oldpeak = rng.gauss(150, 20), abs(rng.gauss(1.0, 1.0))
        risk = 0.07 * (age - 54) + 0.8 * sex - 0.03 * (thalach - 150) + 0.7 * oldpeak - 0.9
        label = int(risk + rng.gauss(0, 0.7) > 0)
        lines.append(f"{age:.0f},{sex},{rng.gauss(132, 17):.0f},{rng.gauss(245, 50):.0f},"
                     f"{thalach:.0f},{oldpeak:.1f},{label}")  # fmt: skip
    path.write_text("\n".join(lines) + "\n")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_readme_manual_setup_runs_as_written(tmp_path: Path) -> None:
    _heart_csv(tmp_path / "st-marys.csv", seed=0, shift=0)
    _heart_csv(tmp_path / "northgate.csv", seed=1, shift=6)
    script = tmp_path / "manual-setup.sh"
    script.write_text(manual_setup_script())
    bin_dir = str(Path(sys.executable).parent)  # where `baton` and `baton-site` are installed
    # This checkout's packages, whatever the working directory (PYTHONPATH may be relative).
    python_path = os.pathsep.join([str(README.parent), os.environ.get("PYTHONPATH", "")])
    env = os.environ | {"PORT": str(_free_port()), "DASHBOARD_PORT": "0",
                        "PATH": f"{bin_dir}:{os.environ['PATH']}",
                        "PYTHONPATH": python_path, "COLUMNS": "200"}  # fmt: skip
    log = tmp_path / "manual-setup.log"
    with log.open("w") as sink:
        process = subprocess.Popen(
            ["bash", "-euo", "pipefail", str(script)], cwd=tmp_path, env=env,
            stdout=sink, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        try:
            process.wait(timeout=240)
        finally:
            # Services the script started (and, on failure, left running) die with it.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    output = log.read_text()
    assert process.returncode == 0, output[-4000:]
    assert "run heart-v1" in output and ": completed" in output, output[-4000:]
    assert re.search(r"st-marys\s.*yes", output) and re.search(r"northgate\s.*yes", output)
    assert "ledger verifies" in output
