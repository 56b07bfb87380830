"""Which coordinator targets a site dials through its HTTP CONNECT proxy."""

from __future__ import annotations

import pytest

from protocols.transport import proxy_for

PROXY = "http://proxy.hospital.local:3128"


@pytest.mark.parametrize(
    ("target", "no_proxy", "expected"),
    [
        ("coord.example.org:50051", "", PROXY),
        ("coord.example.org:50051", "example.org", None),
        ("coord.example.org:50051", ".example.org", None),
        ("coord.example.org:50051", "*.example.org", None),
        ("coord.example.org:50051", "ample.org", PROXY),
        ("coord.example.org:50051", "other.org, COORD.example.org", None),
        ("coord.example.org:50051", "coord.example.org:443", PROXY),
        ("coord.example.org:50051", "coord.example.org:50051", None),
        ("10.1.2.3:50051", "10.0.0.0/8", None),
        ("10.1.2.3:50051", "192.168.0.0/16", PROXY),
        ("[::1]:50051", "::1", None),
        ("localhost:50051", "*", None),
    ],
)
def test_no_proxy_entries_decide_whether_the_channel_is_tunnelled(
    target: str, no_proxy: str, expected: str | None
) -> None:
    assert proxy_for(target, {"https_proxy": PROXY, "no_proxy": no_proxy}) == expected


def test_grpc_proxy_wins_over_https_proxy_and_upper_case_names_count() -> None:
    env = {"grpc_proxy": "http://grpc:1", "HTTPS_PROXY": "http://https:2"}
    assert proxy_for("coord:1", env) == "http://grpc:1"
    assert proxy_for("coord:1", {"HTTPS_PROXY": "http://https:2"}) == "http://https:2"
    assert proxy_for("coord:1", {"NO_PROXY": "coord", "HTTP_PROXY": "http://h:3"}) is None


def test_without_a_proxy_variable_the_channel_dials_directly() -> None:
    assert proxy_for("coord.example.org:50051", {"no_proxy": "x"}) is None
