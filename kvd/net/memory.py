"""An in-memory network for in-process cluster tests (memberlist's MockNetwork, in trio).

Nodes are known by their addresses (any string, usually HOST:PORT).  A whole node (kvd.server)
listens with ``net.listen(address)``, a ``trio.abc.Listener`` like the TCP ones the daemon
opens; a bare handler serves with ``await nursery.start(net.serve, address, handler)``, every
accepted connection running ``handler(stream)`` in that node's own nursery.  A node dials with
``net.connector(me)``, which returns the ``connect(address) -> trio.abc.Stream`` callable the
node's tasks are given (the daemon gives them a TCP dialer instead).  ``net.host(a, b)`` says
that addresses ``a`` and ``b`` are one host (a node's client and peer ports): a partition of
one is a partition of both.

Rules:

1. ``connect`` fails at once with ConnectFailed when the target does not serve, when the
   caller itself does not serve (a stopped node dials nobody), or when the two are
   partitioned.  Nothing else fails on its own: bytes arrive in order and whole, at once
   while the link is open, or not at all when their connection is reset (rules 3, 4, 6).
2. A partition is a black hole, and TCP buffers what is sent into it: a stream that crosses
   it stays open and ``send_all`` returns once its bytes are queued on the connection (a
   kernel's send buffer), up to ``SEND_BUFFER`` bytes per direction; past that the sender
   waits for room.  Queued bytes are delivered in order, all at once, at TCP's first
   retransmission after the heal: the first queued byte's send time plus
   ``RTO_MIN * (2**k - 1)``, the interval doubling up to ``RTO_MAX`` as Linux backs off.  So
   they arrive *late*: a sender that gave up on its request (a cancel scope) does not take
   them back.  Bytes sent while others are queued queue behind them, healed or not; bytes
   sent before the partition are delivered.
3. TCP_USER_TIMEOUT: when a stream's sender has set it (``setsockopt``, as kvd.net.peer
   does) and its oldest queued byte is still undelivered after that long, the connection is
   reset as by ``reset`` (both ends closed, nothing queued delivered): Linux aborts the
   connection at that time, healed or not, rather than retransmit later.
4. Stopping a node (cancelling its ``serve``, or ``stop(address)``) closes its end of every
   stream it has, accepted or dialled: its peers see end-of-file on receive and
   BrokenResourceError on send at once, like a reset from a crashed host.  ``stop`` also
   cancels the handlers.  Any close is such a reset: what the closing end had queued (rule 2)
   is dropped, never delivered; what was delivered can still be read.
5. Partitions are sets of unordered address pairs; ``partition`` adds pairs and ``heal``
   removes them (all of them without arguments).  Everything runs on MockClock: time
   only schedules retransmissions (rules 2 and 3) and delays (rule 7).  Each direction
   with queued bytes has one timer, a trio system task on that clock, so a seed's run
   (its scheduler seeded, tests/sim/harness.py) replays exactly.
6. Loss is modelled as TCP shows it to an application: not as missing bytes but as a
   connection reset.  ``set_loss(rate)`` makes that fraction of ``send_all`` calls (drawn
   from a seeded rng) reset their connection: nothing is sent, the sender gets
   BrokenResourceError and the other end end-of-file.  ``reset(a, b)`` does it at once.
7. ``set_delay(max_delay, hosts)`` delays every send from or to those hosts (all, without
   ``hosts``) by a time drawn from the same rng, up to ``max_delay`` seconds.  Bytes of one
   connection stay in order (the sender waits); different connections overtake each other.

The streams are this module's own, a byte buffer and a parking lot per direction: one
checkpoint per send or receive, where trio.testing's memory streams take three (to catch two
tasks using one stream, which a flag here catches at once); a simulator seed spends much of
its CPU in trio's scheduler.
"""

from __future__ import annotations

import random
import socket
from collections.abc import Awaitable, Callable, Iterable
from itertools import product

import trio

from kvd.errors import ConnectFailed

__all__ = ["MemoryNetwork", "MemoryStream"]

Handler = Callable[[trio.abc.Stream], Awaitable[None]]

SEND_BUFFER = 256 << 10  # bytes one direction queues in a partition before send_all waits
RTO_MIN = 0.2  # seconds to the first retransmission (Linux's TCP_RTO_MIN)
RTO_MAX = 120.0  # the longest interval between retransmissions (Linux's TCP_RTO_MAX)
USER_TIMEOUT = (socket.IPPROTO_TCP, getattr(socket, "TCP_USER_TIMEOUT", 18))


