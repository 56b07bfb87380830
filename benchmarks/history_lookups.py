"""A handoff's lookups by hop on a ledger with a long history: an A/B of checkouts.

Each checkout (`--root`, repeatable) builds a ledger in its own process, through the ledger's own
API: `--sizes` finished runs (4 hops each, every hop leased, its output checkpoint recorded, the
hop committed and its validation reported, then the run completed: about 18 events and 4
checkpoints per run). At each size it times, on `--repeat` new hops, the two reads by hop id that
every handoff makes:

* **hand back**: the hop's stored uploads (`Ledger.stored_sizes`), read at each hand back's
  receipt, on the coordinator's event loop (every other call waits meanwhile);
* **validation**: a validation report's transaction (`Ledger.record_hop_validation`), which looks
  for the hop's earlier `hop.validated` event first, on the ledger writer's thread (every commit
  waits meanwhile).

Wall ms per call (median, p99 nearest rank) against the number of finished runs; a lookup that
scans the history grows with it. Checkouts run one after another, each on its own new ledger.
`--postgres ADMIN_URL`: each ledger is a new database on that server (dropped afterwards).
Writes JSON, Markdown and a plot under benchmarks/results/.

    .venv/bin/python benchmarks/history_lookups.py --root /tmp/base --root . --sizes 0,500,1000
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # its sibling ledger_commit

from ledger_commit import _label, _p, scratch_database

RESULTS = Path(__file__).resolve().parent / "results"
LOOKUPS = ("hand back", "validation")

# Run in the checkout's own process (PYTHONPATH: that checkout): argv = sizes, repeat, state, url.
_CHILD = r"""
import json, sys, time, uuid
from datetime import UTC, datetime
from pathlib import Path
from coordinator.ledger import CheckpointRow, HopRow, Ledger

sizes, repeat = [int(s) for s in sys.argv[1].split(",")], int(sys.argv[2])
state = Path(sys.argv[3])
url = sys.argv[4] if len(sys.argv) > 4 else f"sqlite:///{state / 'ledger.sqlite3'}"
ledger = Ledger(url)
ledger.migrate()
SITES = ["site-a", "site-b", "site-c", "site-d"]
TENSORS = [{"name": f"layer.{k}.lora_{ab}", "shape": [8, 384], "dtype": "F32"}
           for k in range(12) for ab in "AB"]


def new_run(hops):
    run_id = uuid.uuid4().hex
    rows = [HopRow(id=uuid.uuid4().hex, index=i, site=SITES[i % len(SITES)], status="pending",
                   hyperparameters={"learning_rate": 1e-3, "steps": 30}, metrics={})
            for i in range(hops)]
    ledger.create_run(run_id, "history", {"task": "seq-classification", "dataset": "notes"},
                      rows, None)
    return run_id, rows


def hand_back(run_id, hop, parent, token=None):
    if token is None:
        token = uuid.uuid4().hex
        ledger.lease_hop(hop.id, token, parent)
    sha = uuid.uuid4().hex * 2
    ledger.record_checkpoint(CheckpointRow(
        sha256=sha, size=300_000, run_id=run_id, hop_id=hop.id, producer_site=hop.site,
        parent_sha256=parent, manifest={"format": "peft", "base_model_sha256": "b" * 64},
        tensors=TENSORS, signature="5" * 142, producer_certificate="c" * 900,
        stored_at=datetime.now(UTC), status="stored"))
    ledger.commit_hop(hop.id, lease_token=token, output_sha256=sha,
                      metrics={"train_loss": 0.5}, train_started_at_ns=1, train_finished_at_ns=2,
                      base_model_sha256="b" * 64)
    return sha


def validate(hop):
    ledger.record_hop_validation(hop.id, site=hop.site, ok=True,
                                 metrics={"accuracy": 0.7, "loss": 0.5}, error="")


def finished_run():
    run_id, hops = new_run(4)
    parent = None
    for hop in hops:
        parent = hand_back(run_id, hop, parent)
        validate(hop)
    ledger.transition_run(run_id, expected=("running",), status="completed")


def timed(call):
    started = time.perf_counter()
    call()
    return (time.perf_counter() - started) * 1e3


built, out = 0, []
for size in sizes:
    started = time.perf_counter()
    while built < size:
        finished_run()
        built += 1
    build_s = time.perf_counter() - started
    for _ in range(2):  # the process's first calls: not counted
        run_id, [hop] = new_run(1)
        hand_back(run_id, hop, None)
        validate(hop)
    figures = {"hand back": [], "validation": []}
    for _ in range(repeat):
        run_id, [hop] = new_run(1)
        ledger.lease_hop(hop.id, "t", None)
        # As at a hand back's receipt: the hop leased, its upload not yet recorded.
        figures["hand back"].append(timed(lambda: ledger.stored_sizes(hop.id)))
        hand_back(run_id, hop, None, token="t")
        figures["validation"].append(timed(lambda: validate(hop)))
    out.append({"finished_runs": size, "build_s": round(build_s, 1),
                "events": ledger.last_seq(), "ms": figures})
