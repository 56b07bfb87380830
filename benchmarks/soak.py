"""Fault-injection soak: real processes, kill -9 at random times, every trial must end whole.

Each trial starts a coordinator and three site agents (tiny BERT, generated data), runs a
3-site x 2-cycle plan, and injects one fault at a random moment inside a random hop:

* ``site``: kill -9 the site currently training, restart it;
* ``coordinator``: kill -9 the coordinator while a hop is leased, training or uploaded, restart it
  on the same port.

A trial passes when the run completes, every hop has exactly one ``hop.committed`` event, the
ledger verifies, and the exported final adapter equals the last hop's output.

    python benchmarks/soak.py --trials 20 --kind site
    python benchmarks/soak.py --trials 20 --kind coordinator
    python benchmarks/soak.py --quick          # 2 trials of each kind

Writes benchmarks/results/soak.json and soak.md (soak-site.* or soak-coordinator.* for one
kind).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from coordinator.console.admin import TERMINAL_RUN_STATES, AdminClient  # noqa: E402
from coordinator.console.demo import prepare_pki  # noqa: E402
from coordinator.console.processes import Cluster  # noqa: E402
from coordinator.ledger import Ledger  # noqa: E402
from coordinator.plan import parse_plan  # noqa: E402
from protocols.checkpoint import sha256_hex  # noqa: E402
from protocols.transport import TlsFiles  # noqa: E402
from site_agent._synthetic import (  # noqa: E402
    SYNTHETIC_LABELS,
    generate_site_records,
    write_site_dataset,
)
from site_agent._tiny_model import write_tiny_base_model  # noqa: E402

SITES = ("site-a", "site-b", "site-c")
RESULTS = ROOT / "benchmarks" / "results"


def _plan() -> dict[str, object]:
    return {
        "name": "soak", "dataset": "notes", "labels": list(SYNTHETIC_LABELS),
        "sites": list(SITES), "cycles": 2, "defaults": {"steps": 60, "batch_size": 8},
        "lora": {"r": 4, "alpha": 8, "target_modules": ["query", "value"]},
        "failure": {"on_failure": "retry", "max_retries": 5, "retry_backoff_seconds": 0.2,
                    "lease_timeout_seconds": 5},
    }  # fmt: skip


def _check(state: Path, run_id: str) -> list[str]:
    problems = []
    ledger = Ledger(f"sqlite:///{state / 'ledger.sqlite3'}")
    try:
        if (broken := ledger.verify_chain()) is not None:
            problems.append(f"ledger breaks at event {broken.seq}: {broken.reason}")
        run = ledger.run(run_id)
        if run.status != "completed":
            problems.append(f"run {run.status}: {run.error}")
        commits = [e.hop_id for e in ledger.events(run_id) if e.kind == "hop.committed"]
        if sorted(commits) != sorted(h.id for h in run.hops):
            problems.append(f"{len(commits)} commits for {len(run.hops)} hops")
        final = state / "runs" / run_id / "final_adapter" / "adapter_model.safetensors"
        if not final.is_file() or sha256_hex(final.read_bytes()) != run.hops[-1].output_sha256:
            problems.append("final adapter differs from the last committed hop's output")
    finally:
        ledger.close()
    return problems


def trial(kind: str, seed: int, work: Path, model: Path) -> dict[str, object]:
    rng = random.Random(seed)
    pki_dir = work / "pki"
    prepare_pki(pki_dir, list(SITES))
    for index, site in enumerate(SITES):
        write_site_dataset(work / site / "notes.jsonl",
                           generate_site_records(index, len(SITES), n=60, seed=seed))  # fmt: skip
    plan = parse_plan(_plan())
    state = work / "coordinator"
    cluster = Cluster(log_dir=work / "logs")
    started = time.monotonic()
    injected = ""
    with cluster.running():
        port = cluster.start_coordinator(state_dir=state, pki_dir=pki_dir,
                                         port_file=work / "port")  # fmt: skip

        def start_site(site: str) -> None:
            cluster.start_site(site, coordinator=f"localhost:{port}", pki_dir=pki_dir,
                               data_dir=work / site, base_model_dir=model, threads=1,
                               approve=[plan.approval_bundle().sha256])  # fmt: skip

        for site in SITES:
            start_site(site)
        tls = TlsFiles(pki_dir / "ca.crt", pki_dir / "admin.crt", pki_dir / "admin.key")
        with AdminClient(f"localhost:{port}", tls) as admin:
            admin.wait_for_sites(set(SITES), timeout=120)
            run_id = admin.start_run(plan)
            # Fault time: a random moment inside a random hop's lease (leased, training or
            # uploaded), so every trial really injects a fault mid-run.
            target = rng.randrange(len(SITES) * 2)
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                run = admin.run(run_id)
                if run.status in TERMINAL_RUN_STATES or run.hops[target].status not in (
                    "pending",
                    "committed",
                ):
                    break
                time.sleep(0.02)
            time.sleep(rng.uniform(0.0, 1.5))
            run = admin.run(run_id)
            current = next((h for h in run.hops if h.status != "committed"), None)
        if current is not None:
            if kind == "site":
                injected = f"killed {current.site} at hop {current.index} ({current.status})"
                cluster.process(current.site).kill()
                start_site(current.site)
            else:
                injected = f"killed coordinator at hop {current.index} ({current.status})"
                cluster.process("coordinator").kill()
                cluster.start_coordinator(state_dir=state, pki_dir=pki_dir,
                                          port_file=work / "port", port=port)  # fmt: skip
        with AdminClient(f"localhost:{port}", tls) as admin:
            deadline = time.monotonic() + 300
            while admin.run(run_id).status not in TERMINAL_RUN_STATES:
                if time.monotonic() > deadline:
                    break
                time.sleep(0.2)
    problems = _check(state, run_id)
    return {
        "kind": kind,
        "seed": seed,
        "injected": injected or "run finished before the fault time",
        "seconds": round(time.monotonic() - started, 1),
        "passed": not problems,
        "problems": problems,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--kind", choices=["site", "coordinator", "both"], default="both")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="2 trials of each kind")
    args = parser.parse_args()
    kinds = ["site", "coordinator"] if args.kind == "both" else [args.kind]
    trials = 2 if args.quick else args.trials
    results = []
    with tempfile.TemporaryDirectory(prefix="baton-soak-") as scratch:
        model = write_tiny_base_model(Path(scratch) / "model", seed=0)
        for kind in kinds:
            for index in range(trials):
                work = Path(scratch) / f"{kind}-{index}"
                outcome = trial(kind, args.seed + index, work, model)
                results.append(outcome)
                status = "ok" if outcome["passed"] else f"FAILED {outcome['problems']}"
                print(f"{kind} trial {index}: {outcome['injected']}: {status}", flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    summary = {
        kind: {
            "trials": sum(r["kind"] == kind for r in results),
            "passed": sum(r["kind"] == kind and r["passed"] for r in results),
            "median_seconds": statistics.median(
                [float(r["seconds"]) for r in results if r["kind"] == kind]  # type: ignore[arg-type]
            ),
        }
        for kind in kinds
    }
    stem = "soak" if args.kind == "both" else f"soak-{args.kind}"
    (RESULTS / f"{stem}.json").write_text(
        json.dumps({"summary": summary, "trials": results}, indent=2)
    )
    flags = "--quick" if args.quick else f"--trials {trials}"
    lines = [
        "# Fault-injection soak",
        "",
        f"Command: `python benchmarks/soak.py {flags} --kind {args.kind}`",
        "",
        "| kind | trials | passed | median s/trial |",
        "| --- | --- | --- | --- |",
    ]
    for kind, row in summary.items():
        lines.append(f"| {kind} | {row['trials']} | {row['passed']} | {row['median_seconds']} |")
    lines += ["", "| kind | seed | fault | seconds | result |", "| --- | --- | --- | --- | --- |"]
    for r in results:
        verdict = "pass" if r["passed"] else "; ".join(r["problems"])  # type: ignore[arg-type]
        lines.append(
            f"| {r['kind']} | {r['seed']} | {r['injected']} | {r['seconds']} | {verdict} |"
        )
    (RESULTS / f"{stem}.md").write_text("\n".join(lines) + "\n")
    return 0 if all(r["passed"] for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
