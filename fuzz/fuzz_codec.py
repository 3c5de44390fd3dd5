"""Coverage-guided fuzzing of the wire codec with atheris: ``make fuzz`` (FUZZ_SECONDS).

The property, ``check_input(data)``, imports nothing but the codec, so tests/test_fuzz.py
runs it inside ``make test`` on hypothesis input and on the seed corpus; atheris is needed
only to run this file:

    python fuzz/fuzz_codec.py -max_total_time=300 .fuzz/corpus

Property: whatever the bytes and however they are split, the decoder yields messages,
NEED_DATA, or a clean EOF, or raises RemoteProtocolError; it never raises anything else,
never buffers more than max_frame plus one read, and every message it yields re-encodes to
bytes that decode to the same frame.

The first input byte picks the frame limit and how the rest is split into reads, so the
fuzzer explores both the limits and the incremental parser.
"""

from __future__ import annotations

import os
import sys

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kvd.errors import RemoteProtocolError  # noqa: E402
from kvd.proto import codec  # noqa: E402
from kvd.proto.messages import (  # noqa: E402
    DEFAULT_MAX_FRAME,
    HEADER_SIZE,
    PRE_AUTH_MAX_FRAME,
    MsgType,
)

_LIMITS = (PRE_AUTH_MAX_FRAME, 64 * 1024, DEFAULT_MAX_FRAME, 0)
_READ = 65536  # the largest single read the property feeds


def samples() -> list[bytes]:
    """One valid frame of every message type (plus a few variants): the seed corpus and
    the raw material of the mutation fuzzers."""
    T = MsgType
    ctx = b"\x91\x92\xa2n1\x01"
    messages = [
        (T.HELLO, 1, {"versions": [1], "role": "client", "token": "t" * 20}),
        (T.HELLO, 1, {"versions": [1], "role": "peer", "node": "n2", "nonce": b"\x01" * 32}),
        (T.HELLO, 1, {"versions": [1], "role": "peer", "node": "n2", "proof": b"\x02" * 32}),
        (T.HELLO_OK, 1, {"version": 1, "node": "n1", "max_frame": 4194304}),
        (T.HELLO_OK, 1, {"version": 1, "node": "n1", "max_frame": 16384,
                         "nonce": b"\x03" * 32, "proof": b"\x04" * 32}),
        (T.ERROR, 2, {"code": "bad_request", "message": "key must be 1..1024 bytes"}),
        (T.GET, 2, {"key": b"user:42", "r": 2}),
        (T.GET_REPLY, 2, {"key": b"user:42", "found": True, "context": ctx,
                          "siblings": [{"value": b"v", "length": 1, "deleted": False},
                                       {"value": None, "length": 9, "deleted": False}],
                          "replicas": 3}),
        (T.PUT, 3, {"key": b"k", "length": 5, "value": b"hello", "context": ctx, "w": 2}),
        (T.PUT, 4, {"key": b"big", "length": 70000}),
        (T.PUT_REPLY, 3, {"context": ctx, "siblings": 1, "replicas": 3}),
        (T.DELETE, 5, {"key": b"k", "context": ctx}),
        (T.STATUS, 6, {}),
        (T.STATUS_REPLY, 6, {"node": "n1", "nodes": [{"node": "n1", "state": "UN"}]}),
        (T.INSPECT, 7, {"key": b"k"}),
        (T.INSPECT_REPLY, 7, {"key": b"k", "partition": 3, "replicas": [{"node": "n1"}]}),
        (T.PING, 8, {}),
        (T.PONG, 8, {}),
        (T.REPLICA_GET, 9, {"op": "get", "key": b"k"}),
        (T.REPLICA_GET_REPLY, 9, {"object": b"\x00"}),
        (T.REPLICA_PUT, 10, {"op": "merge", "key": b"k", "object": b"\x00"}),
        (T.REPLICA_PUT_REPLY, 10, {}),
        (T.GOSSIP, 11, {"node": "n2", "members": [{"node": "n2", "heartbeat": 1}]}),
        (T.GOSSIP_REPLY, 11, {"members": []}),
        (T.ADMIN, 12, {"op": "ring"}),
        (T.ADMIN_REPLY, 12, {"q": 8}),
    ]
    out = [codec.encode(kind, rid, fields) for kind, rid, fields in messages]
    out.append(codec.encode_chunk(4, b"\xab" * 100))
    out.append(codec.encode_chunk(4, b"", end=True))
    assert {bytes([f[3]]) for f in out} >= {bytes([t]) for t in MsgType}
    return out


def check_input(data: bytes) -> None:
    """The codec property on one input (see the module docstring)."""
    if not data:
        return
    control, rest = data[0], data[1:]
    max_frame = _LIMITS[control & 3]
    split = 1 + (control >> 2) * 37 % _READ  # 1, 38, 75, ... bytes per read
    decoder = codec.FrameDecoder(max_frame)
    try:
        for start in range(0, len(rest), split):
            decoder.receive_data(rest[start : start + split])
            _drain(decoder)
            assert decoder.buffered <= HEADER_SIZE + max_frame + split, decoder.buffered
        decoder.receive_data(b"")
        _drain(decoder)
    except RemoteProtocolError:
        pass


def _drain(decoder: codec.FrameDecoder) -> None:
    while True:
        message = decoder.next_message()
        if message is codec.NEED_DATA or message is None:
            return
        again = codec.encode(message.type, message.request_id, message.fields, message.flags)
        check = codec.FrameDecoder(max(len(again), 1))
        check.receive_data(again)
        frame = check.next_frame()
        assert (frame.type, frame.request_id, frame.flags) == (
            message.type, message.request_id, message.flags)
        # Re-encoding is stable (byte-for-byte), even for NaN floats in free-form bodies.
        assert codec.encode(frame.type, frame.request_id,
                            codec.decode_fields(frame).fields, frame.flags) == again


def write_seeds(directory: str) -> None:
    """Fill an empty corpus directory with the samples, alone and concatenated."""
    os.makedirs(directory, exist_ok=True)
    if os.listdir(directory):
        return
    frames = samples()
    for i, frame in enumerate(frames):
        for control in (0, 1, 5):
            with open(os.path.join(directory, f"seed-{i:02d}-{control}"), "wb") as f:
                f.write(bytes([control]) + frame)
    with open(os.path.join(directory, "seed-all"), "wb") as f:
        f.write(b"\x02" + b"".join(frames))


def main(argv: list[str]) -> None:
    import atheris

    corpus = [a for a in argv[1:] if not a.startswith("-")]
    if corpus:
        write_seeds(corpus[0])
    atheris.instrument_all()
    atheris.Setup(argv, check_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
