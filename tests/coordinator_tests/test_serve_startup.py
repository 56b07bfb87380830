"""`serve` announces its gRPC port, then freezes everything start-up built out of the collector's
passes (it starts with the cyclic collector off, and is ready with it on); the full pass that
frees start-up's garbage waits until the first sites' hellos are over."""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import subprocess
import sys
import threading
import time
import weakref
from pathlib import Path

import pytest
from typer.testing import CliRunner

import coordinator.server as server
from coordinator.console.cli import app
from coordinator.server import freeze_start_up, serve, settle_heap, settle_when_quiet
from protocols.interpreter import CPYTHON_SWITCH_INTERVAL_SECONDS, SWITCH_INTERVAL_SECONDS
from tests.conftest import Pki
from tests.coordinator_tests.conftest import coordinator_settings, serving_process


def test_serve_freezes_the_start_up_heap_out_of_full_collections(pki: Pki, tmp_path: Path) -> None:
    settings = coordinator_settings(
        pki,
        tmp_path / "state",
        database_url=f"sqlite:///{tmp_path / 'ledger.sqlite3'}",
        port_file=tmp_path / "port",
        dashboard=False,
        shutdown_grace=0,
    )
    frozen: list[int] = []

    async def main() -> None:
        serving = asyncio.create_task(serve(settings))
        while not settings.port_file or not settings.port_file.exists():
            await asyncio.sleep(0.02)
        for _ in range(250):  # serve settles the heap right after its port file
            frozen.append(gc.get_freeze_count())
            if frozen[-1] or serving.done():
                break
            await asyncio.sleep(0.02)
        os.kill(os.getpid(), signal.SIGTERM)  # serve's own handler: a clean stop
        await asyncio.wait_for(serving, 30)

    gc.unfreeze()
    try:
        asyncio.run(main())
    finally:
        gc.unfreeze()
    assert frozen[-1] > 0


class _Node:
    other: object = None


def _garbage_cycle() -> weakref.ref[_Node]:
    """A reference cycle nothing else holds (garbage only a full pass frees), watched."""
    garbage = _Node()
    garbage.other = _Node()
    garbage.other.other = garbage  # type: ignore[attr-defined]
    return weakref.ref(garbage)


def test_settle_heap_collects_unfrozen_garbage_before_freezing_and_turns_the_collector_on() -> None:
    collecting = gc.isenabled()
    gc.disable()  # as `coordinator serve` starts
    left = _garbage_cycle()  # made after the last freeze (as a connection's, after ready)
    try:
        settle_heap()
        assert gc.isenabled()
        assert left() is None  # collected, not frozen for the process's lifetime
    finally:
        gc.unfreeze()
        if not collecting:
            gc.disable()


