"""One Ray head per test module (`ray start --head --block`), so that the module's simulations
join it with `address=` instead of each starting and stopping Ray (tens of seconds apiece)."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def ray_head(cpus: int = 1, timeout: float = 240) -> Iterator[str]:
    """Starts a Ray head with ``cpus`` CPUs and yields its address; stops it (SIGTERM to the
    blocking ``ray start``, which stops the processes it started) afterwards."""
    ray = shutil.which("ray", path=str(Path(sys.executable).parent)) or "ray"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # Short: Ray's socket paths live under it and must stay below 108 characters.
    temp = Path(tempfile.mkdtemp(prefix="bray-"))
    log = (temp / "head.log").open("w")
    process = subprocess.Popen(
        [ray, "start", "--head", "--block", f"--num-cpus={cpus}", f"--port={port}",
         "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp}"],
        stdout=log, stderr=subprocess.STDOUT,
        env={**os.environ, "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0"},
    )  # fmt: skip
    started = False
    try:
        deadline = time.monotonic() + timeout
        # Ready once `ray start` says so: its GCS port may listen before the node fails to start
        # (an overloaded machine), and `ray start` then exits.
        while "Ray runtime started" not in (temp / "head.log").read_text(errors="replace"):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the Ray head did not start; see {temp / 'head.log'}")
            time.sleep(0.5)
        if process.poll() is not None:
            raise RuntimeError(f"the Ray head stopped; see {temp / 'head.log'}")
        started = True
        yield f"127.0.0.1:{port}"
    finally:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
        if started:
            shutil.rmtree(temp, ignore_errors=True)  # else kept: its log says why
