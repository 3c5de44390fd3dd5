"""Tests of the sans-IO wire codec (kvd.proto.codec, kvd.proto.messages).

The case table pins the exact bytes of every message type: these bytes are the protocol
third-party clients are written against, so a change here is a protocol change.
"""

from __future__ import annotations

import pathlib
import re
import struct
import subprocess
import sys
import tracemalloc

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvd.errors import BadRequest, FrameTooLarge, LocalProtocolError, RemoteProtocolError
from kvd.proto.codec import (
    NEED_DATA,
    Frame,
    FrameDecoder,
    Message,
    decode_fields,
    encode,
    encode_chunk,
)
from kvd.proto.messages import (
    DEFAULT_MAX_FRAME,
    FLAG_END,
    HEADER_SIZE,
    PRE_AUTH_MAX_FRAME,
    RAW_BODY,
    SCHEMA,
    MsgType,
    validate_key,
)

T = MsgType


def frame_bytes(header: str, body: str) -> bytes:
    """Bytes from hex: header as 'magic version type flags request_id length', then body."""
    return bytes.fromhex(header + body)


# (message, its exact bytes). Header hex: magic, version, type, flags, request id, length.
CASES = [
    (
        Message(T.HELLO, 1, {"versions": [1], "role": "client", "token": "s3cret"}),
        frame_bytes(
            "4b56 01 01 00 00000001 00000025",
            "83a876657273696f6e739101a4726f6c65a6636c69656e74a5746f6b656ea6733363726574",
        ),
    ),
    (
        Message(
            T.HELLO,
            1,
            {
                "versions": [1],
                "role": "peer",
                "node": "n1",
                "nonce": b"\x00\x01\x02\x03",
                "cluster": "c",
            },
        ),
        frame_bytes(
            "4b56 01 01 00 00000001 00000034",
            "85a876657273696f6e739101a4726f6c65a470656572a46e6f6465a26e31a56e6f6e6365c404"
            "00010203a7636c7573746572a163",
        ),
    ),
    (
        Message(T.HELLO_OK, 1, {"version": 1, "node": "n1", "max_frame": 4194304}),
        frame_bytes(
            "4b56 01 02 00 00000001 00000021",
            "83a776657273696f6e01a46e6f6465a26e31a96d61785f6672616d65ce00400000",
        ),
    ),
    (
        Message(T.ERROR, 2, {"code": "quorum", "message": "1 of 2", "replies": 1}),
        frame_bytes(
            "4b56 01 03 00 00000002 00000025",
            "83a4636f6465a671756f72756da76d657373616765a631206f662032a77265706c69657301",
        ),
    ),
    (
        Message(T.GET, 2, {"key": b"k", "r": 2}),
        frame_bytes("4b56 01 04 00 00000002 0000000b", "82a36b6579c4016ba17202"),
    ),
    (
        Message(
            T.GET_REPLY,
            2,
            {
                "key": b"k",
                "found": True,
                "context": b"\x01\x02",
                "siblings": [
                    {"value": b"v", "length": 1, "deleted": False},
                    {"value": None, "length": 5, "deleted": False},
                ],
                "replicas": 3,
            },
        ),
        frame_bytes(
            "4b56 01 05 00 00000002 00000063",
            "85a36b6579c4016ba5666f756e64c3a7636f6e74657874c4020102a87369626c696e67739283"
            "a576616c7565c40176a66c656e67746801a764656c65746564c283a576616c7565c0a66c656e"
            "67746805a764656c65746564c2a87265706c6963617303",
        ),
    ),
    (
        Message(T.PUT, 3, {"key": b"k", "length": 1, "value": b"v", "w": 2}),
        frame_bytes(
            "4b56 01 06 00 00000003 0000001c",
            "84a36b6579c4016ba66c656e67746801a576616c7565c40176a17702",
        ),
    ),
    (
        Message(T.PUT, 4, {"key": b"k", "context": b"\x01", "length": 70000}),
        frame_bytes(
            "4b56 01 06 00 00000004 0000001f",
            "83a36b6579c4016ba7636f6e74657874c40101a66c656e677468ce00011170",
        ),
    ),
    (
        Message(T.PUT_REPLY, 3, {"context": b"c", "siblings": 1, "replicas": 2}),
        frame_bytes(
            "4b56 01 07 00 00000003 00000020",
            "83a7636f6e74657874c40163a87369626c696e677301a87265706c6963617302",
        ),
    ),
    (
        Message(T.DELETE, 5, {"key": b"k", "context": b"c"}),
        frame_bytes("4b56 01 08 00 00000005 00000013", "82a36b6579c4016ba7636f6e74657874c40163"),
    ),
    (
        Message(T.CHUNK, 4, {"data": b"hello"}),
        frame_bytes("4b56 01 09 00 00000004 00000005", "68656c6c6f"),
    ),
    (
        Message(T.CHUNK, 4, {"data": b"!"}, FLAG_END),
        frame_bytes("4b56 01 09 01 00000004 00000001", "21"),
    ),
    (
        Message(T.CHUNK, 4, {"data": b""}, FLAG_END),
        frame_bytes("4b56 01 09 01 00000004 00000000", ""),
    ),
    (Message(T.STATUS, 6, {}), frame_bytes("4b56 01 0a 00 00000006 00000001", "80")),
    (
        Message(T.STATUS_REPLY, 6, {"node": "n1", "nodes": [{"node": "n1", "state": "UN"}]}),
        frame_bytes(
            "4b56 01 0b 00 00000006 00000022",
            "82a46e6f6465a26e31a56e6f6465739182a46e6f6465a26e31a57374617465a2554e",
        ),
    ),
    (
        Message(T.INSPECT, 7, {"key": b"k"}),
        frame_bytes("4b56 01 0c 00 00000007 00000008", "81a36b6579c4016b"),
    ),
    (
        Message(T.INSPECT_REPLY, 7, {"key": b"k", "partition": 300, "replicas": [{"node": "n1"}]}),
        frame_bytes(
            "4b56 01 0d 00 00000007 00000028",
            "83a36b6579c4016ba9706172746974696f6ecd012ca87265706c696361739181a46e6f6465a26e31",
        ),
    ),
    (Message(T.PING, 0xFFFFFFFF, {}), frame_bytes("4b56 01 0e 00 ffffffff 00000001", "80")),
    (Message(T.PONG, 0xFFFFFFFF, {}), frame_bytes("4b56 01 0f 00 ffffffff 00000001", "80")),
    (
        Message(T.REPLICA_GET, 8, {"op": "get", "key": b"k"}),
        frame_bytes("4b56 01 10 00 00000008 0000000f", "82a26f70a3676574a36b6579c4016b"),
    ),
    (Message(T.REPLICA_GET_REPLY, 8, {}), frame_bytes("4b56 01 11 00 00000008 00000001", "80")),
    (
        # An op the codec does not know passes it (its handler answers bad_request).
        Message(T.REPLICA_PUT, 9, {"op": "unknown-op", "p": 1}),
        frame_bytes("4b56 01 12 00 00000009 00000012", "82a26f70aa756e6b6e6f776e2d6f70a17001"),
    ),
    (Message(T.REPLICA_PUT_REPLY, 9, {}), frame_bytes("4b56 01 13 00 00000009 00000001", "80")),
    (
        Message(T.GOSSIP, 10, {"hb": 12}),
        frame_bytes("4b56 01 14 00 0000000a 00000005", "81a268620c"),
    ),
    (Message(T.GOSSIP_REPLY, 10, {}), frame_bytes("4b56 01 15 00 0000000a 00000001", "80")),
    (
        Message(T.ADMIN, 11, {"op": "plan"}),
        frame_bytes("4b56 01 16 00 0000000b 00000009", "81a26f70a4706c616e"),
    ),
    (
        Message(T.ADMIN_REPLY, 11, {"ok": True}),
        frame_bytes("4b56 01 17 00 0000000b 00000005", "81a26f6bc3"),
    ),
]
CASE_IDS = [f"{i}-{m.type.name}" for i, (m, _) in enumerate(CASES)]

