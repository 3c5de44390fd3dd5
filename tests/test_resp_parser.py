"""kvd.proto.resp: the RESP parser and serializer, tested as the native codec is: every
case whole, one byte at a time and with trailing bytes; limits refused before allocation;
hypothesis on random and mutated input (the atheris property of fuzz/fuzz_resp.py)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fuzz.fuzz_resp import check_input, samples
from kvd.errors import ProtocolError
from kvd.proto import codec, resp
from kvd.proto.messages import PROTOCOL_VERSION, MsgType
from kvd.proto.resp import (AUTHENTICATED, NEED_DATA, PRE_AUTH, Error, Limits, RespParser,
                            Simple, StreamData, StreamEnd, StreamStart, encode)
from kvd.proto.glob import glob_match

CASES = [
    (b"*1\r\n$4\r\nPING\r\n", [b"PING"]),
    (b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$0\r\n\r\n", [b"SET", b"k", b""]),
    (b"*2\r\n$3\r\nGET\r\n$4\r\na\r\nb\r\n", [b"GET", b"a\r\nb"]),  # binary-safe
    (b"PING\r\n", [b"PING"]),
    (b"ping\n", [b"ping"]),  # inline, LF only (telnet)
    (b"  SET  k   v \r\n", [b"SET", b"k", b"v"]),
    (b'SET "a b" \'c\\\'d\' "\\x41\\n"\r\n', [b"SET", b"a b", b"c'd", b"A\n"]),
    (b'ECHO ""\r\n', [b"ECHO", b""]),
    (b"KV.GET k\r\n", [b"KV.GET", b"k"]),  # begins as a kvd frame does, then a dot
]


def drain(parser: RespParser) -> list:
    out = []
    while True:
        event = parser.next_event()
        if event is NEED_DATA or event is None:
            return out
        out.append(event)


@pytest.mark.parametrize("data, command", CASES)
def test_whole(data, command):
    parser = RespParser(PRE_AUTH)
    parser.receive_data(data)
    assert drain(parser) == [command]
    assert parser.buffered == 0


@pytest.mark.parametrize("data, command", CASES)
def test_one_byte_at_a_time(data, command):
    parser = RespParser(PRE_AUTH)
    events = []
    for i in range(len(data)):
        parser.receive_data(data[i:i + 1])
        events += drain(parser)
    assert events == [command]


@pytest.mark.parametrize("data, command", CASES)
def test_with_trailing_bytes(data, command):
    parser = RespParser(PRE_AUTH)
    parser.receive_data(data + b"*1\r\n$4\r\nPI")
    assert drain(parser) == [command]
    parser.receive_data(b"NG\r\n")
    assert drain(parser) == [[b"PING"]]


def test_pipelined_commands_come_out_in_order_and_empty_lines_are_skipped():
    parser = RespParser(AUTHENTICATED)
    parser.receive_data(b"".join(data for data, _ in CASES) + b"\r\n*0\r\n")
    assert drain(parser) == [command for _, command in CASES]
    parser.receive_data(b"")
    assert parser.next_event() is None


@pytest.mark.parametrize("data, message", [
    (b"*2147483647\r\n", "invalid multibulk length"),
    (b"*11\r\n", "invalid multibulk length"),  # pre-auth: 10 arguments at most
    (b"*1\r\n$4294967296\r\n", "invalid bulk length"),
    (b"*1\r\n$16385\r\n", "invalid bulk length"),  # pre-auth: 16 KiB per bulk
    (b"*1\r\n$-5\r\n", "invalid bulk length"),
    (b"*1\r\n$x\r\n", "invalid bulk length"),
    (b"*1\r\n+PING\r\n", r"expected '\$', got '\+'"),
    (b"*" + b"1" * 40, "too big multibulk count string"),
    (b"*1\r\n$3\r\nGETxx", "bulk string not terminated by CRLF"),
    (b"SET \"unbalanced\r\n", "unbalanced quotes"),
    (b"A" * (16 * 1024 + 1), "too big inline request"),
])
def test_limits_and_malformed_requests_are_refused(data, message):
    """Checked when the header arrives: nothing the header announces is awaited or kept."""
    parser = RespParser(PRE_AUTH)
    parser.receive_data(data)
    with pytest.raises(ProtocolError, match=message):
        drain(parser)
    assert parser.buffered < 32 * 1024


@pytest.mark.parametrize("data, message", [
    (b"*1\r\n$-0\r\n\r\n", "invalid bulk length"),
    (b"*1\r\n$01\r\nx\r\n", "invalid bulk length"),
    (b"*1\r\n$00\r\n\r\n", "invalid bulk length"),
    (b"*1\r\n$+1\r\nx\r\n", "invalid bulk length"),
    (b"*1\r\n$-1\r\n", "invalid bulk length"),  # a null is a reply, never a request
    (b"*-0\r\n", "invalid multibulk length"),
    (b"*01\r\n$4\r\nPING\r\n", "invalid multibulk length"),
    (b"*+1\r\n$4\r\nPING\r\n", "invalid multibulk length"),
    (b"*-01\r\n", "invalid multibulk length"),
])
@pytest.mark.parametrize("split", [1, 1000], ids=["byte-at-a-time", "whole"])
def test_lengths_are_refused_unless_written_as_redis_writes_them(data, message, split):
    """redis-server (string2ll) takes a length only as plain decimal without a leading zero
    or a plus sign, and refuses a negative bulk length; kvd refuses what it refuses."""
    parser = RespParser(AUTHENTICATED)
    with pytest.raises(ProtocolError, match=message):
        for i in range(0, len(data), split):
            parser.receive_data(data[i:i + split])
            drain(parser)


def test_a_negative_multibulk_count_is_ignored_as_redis_ignores_it():
    """redis-server's protocol test "Negative multibulk length": ``*-10`` then PING gets PONG."""
    parser = RespParser(AUTHENTICATED)
    parser.receive_data(b"*-10\r\n*0\r\n*1\r\n$4\r\nPING\r\n")
    assert drain(parser) == [[b"PING"]]


