"""Sans-IO codec of the kvd wire protocol (h11/wsproto style): bytes in, frames out.

Frame = 13-byte header + body. Header, big-endian (``struct ">2sBBBII"``):
magic ``b"KV"``, protocol version (1), message type, flags, request id (u32), body length
(u32). Bodies are msgpack maps checked against ``messages.SCHEMA`` (and ``messages.OPS`` for
types with operations, both compiled by kvd.proto.schema), except CHUNK whose body is raw
bytes. docs/protocol.md is the description for client authors.

Invariants:

- Rule 1: no I/O. The caller feeds bytes with ``FrameDecoder.receive_data`` (``b""`` is EOF)
  and pulls frames with ``next_frame``/``next_message`` until NEED_DATA. Imports neither
  trio nor plyvel.
- Rule 2: limits before allocation. The declared body length is checked against
  ``max_frame`` from the header alone, so a decoder that is drained after every
  ``receive_data`` never holds more than HEADER_SIZE + max_frame + one call's worth of bytes.
- Rule 3: everything wrong with received bytes raises RemoteProtocolError (FrameTooLarge for
  oversized frames) and nothing else; the decoder then stays failed, because the stream
  has no resynchronisation point and the connection must be closed.
- Rule 4: everything wrong with what we are asked to send raises LocalProtocolError before a
  byte is produced: a bug on our side must not reach the wire as a malformed frame.
- Rule 5: the codec checks types, not values (see ``messages.validate_key``).
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import Final, NoReturn

import msgpack

from kvd.errors import FrameTooLarge, LocalProtocolError, RemoteProtocolError
from kvd.proto.messages import (
    ALLOWED_FLAGS,
    DEFAULT_MAX_FRAME,
    FLAG_END,
    HEADER_SIZE,
    MAX_KEY_LEN,
    MAX_REQUEST_ID,
    PRE_AUTH_MAX_FRAME,
    PROTOCOL_VERSION,
    RAW_BODY,
    MsgType,
    validate_key,
)
from kvd.proto.schema import DECODE_CHECKS, ENCODE_CHECKS, type_name

__all__ = [
    "DEFAULT_MAX_FRAME",
    "FLAG_END",
    "HEADER_SIZE",
    "MAX_KEY_LEN",
    "NEED_DATA",
    "NeedData",
    "PRE_AUTH_MAX_FRAME",
    "PROTOCOL_VERSION",
    "Frame",
    "FrameDecoder",
    "Message",
    "MsgType",
    "decode_fields",
    "encode",
    "encode_chunk",
    "validate_key",
]

MAGIC = b"KV"
HEADER = struct.Struct(">2sBBBII")
assert HEADER.size == HEADER_SIZE

MAX_BODY = 0xFFFFFFFF
# Compact the receive buffer once this many consumed bytes sit at its front (and they are
# more than half of it), so feeding many small frames never copies quadratically.
_COMPACT_AT = 64 * 1024


class _Sentinel(enum.Enum):
    """An enum, so that ``x is NEED_DATA`` narrows the type of x for the type checker."""

    NEED_DATA = "NEED_DATA"

    def __repr__(self) -> str:
        return self.value


NEED_DATA: Final = _Sentinel.NEED_DATA
"""Returned by ``next_frame``/``next_message`` when more bytes are needed."""
NeedData = _Sentinel  # the type of NEED_DATA, for annotations


@dataclass(frozen=True, slots=True)
class Frame:
    """One frame as it travels: header fields and the undecoded body."""

    type: MsgType
    request_id: int
    body: bytes
    flags: int = 0


@dataclass(frozen=True, slots=True)
class Message:
    """A frame whose body has been decoded and checked (CHUNK: ``{"data": bytes}``)."""

    type: MsgType
    request_id: int
    fields: dict
    flags: int = 0


# Indexed by the header's type byte: the MsgType, or None for numbers not (yet) assigned.
_TYPE_BY_BYTE = tuple(MsgType(b) if b in MsgType._value2member_map_ else None for b in range(256))
_BAD_FLAGS = {t: ~ALLOWED_FLAGS.get(t, 0) for t in MsgType}


# --- encoding --------------------------------------------------------------------------------


def _frame_bytes(type: MsgType, request_id: int, flags: int, body) -> bytes:
    return _frame_header(type, request_id, flags, len(body)) + body


def _frame_header(type: MsgType, request_id: int, flags: int, length: int) -> bytes:
    if flags & _BAD_FLAGS[type]:
        raise LocalProtocolError(f"flags 0x{flags:02x} are not allowed on a {type.name} frame")
    if length > MAX_BODY:
        raise LocalProtocolError(f"{type.name} body of {length} bytes exceeds the u32 length")
    try:
        return HEADER.pack(MAGIC, PROTOCOL_VERSION, type, flags, request_id, length)
    except struct.error:
        raise LocalProtocolError(
            f"request id must be an int in 0..{MAX_REQUEST_ID}, got {request_id!r}"
        ) from None


def _message_type(type) -> MsgType:
    try:
        return MsgType(type)
    except ValueError:
        raise LocalProtocolError(f"unknown message type {type!r}") from None


def encode(type: MsgType, request_id: int, fields: dict | None = None, flags: int = 0) -> bytes:
    """Return the bytes of one frame whose body is ``fields``, checked against the schema.

    Raises LocalProtocolError if the frame would be invalid. CHUNK is accepted too, with
    ``fields = {"data": bytes}``, so that any decoded Message can be re-encoded.
    """
    type = _message_type(type)
    if fields is None:
        fields = {}
    elif not isinstance(fields, dict):
        raise LocalProtocolError(f"{type.name} fields must be a dict, got {type_name(fields)}")
    if type in RAW_BODY:
        data = fields.get("data")
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise LocalProtocolError(f"{type.name} needs fields {{'data': bytes}}")
        return _frame_bytes(type, request_id, flags, data)
    problem = ENCODE_CHECKS[type](fields)
    if problem is not None:
        raise LocalProtocolError(f"{type.name} {problem}")
    # The packer's own buffer, not packb's copy of it: packb copied a value's bytes twice
    # before the header was prepended (a 1 MiB replica chunk: 780 -> 520 us).
    packer = msgpack.Packer(use_bin_type=True, autoreset=False)
    try:
        packer.pack(fields)
    except Exception as exc:  # an unpackable value nested in a free-form field
        raise LocalProtocolError(f"{type.name} body cannot be encoded: {exc}") from exc
    with packer.getbuffer() as body:
        return _frame_bytes(type, request_id, flags, body)


def encode_chunk(request_id: int, data: bytes | bytearray | memoryview,
                 end: bool = False) -> bytes:
    """Return one CHUNK frame carrying ``data`` raw; ``end`` marks the last of a stream."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise LocalProtocolError(f"CHUNK data must be bytes, got {type_name(data)}")
    return _frame_bytes(MsgType.CHUNK, request_id, FLAG_END if end else 0, data)