PING = encode(T.PING, 99)


def drain(decoder: FrameDecoder) -> list[Message]:
    """Every complete message the decoder holds."""
    out = []
    while True:
        msg = decoder.next_message()
        if msg is NEED_DATA or msg is None:
            return out
        out.append(msg)


def header(type_byte: int, length: int, *, magic=b"KV", version=1, flags=0, rid=1) -> bytes:
    return struct.pack(">2sBBBII", magic, version, type_byte, flags, rid, length)


# --- the case table --------------------------------------------------------------------------


def test_cases_cover_every_message_type():
    assert {m.type for m, _ in CASES} == set(MsgType)
    chunks = [m for m, _ in CASES if m.type is T.CHUNK]
    assert {m.flags for m in chunks} == {0, FLAG_END}


@pytest.mark.parametrize("msg, data", CASES, ids=CASE_IDS)
def test_encode_gives_exact_bytes(msg, data):
    assert encode(msg.type, msg.request_id, msg.fields, msg.flags) == data
    if msg.type is T.CHUNK:
        assert encode_chunk(msg.request_id, msg.fields["data"], end=bool(msg.flags)) == data


@pytest.mark.parametrize("msg, data", CASES, ids=CASE_IDS)
def test_decode_whole(msg, data):
    d = FrameDecoder()
    d.receive_data(data)
    assert d.next_message() == msg
    assert d.next_message() is NEED_DATA
    assert d.buffered == 0
    d.receive_data(b"")
    assert d.next_message() is None


