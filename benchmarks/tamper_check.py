"""The engine's tamper check before a lease, in CPU time: the run's rows read as ORM objects
(`Ledger.run` + `run_mismatches`), read as stored, plain columns and every row compared with its
event (`Ledger.full_run_mismatches`, the engine's check before tamper18), and the engine's
check now (`Ledger.stored_run_mismatches`: the database's texts of the rows and events compared
with those last found sound), on the same ledger.

A SQLite ledger with one run of `--hops` hops written through the repository as a handoff
writes it (the output's checkpoint row, "uploaded", "committed" and the next lease in one
transaction, then the next hop's "training"); before each commit, each read checks the run as the
engine does before leasing the next hop. Figures: CPU time of the calling thread
(`time.thread_time`, steady on a busy machine), the first checks (cold) left out; both reads
alternate per commit (A B B A ...), each after the same commits. Writes JSON + Markdown under
benchmarks/results/. `--postgres ADMIN_URL`: each ledger in a new database on that server.

    nice -n 19 python benchmarks/tamper_check.py --hops 16 --name tamper-check
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.ledger_commit import scratch_database  # noqa: E402
from coordinator.ledger import CheckpointRow, HopRow, Ledger, RowMismatch  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
Check = Callable[[Ledger, str], list[RowMismatch]]
READS: dict[str, Check] = {
    "objects": lambda ledger, run_id: ledger.run_mismatches(ledger.run(run_id), None),
    "full": lambda ledger, run_id: ledger.full_run_mismatches(run_id, None),
    "stored": lambda ledger, run_id: ledger.stored_run_mismatches(run_id, None),
}


def _checkpoint(run_id: str, hop_id: str, parent: str | None) -> CheckpointRow:
    """A row shaped as a MiniLM r=8 adapter's (26 tensors, a manifest, a certificate)."""
    return CheckpointRow(
        sha256=uuid.uuid4().hex * 2, size=300_000, run_id=run_id, hop_id=hop_id,
        producer_site="site-a", parent_sha256=parent,
        manifest={"run_id": run_id, "hop_id": hop_id, "base_model_sha256": "cd" * 32},
        tensors=[[f"lora_{k}", "F32", [8, 384]] for k in range(26)], signature="ab" * 36,
        producer_certificate="-----BEGIN CERTIFICATE-----" + "x" * 700,
        stored_at=datetime.now(UTC),
    )  # fmt: skip


def leased_run(url: str, name: str, hops: int) -> tuple[Ledger, str, list[HopRow]]:
    """A migrated ledger at `url` with one run of `hops` hops over 4 sites, its first leased."""
    ledger = Ledger(url)
    ledger.migrate()
    run_id = uuid.uuid4().hex
    hyperparameters = {"learning_rate": 2e-3, "steps": 15, "batch_size": 16}
    rows = [
        HopRow(id=uuid.uuid4().hex, run_id=run_id, index=i, site=f"site-{i % 4}",
               hyperparameters=hyperparameters, status="pending", metrics={})
        for i in range(hops)
    ]  # fmt: skip
    plan = {"task": "seq-classification", "dataset": "notes", "sites": 4, "note": "x" * 400}
    ledger.create_run(run_id, name, plan, rows, None)
    ledger.lease_hop(rows[0].id, "token", None)
    return ledger, run_id, rows


