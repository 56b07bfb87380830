"""The next site's start, in process: a hop task (its input adapter pushed inside it, as the
coordinator sends a small one) to the hop's first training step, at a site that had prepared.

A `SiteAgent` in the benchmark's process with the demo's job (the packaged all-MiniLM-L6-v2,
LoRA r=8 on query/value and the head, the demo's triage notes, ``--threads`` torch threads):
per repeat, the hop is prepared (as "you are next" does, not timed), then `_train_hop` runs the
task through every check (approval, dataset, base model, the input's hash, format, values and
custody signature, the load into the prepared model) up to its first step, where it stops. The
figures are the wall time from the call to ``train_started_at_ns`` (the instant the ledger
records) and the calling thread's CPU time up to that step. ``--contend`` runs a torch pass
(matrix products, ``--contend-threads`` threads) on a thread of its own meanwhile, as a
finishing site's post-commit validation does on a 2-core host; ``--contend-nice`` lowers it.
``--from-task`` starts the clock at the task's bytes as the stream delivers them instead: the
message parsed, then the agent's `_run_hop` (its log line and context, the heartbeat handed to
its thread, the collector hold) around `_train_hop`; heartbeats go to a stand-in.

    PYTHONPATH=. nice -n 19 .venv/bin/python benchmarks/hop_start.py --repeat 40 --name hop-start
    PYTHONPATH=/other/checkout .venv/bin/python benchmarks/hop_start.py ...   # another checkout

Writes `results/<name>.{json,md}` (median, p90, max).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


class _FirstStep:
    """Stands in for a hop's heartbeat: its ``cancelled`` check is what the training loop asks
    right before its first step, so the hop stops there and the instant is recorded."""

    def __init__(self) -> None:
        self.cancelled = self
        self.at_ns = 0
        self.cpu_ns = 0

    def is_set(self) -> bool:
        if not self.at_ns:
            self.at_ns = time.time_ns()
            self.cpu_ns = time.thread_time_ns()
        return True

    def granted(self) -> bool:  # an ordinary (not provisional) task: leased already
        return True

    def phase(self, phase: str, *, tell: bool = True) -> None:
        pass

    def training_step(self, step: int, total: int, loss: float) -> None:
        pass


class _Beats:
    """Stands in for the coordinator's stub of a hop started from its task (``--from-task``):
    answers heartbeats."""

    def SendHeartbeat(self, request: Any, timeout: float) -> Any:
        from protocols.v1 import baton_pb2 as pb

        return pb.HeartbeatResponse(cancel=False)


def _contention(stop: threading.Event, threads: int, niceness: int) -> None:
    import torch

    if niceness:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), niceness)
    torch.set_num_threads(threads)
    a = torch.randn(384, 384)
    while not stop.is_set():
        for _ in range(20):
            a = torch.tanh(a @ a.T / 384.0)


def _start_contention(args: argparse.Namespace) -> threading.Event:
    """Starts ``--contend``'s torch pass if asked; setting the event stops it."""
    stop = threading.Event()
    if args.contend:
        contention = (stop, args.contend_threads, args.contend_nice)
        threading.Thread(target=_contention, args=contention, daemon=True).start()
    return stop


def _preparation(task: Any) -> Any:
    """The "you are next" notice of a hop task: the task without its lease and its input."""
    preparation = type(task)()
    preparation.CopyFrom(task)
    for name in ("lease_token", "input_checkpoint", "input_bundle"):
        preparation.ClearField(name)
    return preparation


def _site(work: Path, threads: int) -> Any:
    from coordinator.console.demo import packaged_minilm, write_site_data
    from protocols.pki import Role, init_ca, issue_certificate
    from site_agent.agent import SiteAgent
    from site_agent.settings import SiteSettings

    pki = work / "pki"
    init_ca(pki)
    for site in ("site-a", "site-b"):
        issue_certificate(pki, pki, Role.SITE, site)
    labels = write_site_data(work / "data", 0, 4)  # registered as the demo's sites do
    agent = SiteAgent(SiteSettings(
        coordinator="localhost:1", ca_certificate=pki / "ca.crt",
        certificate=pki / "site-a.crt", private_key=pki / "site-a.key",
        data_dir=work / "data", base_model_dir=packaged_minilm(), require_approval=False,
        state_dir=work / "state", num_threads=threads,
    ))  # fmt: skip
    agent.site_name = "site-a"
    return agent, labels, pki


def _task(agent: Any, labels: list[str], pki: Path, steps: int = 15) -> Any:
    """A hop's task as the coordinator sends it: its input (a site-b adapter of this model)
    inside it, signed by site-b; ``steps`` per hop."""
    from coordinator.plan import parse_plan
    from protocols.checkpoint import CheckpointManifest, bundle_metadata, sha256_hex
    from protocols.hyperparameter_messages import to_message
    from protocols.signing import sign_digest
    from protocols.v1 import baton_pb2 as pb
    from site_agent.task_checks import _task_spec

    plan = parse_plan({
        "name": "hop-start", "dataset": "triage-notes", "labels": labels,
        "sites": ["site-b", "site-a"], "cycles": 1,
        "defaults": {"steps": steps, "batch_size": 16, "learning_rate": 2e-3},
        "lora": {"r": 8, "alpha": 16, "target_modules": ["query", "value"]},
    })  # fmt: skip
    hyperparameters = plan.expanded_hops()[1][1]
    trainer = agent.trainer("seq-classification")
    lora = pb.LoraConfig(r=8, alpha=16, dropout=plan.lora.dropout,
                         target_modules=["query", "value"])  # fmt: skip
    spec = _task_spec("seq-classification", labels, lora, "{}")
    dataset = agent._dataset("triage-notes", "seq-classification")
    model = trainer.adapter_model(spec, None)
    from site_agent.tasks._lora import adapter_config, adapter_tensors

    tensors = adapter_tensors(model)
    held = trainer.model_sha256(spec, dataset)
    manifest = CheckpointManifest(task_type="seq-classification", base_model_sha256=held,
                                  run_id="run1", hop_id="hop0", producer_site="site-b")  # fmt: skip
    from safetensors.torch import save

    data = save(tensors, metadata=bundle_metadata(manifest, adapter_config(model)))
    digest = sha256_hex(data)
    ref = pb.CheckpointRef(sha256=digest, size=len(data),
                           signature=sign_digest((pki / "site-b.key").read_bytes(), digest),
                           producer_certificate=(pki / "site-b.crt").read_bytes())  # fmt: skip
    task = pb.HopTask(
        run_id="run1", hop_id="hop1", hop_index=1, lease_token="t", task_type="seq-classification",
        dataset="triage-notes", labels=labels, base_model_sha256=held, lora=lora,
        hyperparameters=to_message(hyperparameters), task_options_json="{}",
        approval_bundle_json=plan.approval_bundle().canonical_json(),
        input_checkpoint=ref, input_bundle=data, validation_after_commit=True,
    )  # fmt: skip
    return task, spec, dataset, hyperparameters.seed