@pytest.mark.parametrize("msg, data", CASES, ids=CASE_IDS)
def test_decode_one_byte_at_a_time(msg, data):
    d = FrameDecoder()
    for i in range(len(data) - 1):
        d.receive_data(data[i : i + 1])
        assert d.next_message() is NEED_DATA
        assert d.buffered == i + 1
    d.receive_data(data[-1:])
    assert d.next_message() == msg
    assert d.buffered == 0


@pytest.mark.parametrize("msg, data", CASES, ids=CASE_IDS)
def test_decode_with_trailing_bytes(msg, data):
    d = FrameDecoder()
    d.receive_data(data + PING[:5])
    assert d.next_message() == msg
    assert d.next_message() is NEED_DATA
    assert d.buffered == 5  # the trailing bytes wait for the rest of their frame
    d.receive_data(PING[5:])
    assert d.next_message() == Message(T.PING, 99, {})
    assert d.buffered == 0


def test_decode_many_frames_in_one_buffer():
    data = b"".join(d for _, d in CASES)
    d = FrameDecoder()
    d.receive_data(data)
    assert drain(d) == [m for m, _ in CASES]


def test_next_frame_keeps_the_raw_body():
    msg, data = CASES[4]  # GET
    d = FrameDecoder()
    d.receive_data(data)
    frame = d.next_frame()
    assert frame == Frame(T.GET, 2, data[HEADER_SIZE:], 0)
    assert decode_fields(frame) == msg


def test_need_data_has_a_repr():
    assert repr(NEED_DATA) == "NEED_DATA"


# --- round trips -----------------------------------------------------------------------------


@pytest.mark.parametrize("msg, data", CASES, ids=CASE_IDS)
def test_round_trip_every_type(msg, data):
    d = FrameDecoder()
    d.receive_data(encode(msg.type, msg.request_id, msg.fields, msg.flags))
    assert d.next_message() == msg


request_ids = st.integers(0, 0xFFFFFFFF)
keys = st.binary(min_size=1, max_size=1024)
quorum = st.integers(-(2**63), 2**64 - 1)


@given(
    rid=request_ids,
    fields=st.fixed_dictionaries({"key": keys}, optional={"r": quorum, "n": quorum}),
)
def test_round_trip_get(rid, fields):
    d = FrameDecoder()
    d.receive_data(encode(T.GET, rid, fields))
    assert d.next_message() == Message(T.GET, rid, fields)


@given(
    rid=request_ids,
    fields=st.fixed_dictionaries(
        {"key": keys, "length": st.integers(0, 2**40)},
        optional={
            "context": st.binary(max_size=200),
            "value": st.binary(max_size=2000),
            "n": quorum,
            "w": quorum,
        },
    ),
)
def test_round_trip_put(rid, fields):
    d = FrameDecoder()
    d.receive_data(encode(T.PUT, rid, fields))
    assert d.next_message() == Message(T.PUT, rid, fields)


