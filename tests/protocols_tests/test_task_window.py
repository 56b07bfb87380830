"""A site's channel lets a whole task message (its input adapter inside) arrive on a stream
without waiting for a flow-control window update, from the session's first task on."""

from __future__ import annotations

from protocols import transport


def test_a_sites_channel_opens_streams_with_a_window_for_a_whole_task() -> None:
    options = dict(transport._CLIENT_OPTIONS)

    assert options.get("grpc.http2.lookahead_bytes", 0) >= transport.MAX_MESSAGE_BYTES