def test_a_kvd_frame_is_refused_by_its_third_byte_naming_the_client_port():
    """kvctl given the RESP port: its HELLO frame (no newline in it) waited as an inline
    command. Rule 5: refused as soon as three bytes show it, whatever follows."""
    hello = codec.encode(MsgType.HELLO, 0, {"versions": [PROTOCOL_VERSION], "role": "client"})
    parser = RespParser(PRE_AUTH)
    parser.receive_data(hello[:2])
    assert drain(parser) == []
    parser.receive_data(hello[2:3])
    with pytest.raises(ProtocolError) as refused:
        drain(parser)
    assert str(refused.value) == ("this is kvd's RESP port; kvd clients (kvctl) use the "
                                  "client port (listen)")


def test_authenticated_limits_refuse_a_1_mib_inline_line_and_a_4_gib_bulk():
    parser = RespParser(AUTHENTICATED)
    parser.receive_data(b"A" * (1 << 20))
    with pytest.raises(ProtocolError, match="too big inline request"):
        drain(parser)
    parser = RespParser(AUTHENTICATED)
    parser.receive_data(b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$4294967296\r\n")
    with pytest.raises(ProtocolError, match="invalid bulk length"):
        drain(parser)


@pytest.mark.parametrize("split", [1, 7, 1000], ids=["byte-at-a-time", "7-bytes", "whole"])
def test_a_bulk_above_stream_above_streams_in_pieces(split):
    limits = Limits(max_args=8, max_bulk=1 << 30, max_inline=1024, max_buffer=4096,
                    stream_above=10)
    parser = RespParser(limits)
    events = []
    data = b"*4\r\n$3\r\nSET\r\n$1\r\nk\r\n$25\r\n" + b"x" * 25 + b"\r\n$2\r\nNX\r\n*1\r\n$4\r\nPING\r\n"
    for i in range(0, len(data), split):
        parser.receive_data(data[i:i + split])
        events += drain(parser)
    assert events[0] == StreamStart([b"SET", b"k"], 25)
    assert b"".join(e.data for e in events if isinstance(e, StreamData)) == b"x" * 25
    assert events[-2:] == [StreamEnd([b"NX"]), [b"PING"]]
    assert parser.buffered == 0


def test_a_second_large_argument_after_a_stream_is_refused():
    limits = Limits(max_args=8, max_bulk=1 << 30, max_inline=1024, max_buffer=4096,
                    stream_above=10)
    parser = RespParser(limits)
    parser.receive_data(b"*3\r\n$3\r\nSET\r\n$11\r\n" + b"x" * 11 + b"\r\n$11\r\n")
    with pytest.raises(ProtocolError):
        drain(parser)


@pytest.mark.parametrize("reply, resp2, resp3", [
    (Simple("OK"), b"+OK\r\n", b"+OK\r\n"),
    (Error("ERR bad\r\nthing"), b"-ERR bad  thing\r\n", b"-ERR bad  thing\r\n"),
    (b"v", b"$1\r\nv\r\n", b"$1\r\nv\r\n"),
    (None, b"$-1\r\n", b"_\r\n"),
    (7, b":7\r\n", b":7\r\n"),
    (True, b":1\r\n", b"#t\r\n"),
    (1.5, b"$3\r\n1.5\r\n", b",1.5\r\n"),
    ([b"a", None], b"*2\r\n$1\r\na\r\n$-1\r\n", b"*2\r\n$1\r\na\r\n_\r\n"),
    ({"k": 1}, b"*2\r\n$1\r\nk\r\n:1\r\n", b"%1\r\n$1\r\nk\r\n:1\r\n"),
    (resp.Verbatim("x"), b"$1\r\nx\r\n", b"=5\r\ntxt:x\r\n"),
])
def test_replies_in_resp2_and_resp3(reply, resp2, resp3):
    assert encode(reply, resp3=False) == resp2
    assert encode(reply, resp3=True) == resp3


@pytest.mark.parametrize("pattern, key, matches", [
    (b"*", b"anything", True), (b"user:*", b"user:1", True), (b"user:*", b"users", False),
    (b"h?llo", b"hallo", True), (b"h[ae]llo", b"hello", True), (b"h[^e]llo", b"hello", False),
    (b"h[a-c]llo", b"hbllo", True), (b"a\\*", b"a*", True), (b"a\\*", b"ab", False),
    # What redis-server 7.0 answers (SCAN MATCH) for the patterns a regex translation broke:
    # a reversed range is swapped, an unterminated class ends the pattern, "[]" is empty.
    (b"[z-a]", b"b", True), (b"[z-a]", b"A", False), (b"a[\\]]", b"a]", True),
    (b"a[]]", b"a]", False), (b"a[b", b"ab", True), (b"a[b", b"a[b", False),
    (b"a[a-]", b"a]", True), (b"a[a-]", b"a^", True), (b"a[a-]", b"a-", False),
    (b"a[^]", b"ab", True), (b"a[b-", b"ab", True), (b"a[", b"a", False),
    (b"a\\", b"a\\", True), (b"*a*b*c*", b"xxaxxbxxcxx", True), (b"*?", b"", False),
])
def test_glob(pattern, key, matches):
    assert glob_match(pattern, key) is matches


def test_glob_stars_cost_in_proportion_to_pattern_times_key():
    """Backtracking per star would take exponential time on this pattern (a client could
    stall the node with one SCAN MATCH)."""
    assert glob_match(b"*a" * 40 + b"b", b"a" * 5000) is False


@given(st.binary(max_size=600))
@settings(max_examples=300, deadline=None)
def test_random_input_gives_commands_or_a_protocol_error(data):
    check_input(data)


@given(st.sampled_from(samples()), st.lists(st.tuples(st.integers(0, 10_000),
                                                      st.integers(0, 255)), max_size=6),
       st.integers(0, 255))
@settings(max_examples=300, deadline=None)
def test_mutated_requests_give_commands_or_a_protocol_error(sample, flips, control):
    data = bytearray(sample)
    for position, value in flips:
        if data:
            data[position % len(data)] = value
    check_input(bytes([control]) + bytes(data))


@pytest.mark.parametrize("data", [b"*2\r\n$3\r\nGET\r\n", b"*1\r\n$4\r\nPI", b"PING", b"*1"])
def test_a_request_cut_short_by_the_end_of_the_stream_is_an_error(data):
    parser = RespParser(AUTHENTICATED)
    parser.receive_data(data)
    assert drain(parser) == []
    parser.receive_data(b"")
    with pytest.raises(ProtocolError, match="closed in mid-request"):
        parser.next_event()


class _StepOnly(RespParser):
    """The parser without its one-pass path for whole commands."""

    def _whole_command(self):
        return None


def _events(parser: RespParser, pieces: list[bytes]) -> list:
    out: list = []
    try:
        for piece in pieces + [b""]:
            parser.receive_data(piece)
            while (event := parser.next_event()) not in (NEED_DATA, None):
                out.append(event)
            if event is None:
                break
    except ProtocolError as exc:
        out.append(("error", str(exc)))
    return out


_commands = st.lists(st.lists(st.binary(max_size=40), min_size=1, max_size=12), max_size=6)


@settings(max_examples=400, deadline=None)
@given(_commands, st.binary(max_size=8), st.data(),
       st.sampled_from([PRE_AUTH, Limits(max_args=3, max_bulk=8, max_inline=64, max_buffer=20,
                                         stream_above=6),
                        Limits(max_args=4, max_bulk=8, max_inline=64, max_buffer=12),
                        AUTHENTICATED]))
def test_the_one_pass_path_gives_exactly_what_the_step_parser_gives(commands, junk, data,
                                                                    limits):
    """Whole commands, pipelined, cut anywhere, with junk after: same events, same errors."""
    wire = b"".join(b"*%d\r\n" % len(c) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in c)
                    for c in commands) + junk
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=4)))
    pieces = [wire[a:b] for a, b in zip([0] + cuts, cuts + [len(wire)])]
    assert _events(RespParser(limits), pieces) == _events(_StepOnly(limits), pieces)


@pytest.mark.parametrize("wire", [
    b"*2\r\n$8\r\n12345678\r\n$8\r\n12345678\r\n",  # 16 bytes held: over max_buffer
    b"*5\r\n$1\r\na\r\n$1\r\na\r\n$1\r\na\r\n$1\r\na\r\n$1\r\na\r\n",  # over max_args
    b"*1\r\n$9\r\n123456789\r\n",  # over max_bulk
    b"*1\r\n$-1\r\n", b"*0\r\n*1\r\n$1\r\nx\r\n", b"*1\r\n$1\r\nxy\r\n", b"*1\r\n:1\r\n",
])
def test_the_one_pass_path_refuses_what_the_step_parser_refuses(wire):
    limits = Limits(max_args=4, max_bulk=8, max_inline=64, max_buffer=12)
    assert _events(RespParser(limits), [wire]) == _events(_StepOnly(limits), [wire])
