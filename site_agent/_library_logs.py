"""Routes the ML libraries' own output (transformers, tqdm, warnings) through logging."""

from __future__ import annotations

__all__ = ["route_library_output"]


def route_library_output() -> None:
    """No load reports in a service log; library errors become records.

    transformers logs through its own stderr handler by default: it is removed and its records
    propagate to the service's handler (JSON or text), at ERROR and above only, so per-load
    reports ("weights newly initialized") stay out of the log while real errors stay in.

    Safe on any thread: it never writes the environment (``setenv`` races ``getenv`` on gRPC's
    threads). The environment part, ``protocols.logs.quiet_progress_output``, is the CLI's, run
    before any thread starts.
    """
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # type: ignore[no-untyped-call]
    hf_logging.disable_default_handler()
    hf_logging.enable_propagation()
    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
