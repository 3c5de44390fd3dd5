"""The server's view of one connection after its handshake: the Grant enforced per request.

``GuardedConnection`` is the FrameConnection every accepted connection gets. The handshake
(kvd.proto.handshake, driven by kvd.server) sets its ``grant``; from then on each request is
checked against kvd.security's role rules before any handler sees it.

Rules:

- Rule 1: until ``grant`` is set (the handshake sets it), frames pass unchecked. A grant
  that allows every request (admin, peer) is known as such once, when it is set.
- Rule 2: a request the grant does not allow is answered with ERROR ``unauthorized`` on its
  request id, naming the grant and the role needed, and never reaches a handler; the
  connection stays open. The CHUNK frames of a refused streamed PUT are dropped (at most
  MAX_REFUSED_STREAMS such streams open at once, past it the connection is closed).
- Rule 3: inline request bodies in flight are bounded by ``IN_FLIGHT_FRAMES * max_frame``
  bytes: past it the reader waits for replies to go out (backpressure, not buffering).
"""

from __future__ import annotations

import trio

from kvd.errors import ProtocolError, Unauthorized
from kvd.net.admission import remote_host
from kvd.net.connection import FrameConnection
from kvd.proto import codec
from kvd.proto.messages import FLAG_END, MsgType
from kvd.security import Grant, Security, required_role

__all__ = ["GuardedConnection", "IN_FLIGHT_FRAMES", "MAX_REFUSED_STREAMS"]

# Streamed PUTs refused on one connection whose CHUNK frames are still being dropped.
MAX_REFUSED_STREAMS = 64
# Inline request bodies one connection may have in flight, in multiples of max_frame.
IN_FLIGHT_FRAMES = 4


class GuardedConnection(FrameConnection):
    """A server-side FrameConnection that enforces the handshake's Grant on every request
    (the module's rules)."""

    def __init__(self, stream, security: Security | None = None):
        super().__init__(stream)
        self.security = security or Security()
        self._grant: Grant | None = None
        self._allows_all = False
        self.host = remote_host(stream)
        self._refused_streams: set[int] = set()
        self._held: dict[int, int] = {}
        self._held_bytes = 0
        self._released = trio.Event()
        self._waiting: codec.Message | None = None

    @property
    def grant(self) -> Grant | None:
        return self._grant

    @grant.setter
    def grant(self, grant: Grant | None) -> None:
        # Checked once per connection: an admin's or a peer's grant allows every request.
        self._grant = grant
        self._allows_all = grant is not None and grant.allows("admin")

    async def receive(self):
        if self._waiting is not None:  # a receive cancelled while it waited for room
            await self._hold(self._waiting)
            waiting, self._waiting = self._waiting, None
            return waiting
        while True:
            message = await super().receive()
            if message is None or self.grant is None:
                return message
            rid = message.request_id
            if message.type == MsgType.CHUNK:
                if rid in self._refused_streams:
                    if message.flags & FLAG_END:
                        self._refused_streams.discard(rid)
                    continue
                return message
            needed = None if self._allows_all else required_role(message.type, message.fields)
            if needed is None or self.grant.allows(needed):
                self._waiting = message
                await self._hold(message)
                self._waiting = None
                return message
            if message.type == MsgType.PUT and "value" not in message.fields:
                if len(self._refused_streams) >= MAX_REFUSED_STREAMS:
                    raise ProtocolError("too many refused streams left open")
                self._refused_streams.add(rid)
            what = message.fields.get("op") if message.type == MsgType.ADMIN else None
            request = f"{message.type.name}{' ' + what if isinstance(what, str) else ''}"
            refusal = Unauthorized(
                f"{self.grant.name} has role {self.grant.role}; {request[:64]} needs {needed}"
            )
            await self.send(codec.encode(
                MsgType.ERROR, rid, {"code": refusal.code, "message": str(refusal)}))

    async def _hold(self, message) -> None:
        value = message.fields.get("value") if message.type == MsgType.PUT else None
        size = len(value) if isinstance(value, bytes) else 0
        if size == 0:
            return
        limit = IN_FLIGHT_FRAMES * self.max_frame
        while self._held_bytes and self._held_bytes + size > limit:
            await self._released.wait()
        self._held[message.request_id] = self._held.get(message.request_id, 0) + size
        self._held_bytes += size

    async def send(self, data: bytes) -> None:
        await super().send(data)
        if self._held and len(data) >= 13 and data[3] != MsgType.CHUNK:
            rid = int.from_bytes(data[5:9], "big")
            size = self._held.pop(rid, 0)
            if size:
                self._held_bytes -= size
                self._released.set()
                self._released = trio.Event()
