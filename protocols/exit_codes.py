"""Exit codes of the `baton` and `baton-site` commands, one definition for scripts and systemd.

0 is success; 1 the work itself failed; 2 bad input (plan, settings, files); 3 the other end
could not be used (`baton`: the coordinator did not answer; `baton-site`: the coordinator was
refused, e.g. its ledger history was rewritten).
"""

from __future__ import annotations

__all__ = [
    "EXIT_BAD_INPUT",
    "EXIT_CHECKS_FAILED",
    "EXIT_HISTORY_REWRITTEN",
    "EXIT_INTERRUPTED",
    "EXIT_REFUSED",
    "EXIT_RUN_FAILED",
    "EXIT_UNREACHABLE",
]

EXIT_RUN_FAILED = 1  # `baton`: the run (or statistics request, study) did not complete
EXIT_CHECKS_FAILED = 1  # `baton-site doctor`: at least one check failed
EXIT_BAD_INPUT = 2
EXIT_UNREACHABLE = 3  # `baton`: the coordinator is unreachable
EXIT_REFUSED = 3  # `baton-site`: the site refused the coordinator
EXIT_HISTORY_REWRITTEN = EXIT_REFUSED
EXIT_INTERRUPTED = 130  # `baton study start` stopped by SIGINT (as a shell reports it)
