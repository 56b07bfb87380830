"""The ledger side of a hand back's commit transaction, per hop, in-process: an A/B of checkouts.

Each hop is what the engine's `_commit_and_lease` writes in one transaction on the ledger
writer's thread: the output's checkpoint row, the hop's move to "uploaded", its commit and the
next hop's lease (four chained events, one SQLite commit), with a `HeadSigner` observing the
ledger (a head every 100 events, as `serve` signs). Per hop: the committing thread's CPU time
(`time.thread_time`: what the writer thread spends, a signature off it not counted) and the
transaction's wall time (p50, p99: a head signed and fsync'd on that thread shows at p99). Each
checkout (`--root`, repeatable) runs in a fresh process per round, in turn (an interleaved A/B:
all see the same load). A checkout with `coordinator.engine.warm_up` first runs its start-up
rehearsal, as `coordinator serve` does after ready (`--no-warm-up`: not), so that the first
counted-apart transactions are those of a served coordinator. Per warm-up hop, the statements
the ledger's engine compiled (not found in its compiled cache) are counted too, with those the
ledger compiles for its driver-cursor statements (`coordinator.ledger._cursor`, where the
checkout has it). `--postgres ADMIN_URL`: each run's ledger is a new database on that server
(dropped after the run), not an SQLite file. Writes JSON + Markdown under benchmarks/results/.

    nice -n 19 .venv/bin/python benchmarks/ledger_commit.py --root /work/main --root . --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, make_url, text

RESULTS = Path(__file__).resolve().parent / "results"

# Run in the checkout's own process (PYTHONPATH: that checkout): argv = hops, state directory.
_CHILD = r"""
import contextlib, hashlib, json, sys, time, uuid
from datetime import UTC, datetime
from pathlib import Path
from sqlalchemy import event
from sqlalchemy.engine.default import CACHE_MISS
from coordinator.ledger import CheckpointRow, HeadSigner, HopRow, Ledger, TransitionRefused
from protocols.pki import Role, init_ca, issue_certificate

hops, state, NO_WARM = int(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] == "no-warm"
url = sys.argv[4] if len(sys.argv) > 4 else f"sqlite:///{state / 'ledger.sqlite3'}"
init_ca(state / "pki")
issue_certificate(state / "pki", state / "pki", Role.COORDINATOR, "coordinator")
ledger = Ledger(url)
ledger.migrate()
signer = HeadSigner(state / "ledger-heads.jsonl", every=100,
                    private_key_pem=(state / "pki" / "coordinator.key").read_bytes(),
                    certificate_pem=(state / "pki" / "coordinator.crt").read_bytes())
ledger.head_observers.append(signer.observe)
try:  # what `coordinator serve` runs after ready, when the checkout has it (warm22)
    from coordinator.engine.warm_up import rehearse_hand_back
except ImportError:
    rehearse_hand_back = None
warm_cpu = None
if rehearse_hand_back is not None and not NO_WARM:
    c0 = time.thread_time()
    rehearse_hand_back(ledger)
    warm_cpu = (time.thread_time() - c0) * 1e3
run_id = uuid.uuid4().hex
rows = [HopRow(id=uuid.uuid4().hex, index=i, site=f"site-{i % 2}", status="pending",
               hyperparameters={"learning_rate": 1e-3, "steps": 30}, metrics={})
        for i in range(hops + 1)]
ids = [h.id for h in rows]
ledger.create_run(run_id, "bench", {"task": "tabular", "dataset": "d"}, rows, None)
ledger.lease_hop(ids[0], "t0", None)
tensors = [{"name": f"layer.{k}.lora_A", "shape": [8, 384], "dtype": "F32"} for k in range(24)]


