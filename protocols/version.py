"""Baton's release version (pyproject reads it from here) and the wire protocol's version."""

from __future__ import annotations

__all__ = ["BATON_VERSION", "PROTOCOL_VERSION"]

BATON_VERSION = "0.1.0"
# Both ends refuse a peer speaking another protocol version (Hello / HelloReply).
# Additions that older peers can ignore keep the version: HandBackHop (a finished hop's bundle
# and result in one call) is one. A coordinator still takes the two-call hand back of older
# sites (UploadCheckpoint, then ReportHopResult); a site falls back to it when an older
# coordinator answers HandBackHop with UNIMPLEMENTED. HandBackHopWhole (a small hop's hand back
# in one message) is another: a site falls back to HandBackHop when it is UNIMPLEMENTED.
PROTOCOL_VERSION = 1
