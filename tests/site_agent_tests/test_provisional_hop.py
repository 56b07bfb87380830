"""A provisional hop task (sent while its lease commits): the site sets the hop up, then waits
for the lease decision on its task stream before its first step, any beat or any answer."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import torch

from protocols.approval import ApprovalBundle
from protocols.hyperparameter_messages import to_message
from protocols.hyperparameters import HopHyperparameters
from protocols.v1 import baton_pb2 as pb
from site_agent.agent import SiteAgent
from site_agent.hop_runner import _Heartbeat
from site_agent.registry import RegisteredDataset, register_dataset
from site_agent.settings import SiteSettings
from site_agent.tasks import HopCancelled, HopOutcome, TaskSpec, TensorSpec

LABELS = ("0", "1")


class _Trainer:
    """Asks whether to stop before its first step (where the training loop asks), then fails
    the hop (so that a granted hop reports a result without a bundle to hand back)."""

    base_model_sha256 = ""

    def __init__(self, stream_left: Callable[[], int]) -> None:
        self.stream_left = stream_left
        self.asked_with_left: list[int] = []  # stream messages still unread once it may step
        self.stepped = False
        self.kept: list[pb.SignedLedgerHead] = []  # ledger heads the agent kept (`_keep_head`)
        self.kept_when_stepping: list[int] = []  # seqs of those kept once it may step

    def model_sha256(self, spec: TaskSpec, dataset: RegisteredDataset) -> str:
        return "a" * 64

    def trainable_state(self, spec: TaskSpec, dataset: RegisteredDataset) -> tuple[TensorSpec, ...]:
        return ()

    def run_hop(
        self,
        spec: TaskSpec,
        dataset: RegisteredDataset,
        hyperparameters: HopHyperparameters,
        incoming: Mapping[str, torch.Tensor] | None,
        progress: object = None,
        should_cancel: Callable[[], bool] | None = None,
    ) -> HopOutcome:
        assert should_cancel is not None
        if should_cancel():
            raise HopCancelled("cancelled before its first step")
        self.asked_with_left.append(self.stream_left())
        self.kept_when_stepping = [head.seq for head in self.kept]
        self.stepped = True
        raise ValueError("training diverged: loss is nan at step 1 of 3")


class _Stub:
    """Records what the agent tells the coordinator."""

    def __init__(self) -> None:
        self.results: list[pb.HopResult] = []
        self.beats: list[pb.Heartbeat] = []

    def ReportHopResult(self, result: pb.HopResult, timeout: float) -> pb.HopResultResponse:
        self.results.append(result)
        return pb.HopResultResponse(hop_status="failed")

    def SendHeartbeat(self, beat: pb.Heartbeat, timeout: float) -> pb.HeartbeatResponse:
        self.beats.append(beat)
        return pb.HeartbeatResponse()


class _Stream:
    """A task stream's messages, in order, counting what is left to read."""

    def __init__(self, messages: list[pb.Task]) -> None:
        self.messages = list(messages)

    def __iter__(self) -> Iterator[pb.Task]:
        return self

    def __next__(self) -> pb.Task:
        if not self.messages:
            raise StopIteration
        return self.messages.pop(0)


def _agent(tmp_path: Path) -> SiteAgent:
    tmp_path.mkdir(parents=True, exist_ok=True)
    rng = random.Random(3)
    lines = ["age,label"] + [f"{rng.gauss(55, 8):.3f},{rng.randint(0, 1)}" for _ in range(20)]
    (tmp_path / "heart.csv").write_text("\n".join(lines) + "\n")
    register_dataset(tmp_path / "data", "heart", tmp_path / "heart.csv", task_type="tabular")
    return SiteAgent(SiteSettings(
        coordinator="localhost:1", ca_certificate=tmp_path / "ca.crt",
        certificate=tmp_path / "site.crt", private_key=tmp_path / "site.key",
        data_dir=tmp_path / "data", require_approval=False,
    ))  # fmt: skip


def _task(*, provisional: bool, dataset: str = "heart") -> pb.HopTask:
    bundle = ApprovalBundle("tabular", dataset, "", labels=LABELS, bounds={})
    return pb.HopTask(
        run_id="r", hop_id="h1", hop_index=1, lease_token="t1", task_type="tabular",
        dataset=dataset, labels=LABELS, hyperparameters=to_message(HopHyperparameters()),
        approval_bundle_json=bundle.canonical_json(), provisional=provisional,
    )  # fmt: skip


def _decision(granted: bool, hop_id: str = "h1", token: str = "t1") -> pb.Task:
    return pb.Task(
        lease_decision=pb.LeaseDecision(hop_id=hop_id, lease_token=token, granted=granted)
    )


