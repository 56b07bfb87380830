"""`serve` announces its gRPC port, then settles the heap of everything start-up built."""

from __future__ import annotations

import asyncio
import gc
import os
import signal
from pathlib import Path

from coordinator.server import serve
from tests.conftest import Pki
from tests.coordinator_tests.conftest import coordinator_settings


def test_serve_freezes_the_start_up_heap_out_of_full_collections(pki: Pki, tmp_path: Path) -> None:
    settings = coordinator_settings(
        pki,
        tmp_path / "state",
        database_url=f"sqlite:///{tmp_path / 'ledger.sqlite3'}",
        port_file=tmp_path / "port",
        dashboard=False,
        shutdown_grace=0,
    )
    frozen: list[int] = []

    async def main() -> None:
        serving = asyncio.create_task(serve(settings))
        while not settings.port_file or not settings.port_file.exists():
            await asyncio.sleep(0.02)
        for _ in range(250):  # serve settles the heap right after its port file
            frozen.append(gc.get_freeze_count())
            if frozen[-1] or serving.done():
                break
            await asyncio.sleep(0.02)
        os.kill(os.getpid(), signal.SIGTERM)  # serve's own handler: a clean stop
        await asyncio.wait_for(serving, 30)

    gc.unfreeze()
    try:
        asyncio.run(main())
    finally:
        gc.unfreeze()
    assert frozen[-1] > 0