class _Pipe:
    """One direction of a connection: what its receiver can read, and what its sender
    queued in a partition (rule 2) with the timer that will deliver it."""

    __slots__ = ("data", "queue", "queued", "first", "timer", "eof", "gone", "readable", "room")

    def __init__(self) -> None:
        self.data = bytearray()  # delivered, not read yet
        self.queue: list[bytes] = []  # sent, not delivered yet
        self.queued = 0
        self.first = 0.0  # when the oldest queued byte was sent
        self.timer: trio.CancelScope | None = None
        self.eof = False  # the sending end closed: read what was delivered, then b""
        self.gone = False  # the receiving end closed: sends fail
        self.readable = trio.lowlevel.ParkingLot()  # the receiver, waiting for bytes
        self.room = trio.lowlevel.ParkingLot()  # senders waiting for SEND_BUFFER room

    def deliver(self) -> None:
        self.data += b"".join(self.queue)
        self.drop()

    def drop(self) -> None:
        """Forget what is queued (delivered or reset) and wake whoever waits."""
        self.queue = []
        self.queued = 0
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.readable.unpark_all()
        self.room.unpark_all()


class MemoryStream(trio.abc.Stream):
    """One end of an in-memory connection from ``local`` to ``remote``."""

    def __init__(self, net: MemoryNetwork, local: str, remote: str, out: _Pipe, into: _Pipe) -> None:
        self._net = net
        self.local = local
        self.remote = remote
        self._out = out  # what we send
        self._in = into  # what we receive
        self.peer: MemoryStream | None = None  # the other end
        self.closed = False
        self._sending = self._receiving = False  # trio's streams refuse two tasks at once
        self.options: dict[tuple[int, int], int] = {}

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """Send ``data``: delivered at once while the link is open, else queued (rule 2); waits
        for the link's delay (rule 7)."""
        if self._sending:
            raise trio.BusyResourceError("another task is sending on this stream")
        self._sending = True
        try:
            await trio.lowlevel.checkpoint()
            net = self._net
            delay = net._delay_of(self.local, self.remote)
            if delay:
                await trio.sleep(delay)
            self._check_open()
            if net._lose():
                self.close()
                raise trio.BrokenResourceError(f"connection {self.local} -> {self.remote} reset (simulated loss)")
            out = self._out
            if not out.queue and not net.is_partitioned(self.local, self.remote):
                out.data += data
                out.readable.unpark_all()
                return
            rest = bytes(data)
            while rest:
                room = SEND_BUFFER - out.queued
                if room <= 0:
                    await out.room.park()  # rule 2: a full send buffer
                    self._check_open()
                    if not out.queue and not net.is_partitioned(self.local, self.remote):
                        out.data += rest  # delivered meanwhile, and the link is open
                        out.readable.unpark_all()
                        return
                    continue
                if not out.queue:
                    out.first = trio.current_time()
                    out.timer = trio.CancelScope()
                    trio.lowlevel.spawn_system_task(net._retransmit, self, out, out.timer)
                out.queue.append(rest[:room])
                out.queued += len(out.queue[-1])
                rest = rest[room:]
        finally:
            self._sending = False

    def _check_open(self) -> None:
        if self.closed:
            raise trio.ClosedResourceError("this end of the connection is closed")
        if self._out.gone:
            raise trio.BrokenResourceError(f"connection {self.local} -> {self.remote} closed by the peer")

    def setsockopt(self, level: int, option: int, value: int) -> None:
        """Record a socket option; TCP_USER_TIMEOUT (milliseconds, 0 for none) bounds how long
        queued bytes may wait (rule 3)."""
        self.options[level, option] = value

    def user_timeout(self) -> float | None:
        """TCP_USER_TIMEOUT in seconds, or None when not set (rule 3)."""
        ms = self.options.get(USER_TIMEOUT, 0)
        return ms / 1000 if ms > 0 else None

    async def wait_send_all_might_not_block(self) -> None:
        """Wait while the send buffer is full (rule 2)."""
        if self._out.queued >= SEND_BUFFER and not self.closed:
            await self._out.room.park()
        else:
            await trio.lowlevel.checkpoint()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        """Bytes from the other end; ``b""`` once it has closed and everything was read."""
        if max_bytes is not None and max_bytes < 1:
            raise ValueError("max_bytes must be >= 1")
        if self._receiving:
            raise trio.BusyResourceError("another task is receiving on this stream")
        self._receiving = True
        try:
            pipe = self._in
            if pipe.data or pipe.eof or self.closed:
                await trio.lowlevel.checkpoint()
            while not (pipe.data or pipe.eof or self.closed):
                await pipe.readable.park()
            if self.closed:
                raise trio.ClosedResourceError("this end of the connection is closed")
            if max_bytes is None or max_bytes >= len(pipe.data):
                data, pipe.data = pipe.data, bytearray()
                return data
            data = pipe.data[:max_bytes]
            del pipe.data[:max_bytes]
            return data
        finally:
            self._receiving = False

    def close(self) -> None:
        """Close both directions now (synchronous, so ``stop`` can close everything at once).
        What this end queued is dropped (rule 4)."""
        if self.closed:
            return
        self.closed = True
        self._net._streams.pop(self, None)
        self._out.eof = True
        self._out.drop()
        self._in.gone = True
        self._in.data = bytearray()
        self._in.drop()

    async def aclose(self) -> None:
        """Close both directions."""
        self.close()
        await trio.lowlevel.checkpoint()


