"""Shared fixtures: a throwaway consortium PKI, and a coordinator served on localhost:0."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from protocols.pki import Role, init_ca, issue_certificate
from protocols.transport import TlsFiles

SITES = ("site-a", "site-b", "site-c")


@dataclass(frozen=True)
class Pki:
    directory: Path
    foreign: Path  # a second CA with a site certificate named like a real one

    def tls(self, name: str) -> TlsFiles:
        return TlsFiles(self.directory / "ca.crt", self.directory / f"{name}.crt",
                        self.directory / f"{name}.key")  # fmt: skip

    def foreign_tls(self, name: str) -> TlsFiles:
        return TlsFiles(self.directory / "ca.crt", self.foreign / f"{name}.crt",
                        self.foreign / f"{name}.key")  # fmt: skip


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    root = tmp_path_factory.mktemp("pki")
    init_ca(root)
    issue_certificate(root, root, Role.COORDINATOR, "coordinator")
    issue_certificate(root, root, Role.ADMIN, "admin")
    for site in SITES:
        issue_certificate(root, root, Role.SITE, site)
    foreign = tmp_path_factory.mktemp("foreign-pki")
    init_ca(foreign)
    issue_certificate(foreign, foreign, Role.SITE, "site-a")
    return Pki(root, foreign)


class LoopThread:
    """An asyncio loop on a background thread, for running the coordinator under sync tests."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro, timeout: float = 30):  # type: ignore[no-untyped-def]
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture
def loop_thread() -> Iterator[LoopThread]:
    lt = LoopThread()
    yield lt
    lt.close()