def chunk_header(request_id: int, length: int, end: bool = False) -> bytes:
    """The header of a CHUNK frame whose ``length`` raw bytes the caller sends after it
    (a value sent from a file with sendfile)."""
    return _frame_header(MsgType.CHUNK, request_id, FLAG_END if end else 0, length)


# --- decoding --------------------------------------------------------------------------------


def decode_fields(frame: Frame) -> Message:
    """Decode and check a frame's body; RemoteProtocolError on anything wrong."""
    type = frame.type
    if type in RAW_BODY:
        return Message(type, frame.request_id, {"data": frame.body}, frame.flags)
    body = frame.body
    n = len(body)
    try:
        # Container limits derived from the body's size: a tiny body cannot declare a huge
        # array or string. Ext types (timestamps included) are not part of the protocol.
        fields = msgpack.unpackb(
            body,
            raw=False,
            strict_map_key=True,
            max_str_len=n,
            max_bin_len=n,
            max_array_len=n,
            max_map_len=n // 2,
            max_ext_len=0,
        )
    except Exception as exc:
        raise RemoteProtocolError(f"{type.name} body is not valid msgpack: {exc}") from exc
    if fields.__class__ is not dict:  # `type` is the message type here
        raise RemoteProtocolError(
            f"{type.name} body must be a msgpack map, got {type_name(fields)}"
        )
    problem = DECODE_CHECKS[type](fields)
    if problem is not None:
        raise RemoteProtocolError(f"{type.name} {problem}")
    return Message(type, frame.request_id, fields, frame.flags)


