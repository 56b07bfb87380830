"""Log handlers for both services' CLIs (plain or JSON lines); libraries only use getLogger.

JSON records carry the run, hop and site they concern: from `extra={"run_id": ...}` on the call,
or from the `log_context(...)` in force where the record was made (a context variable, so it
follows asyncio tasks and stays per thread).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from collections.abc import Iterator
from contextvars import ContextVar
from datetime import UTC, datetime

__all__ = [
    "CONTEXT_FIELDS",
    "bind_log_context",
    "configure_logging",
    "log_context",
    "quiet_progress_output",
]

CONTEXT_FIELDS = ("run_id", "hop_id", "site")
_CONTEXT: ContextVar[dict[str, str]] = ContextVar("baton_log_context", default={})  # noqa: B039


@contextlib.contextmanager
def log_context(**fields: str | None) -> Iterator[None]:
    """Adds run_id / hop_id / site to every record logged inside the block."""
    unknown = set(fields) - set(CONTEXT_FIELDS)
    if unknown:
        raise ValueError(f"unknown log context field(s): {', '.join(sorted(unknown))}")
    token = _CONTEXT.set(_CONTEXT.get() | {k: v for k, v in fields.items() if v})
    try:
        yield
    finally:
        _CONTEXT.reset(token)


def bind_log_context(**fields: str | None) -> None:
    """Adds fields for the rest of the current context (e.g. one gRPC call's asyncio task)."""
    unknown = set(fields) - set(CONTEXT_FIELDS)
    if unknown:
        raise ValueError(f"unknown log context field(s): {', '.join(sorted(unknown))}")
    _CONTEXT.set(_CONTEXT.get() | {k: v for k, v in fields.items() if v})


class _ContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        for name, value in _CONTEXT.get().items():
            if not getattr(record, name, None):
                setattr(record, name, value)
        return True


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in CONTEXT_FIELDS:
            value = getattr(record, name, None)
            if value:
                entry[name] = str(value)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure_logging(level: str = "INFO", json_logs: bool = False) -> None:
    """Sends logs to stderr, as JSON lines for services run under a supervisor if asked.

    Python warnings are routed through logging too (logger `py.warnings`), so a JSON log
    stays one JSON object per line.
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_ContextFilter())
    handler.setFormatter(
        _JsonFormatter()
        if json_logs
        else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    logging.captureWarnings(True)


def quiet_progress_output() -> None:
    """Turns off progress bars the ML libraries would draw on a service's stderr.

    Set before those libraries are imported: huggingface_hub and tqdm read these at import.
    """
    for name in ("HF_HUB_DISABLE_PROGRESS_BARS", "TQDM_DISABLE", "TOKENIZERS_PARALLELISM"):
        os.environ.setdefault(name, "1" if name != "TOKENIZERS_PARALLELISM" else "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
