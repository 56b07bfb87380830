"""A site agent lets a thread that waits for the interpreter have it within half a millisecond
(`protocols.interpreter`): its hop and its heartbeat threads take turns on it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from protocols.interpreter import CPYTHON_SWITCH_INTERVAL_SECONDS, SWITCH_INTERVAL_SECONDS
from tests.site_agent_tests.helpers import statistics_agent


def test_a_site_agent_switches_threads_quickly(tmp_path: Path) -> None:
    before = sys.getswitchinterval()
    sys.setswitchinterval(CPYTHON_SWITCH_INTERVAL_SECONDS)
    try:
        statistics_agent(tmp_path, csv_seed=0)
        assert sys.getswitchinterval() == pytest.approx(SWITCH_INTERVAL_SECONDS)
    finally:
        sys.setswitchinterval(before)
