"""Both services let a thread that waits for the interpreter have it within half a millisecond
(`protocols.interpreter`): the coordinator's ledger writer, say, while its event loop works."""

from __future__ import annotations

import sys
from collections.abc import Iterator

import pytest

from protocols.interpreter import (
    CPYTHON_SWITCH_INTERVAL_SECONDS,
    SWITCH_INTERVAL_SECONDS,
    quick_thread_switches,
)


@pytest.fixture
def default_switch_interval() -> Iterator[None]:
    before = sys.getswitchinterval()
    sys.setswitchinterval(CPYTHON_SWITCH_INTERVAL_SECONDS)
    try:
        yield
    finally:
        sys.setswitchinterval(before)


@pytest.mark.usefixtures("default_switch_interval")
def test_quick_thread_switches_sets_the_processs_switch_interval() -> None:
    quick_thread_switches()
    assert sys.getswitchinterval() == pytest.approx(SWITCH_INTERVAL_SECONDS)
    assert SWITCH_INTERVAL_SECONDS < CPYTHON_SWITCH_INTERVAL_SECONDS
