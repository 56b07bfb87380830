"""Interleaved A/B of `benchmarks/transfer.py` between two checkouts, in one session.

Each round runs one checkout's own `transfer.py` (its coordinator, its site client, its raw
comparator) and then the other's, back to back (`--same-script` copies this checkout's
transfer.py into the others first, so that every checkout is measured by the same script: its
coordinator and its site code, the same raw comparator); every run measures its own raw gRPC
floor, so each ratio compares figures taken seconds apart. The table gives, per checkout and
size, the median over rounds of each run's medians, with the range of the ratios; the load
(`uptime`) of every run is kept. Wall-clock ratios need a quiet machine; CPU seconds hold under
load.

    nice -n 19 .venv/bin/python benchmarks/transfer_ab.py --root /tmp/main --root . --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
_FIGURES = [
    ("upload_ratio", "up ratio"),
    ("upload_ratio_unhashed", "up ratio vs unhashed raw"),
    ("download_ratio", "down ratio"),
    ("baton_upload_mb_s", "Baton up MB/s"),
    ("raw_upload_mb_s", "raw up MB/s"),
    ("baton_download_mb_s", "Baton down MB/s"),
    ("raw_download_mb_s", "raw down MB/s"),
    ("coordinator_cpu_s_upload", "coordinator CPU s up"),
    ("raw_server_cpu_s_upload", "raw server CPU s up"),
    ("coordinator_cpu_s_download", "coordinator CPU s down"),
    ("raw_server_cpu_s_download", "raw server CPU s down"),
    ("site_cpu_s_upload", "site (client) CPU s up"),
    ("raw_client_cpu_s_upload", "raw client CPU s up"),
    ("site_cpu_s_download", "site (client) CPU s down"),
    ("raw_client_cpu_s_download", "raw client CPU s down"),
    ("coordinator_rss_mib_before", "coordinator RSS MiB before the size"),
    ("coordinator_rss_mib_settled", "coordinator RSS MiB 6 s after the size"),
    ("coordinator_peak_rss_mib_upload", "coordinator peak RSS MiB up"),
    ("coordinator_peak_rss_mib_download", "coordinator peak RSS MiB down"),
]


def _uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()


def _label(root: Path) -> str:
    commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True, check=False).stdout.strip()  # fmt: skip
    return f"{root} ({commit})" if commit else str(root)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--root", type=Path, action="append", required=True,
                        help="checkout whose transfer.py runs (twice: A, then B)")  # fmt: skip
    parser.add_argument("--label", action="append", help="a name per --root, in order")
    parser.add_argument("--root-args", action="append",
                        help="more transfer.py options per --root, in order (one string each, "
                             "e.g. '--malloc-mmap-threshold 2097152'; '' for none)")  # fmt: skip
    parser.add_argument("--root-env", action="append",
                        help="environment variables per --root, in order (one string each, "
                             "e.g. 'BATON_STORE_CACHE_BYTES=134217728': the coordinator's "
                             "settings; '' for none)")  # fmt: skip
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sizes", default="1,10,100")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--name", default="transfer-ab")
    parser.add_argument("--same-script", action="store_true",
                        help="measure every checkout with this checkout's transfer.py (copied "
                             "into the others' benchmarks/: use throwaway copies)")  # fmt: skip
    args = parser.parse_args()
    if args.same_script:
        script = Path(__file__).resolve().with_name("transfer.py")
        for root in args.root:
            target = root.resolve() / "benchmarks" / "transfer.py"
            if target != script:
                shutil.copyfile(script, target)
    labels = args.label or [_label(root) for root in args.root]
    extra = [a.split() for a in args.root_args] if args.root_args else [[] for _ in args.root]
    envs = [
        dict(v.split("=", 1) for v in e.split()) for e in args.root_env or ["" for _ in args.root]
    ]
    runs: list[dict[str, Any]] = []
    uptime_before = _uptime()
    for round_index in range(args.rounds):
        for label, root, more, own in zip(labels, args.root, extra, envs, strict=True):
            name = f"{args.name}-run"
            env = {**os.environ, **own, "PYTHONPATH": str(root.resolve())}
            subprocess.run([sys.executable, "benchmarks/transfer.py", "--sizes", args.sizes,
                            "--repeat", str(args.repeat), "--name", name, *more],
                           cwd=root, env=env, check=True, capture_output=True)  # fmt: skip
            out = root / "benchmarks" / "results"
            figures = json.loads((out / f"{name}.json").read_text())
            for suffix in (".json", ".md", ".png"):
                (out / f"{name}{suffix}").unlink(missing_ok=True)
            runs.append({"label": label, "round": round_index, "env": own, **figures})
            print(json.dumps({"label": label, "round": round_index,
                              "load": figures["load_average_before"]}), flush=True)  # fmt: skip
    summary = {"command": "python benchmarks/transfer_ab.py " + " ".join(sys.argv[1:]),
               "same_script": args.same_script,
               "uptime_before": uptime_before, "uptime_after": _uptime(), "labels": labels,
               "runs": runs}  # fmt: skip
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(summary, indent=2) + "\n")
    (RESULTS / f"{args.name}.md").write_text(markdown(summary))
    print(markdown(summary))


def markdown(summary: dict[str, Any]) -> str:
    lines = [
        "# Checkpoint transfer A/B (interleaved, one session)",
        "",
        f"Command: `{summary['command']}`",
        "",
        f"Load before: `{summary['uptime_before']}`; after: `{summary['uptime_after']}`. "
        "Each figure: the median over rounds of one run's median (ratios: min-max over rounds "
        "in brackets). Each run measured its own raw gRPC floor (see benchmarks/transfer.py)"
        + (
            "; every checkout measured by the same transfer.py."
            if summary.get("same_script")
            else "; each checkout measured by its own transfer.py."
        ),
        "",
    ]
    sizes = sorted({row["size_mib"] for run in summary["runs"] for row in run["rows"]})
    header = "| figure | " + " | ".join(
        f"{label}, {size} MiB" for size in sizes for label in summary["labels"]
    )
    lines += [header + " |", "|---" * (1 + len(sizes) * len(summary["labels"])) + "|"]
    for key, title in _FIGURES:
        cells = []
        for size in sizes:
            for label in summary["labels"]:
                rows = [row for run in summary["runs"] if run["label"] == label
                        for row in run["rows"] if row["size_mib"] == size]  # fmt: skip
                values = [row[key] for row in rows if key in row]
                if not values:
                    cells.append("")
                elif "ratio" in key:
                    cells.append(f"{statistics.median(values):.2f} "
                                 f"[{min(values):.2f}-{max(values):.2f}]")  # fmt: skip
                else:
                    cells.append(f"{statistics.median(values):g}")
        lines.append(f"| {title} | " + " | ".join(cells) + " |")
    lines += ["", "Load (1 min) at the start of each run: " + ", ".join(
        f"{run['label'].split(' ')[0]} r{run['round'] + 1}: {run['load_average_before'][0]}"
        for run in summary["runs"]
    ) + "."]  # fmt: skip
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
