"""Cold cluster: a coordinator and 4 sites started from nothing to the first training step.

Starts ``baton coordinator serve`` and, right after it (as deploy/compose.yaml's
``service_started`` does; ``--sites-after-ready``: once it serves, as ``baton demo`` does), one
``baton-site serve`` per site with the packaged all-MiniLM-L6-v2 and the demo's LoRA run
(``--threads 2``); then, as soon as every site has connected, starts a one-cycle run and stops
once its first hop has committed. Per start it reports, from ``t0`` (just before the
coordinator is spawned):

* coordinator ready (its port file written) and each site's hello (its ``connected to
  coordinator`` log line) and base model loaded (``trainer loaded`` log line);
* all sites connected and the run started (admin API);
* the first hop's arrival at its site (its ``hop 0 of run ...: starting`` log line) and that
  site's CPU seconds then: what it had loaded ahead (``preload``) shows there;
* the first training step: the first hop's ``train_started_at_ns`` in the ledger (the site's
  clock just before its first optimizer step);
* CPU seconds (user + system) of every process up to that instant, and the load average.

On a 2-core machine four sites that import torch, transformers and peft at the same moment
share two cores: the CPU columns show that floor (the sum of all processes' CPU seconds up to
the first step, divided by the number of cores). With the default ``preload = "when-scheduled"``
only the first hop's site (given the hop) loads before the first step; at that step the second
site is told it is next and the others that they are in the schedule (they load at a low CPU
priority). ``--site-arg=--preload=when-next``: the later sites load only once told they are next;
``--site-arg=--preload=eager``: all sites load right after their hello.

The sites run as deployed: in a venv holding only `baton-fl[site]`'s dependencies (built once
under ``--cache-dir``, symlinks to this venv's packages: see ``_site_venv``), not in the
benchmark's venv, whose dev and demo extras (scipy, trio...) a site's first load would import
(~0.45 s CPU); ``--sites-in-this-venv``: in this venv, as sessions up to 14 measured.

    nice -n 19 .venv/bin/python benchmarks/cold_cluster.py --starts 3
    nice -n 19 .venv/bin/python benchmarks/cold_cluster.py --starts 3 --name cold_cluster_eager \
        --site-arg=--preload=eager
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from _harness import free_port, project_bytecode  # noqa: E402
from _site_venv import site_python  # noqa: E402

from coordinator.console.admin import AdminClient  # noqa: E402
from coordinator.console.demo import DATASET, packaged_minilm, prepare_pki, write_site_data  # noqa: E402
from coordinator.console.processes import Cluster  # noqa: E402
from coordinator.plan import RunPlan  # noqa: E402
from protocols.transport import TlsFiles  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
SITES = ("hospital-a", "hospital-b", "hospital-c", "hospital-d")
HELLO = "connected to coordinator"
LOADED = "trainer loaded"
FIRST_HOP = "hop 0 of run"  # the first hop's site's "hop 0 of run ...: starting" line
CACHE = ROOT / "benchmarks" / ".peers"  # git-ignored; handoff.py's peer venvs live there too


class SiteVenvCluster(Cluster):
    """A cluster whose sites run on another interpreter (the `baton-fl[site]` venv)."""

    def __init__(self, log_dir: Path, site_interpreter: Path, env: dict[str, str]) -> None:
        super().__init__(log_dir=log_dir, env=env)
        self.site_interpreter = site_interpreter

    def _spawn(self, name: str, args: Sequence[str]) -> Any:
        if name not in SITES:
            return super()._spawn(name, args)
        real = sys.executable
        sys.executable = str(self.site_interpreter)  # what Cluster._spawn starts
        try:
            return super()._spawn(name, args)
        finally:
            sys.executable = real


class CpuSampler:
    """CPU seconds of some processes every 50 ms, kept with the wall time they were read at."""

    def __init__(self) -> None:
        self.pids: dict[str, int] = {}
        self.samples: list[tuple[float, dict[str, float]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._processes: dict[int, psutil.Process] = {}

    def __enter__(self) -> CpuSampler:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def sample(self) -> None:
        now = time.time()
        cpu: dict[str, float] = {}
        for name, pid in list(self.pids.items()):
            try:
                process = self._processes.setdefault(pid, psutil.Process(pid))
                times = process.cpu_times()
            except psutil.Error:
                continue
            cpu[name] = times.user + times.system
        self.samples.append((now, cpu))

    def at(self, instant: float) -> dict[str, float]:
        """The last sample taken at or before ``instant``."""
        before = [cpu for at, cpu in self.samples if at <= instant]
        return before[-1] if before else {}

    def _loop(self) -> None:
        while not self._stop.wait(0.05):
            self.sample()


def _log_instant(log: Path, needle: str) -> float | None:
    """Wall time of the first JSON log line of a site whose message contains ``needle``."""
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return None
    for line in lines:
        if not line.startswith("{"):
            continue
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if needle in str(entry.get("message", "")):
            return datetime.fromisoformat(entry["time"]).timestamp()
    return None


def _plan(labels: list[str], steps: int) -> RunPlan:
    return RunPlan.model_validate({
        "name": "cold-cluster", "dataset": DATASET, "labels": labels, "sites": list(SITES),
        "cycles": 1, "defaults": {"steps": steps, "batch_size": 16, "learning_rate": 2e-3},
        "lora": {"r": 8, "alpha": 16, "target_modules": ["query", "value"]},
    })  # fmt: skip


def cold_start(
    work: Path,
    steps: int,
    extra_site_args: Sequence[str],
    keep_logs: Path | None = None,
    sites_after_ready: bool = False,
    site_interpreter: Path | None = None,
) -> dict[str, Any]:
    """One cold start of a coordinator and the sites; figures relative to ``t0``; the
    processes' logs copied under ``keep_logs`` if given. The sites are spawned right after
    the coordinator (compose's ``service_started``), or once it serves (``sites_after_ready``,
    as ``baton demo`` does)."""
    labels: list[str] = []
    for index, site in enumerate(SITES):
        labels = write_site_data(work / site, index, len(SITES))
    plan = _plan(labels, steps)
    pki = work / "pki"
    prepare_pki(pki, list(SITES))
    model = packaged_minilm()
    if site_interpreter is None:
        cluster = Cluster(log_dir=work / "logs")
    else:  # the project from PYTHONPATH: the site venv holds its dependencies only
        checkout = os.environ.get("PYTHONPATH", str(ROOT))
        cluster = SiteVenvCluster(work / "logs", site_interpreter, {"PYTHONPATH": checkout})
    load_before = os.getloadavg()
    uptime_before = _uptime()
    with CpuSampler() as cpu, cluster.running():
        port = 0 if sites_after_ready else free_port()
        t0 = time.time()
        port = cluster.start_coordinator(  # a generous timeout: the machine may be loaded
            state_dir=work / "coordinator", pki_dir=pki, port_file=work / "port", timeout=600,
            port=port, wait=sites_after_ready,
        )  # fmt: skip
        coordinator_ready = time.time()
        cpu.pids["coordinator"] = cluster.processes[0].process.pid
        spawned: dict[str, float] = {}
        for site in SITES:
            spawned[site] = time.time()
            managed = cluster.start_site(
                site, coordinator=f"localhost:{port}", pki_dir=pki, data_dir=work / site,
                base_model_dir=model, threads=2, approve=[plan.approval_bundle().sha256],
                extra=["--log-format", "json", *extra_site_args],
            )  # fmt: skip
            cpu.pids[site] = managed.process.pid
        if not sites_after_ready:
            cluster.await_coordinator(work / "port", timeout=600)
            coordinator_ready = time.time()
        tls = TlsFiles(pki / "ca.crt", pki / "admin.crt", pki / "admin.key")
        with AdminClient(f"localhost:{port}", tls) as admin:
            deadline = time.monotonic() + 300
            while {s.name for s in admin.sites() if s.connected} != set(SITES):
                if time.monotonic() > deadline:
                    raise TimeoutError("sites did not connect within 300 s")
                cluster.check_alive()
                time.sleep(0.02)
            connected = time.time()
            run_id = admin.start_run(plan)
            run_started = time.time()
            # Until the first hop commits (its train_started_at_ns is then in the ledger): the
            # rest of the run is not what this measures.
            while True:
                run = admin.run(run_id)
                first = min(run.hops, key=lambda h: h.index, default=None)
                if first is not None and first.status == "committed":
                    break
                if run.status in ("completed", "failed", "aborted"):
                    raise RuntimeError(f"run {run.status}: {run.error}")
                cluster.check_alive()
                time.sleep(0.1)
        cpu.sample()
        logs = {p.name: p.log_path for p in cluster.processes}
    if keep_logs is not None:
        keep_logs.mkdir(parents=True, exist_ok=True)
        for log in logs.values():
            shutil.copy(log, keep_logs / log.name)
    hops = sorted(run.hops, key=lambda h: h.index)
    first_step = hops[0].train_started_at_ns / 1e9
    at_first_step = cpu.at(first_step)
    cores = os.cpu_count() or 1

    def rel(instant: float | None) -> float | None:
        return None if instant is None else round(instant - t0, 2)

    hello = {site: _log_instant(logs[site], HELLO) for site in SITES}
    loaded = {site: _log_instant(logs[site], LOADED) for site in SITES}
    first_hop = _log_instant(logs[hops[0].site], FIRST_HOP)

    def cpu_at(instants: dict[str, float | None]) -> dict[str, float | None]:
        return {
            site: None if at is None else round(cpu.at(at).get(site, 0.0), 2)
            for site, at in instants.items()
        }

    return {
        "coordinator_ready_s": rel(coordinator_ready),
        "hello_s": {site: rel(at) for site, at in hello.items()},
        # Each site's hello from its own spawn (the target: within 1 s of starting).
        "hello_after_spawn_s": {
            site: None if at is None else round(at - spawned[site], 2) for site, at in hello.items()
        },
        "base_model_loaded_s": {site: rel(at) for site, at in loaded.items()},
        # Each site's own CPU seconds (all its threads) when it said hello / had loaded.
        "site_cpu_s_at_hello": cpu_at(hello),
        "site_cpu_s_at_loaded": cpu_at(loaded),
        "all_connected_s": rel(connected),
        "run_started_s": rel(run_started),
        "first_step_s": rel(first_step),
        "first_site": hops[0].site,
        # The first hop's site: its base model loaded (before or during its first hop).
        "first_site_model_loaded_s": rel(loaded[hops[0].site]),
        # Its hop's arrival, and its CPU seconds then (its start, hello and any load ahead).
        "first_site_hop_s": rel(first_hop),
        "first_site_cpu_s_at_hop": None
        if first_hop is None
        else round(cpu.at(first_hop).get(hops[0].site, 0.0), 2),
        "cpu_s_at_first_step": {name: round(value, 2) for name, value in at_first_step.items()},
        # The coordinator's CPU seconds when it was ready, when every site had connected and at
        # the first hop's arrival: what its start, the hellos and the run's start cost it.
        "coordinator_cpu_s": {
            moment: None if at is None else round(cpu.at(at).get("coordinator", 0.0), 2)
            for moment, at in (
                ("ready", coordinator_ready),
                ("all_connected", connected),
                ("first_hop", first_hop),
            )
        },
        "cpu_floor_s": round(sum(at_first_step.values()) / cores, 2),
        "uptime_before": uptime_before,
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
    }


def _uptime() -> str:
    """What `uptime` prints (the machine is shared: every figure comes with its load)."""
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def _max(values: dict[str, float | None]) -> float | str:
    present = [v for v in values.values() if v is not None]
    return max(present) if present else "-"


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "# Cold cluster: coordinator + 4 sites to the first training step",
        "",
        f"Generated {report['generated']} by `{report['command']}` on {report['machine']}"
        f" (PYTHONPATH={report.get('pythonpath') or '-'}).",
        "Seconds from spawning the coordinator. *hello*: slowest site's `connected to "
        "coordinator` line, from t0 and from the site's own spawn; *model*: slowest site's "
        "`trainer loaded` line (torch, transformers, "
        "peft imported, tokenizer and base model loaded; with `preload = when-scheduled` the "
        "later hops' sites load from the first hop's first training beat, at a low CPU priority "
        "until told they are next; with `when-next` once told they are next); "
        "*first site's model*: the same line of the "
        "first hop's site; *first hop*: its `hop 0 of run ... starting` line, and that site's "
        "CPU seconds then (*CPU site 1 at hop*: what it loaded ahead shows there); "
        "*coordinator CPU*: its CPU seconds at ready / at the first hop (its start, the hellos and "
        "the run's start); "
        "*first step*: the first hop's "
        "`train_started_at_ns` (ledger). *CPU floor*: all processes' CPU seconds up to the first "
        f"step / {report['cores']} cores. Sites spawned "
        f"{report.get('sites_spawned', 'once the coordinator serves')}; "
        f"{report.get('bytecode', 'project modules from source')}; sites' venv: "
        f"{report.get('site_venv', 'this venv')}. "
        f"Site arguments: `{report.get('site_args') or '-'}`.",
        "",
        "| start | coordinator ready | hello (max) | hello after spawn (max) | model (max) "
        "| first site's model "
        "| all connected | first step | CPU site 1 | CPU all | CPU floor "
        "| site CPU at hello (max) | site CPU at loaded (max) | load avg before "
        "| first hop | CPU site 1 at hop | coordinator CPU ready / first hop |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---|",
    ]
    for index, start in enumerate(report["starts"], 1):
        if "error" in start:
            lines.append(f"| {index} | failed: {start['error']} |" + " |" * 15)
            continue
        hello = [v for v in start["hello_s"].values() if v is not None]
        loaded = [v for v in start["base_model_loaded_s"].values() if v is not None]
        cpu = start["cpu_s_at_first_step"]
        coordinator = start.get("coordinator_cpu_s", {})  # reports before session 31: none
        lines.append(
            f"| {index} | {start['coordinator_ready_s']} | {max(hello, default='-')} "
            f"| {_max(start.get('hello_after_spawn_s', {}))} "
            f"| {max(loaded, default='-')} | {start.get('first_site_model_loaded_s', '-')} "
            f"| {start['all_connected_s']} | {start['first_step_s']} "
            f"| {cpu.get(start['first_site'], '-')} | {round(sum(cpu.values()), 2)} "
            f"| {start['cpu_floor_s']} | {_max(start['site_cpu_s_at_hello'])} "
            f"| {_max(start['site_cpu_s_at_loaded'])} | {start['load_average_before']} "
            f"| {start.get('first_site_hop_s', '-')} "
            f"| {start.get('first_site_cpu_s_at_hop', '-')} "
            f"| {coordinator.get('ready', '-')} / {coordinator.get('first_hop', '-')} |"
        )
    ok = [s for s in report["starts"] if "error" not in s]
    if ok:
        lines += [
            "",
            f"Median first step: {statistics.median(s['first_step_s'] for s in ok):.2f} s; "
            f"median CPU floor: {statistics.median(s['cpu_floor_s'] for s in ok):.2f} s; "
            "median CPU seconds of the first hop's site up to its first step: "
            f"{statistics.median(s['cpu_s_at_first_step'].get(s['first_site'], 0) for s in ok):.2f}"
            " s.",
        ]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--starts", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3, help="training steps per visit")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--name", default="cold_cluster")
    parser.add_argument("--keep-logs", type=Path, default=None,
                        help="copy each start's process logs to DIR/start-N")  # fmt: skip
    parser.add_argument("--sites-after-ready", action="store_true",
                        help="spawn the sites once the coordinator serves (as `baton demo` "
                        "does), not right after it (compose's service_started)")  # fmt: skip
    parser.add_argument("--site-arg", action="append", default=[],
                        help="extra argument of every `baton-site serve`")  # fmt: skip
    parser.add_argument("--from-source", action="store_true",
                        help="no project bytecode: every process compiles the source")  # fmt: skip
    parser.add_argument("--sites-in-this-venv", action="store_true",
                        help="sites on this interpreter, not in a baton-fl[site] venv")  # fmt: skip
    parser.add_argument("--cache-dir", type=Path, default=CACHE,
                        help="where the baton-fl[site] venv is made (once)")  # fmt: skip
    args = parser.parse_args(argv)
    checkout = Path(os.environ.get("PYTHONPATH", str(ROOT)).split(os.pathsep)[0])
    bytecode = project_bytecode(checkout, compiled=not args.from_source)
    interpreter = None if args.sites_in_this_venv else site_python(ROOT, args.cache_dir)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    report: dict[str, Any] = {
        "generated": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": shlex.join(["benchmarks/cold_cluster.py", *(argv or sys.argv[1:])]),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, python "
        f"{platform.python_version()}",
        "cores": os.cpu_count() or 1,
        # The processes run the code PYTHONPATH names (e.g. another checkout, for a before/after).
        "pythonpath": os.environ.get("PYTHONPATH", ""),
        "site_args": shlex.join(args.site_arg),
        "bytecode": bytecode,
        "site_venv": "this venv" if interpreter is None else "baton-fl[site] only",
        "sites_spawned": "once the coordinator serves"
        if args.sites_after_ready
        else "right after the coordinator",
        "starts": [],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    for index in range(args.starts):
        with tempfile.TemporaryDirectory(prefix="baton-cold-") as name:
            try:
                logs = None if args.keep_logs is None else args.keep_logs / f"start-{index + 1}"
                start = cold_start(
                    Path(name), args.steps, args.site_arg, logs, args.sites_after_ready,
                    interpreter,
                )  # fmt: skip
            except (RuntimeError, TimeoutError) as exc:
                start = {"error": str(exc).splitlines()[0][:300]}
        report["starts"].append(start)
        print(f"start {index + 1}: {json.dumps(start)}", flush=True)
        # Written after every start, so a run cut short keeps what it measured.
        (args.out / f"{args.name}.json").write_text(json.dumps(report, indent=1) + "\n")
        (args.out / f"{args.name}.md").write_text(markdown(report))
    print(markdown(report))
    return 0 if all("error" not in s for s in report["starts"]) else 1


if __name__ == "__main__":
    sys.exit(main())
