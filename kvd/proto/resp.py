"""The Redis protocol (RESP2/RESP3), sans-IO: a request parser and a reply serializer.

``RespParser`` takes bytes (``receive_data``) and hands out events (``next_event``): a
complete command as a list of bulk strings, or, for one bulk argument larger than
``Limits.stream_above``, ``StreamStart`` / ``StreamData``... / ``StreamEnd``, so a 1 GiB value
passes through in pieces and is never held whole. ``encode(reply, resp3)`` serializes a
reply. No sockets, no clock: kvd.node.resp_service is the I/O shell around it.

Invariants:

- Rule 1: every length is checked against the limits before a byte of what it announces is
  awaited or kept: the argument count, each bulk length, the inline line (checked while no
  newline has come), and the bytes one command holds buffered. A header line that no valid
  header could be is refused once ``MAX_HEADER_LINE`` bytes have come without its CRLF.
- Rule 1a: a length is decimal as redis-server's ``string2ll`` reads it: no "+", no leading
  zero, "-" only before a nonzero digit. A negative bulk length is refused; a negative
  argument count is ignored, as redis-server ignores it.
- Rule 2: a request the parser refuses raises ProtocolError with Redis's wording ("Protocol
  error: ..."; Rule 5's aside); the stream cannot be resynchronised, so the shell answers it
  and closes.
- Rule 3: before authentication the limits are Redis's after CVE-2021-32675 (``PRE_AUTH``:
  10 arguments, 16 KiB per bulk) and inline lines are capped at 16 KiB; the shell raises
  them with ``parser.limits = ...`` once the client has authenticated.
- Rule 4: events come out in the order the bytes went in, so pipelined commands are
  answered in order; the parser buffers at most one command (plus one read) at a time.
- Rule 5: a frame of kvd's own protocol (kvctl given this port) is refused by its first
  three bytes (``KV``, then the protocol version, a control byte no command holds) with a
  ProtocolError naming the client port. Taken as an inline command, it waited for a newline
  that a frame need not have, and the client heard nothing.

Inline commands follow redis-cli's quoting (``sdssplitargs``): whitespace separates,
"double quotes" take \\n \\r \\t \\b \\a \\\\ \\" and \\xHH escapes, 'single quotes' take \\'.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from kvd.errors import ProtocolError

__all__ = ["NEED_DATA", "Limits", "PRE_AUTH", "AUTHENTICATED", "RespParser", "StreamStart",
           "StreamData", "StreamEnd", "Simple", "Error", "Verbatim", "encode", "bulk_header",
           "split_inline"]

MAX_HEADER_LINE = 32  # "*" or "$" and a 64-bit length fit with room to spare
KVD_MAGIC = b"KV"  # how kvd.proto.codec's frames start (its MAGIC): Rule 5
NATIVE_CLIENT = "this is kvd's RESP port; kvd clients (kvctl) use the client port (listen)"


class _NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = _NeedData()


@dataclass(frozen=True)
class Limits:
    """What one connection may send (Rule 1)."""

    max_args: int  # arguments of one command
    max_bulk: int  # bytes of one bulk argument (streamed ones included)
    max_inline: int  # bytes of one inline command line
    max_buffer: int  # bytes of one command held at once (streamed bulks excluded)
    stream_above: int | None = None  # a bulk argument larger than this is streamed


# Redis 6.2.6+ (CVE-2021-32675): unauthenticated multibulk <= 10, bulk <= 16 KiB.
PRE_AUTH = Limits(max_args=10, max_bulk=16 * 1024, max_inline=16 * 1024,
                  max_buffer=64 * 1024)
AUTHENTICATED = Limits(max_args=1024 * 1024, max_bulk=1 << 30, max_inline=64 * 1024,
                       max_buffer=64 * 1024 * 1024, stream_above=1 << 20)


@dataclass
class StreamStart:
    """A command whose argument number ``len(args)`` is ``length`` bytes, streamed next."""

    args: list[bytes]
    length: int


@dataclass
class StreamData:
    data: bytes


@dataclass
class StreamEnd:
    """The streamed argument is complete; ``args`` are the arguments after it."""

    args: list[bytes]


class RespParser:
    """Incremental RESP request parser (multibulk and inline)."""

    def __init__(self, limits: Limits = PRE_AUTH):
        self.limits = limits
        self._buf = bytearray()
        self._eof = False
        self._args: list[bytes] | None = None  # arguments of the multibulk being read
        self._count = 0  # arguments the multibulk announced
        self._size = 0  # bytes of it held
        self._streaming: int | None = None  # bytes left of the streamed bulk
        self._streamed = False  # this command's streamed bulk has begun
        self._bulk: int | None = None  # length of the bulk whose body is awaited

    @property
    def buffered(self) -> int:
        return len(self._buf) + self._size

    def receive_data(self, data: bytes) -> None:
        """Feed bytes received; ``b""`` means the peer closed its side."""
        if data:
            self._buf += data
        else:
            self._eof = True

    def next_event(self):
        """A command (list of bytes), StreamStart/StreamData/StreamEnd, NEED_DATA, or None at
        a clean end of stream. Raises ProtocolError on a request that breaks the protocol."""
        if self._args is None and self._streaming is None:
            args = self._whole_command()
            if args is not None:
                return args
        while True:
            event = self._step()
            if event is not _AGAIN:
                return event

    def _whole_command(self) -> list[bytes] | None:
        """A multibulk command that is whole in the buffer and within the limits, taken in
        one pass (a third of the parser's cost per redis-benchmark GET); None, with nothing
        consumed, for anything else: the step parser then takes it, errors included."""
        buf, limits = self._buf, self.limits
        if not buf or buf[0] != 42:  # "*"
            return None
        end = buf.find(b"\r\n", 1, MAX_HEADER_LINE)
        head = buf[1:end]
        if (end < 0 or not head.isdigit() or head[0] == 48  # a leading "0": Rule 1a
                or not int(head) <= limits.max_args):
            return None
        args, pos, size = [], end + 2, 0
        stream_above = limits.stream_above if limits.stream_above is not None else 1 << 62
        for _ in range(int(head)):
            if buf[pos:pos + 1] != b"$":
                return None
            end = buf.find(b"\r\n", pos + 1, pos + MAX_HEADER_LINE)
            head = buf[pos + 1:end]
            if end < 0 or not head.isdigit() or (head[0] == 48 and len(head) > 1):
                return None
            length = int(head)
            size += length
            start, pos = end + 2, end + 4 + length
            if (length > limits.max_bulk or length > stream_above or size > limits.max_buffer
                    or buf[pos - 2:pos] != b"\r\n"):
                return None
            args.append(bytes(buf[start:pos - 2]))
        del buf[:pos]
        return args

    def _step(self):
        if self._streaming is not None:
            return self._stream_step()
        if self._args is not None:
            return self._multibulk_step()
        if not self._buf:
            return None if self._eof else NEED_DATA
        if self._buf[0] == ord("*"):
            line = self._line("multibulk count")
            if line is None:
                return NEED_DATA
            count = _integer(line[1:], "invalid multibulk length")
            if count > self.limits.max_args:
                raise ProtocolError("Protocol error: invalid multibulk length")
            if count <= 0:
                return _AGAIN  # Redis ignores an empty multibulk
            self._args, self._count, self._size = [], count, 0
            return _AGAIN
        return self._inline_step()

    def _need_more(self):
        """NEED_DATA, unless the peer has closed: a request cut short is an error."""
        if self._eof:
            raise ProtocolError("Protocol error: connection closed in mid-request")
        return NEED_DATA

    def _line(self, what: str) -> bytes | None:
        """A CRLF-terminated header line taken from the buffer (without CRLF), or None."""
        end = self._buf.find(b"\r\n", 0, MAX_HEADER_LINE)
        if end < 0:
            if len(self._buf) >= MAX_HEADER_LINE:
                raise ProtocolError(f"Protocol error: too big {what} string")
            self._need_more()
            return None
        line = bytes(self._buf[:end])
        del self._buf[:end + 2]
        return line

    def _multibulk_step(self):
        args = self._args
        assert args is not None
        if self._bulk is None:
            if not self._buf:
                return self._need_more()
            if self._buf[0] != ord("$"):
                got = chr(self._buf[0]) if 32 < self._buf[0] < 127 else repr(bytes(self._buf[:1]))
                raise ProtocolError(f"Protocol error: expected '$', got '{got}'")
            line = self._line("bulk count")
            if line is None:
                return NEED_DATA
            length = _integer(line[1:], "invalid bulk length")
            limits = self.limits
            if length < 0 or length > limits.max_bulk:
                raise ProtocolError("Protocol error: invalid bulk length")
            streams = (limits.stream_above is not None and length > limits.stream_above
                       and not self._streamed)
            if streams:
                self._streaming = length
                return StreamStart(self._take_args(), length)
            if self._size + length > limits.max_buffer or (
                    self._streamed and length > (limits.stream_above or 0)):
                raise ProtocolError("Protocol error: request too large for the query buffer")
            self._bulk = length
        if len(self._buf) < self._bulk + 2:
            return self._need_more()
        if self._buf[self._bulk:self._bulk + 2] != b"\r\n":
            raise ProtocolError("Protocol error: bulk string not terminated by CRLF")
        args.append(bytes(self._buf[:self._bulk]))
        self._size += self._bulk
        del self._buf[:self._bulk + 2]
        self._bulk = None
        return self._finish_if_complete()

    def _finish_if_complete(self):
        args = self._args
        assert args is not None
        if len(args) + self._streamed < self._count:
            return _AGAIN
        self._args = None
        self._size = 0
        if self._streamed:
            self._streamed = False
            return StreamEnd(args)
        return args

    def _take_args(self) -> list[bytes]:
        """The arguments before a streamed bulk; those after it are collected afresh."""
        before = self._args or []
        self._streamed = True
        self._count -= len(before)
        self._args = []
        return before

    def _stream_step(self):
        left = self._streaming
        assert left is not None
        if left:
            if not self._buf:
                return self._need_more()
            piece = bytes(self._buf[:left])
            del self._buf[:len(piece)]
            self._streaming = left - len(piece)
            return StreamData(piece)
        if len(self._buf) < 2:
            return self._need_more()
        if self._buf[:2] != b"\r\n":
            raise ProtocolError("Protocol error: bulk string not terminated by CRLF")
        del self._buf[:2]
        self._streaming = None
        return self._finish_if_complete()

    def _inline_step(self):
        if self._buf[:2] == KVD_MAGIC and len(self._buf) > 2 and self._buf[2] < 32:
            raise ProtocolError(NATIVE_CLIENT)  # Rule 5
        end = self._buf.find(b"\n", 0, self.limits.max_inline + 1)
        if end < 0:
            if len(self._buf) > self.limits.max_inline:
                raise ProtocolError("Protocol error: too big inline request")
            return self._need_more()
        line = bytes(self._buf[:end]).rstrip(b"\r")
        del self._buf[:end + 1]
        args = split_inline(line)
        if len(args) > self.limits.max_args:
            raise ProtocolError("Protocol error: invalid multibulk length")
        return args if args else _AGAIN  # an empty line is ignored, as Redis does


_AGAIN = object()  # internal: the step consumed something; take another


_INTEGER = re.compile(rb"0|-?[1-9][0-9]{0,18}")  # Rule 1a


def _integer(text: bytes, problem: str) -> int:
    if not _INTEGER.fullmatch(text):
        raise ProtocolError(f"Protocol error: {problem}")
    return int(text)


_ESCAPES = {ord("n"): b"\n", ord("r"): b"\r", ord("t"): b"\t", ord("b"): b"\b",
            ord("a"): b"\a"}
_HEX = b"0123456789abcdefABCDEF"


def split_inline(line: bytes) -> list[bytes]:
    """An inline command's arguments, quoted as redis-cli quotes them (sdssplitargs)."""
    args: list[bytes] = []
    i, n = 0, len(line)
    while True:
        while i < n and line[i] in b" \t\n\r\v\f":
            i += 1
        if i >= n:
            return args
        current = bytearray()
        quote = 0
        while True:
            if i >= n:
                if quote:
                    raise ProtocolError("Protocol error: unbalanced quotes in request")
                break
            c = line[i]
            if quote == ord('"'):
                if (c == ord("\\") and i + 3 < n and line[i + 1] == ord("x")
                        and line[i + 2] in _HEX and line[i + 3] in _HEX):
                    current.append(int(line[i + 2:i + 4], 16))
                    i += 3
                elif c == ord("\\") and i + 1 < n:
                    i += 1
                    current += _ESCAPES.get(line[i], bytes([line[i]]))
                elif c == quote:
                    if i + 1 < n and line[i + 1] not in b" \t\n\r\v\f":
                        raise ProtocolError("Protocol error: unbalanced quotes in request")
                    i += 1
                    break
                else:
                    current.append(c)
            elif quote == ord("'"):
                if c == ord("\\") and i + 1 < n and line[i + 1] == ord("'"):
                    i += 1
                    current.append(ord("'"))
                elif c == quote:
                    if i + 1 < n and line[i + 1] not in b" \t\n\r\v\f":
                        raise ProtocolError("Protocol error: unbalanced quotes in request")
                    i += 1
                    break
                else:
                    current.append(c)
            elif c in b" \t\n\r\v\f":
                break
            elif c in b"\"'":
                quote = c
            else:
                current.append(c)
            i += 1
        args.append(bytes(current))


# ---------------------------------------------------------------------------- replies


class Simple(str):
    """A simple string reply (``+OK``)."""


class Error(str):
    """An error reply; the text starts with its code word (ERR, WRONGTYPE, CONFLICT, ...)."""


class Verbatim(str):
    """A RESP3 verbatim text (INFO's reply); a bulk string in RESP2."""


def encode(reply, resp3: bool = False) -> bytes:
    """Serialize one reply. bytes -> bulk string, str -> bulk string (UTF-8), Simple,
    Error, int, None -> null, bool, float, list/tuple -> array, set -> set, dict -> map
    (RESP2: flat array), Verbatim -> verbatim text. RESP2 turns the RESP3-only types into
    their RESP2 forms as Redis does."""
    if type(reply) is bytes:  # a GET's value, the commonest reply: no list, no join
        return b"$%d\r\n%s\r\n" % (len(reply), reply)
    out: list[bytes] = []
    _encode(reply, resp3, out)
    return b"".join(out)


def _encode(reply, resp3: bool, out: list[bytes]) -> None:
    if isinstance(reply, Simple):
        out.append(b"+" + _one_line(reply) + b"\r\n")
    elif isinstance(reply, Error):
        out.append(b"-" + _one_line(reply) + b"\r\n")
    elif isinstance(reply, Verbatim) and resp3:
        data = b"txt:" + reply.encode()
        out.append(b"=%d\r\n%s\r\n" % (len(data), data))
    elif isinstance(reply, (bytes, bytearray, memoryview, str)):
        data = reply.encode() if isinstance(reply, str) else bytes(reply)
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    elif reply is None:
        out.append(b"_\r\n" if resp3 else b"$-1\r\n")
    elif isinstance(reply, bool):
        out.append((b"#t\r\n" if reply else b"#f\r\n") if resp3 else b":%d\r\n" % reply)
    elif isinstance(reply, int):
        out.append(b":%d\r\n" % reply)
    elif isinstance(reply, float):
        text = repr(reply).encode()
        out.append(b",%s\r\n" % text if resp3 else b"$%d\r\n%s\r\n" % (len(text), text))
    elif isinstance(reply, dict):
        out.append((b"%%%d\r\n" if resp3 else b"*%d\r\n") % (len(reply) * (1 if resp3 else 2)))
        for key, value in reply.items():
            _encode(key, resp3, out)
            _encode(value, resp3, out)
    elif isinstance(reply, (set, frozenset)):
        out.append((b"~%d\r\n" if resp3 else b"*%d\r\n") % len(reply))
        for item in sorted(reply):
            _encode(item, resp3, out)
    elif isinstance(reply, (list, tuple)):
        out.append(b"*%d\r\n" % len(reply))
        for item in reply:
            _encode(item, resp3, out)
    else:
        raise TypeError(f"no RESP form for {type(reply).__name__}")


def _one_line(text: str) -> bytes:
    """A simple string or error on one line: CR and LF would end it early."""
    return text.replace("\r", " ").replace("\n", " ").encode()


def bulk_header(length: int) -> bytes:
    """The header of a bulk string sent in pieces (its body, then CRLF, follow)."""
    return b"$%d\r\n" % length