def _task_wire(task: Any) -> bytes:
    """A hop task as the task stream carries it (a `Task` message, serialised)."""
    from protocols.v1 import baton_pb2 as pb

    return pb.Task(hop=task).SerializeToString()


def _parsed_hop(wire: bytes) -> Any:
    """The hop task out of a stream message's bytes, as the agent's stream loop receives it."""
    from protocols.v1 import baton_pb2 as pb

    return pb.Task.FromString(wire).hop


def run(args: argparse.Namespace) -> dict[str, Any]:
    from site_agent.tasks import HopCancelled  # noqa: F401  (imports torch before timing)

    with tempfile.TemporaryDirectory(prefix="hop-start-") as tmp:
        agent, labels, pki = _site(Path(tmp), args.threads)
        task, _spec, _dataset, _seed = _task(agent, labels, pki)
        preparation = _preparation(task)
        wire = _task_wire(task)
        if args.from_task:
            agent._beat_threads.warm()  # as the agent does once connected
        stop = _start_contention(args)
        walls: list[float] = []
        cpus: list[float] = []
        try:
            for repeat in range(args.warmup + args.repeat):
                agent._prepare(preparation)  # "you are next", its collection included
                time.sleep(0.05)
                beat = _FirstStep()
                started_ns = time.time_ns()
                cpu_ns = time.thread_time_ns()
                if args.from_task:
                    agent._stop = beat  # its check before the first step stops the hop there
                    agent._run_hop(_Beats(), _parsed_hop(wire), 2.0)
                    result = None
                else:
                    result = agent._train_hop(None, task, beat)
                assert result is None and beat.at_ns, "the hop did not stop at its first step"
                if repeat >= args.warmup:
                    walls.append((beat.at_ns - started_ns) / 1e6)
                    cpus.append((beat.cpu_ns - cpu_ns) / 1e6)
        finally:
            stop.set()
    return {"wall_ms": walls, "cpu_ms": cpus}


def _commit() -> str:
    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                          cwd=Path(__file__).parent, check=False)  # fmt: skip
    return done.stdout.strip()


def _summary(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "median": round(statistics.median(ordered), 3),
        "p90": round(ordered[int(0.9 * (len(ordered) - 1))], 3),
        "max": round(ordered[-1], 3),
    }


def _report_head(args: argparse.Namespace, argv: list[str] | None) -> dict[str, Any]:
    """What every report of these scripts starts with: command, commit, load, settings."""
    return {
        "command": " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]),
        "commit": _commit(),
        "load_before": os.getloadavg(),
        "settings": {k: str(v) for k, v in vars(args).items()},
    }


def _publish(
    args: argparse.Namespace,
    report: dict[str, Any],
    title: str,
    note: str,
    rows: list[tuple[str, dict[str, float]]],
) -> int:
    """Prints the report's JSON (``--json-only``), or writes ``results/<name>.{json,md}`` (a
    table of ``rows``: name, median, p90, max) and prints the Markdown."""
    if args.json_only:
        print(json.dumps(report))
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        f"# {title} (`{report['command']}`)",
        "",
        f"Commit {report['commit']}, load average before {report['load_before']}{note}.",
        "",
        "| figure | median | p90 | max |",
        "|---|---:|---:|---:|",
        *(f"| {what} | {s['median']} | {s['p90']} | {s['max']} |" for what, s in rows),
    ]
    (args.out / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="the site's torch threads")
    parser.add_argument("--contend", action="store_true",
                        help="a torch pass runs meanwhile on a thread of its own")  # fmt: skip
    parser.add_argument("--contend-threads", type=int, default=2)
    parser.add_argument("--contend-nice", type=int, default=0)
    parser.add_argument("--from-task", action="store_true",
                        help="from the stream message, through the agent's _run_hop")  # fmt: skip
    parser.add_argument("--name", default="hop-start")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--json-only", action="store_true", help="print the JSON, write nothing")
    args = parser.parse_args(argv)
    figures = run(args)
    report: dict[str, Any] = {
        **_report_head(args, argv),
        "wall_ms": _summary(figures["wall_ms"]),
        "cpu_ms": _summary(figures["cpu_ms"]),
        "raw": figures,
    }
    rows = [("wall ms (task -> first step)", report["wall_ms"]),
            ("CPU ms of the task thread", report["cpu_ms"])]  # fmt: skip
    return _publish(args, report, "The next site's start, in process", "", rows)


if __name__ == "__main__":
    sys.exit(main())
