"""The agent's background load: base models loaded ahead of a first hop change nothing in it,
and a base model that cannot load is one line and a `no-base-model` refusal."""

from __future__ import annotations

import errno
import gc
import logging
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch

from coordinator.plan import RunPlan
from protocols.hyperparameter_messages import to_message
from protocols.v1 import baton_pb2 as pb
from site_agent._load_ahead import (
    LowPriorityLoader,
    _cpu_core_library,
    ahead_niceness,
    collector_paused,
    open_torch_library,
)
from site_agent._synthetic import generate_site_records, write_site_dataset
from site_agent.agent import SiteAgent
from site_agent.hop_runner import at_low_priority
from site_agent.registry import RegisteredDataset, list_registered, register_dataset
from site_agent.settings import SiteSettings
from site_agent.task_checks import HopFailure
from site_agent.tasks import HopHyperparameters, TaskSpec, create_trainer, load_base_models

HOP = HopHyperparameters(learning_rate=1e-2, steps=3, batch_size=8, seed=5)


def _settings(tmp_path: Path, **settings: Any) -> SiteSettings:
    """A site's settings with its files under `tmp_path` (nothing connects to localhost:1)."""
    return SiteSettings(
        coordinator="localhost:1",
        ca_certificate=tmp_path / "ca.crt",
        certificate=tmp_path / "site.crt",
        private_key=tmp_path / "site.key",
        data_dir=tmp_path / "data",
        **settings,
    )


def _agent(
    tmp_path: Path, base_model: Path, **settings: Any
) -> tuple[SiteAgent, RegisteredDataset]:
    """An agent (never connected) with one registered text dataset."""
    source = write_site_dataset(tmp_path / "notes.jsonl", generate_site_records(0, 3, n=30, seed=2))
    dataset = register_dataset(tmp_path / "data", "notes", source, task_type="seq-classification")
    site = _settings(tmp_path, base_model_dir=base_model, device="cpu", **settings)
    return SiteAgent(site), dataset


def _logged_by_the_background_load(
    agent: SiteAgent, caplog: pytest.LogCaptureFixture, level: int
) -> list[str]:
    """Runs the agent's background load to its end; the lines it logged at ``level`` or above."""
    with caplog.at_level(level, logger="site_agent.agent"):
        agent.load_in_background().join(timeout=120)
    return [r.getMessage() for r in caplog.records if r.levelno >= level]


def _base_models(agent: SiteAgent) -> list[int]:
    """The label counts of the base models the agent's text trainer holds loaded."""
    return list(agent._trainers["seq-classification"]._base_models)  # type: ignore[attr-defined]


def test_a_base_model_loaded_ahead_trains_a_first_hop_exactly_like_one_loaded_by_the_hop(
    tiny_model_dir: Path, labels: tuple[str, ...], site_datasets: list[RegisteredDataset]
) -> None:
    spec = TaskSpec("seq-classification", labels=labels, options={"max_length": 24})
    at_hop = create_trainer("seq-classification", base_model_dir=tiny_model_dir, device="cpu")
    ahead = create_trainer("seq-classification", base_model_dir=tiny_model_dir, device="cpu")
    load_base_models(ahead, [labels, ("only-one",)])
    torch.manual_seed(1234)  # the load ahead ran on another thread, at another time

    expected = at_hop.run_hop(spec, site_datasets[0], HOP, None)
    actual = ahead.run_hop(spec, site_datasets[0], HOP, None)

    assert expected.metrics == actual.metrics
    assert expected.tensors.keys() == actual.tensors.keys()
    for name, tensor in expected.tensors.items():
        assert torch.equal(tensor, actual.tensors[name]), name


