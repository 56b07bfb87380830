"""Which tests pytest-xdist runs together on one worker (`make test XDIST=2`: `--dist loadgroup`).

Loaded by tests/conftest.py; a plugin module of its own so that tests/test_xdist_groups.py can load
it into a pytest run of a small project (`-p tests.xdist_groups`).
"""

from __future__ import annotations

import pytest

# Handed out before the other tests, longest work first: the tests that start real coordinator,
# site or pytest processes (10-60 s each). In collection order they came in the middle and at the
# very end (test_xdist_groups.py), so the run could end with one worker on a long test while the
# other had nothing left; first, the many short tests after them even out the two workers' ends
# (xdist's loadgroup hands out the groups of several tests first, then the rest in this order).
LONG_FIRST = ("tests/integration/", "tests/deploy_tests/", "tests/test_xdist_groups.py")


@pytest.hookimpl(tryfirst=True)  # before xdist's worker reads the groups
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under pytest-xdist, keeps together on one worker the tests that share something costly:
    all Ray tests (one Ray head at a time on the machine: two at once hand their drivers the
    same port, 10002, and one driver aborts, taking its worker down), and the tests of a module
    that share a module- or class-scoped fixture (a trained model, a Ray head), which would
    otherwise be built once on each worker. The other tests go one by one to whichever worker
    is free."""
    if not config.pluginmanager.hasplugin("xdist"):
        return
    for item in items:
        if item.get_closest_marker("xdist_group") is not None:
            continue
        fixtures = getattr(item, "_fixtureinfo", None)
        shared = fixtures is not None and any(
            definitions[-1].scope in ("class", "module", "package")
            for definitions in fixtures.name2fixturedefs.values()
        )
        module = getattr(item, "module", None)
        if item.get_closest_marker("ray") is not None or (
            shared and module is not None and hasattr(module, "ray_head")
        ):
            item.add_marker(pytest.mark.xdist_group("ray"))
        elif shared and module is not None:
            item.add_marker(pytest.mark.xdist_group(module.__name__))
    if hasattr(config, "workerinput"):  # the scheduler hands tests out in its workers' order
        items[:] = sorted(items, key=lambda item: not item.nodeid.startswith(LONG_FIRST))


class _GroupInNodeId:
    """Puts a test's group in its node id where xdist's worker could not.

    xdist's worker tells the scheduler a test's group by appending it to the node id
    (``path::test@group``), by assigning ``item._nodeid``. pytest 9.2 keeps the node id in a
    structured ``item._id`` instead, so that assignment is lost and `--dist loadgroup` silently
    runs every test on its own (pytest-dev/pytest-xdist#1386): both workers then started a Ray
    head and a worker died. Runs after xdist's hook; does nothing where xdist's suffix took.
    """

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(
        self, config: pytest.Config, items: list[pytest.Item]
    ) -> None:
        if not getattr(config.option, "loadgroup", False):  # set on xdist's workers only
            return
        for item in items:
            names = {
                str(mark.args[0] if mark.args else mark.kwargs.get("name", "default"))
                for mark in item.iter_markers("xdist_group")
            }
            if not names:
                continue
            suffix = "@" + "_".join(sorted(names))
            if item.nodeid.endswith(suffix):
                continue
            node_id = getattr(item, "_id", None)
            if node_id is None or not hasattr(node_id, "parse"):
                raise pytest.UsageError(
                    f"cannot give {item.nodeid} its xdist group: this pytest keeps node ids in a "
                    "way tests/xdist_groups.py does not know; run without XDIST"
                )
            item._id = node_id.parse(item.nodeid + suffix)


def pytest_configure(config: pytest.Config) -> None:
    config.pluginmanager.register(_GroupInNodeId(), "baton-xdist-group-in-node-id")
