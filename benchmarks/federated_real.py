"""Sequential, federated and hybrid runs through real site processes, at equal site compute and
equal bytes moved; Flower's own runtime (``run_simulation``) runs the FedAvg peer.

Two tasks (``--task``):

* ``heart``: Fed-Heart-Disease. Four hospitals (Cleveland, Hungary, Switzerland, VA) with their
  registered UCI files (FLamby's split, per-site normalisation), logistic model; 4 visits per
  site of FLamby's 100 local updates (lr 1e-3, batch 4).
* ``medquad``: MedQuAD question -> question type. Four NIH sources (NIDDK, NINDS, CancerGov,
  NHLBI) are four hospitals, all-MiniLM-L6-v2 + LoRA r=8 (query, value), 32 tokens; 3 visits per
  site of 12 local steps (lr 5e-3, batch 16). Cut to fit two shared cores: four of the six
  sources (GARD, 5,400 rows, and SeniorHealth, 288, left out), 3 x 12 steps per site instead of
  medquad.py's searched 8-24 steps over six sites, sequence length 32 (medquad.py's).

Every mode gets the same site compute and moves the same bytes: V visits per site, each visit
one adapter down and one up. A coordinator process aggregates federated and hybrid rounds with
Flower's strategies.

* sequential: V cycles over the four sites (a fixed order);
* federated: V rounds in which all four sites train from the round's aggregate (FedAvg, or the
  ``--strategy`` given);
* hybrid: V rounds of two groups (chained within the group, averaged across the groups);
* federated on Flower's ``run_simulation`` (the peer, unless ``--no-peer``): the same federated
  plan on Flower's simulation engine (Ray) over the same registered site data
  (``site_agent.ray_simulation``: Flower's ``ServerApp``/``ClientApp`` and strategy).

Each final model is scored by every site on its test split; the figure is FLamby's "Avg", the
unweighted mean of the per-site accuracies.

    nice -n 19 .venv/bin/python benchmarks/federated_real.py                  # heart, one seed
    nice -n 19 .venv/bin/python benchmarks/federated_real.py --seeds 42 43 44
    nice -n 19 .venv/bin/python benchmarks/federated_real.py --task medquad --seeds 0 1 2

Data: ``--data`` (default ``$BATON_HEART_DISEASE_DIR`` / ``$BATON_MEDQUAD_DIR``, else
/work/shared/datasets/...); never copied. Results are written after every run, so a run cut
short leaves its partial JSON/Markdown: benchmarks/results/{federated_real,
federated_real_medquad}.{json,md,png}.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _harness import report_head, site_test_accuracy, wait_for_completed_run

from coordinator.console.admin import AdminClient
from coordinator.console.demo import prepare_pki
from coordinator.console.processes import Cluster
from coordinator.plan import RunPlan, parse_plan
from protocols.transport import TlsFiles
from site_agent.registry import load_registered, register_dataset

logger = logging.getLogger("benchmarks.federated_real")

RESULTS_DIR = Path(__file__).resolve().parent / "results"
DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"
PEER = "federated (Flower run_simulation)"


@dataclasses.dataclass(frozen=True)
class Task:
    """One benchmark task: its sites' data, the plan's shared part and the visits."""

    name: str
    dataset: str
    data_env: str
    default_data: Path
    sites: tuple[str, ...]
    groups: tuple[tuple[str, tuple[str, ...]], ...]
    visits: int
    local_steps: int
    register: Callable[[Path, Path], dict[str, Path]]  # data, work -> site -> data folder
    base: Callable[[int, tuple[str, ...], Path | None], dict[str, Any]]  # seed, labels, model
    needs_model: bool
    seed_default: int
    cuts: str = ""  # what was cut to fit two shared cores


HEART_FILES = {
    "cleveland": "processed.cleveland.data",
    "hungary": "processed.hungarian.data",
    "switzerland": "processed.switzerland.data",
    "va": "processed.va.data",
}


def _register_heart(data: Path, work: Path) -> dict[str, Path]:
    dirs = {}
    for site, file in HEART_FILES.items():
        source = data / file
        if not source.is_file():
            raise SystemExit(f"missing {source}: set --data or BATON_HEART_DISEASE_DIR")
        dirs[site] = work / "sites" / site
        register_dataset(dirs[site], "heart", source, task_type="tabular",
                         fmt="heart-disease", validation_fraction=0.0, seed=0)  # fmt: skip
    return dirs


def _heart_base(seed: int, labels: tuple[str, ...], model: Path | None) -> dict[str, Any]:
    return {
        "task": "tabular", "dataset": "heart", "labels": ["0", "1"],
        "options": {"model": "logistic", "normalisation": "per-site"},
        "defaults": {"steps": HEART.local_steps, "batch_size": 4, "learning_rate": 1e-3,
                     "max_grad_norm": 0.0, "seed": seed},
    }  # fmt: skip


MEDQUAD_SOURCES = ("NIDDK", "NINDS", "CancerGov", "NHLBI")
MEDQUAD_LORA = {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["query", "value"]}


def _register_medquad(data: Path, work: Path) -> dict[str, Path]:
    source = data / "medquad.jsonl.gz"
    if not source.is_file():
        raise SystemExit(f"missing {source}: set --data or BATON_MEDQUAD_DIR")
    dirs = {}
    for name in MEDQUAD_SOURCES:
        site = name.lower()
        dirs[site] = work / "sites" / site
        register_dataset(
            dirs[site], "medquad", source, task_type="seq-classification", fmt="medquad",
            validation_fraction=0.1, test_fraction=0.2, seed=0,
            options={"source": name, "dedupe": "true"},
        )  # fmt: skip
    return dirs


def _medquad_base(seed: int, labels: tuple[str, ...], model: Path | None) -> dict[str, Any]:
    from site_agent.tasks import hash_base_model

    assert model is not None
    return {
        "task": "seq-classification", "dataset": "medquad", "labels": list(labels),
        "options": {"max_length": 32}, "lora": MEDQUAD_LORA,
        "base_model_sha256": hash_base_model(model),
        "defaults": {"steps": MEDQUAD.local_steps, "batch_size": 16, "learning_rate": 5e-3,
                     "seed": seed},
    }  # fmt: skip


HEART = Task(
    name="heart", dataset="heart", data_env="BATON_HEART_DISEASE_DIR",
    default_data=DATASETS / "heart_disease",
    sites=tuple(HEART_FILES),
    groups=(("north", ("cleveland", "hungary")), ("south", ("switzerland", "va"))),
    visits=4, local_steps=100, register=_register_heart, base=_heart_base, needs_model=False,
    seed_default=42,
)  # fmt: skip
MEDQUAD = Task(
    name="medquad", dataset="medquad", data_env="BATON_MEDQUAD_DIR",
    default_data=DATASETS / "medquad",
    sites=tuple(s.lower() for s in MEDQUAD_SOURCES),
    groups=(("digestive-neuro", ("niddk", "ninds")), ("cancer-heart", ("cancergov", "nhlbi"))),
    visits=3, local_steps=12, register=_register_medquad, base=_medquad_base, needs_model=True,
    seed_default=0,
    cuts="Cut to fit two shared cores: four of MedQuAD's six sources used in medquad.py (GARD, "
    "5,400 rows, and SeniorHealth left out), 3 visits x 12 steps of batch 16 per site, "
    "questions cut to 32 tokens, all-MiniLM-L6-v2 + LoRA r=8 on query and value.",
)  # fmt: skip
TASKS = {task.name: task for task in (HEART, MEDQUAD)}


def _plan(
    task: Task, mode: str, seed: int, strategy: str, labels: tuple[str, ...], model: Path | None
) -> RunPlan:
    document: dict[str, Any] = {
        "name": f"{task.name}-{mode}-{seed}", **task.base(seed, labels, model), "mode": mode,
    }  # fmt: skip
    if mode == "sequential":
        document.update(sites=list(task.sites), cycles=task.visits)
    elif mode == "federated":
        federated = {"strategy": strategy, "rounds": task.visits, "min_sites": len(task.sites)}
        document.update(sites=list(task.sites), federated=federated)
    else:
        document.update(
            groups=[{"name": name, "sites": list(sites)} for name, sites in task.groups],
            federated={"strategy": strategy, "rounds": task.visits, "min_sites": len(task.groups)},
        )
    return parse_plan(document)


def _test_accuracy(admin: AdminClient, run_id: str, sites: tuple[str, ...]) -> dict[str, float]:
    scores = site_test_accuracy(admin, run_id, 1800)
    return {site: scores[site] for site in sites}


def _peer(
    task: Task, plan: RunPlan, site_dirs: dict[str, Path], model: Path | None
) -> tuple[dict[str, float], float]:
    """The federated plan on Flower's simulation engine (run_simulation), natural partition:
    each registered site folder is one virtual site, exactly the data its process loads."""
    from coordinator.simulation import simulation_job
    from protocols.simulation import DataSource
    from site_agent.ray_simulation import simulate

    sources = [DataSource(site, str(site_dirs[site])) for site in task.sites]
    job = simulation_job(plan, sources, partitioner="natural", ray_cpus=1, base_model_dir=model)
    report = simulate(job)
    return {site: float(report.evaluation[site]["accuracy"]) for site in task.sites}, (
        report.wall_seconds
    )


def _markdown(report: dict[str, Any], task: Task) -> str:
    sites = task.sites
    title = "Fed-Heart-Disease" if task.name == "heart" else "MedQuAD, four NIH sources"
    lines = [
        f"# Sequential, federated and hybrid runs through real sites ({title})",
        "",
        f"Generated {report['generated']} by `{report['command']}` on {report['machine']}; "
        f"{report['wall_seconds']:.0f} s; load average {report['load_at_start']} at start.",
        "",
        f"Equal site compute and bytes moved: {task.visits * len(sites)} site visits of "
        f"{task.local_steps} local steps each, every visit one adapter down and one up; "
        f"federated/hybrid aggregate with {report['strategy']} (Flower's strategy on the "
        f"coordinator). Hybrid groups: "
        + "; ".join(f"{n} = {' > '.join(s)}" for n, s in task.groups)
        + f". `{PEER}` is the same federated plan on Flower's own simulation runtime "
        "(the peer).",
        "",
        *([task.cuts, ""] if task.cuts else []),
    ]
    if report.get("sites"):
        lines += ["| site | train | validation | test |", "|---|---:|---:|---:|"]
        lines += [
            f"| {s} | {r['train']} | {r['validation']} | {r['test']} |"
            for s, r in report["sites"].items()
        ]
        lines.append("")
    lines += [
        "| mode | Avg test accuracy (mean ± sd over seeds) | per seed | "
        + " | ".join(sites)
        + " | wall s (mean) |",
        "| --- | --- | --- | " + " | ".join("---" for _ in sites) + " | --- |",
    ]
    for mode, rows in report["modes"].items():
        if not rows:
            continue
        avgs = [row["avg"] for row in rows]
        spread = statistics.stdev(avgs) if len(avgs) > 1 else 0.0
        per_site = {s: statistics.fmean(row["per_site"][s] for row in rows) for s in sites}
        wall = statistics.fmean(row["wall_seconds"] for row in rows)
        lines.append(
            f"| {mode} | {statistics.fmean(avgs):.4f} ± {spread:.4f} | "
            + ", ".join(f"{a:.4f}" for a in avgs)
            + " | "
            + " | ".join(f"{per_site[s]:.4f}" for s in sites)
            + f" | {wall:.1f} |"
        )
    real = {row["seed"]: row["per_site"] for row in report["modes"].get("federated", [])}
    pairs = [(real[row["seed"]], row["per_site"]) for row in report["modes"].get(PEER, [])
             if row["seed"] in real]  # fmt: skip
    if pairs:
        gap = max(abs(a[s] - b[s]) for a, b in pairs for s in sites)
        lines += ["", f"Real federated run against the peer, same seeds ({len(pairs)}): largest "
                      f"per-site test accuracy difference {gap:.2g}."]  # fmt: skip
    lines += [
        "",
        "Wall time per run is on two cores shared with other jobs (see the load); the peer's "
        "includes starting Ray.",
    ]
    return "\n".join(lines) + "\n"


def _plot(report: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    modes = [m for m, rows in report["modes"].items() if rows]
    if not modes:
        return
    figure, axis = plt.subplots(figsize=(7, 3.5))
    for x, mode in enumerate(modes):
        avgs = [row["avg"] for row in report["modes"][mode]]
        axis.bar(x, statistics.fmean(avgs), color="#9ecae1")
        axis.plot([x] * len(avgs), avgs, "o", color="#08519c")
    axis.set_xticks(range(len(modes)), [m.replace(" (", "\n(") for m in modes], fontsize=8)
    axis.set_ylabel("Avg test accuracy")
    axis.set_title(f"{report['task']}: equal site compute and bytes (dots: seeds)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _write(report: dict[str, Any], task: Task, out: Path, name: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / f"{name}.md").write_text(_markdown(report, task))
    _plot(report, out / f"{name}.png")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", choices=sorted(TASKS), default="heart")
    parser.add_argument("--data", type=Path, default=None)
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    parser.add_argument("--strategy", default="fedavg")
    parser.add_argument(
        "--modes", nargs="*", default=["sequential", "federated", "hybrid"],
        choices=["sequential", "federated", "hybrid"], help="modes run through real sites",
    )  # fmt: skip
    parser.add_argument("--no-peer", action="store_true", help="skip the run_simulation peer")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per site process")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    parser.add_argument("--name", default=None)
    args = parser.parse_args(argv)
    task = TASKS[args.task]
    data = args.data or Path(os.environ.get(task.data_env, task.default_data))
    seeds = args.seeds or [task.seed_default]
    name = args.name or "federated_real" + ("" if task.name == "heart" else f"_{task.name}")
    peer = not args.no_peer and args.strategy == "fedavg"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="baton-federated-"))
    site_dirs = task.register(data, work)
    datasets = {site: load_registered(site_dirs[site], task.dataset) for site in task.sites}
    model: Path | None = None
    labels: tuple[str, ...] = ()
    if task.needs_model:
        from coordinator.console.demo import packaged_minilm

        model = packaged_minilm()
        labels = tuple(sorted({label for d in datasets.values() for label in d.labels}))
    plans = {(m, s): _plan(task, m, s, args.strategy, labels, model)
             for m in [*args.modes, *(["federated"] if peer else [])] for s in seeds}  # fmt: skip
    approved = sorted({plan.approval_bundle().sha256 for plan in plans.values()})
    pki = work / "pki"
    prepare_pki(pki, list(task.sites))
    report: dict[str, Any] = {
        **report_head(argv),
        "load_at_start": " ".join(f"{x:.1f}" for x in os.getloadavg()),
        "task": task.name,
        "strategy": args.strategy,
        "seeds": seeds,
        "visits_per_site": task.visits,
        "local_steps": task.local_steps,
        "sites": {
            site: {"train": len(d.train), "validation": len(d.validation), "test": len(d.test)}
            for site, d in datasets.items()
        },
        "labels": list(labels),
        "modes": {mode: [] for mode in [*args.modes, *([PEER] if peer else [])]},
        "wall_seconds": 0.0,
    }

    def record(mode: str, seed: int, per_site: dict[str, float], wall: float, **extra: Any) -> None:
        avg = statistics.fmean(per_site.values())
        logger.info("%s seed %d: Avg test accuracy %.4f (%.0f s)", mode, seed, avg, wall)
        report["modes"][mode].append({"seed": seed, "avg": avg, "per_site": per_site,
                                      "wall_seconds": wall,
                                      "load": os.getloadavg()[0], **extra})  # fmt: skip
        report["wall_seconds"] = time.perf_counter() - started
        _write(report, task, args.out, name)

    cluster = Cluster(log_dir=work / "logs")
    with cluster.running():
        port = cluster.start_coordinator(state_dir=work / "coordinator", pki_dir=pki,
                                         port_file=work / "port")  # fmt: skip
        for site in task.sites:
            cluster.start_site(site, coordinator=f"localhost:{port}", pki_dir=pki,
                               data_dir=site_dirs[site], base_model_dir=model,
                               threads=args.threads, approve=approved)  # fmt: skip
        tls = TlsFiles(pki / "ca.crt", pki / "admin.crt", pki / "admin.key")
        with AdminClient(f"localhost:{port}", tls) as admin:
            admin.wait_for_sites(set(task.sites), timeout=600)
            for seed in seeds:
                for mode in args.modes:
                    began = time.perf_counter()
                    run_id = admin.start_run(plans[(mode, seed)])
                    wait_for_completed_run(admin, run_id, timeout=3600)
                    wall = time.perf_counter() - began
                    record(mode, seed, _test_accuracy(admin, run_id, task.sites), wall,
                           run_id=run_id)  # fmt: skip
                if peer:  # the site processes sit idle meanwhile
                    per_site, wall = _peer(task, plans[("federated", seed)], site_dirs, model)
                    record(PEER, seed, per_site, wall)
    report["wall_seconds"] = time.perf_counter() - started
    _write(report, task, args.out, name)
    print(_markdown(report, task))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
