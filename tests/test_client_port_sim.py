"""The native client port's connection handling on one simulated node (in-process, on the
autojump clock): GETs the node answers from its own store are answered by the connection's
reader, with no task each, and a request that waits does not hold up those behind it. The
bound on a client that never reads its replies needs a real socket's back pressure: it is
in tests/test_single_node.py."""

from __future__ import annotations

import trio

from kvd.net.connection import FrameConnection, run_handshake
from kvd.proto import codec
from kvd.proto.handshake import ClientHandshake
from kvd.proto.messages import MsgType


class SpawnCount(trio.abc.Instrument):
    def __init__(self) -> None:
        self.spawned = 0

    def task_spawned(self, task) -> None:
        self.spawned += 1


async def _raw_client(sim, name: str) -> FrameConnection:
    """A framed connection to ``name``'s client port, past its handshake."""
    address = sim.nodes[name].address
    stream = await sim.net.connector(sim.client_address())(address)
    conn = FrameConnection(stream)
    machine = ClientHandshake(address, None)
    await conn.finish_handshake(machine, await run_handshake(stream, machine))
    conn.max_frame = 1 << 24
    return conn


def _get(rid: int, key: bytes) -> bytes:
    return codec.encode(MsgType.GET, rid, {"key": key})


async def test_gets_a_node_answers_alone_take_no_task_each(sim, autojump_clock):
    await sim.form(["n1"])
    async with sim.open_client("n1", sim.client_address()) as client:
        await client.put(b"k", b"v")
    conn = await _raw_client(sim, "n1")
    count = SpawnCount()
    trio.lowlevel.add_instrument(count)
    try:
        await conn.stream.send_all(b"".join(_get(rid, b"k") for rid in range(1, 201)))
        replies = [await conn.receive() for _ in range(200)]
    finally:
        trio.lowlevel.remove_instrument(count)
    assert [m.request_id for m in replies] == list(range(1, 201))  # one read, in order
    assert all(m.type == MsgType.GET_REPLY and m.fields["siblings"][0]["value"] == b"v"
               for m in replies)
    assert count.spawned < 20, f"{count.spawned} tasks for 200 GETs"
    assert not sim.crashes, sim.crashes


async def test_a_request_that_waits_does_not_hold_up_the_gets_behind_it(sim, autojump_clock):
    await sim.form(["n1"])
    conn = await _raw_client(sim, "n1")
    # A streamed PUT whose value has not come yet waits for its CHUNK frames...
    await conn.send(codec.encode(MsgType.PUT, 1, {"key": b"slow", "length": 3}))
    await conn.send(b"".join(_get(rid, b"absent") for rid in range(2, 12)))
    replies = [await conn.receive() for _ in range(10)]
    # ...while the GETs behind it are answered.
    assert [(m.type, m.request_id) for m in replies] == [
        (MsgType.GET_REPLY, rid) for rid in range(2, 12)]
    assert not any(m.fields["found"] for m in replies)
    await conn.send(codec.encode_chunk(1, b"abc", end=True))
    written = await conn.receive()
    assert (written.type, written.request_id) == (MsgType.PUT_REPLY, 1)
    # A streamed value is streamed back after its GET_REPLY (by a task of its own).
    await conn.send(_get(12, b"slow") + _get(13, b"absent"))
    got = [await conn.receive() for _ in range(3)]
    assert sorted((m.type, m.request_id) for m in got) == [
        (MsgType.GET_REPLY, 12), (MsgType.GET_REPLY, 13), (MsgType.CHUNK, 12)]
    assert [m.fields["data"] for m in got if m.type == MsgType.CHUNK] == [b"abc"]
    assert not sim.crashes, sim.crashes