@given(rid=request_ids, data=st.binary(max_size=3000), end=st.booleans())
def test_round_trip_chunk(rid, data, end):
    d = FrameDecoder()
    d.receive_data(encode_chunk(rid, data, end=end))
    assert d.next_message() == Message(T.CHUNK, rid, {"data": data}, FLAG_END if end else 0)


def test_encode_accepts_bytes_like_and_tuples():
    fields = {"key": bytearray(b"k"), "length": 1, "value": memoryview(b"v")}
    assert encode(T.PUT, 1, fields) == encode(T.PUT, 1, {"key": b"k", "length": 1, "value": b"v"})
    assert encode(T.HELLO, 1, {"versions": (1,), "role": "client"}) == encode(
        T.HELLO, 1, {"versions": [1], "role": "client"}
    )
    assert encode_chunk(1, memoryview(b"abc")) == encode_chunk(1, b"abc")


def test_unknown_fields_are_ignored_and_kept():
    body = msgpack.packb({"key": b"k", "future": [1, 2]}, use_bin_type=True)
    d = FrameDecoder()
    d.receive_data(header(T.GET, len(body), rid=3) + body)
    msg = d.next_message()
    assert msg.fields == {"key": b"k", "future": [1, 2]}


# --- limits ----------------------------------------------------------------------------------


@pytest.mark.parametrize("max_frame", [PRE_AUTH_MAX_FRAME, DEFAULT_MAX_FRAME])
def test_4gib_header_is_refused_before_any_body_allocation(max_frame):
    d = FrameDecoder(max_frame=max_frame)
    head = header(T.PUT, 0xFFFFFFFF)
    tracemalloc.start()
    try:
        for i in range(HEADER_SIZE - 1):
            d.receive_data(head[i : i + 1])
            assert d.next_frame() is NEED_DATA
        d.receive_data(head[-1:])
        assert d.buffered == HEADER_SIZE
        with pytest.raises(FrameTooLarge, match="4294967295-byte body"):
            d.next_frame()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert d.buffered == HEADER_SIZE
    assert peak < 64 * 1024


def test_pre_auth_limit_refuses_17_kib():
    d = FrameDecoder()
    frame = encode(T.PUT, 1, {"key": b"k", "length": 17 * 1024, "value": b"x" * 17 * 1024})
    d.receive_data(frame[:HEADER_SIZE])
    with pytest.raises(FrameTooLarge, match="16384-byte limit"):
        d.next_message()


def test_frame_of_exactly_max_frame_is_accepted():
    d = FrameDecoder(max_frame=10)
    d.receive_data(encode_chunk(1, b"x" * 10) + encode_chunk(1, b"x" * 11))
    assert d.next_message().fields == {"data": b"x" * 10}
    with pytest.raises(FrameTooLarge):
        d.next_message()


def test_max_frame_raised_after_authentication_accepts_1_mib():
    d = FrameDecoder()
    d.receive_data(encode(T.HELLO, 1, {"versions": [1], "role": "client", "token": "t"}))
    assert d.next_message().type is T.HELLO
    d.max_frame = DEFAULT_MAX_FRAME  # the server does this once the token checks out
    value = bytes(range(256)) * 4096
    assert len(value) == 1024 * 1024
    d.receive_data(encode(T.PUT, 2, {"key": b"k", "length": len(value), "value": value}))
    assert d.next_message().fields["value"] == value
    d.receive_data(encode_chunk(2, value, end=True))
    assert d.next_message() == Message(T.CHUNK, 2, {"data": value}, FLAG_END)


def test_max_frame_must_be_a_u32():
    d = FrameDecoder()
    for bad in (-1, 2**32, 1.5, True):
        with pytest.raises(ValueError):
            d.max_frame = bad