def hand_back(i):
    sha = hashlib.sha256(f"{run_id}{i}".encode()).hexdigest()
    output = CheckpointRow(
        sha256=sha, run_id=run_id, hop_id=ids[i], producer_site=f"site-{i % 2}", size=300_000,
        parent_sha256=None, manifest={"base_model_sha256": "b" * 64, "format": "peft"},
        tensors=tensors, signature="5" * 142, producer_certificate="c" * 900,
        stored_at=datetime.now(UTC), status="stored")  # as `UploadIntake._keep` sets it
    with ledger.transaction():
        ledger.record_checkpoint(output)
        with contextlib.suppress(TransitionRefused):
            ledger.transition_hop(ids[i], expected=("leased", "training"), status="uploaded",
                                  event="hop.uploaded", payload={"output_sha256": sha})
        ledger.commit_hop(ids[i], lease_token=f"t{i}", output_sha256=sha,
                          metrics={"accuracy": 0.5, "loss": 0.7}, train_started_at_ns=1,
                          train_finished_at_ns=2, base_model_sha256="b" * 64)
        ledger.lease_hop(ids[i + 1], f"t{i + 1}", sha)


compiled = []


def note(_conn, _cursor, _statement, _params, context, _many):
    if context is not None and context.cache_hit == CACHE_MISS:
        compiled[-1] += 1


try:  # a checkout whose ledger runs statements on the driver's cursor compiles those itself
    from coordinator.ledger import _cursor as cursor_statements
except ImportError:
    cursor_statements = None
if cursor_statements is not None:
    compile_statement = cursor_statements._compile

    def counted_compile(statement, dialect, keys):
        if compiled and dialect is ledger.engine.dialect:
            compiled[-1] += 1
        return compile_statement(statement, dialect, keys)

    cursor_statements._compile = counted_compile


warmup = 5
cpu, wall, first = [], [], []
for i in range(hops):
    if i == 0:
        event.listen(ledger.engine, "before_cursor_execute", note)
    elif i == warmup:
        event.remove(ledger.engine, "before_cursor_execute", note)
    compiled.append(0)
    c0, w0 = time.thread_time(), time.perf_counter()
    hand_back(i)
    if i >= warmup:
        cpu.append(time.thread_time() - c0)
        wall.append(time.perf_counter() - w0)
    else:  # the process's first transactions: statements compiled, caches filled
        first.append(time.thread_time() - c0)
if hasattr(signer, "wait"):
    signer.wait()
heads = sum(1 for _ in open(state / "ledger-heads.jsonl"))
print(json.dumps({"cpu_ms": [c * 1e3 for c in cpu], "wall_ms": [w * 1e3 for w in wall],
                  "first_cpu_ms": [c * 1e3 for c in first], "warm_up_cpu_ms": warm_cpu,
                  "first_compiled": compiled[:warmup],
                  "heads": heads, "events": ledger.last_seq()}))
