"""Where a hand back's time goes across processes: the finishing site, the wire, the
coordinator and its ledger writer, from wall-clock instants (one machine, one clock).

The instants come from benchmark-only marks (`hand_back_split.patch`: `time.time_ns()` at each
step, one log line per hop and process, ``SPLIT <hop id> label=ns ...``) applied to a copy of
the tree, never to the tree itself:

    git -C /work/main archive main | tar -x -C /tmp/split && cd /tmp/split
    git apply /path/to/benchmarks/hand_back_split.patch
    PYTHONPATH=/tmp/split nice -n 0 python benchmarks/handoff.py --task minilm --peers baton \\
        --warm --keep --name split --out /tmp/split-out
    python benchmarks/hand_back_split.py /tmp/baton-handoff-minilm-XXXX      # the kept work dir
    python benchmarks/hand_back_split.py DIR1 DIR2 DIR3 --slowest 12   # which steps grow when slow

Also reads the coordinator's log of `hand_back_call.py` (the coordinator-side rows only):
pass log files instead of a work directory. Prints a Markdown table of per-hop gaps (median,
p90) between consecutive instants of the hand back's chain, then the parallel branches, then
the next hop's start: its task (sent provisional while the commit runs) set up at the next site
against the commit and its lease decision, and which of the two ended each handoff.
"""

from __future__ import annotations

import argparse
import re
import statistics
from pathlib import Path

_LINE = re.compile(r"SPLIT (\S+) (.*)$")

# (from, to): the chain from the site's last step to the `checkpoint.stored` event, then what
# runs beside it (the run's tamper check on the writer thread) and what follows it.
CHAIN = [
    ("s.train_finished", "s.run_hop_returned", "site: the trainer's end of run_hop (copy-out)"),
    ("s.run_hop_returned", "s.serialised", "site: bundle serialised"),
    ("s.serialised", "s.egress_checked", "site: egress check (hash, format, values, names)"),
    ("s.egress_checked", "s.signed", "site: custody signature"),
    ("s.signed", "s.call_issued", "site: message built, call issued"),
    ("s.call_issued", "c.parse_start", "wire: TLS, HTTP/2, server threads to the event loop"),
    ("c.parse_start", "c.handler_entered", "coordinator: request parsed (NUL check)"),
    ("c.handler_entered", "c.caller_checked", "coordinator: caller's certificate, revocation"),
    ("c.caller_checked", "c.intake_hand_back", "coordinator: tamper check handed on, parts"),
    ("c.intake_hand_back", "c.store_whole", "coordinator: lease, stored uploads (SQL read)"),
    ("c.store_whole", "c.joined", "coordinator: bundle joined"),
    ("c.joined", "c.inspected", "coordinator: hash, format, values (on the loop since s22)"),
    ("c.inspected", "c.lineage_signature", "coordinator: lineage, custody signature"),
    ("c.lineage_signature", "c.kept", "coordinator: staged write awaited, row built"),
    ("c.kept", "c.lock_taken", "coordinator: result checked, engine lock"),
    ("c.lock_taken", "c.next_to_lease", "coordinator: waits for the tamper check"),
    ("c.next_to_lease", "c.submitted", "coordinator: commit handed to the ledger writer"),
    ("c.submitted", "w.entered", "writer thread wakes"),
    ("w.entered", "w.begun", "writer: transaction begun"),
    ("w.begun", "w.stored_appended", "writer: checkpoint row + `checkpoint.stored` event"),
]
BESIDE = [
    ("c.handler_entered", "c.early_check_start", "tamper check: handed to the writer"),
    ("c.early_check_start", "w.early_check_entered", "tamper check: writer thread wakes"),
    ("w.early_check_entered", "w.early_check_done", "tamper check: runs"),
    ("w.early_check_done", "c.early_check_awaited", "tamper check: back on the loop"),
]
AFTER = [
    ("w.stored_appended", "w.leased_appended", "writer: uploaded, committed, next leased"),
    ("w.leased_appended", "w.committed", "writer: bundle durable, COMMIT"),
    ("w.committed", "c.commit_awaited", "back on the loop"),
    ("c.commit_awaited", "c.answer_returned", "answer built"),
    ("c.answer_returned", "s.call_answered", "answer reaches the site"),
]
# The next hop's start (keys "n:<next hop>", joined to the hand back whose commit leases it):
# its task, sent provisional while the commit runs, set up at the next site; the commit's lease
# decision; the first step. The handoff ends at whichever of the two branches ends last.
NEXT = [
    ("w.entered", "c.n.provisional_queued", "next task queued provisional, from the commit start"),
    ("c.n.provisional_queued", "n.task_read", "next task reaches the next site's stream reader"),
    ("n.task_read", "n.hop_entered", "next site: hop thread starts"),
    ("n.hop_entered", "n.set_up", "next site: approval, data and model identity checked"),
    ("n.set_up", "n.incoming_checked", "next site: incoming adapter checked (hash, values)"),
    ("n.incoming_checked", "n.trainer_entered", "next site: into the trainer (its lock)"),
    ("n.trainer_entered", "n.incoming_loaded", "next site: adapter loaded into the prepared model"),
    ("n.incoming_loaded", "n.ready", "next site: ready for its first step"),
    ("w.entered", "w.committed", "commit: writer's transaction"),
    ("w.committed", "c.n.decision_queued", "commit: lease decision queued"),
    ("c.n.decision_queued", "n.decision_read", "lease decision reaches the next site"),
    ("n.decision_read", "n.train_started", "next site: first step starts"),
    ("s.train_finished", "n.train_started", "handoff (site clocks)"),
]
TOTALS = [
    ("s.train_finished", "s.call_issued", "site, in all"),
    ("s.call_issued", "c.handler_entered", "wire and parse, in all"),
    ("c.handler_entered", "w.stored_appended", "coordinator to the event, in all"),
    ("s.train_finished", "w.stored_appended", "trained -> stored"),
]


