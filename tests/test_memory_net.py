"""kvd.net.memory, the simulator's network: its numbered rules, one test each or so, on
trio's autojump MockClock (the times asserted are simulated seconds)."""

from __future__ import annotations

import socket

import pytest
import trio
import trio.testing

from kvd.errors import ConnectFailed
from kvd.net.memory import SEND_BUFFER, MemoryNetwork

USER_TIMEOUT = getattr(socket, "TCP_USER_TIMEOUT", 18)


async def echo(stream):
    try:
        while data := await stream.receive_some():
            await stream.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


async def _heal_at(net: MemoryNetwork, when: float) -> None:
    await trio.sleep_until(when)
    net.heal()


class Ends:
    """A serving address ``b`` whose accepted streams are kept, not handled."""

    def __init__(self) -> None:
        self.accepted: list[trio.abc.Stream] = []

    async def handler(self, stream) -> None:
        self.accepted.append(stream)
        await trio.sleep_forever()


async def _pair(nursery, net: MemoryNetwork):
    """A connection from ``a`` to ``b``: (the dialled end, the accepted end)."""
    ends = Ends()
    await nursery.start(net.serve, "a", echo)
    await nursery.start(net.serve, "b", ends.handler)
    client = await net.connect("a", "b")
    await trio.testing.wait_all_tasks_blocked()
    return client, ends.accepted[0]


async def _receive_at(stream, expected_bytes: int) -> tuple[bytes, float]:
    """Read ``expected_bytes`` (or to the end): what arrived and when the last of it did."""
    got = b""
    while len(got) < expected_bytes:
        data = await stream.receive_some()
        if not data:
            break
        got += data
    return got, trio.current_time()


async def test_memory_network_rules(autojump_clock):
    net = MemoryNetwork()
    received: list[bytes] = []

    async def recording_echo(stream):
        try:
            while data := await stream.receive_some():
                received.append(data)
                await stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    async with trio.open_nursery() as nursery:
        await nursery.start(net.serve, "a", recording_echo)
        await nursery.start(net.serve, "b", recording_echo)
        with pytest.raises(OSError):
            await net.serve("a", recording_echo)
        with pytest.raises(ConnectFailed):
            await net.connect("a", "nowhere")
        with pytest.raises(ConnectFailed):
            await net.connect("stopped", "a")
        s = await net.connect("a", "b")
        await s.send_all(b"hi")
        assert await s.receive_some() == b"hi"

        # A partition refuses new connections; bytes sent into it are queued and arrive at
        # TCP's first retransmission after the heal (0.2, 0.6, 1.4, 3.0 s after the send).
        net.partition("a", "b")
        with pytest.raises(ConnectFailed):
            await net.connect("b", "a")
        t0 = trio.current_time()
        nursery.start_soon(_heal_at, net, t0 + 2.5)
        await s.send_all(b"late")
        assert trio.current_time() == t0, "send_all waited in the partition"
        assert await s.receive_some() == b"late"  # the echo's own reply came back at once
        assert trio.current_time() - t0 == pytest.approx(3.0)

        # A reset closes both ends; loss resets the sending connection.
        await nursery.start(net.serve, "c", recording_echo)
        s2 = await net.connect("a", "c")
        net.reset("a", "c")
        with pytest.raises(trio.ClosedResourceError):
            await s2.send_all(b"x")
        s3 = await net.connect("a", "c")
        net.set_loss(1.0)
        with pytest.raises(trio.BrokenResourceError):
            await s3.send_all(b"x")
        net.set_loss(0.0)
        await trio.testing.wait_all_tasks_blocked()
        assert net.statistics()["streams"] == 2  # both ends of s; c's handlers closed theirs
        assert received == [b"hi", b"late"]
        net.stop("c")

        # Stopping a node closes its streams: the peer sees EOF, then a broken send.
        net.stop("b")
        assert await s.receive_some() == b""
        with pytest.raises(trio.BrokenResourceError):
            await s.send_all(b"x")
        with pytest.raises(ConnectFailed):
            await net.connect("a", "b")
        await s.aclose()
        assert net.statistics() == {"nodes": 1, "streams": 0, "cut_links": 0,
                                    "late_deliveries": 1, "user_timeouts": 0}
        nursery.cancel_scope.cancel()


# Heal -> arrival, seconds after the first send: TCP retransmits 0.2, 0.6, 1.4, 3.0, 6.2,
# 12.6, ... 204.6 s after it (0.2 * (2**k - 1)), then every 120 s (RTO_MAX).
@pytest.mark.parametrize("heal, arrival", [(0.1, 0.2), (1.0, 1.4), (10.0, 12.6),
                                           (250.0, 324.6), (1000.0, 1044.6)])
async def test_queued_bytes_arrive_at_the_first_retransmission_after_the_heal(
        autojump_clock, heal, arrival):
    net = MemoryNetwork()
    async with trio.open_nursery() as nursery:
        client, server = await _pair(nursery, net)
        net.partition("a", "b")
        t0 = trio.current_time()
        await client.send_all(b"one ")
        await trio.sleep(0.05)
        await client.send_all(b"two")  # behind the first: delivered with it, in order
        nursery.start_soon(_heal_at, net, t0 + heal)
        got, when = await _receive_at(server, 7)
        assert got == b"one two"
        assert when - t0 == pytest.approx(arrival)
        nursery.cancel_scope.cancel()


