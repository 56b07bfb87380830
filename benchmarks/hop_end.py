"""The finishing site's end, in process: a hop's last training step to its hand back call.

The counterpart of `hop_start.py` (same site, same job: the packaged all-MiniLM-L6-v2, LoRA r=8
on query/value and the head, the demo's triage notes, ``--threads`` torch threads). Per
repeat, the hop is prepared (as "you are next" does, not timed), then `_train_and_report` runs
a hop of ``--steps`` steps (validation deferred, as after a commit) through everything the
agent does after the last step: the adapter copied out of the model and checked finite, the
bundle serialised, the egress check (format, values, declared tensors) and its hash, the
custody signature, the hand back message (adapter + result) built and serialised as gRPC
sends it. A stand-in for the coordinator's stub takes the call there: the figures are the wall
time from the last step (where the agent holds the collector off the handoff) to that call,
and the task thread's CPU time over the same span. Nothing is sent over a network.

    PYTHONPATH=. nice -n 19 .venv/bin/python benchmarks/hop_end.py --repeat 30 --name hop-end
    PYTHONPATH=/other/checkout .venv/bin/python benchmarks/hop_end.py --json-only  # A/B

``--contend`` runs a torch pass meanwhile, as `hop_start.py`'s. ``--parts N`` instead times, on the
same adapter, N interleaved rounds of the two steps this checkout changed against what they
replace: the bundle by `safetensors.torch.save` / by `serialized`, the custody signature with
the key parsed per hop / parsed once. Writes `results/<name>.{json,md}`.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # its sibling hop_start

from hop_start import (
    RESULTS,
    _commit,
    _preparation,
    _publish,
    _report_head,
    _site,
    _start_contention,
    _summary,
    _task,
)


class _Coordinator:
    """Stands in for the coordinator's stub: answers heartbeats, and takes the hand back where
    gRPC would send its first byte (the request serialised)."""

    def __init__(self) -> None:
        self.sent_ns = 0
        self.sent_cpu_ns = 0
        self.bundle_bytes = 0

    def SendHeartbeat(self, request: Any, timeout: float) -> Any:
        from protocols.v1 import baton_pb2 as pb

        return pb.HeartbeatResponse(cancel=False)

    def HandBackHopWhole(self, request: Any, timeout: float) -> Any:
        from protocols.v1 import baton_pb2 as pb

        wire = request.SerializeToString()
        self.sent_ns = time.time_ns()
        self.sent_cpu_ns = time.thread_time_ns()
        self.bundle_bytes = len(request.bundle)
        assert len(wire) > self.bundle_bytes
        return pb.HopResultResponse(hop_status="committed")


def run(args: argparse.Namespace) -> dict[str, Any]:
    from site_agent.hop_runner import _CollectorHold
    from site_agent.tasks import HopCancelled  # noqa: F401  (imports torch before timing)

    class LastStep(_CollectorHold):
        """The agent's collector hold, which its hop takes at the last step: the instant."""

        at_ns = 0
        cpu_ns = 0

        def hold(self) -> None:
            self.at_ns = time.time_ns()
            self.cpu_ns = time.thread_time_ns()
            super().hold()

    with tempfile.TemporaryDirectory(prefix="hop-end-") as tmp:
        agent, labels, pki = _site(Path(tmp), args.threads)
        task, _spec, _dataset, _seed = _task(agent, labels, pki, steps=args.steps)
        preparation = _preparation(task)
        stop = _start_contention(args)
        walls: list[float] = []
        cpus: list[float] = []
        sizes: set[int] = set()
        try:
            for repeat in range(args.warmup + args.repeat):
                agent._prepare(preparation)  # "you are next", its collection included
                time.sleep(0.05)
                coordinator = _Coordinator()
                collector = LastStep()
                try:
                    reported = agent._train_and_report(coordinator, task, 30.0, collector)
                finally:
                    collector.release()
                    agent._deferred_validation = None  # its pass is not this figure
                assert reported is not None and reported[0].ok, "the hop was not handed back"
                assert collector.at_ns and coordinator.sent_ns, "no last step or no hand back"
                sizes.add(coordinator.bundle_bytes)
                if repeat >= args.warmup:
                    walls.append((coordinator.sent_ns - collector.at_ns) / 1e6)
                    cpus.append((coordinator.sent_cpu_ns - collector.cpu_ns) / 1e6)
        finally:
            stop.set()
    return {"wall_ms": walls, "cpu_ms": cpus, "bundle_bytes": sorted(sizes)}