def test_the_background_load_loads_the_base_model_of_the_registered_datasets(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    agent, dataset = _agent(tmp_path, tiny_model_dir)
    assert agent._task_types_to_load() == ["seq-classification"]
    agent.load_in_background().join(timeout=120)

    # The base model for the registered label count is resident: a first hop only copies it.
    assert _base_models(agent) == [len(dataset.labels)]


def test_a_corrupt_base_model_is_one_log_line_and_hops_are_refused_with_no_base_model(
    tmp_path: Path,
    tiny_model_dir: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    broken = tmp_path / "broken-model"
    shutil.copytree(tiny_model_dir, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])  # truncated: the header is incomplete
    agent, _ = _agent(tmp_path, broken)

    errors = _logged_by_the_background_load(agent, caplog, logging.ERROR)
    assert len(errors) == 1, errors
    assert errors[0].startswith(f"this site cannot load its base model {broken}: ")
    assert errors[0].endswith("; its hops will be refused")
    assert "\n" not in errors[0] and "Traceback" not in errors[0]
    with pytest.raises(HopFailure) as refused:
        agent.trainer("seq-classification")
    assert refused.value.code == "no-base-model"
    assert "cannot load its base model" in str(refused.value)


def test_a_tabular_trainer_never_imports_transformers_or_peft() -> None:
    code = (
        "import sys\n"
        "from site_agent.tasks import create_trainer, load_base_models\n"
        "trainer = create_trainer('tabular', base_model_dir=None, device='cpu')\n"
        "load_base_models(trainer, [('0', '1')])\n"
        "assert 'torch' in sys.modules\n"
        "print(sorted(m for m in ('transformers', 'peft') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def _register_notes(
    agent: SiteAgent, tmp_path: Path, name: str, records: list[dict[str, str]]
) -> None:
    source = write_site_dataset(tmp_path / f"{name}.jsonl", records)
    register_dataset(agent.settings.data_dir, name, source, task_type="seq-classification")


def test_a_label_set_no_run_can_use_is_one_line_and_the_trainer_still_loads(
    tmp_path: Path,
    tiny_model_dir: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    agent, dataset = _agent(tmp_path, tiny_model_dir)
    registered = list_registered(agent.settings.data_dir)
    # A registration today's loaders refuse (written by an older version or by hand).
    blank = {**registered[0], "name": "blank", "label_counts": {"train": {"": 3, "a": 4}}}
    monkeypatch.setattr("site_agent.agent.list_registered", lambda data_dir: [blank, *registered])

    problems = _logged_by_the_background_load(agent, caplog, logging.WARNING)
    assert problems == [
        "dataset blank: its base model is not loaded ahead: "
        "need at least two non-empty label names, got ('', 'a')"
    ]
    trainer = agent.trainer("seq-classification")  # cached: no refusal, no second load
    assert agent._trainers["seq-classification"] is trainer
    assert _base_models(agent) == [len(dataset.labels)]


def test_the_background_load_loads_one_base_model_for_the_label_count_most_datasets_share(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    agent, dataset = _agent(tmp_path, tiny_model_dir)  # three labels
    two = [r for r in generate_site_records(1, 3, n=60, seed=4) if r["label"] != dataset.labels[0]]
    _register_notes(agent, tmp_path, "two-a", two)
    _register_notes(agent, tmp_path, "two-b", two[::-1])

    agent.load_in_background().join(timeout=120)

    assert _base_models(agent) == [2]


def test_running_out_of_memory_loading_ahead_is_one_line_and_keeps_the_trainer(
    tmp_path: Path,
    tiny_model_dir: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from site_agent.tasks._sequence_classification import SequenceClassificationTrainer

    def out_of_memory(self: object, spec: TaskSpec) -> None:
        raise MemoryError

    monkeypatch.setattr(SequenceClassificationTrainer, "load_base_model", out_of_memory)
    agent, _ = _agent(tmp_path, tiny_model_dir)

    problems = _logged_by_the_background_load(agent, caplog, logging.WARNING)
    assert problems == [
        "could not load the seq-classification base model ahead (out of memory); "
        "its first hop loads it"
    ]
    assert isinstance(agent.trainer("seq-classification"), SequenceClassificationTrainer)


def test_a_base_model_loading_does_not_hold_up_the_tabular_trainer(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    agent, _ = _agent(tmp_path, tiny_model_dir)
    with agent._trainers_lock["seq-classification"]:  # a base model loading
        assert agent.trainer("tabular") is agent._trainers["tabular"]


def _imports_after_the_background_load(tmp_path: Path, imports: str, call: str) -> int:
    """How many modules ``call`` imports in a fresh process once an agent has built its
    tabular trainer (what the background load does); ``imports`` run before all that."""
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        f"{imports}\n"
        "from site_agent.agent import SiteAgent\n"
        "from site_agent.settings import SiteSettings\n"
        f"tmp = Path({str(tmp_path)!r})\n"
        "settings = SiteSettings(coordinator='localhost:1', ca_certificate=tmp / 'ca.crt',\n"
        "    certificate=tmp / 'site.crt', private_key=tmp / 'site.key', data_dir=tmp / 'data',\n"
        "    device='cpu')\n"
        "agent = SiteAgent(settings)\n"
        "agent.trainer('tabular')\n"
        "before = set(sys.modules)\n"
        f"{call}\n"
        "print(len(set(sys.modules) - before))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(done.stdout)


def test_after_the_background_load_a_hops_first_optimizer_step_imports_nothing(
    tmp_path: Path,
) -> None:
    """A hop's first optimizer step (torch's functional AdamW) loads nothing in the handoff:
    the site's background load has stepped one already."""
    optimizer = (
        "layer = torch.nn.Linear(3, 1)\n"
        "layer(torch.ones(2, 3)).sum().backward()\n"
        "AdamW(layer.parameters(), lr=0.1).step()"
    )
    imports = "import torch\nfrom site_agent.tasks._adamw import AdamW"
    assert _imports_after_the_background_load(tmp_path, imports, optimizer) == 0


def test_after_the_background_load_a_hops_first_custody_signature_imports_nothing(
    tmp_path: Path,
) -> None:
    """The custody signature of a first hand-back loads the signing code (tens of ms in a
    first visit's handoff): the background load pays it instead."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )  # fmt: skip
    (tmp_path / "site.key").write_bytes(key)
    signature = "sign_digest(settings.private_key.read_bytes(), 'ab' * 32)"
    imports = "from protocols.signing import sign_digest"
    assert _imports_after_the_background_load(tmp_path, imports, signature) == 0


def _prepare_task(labels: tuple[str, ...], sites: list[str]) -> tuple[pb.HopTask, str]:
    """The "you are next" task of a one-cycle run's second hop, and its bundle's sha256."""
    plan = RunPlan.model_validate({
        "name": "next", "dataset": "notes", "labels": list(labels), "sites": sites, "cycles": 1,
        "defaults": {"steps": 3, "batch_size": 4, "learning_rate": 1e-3},
        "lora": {"r": 4, "alpha": 8, "target_modules": ["query", "value"]},
    })  # fmt: skip
    task = pb.HopTask(
        run_id="run1", hop_id="hop1", hop_index=1, task_type="seq-classification",
        dataset="notes", labels=list(labels),
        lora=pb.LoraConfig(r=4, alpha=8, dropout=0.0, target_modules=["query", "value"]),
        hyperparameters=to_message(plan.expanded_hops()[1][1]),
        task_options_json="{}", approval_bundle_json=plan.approval_bundle().canonical_json(),
    )  # fmt: skip
    return task, plan.approval_bundle().sha256


def test_a_when_next_site_loads_nothing_after_its_hello_until_it_is_told_it_is_next(
    tmp_path: Path, tiny_model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    agent, dataset = _agent(tmp_path, tiny_model_dir, preload="when-next")

    caplog.clear()  # the registration's own line, where an earlier test left INFO on
    with caplog.at_level(logging.INFO, logger="site_agent.agent"):
        assert agent._said_hello() is None
    assert caplog.messages == [
        "torch and the base model load when this site is next (preload = when-next)"
    ]
    assert agent._trainers == {}
    assert "preload" not in {thread.name for thread in threading.enumerate()}

    task, bundle = _prepare_task(dataset.labels, ["site-a", "site-b"])
    agent.approvals.approve([bundle])
    agent._load_ahead(pb.PrepareAhead(hop=task, hops_ahead=1))  # "in the schedule": ignored
    assert agent._loads_ahead.idle(timeout=120)
    assert agent._trainers == {}
    agent._prepare(task)  # the coordinator says this site is next

    assert _base_models(agent) == [len(dataset.labels)]
    assert agent._trainers["seq-classification"]._prepared is not None  # type: ignore[attr-defined]


def test_an_eager_site_starts_its_background_load_once_after_its_first_hello(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    agent, dataset = _agent(tmp_path, tiny_model_dir, preload="eager")
    assert agent._trainers == {}  # nothing loads before the hello

    thread = agent._said_hello()
    assert thread is not None
    thread.join(timeout=120)
    assert agent._said_hello() is None  # a reconnect's hello starts no second load

    assert _base_models(agent) == [len(dataset.labels)]


@pytest.mark.parametrize(
    ("given", "expected"),
    [(True, "eager"), (False, "when-next"), ("true", "eager"), ("false", "when-next"),
     ("eager", "eager"), ("when-next", "when-next"), ("when-scheduled", "when-scheduled")],
)  # fmt: skip
def test_preload_takes_its_three_modes_and_the_booleans_it_was_before(
    tmp_path: Path, given: object, expected: str
) -> None:
    assert _settings(tmp_path, preload=given).preload == expected


def test_an_unknown_preload_mode_is_one_clear_line(tmp_path: Path) -> None:
    config = tmp_path / "site.toml"
    config.write_text('preload = "lazy"\n')
    done = subprocess.run(
        [sys.executable, "-m", "site_agent", "serve", "--config", str(config),
         "--coordinator", "localhost:1", "--ca", "ca.crt", "--cert", "s.crt", "--key", "s.key",
         "--data-dir", str(tmp_path / "data")],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("error: bad site settings: preload: ")
    assert "'eager', 'when-scheduled' or 'when-next'" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_when_scheduled_site_loads_ahead_only_for_a_run_it_approved(
    tmp_path: Path, tiny_model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    agent, dataset = _agent(tmp_path, tiny_model_dir)
    assert agent.settings.preload == "when-scheduled"  # the default
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="site_agent.agent"):
        assert agent._said_hello() is None  # nothing loads for runs this site is not in
    assert caplog.messages == [
        "torch and the base model load when a run this site is in starts (preload = when-scheduled)"
    ]
    task, bundle = _prepare_task(dataset.labels, ["site-a", "site-b"])

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="site_agent.agent"):
        agent._load_ahead(pb.PrepareAhead(hop=task, hops_ahead=2))  # not approved here
        assert agent._loads_ahead.idle(timeout=120)
    assert agent._trainers == {}
    assert len(caplog.messages) == 1
    assert caplog.messages[0].startswith(
        f"not loading ahead of hop 1: run bundle {bundle} is not approved at this site; "
    )

    agent.approvals.approve([bundle])
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="site_agent.agent"):
        agent._load_ahead(pb.PrepareAhead(hop=task, hops_ahead=2))
        assert agent._loads_ahead.idle(timeout=120)
    assert _base_models(agent) == [len(dataset.labels)]
    assert caplog.messages[-1] == "loaded ahead of hop 1 of run run1 (2 hops ahead)"


def _nice(native_id: int) -> int:
    return os.getpriority(os.PRIO_PROCESS, native_id)


def _can_raise_priority() -> bool:
    """Whether this process may lower a thread's nice value back (root or RLIMIT_NICE)."""
    outcome: list[bool] = []

    def probe() -> None:
        me = threading.get_native_id()
        base = _nice(me)
        os.setpriority(os.PRIO_PROCESS, me, min(19, base + 1))
        try:
            os.setpriority(os.PRIO_PROCESS, me, base)
            outcome.append(True)
        except OSError:
            outcome.append(False)

    thread = threading.Thread(target=probe)
    thread.start()
    thread.join()
    return outcome[0]


_LINUX_ONLY = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="a thread's nice value: Linux"
)


class _NicedLoads:
    """A `LowPriorityLoader` whose loads note the nice value they run at, in order."""

    def __init__(self) -> None:
        self.loader = LowPriorityLoader()
        self.base = _nice(os.getpid())  # the agent's nice value
        self.seen: list[int] = []

    def _note(self) -> None:
        self.seen.append(_nice(threading.get_native_id()))

    def load(self, hops_ahead: int) -> None:
        """Runs one load ahead of a first visit ``hops_ahead`` hops ahead, to its end."""
        self.loader.submit(self._note, ahead_niceness(hops_ahead))
        assert self.loader.idle(timeout=120)

    def hurried_load(self, hops_ahead: int) -> None:
        """Runs one load hurried while it runs (the site is told it is next, or given its
        hop): it notes its nice value before the hurry and after."""
        hold, running = threading.Event(), threading.Event()

        def load() -> None:
            self._note()
            running.set()
            assert hold.wait(timeout=120)
            self._note()

        self.loader.submit(load, ahead_niceness(hops_ahead))
        assert running.wait(timeout=120)
        self.loader.hurry()
        hold.set()
        assert self.loader.idle(timeout=120)


@pytest.fixture
def loads() -> Iterator[_NicedLoads]:
    niced = _NicedLoads()
    yield niced
    niced.loader.stop()


@_LINUX_ONLY
def test_loads_ahead_run_at_a_lower_priority_the_further_ahead_until_hurried(
    loads: _NicedLoads,
) -> None:
    if not _can_raise_priority():  # see ..._where_it_may_not_raise_a_priority_back
        pytest.skip("this process may not raise a thread's priority back")
    loads.hurried_load(1)  # told it is next (or given its hop): back at the agent's priority
    loads.load(3)
    loads.load(1)

    base, seen = loads.base, loads.seen
    assert ahead_niceness(1) < ahead_niceness(2) < ahead_niceness(3) <= ahead_niceness(9) < 10
    assert seen[0] == min(19, base + ahead_niceness(1))
    assert seen[1] == base
    # Once the hurried load is done, the next run's loads are low again, each from the
    # agent's nice value (not from the last load's).
    assert seen[2:] == [min(19, base + ahead_niceness(3)), min(19, base + ahead_niceness(1))]


@_LINUX_ONLY
def test_loads_ahead_run_at_the_agents_priority_where_it_may_not_raise_a_priority_back(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, loads: _NicedLoads
) -> None:
    """A site's service user (no CAP_SYS_NICE, no LimitNICE) could lower a load but never
    hurry it: a hop would wait on a load finishing at nice +3..+9."""
    if loads.base >= 19:  # e.g. the suite run under `nice -n 19`
        pytest.skip("the agent runs at nice 19: no load is lowered, so none needs raising back")
    set_priority = os.setpriority

    def unprivileged(which: int, who: int, priority: int) -> None:
        if priority < os.getpriority(which, who):
            raise PermissionError(errno.EACCES, "Permission denied")
        set_priority(which, who, priority)

    monkeypatch.setattr("site_agent._load_ahead.os.setpriority", unprivileged)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="site_agent.agent"):
        loads.hurried_load(1)
        loads.load(3)

    assert loads.seen == [loads.base] * 3  # never lowered: before the hurry, after, and next
    assert caplog.messages == [
        "loads ahead run at the agent's priority: this process may not raise a thread's "
        "priority back (needs CAP_SYS_NICE or LimitNICE)"
    ]


@_LINUX_ONLY
def test_a_hurry_with_no_load_ahead_leaves_the_next_load_low(loads: _NicedLoads) -> None:
    """Every hop and every "you are next" hurries: the next load ahead (another run's, maybe
    hours later) still runs low."""
    if not _can_raise_priority():
        pytest.skip("this process may not raise a thread's priority back")
    loads.loader.hurry()  # nothing queued or running
    loads.load(2)
    loads.loader.hurry()  # and once the loader's thread is idle
    loads.load(2)

    assert loads.seen == [min(19, loads.base + ahead_niceness(2))] * 2


_helper_of_thread = threading.local()


def _helper_nice() -> int:
    """The nice value of a helper thread the calling thread creates once and keeps, as torch's
    intra-op workers are (one team per thread, made at its first parallel operation)."""
    helper = getattr(_helper_of_thread, "nice", None)
    if helper is None:
        seen: list[int] = []
        started = threading.Thread(target=lambda: seen.append(_nice(threading.get_native_id())))
        started.start()
        started.join()
        helper = _helper_of_thread.nice = seen[0]
    return helper


@_LINUX_ONLY
def test_each_load_ahead_starts_its_helper_threads_at_its_own_priority(
    loads: _NicedLoads,
) -> None:
    """A helper a load's thread made for an earlier load (at +9) would run a later, nearer
    load (+3) at the earlier one's priority: each load has a thread of its own."""
    helpers: list[int] = []
    for hops_ahead in (3, 1):
        loads.loader.submit(lambda: helpers.append(_helper_nice()), ahead_niceness(hops_ahead))
        assert loads.loader.idle(timeout=120)

    base = loads.base
    assert helpers == [min(19, base + ahead_niceness(3)), min(19, base + ahead_niceness(1))]


@_LINUX_ONLY
def test_a_hurry_puts_a_loads_helper_threads_back_at_the_agents_priority(
    loads: _NicedLoads,
) -> None:
    """transformers loads a model's tensors on a pool of threads the load starts: a hurry
    that raised only the load's own thread would leave the copying low."""
    if not _can_raise_priority():
        pytest.skip("this process may not raise a thread's priority back")
    hold, running = threading.Event(), threading.Event()
    seen: list[int] = []

    def helper() -> None:
        seen.append(_nice(threading.get_native_id()))
        running.set()
        assert hold.wait(timeout=120)
        seen.append(_nice(threading.get_native_id()))

    def load() -> None:
        pool = threading.Thread(target=helper)
        pool.start()
        pool.join()

    loads.loader.submit(load, ahead_niceness(1))
    assert running.wait(timeout=120)
    loads.loader.hurry()
    hold.set()
    assert loads.loader.idle(timeout=120)

    assert seen == [min(19, loads.base + ahead_niceness(1)), loads.base]


@_LINUX_ONLY
def test_torch_intra_op_workers_of_a_load_ahead_run_at_its_priority(loads: _NicedLoads) -> None:
    """torch's OpenMP workers belong to the thread that first runs a parallel operation and
    are created by it: a load's workers are lowered with it, whatever ran before."""
    workers: list[dict[int, int]] = []
    matrix = torch.ones(256, 256)

    def load() -> None:
        torch.set_num_threads(2)  # this thread's team only (OpenMP settings are per thread)
        before = set(_threads())
        for _ in range(20):
            matrix @ matrix
        me = threading.get_native_id()
        workers.append({tid: _nice(tid) for tid in _threads() if tid not in before | {me}})

    kept = torch.get_num_threads()
    try:
        for hops_ahead in (3, 1):
            loads.loader.submit(load, ahead_niceness(hops_ahead))
            assert loads.loader.idle(timeout=120)
    finally:
        torch.set_num_threads(kept)

    base = loads.base
    assert all(workers), "torch started no intra-op worker for a load"
    assert set(workers[0].values()) == {min(19, base + ahead_niceness(3))}
    assert set(workers[1].values()) == {min(19, base + ahead_niceness(1))}


def _threads() -> list[int]:
    return [int(tid) for tid in os.listdir("/proc/self/task")]


class _Pool:
    """A helper thread a load starts at a library's first use and leaves running for the
    whole process, as the tokenizers' Rust pool is: it runs work handed to it by any thread
    later, and notes its nice value as it does."""

    def __init__(self) -> None:
        self._work: list[threading.Event] = []
        self._wake = threading.Condition()
        self.seen: list[int] = []
        threading.Thread(target=self._loop, daemon=True).start()

    def _loop(self) -> None:
        while True:
            with self._wake:
                self._wake.wait_for(lambda: self._work)
                done = self._work.pop(0)
            self.seen.append(_nice(threading.get_native_id()))
            done.set()

    def run(self) -> None:
        done = threading.Event()
        with self._wake:
            self._work.append(done)
            self._wake.notify()
        assert done.wait(timeout=120)


@_LINUX_ONLY
@pytest.mark.parametrize("hops_ahead", [2, 3])
def test_a_pool_a_load_ahead_starts_runs_the_sites_later_work_at_the_agents_priority(
    loads: _NicedLoads, hops_ahead: int
) -> None:
    """A load ahead that ends before the site is told it is next (nothing hurries it) may
    leave a process-wide pool behind (tokenizers' encoding threads): every later hop's
    encoding runs on it, and must not run at the load's +6/+9 for the rest of the process."""
    if not _can_raise_priority():
        pytest.skip("this process may not raise a thread's priority back")
    pools: list[_Pool] = []

    def load() -> None:
        pool = _Pool()
        pool.run()  # the load's own use of it, at the load's priority
        pools.append(pool)

    loads.loader.submit(load, ahead_niceness(hops_ahead))
    assert loads.loader.idle(timeout=120)
    pools[0].run()  # a later hop's work, handed over from the agent's threads

    base = loads.base
    assert pools[0].seen == [min(19, base + ahead_niceness(hops_ahead)), base]


@_LINUX_ONLY
def test_a_validation_pass_lowered_during_a_load_ahead_stays_low_after_it(
    loads: _NicedLoads,
) -> None:
    """Only what the load left at its own priority goes back up: a validation pass that
    started meanwhile keeps yielding to the next site's start."""
    if not _can_raise_priority():
        pytest.skip("this process may not raise a thread's priority back")
    loading, validating, load_done = threading.Event(), threading.Event(), threading.Event()
    seen: list[int] = []

    def load() -> None:
        loading.set()
        assert validating.wait(timeout=120)

    def validation() -> None:
        validating.set()
        assert load_done.wait(timeout=120)
        seen.append(_nice(threading.get_native_id()))

    loads.loader.submit(load, ahead_niceness(3))
    assert loading.wait(timeout=120)
    # Started by the agent's task thread, as a committed hop's pass is, while the load runs.
    passing = threading.Thread(target=at_low_priority, args=(validation,))
    passing.start()
    assert loads.loader.idle(timeout=120)
    load_done.set()
    passing.join(timeout=120)

    assert seen == [min(19, loads.base + 10)]


class _Unavailable(grpc.RpcError):
    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return "failed to connect to all addresses; last error: connection refused"


@pytest.mark.parametrize("coordinator_up", [True, False])
def test_an_eager_site_starts_loading_only_after_its_first_hello_answered_or_not(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch, coordinator_up: bool
) -> None:
    """The load (a few CPU seconds of imports) never slows the hello down, and a coordinator
    that is away does not keep an eager site from loading."""
    agent, _ = _agent(tmp_path, tiny_model_dir, preload="eager")
    events: list[str] = []
    monkeypatch.setattr(agent, "_check_certificate", lambda: None)
    monkeypatch.setattr(agent, "load_in_background", lambda: events.append("load"))

    def serve_once() -> None:  # the hello, then (as _serve_once does) what follows it
        events.append("hello")
        if len(events) > 2:
            agent.stop()
            return
        if not coordinator_up:
            raise _Unavailable()
        agent._said_hello()

    monkeypatch.setattr(agent, "_serve_once", serve_once)
    monkeypatch.setattr(agent.backoff, "failed", lambda: 0.0)
    agent.run()

    assert events == ["hello", "load", "hello"]


def test_a_loaded_trainer_leaves_the_heap_out_of_full_collections(
    tmp_path: Path, tiny_model_dir: Path, counted_collector: Any
) -> None:
    agent, _ = _agent(tmp_path, tiny_model_dir)
    gc.unfreeze()
    agent.load_in_background().join(timeout=120)
    assert "seq-classification" in agent._trainers
    # torch, transformers and the base model stay for the process's life: a full collection
    # (one per hop or so, wherever it falls) no longer walks them.
    assert gc.get_freeze_count() > 0
    # Frozen without a full pass first: the load ran with the collector paused and what it made
    # is alive, so the pass would find nothing and hold the interpreter lock throughout (for
    # seconds on a load ahead's low-priority thread when the host is busy).
    assert counted_collector.calls == ["freeze"]


def test_a_load_ahead_runs_with_the_collector_paused_and_leaves_it_on() -> None:
    assert gc.isenabled()
    loader = LowPriorityLoader()
    seen: list[bool] = []
    try:
        loader.submit(lambda: seen.append(gc.isenabled()), ahead_niceness(1))
        assert loader.idle(timeout=120)
    finally:
        loader.stop()
    assert seen == [False]  # torch's and the model's objects: no collector passes over them
    assert gc.isenabled()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="opened ahead on Linux only")
def test_a_trainer_load_finds_torchs_core_library_open_when_it_imports_torch(
    tmp_path: Path,
) -> None:
    # Opened by ctypes, outside the interpreter lock, instead of inside the import of torch._C.
    code = (
        "import importlib.abc, sys\n"
        "from pathlib import Path\n"
        "from site_agent.agent import SiteAgent\n"
        "from site_agent.settings import SiteSettings\n"
        "tmp = Path(sys.argv[1])\n"
        "agent = SiteAgent(SiteSettings(coordinator='localhost:1', data_dir=tmp / 'data',\n"
        "    ca_certificate=tmp / 'ca.crt', certificate=tmp / 'site.crt',\n"
        "    private_key=tmp / 'site.key'))\n"
        "seen = ['torch' in sys.modules]\n"
        "class Importing(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'torch._C':  # torch's extension module: it opens the library\n"
        "            with open('/proc/self/maps') as maps:\n"
        "                seen.append('libtorch_cpu.so' in maps.read())\n"
        "sys.meta_path.insert(0, Importing())\n"
        "agent.trainer('tabular')\n"
        "print(seen)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    assert done.stdout.strip() == "[False, True]"  # not imported before; open at its import


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="opened ahead on Linux only")
def test_torchs_core_library_opens_with_the_interpreter_lock_released(tmp_path: Path) -> None:
    # A named pipe stands in for the library: the open blocks in dlopen until another thread
    # of the process writes to the pipe, which it can only do if the lock was released.
    code = (
        "import os, sys, threading\n"
        "from site_agent._load_ahead import _dlopen_unlocked\n"
        "pipe = sys.argv[1]\n"
        "os.mkfifo(pipe)\n"
        "opening = threading.Thread(target=_dlopen_unlocked, args=(pipe,))\n"
        "opening.start()\n"
        "with open(pipe, 'wb') as library:\n"
        "    library.write(b'not a shared library')\n"
        "opening.join()\n"
        "print('done')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "libtorch_cpu.so")],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,  # held lock: the process waits for good
    )
    assert done.stdout.strip() == "done"


def test_opening_torchs_core_library_ahead_is_skipped_once_torch_is_imported(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    opened: list[str] = []
    monkeypatch.setattr("site_agent._load_ahead._dlopen_unlocked", opened.append)
    open_torch_library()  # torch is imported here: the import opened it
    assert opened == []  # before torch: test_a_trainer_load_finds_torchs_core_library_open...


def test_only_a_cpu_build_of_torch_has_its_core_library_opened_ahead(tmp_path: Path) -> None:
    # A CUDA or ROCm build opens its GPU libraries (CUPTI...) before its core library.
    builds = {"cpu": ["libtorch_cpu.so"], "cuda": ["libtorch_cpu.so", "libtorch_cuda.so"],
              "rocm": ["libtorch_cpu.so", "libtorch_hip.so"], "none": []}  # fmt: skip
    for build, libraries in builds.items():
        (tmp_path / build / "lib").mkdir(parents=True)
        for library in libraries:
            (tmp_path / build / "lib" / library).touch()
    found = {build: _cpu_core_library([str(tmp_path / build)]) for build in builds}
    assert found == {
        "cpu": str(tmp_path / "cpu" / "lib" / "libtorch_cpu.so"),
        "cuda": None,
        "rocm": None,
        "none": None,
    }
    assert _cpu_core_library([str(tmp_path / "none"), str(tmp_path / "cpu")]) == found["cpu"]


def test_a_trainer_loads_with_the_collector_paused(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    agent, _ = _agent(tmp_path, tiny_model_dir)
    load = agent._load_trainer
    seen: list[bool] = []

    def noted(task_type: str) -> Any:
        seen.append(gc.isenabled())
        return load(task_type)

    monkeypatch.setattr(agent, "_load_trainer", noted)
    agent.trainer("seq-classification")
    assert seen == [False]
    assert gc.isenabled()


def test_collector_pauses_nest_and_put_the_collector_back_as_it_was() -> None:
    assert gc.isenabled()
    with collector_paused():
        with collector_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()  # another load still runs
    assert gc.isenabled()
    gc.disable()  # someone else's pause (a hop's hand back) outlives this one
    try:
        with collector_paused():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_a_refused_site_serve_leaves_an_in_process_caller_collecting(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from site_agent.cli import app

    refused = CliRunner().invoke(app, ["serve", "--config", str(tmp_path / "missing.toml")])
    assert refused.exit_code == 2, refused.output
    assert gc.isenabled()