def test_buffer_stays_bounded_when_drained_after_each_receive():
    max_frame = 64 * 1024
    frames = [encode_chunk(1, b"v" * n) for n in (0, 1, 1000, max_frame, 5, max_frame - 1)] * 3
    data = b"".join(frames)
    d = FrameDecoder(max_frame=max_frame)
    got = []
    step = 4096
    for i in range(0, len(data), step):
        d.receive_data(data[i : i + step])
        assert d.buffered <= HEADER_SIZE + max_frame + step
        got.extend(drain(d))
        assert d.buffered <= HEADER_SIZE + max_frame
    assert [m.fields["data"] for m in got] == [f[HEADER_SIZE:] for f in frames]


def test_many_small_frames_one_byte_at_a_time():
    data = b"".join(encode_chunk(i, b"ab") for i in range(2000))
    d = FrameDecoder()
    got = []
    for i in range(len(data)):
        d.receive_data(data[i : i + 1])
        got.extend(drain(d))
    assert [m.request_id for m in got] == list(range(2000))
    assert d.buffered == 0


# --- protocol violations ---------------------------------------------------------------------


def expect_remote_error(data: bytes, match: str, *, max_frame=PRE_AUTH_MAX_FRAME):
    d = FrameDecoder(max_frame=max_frame)
    d.receive_data(data)
    with pytest.raises(RemoteProtocolError, match=match):
        drain(d)
    # The decoder stays failed: the stream cannot be resynchronised.
    with pytest.raises(RemoteProtocolError):
        d.next_message()


def test_garbage_magic():
    expect_remote_error(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "bad magic b'GE'")


def test_garbage_magic_detected_from_the_first_bytes():
    expect_remote_error(b"GE", "bad magic")
    expect_remote_error(b"X", "bad magic")


def test_wrong_version():
    expect_remote_error(header(T.PING, 1, version=2) + b"\x80", "unsupported protocol version 2")
    expect_remote_error(b"KV\x00", "unsupported protocol version 0")


def test_unknown_message_type():
    expect_remote_error(header(99, 1) + b"\x80", "unknown message type 99")
    expect_remote_error(header(0, 1) + b"\x80", "unknown message type 0")
    expect_remote_error(b"KV\x01\xff", "unknown message type 255")


@pytest.mark.parametrize(
    "type_byte, flags",
    [(T.CHUNK, 0x02), (T.CHUNK, 0x81), (T.GET, FLAG_END), (T.PING, 0x40)],
)
def test_unknown_or_misplaced_flag_bits(type_byte, flags):
    expect_remote_error(header(type_byte, 1, flags=flags) + b"\x80", "flag bits")


@pytest.mark.parametrize(
    "body", [b"\x91\x01", b"\x01", b"\xc0", b"\xa3abc", b"\xc4\x01k"], ids=repr
)
def test_body_not_a_map(body):
    expect_remote_error(header(T.GET, len(body)) + body, "GET body must be a msgpack map")


@pytest.mark.parametrize(
    "body",
    [
        b"",  # empty is not an empty map
        b"\x81",  # truncated map
        b"\x80\x80",  # trailing data
        b"\xc1",  # never-used byte
        b"\xdf\xff\xff\xff\xff",  # map declaring 2**32 entries in a 5-byte body
        b"\xc6\xff\xff\xff\xff",  # bin declaring 4 GiB
        b"\x81\xa1k\xd6\xff\x00\x00\x00\x00",  # timestamp ext
        b"\x81\x01\x02",  # integer map key
        b"\x81\xa2\xff\xfe\x01",  # invalid UTF-8 in a str
        b"\x91" * 2000 + b"\x80",  # nesting deeper than msgpack's stack
    ],
    ids=lambda b: b[:12].hex() or "empty",
)
def test_body_not_valid_msgpack(body):
    expect_remote_error(
        header(T.STATUS, len(body)) + body, "STATUS body", max_frame=DEFAULT_MAX_FRAME
    )


@pytest.mark.parametrize(
    "type, fields, match",
    [
        (T.GET, {}, "GET missing required field 'key'"),
        (T.GET, {"r": 2}, "GET missing required field 'key'"),
        (T.HELLO, {"versions": [1]}, "HELLO missing required field 'role'"),
        (T.PUT, {"key": b"k"}, "PUT missing required field 'length'"),
        (T.ERROR, {"code": "x"}, "ERROR missing required field 'message'"),
        (
            T.GET_REPLY,
            {"key": b"k", "found": True, "context": b"", "siblings": [{"value": b"v"}]},
            "GET_REPLY field 'siblings': item 0: missing required field 'length'",
        ),
    ],
)
def test_missing_field(type, fields, match):
    body = msgpack.packb(fields, use_bin_type=True)
    expect_remote_error(header(type, len(body)) + body, match)


