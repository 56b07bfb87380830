"""Baton's handoff, measured from the ledger and split into phases.

A *handoff* is the time from the finishing site's last training step to the next site's first
training step: ``train_started_at_ns`` of hop i+1 minus ``train_finished_at_ns`` of hop i, both
taken by the sites around their optimizer loops and recorded in the ledger with each hop (the
clocks agree here: every process runs on one machine). The phases between those two instants
come from the ledger's hop events (coordinator clock):

* ``result``: the finishing site's last step to its hop's ``hop.committed`` event (everything the
  site does after training before the coordinator holds the hop: before the commit-first
  redesign this includes the validation pass and the upload, then the commit);
* ``dispatch``: ``hop.committed`` of hop i to ``hop.leased`` of hop i+1;
* ``start``: ``hop.leased`` of hop i+1 to its first training step (task delivery, download,
  model set-up at the next site).

``phases(ledger, run_id)`` is the reusable part (a future benchmarks/handoff.py reads it); the
script runs a 4-site sequential job on real processes (coordinator + sites on loopback mTLS) for
the demo's model (all-MiniLM-L6-v2 + LoRA r=8) or a tabular logistic model and writes JSON and
Markdown under benchmarks/results/:

    nice -n 19 python benchmarks/handoff_phases.py --task minilm --label before
    nice -n 19 python benchmarks/handoff_phases.py --task tabular --label before
    nice -n 19 python benchmarks/handoff_phases.py --task minilm --label before --profile

``--profile`` records every process with py-spy (raw collapsed stacks, idle threads included)
and summarises where the finishing and the next site spend their time around handoffs.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import gzip
import itertools
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from coordinator.console.admin import AdminClient  # noqa: E402
from coordinator.ledger import Ledger  # noqa: E402
from coordinator.plan import RunPlan  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
SITES = ("hospital-a", "hospital-b", "hospital-c", "hospital-d")


@dataclass(frozen=True)
class HandoffPhases:
    """One handoff (hop ``index`` - 1 to hop ``index``), in milliseconds."""

    index: int  # the receiving hop
    first_visit: bool  # the receiving site trains for this run for the first time
    total_ms: float
    result_ms: float | None
    dispatch_ms: float | None
    start_ms: float | None


def _event_ns(at: str) -> int:
    moment = datetime.fromisoformat(at)
    return int(moment.timestamp()) * 1_000_000_000 + moment.microsecond * 1000


def phases(ledger: Ledger, run_id: str) -> list[HandoffPhases]:
    """Every handoff of a run with its phases, in hop order (committed hops only)."""
    run = ledger.run(run_id)
    hops = sorted((h for h in run.hops if h.status == "committed"), key=lambda h: h.index)
    events: dict[tuple[str, str], int] = {}
    for event in ledger.events(run_id):
        if event.hop_id and event.kind in ("hop.committed", "hop.leased"):
            # The last lease is the one that trained (earlier ones were retried).
            events[(event.kind, event.hop_id)] = _event_ns(event.at)
    seen: set[str] = set()
    handoffs = []
    for previous, current in itertools.pairwise(hops):
        seen.add(previous.site)
        finished, started = previous.train_finished_at_ns, current.train_started_at_ns
        if not finished or not started:
            continue
        committed = events.get(("hop.committed", previous.id))
        leased = events.get(("hop.leased", current.id))

        def ms(start: int | None, end: int | None) -> float | None:
            return None if start is None or end is None else round((end - start) / 1e6, 2)

        handoffs.append(
            HandoffPhases(
                index=current.index,
                first_visit=current.site not in seen,
                total_ms=round((started - finished) / 1e6, 2),
                result_ms=ms(finished, committed),
                dispatch_ms=ms(committed, leased),
                start_ms=ms(leased, started),
            )
        )
    return handoffs


def summarise(handoffs: Sequence[HandoffPhases]) -> dict[str, Any]:
    """Median and p99 of the total and of each phase; first visits apart as well."""

    def stats(values: Sequence[float | None]) -> dict[str, float | None]:
        present = sorted(v for v in values if v is not None)
        if not present:
            return {"median": None, "p99": None, "max": None}
        rank = max(0, min(len(present) - 1, round(0.99 * len(present) + 0.5) - 1))
        return {
            "median": round(statistics.median(present), 2),
            "p99": present[rank],
            "max": present[-1],
        }

    return {
        "handoffs": len(handoffs),
        "total_ms": stats([h.total_ms for h in handoffs]),
        "first_visit_total_ms": stats([h.total_ms for h in handoffs if h.first_visit]),
        "later_total_ms": stats([h.total_ms for h in handoffs if not h.first_visit]),
        "result_ms": stats([h.result_ms for h in handoffs]),
        "dispatch_ms": stats([h.dispatch_ms for h in handoffs]),
        "start_ms": stats([h.start_ms for h in handoffs]),
    }


# ---- the job ----------------------------------------------------------------------------------


def _write_tabular(path: Path, seed: int, shift: float) -> None:
    rng = random.Random(seed)
    lines = ["age,chol,label"]
    for _ in range(200):
        age, chol = rng.gauss(55 + shift, 8), rng.gauss(230, 40)
        label = int(0.08 * (age - 55) + 0.01 * (chol - 230) + rng.gauss(0, 0.5) > 0)
        lines.append(f"{age:.1f},{chol:.1f},{label}")
    path.write_text("\n".join(lines) + "\n")


def _prepare_data(task: str, work: Path, cycles: int, steps: int) -> tuple[RunPlan, Path | None]:
    from coordinator.console.demo import DATASET, packaged_minilm, write_site_data
    from site_agent.registry import register_dataset

    if task == "minilm":
        labels: list[str] = []
        for index, site in enumerate(SITES):
            labels = write_site_data(work / site, index, len(SITES))
        plan = {
            "name": "handoff-minilm", "dataset": DATASET, "labels": labels,
            "sites": list(SITES), "cycles": cycles,
            "defaults": {"steps": steps, "batch_size": 16, "learning_rate": 2e-3},
            "lora": {"r": 8, "alpha": 16, "target_modules": ["query", "value"]},
        }  # fmt: skip
        return RunPlan.model_validate(plan), packaged_minilm()
    for index, site in enumerate(SITES):
        _write_tabular(work / f"{site}.csv", seed=index, shift=3 * index)
        register_dataset(work / site, "heart", work / f"{site}.csv", task_type="tabular")
    plan = {
        "name": "handoff-tabular", "task": "tabular", "dataset": "heart", "labels": ["0", "1"],
        "sites": list(SITES), "cycles": cycles, "options": {"model": "logistic"},
        "defaults": {"steps": steps, "batch_size": 16, "learning_rate": 0.05},
    }  # fmt: skip
    return RunPlan.model_validate(plan), None


def _profile_summary(raw: Path) -> dict[str, Any]:
    """Share of samples per hop activity in a py-spy raw (collapsed) profile of one site."""
    # The first bucket whose needle is in a stack takes its samples (py-spy raw frames read
    # "function (file:line)").
    buckets = {
        "training steps": ("train (site_agent/tasks/_loop.py:",),
        "validation pass, after the commit": ("_report_validation (site_agent/hop_runner.py:",),
        "validation pass": ("evaluate (site_agent/tasks/_sequence_classification.py:",
                            "_evaluate_model (site_agent/tasks/_tabular.py:"),
        "preparation (next site, while the other trains)": ("_prepare (site_agent/hop_runner.py:",),
        "model set-up (base copy + LoRA wrap)": ("_adapter_model (site_agent/tasks/",
                                                 "_model (site_agent/tasks/_tabular.py:"),
        "adapter load": ("load_adapter (site_agent/tasks/_lora.py:",
                         "_load (site_agent/tasks/_tabular.py:"),
        "encode data": ("_encode (site_agent/tasks/",),
        "download": ("_download (site_agent/transfers.py:",),
        "upload": ("upload (site_agent/hop_runner.py:",),
        "report result": ("_report_hop_result (site_agent/hop_runner.py:",),
        "egress check": ("_check_egress (site_agent/hop_runner.py:",),
        "phase heartbeat": ("phase (site_agent/hop_runner.py:",),
    }  # fmt: skip
    counts: Counter[str] = Counter()
    busy = 0
    text = gzip.decompress(raw.read_bytes()).decode() if raw.suffix == ".gz" else raw.read_text()
    for line in text.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not count_text.isdigit() or (
            "HopRunner._run_hop" not in stack and "HopRunner._prepare" not in stack
        ):
            continue
        count = int(count_text)
        busy += count
        for name, needles in buckets.items():
            if any(needle in stack for needle in needles):
                counts[name] += count
                break
        else:
            counts["other hop handling (task checks, serialisation, waits)"] += count
    outside = busy - counts["training steps"]
    return {
        "samples_in_hops": busy,
        "share": {k: round(v / busy, 3) for k, v in counts.most_common()} if busy else {},
        # Where a hop's time goes apart from its optimizer steps (what a handoff is made of).
        "share_outside_training": {
            k: round(v / outside, 3) for k, v in counts.most_common() if k != "training steps"
        }
        if outside
        else {},
    }


def run_job(
    task: str, cycles: int, steps: int, work: Path, profile_dir: Path | None
) -> dict[str, Any]:
    """Runs the 4-site job once and returns its handoffs, phases and summary."""
    from coordinator.console.demo import prepare_pki
    from coordinator.console.processes import Cluster
    from protocols.transport import TlsFiles

    plan, model = _prepare_data(task, work, cycles, steps)
    pki_dir = work / "pki"
    prepare_pki(pki_dir, list(SITES))
    cluster = Cluster(log_dir=work / "logs")
    state = work / "coordinator"
    spies: list[tuple[str, subprocess.Popen[bytes], Path]] = []
    started = time.monotonic()
    started_ns = time.time_ns()
    with cluster.running():
        port = cluster.start_coordinator(state_dir=state, pki_dir=pki_dir, port_file=work / "port")
        for site in SITES:
            cluster.start_site(site, coordinator=f"localhost:{port}", pki_dir=pki_dir,
                               data_dir=work / site, base_model_dir=model, threads=1,
                               approve=[plan.approval_bundle().sha256])  # fmt: skip
        tls = TlsFiles(pki_dir / "ca.crt", pki_dir / "admin.crt", pki_dir / "admin.key")
        with AdminClient(f"localhost:{port}", tls) as admin:
            admin.wait_for_sites(set(SITES), timeout=180)
            ready = time.monotonic() - started
            if profile_dir is not None:
                spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
                for managed in cluster.processes:
                    out = profile_dir / f"{task}-{managed.name}.txt"
                    process = subprocess.Popen(
                        [spy, "record", "--pid", str(managed.process.pid), "--format", "raw",
                         "--idle", "--rate", "200", "--output", str(out)],
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                    )  # fmt: skip
                    spies.append((managed.name, process, out))
                time.sleep(1.0)
            run_id = admin.start_run(plan)
            deadline = time.monotonic() + 1800
            while (status := admin.run(run_id)).status not in ("completed", "failed", "aborted"):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"run {run_id} did not finish")
                cluster.check_alive()
                time.sleep(0.2)
            if status.status != "completed":
                raise RuntimeError(f"run {run_id} {status.status}: {status.error}")
            for _, process, _ in spies:
                process.send_signal(2)  # SIGINT: py-spy writes its profile and exits
            for _, process, _ in spies:
                process.wait(timeout=60)
            for index, (name, process, out) in enumerate(spies):
                # Collapsed stacks compress about 20x: only the compressed copy is kept.
                packed = out.with_name(out.name + ".gz")
                packed.write_bytes(gzip.compress(out.read_bytes()))
                out.unlink()
                spies[index] = (name, process, packed)
    ledger = Ledger(f"sqlite:///{state / 'ledger.sqlite3'}")
    try:
        handoffs = phases(ledger, run_id)
        first = min(ledger.run(run_id).hops, key=lambda h: h.index)
    finally:
        ledger.close()
    result: dict[str, Any] = {
        "task": task,
        "sites": len(SITES),
        "cycles": cycles,
        "steps_per_hop": steps,
        "cluster_ready_seconds": round(ready, 2),
        # Cold start: coordinator and sites started at once, the run started as soon as every
        # site said hello; until the first hop's first training step.
        "cold_start_to_first_step_seconds": round(
            ((first.train_started_at_ns or started_ns) - started_ns) / 1e9, 2
        ),
        "wall_seconds": round(time.monotonic() - started, 1),
        # The machine is shared: its 1-minute load average when the run ended (2 cores).
        "load_average_1m": round(os.getloadavg()[0], 1),
        "summary": summarise(handoffs),
        "handoffs": [asdict(h) for h in handoffs],
    }
    if spies:
        result["profile"] = {
            name: _profile_summary(out) for name, _, out in spies if name != "coordinator"
        }
    return result


# ---- CPU time of the sites' steps of a handoff (one process, no cluster) ---------------------


def site_cpu(work: Path, repeats: int, steps: int) -> dict[str, Any]:
    """Thread CPU time and wall time (ms, medians over ``repeats`` hops) of each step a site
    takes inside a handoff, on the demo's model, measured in one process with the agent's own
    functions: the finishing site's serialisation, egress check and signature, the next site's
    bundle and custody checks, tensor load, data view and set-up up to its first training step.
    CPU time is what a loaded machine cannot inflate; wall time shows what waiting adds.
    """
    import safetensors.torch
    import torch

    from coordinator.console.demo import DATASET, packaged_minilm, prepare_pki, write_site_data
    from protocols.checkpoint import CheckpointManifest, bundle_metadata, inspect_bundle
    from protocols.signing import sign_digest, verify_custody
    from site_agent.hop_runner import HopRunner
    from site_agent.registry import load_registered
    from site_agent.tasks import (
        HopHyperparameters,
        LoraSettings,
        TaskSpec,
        _lora_trainer,
        create_trainer,
    )
    from site_agent.tasks._loop import warm_up_optimizer

    collections: dict[int, list[float]] = {0: [], 1: [], 2: []}
    collecting: list[float] = []

    def note_collection(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            collecting[:] = [time.perf_counter()]
        elif collecting:
            collections[info["generation"]].append((time.perf_counter() - collecting[0]) * 1000)

    prepare_pki(work / "pki", ["hospital-a"])
    labels = write_site_data(work / "hospital-a", 0, len(SITES))
    key, ca = (work / "pki" / "hospital-a.key"), (work / "pki" / "ca.crt").read_bytes()
    certificate = (work / "pki" / "hospital-a.crt").read_bytes()
    torch.set_num_threads(1)
    warm_up_optimizer()
    trainer = create_trainer(
        "seq-classification", base_model_dir=packaged_minilm(), device="cpu", num_threads=1
    )
    spec = TaskSpec(task_type="seq-classification", labels=tuple(labels),
                    lora=LoraSettings(8, 16, 0.0, ("query", "value")), options={})  # fmt: skip
    dataset = load_registered(work / "hospital-a", DATASET)
    hyperparameters = HopHyperparameters(steps=steps, batch_size=16, learning_rate=2e-3, seed=1)
    held = trainer.base_model_sha256
    trainer.load_base_model(spec)
    try:  # as the agent does once a trainer has loaded (where its code has it)
        from site_agent.hop_runner import settle_heap
    except ImportError:
        settle = "no"
    else:
        settle_heap()
        settle = "yes"
    frozen = gc.get_freeze_count()
    tracked = len(gc.get_objects())
    samples: dict[str, list[tuple[float, float]]] = {}
    entered: list[tuple[float, int]] = []  # (thread CPU, wall ns) when the optimizer loop starts
    real_train = _lora_trainer.train

    def train(**kwargs: Any) -> Any:
        entered.append((time.thread_time(), time.time_ns()))
        return real_train(**kwargs)

    @contextlib.contextmanager
    def timed(name: str) -> Iterator[None]:
        cpu, wall = time.thread_time(), time.perf_counter()
        yield
        samples.setdefault(name, []).append(
            ((time.thread_time() - cpu) * 1000, (time.perf_counter() - wall) * 1000)
        )

    _lora_trainer.train = train  # type: ignore[assignment]
    gc.callbacks.append(note_collection)
    try:
        incoming = None
        for repeat in range(repeats + 1):  # the first hop warms up and is not counted
            with timed("next: prepare (while the other site trains)"):
                trainer.prepare(spec, dataset, hyperparameters.seed)
            with timed("next: data view (load_registered)"):
                load_registered(work / "hospital-a", DATASET)
            cpu, wall = time.thread_time(), time.time_ns()
            outcome = trainer.run_hop(spec, dataset, hyperparameters, incoming,
                                      defer_validation=True)  # fmt: skip
            samples.setdefault("next: run_hop up to its first step", []).append(
                ((entered[-1][0] - cpu) * 1000, (outcome.train_started_at_ns - wall) / 1e6)
            )
            manifest = CheckpointManifest(
                task_type="seq-classification", base_model_sha256=held, run_id="r",
                hop_id=f"h{repeat}", producer_site="hospital-a", created_at="now",
            )  # fmt: skip
            with timed("finishing: serialise (safetensors)"):
                payload = safetensors.torch.save(
                    outcome.tensors, metadata=bundle_metadata(manifest, outcome.adapter_config)
                )
            with timed("finishing: egress check (hash, format, values)"):
                digest = HopRunner._check_egress(trainer, spec, dataset, payload, 1 << 30)
            with timed("finishing: sign"):
                signature = sign_digest(key.read_bytes(), digest)
            with timed("next: bundle check (hash, format, values)"):
                inspect_bundle(payload, expected_sha256=digest)
            with timed("next: custody signature check"):
                verify_custody(digest, signature, certificate, ca_pem=ca, producer="hospital-a")
            with timed("next: tensors loaded"):
                incoming = safetensors.torch.load(payload)
            if repeat == 0:
                samples.clear()
    finally:
        _lora_trainer.train = real_train  # type: ignore[assignment]
        gc.callbacks.remove(note_collection)
    table = {
        name: {
            "cpu_ms": round(statistics.median(c for c, _ in values), 3),
            "wall_ms": round(statistics.median(w for _, w in values), 3),
        }
        for name, values in samples.items()
    }
    on_path = [name for name in table if "prepare" not in name]
    return {
        "repeats": repeats,
        "bundle_bytes": len(payload),
        "steps": table,
        "on_the_handoff_cpu_ms": round(sum(table[n]["cpu_ms"] for n in on_path), 3),
        "load_average_1m": round(os.getloadavg()[0], 1),
        # The cyclic garbage collector over all the hops (warm-up included): a collection that
        # falls inside a handoff holds it up by its whole wall time.
        "garbage_collector": {
            "heap_settled_after_load": settle,
            "frozen_objects": frozen,
            "tracked_objects": tracked,
            "collections": {
                f"generation {generation}": {
                    "count": len(ms),
                    "total_ms": round(sum(ms), 1),
                    "max_ms": round(max(ms), 1) if ms else 0.0,
                }
                for generation, ms in collections.items()
            },
        },
    }


def _site_cpu_markdown(report: dict[str, Any]) -> str:
    cpu = report["site_cpu"]
    lines = [
        f"# Baton handoff: the sites' steps in CPU time ({report['label']})",
        "",
        "Each step a site takes inside a handoff, on all-MiniLM-L6-v2 + LoRA r=8 "
        f"({cpu['bundle_bytes']} bytes bundle), in one process with the agent's functions; "
        f"medians of {cpu['repeats']} hops. Thread CPU time is what the load cannot inflate. "
        f"1-minute load average at the end: {cpu['load_average_1m']} (2 cores).",
        "",
        f"Command: `{report['command']}`",
        "",
        "| step | CPU ms | wall ms |",
        "|---|---:|---:|",
    ]
    lines += [f"| {n} | {v['cpu_ms']} | {v['wall_ms']} |" for n, v in cpu["steps"].items()]
    lines += ["", f"On the handoff (all but the preparation): {cpu['on_the_handoff_cpu_ms']} ms "
              "of CPU at the two sites."]  # fmt: skip
    collector = cpu.get("garbage_collector")
    if collector:
        lines += ["", f"Garbage collector over all {cpu['repeats'] + 1} hops (warm-up included): "
                  f"heap settled after the load: {collector['heap_settled_after_load']}, "
                  f"{collector['frozen_objects']} objects frozen, "
                  f"{collector['tracked_objects']} tracked outside them.", "",
                  "| generation | collections | total ms | max ms |",
                  "|---|---:|---:|---:|"]  # fmt: skip
        lines += [f"| {g} | {v['count']} | {v['total_ms']} | {v['max_ms']} |"
                  for g, v in collector["collections"].items()]  # fmt: skip
    return "\n".join(lines) + "\n"


def _markdown(report: dict[str, Any]) -> str:
    lines = [
        f"# Baton handoff phases ({report['label']})",
        "",
        "Handoff: the finishing site's last training step to the next site's first training "
        "step (site timestamps in the ledger). Phases from the ledger's hop events: *result* "
        "(last step to `hop.committed`), *dispatch* (`hop.committed` to the next "
        "`hop.leased`), *start* (`hop.leased` to the next first step).",
        "",
        f"Command: `{report['command']}`",
        "",
        "| task | handoffs | median ms | p99 ms | first visits median | later median "
        "| result median | dispatch median | start median | sites connected s "
        "| cold start to first step s | load avg |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for job in report["jobs"]:
        s = job["summary"]
        lines.append(
            f"| {job['task']} | {s['handoffs']} | {s['total_ms']['median']} | "
            f"{s['total_ms']['p99']} | {s['first_visit_total_ms']['median']} | "
            f"{s['later_total_ms']['median']} | {s['result_ms']['median']} | "
            f"{s['dispatch_ms']['median']} | {s['start_ms']['median']} | "
            f"{job['cluster_ready_seconds']} | {job['cold_start_to_first_step_seconds']} | "
            f"{job['load_average_1m']} |"
        )
    for job in report["jobs"]:
        for site, profile in job.get("profile", {}).items():
            lines += ["", f"## py-spy profile, {job['task']}, {site} "
                      f"({profile['samples_in_hops']} samples inside hop handling)", "",
                      "| activity | share | share outside training steps |",
                      "|---|---|---|"]  # fmt: skip
            outside = profile.get("share_outside_training", {})
            lines += [
                f"| {name} | {share:.1%} | "
                + (f"{outside[name]:.1%}" if name in outside else "")
                + " |"
                for name, share in profile["share"].items()
            ]
    return "\n".join(lines) + "\n"


def _comparison(labels: Sequence[str]) -> int:
    """handoff_report.md: the named results side by side (e.g. before-minilm after-minilm)."""
    lines = [
        "# Baton handoff: before and after",
        "",
        "Handoff = the finishing site's last training step to the next site's first training "
        "step (site timestamps in the ledger's hop rows). 4 sites, loopback mTLS, one machine "
        "(2 cores shared with other work: see the load average). Produced by "
        "`benchmarks/handoff_phases.py --report " + " ".join(labels) + "` from the result files "
        "named in the first column.",
        "",
        "| result | task | handoffs | median ms | p99 ms | first visits median | later median "
        "| result phase median | dispatch median | start median | cold start to first step s "
        "| load avg |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    commands = []
    for label in labels:
        report = json.loads((RESULTS / f"handoff_phases_{label}.json").read_text())
        for job in report["jobs"]:
            s = job["summary"]
            lines.append(
                f"| {label} | {job['task']} | {s['handoffs']} | {s['total_ms']['median']} | "
                f"{s['total_ms']['p99']} | {s['first_visit_total_ms']['median']} | "
                f"{s['later_total_ms']['median']} | {s['result_ms']['median']} | "
                f"{s['dispatch_ms']['median']} | {s['start_ms']['median']} | "
                f"{job.get('cold_start_to_first_step_seconds')} | {job.get('load_average_1m')} |"
            )
        commands.append(f"- {label}: `{report['command']}`")
    lines += ["", "Commands (`before` results: the same script run on main's code):", ""]
    lines += commands
    (RESULTS / "handoff_report.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {RESULTS / 'handoff_report.md'}")
    return 0


def _resummarise(label: str) -> int:
    stem = RESULTS / f"handoff_phases_{label}"
    report = json.loads(stem.with_suffix(".json").read_text())
    for job in report["jobs"]:
        profiles = sorted((RESULTS / f"handoff_profile_{label}").glob(f"{job['task']}-*.txt*"))
        names = {raw: raw.name.split(".")[0].removeprefix(f"{job['task']}-") for raw in profiles}
        job["profile"] = {
            names[raw]: _profile_summary(raw) for raw in profiles if names[raw] != "coordinator"
        }
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    stem.with_suffix(".md").write_text(_markdown(report))
    print(f"rewrote {stem}.json and {stem}.md")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=("minilm", "tabular", "both"), default="both")
    parser.add_argument("--cycles", type=int, default=4)
    parser.add_argument("--steps", type=int, default=0, help="0: 15 (minilm), 30 (tabular)")
    parser.add_argument("--label", default="after", help="names the result files")
    parser.add_argument("--profile", action="store_true", help="record every process")
    parser.add_argument(
        "--resummarise",
        action="store_true",
        help="re-read the raw profiles of an existing result (--label) and rewrite its report",
    )
    parser.add_argument(
        "--report", nargs="+", metavar="LABEL", help="compare existing results (no run)"
    )
    parser.add_argument(
        "--site-cpu",
        type=int,
        metavar="HOPS",
        default=0,
        help="no cluster: CPU time of each site step of a handoff, median over HOPS hops",
    )
    args = parser.parse_args(argv)
    command = "python benchmarks/handoff_phases.py " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    if args.site_cpu:
        with tempfile.TemporaryDirectory(prefix="baton-handoff-cpu-") as tmp:
            cpu = site_cpu(Path(tmp), args.site_cpu, args.steps or 5)
        report = {"label": args.label, "command": command, "site_cpu": cpu}
        stem = RESULTS / f"handoff_phases_{args.label}"
        stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
        stem.with_suffix(".md").write_text(_site_cpu_markdown(report))
        print(f"wrote {stem}.json and {stem}.md")
        return 0
    if args.report:
        return _comparison(args.report)
    if args.resummarise:
        return _resummarise(args.label)
    tasks = ("tabular", "minilm") if args.task == "both" else (args.task,)
    RESULTS.mkdir(parents=True, exist_ok=True)
    jobs = []
    for task in tasks:
        steps = args.steps or (15 if task == "minilm" else 30)
        with tempfile.TemporaryDirectory(prefix=f"baton-handoff-{task}-") as tmp:
            profile_dir = None
            if args.profile:
                profile_dir = RESULTS / f"handoff_profile_{args.label}"
                profile_dir.mkdir(exist_ok=True)
            job = run_job(task, args.cycles, steps, Path(tmp), profile_dir)
        print(json.dumps({"task": task, **job["summary"]}, indent=1))
        jobs.append(job)
    report = {
        "label": args.label,
        "command": "nice -n 19 python benchmarks/handoff_phases.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "jobs": jobs,
    }
    stem = RESULTS / f"handoff_phases_{args.label}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    stem.with_suffix(".md").write_text(_markdown(report))
    print(f"wrote {stem}.json and {stem}.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
