"""The finishing and the next site's share of a handoff: no beat while a hop sets up or hands
back, and a committed hop's validation pass yields the CPU to the handoff."""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from protocols.v1 import baton_pb2 as pb
from site_agent import hop_runner
from site_agent.hop_runner import BeatThreads, _Heartbeat, at_low_priority


class _BeatRecorder:
    """A stub whose SendHeartbeat records each beat it is sent."""

    def __init__(self) -> None:
        self.beats: queue.Queue[pb.Heartbeat] = queue.Queue()

    def SendHeartbeat(self, beat: pb.Heartbeat, timeout: float) -> pb.HeartbeatResponse:
        self.beats.put(beat)
        return pb.HeartbeatResponse()


def test_training_is_told_after_the_first_step_and_uploading_not_at_once() -> None:
    stub = _BeatRecorder()
    task = pb.HopTask(hop_id="h", lease_token="t")
    # A regular beat would come only after an hour: every beat seen here was woken.
    with _Heartbeat(stub, task, interval=3600) as beat:  # type: ignore[arg-type]
        beat.phase("downloading")
        assert stub.beats.get(timeout=30).phase == "downloading"
        beat.phase("training", tell=False)
        beat.phase("uploading", tell=False)
        beat.phase("training", tell=False)
        beat.training_step(1, 10, 0.5)
        first = stub.beats.get(timeout=30)
        beat.training_step(2, 10, 0.4)  # later steps ride on regular beats
        beat.phase("done")
        last = stub.beats.get(timeout=30)
    # The first beat after "downloading" is the one the first step woke.
    assert (first.phase, first.step, first.total_steps) == ("training", 1, 10)
    assert last.phase == "done"
    assert stub.beats.empty()


def test_the_last_steps_start_is_told_at_once() -> None:
    # The coordinator checks the run's ledger rows for the hand back while the last step
    # computes (`Hops._check_at_last_step`): steps that take no time put that beat, due
    # LAST_STEP_LEAD_SECONDS before the last step's expected end, at once after step total - 1.
    stub = _BeatRecorder()
    task = pb.HopTask(hop_id="h", lease_token="t")
    with _Heartbeat(stub, task, interval=3600) as beat:  # type: ignore[arg-type]
        beat.phase("training", tell=False)
        for step in range(1, 10):
            beat.training_step(step, 10, 0.5)
            if step in (1, 9):
                told = stub.beats.get(timeout=30)
                assert (told.phase, told.step, told.total_steps) == ("training", step, 10)
            assert stub.beats.empty()
        beat.training_step(10, 10, 0.4)  # the hand back follows: no beat of its own
    assert stub.beats.empty()