@pytest.mark.parametrize(
    "type, fields, match",
    [
        (T.GET, {"key": "k"}, "GET field 'key': expected bytes, got str"),
        (T.GET, {"key": b"k", "r": True}, "GET field 'r': expected int, got bool"),
        (T.GET, {"key": b"k", "r": 2.0}, "GET field 'r': expected int, got float"),
        (T.GET, {"key": b"k", "n": None}, "GET field 'n': expected int, got nil"),
        (T.HELLO, {"versions": 1, "role": "client"}, "field 'versions': expected list, got int"),
        (
            T.HELLO,
            {"versions": [1, "2"], "role": "client"},
            "field 'versions': item 1: expected int, got str",
        ),
        (T.HELLO, {"versions": [1], "role": b"client"}, "field 'role': expected str, got bytes"),
        (
            T.GET_REPLY,
            {"key": b"k", "found": 1, "context": b"", "siblings": []},
            "field 'found': expected bool, got int",
        ),
        (
            T.GET_REPLY,
            {"key": b"k", "found": True, "context": b"", "siblings": [b"v"]},
            "field 'siblings': item 0: expected map, got bytes",
        ),
        (
            T.GET_REPLY,
            {
                "key": b"k",
                "found": True,
                "context": b"",
                "siblings": [{"value": "v", "length": 1, "deleted": False}],
            },
            "item 0: field 'value': expected bytes or nil, got str",
        ),
        (
            T.STATUS_REPLY,
            {"node": "n1", "nodes": [{"node": "n1"}, 3]},
            "field 'nodes': item 1: expected map, got int",
        ),
    ],
)
def test_wrong_field_type(type, fields, match):
    body = msgpack.packb(fields, use_bin_type=True)
    expect_remote_error(header(type, len(body)) + body, match)


def test_free_form_peer_bodies_must_still_be_maps():
    expect_remote_error(header(T.GOSSIP, 1) + b"\x90", "GOSSIP body must be a msgpack map")


def test_eof_mid_frame_raises():
    data = CASES[0][1]
    for cut in (1, 5, HEADER_SIZE, HEADER_SIZE + 1, len(data) - 1):
        d = FrameDecoder()
        d.receive_data(data[:cut])
        assert d.next_message() is NEED_DATA
        d.receive_data(b"")
        with pytest.raises(RemoteProtocolError, match=f"closed mid-frame \\({cut} of"):
            d.next_message()


def test_eof_at_frame_boundary_is_a_clean_close():
    d = FrameDecoder()
    d.receive_data(PING + PING)
    d.receive_data(b"")
    assert drain(d) == [Message(T.PING, 99, {})] * 2
    assert d.next_message() is None
    assert d.next_frame() is None
    d.receive_data(b"")  # a second EOF is harmless
    with pytest.raises(RuntimeError):
        d.receive_data(b"more")


def test_eof_on_a_fresh_decoder():
    d = FrameDecoder()
    d.receive_data(b"")
    assert d.next_frame() is None


# --- what we refuse to send ------------------------------------------------------------------


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: encode(T.GET, 1, {}), "GET missing required field 'key'"),
        (lambda: encode(T.GET, 1, {"key": "k"}), "expected bytes, got str"),
        (lambda: encode(T.GET, 1, {"key": b"k", "r": None}), "expected int, got nil"),
        (lambda: encode(T.GET, 1, {"key": b"k", "r": False}), "expected int, got bool"),
        (lambda: encode(T.GET, -1, {"key": b"k"}), "request id"),
        (lambda: encode(T.GET, 2**32, {"key": b"k"}), "request id"),
        (lambda: encode(T.GET, 1, {"key": b"k"}, flags=FLAG_END), "flags 0x01"),
        (lambda: encode(T.GET, 1, [("key", b"k")]), "must be a dict"),
        (lambda: encode(99, 1, {}), "unknown message type 99"),
        (lambda: encode(T.CHUNK, 1, {}), "CHUNK needs"),
        (lambda: encode(T.CHUNK, 1, {"data": b""}, flags=0x02), "flags 0x02"),
        (lambda: encode_chunk(1, "text"), "expected bytes|must be bytes"),
        (lambda: encode(T.GOSSIP, 1, {"x": object()}), "cannot be encoded"),
    ],
)
def test_encode_refuses_invalid_frames(call, match):
    with pytest.raises(LocalProtocolError, match=match):
        call()