async def test_bytes_sent_after_the_heal_wait_behind_queued_ones(autojump_clock):
    net = MemoryNetwork()
    async with trio.open_nursery() as nursery:
        client, server = await _pair(nursery, net)
        net.partition("a", "b")
        t0 = trio.current_time()
        await client.send_all(b"old ")
        await trio.sleep(1.0)
        net.heal()
        await client.send_all(b"new")  # the link is open, but "old " is still queued
        got, when = await _receive_at(server, 7)
        assert got == b"old new" and when - t0 == pytest.approx(1.4)
        await client.send_all(b"!")  # nothing queued now: at once
        assert await server.receive_some() == b"!" and trio.current_time() == when
        nursery.cancel_scope.cancel()


async def test_a_full_send_buffer_makes_the_sender_wait(autojump_clock):
    net = MemoryNetwork()
    async with trio.open_nursery() as nursery:
        client, server = await _pair(nursery, net)
        net.partition("a", "b")
        t0 = trio.current_time()
        await client.send_all(b"x" * SEND_BUFFER)  # fills it
        assert trio.current_time() == t0
        nursery.start_soon(_heal_at, net, t0 + 5.0)
        await client.send_all(b"y" * 10)  # waits until the buffer is delivered (at 6.2 s)
        assert trio.current_time() - t0 == pytest.approx(6.2)
        got, _ = await _receive_at(server, SEND_BUFFER + 10)
        assert got == b"x" * SEND_BUFFER + b"y" * 10
        # A sender that gives up waiting for room: what was queued stays queued.
        net.partition("a", "b")
        t1 = trio.current_time()
        with trio.move_on_after(1.0):
            await client.send_all(b"z" * (SEND_BUFFER + 100))
        assert trio.current_time() - t1 == 1.0
        net.heal()
        got, when = await _receive_at(server, SEND_BUFFER)
        assert got == b"z" * SEND_BUFFER and when - t1 == pytest.approx(1.4)
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("heal, delivered", [(2.5, True), (4.0, False), (60.0, False)])
async def test_tcp_user_timeout_resets_instead_of_delivering_late(autojump_clock, heal,
                                                                   delivered):
    """Rule 3, with a 5 s limit: bytes a retransmission delivers by then arrive (heal at
    2.5 s: at 3.0 s); otherwise the connection is reset at 5 s, healed (the next
    retransmission would come at 6.2 s) or not, and nothing arrives."""
    net = MemoryNetwork()
    async with trio.open_nursery() as nursery:
        client, server = await _pair(nursery, net)
        client.setsockopt(socket.IPPROTO_TCP, USER_TIMEOUT, 5000)
        net.partition("a", "b")
        t0 = trio.current_time()
        await client.send_all(b"a replica write")
        nursery.start_soon(_heal_at, net, t0 + heal)
        if delivered:
            got, when = await _receive_at(server, 15)
            assert got == b"a replica write" and when - t0 == pytest.approx(3.0)
        else:
            with pytest.raises(trio.ClosedResourceError):  # both ends end: reset
                await server.receive_some()
            assert trio.current_time() - t0 == pytest.approx(5.0)
            with pytest.raises(trio.ClosedResourceError):
                await client.send_all(b"more")
            assert net.statistics()["streams"] == 0
            assert net.statistics()["user_timeouts"] == 1
        nursery.cancel_scope.cancel()


async def test_the_option_bounds_only_its_own_end(autojump_clock):
    """TCP_USER_TIMEOUT is per socket: the accepted end, which did not set it, delivers its
    queued bytes late (a reply after the heal) unless the dialled end resets first."""
    net = MemoryNetwork()
    async with trio.open_nursery() as nursery:
        client, server = await _pair(nursery, net)
        client.setsockopt(socket.IPPROTO_TCP, USER_TIMEOUT, 5000)
        net.partition("a", "b")
        t0 = trio.current_time()
        await server.send_all(b"a reply")
        nursery.start_soon(_heal_at, net, t0 + 20.0)
        got, when = await _receive_at(client, 7)
        assert got == b"a reply" and when - t0 == pytest.approx(25.4)
        nursery.cancel_scope.cancel()


async def test_closing_an_end_drops_what_it_queued(autojump_clock):
    net = MemoryNetwork()
    async with trio.open_nursery() as nursery:
        client, server = await _pair(nursery, net)
        await client.send_all(b"before ")  # delivered before the partition: kept
        net.partition("a", "b")
        await client.send_all(b"during")
        await client.aclose()
        net.heal()
        got, _ = await _receive_at(server, 100)
        assert got == b"before "  # then end-of-file
        with pytest.raises(trio.BrokenResourceError):
            await server.send_all(b"x")
        nursery.cancel_scope.cancel()


async def test_a_stopped_node_drops_what_its_peers_queued_to_it(autojump_clock):
    net = MemoryNetwork()
    async with trio.open_nursery() as nursery:
        client, server = await _pair(nursery, net)
        net.partition("a", "b")
        await client.send_all(b"lost")
        net.stop("b")
        with pytest.raises(trio.BrokenResourceError):
            await client.send_all(b"x")
        assert await client.receive_some() == b""
        nursery.cancel_scope.cancel()


async def test_two_tasks_may_not_share_a_direction(autojump_clock):
    net = MemoryNetwork()
    async with trio.open_nursery() as nursery:
        client, server = await _pair(nursery, net)
        nursery.start_soon(server.receive_some)
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(trio.BusyResourceError):
            await server.receive_some()
        nursery.cancel_scope.cancel()
