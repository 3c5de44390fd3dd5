"""Calls over one multiplexed peer connection (kvd.client.Client.call, kvd.net.connection):
many requests in flight share one send, each reply reaches its own caller whatever the
order of the replies, and a connection that dies fails every waiting call at once."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from kvd.client import Client
from kvd.errors import BadRequest, ConnectFailed
from kvd.net.connection import FrameConnection
from kvd.proto import codec
from kvd.proto.messages import MsgType


class CountingStream(trio.abc.Stream):
    """A stream that counts its send_all calls (the syscalls a socket would make)."""

    def __init__(self, inner: trio.abc.Stream):
        self.inner = inner
        self.sends = 0

    async def send_all(self, data) -> None:
        self.sends += 1
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes=None) -> bytes:
        return await self.inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.inner.aclose()


async def _requests(server: FrameConnection, count: int) -> list:
    got = []
    while len(got) < count:
        message = await server.receive()
        assert message is not None
        got.append(message)
    return got


async def test_concurrent_calls_share_sends_and_get_their_own_replies():
    ours, theirs = trio.testing.memory_stream_pair()
    counting = CountingStream(ours)
    client = Client(FrameConnection(counting, 1 << 20), {"node": "peer", "max_frame": 1 << 20})
    server = FrameConnection(theirs, 1 << 20)
    answers: dict[bytes, object] = {}

    async def one(i: int) -> None:
        key = b"key-%03d" % i
        try:
            answers[key] = await client.call(MsgType.REPLICA_GET, {"op": "get", "key": key},
                                             MsgType.REPLICA_GET_REPLY)
        except BadRequest as exc:
            answers[key] = str(exc)

    calls = 40
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client._reader)
        async with trio.open_nursery() as callers:
            for i in range(calls):
                callers.start_soon(one, i)
            requests = await _requests(server, calls)
            assert len({m.request_id for m in requests}) == calls  # one id per call
            # Replies in reverse order, one frame an error, all in one send.
            frames = []
            for message in reversed(requests):
                key = message.fields["key"]
                if key == b"key-007":
                    frames.append(codec.encode(MsgType.ERROR, message.request_id,
                                               {"code": "bad_request", "message": "no 7"}))
                else:
                    frames.append(codec.encode(MsgType.REPLICA_GET_REPLY, message.request_id,
                                               {"data": key}))
            await server.send(b"".join(frames))
        nursery.cancel_scope.cancel()
    assert answers.pop(b"key-007") == "no 7"
    assert answers == {key: {"data": key} for key in answers} and len(answers) == calls - 1
    # The requests queued in one loop iteration went out together, not one send each.
    assert counting.sends <= 3, counting.sends
    assert not client._waiting


async def test_a_dead_connection_fails_every_waiting_call_at_once(autojump_clock):
    """On the autojump clock (memory streams, no threads): a call left waiting for a timeout
    would show as simulated seconds after the close, and a host that stalls the process
    cannot add real ones (a 0.5 s wall-clock window could fail so)."""
    ours, theirs = trio.testing.memory_stream_pair()
    client = Client(FrameConnection(ours, 1 << 20), {"node": "peer", "max_frame": 1 << 20})
    server = FrameConnection(theirs, 1 << 20)
    failures = []

    async def one(i: int) -> None:
        with pytest.raises(ConnectFailed) as caught:
            await client.call(MsgType.REPLICA_GET, {"op": "get", "key": b"k%d" % i},
                              MsgType.REPLICA_GET_REPLY)
        failures.append((i, trio.current_time(), str(caught.value)))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(client._reader)
        async with trio.open_nursery() as callers:
            for i in range(10):
                callers.start_soon(one, i)
            await _requests(server, 10)
            closed_at = trio.current_time()
            await theirs.aclose()  # the peer's end goes away with ten calls waiting
        nursery.cancel_scope.cancel()
    assert sorted(i for i, _, _ in failures) == list(range(10))
    assert all(at - closed_at < 0.5 for _, at, _ in failures)
    assert all("closed the connection" in why for _, _, why in failures)
    assert client.closed.is_set() and not client._waiting
    with pytest.raises(ConnectFailed):  # and the next call fails at once too
        await client.call(MsgType.PING, {}, MsgType.PONG)


async def test_a_cancelled_call_leaves_its_late_reply_to_nobody(autojump_clock):
    """A caller whose deadline passed is gone: the reply that arrives afterwards is dropped,
    and the connection carries the next call as before."""
    ours, theirs = trio.testing.memory_stream_pair()
    client = Client(FrameConnection(ours, 1 << 20), {"node": "peer", "max_frame": 1 << 20})
    server = FrameConnection(theirs, 1 << 20)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client._reader)
        with trio.move_on_after(1) as waited:
            await client.call(MsgType.REPLICA_GET, {"op": "get", "key": b"late"},
                              MsgType.REPLICA_GET_REPLY)
        assert waited.cancelled_caught and not client._waiting
        [late] = await _requests(server, 1)
        await server.send(codec.encode(MsgType.REPLICA_GET_REPLY, late.request_id,
                                       {"data": b"late"}))

        async def answer_next() -> None:
            [request] = await _requests(server, 1)
            await server.send(codec.encode(MsgType.REPLICA_GET_REPLY, request.request_id,
                                           {"data": b"next"}))

        nursery.start_soon(answer_next)
        reply = await client.call(MsgType.REPLICA_GET, {"op": "get", "key": b"next"},
                                  MsgType.REPLICA_GET_REPLY)
        assert reply == {"data": b"next"} and not client._waiting
        nursery.cancel_scope.cancel()