def read_marks(paths: list[Path]) -> list[dict[str, int]]:
    """Per hop: label -> wall-clock ns, merged over every process's log."""
    hops: dict[tuple[Path, str], dict[str, int]] = {}
    for path in paths:
        logs = sorted(path.glob("**/logs/*.log")) if path.is_dir() else [path]
        run = path if path.is_dir() else path.parent  # one cluster's processes, one directory
        for log in logs:
            for line in log.read_text(errors="replace").splitlines():
                if (match := _LINE.search(line)) is None:
                    continue
                marks = hops.setdefault((run, match.group(1)), {})
                for item in match.group(2).split():
                    label, _, ns = item.partition("=")
                    if ns.isdigit():
                        marks.setdefault(label, int(ns))
    for (run, key), marks in hops.items():  # a next hop's start, joined to its hand back
        after = [label for label in marks if label.startswith("c.n.after.")]
        if key.startswith("n:") and after and (run, after[0][10:]) in hops:
            hops[(run, after[0][10:])].update(marks)
    return [m for m in hops.values() if "c.handler_entered" in m]


def critical(hops: list[dict[str, int]]) -> list[str]:
    """Which branch ended last, hand back by hand back: the commit (its lease decision queued)
    or the next site's set-up (ready for its first step), and by how much (ms)."""
    both = [h for h in hops if "n.ready" in h and "c.n.decision_queued" in h]
    site = sorted((h["n.ready"] - h["c.n.decision_queued"]) / 1e6 for h in both
                  if h["n.ready"] > h["c.n.decision_queued"])  # fmt: skip
    commit = sorted((h["c.n.decision_queued"] - h["n.ready"]) / 1e6 for h in both
                    if h["n.ready"] <= h["c.n.decision_queued"])  # fmt: skip
    out = []
    for what, gaps in (("the commit's lease decision", commit), ("the next site's set-up", site)):
        if gaps:
            out.append(
                f"- last: {what} in {len(gaps)} of {len(both)} handoffs, by "
                f"{statistics.median(gaps):.2f} ms (median), {max(gaps):.2f} at most"
            )
    return out


def table(hops: list[dict[str, int]], rows: list[tuple[str, str, str]]) -> list[str]:
    out = []
    for start, end, what in rows:
        gaps = sorted((h[end] - h[start]) / 1e6 for h in hops if start in h and end in h)
        if gaps:
            p90 = gaps[round(0.9 * (len(gaps) - 1))]
            out.append(f"| {what} | `{start}` → `{end}` | {statistics.median(gaps):.2f} | "
                       f"{p90:.2f} | {len(gaps)} |")  # fmt: skip
    return out