class FrameDecoder:
    """Splits a byte stream into frames, enforcing header rules and the frame size limit.

    Feed bytes with ``receive_data`` (``b""`` signals EOF), then call ``next_frame`` or
    ``next_message`` until it returns NEED_DATA. ``max_frame`` starts at the pre-auth limit;
    the server raises it once the handshake succeeds.
    """

    def __init__(self, max_frame: int = PRE_AUTH_MAX_FRAME) -> None:
        self._buf = bytearray()
        self._pos = 0  # bytes at the front of _buf already consumed
        self._header: tuple[MsgType, int, int, int] | None = None  # parsed, body pending
        self._eof = False
        self._error: RemoteProtocolError | None = None
        self.max_frame = max_frame

    @property
    def max_frame(self) -> int:
        """Largest body length accepted; checked when a header is parsed."""
        return self._max_frame

    @max_frame.setter
    def max_frame(self, value: int) -> None:
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_BODY:
            raise ValueError(f"max_frame must be an int in 0..{MAX_BODY}, got {value!r}")
        self._max_frame = value

    @property
    def buffered(self) -> int:
        """Bytes received and not yet returned as frames."""
        return len(self._buf) - self._pos

    def detach(self) -> bytes:
        """Remove and return the bytes received but not yet parsed, between frames: the
        connection is switching to another layer below (kvd.proto.records) that owns them."""
        if self._header is not None:
            raise RuntimeError("detach in the middle of a frame")
        rest = bytes(self._buf[self._pos :])
        self._buf.clear()
        self._pos = 0
        return rest

    def receive_data(self, data: bytes | bytearray) -> None:
        """Add bytes read from the connection; ``b""`` means the peer closed it."""
        if self._eof:
            if data:
                raise RuntimeError("receive_data called with data after EOF")
            return
        if data:
            self._buf += data
        else:
            self._eof = True

    def next_frame(self) -> Frame | _Sentinel | None:
        """Return the next complete Frame, NEED_DATA, or None after a clean EOF."""
        if self._error is not None:
            raise RemoteProtocolError(f"connection already failed: {self._error}")
        avail = len(self._buf) - self._pos
        header = self._header
        if header is None:
            if avail < HEADER_SIZE:
                if avail:
                    self._check_partial_header(avail)
                return self._need_data(avail, HEADER_SIZE)
            header = self._header = self._parse_header()
        type, flags, request_id, length = header
        end = HEADER_SIZE + length
        if avail < end:
            return self._need_data(avail, end)
        start = self._pos + HEADER_SIZE
        if length:
            with memoryview(self._buf) as view:
                body = view[start : start + length].tobytes()
        else:
            body = b""
        self._consume(end)
        self._header = None
        return Frame(type, request_id, body, flags)

    def next_message(self) -> Message | _Sentinel | None:
        """Like ``next_frame``, with the body decoded and checked by ``decode_fields``."""
        frame = self.next_frame()
        if frame is NEED_DATA or frame is None:
            return frame
        try:
            return decode_fields(frame)
        except RemoteProtocolError as exc:
            self._error = exc
            raise

    # -- internals

    def _fail(self, exc: RemoteProtocolError) -> NoReturn:
        self._error = exc
        raise exc

    def _need_data(self, avail: int, needed: int):
        if not self._eof:
            return NEED_DATA
        if avail == 0:
            return None
        self._fail(
            RemoteProtocolError(
                f"connection closed mid-frame ({avail} of {needed} bytes received)"
            )
        )

    def _consume(self, n: int) -> None:
        self._pos += n
        if self._pos == len(self._buf):
            self._buf.clear()
            self._pos = 0
        elif self._pos >= _COMPACT_AT and self._pos * 2 > len(self._buf):
            del self._buf[: self._pos]
            self._pos = 0

    def _check_partial_header(self, avail: int) -> None:
        # Reject garbage (an HTTP client, say) as soon as the bytes prove it.
        pos = self._pos
        prefix = bytes(self._buf[pos : pos + min(avail, 5)])
        if not MAGIC.startswith(prefix[:2]):
            self._fail(RemoteProtocolError(f"bad magic {prefix[:2]!r}, expected {MAGIC!r}"))
        if avail >= 3:
            self._check_version(prefix[2])
        if avail >= 4:
            type = self._check_type(prefix[3])
            if avail >= 5:
                self._check_flags(type, prefix[4])

    def _parse_header(self) -> tuple[MsgType, int, int, int]:
        magic, version, type_byte, flags, request_id, length = HEADER.unpack_from(
            self._buf, self._pos
        )
        if magic != MAGIC:
            self._fail(RemoteProtocolError(f"bad magic {magic!r}, expected {MAGIC!r}"))
        self._check_version(version)
        type = self._check_type(type_byte)
        self._check_flags(type, flags)
        if length > self._max_frame:
            self._fail(
                FrameTooLarge(
                    f"{type.name} frame declares a {length}-byte body,"
                    f" over the {self._max_frame}-byte limit"
                )
            )
        return type, flags, request_id, length

    def _check_version(self, version: int) -> None:
        if version != PROTOCOL_VERSION:
            self._fail(
                RemoteProtocolError(
                    f"unsupported protocol version {version} in frame header"
                    f" (this node speaks {PROTOCOL_VERSION})"
                )
            )

    def _check_type(self, type_byte: int) -> MsgType:
        type = _TYPE_BY_BYTE[type_byte]
        if type is None:
            self._fail(RemoteProtocolError(f"unknown message type {type_byte}"))
        return type

    def _check_flags(self, type: MsgType, flags: int) -> None:
        bad = flags & _BAD_FLAGS[type]
        if bad:
            self._fail(
                RemoteProtocolError(
                    f"unknown or disallowed flag bits 0x{bad:02x} on {type.name} frame"
                )
            )