def _run(
    tmp_path: Path, task: pb.HopTask, messages: list[pb.Task]
) -> tuple[SiteAgent, _Trainer, _Stub, _Stream]:
    agent = _agent(tmp_path)
    stream = _Stream(messages)
    trainer = _Trainer(lambda: len(stream.messages))
    agent._trainers["tabular"] = trainer  # type: ignore[assignment]
    agent._stream = stream  # type: ignore[assignment]
    agent._keep_head = trainer.kept.append  # type: ignore[method-assign]
    stub = _Stub()
    agent._run_hop(stub, task, interval=0.01)  # type: ignore[arg-type]
    return agent, trainer, stub, stream


def _hop_count(agent: SiteAgent, status: str) -> float:
    value = agent.metrics.registry.get_sample_value("baton_site_hops_total", {"status": status})
    assert value is not None
    return value


def test_a_granted_provisional_hop_steps_and_answers_only_after_its_decision(
    tmp_path: Path,
) -> None:
    head = pb.Task(ledger_head=pb.SignedLedgerHead(seq=7))
    evaluation = pb.Task(evaluation=pb.EvaluationTask(evaluation_id="e1"))
    stale = _decision(True, hop_id="h0", token="t0")  # an earlier hop's: not this one's
    after = pb.Task(ledger_head=pb.SignedLedgerHead(seq=8))
    agent, trainer, stub, stream = _run(
        tmp_path, _task(provisional=True), [head, evaluation, stale, _decision(True), after]
    )

    assert trainer.stepped and trainer.asked_with_left == [1]  # read up to its decision only
    assert [r.error_code for r in stub.results] == ["training-failed"]  # answered once granted
    # Work read meanwhile runs after the hop, in order; what is not work was handled at once.
    assert list(agent._queued_tasks) == [evaluation]
    assert trainer.kept_when_stepping == [7]  # the head read while waiting, kept before the step
    assert [m.ledger_head.seq for m in stream.messages] == [8]


def test_a_withdrawn_provisional_hop_never_steps_beats_or_answers(tmp_path: Path) -> None:
    agent, trainer, stub, _ = _run(tmp_path, _task(provisional=True), [_decision(False)])

    assert not trainer.stepped
    assert stub.results == [] and stub.beats == []
    assert _hop_count(agent, "withdrawn") == 1
    assert _hop_count(agent, "refused") == 0


def test_a_provisional_task_the_site_refuses_is_answered_only_if_its_lease_is_granted(
    tmp_path: Path,
) -> None:
    missing = _task(provisional=True, dataset="nowhere")  # refused before any step
    _, _, withdrawn, _ = _run(tmp_path / "a", missing, [_decision(False)])
    _, _, granted, _ = _run(tmp_path / "b", missing, [_decision(True)])

    assert withdrawn.results == []
    assert [r.error_code for r in granted.results] == ["dataset-invalid"]


def test_a_stream_that_ends_before_the_decision_withdraws_the_hop(tmp_path: Path) -> None:
    agent, trainer, stub, _ = _run(tmp_path, _task(provisional=True), [])

    assert not trainer.stepped and stub.results == []
    assert _hop_count(agent, "withdrawn") == 1


def test_an_ordinary_task_reads_nothing_from_the_stream(tmp_path: Path) -> None:
    head = pb.Task(ledger_head=pb.SignedLedgerHead(seq=7))
    _, trainer, stub, stream = _run(tmp_path, _task(provisional=False), [head])

    assert trainer.stepped and [r.error_code for r in stub.results] == ["training-failed"]
    assert stream.messages == [head]


def test_no_beat_goes_out_for_a_provisional_hop_before_its_decision() -> None:
    stub = _Stub()
    decided = threading.Event()

    def decide() -> bool:
        decided.wait(timeout=30)
        return True

    with _Heartbeat(stub, _task(provisional=True), 0.01, None, decide) as beat:  # type: ignore[arg-type]
        threading.Event().wait(0.2)  # 20 intervals
        assert stub.beats == []
        decided.set()
        assert beat.granted()
        deadline = threading.Event()
        for _ in range(300):
            if stub.beats:
                break
            deadline.wait(0.01)
    assert stub.beats and stub.beats[0].hop_id == "h1"


def test_a_hops_start_is_taken_after_the_wait_in_its_first_cancel_check() -> None:
    from site_agent.tasks._loop import train

    weight = torch.nn.Parameter(torch.zeros(2))
    waited_until: list[int] = []
    checks: list[int] = []

    def should_cancel() -> bool:  # the first call is where a provisional hop waits
        if not checks:
            threading.Event().wait(0.05)
            waited_until.append(time.time_ns())
        checks.append(1)
        return False

    run = train(
        trainable=[weight], batch_loss=lambda batch: (weight**2).sum() + 1.0, num_examples=8,
        hyperparameters=HopHyperparameters(steps=3, batch_size=4), device=torch.device("cpu"),
        fp16=False, anchors=None, progress=None, should_cancel=should_cancel,
    )  # fmt: skip

    assert run.started_ns >= waited_until[0]  # the wait is not counted as training
    assert len(checks) == 3  # still one check before each of the 3 steps
