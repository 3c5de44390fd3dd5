"""A blocking client on plain sockets, for short-lived processes such as kvctl.

The same protocol, request bodies and results as kvd.client (both build on
kvd.client_protocol and the sans-IO codec), without trio: a kvctl command that sends one
request spends its CPU on that request, not on importing an event loop
(benchmarks/kvctl_startup.py measures it). One request at a time on a connection. Every wait
(connect, handshake, each reply, each send) is bounded by ``timeout`` seconds, so nothing
waits forever; a large value that keeps moving is never cut off.

    with connect("127.0.0.1:7379", timeout=30) as client:
        client.put(b"k", b"v")
"""

from __future__ import annotations

import itertools
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import IO, Any

from kvd.address import parse_address
from kvd.client_protocol import (
    DEFAULT_ADDRESS,
    GetResult,
    PutResult,
    Sibling,
    get_fields,
    put_fields,
    put_length,
    put_result,
    write_fields,
)
from kvd.errors import ConnectFailed, KvdError, ProtocolError, error_from_code
from kvd.proto import codec
from kvd.proto.codec import NEED_DATA, FrameDecoder, Message
from kvd.proto.messages import FLAG_END, PROTOCOL_VERSION, MsgType

RECEIVE_SIZE = 256 * 1024
_FRAME_SLACK = 4096  # header and msgpack overhead beside an inline value or a chunk

Sink = Callable[[int, int], "IO[bytes] | None"]


class TimedOut(KvdError):
    """The node did not answer within the client's timeout (exit 1: the request failed,
    and may still complete on the node)."""


class BlockingClient:
    """An open, authenticated connection to one kvd node."""

    def __init__(self, sock: socket.socket, address: str, timeout: float, tls: bool = False):
        self._sock = sock
        self._tls = tls
        self.address = address
        self.timeout = timeout
        self._decoder = FrameDecoder()
        self._ids = itertools.count(1)
        self.node = ""
        self.chunk_size = 1 << 20

    # -- plumbing

    def _send(self, data: bytes) -> None:
        try:
            self._sock.sendall(data)
        except TimeoutError:
            raise self._timed_out() from None
        except OSError as exc:
            raise ConnectFailed(f"connection to {self.address} lost: {_reason(exc)}") from None

    def _receive(self) -> Message:
        while True:
            message = self._decoder.next_message()
            if message is None:
                raise ConnectFailed(f"{self.address} closed the connection")
            if message is not NEED_DATA:
                return message
            try:
                data = self._sock.recv(RECEIVE_SIZE)
            except TimeoutError:
                raise self._timed_out() from None
            except OSError as exc:
                raise ConnectFailed(f"connection to {self.address} lost: {_reason(exc)}") from None
            self._decoder.receive_data(data)

    def _timed_out(self) -> TimedOut:
        return TimedOut(f"no answer from {self.address} within {self.timeout:g} s "
                        "(--timeout / KVCTL_TIMEOUT); the request may still complete there")

    def _reply(self, expect: MsgType) -> Message:
        message = self._receive()
        if message.type == MsgType.ERROR:
            raise error_from_code(message.fields["code"], message.fields["message"])
        if message.type != expect:
            raise ProtocolError(f"expected {expect.name}, got {message.type.name}")
        return message

    def _call(self, kind: MsgType, fields: dict, expect: MsgType) -> dict:
        self._send(codec.encode(kind, next(self._ids), fields))
        return self._reply(expect).fields

    def _handshake(self, token: str | None) -> None:
        hello: dict[str, Any] = {"versions": [PROTOCOL_VERSION], "role": "client"}
        if token:
            hello["token"] = token
        self._send(codec.encode(MsgType.HELLO, 0, hello))
        try:
            first = self._sock.recv(RECEIVE_SIZE)
        except TimeoutError:
            raise ConnectFailed(f"{self.address} did not answer the handshake within "
                                f"{self.timeout:g} s; is it a kvd client port?") from None
        except OSError as exc:
            raise ConnectFailed(f"cannot connect to {self.address}: {_reason(exc)}") from None
        if not first:
            from kvd.proto.handshake import closed_during_handshake

            raise ConnectFailed(closed_during_handshake(self.address, plain=not self._tls))
        if not first.startswith(codec.MAGIC[:len(first)]):
            # Imported only here: the handshake module is no part of a kvctl run's start.
            from kvd.proto.handshake import foreign_answer

            raise ConnectFailed(foreign_answer(self.address, first) or "")
        self._decoder.receive_data(first)
        reply = self._receive()
        if reply.type == MsgType.ERROR:
            error = error_from_code(reply.fields["code"], reply.fields["message"])
            # A refusal of the handshake itself (wrong port, protocol version) is a failure
            # to connect; an authentication refusal keeps its own kind (same exit code).
            raise error if not isinstance(error, ProtocolError) else ConnectFailed(str(error))
        if reply.type != MsgType.HELLO_OK:
            raise ProtocolError(f"expected HELLO_OK, got {reply.type.name}")
        self.node = reply.fields["node"]
        max_frame = reply.fields["max_frame"]
        self._decoder.max_frame = max(max_frame, self._decoder.max_frame) + _FRAME_SLACK
        self.chunk_size = min(reply.fields.get("chunk_size", 1 << 20), max_frame - _FRAME_SLACK)

    # -- key-value operations (the same names and results as kvd.client.Client)

    def get(self, key: bytes, *, r: int | None = None, n: int | None = None,
            sink: Sink | None = None) -> GetResult:
        """Read every sibling of ``key``. A value that arrives as CHUNK frames goes to
        ``sink(index, sibling_count)`` when that returns a binary file, else into memory."""
        body = self._call(MsgType.GET, get_fields(key, r=r, n=n), MsgType.GET_REPLY)
        described = body["siblings"]
        siblings = []
        for index, sibling in enumerate(described):
            value = sibling["value"]
            if value is None:
                value = self._receive_stream(sink(index, len(described)) if sink else None)
            siblings.append(Sibling(value, sibling["deleted"], sibling["length"]))
        return GetResult(key, body["found"], body["context"], siblings, body.get("replicas", 0))

    def _receive_stream(self, out: IO[bytes] | None) -> bytes:
        parts = []
        while True:
            chunk = self._reply(MsgType.CHUNK)
            if out is not None:
                out.write(chunk.fields["data"])
            else:
                parts.append(chunk.fields["data"])
            if chunk.flags & FLAG_END:
                return b"".join(parts)

    def put(self, key: bytes, value: bytes | None = None, *, source: IO[bytes] | None = None,
            length: int | None = None, context: bytes | None = None, blind: bool = False,
            n: int | None = None, w: int | None = None) -> PutResult:
        """Write ``value`` (bytes) or ``length`` bytes read from the binary file ``source``.
        Without ``context`` the node supersedes what it holds; ``blind`` adds a sibling."""
        total = put_length(value, source, length)
        fields = put_fields(key, total, context=context, blind=blind, n=n, w=w)
        rid = next(self._ids)
        if value is not None and total <= self.chunk_size:
            self._send(codec.encode(MsgType.PUT, rid, {**fields, "value": value}))
            return put_result(self._reply(MsgType.PUT_REPLY).fields)
        self._send(codec.encode(MsgType.PUT, rid, fields))
        try:
            self._send_stream(rid, total, value, source)
        except ConnectFailed:
            pass  # the node may have refused the write early and closed: its ERROR says why
        return put_result(self._reply(MsgType.PUT_REPLY).fields)

    def _send_stream(self, rid: int, total: int, value: bytes | None,
                     source: IO[bytes] | None) -> None:
        sent = 0
        view = memoryview(value) if value is not None else None
        while sent < total:
            size = min(self.chunk_size, total - sent)
            data: bytes | memoryview
            if view is not None:
                data = view[sent : sent + size]
            else:
                assert source is not None  # put gives exactly one of value and source
                data = source.read(size)
            if not data:
                raise KvdError(f"input ended after {sent} of {total} bytes")
            sent += len(data)
            self._send(codec.encode_chunk(rid, data, end=sent >= total))

    def delete(self, key: bytes, *, context: bytes | None = None, blind: bool = False,
               n: int | None = None, w: int | None = None) -> PutResult:
        """Write a tombstone; without ``context`` it supersedes what the node holds."""
        fields = write_fields(key, context=context, blind=blind, n=n, w=w)
        return put_result(self._call(MsgType.DELETE, fields, MsgType.PUT_REPLY))

    def status(self) -> dict:
        return self._call(MsgType.STATUS, {}, MsgType.STATUS_REPLY)

    def inspect(self, key: bytes) -> dict:
        return self._call(MsgType.INSPECT, {"key": key}, MsgType.INSPECT_REPLY)

    def ping(self) -> None:
        self._call(MsgType.PING, {}, MsgType.PONG)

    def admin(self, fields: dict) -> dict:
        """Cluster administration (join, leave, plan, commit, ...), see docs/protocol.md."""
        return self._call(MsgType.ADMIN, fields, MsgType.ADMIN_REPLY)


