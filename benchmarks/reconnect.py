"""Sites back after a coordinator restart: real coordinator and site processes on loopback.

Starts a coordinator and `--sites` site agents, then `--restarts` times: kills the coordinator
(SIGKILL), keeps it away for `--outage` seconds, starts it again on the same port and times
(a) start to ready (its port file) and (b) ready to every site's task stream open again.

    .venv/bin/python benchmarks/reconnect.py --sites 4 --restarts 3 --outage 3
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc

from coordinator.console.admin import AdminClient
from coordinator.console.processes import Cluster
from protocols.pki import Role, init_ca, issue_certificate
from protocols.transport import TlsFiles

RESULTS = Path(__file__).resolve().parent / "results"


def _all_connected(admin: AdminClient, names: set[str]) -> bool:
    try:
        return names <= {s.name for s in admin.sites(timeout=5) if s.connected}
    except grpc.RpcError:
        return False


def measure(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    pki = tmp / "pki"
    init_ca(pki)
    issue_certificate(pki, pki, Role.COORDINATOR, "coordinator")
    issue_certificate(pki, pki, Role.ADMIN, "admin")
    names = [f"site-{i}" for i in range(args.sites)]
    for name in names:
        issue_certificate(pki, pki, Role.SITE, name)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    target = f"localhost:{port}"
    admin_tls = TlsFiles(pki / "ca.crt", pki / "admin.crt", pki / "admin.key")
    cluster = Cluster(log_dir=tmp / "logs")
    ready: list[float] = []
    back: list[float] = []
    with cluster.running():

        def start() -> float:
            started = time.perf_counter()
            cluster.start_coordinator(state_dir=tmp / "state", pki_dir=pki,
                                      port_file=tmp / "port", port=port)  # fmt: skip
            return time.perf_counter() - started

        start()
        for name in names:
            (tmp / name).mkdir()
            cluster.start_site(name, coordinator=target, pki_dir=pki, data_dir=tmp / name)
        with AdminClient(target, admin_tls) as admin:
            admin.wait_for_sites(set(names), timeout=120)
        for _ in range(args.restarts):
            cluster.process("coordinator").kill()
            time.sleep(args.outage)
            ready.append(start())
            t0 = time.perf_counter()
            with AdminClient(target, admin_tls) as admin:
                while not _all_connected(admin, set(names)):
                    if time.perf_counter() - t0 > 120:
                        raise SystemExit("sites did not come back within 120 s")
                    time.sleep(0.02)
            back.append(time.perf_counter() - t0)
    return {
        "sites": args.sites,
        "restarts": args.restarts,
        "outage_seconds": args.outage,
        "start_to_ready_seconds": [round(x, 2) for x in ready],
        "ready_to_all_sites_back_seconds": [round(x, 2) for x in back],
        "ready_to_all_sites_back_median": round(statistics.median(back), 2),
        "ready_to_all_sites_back_max": round(max(back), 2),
    }


def markdown(figures: dict[str, Any], command: str) -> str:
    return "\n".join([
        "# Sites back after a coordinator restart", "", f"Command: `{command}`", "",
        f"{figures['sites']} site processes, coordinator SIGKILLed and started again on the same "
        f"port after {figures['outage_seconds']} s, {figures['restarts']} times.", "",
        "| figure | value | target |", "|---|---|---|",
        f"| coordinator start to ready (each restart) | "
        f"{', '.join(map(str, figures['start_to_ready_seconds']))} s | <= 1 s |",
        f"| ready to all sites back (each restart) | "
        f"{', '.join(map(str, figures['ready_to_all_sites_back_seconds']))} s | <= 2 s |",
        f"| ready to all sites back, median / max | {figures['ready_to_all_sites_back_median']} / "
        f"{figures['ready_to_all_sites_back_max']} s | |", "",
    ])  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sites", type=int, default=4)
    parser.add_argument("--restarts", type=int, default=3)
    parser.add_argument("--outage", type=float, default=3.0)
    parser.add_argument("--name", default="reconnect", help="results file stem")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        figures = measure(args, Path(tmp))
    command = "python benchmarks/reconnect.py " + " ".join(sys.argv[1:])
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(figures, indent=2) + "\n")
    (RESULTS / f"{args.name}.md").write_text(markdown(figures, command))
    print(markdown(figures, command))


if __name__ == "__main__":
    main()