def test_encode_accepts_int_message_type():
    assert encode(14, 99) == PING


# --- fuzzing: the decoder raises RemoteProtocolError or yields frames, nothing else ----------


def feed_and_drain(chunks: list[bytes], max_frame: int = PRE_AUTH_MAX_FRAME) -> None:
    d = FrameDecoder(max_frame=max_frame)
    try:
        for chunk in chunks:
            if not chunk:
                continue  # b"" would mean EOF
            d.receive_data(chunk)
            for msg in drain(d):
                assert isinstance(msg, Message)
        d.receive_data(b"")
        drain(d)
    except RemoteProtocolError:
        pass


@settings(max_examples=300)
@given(st.lists(st.binary(max_size=64), max_size=8))
def test_fuzz_random_bytes(chunks):
    feed_and_drain(chunks)


@settings(max_examples=300)
@given(
    type_byte=st.integers(0, 30),
    flags=st.sampled_from([0, 0, 0, 1, 2]),
    body=st.binary(max_size=64),
    slack=st.integers(-2, 2),
    split=st.integers(0, 80),
    tail=st.binary(max_size=16),
)
def test_fuzz_well_formed_headers_random_bodies(type_byte, flags, body, slack, split, tail):
    data = header(type_byte, max(0, len(body) + slack), flags=flags) + body + tail
    feed_and_drain([data[:split], data[split:]])


msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=8)
    | st.binary(max_size=8),
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.text(max_size=6) | st.binary(max_size=3), inner, max_size=4),
    max_leaves=12,
)
field_names = st.sampled_from(
    sorted({name for schema in SCHEMA.values() for name in schema} | {"value", "extra"})
)


@settings(max_examples=400)
@given(
    type=st.sampled_from(sorted(MsgType)),
    fields=st.dictionaries(field_names, msgpack_values, max_size=6) | msgpack_values,
)
def test_fuzz_schema_validation(type, fields):
    body = msgpack.packb(fields, use_bin_type=True)
    try:
        msg = decode_fields(Frame(type, 1, body))
    except RemoteProtocolError:
        return
    # Whatever passes validation can be sent back unchanged.
    if type not in RAW_BODY:
        assert encode(type, 1, msg.fields)[HEADER_SIZE:] == body


# --- keys, schema, purity --------------------------------------------------------------------


@pytest.mark.parametrize("key", [b"k", b"x" * 1024])
def test_validate_key_accepts(key):
    assert validate_key(key) is key


@pytest.mark.parametrize(
    "key, match",
    [(b"", "1..1024 bytes, got 0"), (b"x" * 1025, "got 1025"), ("k", "must be bytes")],
)
def test_validate_key_refuses(key, match):
    with pytest.raises(BadRequest, match=match):
        validate_key(key)


def test_message_type_numbers_never_change():
    # Append-only: this table may grow, no line of it may change.
    assert {t.name: t.value for t in MsgType} == {
        "HELLO": 1,
        "HELLO_OK": 2,
        "ERROR": 3,
        "GET": 4,
        "GET_REPLY": 5,
        "PUT": 6,
        "PUT_REPLY": 7,
        "DELETE": 8,
        "CHUNK": 9,
        "STATUS": 10,
        "STATUS_REPLY": 11,
        "INSPECT": 12,
        "INSPECT_REPLY": 13,
        "PING": 14,
        "PONG": 15,
        "REPLICA_GET": 16,
        "REPLICA_GET_REPLY": 17,
        "REPLICA_PUT": 18,
        "REPLICA_PUT_REPLY": 19,
        "GOSSIP": 20,
        "GOSSIP_REPLY": 21,
        "ADMIN": 22,
        "ADMIN_REPLY": 23,
    }


