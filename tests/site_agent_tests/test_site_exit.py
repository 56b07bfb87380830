"""A stopped site's process ends without the interpreter's teardown, and loses nothing by it."""

from __future__ import annotations

import subprocess
import sys

_SCRIPT = """
import atexit, sys, threading, time

class Teardown:
    def __del__(self):
        print("teardown ran", flush=True)

kept = Teardown()
atexit.register(lambda: print("exit handler ran"))

def late():
    time.sleep(0.2)
    print("thread finished")

threading.Thread(target=late).start()
print("buffered line")  # a pipe: block-buffered, never flushed before the end
"""


def _run(ending: str) -> list[str]:
    done = subprocess.run(
        [sys.executable, "-c", _SCRIPT + ending], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0 and not done.stderr, done.stderr
    return done.stdout.splitlines()


def test_a_stopped_site_ends_after_its_threads_and_exit_handlers_without_the_teardown() -> None:
    # The interpreter's teardown (here the __del__ of a module's object) is what costs a site
    # with torch loaded seconds of collections after SIGTERM.
    assert _run("sys.exit(0)\n")[-1] == "teardown ran"
    lines = _run("from site_agent.cli import _end_process\n_end_process()\n")
    assert lines == ["buffered line", "thread finished", "exit handler ran"]


def test_the_site_cli_loads_the_agent_only_for_serve() -> None:
    # `baton-site --help`, `data`, `cert` and `doctor` (run ~10 times a suite as processes)
    # paid ~1 s of CPU importing the agent, gRPC stubs and all, through the package's names.
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from site_agent.cli import app\n"
        "assert CliRunner().invoke(app, ['--help']).exit_code == 0\n"
        "assert 'site_agent.agent' not in sys.modules, 'the CLI imported the agent'\n"
        "from site_agent import SiteAgent, SiteSettings\n"
        "print(SiteAgent.__module__, SiteSettings.__module__)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["site_agent.agent", "site_agent.settings"]