def test_the_last_steps_beat_goes_out_its_lead_before_the_expected_end(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Steps here take no time: a lead of -0.5 s puts the beat 0.5 s after the last step began.
    monkeypatch.setattr(hop_runner, "LAST_STEP_LEAD_SECONDS", -0.5)
    stub = _BeatRecorder()
    task = pb.HopTask(hop_id="h", lease_token="t")
    with _Heartbeat(stub, task, interval=3600) as beat:  # type: ignore[arg-type]
        beat.training_step(1, 3, 0.5)
        assert stub.beats.get(timeout=30).step == 1
        began = time.monotonic()
        beat.training_step(2, 3, 0.5)
        told = stub.beats.get(timeout=30)
        assert (told.step, told.total_steps) == (2, 3)
        assert time.monotonic() - began >= 0.45
        # A hop that ends before its due beat: the beat is dropped (none beside the hand back).
        beat.training_step(1, 3, 0.5)
        assert stub.beats.get(timeout=30).step == 1
        beat.training_step(2, 3, 0.5)
        beat.training_step(3, 3, 0.4)
        time.sleep(1.0)
    assert stub.beats.empty()


class _StuckBeat(_BeatRecorder):
    """A stub whose first SendHeartbeat hangs until released (an unreachable coordinator)."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()
        self._calls = 0

    def SendHeartbeat(self, beat: pb.Heartbeat, timeout: float) -> pb.HeartbeatResponse:
        self._calls += 1
        if self._calls == 1:
            self.release.wait(30)
        return super().SendHeartbeat(beat, timeout)


def test_hops_beat_from_a_thread_started_ahead_and_a_stuck_one_is_not_waited_for(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    threads = BeatThreads()
    threads.warm()
    started: list[str] = []
    start = threading.Thread.start
    monkeypatch.setattr(
        threading.Thread, "start", lambda thread: started.append(thread.name) or start(thread)
    )
    stub = _BeatRecorder()
    for hop in ("h1", "h2"):
        task = pb.HopTask(hop_id=hop, lease_token="t")
        with _Heartbeat(stub, task, 3600, threads) as beat:  # type: ignore[arg-type]
            beat.phase("downloading")
            assert stub.beats.get(timeout=30).hop_id == hop
    # A hop's start hands its beats to the thread started ahead: no thread is started (and
    # waited for until it is scheduled) on the handoff.
    assert started == []

    stuck = _StuckBeat()
    with _Heartbeat(stuck, pb.HopTask(hop_id="h3"), 3600, threads) as beat:  # type: ignore[arg-type]
        beat.phase("downloading")  # its thread hangs in this beat
        with _Heartbeat(stub, pb.HopTask(hop_id="h4"), 3600, threads) as other:  # type: ignore[arg-type]
            other.phase("downloading")
            assert stub.beats.get(timeout=30).hop_id == "h4"
        assert started == ["heartbeat"]  # a second thread, the first one being busy
        stuck.release.set()
    assert stuck.beats.get(timeout=30).hop_id == "h3"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a thread's nice value: Linux")
def test_a_deferred_validation_runs_at_a_lower_priority_than_the_agent() -> None:
    seen: dict[str, Any] = {}

    def validate() -> dict[str, float]:
        seen["thread"] = threading.get_ident()
        seen["nice"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        seen["policy"] = os.sched_getscheduler(0)
        return {"accuracy": 0.5}

    before = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    policy = os.sched_getscheduler(0)
    assert at_low_priority(validate) == {"accuracy": 0.5}
    assert seen["thread"] != threading.get_ident()
    assert seen["nice"] == min(before + 10, 19)  # the kernel clamps at 19 (a suite run niced)
    # Not the idle class: the task thread waits for this pass, and an idle-class pass on a
    # saturated host (~0.3% of a core) would keep the site from reading its next hop.
    assert seen["policy"] == policy
    # The caller (the agent's task stream) keeps its own priority.
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == before
    assert os.sched_getscheduler(0) == policy


def test_a_failed_validation_at_low_priority_is_raised_to_the_caller() -> None:
    def validate() -> dict[str, float]:
        raise ValueError("training diverged: validation loss is nan")

    with pytest.raises(ValueError, match="validation loss is nan"):
        at_low_priority(validate)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a thread's nice value: Linux")
def test_torch_intra_op_workers_of_a_validation_pass_run_at_its_lower_priority() -> None:
    """torch's OpenMP workers are made by the thread that first runs a parallel operation:
    a pass runs on a fresh thread, so its workers are made, and stay, at the pass's priority
    while the agent's own (training) workers keep the agent's."""
    import torch

    matrix = torch.ones(256, 256)
    agent_nice = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    workers: dict[int, int] = {}

    def threads() -> set[int]:
        return {int(tid) for tid in os.listdir("/proc/self/task")}

    def validate() -> dict[str, float]:
        torch.set_num_threads(2)  # this thread's team only (OpenMP settings are per thread)
        before = threads()
        for _ in range(20):
            matrix @ matrix
        me = threading.get_native_id()
        workers.update({t: os.getpriority(os.PRIO_PROCESS, t) for t in threads() - before - {me}})
        return {"accuracy": 0.5}

    kept = torch.get_num_threads()
    try:
        at_low_priority(validate)
    finally:
        torch.set_num_threads(kept)

    assert workers, "torch started no intra-op worker for the pass"
    assert set(workers.values()) == {min(agent_nice + 10, 19)}


_FAULTS_PER_BUFFER = """
import resource, sys
from pathlib import Path

def handoff() -> None:
    # Adapter-sized buffers made, written and freed, as a handoff's are (a copy, the bundle,
    # its message: alive together).
    copy = bytearray(b"x" * 300_000)
    bundle = bytes(copy)
    message = bytearray(bundle)
    del copy, bundle, message

def faults_per_handoff() -> float:
    # Minor page faults of this thread per handoff, once the first few have run.
    for _ in range(5):
        handoff()
    before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
    for _ in range(20):
        handoff()
    return (resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before) / 20

by_default = faults_per_handoff()
from site_agent.agent import SiteAgent
from site_agent.settings import SiteSettings

tmp = Path(sys.argv[1])
SiteAgent(SiteSettings(
    coordinator="localhost:1", ca_certificate=tmp / "ca.crt", certificate=tmp / "site.crt",
    private_key=tmp / "site.key", data_dir=tmp / "data", state_dir=tmp / "state",
))
print(by_default, faults_per_handoff())
"""


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or os.confstr("CS_GNU_LIBC_VERSION") is None,
    reason="the C allocator's settings are glibc's",
)
def test_a_site_agent_reuses_the_pages_of_freed_adapter_sized_buffers(tmp_path: Path) -> None:
    # In a process of its own: the allocator's settings are process-wide.
    done = subprocess.run(
        [sys.executable, "-c", _FAULTS_PER_BUFFER, str(tmp_path)],
        capture_output=True, text=True, check=True, env={**os.environ, "MALLOC_ARENA_MAX": "1"},
    )  # fmt: skip
    by_default, with_agent = map(float, done.stdout.split())
    assert by_default >= 50  # glibc gives each one's pages back, and faults them in again
    assert with_agent < 1  # the agent has it keep them: the next buffer reuses them
