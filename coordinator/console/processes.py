"""Starts and stops coordinator and site-agent OS processes (for the demo, tests, benchmarks)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Cluster", "ManagedProcess"]

_STOP_TIMEOUT = 10.0  # seconds a process has to exit after SIGTERM before SIGKILL


@dataclass
class ManagedProcess:
    name: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def stop(self, timeout: float = _STOP_TIMEOUT) -> int:
        """SIGTERM, then SIGKILL after `timeout`; returns the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def kill(self) -> None:
        """SIGKILL: the crash the system must survive."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


@dataclass
class Cluster:
    """A coordinator and site agents started as separate processes, logs under `log_dir`."""

    log_dir: Path
    env: dict[str, str] = field(default_factory=dict)
    processes: list[ManagedProcess] = field(default_factory=list)

    def _spawn(self, name: str, args: Sequence[str]) -> ManagedProcess:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{name}.{sum(p.name == name for p in self.processes)}.log"
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **self.env}
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                [sys.executable, *args],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
            )
        managed = ManagedProcess(name, process, log_path)
        self.processes.append(managed)
        return managed

    def start_coordinator(
        self,
        *,
        state_dir: Path,
        pki_dir: Path,
        port_file: Path,
        port: int = 0,
        timeout: float = 60.0,
        extra: Sequence[str] = (),
        dashboard_port_file: Path | None = None,
        wait: bool = True,
    ) -> int:
        """Starts `baton coordinator serve` on a free port; returns the port once it serves.

        The dashboard is off unless `dashboard_port_file` is given: then it serves on a free
        port, written to that file once it serves (after the gRPC port file). With `wait`
        false (a fixed `port` only) it returns the port at once, so that sites can be started
        beside it (as compose's `service_started` does); `await_coordinator` then waits.
        """
        if not wait and (port == 0 or dashboard_port_file is not None):
            raise ValueError("start_coordinator(wait=False) needs a fixed port and no dashboard")
        port_file.unlink(missing_ok=True)
        if dashboard_port_file is None:
            dashboard = ["--no-dashboard"]
        else:
            dashboard_port_file.unlink(missing_ok=True)
            dashboard = ["--dashboard-port", "0", "--dashboard-port-file", str(dashboard_port_file)]
        managed = self._spawn(
            "coordinator",
            [
                "-m", "coordinator", "coordinator", "serve",
                "--port", str(port),
                "--state-dir", str(state_dir),
                "--ca", str(pki_dir / "ca.crt"),
                "--cert", str(pki_dir / "coordinator.crt"),
                "--key", str(pki_dir / "coordinator.key"),
                "--port-file", str(port_file),
                *dashboard,
                *extra,
            ],
        )  # fmt: skip
        if not wait:
            return port
        deadline = time.monotonic() + timeout
        _await_port_file(managed, port_file, "coordinator", deadline, timeout)
        if dashboard_port_file is not None:
            _await_port_file(
                managed, dashboard_port_file, "coordinator's dashboard", deadline, timeout
            )
        return int(port_file.read_text())

    def await_coordinator(self, port_file: Path, timeout: float = 60.0) -> int:
        """Waits for a coordinator started with `wait=False` to serve; returns its port."""
        managed = next(p for p in reversed(self.processes) if p.name == "coordinator")
        _await_port_file(managed, port_file, "coordinator", time.monotonic() + timeout, timeout)
        return int(port_file.read_text())

    def start_site(
        self,
        name: str,
        *,
        coordinator: str,
        pki_dir: Path,
        data_dir: Path,
        base_model_dir: Path | None = None,
        threads: int | None = None,
        approve: Sequence[str] = (),
        extra: Sequence[str] = (),
    ) -> ManagedProcess:
        """Starts `baton-site serve`; `approve` pre-approves run bundles by their sha256."""
        args = [
            "-m", "site_agent", "serve",
            "--coordinator", coordinator,
            "--ca", str(pki_dir / "ca.crt"),
            "--cert", str(pki_dir / f"{name}.crt"),
            "--key", str(pki_dir / f"{name}.key"),
            "--data-dir", str(data_dir),
            *extra,
        ]  # fmt: skip
        if base_model_dir is not None:
            args += ["--base-model", str(base_model_dir)]
        if threads:
            args += ["--threads", str(threads)]
        for digest in approve:
            args += ["--approve", digest]
        return self._spawn(name, args)

    def start_command(self, name: str, args: Sequence[str]) -> ManagedProcess:
        """Starts `python ARGS` (e.g. `-m site_agent serve --config site.toml`) under `name`."""
        return self._spawn(name, args)

    def process(self, name: str) -> ManagedProcess:
        """The newest process started under `name` (e.g. "coordinator", "site-a")."""
        return next(p for p in reversed(self.processes) if p.name == name)

    def check_alive(self) -> None:
        latest = {p.name: p for p in self.processes}
        for managed in latest.values():
            code = managed.process.poll()
            if code is not None:
                raise RuntimeError(f"{managed.name} exited with code {code}:\n{managed.log_tail()}")

    def stop(self) -> None:
        """Stops every site at once, then the coordinator(s), newest first.

        A coordinator stopped while its sites are connected waits out its shutdown grace for
        their task streams; sites exit faster together than in turn (each on its own SIGTERM).
        """
        sites = [p for p in self.processes if p.name != "coordinator"]
        for managed in sites:
            if managed.process.poll() is None:
                managed.process.send_signal(signal.SIGTERM)
        for managed in sites:  # one SIGTERM only: a second one makes a site stop at once
            try:
                managed.process.wait(_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                managed.kill()
        for managed in reversed(self.processes):
            managed.stop()

    @contextlib.contextmanager
    def running(self) -> Iterator[Cluster]:
        try:
            yield self
        finally:
            self.stop()


def _await_port_file(
    managed: ManagedProcess, port_file: Path, what: str, deadline: float, timeout: float
) -> None:
    """Waits until the coordinator wrote its port to `port_file`; fails if it exits first or
    the `deadline` (monotonic; `timeout` seconds after the start) passes."""
    while not (port_file.is_file() and port_file.read_text().strip()):
        if managed.process.poll() is not None:
            raise RuntimeError(f"coordinator exited early:\n{managed.log_tail()}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not start in {timeout} s:\n{managed.log_tail()}")
        time.sleep(0.05)
