"""A site's start to its first hello, for one or more checkouts, interleaved: CPU, wall, modules.

Each start is a fresh interpreter that does what `baton-site serve` does before its first hello:
imports `site_agent.agent`, builds the agent (its settings, certificate and key), registers the
demo's legacy ``triage-notes.jsonl`` (written once per start by the site's own `demo-data`, so
the registration is a first one, as in `cold_cluster.py`) and hashes the packaged
all-MiniLM-L6-v2 (a fresh memory file per start, as a new site has), then builds the hello
message. It reports the process's CPU seconds (user + system, `getrusage`) and the wall time from
the spawn to the printed hello, the number of modules loaded, and which heavy libraries were.

In a cold cluster on two cores the four sites' hellos share the CPU with the coordinator's start:
what a hello costs delays the coordinator's readiness and the first hop (`cold_cluster.py`).

An arm is ``NAME=CHECKOUT``; arms run in turn, their order reversed every round. Sites run as
deployed, in the `baton-fl[site]`-only venv (``_site_venv``; ``--this-venv``: this interpreter).

    .venv/bin/python benchmarks/site_hello.py --rounds 6 before=/tmp/base after=.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from _harness import markdown_row, project_bytecode, report_head  # noqa: E402
from _site_venv import site_python  # noqa: E402

from coordinator.console.demo import packaged_minilm  # noqa: E402
from protocols.pki import Role, init_ca, issue_certificate  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
CACHE = ROOT / "benchmarks" / ".peers"
HEAVY = ("numpy", "torch", "transformers", "pydantic", "sqlalchemy", "cryptography.x509")

# The child: a site's steps up to its first hello, then one JSON line.
_CHILD = """
import json, resource, sys
from pathlib import Path
from site_agent.agent import SiteAgent
from site_agent.base_model import remember_hashes_in
from site_agent.settings import SiteSettings
pki, data, model, memory = (Path(a) for a in sys.argv[1:5])
remember_hashes_in(memory)  # as `baton-site serve` does; a new site's: the model is hashed
agent = SiteAgent(SiteSettings(
    coordinator="localhost:1", ca_certificate=pki / "ca.crt", certificate=pki / "site.crt",
    private_key=pki / "site.key", data_dir=data, base_model_dir=model,
))
hello = agent._hello()
assert [d.name for d in hello.datasets] == ["triage-notes"], hello.datasets
usage = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({
    "cpu_s": usage.ru_utime + usage.ru_stime,
    "modules": len(sys.modules),
    "heavy": sorted(m for m in json.loads(sys.argv[5]) if m in sys.modules),
}))
"""


def one_start(python: Path, checkout: Path, pki: Path, work: Path, model: Path) -> dict[str, Any]:
    """One fresh site interpreter's start to its hello (its own data folder and hash memory)."""
    data = work / "data"
    shutil.rmtree(data, ignore_errors=True)
    data.mkdir(parents=True)
    env = {**os.environ, "PYTHONPATH": str(checkout), "HF_HUB_OFFLINE": "1"}
    subprocess.run(
        [str(python), "-m", "site_agent", "demo-data", "--out", str(data / "triage-notes.jsonl"),
         "--site-index", "0", "--sites", "4", "--seed", "0"],
        check=True, capture_output=True, env=env, cwd=work,
    )  # fmt: skip
    memory = work / "base-model-hashes.json"
    memory.unlink(missing_ok=True)
    started = time.perf_counter()
    done = subprocess.run(
        [str(python), "-c", _CHILD, str(pki), str(data), str(model), str(memory),
         json.dumps(HEAVY)],
        check=False, capture_output=True, text=True, env=env, cwd=work,
    )  # fmt: skip
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"the site's start failed:\n{done.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    result["wall_s"] = wall
    return result


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "# A site's start to its first hello",
        "",
        f"Generated {report['generated']} by `{report['command']}`; {report['machine']}.",
        "",
        "Fresh interpreter per start: import, settings, first registration of the demo's "
        "`triage-notes.jsonl`, hash of the packaged MiniLM, hello built. "
        "Arms alternate, order reversed every round; load average before: "
        f"{report['load_before']}, after: {report['load_after']}.",
        "",
        "| arm | checkout | starts | CPU s median (min-max) | wall s median (min-max) "
        "| modules | heavy libraries loaded |",
        "|---|---|---:|---|---|---:|---|",
    ]
    for name, arm in report["arms"].items():
        cpu, wall = arm["cpu_s"], arm["wall_s"]
        lines.append(markdown_row(
            name, arm["checkout"], len(cpu),
            f"{statistics.median(cpu):.3f} ({min(cpu):.3f}-{max(cpu):.3f})",
            f"{statistics.median(wall):.3f} ({min(wall):.3f}-{max(wall):.3f})",
            arm["modules"], ", ".join(arm["heavy"]) or "-",
        ))  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("arms", nargs="+", help="NAME=CHECKOUT")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--name", default="site_hello")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--this-venv", action="store_true", help="the sites on this interpreter, not the site venv"
    )
    parser.add_argument("--cache-dir", type=Path, default=CACHE)
    args = parser.parse_args(argv)
    arms = {}
    for arm in args.arms:
        name, _, checkout = arm.partition("=")
        if not name or not checkout:
            parser.error(f"an arm is NAME=CHECKOUT, not {arm!r}")
        arms[name] = Path(checkout).resolve()
    python = Path(sys.executable) if args.this_venv else site_python(ROOT, args.cache_dir)
    for checkout in arms.values():
        project_bytecode(checkout, compiled=True)
    model = packaged_minilm()
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in arms}
    load_before = [round(x, 2) for x in os.getloadavg()]
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        pki = tmp / "pki"
        init_ca(pki)
        issue_certificate(pki, pki, Role.SITE, "site")
        for round_index in range(args.rounds):
            names = list(arms) if round_index % 2 == 0 else list(reversed(arms))
            for name in names:
                results[name].append(one_start(python, arms[name], pki, tmp / name, model))
    report: dict[str, Any] = {
        **report_head(argv),
        "site_python": str(python),
        "load_before": load_before,
        "load_after": [round(x, 2) for x in os.getloadavg()],
        "arms": {
            name: {
                "checkout": str(arms[name]),
                "cpu_s": [round(r["cpu_s"], 3) for r in runs],
                "wall_s": [round(r["wall_s"], 3) for r in runs],
                "modules": runs[-1]["modules"],
                "heavy": runs[-1]["heavy"],
            }
            for name, runs in results.items()
        },
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / f"{args.name}.md").write_text(markdown(report))
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()
