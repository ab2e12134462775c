"""The control channel's framing, and a real socketpair between two loops' ends."""

from __future__ import annotations

import asyncio
import socket
import struct

import pytest

from poise.control.channel import MAX_FRAME, Channel, FrameReader, encode


def test_frames_split_anywhere_are_reassembled_in_order():
    data = encode({"a": 1}) + encode({"b": [1, 2, 3]}) + encode({"c": "é"})
    for cut in range(len(data) + 1):
        reader = FrameReader()
        got = reader.feed(data[:cut]) + reader.feed(data[cut:])
        assert got == [{"a": 1}, {"b": [1, 2, 3]}, {"c": "é"}]


@pytest.mark.parametrize("frame", [
    struct.pack(">I", MAX_FRAME + 1),
    struct.pack(">I", 2) + b"[]",
    struct.pack(">I", 3) + b"{x}",
    struct.pack(">I", 2) + b"\xff\xfe",
])
def test_malformed_frames_are_value_errors(frame):
    with pytest.raises(ValueError):
        FrameReader().feed(frame)


async def test_messages_cross_a_socketpair_and_close_is_seen():
    a, b = socket.socketpair()
    got: list[dict] = []
    closed = asyncio.Event()
    left = await Channel.open(a, lambda m: None)
    await Channel.open(b, got.append, closed.set)
    for i in range(100):
        assert left.send({"i": i, "pad": "x" * 1000})
    await left.aclose()
    await asyncio.wait_for(closed.wait(), 5)
    assert [m["i"] for m in got] == list(range(100))
    assert left.send({"late": True}) is False


async def test_a_malformed_frame_closes_the_channel():
    a, b = socket.socketpair()
    closed = asyncio.Event()
    await Channel.open(b, lambda m: None, closed.set)
    a.sendall(struct.pack(">I", 2) + b"[]")
    await asyncio.wait_for(closed.wait(), 5)
    a.close()
