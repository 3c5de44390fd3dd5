"""kvd.net.rawstream: the serving hot path's direct syscalls keep trio's stream semantics
(real TCP on loopback): bytes in order, big sends wait for room, never starving the other
tasks, a reset peer is BrokenResourceError, a closed socket is never touched."""

from __future__ import annotations

import socket

import pytest
import trio
import trio.testing

from kvd.net import rawstream


async def _pair():
    """(RawStream of the accepted side, the connecting side's trio stream, listener)."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    client = await trio.open_tcp_stream("127.0.0.1", port)
    accepted = await listeners[0].accept()
    raw = rawstream.wrap(accepted)
    assert isinstance(raw, rawstream.RawStream)
    return raw, client, listeners[0]


async def test_bytes_arrive_in_order_and_a_big_send_waits_for_room():
    raw, client, listener = await _pair()
    payload = bytes(range(256)) * 40000  # 10 MB: far more than the socket buffers hold
    received = bytearray()

    async def read_all():
        while len(received) < len(payload):
            received.extend(await client.receive_some(65536))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read_all)
        await raw.send_all(payload)
    assert received == payload
    await client.send_all(b"*1\r\n$4\r\nPING\r\n" * 3)
    got = b""
    while len(got) < 42:
        got += await raw.receive_some(1024)
    assert got == b"*1\r\n$4\r\nPING\r\n" * 3
    await client.aclose()
    assert await raw.receive_some(1024) == b""  # end of stream, as trio says it
    await raw.aclose()
    await listener.aclose()


async def test_a_peer_that_always_has_more_does_not_starve_other_tasks():
    """Rule 1: full reads never wait, but each still passes through the scheduler."""
    raw, client, listener = await _pair()
    ticks = 0
    reading = True

    async def ticker():
        nonlocal ticks
        while reading:
            ticks += 1
            await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.send_all, b"x" * 200_000)
        await trio.sleep(0.2)  # the socket buffers are full: every read below is whole
        nursery.start_soon(ticker)
        await trio.lowlevel.checkpoint()
        got = 0
        for _ in range(100):  # 100 full reads of 1 KiB
            got += len(await raw.receive_some(1024))
        reading = False
        nursery.cancel_scope.cancel()
    assert got == 100 * 1024
    assert ticks >= 90  # the other task ran between (nearly) every two reads
    await raw.aclose()
    await client.aclose()
    await listener.aclose()


async def test_a_reset_peer_is_a_broken_resource():
    raw, client, listener = await _pair()
    client.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00" * 2)
    await client.aclose()  # linger 0: RST
    await trio.sleep(0.05)
    with pytest.raises(trio.BrokenResourceError):
        for _ in range(100):
            await raw.send_all(b"x" * 65536)
    await raw.aclose()
    await listener.aclose()


async def test_a_closed_socket_is_never_read_or_written():
    """Rule 3: once the trio socket is closed its descriptor number may be another's."""
    raw, client, listener = await _pair()
    await raw.stream.aclose()
    with pytest.raises(trio.ClosedResourceError):
        await raw.receive_some(10)
    with pytest.raises(trio.ClosedResourceError):
        await raw.send_all(b"x")
    await client.aclose()
    await listener.aclose()


async def test_a_close_while_waiting_wakes_the_reader():
    raw, client, listener = await _pair()
    async with trio.open_nursery() as nursery:

        async def close_soon():
            await trio.sleep(0.05)
            await raw.stream.aclose()

        nursery.start_soon(close_soon)
        with pytest.raises(trio.ClosedResourceError):
            await raw.receive_some(10)
    await client.aclose()
    await listener.aclose()


async def test_only_plain_socket_streams_are_wrapped():
    """Rule 4: TLS and in-memory streams keep their own layer."""
    memory, _ = trio.testing.memory_stream_pair()
    assert rawstream.wrap(memory) is memory
