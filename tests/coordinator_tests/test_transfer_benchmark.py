"""benchmarks/transfer.py reports each interleaved pair's ratio beside the ratio of medians."""

from __future__ import annotations

from tests.benchmark_module import benchmark_module


def test_each_pairs_ratio_is_reported_in_the_order_the_pairs_ran() -> None:
    with benchmark_module("transfer.py", "transfer_benchmark") as transfer:
        # raw took 1 s, then Baton 1.25 s: 0.8 of raw's throughput; then 1 s against 2 s.
        assert transfer._pair_ratios([1.0, 1.0, 2.0], [1.25, 2.0, 2.0]) == [0.8, 0.5, 1.0]
        row = {"size_mib": 100, "chunk_kib": 1024, "upload_ratio_pairs": [0.8, 0.5, 1.0],
               "download_ratio_pairs": [0.9, 0.95, 1.1]}  # fmt: skip
        line = transfer._pairs_line(row)
        assert transfer._pairs_line({"size_mib": 1, "chunk_kib": 1024}) == ""
    assert line == (
        "* 100 MiB, 1024 KiB chunks: up ratio per pair 0.8, 0.5, 1.0 (median 0.80, 2 of 3 "
        ">= 0.8); down 0.9, 0.95, 1.1 (median 0.95)"
    )