def test_ready_freezes_start_up_for_good_and_what_the_hellos_left_is_collected_once_they_are_over(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Quiet for 2 s (a loaded machine may hold the loop a few hundred ms between the hellos).
    monkeypatch.setattr(server, "SETTLE_QUIET_SECONDS", 2.0)
    monkeypatch.setattr(server, "SETTLE_LATEST_SECONDS", 60.0)

    collecting = gc.isenabled()
    gc.disable()  # as `coordinator serve` starts
    left = _garbage_cycle()
    connected = [0]
    seen: list[tuple[int, bool]] = []
    since_ready: list[weakref.ref[_Node]] = []

    async def hellos() -> None:
        settling = asyncio.create_task(settle_when_quiet(lambda: connected[0]))
        for count in (1, 2, 3):  # sites connecting one after the other
            await asyncio.sleep(0.05)
            connected[0] = count
            since_ready.append(_garbage_cycle())  # what a connection leaves
            seen.append((count, any(ref() is None for ref in (left, *since_ready))))
        await asyncio.wait_for(settling, 30)

    try:
        freeze_start_up()
        assert gc.isenabled() and gc.get_freeze_count() > 0
        assert left() is not None  # frozen, not walked: no full pass at ready
        gc.disable()  # from here on only the settling pass collects
        asyncio.run(hellos())
        assert seen == [(1, False), (2, False), (3, False)]  # nothing while sites came in
        # Start-up's garbage stays frozen (a pass over all start-up made would hold every call);
        # the hellos' is collected once they are over, and the collector is on again.
        assert left() is not None
        assert [ref() for ref in since_ready] == [None, None, None]
        assert gc.isenabled() and gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
        if not collecting:
            gc.disable()


_COLLECTIONS_PROBE = """
import gc, os, runpy, sys
port_file = sys.argv[1]
before_ready = []
def note(phase, info):
    # from `baton`'s command tree on (typer: the first import after `main` starts) until the
    # port file: the command-line parsing's imports, the serve command and its start
    if phase == "start" and "typer" in sys.modules and not os.path.exists(port_file):
        before_ready.append(info["generation"])
gc.callbacks.append(note)
sys.argv = ["baton", "coordinator", "serve", "--port-file", port_file, *sys.argv[2:]]
try:
    runpy.run_module("coordinator", run_name="__main__")
except SystemExit:
    pass
print("collections before ready:", len(before_ready), "collector on:", gc.isenabled())
"""


def test_serve_starts_with_the_collector_off_and_is_ready_with_it_on(
    pki: Pki, tmp_path: Path
) -> None:
    port_file = tmp_path / "port"
    state = tmp_path / "state"
    process = serving_process(
        [sys.executable, "-c", _COLLECTIONS_PROBE, str(port_file), "--port", "0",
         "--state-dir", str(state), "--no-dashboard", "--log-level", "WARNING",
         "--ca", str(pki.directory / "ca.crt"), "--cert", str(pki.directory / "coordinator.crt"),
         "--key", str(pki.directory / "coordinator.key")],
        port_file,
    )  # fmt: skip
    try:
        time.sleep(0.5)  # past its freeze_start_up
    finally:
        process.terminate()
        out, err = process.communicate(timeout=60)
    assert out.splitlines()[-1] == "collections before ready: 0 collector on: True", err[-2000:]


def test_a_refused_serve_leaves_an_in_process_caller_collecting(tmp_path: Path) -> None:
    assert gc.isenabled()
    refused = CliRunner().invoke(
        app, ["coordinator", "serve", "--config", str(tmp_path / "missing.toml")]
    )
    assert refused.exit_code == 2, refused.output
    assert gc.isenabled()


_READY_MODULES_PROBE = """
import os, runpy, sys, threading, time
port_file, names = sys.argv[1], sys.argv[2].split(",")
def at_ready():
    while not os.path.exists(port_file):
        time.sleep(0.001)
    print("imported at ready:", ",".join(n for n in names if n in list(sys.modules)), flush=True)
    os._exit(0)
threading.Thread(target=at_ready, daemon=True).start()
sys.argv = ["baton", "coordinator", "serve", "--port-file", port_file, *sys.argv[3:]]
runpy.run_module("coordinator", run_name="__main__")
"""


def test_serve_is_ready_without_the_packages_only_other_commands_need(
    pki: Pki, tmp_path: Path
) -> None:
    # filelock (the state claim is a plain flock) and the process pool of `baton ledger verify`'s
    # split walk: 2-3% of the CPU to ready, for nothing a serving coordinator does.
    # prometheus_client and its metric families (~50 ms): made once the first hellos are over.
    unwanted = ["filelock", "multiprocessing", "concurrent.futures.process", "prometheus_client"]
    out = subprocess.run(
        [sys.executable, "-c", _READY_MODULES_PROBE, str(tmp_path / "port"), ",".join(unwanted),
         "--port", "0", "--state-dir", str(tmp_path / "state"), "--log-level", "WARNING",
         "--dashboard-port", "0", "--ca", str(pki.directory / "ca.crt"),
         "--cert", str(pki.directory / "coordinator.crt"),
         "--key", str(pki.directory / "coordinator.key")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.stdout.splitlines()[-1:] == ["imported at ready: "], out.stderr[-2000:]


_READY_SWITCH_PROBE = """
import os, runpy, sys, threading, time
port_file, default = sys.argv[1], float(sys.argv[2])  # CPython's switch interval
def at_ready():
    while not os.path.exists(port_file):
        time.sleep(0.001)
    deadline = time.monotonic() + 30  # set right after the port file is written
    while sys.getswitchinterval() == default and time.monotonic() < deadline:
        time.sleep(0.01)
    print("switch interval at ready:", sys.getswitchinterval(), flush=True)
    os._exit(0)
threading.Thread(target=at_ready, daemon=True).start()
sys.argv = ["baton", "coordinator", "serve", "--port-file", port_file, *sys.argv[3:]]
runpy.run_module("coordinator", run_name="__main__")
"""


def test_a_serving_coordinator_switches_threads_quickly(pki: Pki, tmp_path: Path) -> None:
    # A hand back's commit runs on the ledger writer's thread while the event loop works: the
    # writer gets the interpreter within SWITCH_INTERVAL_SECONDS, not CPython's 5 ms.
    out = subprocess.run(
        [sys.executable, "-c", _READY_SWITCH_PROBE, str(tmp_path / "port"),
         str(CPYTHON_SWITCH_INTERVAL_SECONDS), "--port", "0",
         "--state-dir", str(tmp_path / "state"), "--log-level", "WARNING", "--no-dashboard",
         "--ca", str(pki.directory / "ca.crt"), "--cert", str(pki.directory / "coordinator.crt"),
         "--key", str(pki.directory / "coordinator.key")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    expected = f"switch interval at ready: {SWITCH_INTERVAL_SECONDS}"
    assert out.stdout.splitlines()[-1:] == [expected], out.stderr[-2000:]


def test_settle_when_quiet_runs_the_deferred_start_up_work_before_freezing_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(server, "SETTLE_LATEST_SECONDS", 0.2)
    made: list[list[object]] = []
    collecting = gc.isenabled()

    def deferred() -> None:
        made.append([object()])  # tracked by the collector, like the metric families

    try:
        asyncio.run(settle_when_quiet(lambda: 0, deferred))
        assert len(made) == 1
        assert gc.isenabled() and gc.get_freeze_count() > 0
        # frozen with the rest: no generation the collector walks holds it
        assert not any(found is made[0] for found in gc.get_objects())
    finally:
        gc.unfreeze()
        if not collecting:
            gc.disable()


def test_settle_when_quiet_warms_on_a_worker_thread_after_the_deferred_work(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(server, "SETTLE_LATEST_SECONDS", 0.2)
    order: list[tuple[str, int]] = []
    made: list[list[object]] = []
    collecting = gc.isenabled()

    def warm() -> None:
        order.append(("warm", threading.get_ident()))
        made.append([object()])  # what a first call leaves behind (a module's objects)

    async def main() -> int:
        await settle_when_quiet(lambda: 0, lambda: order.append(("deferred", 0)), warm)
        return threading.get_ident()

    try:
        loop_thread = asyncio.run(main())
        assert [step for step, _ in order] == ["deferred", "warm"]
        assert order[1][1] != loop_thread  # the loop kept serving meanwhile
        assert not any(found is made[0] for found in gc.get_objects())  # frozen with the rest
    finally:
        gc.unfreeze()
        if not collecting:
            gc.disable()
