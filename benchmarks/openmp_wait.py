"""A site's torch threads, spinning or sleeping between parallel regions (OMP_WAIT_POLICY).

The site sets ``OMP_WAIT_POLICY=PASSIVE`` unless its environment sets a policy
(`site_agent/openmp.py`). This measures what that buys and costs, side by side in one run: for
each policy (libgomp's default, the variable unset, against PASSIVE), a fresh process builds
the demo's model (the packaged all-MiniLM-L6-v2, LoRA r=8 on query/value, 3 labels) and runs
``--steps`` training steps (batch 8, 32 tokens, AdamW, ``--threads`` torch threads), each
followed by a 30 ms pause as between a hop's last step and the next site's first. Figures, per
process (medians over its steps): the step's wall and CPU time, and the process's CPU time
during the pause (what its idle threads take from a host's other processes). Processes are
interleaved over ``--rounds``. ``--contend N`` runs N pure-Python busy processes meanwhile
(what a coordinator and other sites are to a site on a 2-core host); 0 is a quiet host.

    PYTHONPATH=. .venv/bin/python benchmarks/openmp_wait.py --contend 0 --name openmp-quiet
    PYTHONPATH=. .venv/bin/python benchmarks/openmp_wait.py --contend 2 --name openmp-busy

Writes `results/<name>.{json,md}`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._harness import markdown_row, report_head

RESULTS = Path(__file__).resolve().parent / "results"
POLICIES = ("unset", "PASSIVE")  # unset: libgomp's default; else OMP_WAIT_POLICY or NAME=VALUE
PAUSE_S = 0.03


def worker(steps: int, threads: int) -> dict[str, float]:
    """One process's figures (run in a fresh process: libgomp reads its policy at load)."""
    import peft
    import torch
    import transformers

    from coordinator.console.demo import packaged_minilm

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        str(packaged_minilm()), num_labels=3
    )
    config = peft.LoraConfig(r=8, target_modules=["query", "value"], task_type="SEQ_CLS")
    model = peft.get_peft_model(model, config)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-3)
    ids = torch.randint(0, 30000, (8, 32))
    labels = torch.randint(0, 3, (8,))

    def step() -> None:
        model(input_ids=ids, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    for _ in range(3):
        step()
    walls, cpus, idle = [], [], []
    for _ in range(steps):
        cpu, wall = time.process_time(), time.perf_counter()
        step()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
        cpu = time.process_time()
        time.sleep(PAUSE_S)
        idle.append(time.process_time() - cpu)
    return {
        "step_wall_ms": statistics.median(walls) * 1e3,
        "step_cpu_ms": statistics.median(cpus) * 1e3,
        "pause_cpu_ms": statistics.median(idle) * 1e3,
    }


def _busy() -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def run(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, list[dict[str, float]]] = {policy: [] for policy in args.policies}
    loads: list[float] = []
    busy = [_busy() for _ in range(args.contend)]
    try:
        for _ in range(args.rounds):
            for policy in args.policies:
                env = {k: v for k, v in os.environ.items()
                       if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}  # fmt: skip
                if "=" in policy:
                    name, _, value = policy.partition("=")
                    env[name] = value
                elif policy != "unset":
                    env["OMP_WAIT_POLICY"] = policy
                loads.append(os.getloadavg()[0])
                out = subprocess.run(
                    [sys.executable, __file__, "--worker", str(args.steps), str(args.threads)],
                    env=env,
                    check=True,
                    capture_output=True,
                    text=True,
                )
                results[policy].append(json.loads(out.stdout.strip().splitlines()[-1]))
    finally:
        for process in busy:
            process.kill()
            process.wait()
    return {
        **report_head(args.argv, f"contend {args.contend}"),
        "settings": {"steps": args.steps, "threads": args.threads, "rounds": args.rounds},
        "load_1min": loads,
        "processes": results,
        "medians": {
            policy: {key: statistics.median(run[key] for run in runs) for key in runs[0]}
            for policy, runs in results.items()
        },
    }


def markdown(report: dict[str, Any]) -> str:
    medians = report["medians"]
    lines = [
        "# Site torch threads: OpenMP wait policies side by side (unset: libgomp spins)",
        "",
        f"Generated {report['generated']} by `{report['command']}` on {report['machine']}. "
        f"Settings: {report['settings']}; 1-minute load at each process's start: "
        f"{', '.join(f'{load:.1f}' for load in report['load_1min'])}. Medians over processes "
        "of each process's median.",
        "",
        markdown_row("policy", "step wall ms", "step CPU ms", "CPU ms in a 30 ms pause"),
        markdown_row("---", "---:", "---:", "---:"),
    ]
    for policy, row in medians.items():
        lines.append(
            markdown_row(
                policy,
                f"{row['step_wall_ms']:.1f}",
                f"{row['step_cpu_ms']:.1f}",
                f"{row['pause_cpu_ms']:.2f}",
            )
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        print(json.dumps(worker(int(argv[1]), int(argv[2]))))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--contend", type=int, default=0, help="busy processes meanwhile")
    parser.add_argument(
        "--policies",
        type=lambda text: tuple(text.split(",")),
        default=POLICIES,
        help="comma-separated: unset, an OMP_WAIT_POLICY value, or NAME=VALUE (GOMP_SPINCOUNT=...)",
    )
    parser.add_argument("--name", default="openmp_wait")
    args = parser.parse_args(argv)
    args.argv = argv
    report = run(args)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(report, indent=2) + "\n")
    (RESULTS / f"{args.name}.md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
