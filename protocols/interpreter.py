"""How often the interpreter lock changes hands between a service's threads.

Both services run their handoff on more than one thread: the coordinator commits a hand back
on its ledger writer's thread while its event loop builds and sends the next task; a site's
hop thread hands back while its heartbeat and gRPC threads answer. A thread that wants the
interpreter lock waits until the thread holding it lets go on its own (a blocking call) or
CPython's switch interval has passed: 5 ms by default, longer than most of a handoff's steps.
A probe of the coordinator's handoffs found the writer's commit starting up to 7.8 ms after it
was handed over, with the writer's thread idle, while the loop worked; each of the commit's
SQLite statements gives the lock up and must win it back. benchmarks/switch_interval.py
measures that wait at both settings.
"""

from __future__ import annotations

import sys

__all__ = ["CPYTHON_SWITCH_INTERVAL_SECONDS", "SWITCH_INTERVAL_SECONDS", "quick_thread_switches"]

CPYTHON_SWITCH_INTERVAL_SECONDS = 0.005  # `sys.getswitchinterval()` in a process that set none

# The interpreter's switch interval in a service: a waiting thread gets the lock within about
# this long. The cost is a switch check that much more often while two threads both compute,
# which a service's threads rarely do for long.
SWITCH_INTERVAL_SECONDS = 0.0005


def quick_thread_switches() -> None:
    """Sets this process's switch interval to `SWITCH_INTERVAL_SECONDS` (it applies to every
    thread of the process, and to those started later)."""
    sys.setswitchinterval(SWITCH_INTERVAL_SECONDS)
