"""One accepted connection of the native protocol, client or peer port: its handshake, its
frames read and routed to the port's handlers, a failure turned into an ERROR frame.

Rules:

1. A HELLO must arrive within ``handshake_timeout`` and fit in 16 KiB; after it the frame
   limit rises to ``max_frame``. A malformed frame gets one ERROR frame (request id 0, code
   "protocol") and the connection is closed; nothing else is affected.
2. A request that may wait (for replicas, a commit, a streamed value) runs in a task of its
   own, at most MAX_IN_FLIGHT_PER_CONNECTION at once. A GET this node answers alone from
   its store, and a peer's replica read of an object that fits in one reply, cannot wait:
   the reader answers them itself, with no task. Their replies go out with the others of
   the same read, before the reader waits for more bytes, or at once past the
   connection's HIGH_WATER (a client that does not read stops the reader).
3. A connection silent for ``idle_timeout`` with no request in flight is closed.

What a request asks is answered elsewhere: client requests by kvd.node.client_service, peer
requests by kvd.node.peer_service. ``node`` is the kvd.server.Node (untyped here: kvd.node
never imports the server).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial

import trio

from kvd.errors import (
    BadRequest,
    ConnectFailed,
    KvdError,
    ProtocolError,
    Unauthorized,
    Unavailable,
    unwrap_single_error,
)
from kvd.net import rawstream
from kvd.net.admission import Ticket
from kvd.net.connection import FrameConnection, run_handshake
from kvd.net.guarded import GuardedConnection
from kvd.node.client_service import CLIENT_HANDLERS, get_now
from kvd.node.peer_service import PEER_HANDLERS, replica_read_now
from kvd.proto import codec
from kvd.proto.handshake import ServerHandshake
from kvd.proto.messages import FLAG_END, MsgType
from kvd.security import Security, printable

log = logging.getLogger("kvd.server")

# Requests of one connection that may be in flight at once; more wait (backpressure).
MAX_IN_FLIGHT_PER_CONNECTION = 128
# Chunk frames buffered per streaming request before the reader stops reading the socket.
STREAM_BUFFER_FRAMES = 2



async def handle_connection(node, stream, ticket: Ticket | None, role: str,
                            security: Security | None = None) -> None:
    """Serve one accepted connection; ``ticket`` is its admission (kvd.net.admission),
    None when the port is full of authenticated connections."""
    conn = GuardedConnection(rawstream.wrap(stream), security)
    if ticket is None:
        node.counters.rejected_connections += 1
        await _send_error(conn, 0, Unavailable("too many connections"))
        await conn.aclose()
        return
    node.counters.connections += 1
    try:
        with unwrap_single_error():
            await _serve_connection(node, conn, role, ticket)
    except Unauthorized as exc:
        # Counted (and logged if its address is new) by the handshake; the reason goes back,
        # never a secret.
        await _send_error(conn, 0, exc)
    except ProtocolError as exc:
        node.counters.protocol_errors += 1
        # Counted by reason, logged once per new address: hostile input cannot flood the log.
        conn.security.note("closed a connection on a protocol error", conn.host, "", str(exc))
        await _send_error(conn, 0, exc)
    except ConnectFailed:
        pass
    except Exception:
        # A bug in one connection's handling must never take the daemon down.
        log.exception("connection handler failed")
    finally:
        await conn.aclose()


async def _send_error(conn: FrameConnection, request_id: int, exc: KvdError) -> None:
    try:
        with trio.move_on_after(1):
            await conn.send(_error_frame(request_id, exc))
    except (ConnectFailed, ProtocolError):
        pass


async def _handshake(node, conn: GuardedConnection, role: str,
                     ticket: Ticket | None = None) -> None:
    """The server side of kvd.proto.handshake (HELLO, and for peers with a cluster secret
    the challenge-response), all within ``handshake_timeout``; then HELLO_OK and the frame
    limit rises. A refusal raises Unauthorized, counted by kvd.security.Refusals."""
    security = getattr(conn, "security", None) or Security()
    host = getattr(conn, "host", "")
    machine = ServerHandshake(
        role, node.node_id, max_frame=node.config.max_frame, chunk_size=node.config.chunk_size,
        authorize=partial(security.authorize, role, host), secret=security.secret,
        seal=not isinstance(conn.stream, trio.SSLStream),
        ports={"client": node.config.listen, "peer": node.config.peer_listen})
    with trio.move_on_after(node.config.handshake_timeout) as scope:
        try:
            done = await run_handshake(conn.stream, machine)
        except Unauthorized as exc:
            who = machine.hello.fields.get("node") if machine.hello is not None else None
            security.note_refusal(role, host, printable(who), str(exc))
            raise
    if scope.cancelled_caught:
        raise ProtocolError("handshake not completed within the handshake timeout")
    conn.max_frame = node.config.max_frame
    conn.grant = done.grant
    if ticket is not None:
        # Authenticated from here on: before HELLO_OK goes out, or a newcomer accepted while
        # it is being sent could evict this connection as an idle one.
        ticket.established()
    await conn.finish_handshake(machine, done)


async def _serve_connection(node, conn: GuardedConnection, role: str,
                            ticket: Ticket | None = None) -> None:
    await _handshake(node, conn, role, ticket)
    handlers = PEER_HANDLERS if role == "peer" else CLIENT_HANDLERS
    streams: dict[int, trio.MemorySendChannel] = {}
    slots = trio.Semaphore(MAX_IN_FLIGHT_PER_CONNECTION)
    async with trio.open_nursery() as nursery:
        activity = _IdleWatch(node.config.idle_timeout, slots, node.clocks.monotonic)
        nursery.start_soon(activity.watch, nursery.cancel_scope)

        while True:
            message = await conn.receive()
            activity.touch()
            if message is None:
                break  # client closed; let in-flight requests finish and reply
            if message.type == MsgType.CHUNK:
                channel = streams.get(message.request_id)
                if channel is None:
                    raise ProtocolError(f"CHUNK for unknown request id {message.request_id}")
                try:
                    await channel.send(message)
                except trio.BrokenResourceError:
                    pass  # the request already failed; drain the rest of its upload
                if message.flags & FLAG_END:
                    streams.pop(message.request_id).close()
                continue
            chunks = None
            if message.type == MsgType.PUT and "value" not in message.fields:
                send, chunks = trio.open_memory_channel(STREAM_BUFFER_FRAMES)
                if message.request_id in streams:
                    raise ProtocolError(f"request id {message.request_id} already streaming")
                streams[message.request_id] = send
                if message.fields["length"] == 0:
                    raise ProtocolError("a streamed PUT must declare a length above zero")
            answer_now = _ANSWER_NOW.get((role, message.type))
            if answer_now is not None:
                follow = await _answer_now(node, conn, message, answer_now)
                if follow is _ANSWERED:
                    continue
                if follow is not None:  # the reply is queued; its large values follow
                    await slots.acquire()
                    nursery.start_soon(_handle_request, node, conn, message, None, slots,
                                       {MsgType.GET: partial(_follow_up, follow)})
                    continue
            await slots.acquire()
            nursery.start_soon(_handle_request, node, conn, message, chunks, slots, handlers)
        for channel in streams.values():
            channel.close()
        activity.stop()  # let in-flight requests finish and reply, then close


class _IdleWatch:
    """Closes a connection that sent nothing for ``timeout`` seconds while it had no request
    in flight. One task per connection, instead of a cancel scope per received frame."""

    def __init__(self, timeout: float, slots: trio.Semaphore, clock: Callable[[], float]):
        self.timeout = timeout
        self.slots = slots
        self.clock = clock  # trio's (or the simulator's mock) clock: sleep_until reads it too
        self.last = clock()
        self._scope = trio.CancelScope()

    def stop(self) -> None:
        self._scope.cancel()

    def touch(self) -> None:
        self.last = self.clock()

    async def watch(self, scope: trio.CancelScope) -> None:
        with self._scope:
            await self._watch(scope)

    async def _watch(self, scope: trio.CancelScope) -> None:
        while True:
            await trio.sleep_until(self.last + self.timeout)
            idle = self.clock() - self.last >= self.timeout
            if idle and self.slots.value == MAX_IN_FLIGHT_PER_CONNECTION:
                log.debug("closing idle connection")
                scope.cancel()
                return
            if idle:
                self.touch()  # a long request is running; look again later


_ANSWERED = object()


# Requests the reader may answer itself (rule 2): a GET this node answers alone, and a
# replica read of an object that fits in the reply (peer_service.replica_read_now).
_ANSWER_NOW = {("client", MsgType.GET): get_now, ("peer", MsgType.REPLICA_GET): replica_read_now}


async def _answer_now(node, conn, message, answer_now):
    """A request answered by the reader itself: no task, and its reply goes out with the
    others of the same read (kvctl bench A on one node: see docs/DECISIONS.md, issue 14).
    Returns _ANSWERED, None when the request needs a task (other replicas, a staged
    object), or the async function that streams its large values."""
    try:
        node.request_started()
        try:
            answer = answer_now(node, conn, message)
        finally:
            node.request_finished()
    except Exception as exc:
        node.counters.errors += 1
        node.counters.requests += 1
        if not isinstance(exc, KvdError):
            log.exception("request %s failed", message.type.name)
            exc = KvdError("internal error; see the node's log")
        await conn.send_soon(_error_frame(message.request_id, exc))
        return _ANSWERED
    if answer is None:
        return None
    reply, follow = answer
    await conn.send_soon(reply)
    if follow is not None:
        return follow
    node.counters.requests += 1
    return _ANSWERED


async def _follow_up(follow, *_handler_args) -> None:
    await follow()


def _error_frame(request_id: int, exc: KvdError) -> bytes:
    return codec.encode(MsgType.ERROR, request_id, {"code": exc.code, "message": str(exc)})


async def _handle_request(node, conn, message, chunks, slots, handlers) -> None:
    rid = message.request_id
    try:
        node.request_started()
        try:
            handler = handlers.get(message.type)
            if handler is None:
                raise BadRequest(f"{message.type.name} is not accepted on this port")
            await handler(node, conn, message, chunks)
        finally:
            node.request_finished()
    except KvdError as exc:
        node.counters.errors += 1
        if not isinstance(exc, ConnectFailed):
            await _send_error(conn, rid, exc)
    except Exception:
        node.counters.errors += 1
        log.exception("request %s failed", message.type.name)
        await _send_error(conn, rid, KvdError("internal error; see the node's log"))
    finally:
        node.counters.requests += 1
        slots.release()
        if chunks is not None:
            chunks.close()
