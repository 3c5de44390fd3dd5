"""One RESP connection's state (kvd.node.resp_service serves it): the parser and its
limits, who the client is, the replies on their way out, and the watchdog.

Rules:

1. A connection waits for its client at most ``handshake_timeout`` while it is pending
   (not yet authenticated), ``idle_timeout`` afterwards: for the client's bytes, or for it
   to read ours. One watchdog task per connection enforces it (``watch``), not a cancel
   scope per read.
2. Writing never holds up reading: what the socket does not take at once waits in the
   output queue, sent in order by a writer task (``write_queued``), while the next
   commands are read. A client that writes a whole pipeline before it reads a reply
   (redis-py's pipeline) would otherwise wait for kvd while kvd waited for it, for good,
   once the replies filled the sockets' buffers (60 GETs of 100 KB did). The queue is
   bounded, as Redis's output buffers for normal clients are not (memory per connection,
   tests/test_resp.py's hostile input): past ``OUTPUT_LIMIT`` bytes (``STREAM_WINDOW``
   while a value above chunk_size streams out) the commands wait for the client to read,
   and Rule 1 closes a client that reads nothing meanwhile. A pipeline whose replies
   exceed the queue and the sockets' buffers (about 7 MB on loopback) therefore still
   fails, after idle_timeout.
"""

from __future__ import annotations

import itertools
from dataclasses import replace

import trio

from kvd.net.admission import remote_host
from kvd.proto import resp
from kvd.security import Grant

READ_SIZE = 64 * 1024
OUTPUT_LIMIT = 4 << 20  # queued reply bytes before commands wait for the client (Rule 2)
STREAM_WINDOW = 4 << 20  # queued bytes of a streamed value before its next piece is read
_ids = itertools.count(1)


class Session:
    """One RESP connection's state."""

    def __init__(self, node, stream, ticket):
        self.node = node
        self.stream = stream
        self.ticket = ticket
        self.host = remote_host(stream)
        self.id = next(_ids)
        self.parser = resp.RespParser(resp.PRE_AUTH)
        self.resp3 = False
        self.name = b""
        self.grant: Grant | None = None
        self.out: list[bytes] = []
        self.reading = False  # waiting for the client's bytes since ``waiting_since`` (Rule 1)
        self.waiting_since = self.node.clocks.monotonic()
        # Rule 2: the output queue, and since when the client has not taken its bytes.
        self._send_now = getattr(stream, "send_now", None)  # kvd.net.rawstream only
        self._queue: list[bytes] = []
        self.queued = 0
        self.sending_since: float | None = None
        self._queue_changed = trio.Event()
        self.writer_running = False

    @property
    def security(self):
        return self.node.security

    def authenticated(self, grant: Grant) -> None:
        """The client proved who it is (AUTH), or need not (no tokens): the full limits.
        The admission ticket is established once this command is answered (``_serve``)."""
        self.grant = grant
        self.parser.limits = replace(resp.AUTHENTICATED, stream_above=self.node.config.chunk_size)

    async def flush(self, room: int = OUTPUT_LIMIT) -> None:
        """Send the gathered replies: at once what the socket takes, the rest through the
        output queue; then wait while more than ``room`` bytes are queued (Rule 2)."""
        if self.out:
            data, self.out = b"".join(self.out), []
            if not self.writer_running:  # before or after the command loop
                await self.stream.send_all(b"".join(self._queue) + data)
                self._queue, self.queued = [], 0
                return
            if not self.queued and self._send_now is not None:  # nothing queued or in flight
                data = data[self._send_now(data):]  # the usual case: the socket takes it all
            if data:
                self._queue.append(data)
                self.queued += len(data)
                self._changed()
        while self.queued > room:
            await self._queue_changed.wait()

    def _changed(self) -> None:
        self._queue_changed.set()
        self._queue_changed = trio.Event()

    async def write_queued(self) -> None:
        """The writer task (Rule 2): sends the output queue, in order, until cancelled."""
        self.writer_running = True
        try:
            while True:
                while not self._queue:
                    await self._queue_changed.wait()
                data, self._queue = b"".join(self._queue), []
                self.sending_since = self.node.clocks.monotonic()
                await self.stream.send_all(data)
                self.sending_since = None
                self.queued -= len(data)
                self._changed()
        finally:
            # What is still queued goes out with the last replies (flush, after the loop).
            self.writer_running = False

    def reply(self, value) -> None:
        self.out.append(resp.encode(value, self.resp3))

    async def next_event(self):
        """The parser's next event, reading (and flushing replies) as it needs (Rule 2)."""
        while True:
            event = self.parser.next_event()
            if event is not resp.NEED_DATA:
                return event
            await self.flush()
            self.waiting_since = self.node.clocks.monotonic()
            self.reading = True
            try:
                data = await self.stream.receive_some(READ_SIZE)
            finally:
                self.reading = False
            self.parser.receive_data(data)

    async def watch(self, scope: trio.CancelScope) -> None:
        """Cancel ``scope`` once the session has waited too long for the client, to send
        its bytes or to read ours (Rule 1): one task per connection (a cancel scope
        per read cost about 7% of a redis-benchmark GET's CPU)."""
        while True:
            config = self.node.config
            pending = self.ticket is not None and self.ticket.pending
            timeout = config.handshake_timeout if pending else config.idle_timeout
            waits = [since for since in (self.waiting_since if self.reading else None,
                                         self.sending_since) if since is not None]
            if not waits:  # a command runs: its wait, if any, starts later
                await trio.sleep(timeout)
                continue
            deadline = min(waits) + timeout
            if self.node.clocks.monotonic() >= deadline:
                scope.cancel()
                return
            await trio.sleep_until(deadline)