def test_every_type_has_a_body_rule():
    assert set(SCHEMA) | RAW_BODY == set(MsgType)
    assert not set(SCHEMA) & RAW_BODY


def test_codec_imports_neither_trio_nor_plyvel():
    code = (
        "import sys, kvd.proto.codec, kvd.proto.messages; "
        "print(sorted({'trio', 'plyvel'} & set(sys.modules)))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"


def test_protocol_doc_hex_dumps_are_true():
    doc = pathlib.Path(__file__).parent.parent / "docs" / "protocol.md"
    dumps = []
    for block in re.findall(r"```\n(.*?)```", doc.read_text(), re.S):
        rows = re.findall(r"^[0-9a-f]{8}: ((?:[0-9a-f]{2,4} ?)+)", block, re.M)
        if rows:
            dumps.append(bytes.fromhex("".join(rows)))
    assert dumps == [
        encode(T.HELLO, 1, {"versions": [1], "role": "client", "token": "s3cret"}),
        encode(T.HELLO_OK, 1, {"version": 1, "node": "n1", "max_frame": 4194304}),
        encode(T.GET, 2, {"key": b"user:42"}),
    ]


# Bodies of types with operations are checked per operation (messages Rule 5, issue 10 hole 4).
OP_CASES = [
    (T.ADMIN, {"op": ["ring"]}, "field 'op': expected str, got list"),
    (T.ADMIN, {}, "missing required field 'op'"),
    (T.ADMIN, {"op": "repair", "partition": "3"}, "'repair' field 'partition'"),
    (T.ADMIN, {"op": "repair", "wait": 1}, "'repair' field 'wait': expected bool, got int"),
    (T.ADMIN, {"op": "join"}, "'join' missing required field 'seed'"),
    (T.REPLICA_GET, {"op": "blob", "key": b"k", "vid": "0123", "offset": 0, "size": 1},
     "'blob' field 'vid': expected bytes, got str"),
    (T.REPLICA_GET, {"op": "aae-keys", "partition": 1, "segment": True},
     "'aae-keys' field 'segment': expected int, got bool"),
    (T.REPLICA_PUT, {"op": "merge", "key": b"k", "staged": [b"v"]},
     "'merge' field 'staged': expected a list of 2 items, got 1"),
    (T.REPLICA_PUT, {"op": "coordinate", "key": b"k", "context": b"",
                     "payload": {"deleted": False, "timestamp": "now"}},
     "'coordinate' field 'payload': field 'timestamp': expected float or int, got str"),
    (T.REPLICA_PUT, {"op": "aae-purge", "partition": 0, "tombstones": [[b"k", 5]]},
     "'aae-purge' field 'tombstones': item 0: item 1: expected bytes, got int"),
]


@pytest.mark.parametrize("kind, body, problem", OP_CASES)
def test_operation_bodies_are_checked(kind, body, problem):
    raw = msgpack.packb(body, use_bin_type=True)
    with pytest.raises(RemoteProtocolError) as failure:
        decode_fields(Frame(kind, 1, raw))
    assert problem in str(failure.value)
    with pytest.raises(LocalProtocolError):
        encode(kind, 1, body)


@pytest.mark.parametrize("kind, body", [
    (T.ADMIN, {"op": "some-future-op", "x": [1]}),  # the handler answers bad_request
    (T.ADMIN, {"op": "repair", "partition": None, "wait": True}),
    (T.REPLICA_PUT, {"op": "coordinate", "key": b"k", "context": b"",
                     "payload": {"deleted": False, "timestamp": 1.5, "wid": b"w",
                                 "chunks": [b"v" * 16, 3 << 20, 3]}}),
    (T.REPLICA_PUT, {"op": "hint", "key": b"k", "for": "n2", "object": b"\x93"}),
])
def test_operation_bodies_that_pass(kind, body):
    data = encode(kind, 7, body)
    decoder = FrameDecoder(DEFAULT_MAX_FRAME)
    decoder.receive_data(data)
    assert decoder.next_message().fields == body
