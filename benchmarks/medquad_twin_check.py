"""Is ``medquad_paired.py``'s in-process twin what real site processes compute?

Takes one split of one setting of ``medquad_paired.py`` (the frozen MiniLM embeddings of the
questions, six sites), writes each site's training rows to a CSV that a real ``baton-site``
registers (``tabular``, no validation or test split), starts a real coordinator and six real
site processes over mTLS on loopback, runs a few plans of the benchmark's search space (random
plans drawn from it, a revisited site and a proximal term included), and compares each run's
final model, tensor by tensor, with ``site_agent.simulation.train_sequential`` on the same
registered datasets. Test rows never leave this process.

    .venv/bin/python benchmarks/medquad_twin_check.py --setting dirichlet-0.1 --split 0 --plans 3

Writes benchmarks/results/medquad_twin_check.{json,md}.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import random
import shlex
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from _harness import wait_for_completed_run
from medquad_paired import (
    DEFAULT_DATA,
    OPTIONS,
    RESULTS_DIR,
    SETTINGS,
    _site_hp,
    load_pool,
    search_space,
    split_sites,
)

from coordinator.console.admin import AdminClient
from coordinator.console.demo import prepare_pki
from coordinator.console.processes import Cluster
from coordinator.console.study import RunTemplate, approval_bounds
from ordering import CandidatePlan
from protocols.transport import TlsFiles
from site_agent.registry import load_registered, register_dataset
from site_agent.simulation import train_sequential
from site_agent.tasks import TabularTrainer, TaskSpec, create_trainer

logger = logging.getLogger("benchmarks.medquad_twin_check")
DATASET = "medquad-embeddings"


def _write_csv(path: Path, rows: Any) -> None:
    width = len(rows[0].features)
    lines = [",".join([*(f"e{i}" for i in range(width)), "label"])]
    lines += [",".join([*(repr(v) for v in row.features), row.label]) for row in rows]
    path.write_text("\n".join(lines) + "\n")


def _random_plans(sites: list[str], split: int, max_steps: int, count: int) -> list[CandidatePlan]:
    space = search_space(sites, split, max_steps)
    rng = random.Random(f"twin-check:{split}")
    plans = []
    for index in range(count):
        order = list(sites)
        rng.shuffle(order)
        plans.append(
            space.plan(
                order,
                cycles=1 + index % 2,
                learning_rate=10 ** rng.uniform(-3, -0.5),
                learning_rate_decay=rng.uniform(0.7, 1.0),
                steps=rng.randint(5, max_steps),
                proximal_mu=rng.uniform(0.0, 1.0),
            )
        )
    return plans


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument(
        "--data", type=Path, default=Path(os.environ.get("BATON_MEDQUAD_DIR", DEFAULT_DATA))
    )
    parser.add_argument("--setting", default="dirichlet-0.1", choices=SETTINGS)
    parser.add_argument("--split", type=int, default=0)
    parser.add_argument("--plans", type=int, default=3)
    parser.add_argument("--max-steps", type=int, default=30)
    parser.add_argument("--rows-per-source", type=int, default=300)
    parser.add_argument(
        "--cache", type=Path, default=Path(tempfile.gettempdir()) / "baton-medquad-cache"
    )
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(1)
    started = time.perf_counter()
    pool = load_pool(args.data, args.rows_per_source, args.cache)
    datasets, _ = split_sites(pool, args.setting, args.split)
    labels = sorted({r.label for r in pool})
    by_text = {tuple(r.features): r for r in pool}
    work = Path(tempfile.mkdtemp(prefix="baton-medquad-twin-"))
    site_dirs: dict[str, Path] = {}
    for dataset in datasets:
        rows = [by_text[e.features] for e in dataset.train]  # type: ignore[union-attr]
        _write_csv(work / f"{dataset.name}.csv", rows)
        site_dirs[dataset.name] = work / "sites" / dataset.name
        register_dataset(
            site_dirs[dataset.name],
            DATASET,
            work / f"{dataset.name}.csv",
            task_type="tabular",
            fmt="csv",
            validation_fraction=0.0,
            test_fraction=0.0,
            seed=args.split,
        )
    sites = list(site_dirs)
    registered = [
        dataclasses.replace(load_registered(site_dirs[s], DATASET), name=s) for s in sites
    ]
    trainer = create_trainer("tabular", base_model_dir=None, device="cpu")
    assert isinstance(trainer, TabularTrainer)
    spec = TaskSpec("tabular", labels=tuple(labels), options=dict(OPTIONS))
    space = search_space(sites, args.split, args.max_steps)
    template = RunTemplate(
        dataset=DATASET,
        labels=tuple(labels),
        task="tabular",
        metric="accuracy",
        options=dict(OPTIONS),
        bounds=approval_bounds(space),
        failure={"on_failure": "abort"},
    )
    plans = _random_plans(sites, args.split, args.max_steps, args.plans)
    bundle = template.approval_bundle(plans[0])
    pki = work / "pki"
    prepare_pki(pki, sites)
    state_dir = work / "coordinator"
    results: list[dict[str, Any]] = []
    cluster = Cluster(log_dir=work / "logs")
    with cluster.running():
        port = cluster.start_coordinator(state_dir=state_dir, pki_dir=pki, port_file=work / "port")
        for site in sites:
            cluster.start_site(
                site,
                coordinator=f"localhost:{port}",
                pki_dir=pki,
                data_dir=site_dirs[site],
                threads=1,
                approve=[bundle.sha256],
            )
        tls = TlsFiles(pki / "ca.crt", pki / "admin.crt", pki / "admin.key")
        with AdminClient(f"localhost:{port}", tls) as admin:
            admin.wait_for_sites(set(sites), timeout=600)
            for index, plan in enumerate(plans):
                run_id = admin.start_run(template.run_plan(plan, name=f"twin-check-{index}"))
                wait_for_completed_run(admin, run_id, 1800.0)
                path = state_dir / "runs" / run_id / "final_adapter" / "adapter_model.safetensors"
                real = safetensors.torch.load_file(str(path))
                by_name = {d.name: d for d in registered}
                twin = train_sequential(
                    trainer,
                    spec,
                    [
                        (by_name[h.site], _site_hp(h.hyperparameters.model_dump()))
                        for h in plan.hops
                    ],
                ).tensors
                gap = max(float((twin[k] - real[k]).abs().max()) for k in twin)
                results.append(
                    {
                        "run": run_id,
                        "plan": plan.describe(),
                        "hops": len(plan.hops),
                        "tensors": sorted(twin),
                        "max_abs_diff": gap,
                    }
                )
                logger.info("plan %d (%s): max |twin - real| = %.1e", index, plan.describe(), gap)
    report = {
        "generated": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": shlex.join(["medquad_twin_check.py", *(argv or sys.argv[1:])]),
        "setting": args.setting,
        "split": args.split,
        "train_rows": {d.name: len(d.train) for d in registered},
        "runs": results,
        "wall_seconds": time.perf_counter() - started,
        "load": " ".join(f"{v:.2f}" for v in os.getloadavg()),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "medquad_twin_check.json").write_text(json.dumps(report, indent=1) + "\n")
    lines = [
        "# MedQuAD twin check: in-process twin against real site processes",
        "",
        f"Generated {report['generated']} by `{report['command']}`; wall "
        f"{report['wall_seconds']:.0f} s, load {report['load']}. Setting {args.setting}, split "
        f"{args.split}: six real `baton-site` processes and a real coordinator (mTLS, loopback), "
        "each site holding its training rows of `medquad_paired.py` (frozen MiniLM embeddings) "
        "as a registered CSV.",
        "",
        "| run | plan | hops | max abs diff of the final model |",
        "|---|---|---|---|",
        *(f"| {r['run']} | {r['plan']} | {r['hops']} | {r['max_abs_diff']:.1e} |" for r in results),
    ]
    (args.out / "medquad_twin_check.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