def parts(rounds: int, threads: int) -> dict[str, list[float]]:
    """CPU ms per call of each step and what it replaced, interleaved (`--parts`)."""
    import safetensors.torch
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from protocols.checkpoint import CheckpointManifest, bundle_metadata
    from protocols.signing import sign_digest
    from site_agent.tasks import serialized
    from site_agent.tasks._lora import adapter_config, adapter_slots
    from site_agent.tasks._state import outgoing

    with tempfile.TemporaryDirectory(prefix="hop-end-") as tmp:
        agent, labels, pki = _site(Path(tmp), threads)
        _hop, spec, _dataset, _seed = _task(agent, labels, pki)
        model = agent.trainer("seq-classification").adapter_model(spec, None)
        tensors = outgoing(adapter_slots(model))
        manifest = CheckpointManifest(task_type="seq-classification", base_model_sha256="0" * 64,
                                      run_id="r", hop_id="h", producer_site="site-a")  # fmt: skip
        metadata = bundle_metadata(manifest, adapter_config(model))
        key = (pki / "site-a.key").read_bytes()

    def sign_parsing() -> bytes:
        parsed = serialization.load_pem_private_key(key, password=None)
        assert isinstance(parsed, ec.EllipticCurvePrivateKey)
        return parsed.sign(b"0" * 64, ec.ECDSA(hashes.SHA256()))

    steps: dict[str, Callable[[], object]] = {
        "bundle: safetensors.torch.save": lambda: safetensors.torch.save(tensors, metadata),
        "bundle: serialized": lambda: serialized(tensors, metadata),
        "signature: key parsed per hop": sign_parsing,
        "signature: sign_digest": lambda: sign_digest(key, "0" * 64),
    }
    times: dict[str, list[float]] = {name: [] for name in steps}
    for index in range(rounds):
        for name, step in list(steps.items())[:: 1 if index % 2 else -1]:
            started = time.thread_time_ns()
            step()
            times[name].append((time.thread_time_ns() - started) / 1e6)
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=2,
                        help="steps per hop (its step-1 beat ends before the last)")  # fmt: skip
    parser.add_argument("--threads", type=int, default=1, help="the site's torch threads")
    parser.add_argument("--contend", action="store_true",
                        help="a torch pass runs meanwhile on a thread of its own")  # fmt: skip
    parser.add_argument("--contend-threads", type=int, default=2)
    parser.add_argument("--contend-nice", type=int, default=0)
    parser.add_argument("--parts", type=int, default=0, metavar="N",
                        help="time the changed steps, N interleaved rounds, instead")  # fmt: skip
    parser.add_argument("--name", default="hop-end")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--json-only", action="store_true", help="print the JSON, write nothing")
    args = parser.parse_args(argv)
    if args.parts:
        return _report_parts(args, parts(args.parts, args.threads))
    figures = run(args)
    report: dict[str, Any] = {
        **_report_head(args, argv),
        "bundle_bytes": figures["bundle_bytes"],
        "wall_ms": _summary(figures["wall_ms"]),
        "cpu_ms": _summary(figures["cpu_ms"]),
        "raw": {k: figures[k] for k in ("wall_ms", "cpu_ms")},
    }
    rows = [("wall ms (last step -> hand back call)", report["wall_ms"]),
            ("CPU ms of the task thread", report["cpu_ms"])]  # fmt: skip
    note = f", bundle {report['bundle_bytes']} bytes"
    return _publish(args, report, "The finishing site's end, in process", note, rows)


def _report_parts(args: argparse.Namespace, times: dict[str, list[float]]) -> int:
    report: dict[str, Any] = {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "commit": _commit(),
        "load_before": os.getloadavg(),
        "cpu_ms": {name: _summary(values) for name, values in times.items()},
    }
    title = "The finishing site's changed steps, CPU ms per call"
    return _publish(args, report, title, "", list(report["cpu_ms"].items()))


if __name__ == "__main__":
    sys.exit(main())
