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
   partitioned.  Nothing else can fail: the streams are trio's memory streams, bytes arrive
   in order and whole.
2. A partition is a black hole, as on a real network: a stream that crosses it stays open
   but ``send_all`` waits until the partition heals, so the bytes arrive late and intact
   (TCP retransmits).  A caller that will not wait bounds the send with a cancel scope and
   then drops the connection.  Bytes sent before the partition are delivered.
3. Stopping a node (cancelling its ``serve``, or ``stop(address)``) closes its end of every
   stream it has, accepted or dialled: its peers see end-of-file on receive and
   BrokenResourceError on send at once, like a reset from a crashed host.  ``stop`` also
   cancels the handlers.
4. Partitions are sets of unordered address pairs; ``partition`` adds pairs and ``heal``
   removes them (all of them without arguments).  Time plays no part, so everything runs
   on MockClock.
5. Loss is modelled as TCP shows it to an application: not as missing bytes but as a
   connection reset.  ``set_loss(rate)`` makes that fraction of ``send_all`` calls (drawn
   from a seeded rng) reset their connection: nothing is sent, the sender gets
   BrokenResourceError and the other end end-of-file.  ``reset(a, b)`` does it at once.
6. ``set_delay(max_delay, hosts)`` delays every send from or to those hosts (all, without
   ``hosts``) by a time drawn from the same rng, up to ``max_delay`` seconds.  Bytes of one
   connection stay in order (the sender waits); different connections overtake each other.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable, Iterable
from itertools import product

import trio
import trio.testing

from kvd.errors import ConnectFailed

__all__ = ["MemoryNetwork", "MemoryStream"]

Handler = Callable[[trio.abc.Stream], Awaitable[None]]


class MemoryStream(trio.abc.Stream):
    """One end of an in-memory connection from ``local`` to ``remote``."""

    def __init__(
        self,
        net: MemoryNetwork,
        local: str,
        remote: str,
        send: trio.testing.MemorySendStream,
        receive: trio.testing.MemoryReceiveStream,
    ) -> None:
        self._net = net
        self.local = local
        self.remote = remote
        self._send = send
        self._receive = receive
        self.options: dict[tuple[int, int], int] = {}

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """Send ``data``; waits while a partition separates the two ends (rule 2), and for the
        link's delay (rule 6)."""
        await self._net._wait_link(self.local, self.remote)
        delay = self._net._delay_of(self.local, self.remote)
        if delay:
            await trio.sleep(delay)
            await self._net._wait_link(self.local, self.remote)
        if self._net._lose():
            self.close()
            raise trio.BrokenResourceError(f"connection {self.local} -> {self.remote} reset (simulated loss)")
        await self._send.send_all(data)

    def setsockopt(self, level: int, option: int, value: int) -> None:
        """Accept the socket options kvd sets (kvd.net.peer: TCP_USER_TIMEOUT). Nothing to
        apply: this network never delivers bytes a sender gave up on (rule 2), which is what
        that option buys a real connection."""
        self.options[level, option] = value

    async def wait_send_all_might_not_block(self) -> None:
        """Wait until the link is open (memory streams never apply back pressure)."""
        await self._net._wait_link(self.local, self.remote)
        await self._send.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        """Bytes from the other end; ``b""`` once it has closed."""
        return await self._receive.receive_some(max_bytes)

    def close(self) -> None:
        """Close both directions now (synchronous, so ``stop`` can close everything at once)."""
        self._net._streams.pop(self, None)
        self._send.close()
        self._receive.close()

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
    """Accepts the connections dialled to one address (rule 3 applies when it closes)."""

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
        """Stop listening: the address is no longer served and its streams close (rule 3)."""
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
        self._cut: set[frozenset[str]] = set()
        # Set and replaced whenever the partitions change, to wake blocked senders.
        self._changed = trio.Event()
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
        ``stop``), every stream of this node is closed (rule 3).
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
        a_send, b_receive = trio.testing.memory_stream_one_way_pair()
        b_send, a_receive = trio.testing.memory_stream_one_way_pair()
        client = MemoryStream(self, source, address, a_send, a_receive)
        server = MemoryStream(self, address, source, b_send, b_receive)
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
        self._notify()

    def heal(self, a: str | Iterable[str] | None = None, b: str | Iterable[str] | None = None) -> None:
        """Restore the links between ``a`` and ``b``; without arguments, every link."""
        if a is None or b is None:
            self._cut.clear()
        else:
            group_a = [a] if isinstance(a, str) else list(a)
            group_b = [b] if isinstance(b, str) else list(b)
            for x, y in product(group_a, group_b):
                self._cut.discard(frozenset((self._of(x), self._of(y))))
        self._notify()

    def set_loss(self, rate: float, rng: random.Random | None = None) -> None:
        """Reset a ``rate`` fraction of all sends from now on (0 turns loss off; rule 5)."""
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

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def _wait_link(self, a: str, b: str) -> None:
        await trio.lowlevel.checkpoint()
        while self.is_partitioned(a, b):
            await self._changed.wait()

    def statistics(self) -> dict[str, int]:
        """Counts for tests and debugging: serving nodes, open stream ends, cut links."""
        return {"nodes": len(self._nodes), "streams": len(self._streams), "cut_links": len(self._cut)}


async def _run_handler(handler: Handler, stream: MemoryStream) -> None:
    try:
        await handler(stream)
    finally:
        stream.close()
