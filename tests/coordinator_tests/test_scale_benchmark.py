"""benchmarks/scale.py's history is written as the engine writes it: a ledger that verifies, with
every hop's checkpoint row and lifecycle events, and evaluations answered."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from sqlalchemy import func, select

from coordinator.ledger import CheckpointRow, EvaluationRow, EventRow, Ledger, RunRow
from tests.benchmark_module import benchmark_module


def test_the_history_is_a_sound_ledger_of_finished_runs_with_their_checkpoints(
    tmp_path: Path,
) -> None:
    ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.sqlite3'}")
    ledger.migrate()
    with benchmark_module("scale.py", "scale_benchmark") as scale:
        scale.build_history(ledger, 3, ["site-a", "site-b", "site-c", "site-d"])
        hops, evaluations = scale.HOPS_PER_RUN, scale.EVALUATIONS_PER_RUN
    try:
        verification = ledger.verify()
        assert verification.ok, (verification.chain_break, verification.row_mismatches[:3])
        with ledger._sessions() as session:
            runs = list(session.scalars(select(RunRow)))
            kinds = Counter(session.scalars(select(EventRow.kind)))
            checkpoints = session.scalar(select(func.count()).select_from(CheckpointRow))
            answered = list(session.scalars(select(EvaluationRow.status)))
        assert [run.status for run in runs] == ["completed"] * 3
        assert all(run.final_sha256 for run in runs)
        assert checkpoints == 3 * hops
        assert answered == ["done"] * (3 * evaluations)
        per_hop = ("hop.leased", "checkpoint.stored", "hop.committed", "hop.validated")
        assert {kind: kinds[kind] for kind in per_hop} == dict.fromkeys(per_hop, 3 * hops)
        assert kinds["run.created"] == kinds["run.completed"] == 3
        # created and completed; four events per hop; each evaluation requested and answered
        assert verification.last_seq == 3 * (2 + 4 * hops + 2 * evaluations)
    finally:
        ledger.close()


def test_the_verify_phase_measures_the_verify_processes_alone(tmp_path: Path) -> None:
    """The verify figures come from `baton ledger verify`'s own process tree (not the largest
    of every process the benchmark started): a real verify of a small ledger of its events."""
    import argparse
    import subprocess
    import sys

    # A child of this process far larger than any verify: before session 34 its peak was read
    # as verify's (getrusage of all children). The parent's own size (an xdist worker's can be
    # over 1 GiB) must not count either: Linux carries it into a child's ru_maxrss at exec.
    touch_400_mib = "b = bytearray(400 * 2**20); b[::4096] = b'x' * len(b[::4096])"
    subprocess.run([sys.executable, "-c", touch_400_mib], check=True)
    with benchmark_module("scale.py", "scale_benchmark") as scale:
        figures = scale.verify_benchmark(argparse.Namespace(events=300, hops=5), tmp_path)
    assert figures["events"] == 300
    assert figures["verify_output"][0].startswith("ledger verifies: 300 events")
    assert 0 < figures["verify_peak_rss_mib"] <= figures["verify_peak_tree_rss_mib"] < 400
    assert figures["verify_peak_tree_rss_mib"] >= figures["verify_peak_tree_pss_mib"] > 0
