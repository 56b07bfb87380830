"""Where one hop's handoff goes, by process and frame: py-spy traces cut at the ledger's instants.

``benchmarks/handoff.py --profile`` records the coordinator and every site with py-spy (chrome
trace format: every sample keeps its time, idle threads included) while Baton's job runs, and
this module cuts those traces at each handoff's instants:

* ``finishing``: the finishing site's last training step to its hop's ``checkpoint.stored``
  event (serialise, check, sign, hand back; the coordinator's receive and store);
* ``next site``: the next hop's ``hop.leased`` to its first training step (task delivery,
  checks, adapter load, set-up);
* ``handoff``: the whole handoff.

For each window and process it reports the thread-time spent per (thread, frame), the frame
being the innermost frame of Baton's own code (``site_agent``, ``coordinator``, ``protocols``)
with the innermost frame of all beside it. Only samples inside the windows are kept
(``NAME-windows.json.gz``): the raw traces are deleted.

Clocks: a py-spy trace's times start at its own start. A site's trace is aligned on its hops'
``train_finished_at_ns`` (where its ``train`` frame ends), the coordinator's on the wall-clock
time py-spy was started (error: py-spy's attach time, a few ms; the sites' offsets show it).

    python benchmarks/handoff_profile.py --report benchmarks/results/NAME-minilm.json
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

OWN = ("site_agent/", "coordinator/", "protocols/")
RATE = 250  # samples per second per process: 4 ms apart, light enough for 2 cores


def start_spies(processes: Iterable[tuple[str, int]], out_dir: Path) -> list[dict[str, Any]]:
    """Starts ``py-spy record`` (chrome trace, idle threads, non-blocking) on each process."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    out_dir.mkdir(parents=True, exist_ok=True)
    spies = []
    for name, pid in processes:
        out = out_dir / f"{name}.trace.json"
        started = time.time()
        process = subprocess.Popen(
            [spy, "record", "--nonblocking", "--idle", "--rate", str(RATE), "--format",
             "chrometrace", "--output", str(out), "--pid", str(pid)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        spies.append({"name": name, "pid": pid, "process": process, "out": out,
                      "started": started})  # fmt: skip
    return spies


def stop_spies(spies: Sequence[dict[str, Any]]) -> None:
    for spy in spies:
        with contextlib.suppress(ProcessLookupError):
            spy["process"].send_signal(signal.SIGINT)  # py-spy writes its trace and exits
    for spy in spies:
        try:
            spy["process"].wait(60)
        except subprocess.TimeoutExpired:
            spy["process"].kill()


def _frame(event: dict[str, Any]) -> str:
    filename = str(event.get("args", {}).get("filename", ""))
    for root in OWN:
        at = filename.find(root)
        if at >= 0:
            filename = filename[at:]
            break
    else:
        filename = filename.rsplit("/", 2)[-1] if "site-packages" in filename else filename
        filename = filename.split("site-packages/")[-1]
    return f"{event['name']} ({filename}:{event.get('args', {}).get('line', '')})"


def spans(trace_path: Path) -> dict[int, list[tuple[float, float, tuple[str, ...]]]]:
    """Per thread: (start s, end s, stack root-first) from a py-spy chrome trace."""
    events = json.loads(trace_path.read_text())
    by_thread: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for event in events:
        if event.get("ph") in ("B", "E"):
            by_thread[int(event["tid"])].append(event)
    out: dict[int, list[tuple[float, float, tuple[str, ...]]]] = {}
    for tid, thread_events in by_thread.items():
        stack: list[str] = []
        last = None
        result = []
        for event in thread_events:  # py-spy writes them in time order per thread
            ts = event["ts"] / 1e6
            if last is not None and stack and ts > last:
                result.append((last, ts, tuple(stack)))
            if event["ph"] == "B":
                stack.append(_frame(event))
            elif stack:
                stack.pop()
            last = ts
        out[tid] = result
    return out


def _label(stack: tuple[str, ...]) -> str:
    own = [frame for frame in stack if any(root in frame for root in OWN)]
    leaf = stack[-1]
    inner = own[-1] if own else stack[0]
    return inner if inner == leaf else f"{inner} > {leaf}"


def _thread_name(stack: tuple[str, ...]) -> str:
    """A thread's role from its outermost frames (py-spy's trace carries no thread names)."""
    text = " ".join(stack[:8])
    for needle, name in (
        ("_serve_once", "task"),
        ("serve (site_agent", "task"),
        ("at_low_priority", "validation"),
        ("run (site_agent/hop_runner.py", "validation"),
        ("_loop (site_agent/hop_runner.py", "heartbeat"),
        ("_prepare", "prepare"),
        ("_loop (site_agent/_load_ahead", "load-ahead"),
        ("_watch_approvals", "approvals"),
        ("asyncio", "event loop"),
        ("run_forever", "event loop"),
        ("_worker (thread.py", "pool worker"),
    ):
        if needle in text:
            return name
    return stack[0].split(" ")[0] if stack else "?"


def _site_offset(
    threads: dict[int, list[tuple[float, float, tuple[str, ...]]]],
    finished: Sequence[float],
    guess: float,
) -> float | None:
    """Trace time minus wall time, from where the `train` loop frame ends at each hop (the
    nearest such end to ``guess``, the offset py-spy's launch time gives)."""
    marker = "train (site_agent/tasks/_loop.py"
    train_ends = []
    for thread_spans in threads.values():
        in_train = [(s, e) for s, e, st in thread_spans if any(f.startswith(marker) for f in st)]
        for position, (_, e) in enumerate(in_train):
            following = in_train[position + 1][0] if position + 1 < len(in_train) else None
            if following is None or following - e > 0.05:
                train_ends.append(e)
    if not train_ends:
        return None
    offsets = [min(train_ends, key=lambda t: abs(t - (wall + guess))) - wall for wall in finished]
    return statistics.median(offsets) if offsets else None


# Leaf frames of a thread that waits (for a lock, a condition, a socket, a queue, an answer).
WAITING = (
    "Condition.wait", "Thread._wait_for_tstate_lock", "select (", "EpollSelector.select",
    "channel_spin", "_worker (", "_blocking (", "Event.wait", "SimpleQueue.get", "sleep",
)  # fmt: skip


def _waiting(stack: tuple[str, ...]) -> bool:
    return any(stack[-1].startswith(needle) or needle in stack[-1] for needle in WAITING)


def _handoffs(baton: dict[str, Any]) -> list[dict[str, Any]]:
    """Every handoff of the run (and of its warm re-run), each with whether its next site had
    prepared and which run it belongs to."""
    out = []
    for label, figures in (("first", baton), ("warm", baton.get("warm"))):
        if not figures:
            continue
        flags = figures.get("next_site_prepared") or []
        for position, moments in enumerate(figures["phases"]["instants"]):
            flag = flags[position] if position < len(flags) else None
            out.append({**moments, "run": label, "prepared": flag})
    return out


def analyse(report_path: Path) -> dict[str, Any]:
    """Per window and process, thread-time per (thread, frame), per handoff whose next site
    had prepared (the others: first visits on a cold cluster, listed apart)."""
    report = json.loads(report_path.read_text())
    baton = report["peers"]["baton"]
    profile = baton["profile"]
    out_dir = Path(profile["dir"])
    handoffs = _handoffs(baton)
    started = dict(profile["started"])
    traces = {name: spans(out_dir / f"{name}.trace.json") for name in started
              if (out_dir / f"{name}.trace.json").exists()}  # fmt: skip
    offsets: dict[str, float] = {}
    launch_error: dict[str, float] = {}
    for name, threads in traces.items():
        if name == "coordinator":
            continue
        finished = [h["this.train_finished"] for h in handoffs if h["this_site"] == name]
        offset = _site_offset(threads, finished, -started[name])
        if offset is not None:
            offsets[name] = offset
            launch_error[name] = round((offset - (-started[name])) * 1000, 1)
    # The coordinator's trace by its launch time, corrected by the sites' median launch error.
    correction = statistics.median(launch_error.values()) / 1000 if launch_error else 0.0
    for name in traces:
        offsets.setdefault(name, -started[name] + correction)

    Key = tuple[str, str, str]  # (window, role, active|waiting)
    frames: dict[Key, Counter[str]] = defaultdict(Counter)
    window_ms: dict[str, list[float]] = defaultdict(list)
    kept: list[dict[str, Any]] = []
    per_handoff = []
    for handoff in handoffs:
        if not handoff["prepared"]:
            continue
        this_site, next_site = handoff["this_site"], handoff["next_site"]
        end = handoff["this.train_finished"]
        stored = handoff.get("this.checkpoint.stored") or handoff.get("this.hop.committed")
        leased = handoff.get("next.hop.leased")
        first = handoff["next.train_started"]
        cuts = {"finishing (last step -> stored)": (end, stored),
                "next site (leased -> first step)": (leased, first),
                "whole handoff": (end, first)}  # fmt: skip
        per_handoff.append({"run": handoff["run"], "index": handoff["index"],
                            **{w: round((b - a) * 1000, 1) if a and b else None
                               for w, (a, b) in cuts.items()}})  # fmt: skip
        roles = (("finishing site", this_site), ("coordinator", "coordinator"),
                 ("next site", next_site))  # fmt: skip
        for window, (a, b) in cuts.items():
            if a is None or b is None or b <= a:
                continue
            window_ms[window].append((b - a) * 1000)
            for role, name in roles:
                threads = traces.get(name)
                if threads is None:
                    continue
                lo, hi = a + offsets[name], b + offsets[name]
                for thread_spans in threads.values():
                    for s, e, stack in thread_spans:
                        overlap = min(e, hi) - max(s, lo)
                        if overlap <= 0:
                            continue
                        state = "waiting" if _waiting(stack) else "active"
                        key = f"{_thread_name(stack)}: {_label(stack)}"
                        frames[(window, role, state)][key] += overlap * 1000
                        if window == "whole handoff" and state == "active":
                            kept.append({"run": handoff["run"], "handoff": handoff["index"],
                                         "process": name,
                                         "at_ms": round((max(s, lo) - lo) * 1000, 2),
                                         "ms": round(overlap * 1000, 2),
                                         "stack": list(stack)})  # fmt: skip
    summary: dict[str, Any] = {
        "offsets_s": {name: round(value, 4) for name, value in offsets.items()},
        "launch_error_ms": launch_error,
        "per_handoff": per_handoff,
        "not_prepared": [(h["run"], h["index"]) for h in handoffs if not h["prepared"]],
        "windows": {},
    }
    for window, lengths in window_ms.items():
        count = len(lengths)
        entry: dict[str, Any] = {
            "handoffs": count,
            "median_ms": round(statistics.median(lengths), 2),
            "mean_ms": round(statistics.fmean(lengths), 2),
            "roles": {},
        }
        for role in ("finishing site", "coordinator", "next site"):
            for state in ("active", "waiting"):
                counter = frames.get((window, role, state))
                if not counter:
                    continue
                entry["roles"].setdefault(role, {})[state] = {
                    "total_ms_per_handoff": round(sum(counter.values()) / count, 2),
                    "frames_ms_per_handoff": {
                        key: round(ms / count, 2) for key, ms in counter.most_common(20)
                    },
                }
        summary["windows"][window] = entry
    with gzip.open(out_dir / "windows.json.gz", "wt") as stream:
        json.dump(kept, stream)
    return summary


def markdown(summary: dict[str, Any], title: str, command: str) -> str:
    lines = [
        f"# Profile of Baton's handoffs ({title})",
        "",
        f"Command: `{command}`. py-spy {RATE} Hz per process (non-blocking, idle threads "
        "included), cut at each handoff's instants from the ledger; handoffs whose next site had "
        "prepared, from the run and its warm re-run. Figures are thread time in ms **per "
        "handoff** (mean over those handoffs). A frame is `thread: innermost Baton frame > "
        "innermost frame`. *Waiting* = the thread's leaf frame waits (lock, condition, socket, "
        "queue, an RPC's answer); *active* = anything else, including a thread that is "
        "runnable but waits for a core or the GIL (py-spy cannot tell these apart): active "
        "time above the window's length x 2 cores is contention.",
        "",
        f"Clock offsets (trace - wall, s): {summary['offsets_s']}; the sites' launch-time "
        f"error (ms, the coordinator's is corrected by their median): "
        f"{summary['launch_error_ms']}. Not in the windows (next site not prepared): "
        f"{summary['not_prepared']}.",
    ]
    for window, figures in summary["windows"].items():
        lines += [
            "",
            f"## {window}: {figures['handoffs']} handoffs, median {figures['median_ms']} ms, "
            f"mean {figures['mean_ms']} ms",
        ]
        for role, states in figures["roles"].items():
            for state, data in states.items():
                lines += ["", f"### {role}, {state}: {data['total_ms_per_handoff']} ms per handoff",
                          "", "| thread: frame | ms per handoff |", "|---|---:|"]  # fmt: skip
                lines += [f"| {key} | {ms} |"
                          for key, ms in list(data["frames_ms_per_handoff"].items())[:12]
                          if ms >= 0.05]  # fmt: skip
    lines += ["", "## Per handoff (ms)", "", "| run | hop | finishing | next site | whole |",
              "|---|---:|---:|---:|---:|"]  # fmt: skip
    for row in summary["per_handoff"]:
        values = list(row.values())
        lines.append(f"| {row['run']} | {row['index']} | {values[2]} | {values[3]} | {values[4]} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--report", type=Path, required=True, help="a handoff.py --profile JSON")
    parser.add_argument("--drop-traces", action="store_true",
                        help="delete the raw traces once cut (windows.json.gz stays)")  # fmt: skip
    args = parser.parse_args(argv)
    summary = analyse(args.report)
    report = json.loads(args.report.read_text())
    name = args.report.stem
    out = args.report.with_name(f"{name}-profile")
    out.with_suffix(".json").write_text(json.dumps(summary, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(summary, name, report["command"]))
    if args.drop_traces:
        for trace in Path(report["peers"]["baton"]["profile"]["dir"]).glob("*.trace.json"):
            trace.unlink()
    print(out.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
