"""A Flower app for benchmarks/handoff.py (copied next to tabular_job.py at run time)."""