def run(hops: int, warmup: int, postgres: str | None = None) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp, scratch_database(postgres) as url:
        sqlite = f"sqlite:///{Path(tmp) / 'ledger.sqlite3'}"
        ledger, run_id, rows = leased_run(url or sqlite, "tamper-check", hops)
        samples: dict[str, list[float]] = {name: [] for name in READS}
        parent: str | None = None
        for i in range(hops - 1):
            ledger.transition_hop(rows[i].id, expected=("leased",), status="training",
                                  event="hop.training")  # fmt: skip
            order = list(READS) if i % 2 == 0 else list(reversed(READS))
            for name in order:
                started = time.thread_time()
                found = READS[name](ledger, run_id)
                cpu = time.thread_time() - started
                assert found == [], found
                if i >= warmup:
                    samples[name].append(cpu)
            output = _checkpoint(run_id, rows[i].id, parent)
            with ledger.transaction():
                ledger.record_checkpoint(output)
                ledger.transition_hop(rows[i].id, expected=("training",), status="uploaded",
                                      event="hop.uploaded",
                                      payload={"output_sha256": output.sha256})  # fmt: skip
                ledger.commit_hop(rows[i].id, lease_token="token", output_sha256=output.sha256,
                                  metrics={"accuracy": 0.5, "loss": 0.3}, train_started_at_ns=1,
                                  train_finished_at_ns=2, base_model_sha256="cd" * 32)  # fmt: skip
                ledger.lease_hop(rows[i + 1].id, "token", output.sha256)
            parent = output.sha256
        full_checks = ledger.run_checks.full_checks
        ledger.close()
    return {"stored_full_checks": full_checks} | {
        name: {
            "n": len(values),
            "cpu_ms_median": round(statistics.median(values) * 1e3, 3),
            "cpu_ms_mean": round(statistics.fmean(values) * 1e3, 3),
            # the checks of the last tenth of the run: the run at (nearly) its full length
            "cpu_ms_last_tenth": round(
                statistics.median(values[-max(1, len(values) // 10) :]) * 1e3, 3
            ),
        }
        for name, values in samples.items()
    }


def ledger_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    """The options of a benchmark that builds `--repeat` ledgers (here or in `--postgres`)."""
    parser.add_argument("--repeat", type=int, default=3, help="ledgers built, figures pooled")
    parser.add_argument(
        "--postgres",
        metavar="ADMIN_URL",
        help="a PostgreSQL server's admin URL: each ledger a new database there (dropped after)",
    )
    parser.add_argument("--name", default=name)
    parser.add_argument("--out", type=Path, default=RESULTS)


def run_context(args: argparse.Namespace) -> tuple[list[str], str, str]:
    """The load average now, the database's name and the command's arguments as reported
    (the admin URL, which may hold a password, as `$ADMIN_URL`)."""
    load = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else []
    shown = ["$ADMIN_URL" if a == args.postgres else a for a in sys.argv[1:]]
    return load, "PostgreSQL" if args.postgres else "SQLite", " ".join(shown)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hops", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=2)
    ledger_arguments(parser, "tamper-check")
    args = parser.parse_args()
    rounds = [run(args.hops, args.warmup, args.postgres) for _ in range(args.repeat)]
    load, database, shown = run_context(args)
    figures = {"hops": args.hops, "repeat": args.repeat, "load": load, "database": database,
               "rounds": rounds}  # fmt: skip
    command = "python benchmarks/tamper_check.py " + shown
    lines = [
        f"# Tamper check before a lease, a run of {args.hops} hops ({database})",
        "",
        f"Command: `{command}`. CPU ms of the checking thread per check, median of each "
        f"ledger's checks (each read after the same commits; the reads alternate per commit), "
        f"and of the checks in the last tenth of the run. Load average after: {load}.",
        "",
        "| round | objects (ORM) | full (plain columns, before) | stored (kept values, now) "
        "| full, last tenth | stored, last tenth | full checks among stored |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for number, figure in enumerate(rounds, 1):
        lines.append(f"| {number} | {figure['objects']['cpu_ms_median']} | "
                     f"{figure['full']['cpu_ms_median']} | {figure['stored']['cpu_ms_median']} "
                     f"| {figure['full']['cpu_ms_last_tenth']} "
                     f"| {figure['stored']['cpu_ms_last_tenth']} "
                     f"| {figure['stored_full_checks']} |")  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(figures, indent=2) + "\n")
    (args.out / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
