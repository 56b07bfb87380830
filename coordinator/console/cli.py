"""The `baton` command: `baton GROUP ...` builds and imports that command group alone.

Typer turns every command of the tree into a click command before it parses the first argument,
and the tree's modules import rich tables, the simulators' registry and the rest: a third of
`baton coordinator serve`'s CPU to ready, for commands it never runs. The whole tree
(`coordinator.console.root`, also `app` here) answers the rest: the root's help and the
top-level commands.
"""

from __future__ import annotations

import gc
import importlib
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import typer

__all__ = ["GROUPS", "app", "group_app", "main", "new_root"]

app: typer.Typer  # the whole tree (coordinator.console.root), built by __getattr__ when first used

# Each command group of `baton`: the module and the name of its Typer app.
GROUPS: dict[str, tuple[str, str]] = {
    "pki": ("coordinator.console.pki_commands", "pki_app"),
    "coordinator": ("coordinator.console.coordinator_commands", "coordinator_app"),
    "run": ("coordinator.console.run_commands", "run_app"),
    "ledger": ("coordinator.console.ledger_commands", "ledger_app"),
    "statistics": ("coordinator.console.statistics_commands", "statistics_app"),
    "store": ("coordinator.console.ledger_commands", "store_app"),
    "db": ("coordinator.console.db_commands", "db_app"),
    "admin": ("coordinator.console.admin_cli", "admin_app"),
    "study": ("coordinator.console.study_cli", "study_app"),  # Optuna: imported when named
}


def group_app(name: str) -> typer.Typer:
    """The Typer app of the command group `name` (its module imported now)."""
    module, attribute = GROUPS[name]
    group: typer.Typer = getattr(importlib.import_module(module), attribute)
    return group


def new_root(**options: Any) -> typer.Typer:
    """The `baton` root, without its commands (the whole tree's and a single group's)."""
    import typer

    return typer.Typer(
        pretty_exceptions_show_locals=False,
        help="Baton coordinator: sequential LoRA training across hospitals.",
        no_args_is_help=True,
        **options,
    )


def main() -> None:
    name = sys.argv[1] if len(sys.argv) > 1 else ""
    # `coordinator serve` turns the cyclic collector off for its start (coordinator_commands):
    # off from here already, its passes over the imports before the command runs (typer, pydantic,
    # cryptography: ~30 ms of CPU) find nothing either. On again at ready, or when this returns.
    collecting = gc.isenabled() and sys.argv[1:3] == ["coordinator", "serve"]
    if collecting:
        gc.disable()
    try:
        if name in GROUPS:
            root = new_root()
            root.add_typer(group_app(name), name=name)
        else:
            from coordinator.console.root import app as root
        root()
    finally:
        if collecting:
            gc.enable()


def __getattr__(name: str) -> typer.Typer:
    if name == "app":  # the whole tree, built on first use
        from coordinator.console.root import app

        return app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