class _Node:
    def __init__(self, address: str, handler: Handler, nursery: trio.Nursery) -> None:
        self.address = address
        self.handler = handler
        self.nursery = nursery

    def deliver(self, stream: MemoryStream) -> None:
        self.nursery.start_soon(_run_handler, self.handler, stream)

    def cancel(self) -> None:
        self.nursery.cancel_scope.cancel()


class MemoryListener(trio.abc.Listener[MemoryStream]):
    """Accepts the connections dialled to one address (rule 4 applies when it closes)."""

    def __init__(self, net: MemoryNetwork, address: str) -> None:
        self._net = net
        self.address = address
        self._send, self._receive = trio.open_memory_channel[MemoryStream](float("inf"))

    def deliver(self, stream: MemoryStream) -> None:
        try:
            self._send.send_nowait(stream)
        except trio.ClosedResourceError:
            raise RuntimeError("listener closed") from None

    def cancel(self) -> None:
        self._send.close()

    async def accept(self) -> MemoryStream:
        """The next connection; ClosedResourceError once the listener is closed."""
        try:
            return await self._receive.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise trio.ClosedResourceError("listener closed") from None

    async def aclose(self) -> None:
        """Stop listening: the address is no longer served and its streams close (rule 4)."""
        if self._net._nodes.get(self.address) is self:
            self._net._drop(self.address)
        self._send.close()
        await trio.lowlevel.checkpoint()


