"""The ML libraries' output goes through the service's logging, on every path that loads them,
and routing it never writes the environment from a thread (setenv races getenv)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

QUIET = ("HF_HUB_DISABLE_PROGRESS_BARS", "TQDM_DISABLE", "TOKENIZERS_PARALLELISM")


def _run(code: str) -> str:
    env = {k: v for k, v in os.environ.items() if k not in (*QUIET, "TRANSFORMERS_VERBOSITY")}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
    )
    return done.stdout.strip()


def test_routing_library_output_never_writes_the_environment() -> None:
    code = (
        "import os\n"
        "from site_agent._library_logs import route_library_output\n"
        "route_library_output()\n"
        f"print(sorted(name for name in {QUIET!r} if name in os.environ))\n"
    )
    assert _run(code) == "[]"


def test_the_statistics_token_count_routes_transformers_output_through_logging(
    tiny_model_dir: Path,
) -> None:
    code = (
        "import logging\n"
        "from pathlib import Path\n"
        "from site_agent.statistics import _token_lengths\n"
        f"print(_token_lengths(['chest pain'], Path({str(tiny_model_dir)!r})))\n"
        "from transformers.utils import logging as hf\n"
        "root = logging.getLogger('transformers')\n"
        "print(hf.get_verbosity() == hf.ERROR, root.handlers, root.propagate)\n"
    )
    lengths, routed = _run(code).splitlines()
    assert int(lengths.strip("[]")) > 2
    assert routed == "True [] True"