def in_order(hops: list[dict[str, int]], count: int, rows: list[tuple[str, str, str]]) -> list[str]:
    """The first `count` hand backs in the order they reached the coordinator, one column each:
    what a first visit pays that later ones do not."""
    first = sorted(hops, key=lambda h: h["c.handler_entered"])[:count]
    out = ["| step | " + " | ".join(f"#{i + 1}" for i in range(len(first))) + " |",
           "|---|" + "---:|" * len(first)]  # fmt: skip
    for start, end, what in rows:
        cells = [f"{(h[end] - h[start]) / 1e6:.2f}" if start in h and end in h else ""
                 for h in first]  # fmt: skip
        if any(cells):
            out.append(f"| {what} | " + " | ".join(cells) + " |")
    return out


def slowest(hops: list[dict[str, int]], count: int) -> list[str]:
    """Handoffs, slowest first: each step's excess over that step's median (all handoffs read),
    the three largest for the `count` slowest; then, over the slower half, each step's mean
    excess: which steps grow when a handoff is slow."""
    rows = [r for r in CHAIN if r[0] in _HANDOFF_CHAIN] + [
        r for r in NEXT if r[2] not in _NOT_STEPS
    ]  # fmt: skip
    done = [h for h in hops if "n.train_started" in h and "s.train_finished" in h]
    if not done:
        return []
    steps = [{what: (h[end] - h[start]) / 1e6 for start, end, what in rows
              if start in h and end in h} for h in done]  # fmt: skip
    total = [(h["n.train_started"] - h["s.train_finished"]) / 1e6 for h in done]
    median = {what: statistics.median(s[what] for s in steps if what in s) for _, _, what in rows
              if any(what in s for s in steps)}  # fmt: skip
    order = sorted(range(len(done)), key=lambda i: -total[i])
    out = [f"{len(done)} handoffs, median {statistics.median(total):.2f} ms; the {count} "
           "slowest, with the three steps most over their median:", ""]  # fmt: skip
    for i in order[:count]:
        over = sorted(((steps[i][w] - m, w) for w, m in median.items() if w in steps[i]),
                      reverse=True)[:3]  # fmt: skip
        out.append(f"- {total[i]:.2f} ms: " + "; ".join(f"{w} +{e:.2f}" for e, w in over))
    slow = [steps[i] for i in order[: len(order) // 2]]
    mean = {w: sum(max(0.0, s.get(w, m) - m) for s in slow) / len(slow) for w, m in median.items()}
    out += ["", "| step (slower half of the handoffs) | mean excess ms | median ms |",
            "|---|---:|---:|"]  # fmt: skip
    out += [f"| {w} | {e:.2f} | {median[w]:.2f} |"
            for w, e in sorted(mean.items(), key=lambda kv: -kv[1])[:10]]  # fmt: skip
    return out


# The hand back's steps on a handoff's path (not the totals, not the tamper check beside it),
# and the next hop's rows that are not steps of it (offsets, the total itself).
_HANDOFF_CHAIN = {start for start, _, what in CHAIN if "in all" not in what}
_NOT_STEPS = {
    "next task queued provisional, from the commit start",
    "commit: lease decision queued",
    "handoff (site clocks)",
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", type=Path, nargs="+", help="kept work dirs or log files")
    parser.add_argument("--order", type=int, default=0, metavar="N",
                        help="also the first N hand backs one by one, in time order")  # fmt: skip
    parser.add_argument("--slowest", type=int, default=0, metavar="N",
                        help="also the N slowest handoffs: which steps grew")  # fmt: skip
    args = parser.parse_args(argv)
    hops = read_marks(args.paths)
    print(f"{len(hops)} hand backs\n")
    print("| step | instants | median ms | p90 ms | n |\n|---|---|---:|---:|---:|")
    for rows in (CHAIN, BESIDE, AFTER, TOTALS):
        print("\n".join(table(hops, rows)))
    nexts = [h for h in hops if "n.task_read" in h]
    if nexts:
        print(f"\nThe next hop's start ({len(nexts)} handoffs)\n")
        print("| step | instants | median ms | p90 ms | n |\n|---|---|---:|---:|---:|")
        print("\n".join(table(nexts, NEXT)))
        print()
        print("\n".join(critical(nexts)))
    if args.order:
        print(f"\nThe first {args.order} hand backs, in order (ms)\n")
        print("\n".join(in_order(hops, args.order, CHAIN + BESIDE + AFTER + TOTALS)))
    if args.slowest:
        print("\n" + "\n".join(slowest(hops, args.slowest)))


if __name__ == "__main__":
    main()