class MemoryNetwork:
    """Addresses, the connections between them, and the partitions that separate them."""

    def __init__(self) -> None:
        self._nodes: dict[str, _Node | MemoryListener] = {}
        self._host: dict[str, str] = {}  # address -> the host it belongs to
        self._streams: dict[MemoryStream, None] = {}  # insertion-ordered: deterministic close order
        self._cut: set[frozenset[str]] = set()  # membership tests only: no order to follow
        self._late = self._timed_out = 0  # statistics()
        self._loss = 0.0
        self._max_delay = 0.0
        self._delayed: set[str] | None = None
        self._rng = random.Random(0)

    # --- serving ------------------------------------------------------------------------------

    async def serve(
        self,
        address: str,
        handler: Handler,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Accept connections to ``address`` until cancelled; each runs ``handler(stream)``.

        Raises OSError when ``address`` is already served.  On exit (cancellation or
        ``stop``), every stream of this node is closed (rule 4).
        """
        if address in self._nodes:
            raise OSError(f"address already in use: {address}")
        node = None
        try:
            async with trio.open_nursery() as nursery:
                node = self._nodes[address] = _Node(address, handler, nursery)
                task_status.started()
                await trio.sleep_forever()
        finally:
            if self._nodes.get(address) is node:
                self._drop(address)

    def listen(self, address: str) -> MemoryListener:
        """Serve ``address`` through a listener (OSError when it is served already)."""
        if address in self._nodes:
            raise OSError(f"address already in use: {address}")
        listener = self._nodes[address] = MemoryListener(self, address)
        return listener

    def host(self, *addresses: str) -> None:
        """Declare ``addresses`` one host: partitions and resets apply to all of them."""
        for address in addresses:
            self._host[address] = addresses[0]

    def _of(self, address: str) -> str:
        return self._host.get(address, address)

    def stop(self, address: str) -> None:
        """Crash ``address``: unregister it, close its streams and cancel its handlers."""
        node = self._nodes.get(address)
        if node is not None:
            self._drop(address)
            node.cancel()

    def _drop(self, address: str) -> None:
        self._nodes.pop(address, None)
        for stream in [s for s in self._streams if s.local == address]:
            stream.close()

    def is_serving(self, address: str) -> bool:
        """Whether ``address`` accepts connections now."""
        return address in self._nodes

    # --- dialling -----------------------------------------------------------------------------

    def connector(self, source: str) -> Callable[[str], Awaitable[trio.abc.Stream]]:
        """The ``connect(address)`` callable of the node at ``source``."""

        async def connect(address: str) -> trio.abc.Stream:
            return await self.connect(source, address)

        return connect

    async def connect(self, source: str, address: str) -> trio.abc.Stream:
        """Open a connection from ``source`` to ``address`` (ConnectFailed per rule 1)."""
        await trio.lowlevel.checkpoint()
        if source not in self._nodes:
            raise ConnectFailed(f"{source} is stopped and cannot dial {address}")
        node = self._nodes.get(address)
        if node is None:
            raise ConnectFailed(f"cannot connect to {address}: connection refused")
        if self.is_partitioned(source, address):
            raise ConnectFailed(f"cannot connect to {address}: no route (partitioned)")
        up, down = _Pipe(), _Pipe()  # client -> server, server -> client
        client = MemoryStream(self, source, address, up, down)
        server = MemoryStream(self, address, source, down, up)
        client.peer, server.peer = server, client
        try:
            node.deliver(server)
        except RuntimeError:  # its nursery is closing: the node is going down
            raise ConnectFailed(f"cannot connect to {address}: connection refused") from None
        self._streams[client] = None
        self._streams[server] = None
        return client

    # --- partitions ---------------------------------------------------------------------------

    def partition(self, a: str | Iterable[str], b: str | Iterable[str]) -> None:
        """Cut every link between the address (or group of addresses) ``a`` and ``b``."""
        group_a = [a] if isinstance(a, str) else list(a)
        group_b = [b] if isinstance(b, str) else list(b)
        for x, y in product(group_a, group_b):
            if self._of(x) != self._of(y):
                self._cut.add(frozenset((self._of(x), self._of(y))))

    def heal(self, a: str | Iterable[str] | None = None, b: str | Iterable[str] | None = None) -> None:
        """Restore the links between ``a`` and ``b``; without arguments, every link."""
        if a is None or b is None:
            self._cut.clear()
        else:
            group_a = [a] if isinstance(a, str) else list(a)
            group_b = [b] if isinstance(b, str) else list(b)
            for x, y in product(group_a, group_b):
                self._cut.discard(frozenset((self._of(x), self._of(y))))

    def set_loss(self, rate: float, rng: random.Random | None = None) -> None:
        """Reset a ``rate`` fraction of all sends from now on (0 turns loss off; rule 6)."""
        if not 0.0 <= rate <= 1.0:
            raise ValueError("loss rate must be within 0..1")
        self._loss = rate
        if rng is not None:
            self._rng = rng

    def reset(self, a: str, b: str) -> None:
        """Reset every connection between ``a`` and ``b`` now: both ends are closed."""
        ends = {self._of(a), self._of(b)}
        for stream in [s for s in self._streams if {self._of(s.local), self._of(s.remote)} == ends]:
            stream.close()

    def set_delay(self, max_delay: float, hosts: Iterable[str] | None = None) -> None:
        """Delay sends from or to ``hosts`` (every host when None) by up to ``max_delay`` s."""
        self._max_delay = max_delay
        self._delayed = None if hosts is None else {self._of(h) for h in hosts}

    def _delay_of(self, a: str, b: str) -> float:
        if not self._max_delay:
            return 0.0
        if self._delayed is not None and not {self._of(a), self._of(b)} & self._delayed:
            return 0.0
        return self._rng.uniform(0.0, self._max_delay)

    def _lose(self) -> bool:
        return self._loss > 0.0 and self._rng.random() < self._loss

    def is_partitioned(self, a: str, b: str) -> bool:
        """Whether a partition separates ``a`` and ``b``."""
        return frozenset((self._of(a), self._of(b))) in self._cut

    async def _retransmit(self, sender: MemoryStream, pipe: _Pipe, timer: trio.CancelScope) -> None:
        """``pipe``'s timer (rules 2 and 3): deliver its queue at the first retransmission
        after the heal, or reset the connection once the sender's TCP_USER_TIMEOUT has
        passed. Cancelled when the queue goes first (a close or a reset)."""
        with timer:
            interval = RTO_MIN
            at = pipe.first + interval
            while True:
                limit = sender.user_timeout()
                if limit is not None and pipe.first + limit <= at:
                    await trio.sleep_until(pipe.first + limit)
                    self._timed_out += 1
                    sender.close()
                    if sender.peer is not None:
                        sender.peer.close()
                    return
                await trio.sleep_until(at)
                if not self.is_partitioned(sender.local, sender.remote):
                    self._late += 1
                    pipe.deliver()
                    return
                interval = min(2 * interval, RTO_MAX)
                at += interval

    def statistics(self) -> dict[str, int]:
        """Counts for tests and debugging: serving nodes, open stream ends, cut links; and
        since the start, queues delivered late (rule 2) and connections reset by their
        TCP_USER_TIMEOUT (rule 3)."""
        return {"nodes": len(self._nodes), "streams": len(self._streams), "cut_links": len(self._cut),
                "late_deliveries": self._late, "user_timeouts": self._timed_out}


async def _run_handler(handler: Handler, stream: MemoryStream) -> None:
    try:
        await handler(stream)
    finally:
        stream.close()