print(json.dumps(out))
"""


def _figures(samples: list[float]) -> dict[str, Any]:
    """A lookup's median and p99 (nearest rank, as `ledger_commit`'s) and its samples."""
    return {"median_ms": round(_p(samples, 0.5), 3), "p99_ms": round(_p(samples, 0.99), 3),
            "samples_ms": [round(s, 3) for s in samples]}  # fmt: skip


def _one(root: Path, sizes: str, repeat: int, postgres: str | None) -> list[dict[str, Any]]:
    with (
        tempfile.TemporaryDirectory(prefix="history-lookups-") as state,
        scratch_database(postgres) as url,
    ):
        command = [sys.executable, "-c", _CHILD, sizes, str(repeat), state]
        command += [url] if url is not None else []
        env = {**os.environ, "PYTHONPATH": str(root)}
        out = subprocess.run(
            command, env=env, cwd=root, check=True, capture_output=True, text=True
        ).stdout
    found: list[dict[str, Any]] = json.loads(out.strip().splitlines()[-1])
    return found


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(LOOKUPS), figsize=(10, 4))
    for axis, lookup in zip(axes, LOOKUPS, strict=True):
        for checkout in dict.fromkeys(r["checkout"] for r in rows):
            mine = [r for r in rows if r["checkout"] == checkout]
            runs = [r["finished_runs"] for r in mine]
            medians = [r[lookup]["median_ms"] for r in mine]
            axis.plot(runs, medians, marker="o", label=checkout)
        axis.set_title(f"{lookup}: median ms per call")
        axis.set_xlabel("finished runs in the ledger")
        axis.set_ylim(bottom=0)
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, action="append", help="checkout (repeatable)")
    parser.add_argument("--sizes", default="0,500,1000", help="finished runs, ascending")
    parser.add_argument("--repeat", type=int, default=40, help="timed calls per size")
    parser.add_argument(
        "--postgres",
        metavar="ADMIN_URL",
        help="a PostgreSQL server's admin URL: each ledger a new database there",
    )
    parser.add_argument("--name", default="history_lookups")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    roots = [r.resolve() for r in (args.root or [Path(__file__).resolve().parent.parent])]
    rows: list[dict[str, Any]] = []
    for root in roots:
        label, load = _label(root), os.getloadavg()[0]
        for found in _one(root, args.sizes, args.repeat, args.postgres):
            row = {"checkout": label, "finished_runs": found["finished_runs"],
                   "events": found["events"], "build_s": found["build_s"],
                   "load_1min_before": round(load, 2)}  # fmt: skip
            row.update({lookup: _figures(found["ms"][lookup]) for lookup in LOOKUPS})
            rows.append(row)
            print(label, row["finished_runs"], "runs:",
                  *(f"{k} {row[k]['median_ms']} ms" for k in LOOKUPS), flush=True)  # fmt: skip
    shown = ["$ADMIN_URL" if a == args.postgres else a for a in sys.argv[1:]]  # no password
    command = " ".join(["benchmarks/history_lookups.py", *shown])
    database = "PostgreSQL, a new database per checkout" if args.postgres else "SQLite"
    _write(rows, command, database, args.out, args.name)


def _write(rows: list[dict[str, Any]], command: str, database: str, out: Path, name: str) -> None:
    """The JSON, the plot and the Markdown report of `rows` under `out`."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(
        json.dumps({"command": command, "database": database, "rows": rows}, indent=2) + "\n"
    )
    _plot(rows, out / f"{name}.png")
    calls = ", ".join(
        str(n) for n in sorted({len(r[k]["samples_ms"]) for r in rows for k in LOOKUPS})
    )
    lines = [
        "# A handoff's lookups by hop, against the ledger's history", "",
        f"Command: `{command}`  ", f"Ledger: {database}; {calls} timed calls per size; "
        f"machine: {os.cpu_count()} cores. Wall ms per call, median / p99 (nearest rank). "
        "*hand back*: `stored_sizes`, on the coordinator's event loop at every hand back; "
        "*validation*: `record_hop_validation`'s transaction, on the ledger writer's thread.", "",
        "| checkout | finished runs | events | hand back ms | validation ms | build s | "
        "1-min load before |", "|---|---:|---:|---|---|---:|---:|",
        *(f"| {r['checkout']} | {r['finished_runs']} | {r['events']} | "
          f"{r['hand back']['median_ms']} / {r['hand back']['p99_ms']} | "
          f"{r['validation']['median_ms']} / {r['validation']['p99_ms']} | {r['build_s']} | "
          f"{r['load_1min_before']} |" for r in rows),
        "", f"![median ms per call]({name}.png)",
    ]  # fmt: skip
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