@contextmanager
def connect(address: str, *, timeout: float, token: str | None = None,
            ssl_context=None) -> Iterator[BlockingClient]:
    """Connect, handshake and yield a BlockingClient; closes the connection on exit.
    ``ssl_context``: speak TLS, verifying the node's certificate for the host in ``address``."""
    try:
        host, port = parse_address(address, to_dial=True)
    except ValueError as exc:
        raise ConnectFailed(str(exc)) from None
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except TimeoutError:
        raise ConnectFailed(f"cannot connect to {address}: timed out after {timeout:g} s"
                            ) from None
    except OSError as exc:
        raise ConnectFailed(f"cannot connect to {address}: {_reason(exc)}") from None
    try:
        if ssl_context is not None:
            try:
                sock = ssl_context.wrap_socket(sock, server_hostname=host)
            except OSError as exc:
                from kvd.proto.handshake import tls_refused

                raise ConnectFailed(tls_refused(address, _reason(exc))) from None
        client = BlockingClient(sock, address, timeout, tls=ssl_context is not None)
        client._handshake(token)
        yield client
    finally:
        sock.close()


def _reason(exc: OSError) -> str:
    return getattr(exc, "reason", None) or exc.strerror or str(exc) or type(exc).__name__


class SyncClient:
    """A blocking client for scripts: each call opens a connection, runs, and closes it."""

    def __init__(self, address: str = DEFAULT_ADDRESS, *, token: str | None = None,
                 timeout: float = 30.0):
        self.address = address
        self.token = token
        self.timeout = timeout

    def _run(self, method: str, *args, **kwargs):
        with connect(self.address, timeout=self.timeout, token=self.token) as client:
            return getattr(client, method)(*args, **kwargs)

    def get(self, key: bytes, **kwargs) -> GetResult:
        return self._run("get", key, **kwargs)

    def put(self, key: bytes, value: bytes | None = None, **kwargs) -> PutResult:
        return self._run("put", key, value, **kwargs)

    def delete(self, key: bytes, **kwargs) -> PutResult:
        return self._run("delete", key, **kwargs)

    def status(self) -> dict:
        return self._run("status")

    def inspect(self, key: bytes) -> dict:
        return self._run("inspect", key)