"""


def _p(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


@contextmanager
def scratch_database(admin_url: str | None) -> Iterator[str | None]:
    """A new, empty PostgreSQL database on `admin_url`'s server, its URL (dropped afterwards,
    its connections ended); None without `admin_url`."""
    if admin_url is None:
        yield None
        return
    name = f"bench_{uuid.uuid4().hex[:12]}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{name}"'))
        try:
            yield make_url(admin_url).set(database=name).render_as_string(hide_password=False)
        finally:
            with admin.connect() as connection:
                connection.execute(text(f'DROP DATABASE "{name}" WITH (FORCE)'))
    finally:
        admin.dispose()


def _one(root: Path, hops: int, warm: bool = True, postgres: str | None = None) -> dict[str, Any]:
    with (
        tempfile.TemporaryDirectory(prefix="ledger-commit-") as state,
        scratch_database(postgres) as url,
    ):
        env = {**os.environ, "PYTHONPATH": str(root)}
        command = [sys.executable, "-c", _CHILD, str(hops), state, "warm" if warm else "no-warm"]
        command += [url] if url is not None else []
        out = subprocess.run(
            command, env=env, cwd=root, check=True, capture_output=True, text=True
        ).stdout
    found: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    found["load_1min_before"] = os.getloadavg()[0]
    return found


def _label(root: Path) -> str:
    head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True).stdout.strip()  # fmt: skip
    return f"{root} ({head})" if head else str(root)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, action="append", help="checkout (repeatable)")
    parser.add_argument("--hops", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--no-warm-up",
        action="store_true",
        help="skip the start-up rehearsal (coordinator.engine.warm_up) of a checkout that has it",
    )
    parser.add_argument(
        "--postgres",
        metavar="ADMIN_URL",
        help="a PostgreSQL server's admin URL: each run's ledger a new database there",
    )
    parser.add_argument("--name", default="ledger_commit")
    args = parser.parse_args()
    roots = [r.resolve() for r in (args.root or [Path(__file__).resolve().parent.parent])]
    runs: dict[str, list[dict[str, Any]]] = {_label(r): [] for r in roots}
    for _ in range(args.rounds):
        for root, label in zip(roots, runs, strict=True):
            found = _one(root, args.hops, not args.no_warm_up, args.postgres)
            runs[label].append(found)
            cpu, wall = found["cpu_ms"], found["wall_ms"]
            print(
                label,
                f"cpu/hop median {statistics.median(cpu):.2f} ms, wall p50 {_p(wall, 0.5):.1f} "
                f"p99 {_p(wall, 0.99):.1f} ms, heads {found['heads']}, "
                f"load {found['load_1min_before']:.1f}",
                flush=True,
            )
    rows = []
    for label, results in runs.items():
        cpu = [c for f in results for c in f["cpu_ms"]]
        wall = [w for f in results for w in f["wall_ms"]]
        rows.append(
            {
                "checkout": label,
                "cpu_ms_median": round(statistics.median(cpu), 2),
                "cpu_ms_p99": round(_p(cpu, 0.99), 2),
                "wall_ms_p50": round(_p(wall, 0.5), 2),
                "wall_ms_p99": round(_p(wall, 0.99), 2),
                "first_cpu_ms": [[round(c, 2) for c in f["first_cpu_ms"]] for f in results],
                "first_compiled": [f["first_compiled"] for f in results],
                "warm_up_cpu_ms": [
                    None if f.get("warm_up_cpu_ms") is None else round(f["warm_up_cpu_ms"], 1)
                    for f in results
                ],
                "heads": [f["heads"] for f in results],
                "events": results[0]["events"],
                "load_1min_before": [round(f["load_1min_before"], 2) for f in results],
            }
        )
    RESULTS.mkdir(exist_ok=True)
    shown = ["$ADMIN_URL" if a == args.postgres else a for a in sys.argv[1:]]  # no password
    command = " ".join(["benchmarks/ledger_commit.py", *shown])
    (RESULTS / f"{args.name}.json").write_text(
        json.dumps({"command": command, "rows": rows}, indent=2) + "\n"
    )
    lines = [
        "# The ledger side of a hand back's commit transaction, per hop", "",
        f"Command: `{command}`  ", f"{args.hops} hops per run (5 warm-up hops not counted), "
        f"{args.rounds} rounds, checkouts interleaved; ledger: "
        f"{'PostgreSQL, a new database per run' if args.postgres else 'SQLite'}; machine: "
        f"{os.cpu_count()} cores.", "",
        "| checkout | committing thread CPU ms/hop: median / p99 | transaction wall ms: p50 / p99 "
        "| heads signed per run | 1-min load before each |", "|---|---|---|---|---|",
        *(f"| {r['checkout']} | {r['cpu_ms_median']} / {r['cpu_ms_p99']} | {r['wall_ms_p50']} / "
          f"{r['wall_ms_p99']} | {r['heads']} | {r['load_1min_before']} |" for r in rows),
        "", "The warm-up hops' CPU ms, per run (a process's first transaction first; after the "
        "start-up rehearsal, `coordinator.engine.warm_up`, where the checkout has it and "
        "`--no-warm-up` is not given):", "",
        *(f"- {r['checkout']}: {r['first_cpu_ms']}" for r in rows),
        "", "Statements the ledger's engine compiled in each warm-up hop, per run:", "",
        *(f"- {r['checkout']}: {r['first_compiled']}" for r in rows),
        "", "The rehearsal's own CPU ms per run (None: not run):", "",
        *(f"- {r['checkout']}: {r['warm_up_cpu_ms']}" for r in rows),
    ]  # fmt: skip
    (RESULTS / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
