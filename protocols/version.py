"""Baton's release version (pyproject reads it from here) and the wire protocol's version."""

from __future__ import annotations

__all__ = ["BATON_VERSION", "PROTOCOL_VERSION"]

BATON_VERSION = "0.1.0"
# Both ends refuse a peer speaking another protocol version (Hello / HelloReply).
PROTOCOL_VERSION = 1
