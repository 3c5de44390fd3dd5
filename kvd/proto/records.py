"""Authenticated records, sans-IO: integrity for plain-TCP peer connections after the handshake.

The peer handshake (kvd.proto.handshake, docs/protocol.md section 2) proves the cluster
secret but protects only itself; without TLS an on-path attacker could still inject, alter,
replay or drop frames afterwards. So once the connecting node has sent its proof, every byte
either side sends travels in records::

    u32 length | payload (length bytes) | tag (16 bytes)
    tag = BLAKE2b-128(key = the direction's session key, u64 sequence | u32 length | payload)

Invariants:

- Rule 1: no byte of a record reaches the caller before its tag verifies. A record that fails
  raises IntegrityError, and every later call raises it again: the stream is dead.
- Rule 2: each direction has its own key (kvd.proto.handshake.session_keys) and its own
  sequence number counting records from 0, so a record cannot be replayed, reordered,
  dropped, or reflected back to its sender without failing the next check.
- Rule 3: a record's declared length is checked against MAX_RECORD before any of it is
  buffered, so a forged length cannot make the receiver allocate.

Records are cut independently of frames: one record may carry several frames (a batched
send) or part of one (a large CHUNK). ``Sealer``/``Opener`` do no I/O (the handshake uses
them directly); kvd.net.sealed.SealedStream wraps a trio stream with them.
"""

from __future__ import annotations

import hashlib
import hmac
import struct

from kvd.errors import RemoteProtocolError

__all__ = ["IntegrityError", "MAX_RECORD", "Opener", "Sealer", "TAG_SIZE"]

TAG_SIZE = 16
MAX_RECORD = 64 * 1024  # payload bytes; larger sends are cut into several records
_LENGTH = struct.Struct(">I")
_SEQ_LENGTH = struct.Struct(">QI")


class IntegrityError(RemoteProtocolError):
    """A record on an authenticated peer connection failed its integrity check."""


class _Keyed:
    def __init__(self, key: bytes):
        self._base = hashlib.blake2b(key=key, digest_size=TAG_SIZE)  # copied per record
        self.sequence = 0

    def _tag(self, payload) -> bytes:
        mac = self._base.copy()
        mac.update(_SEQ_LENGTH.pack(self.sequence, len(payload)))
        mac.update(payload)
        self.sequence += 1
        return mac.digest()


class Sealer(_Keyed):
    """Turns bytes to send into records under one direction's key."""

    def seal(self, data: bytes) -> bytes:
        parts: list[bytes | memoryview] = []
        with memoryview(data) as view:
            for start in range(0, len(view), MAX_RECORD):
                payload = view[start : start + MAX_RECORD]
                parts += (_LENGTH.pack(len(payload)), payload, self._tag(payload))
            return b"".join(parts)


class Opener(_Keyed):
    """Checks received records under one direction's key and returns their payloads."""

    def __init__(self, key: bytes):
        super().__init__(key)
        self._buf = bytearray()
        self._pos = 0  # bytes at the front of _buf already returned
        self._error: IntegrityError | None = None

    def receive_data(self, data: bytes | bytearray) -> None:
        if self._pos and self._pos * 2 >= len(self._buf):
            del self._buf[: self._pos]
            self._pos = 0
        self._buf += data

    def next_payload(self) -> bytes | None:
        """The next verified payload, or None until a whole record has arrived."""
        if self._error is not None:
            raise self._error
        if self.pending < _LENGTH.size:
            return None
        (length,) = _LENGTH.unpack_from(self._buf, self._pos)
        if length > MAX_RECORD:
            self.fail(f"record {self.sequence} declares {length} bytes, over {MAX_RECORD} "
                       "(injected or altered in transit)")
        start = self._pos + _LENGTH.size
        end = start + length + TAG_SIZE
        if len(self._buf) < end:
            return None
        with memoryview(self._buf) as view:
            payload = view[start : start + length].tobytes()
            tag = view[end - TAG_SIZE : end].tobytes()
        sequence = self.sequence
        if not hmac.compare_digest(self._tag(payload), tag):
            self.fail(f"record {sequence} failed its integrity check (injected or altered "
                       "in transit, or not sent by the authenticated peer)")
        self._pos = end
        return payload

    @property
    def pending(self) -> int:
        """Bytes received that do not yet form a whole record."""
        return len(self._buf) - self._pos

    def fail(self, reason: str) -> None:
        """Declare the stream dead (rule 1): raise IntegrityError now and on every later call."""
        self._error = IntegrityError(f"peer connection integrity: {reason}; closing")
        raise self._error
