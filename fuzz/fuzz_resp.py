"""Coverage-guided fuzzing of the RESP parser with atheris: ``make fuzz`` (FUZZ_SECONDS).

``check_input(data)`` imports nothing but kvd.proto.resp, so tests/test_resp_parser.py runs
it on hypothesis input inside ``make test``. Property: whatever the bytes and however they
are split, the parser yields commands, stream events, NEED_DATA or a clean end, or raises
ProtocolError; nothing else, and it never holds more than its buffer limit plus one read.
The first byte picks the limits (pre-auth, authenticated, streaming) and the read size.
"""

from __future__ import annotations

import os
import sys

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kvd.errors import ProtocolError  # noqa: E402
from kvd.proto import resp  # noqa: E402

_LIMITS = (resp.PRE_AUTH, resp.AUTHENTICATED,
           resp.Limits(max_args=64, max_bulk=1 << 20, max_inline=512, max_buffer=2048,
                       stream_above=16),
           resp.Limits(max_args=3, max_bulk=8, max_inline=16, max_buffer=16))


def samples() -> list[bytes]:
    """Valid requests: the seed corpus and the material of the mutation tests."""
    return [
        b"*1\r\n$4\r\nPING\r\n",
        b"*3\r\n$3\r\nSET\r\n$3\r\nkey\r\n$5\r\nvalue\r\n",
        b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$40\r\n" + b"v" * 40 + b"\r\n",
        b"*2\r\n$3\r\nGET\r\n$3\r\nkey\r\n*2\r\n$3\r\nDEL\r\n$3\r\nkey\r\n",
        b"*4\r\n$4\r\nSCAN\r\n$1\r\n0\r\n$5\r\nMATCH\r\n$6\r\nuser:*\r\n",
        b"PING\r\nSET \"a b\" 'c\\'d' \"\\x41\"\r\n",
        b"*5\r\n$5\r\nHELLO\r\n$1\r\n3\r\n$4\r\nAUTH\r\n$7\r\ndefault\r\n$5\r\ntoken\r\n",
    ]


def check_input(data: bytes) -> None:
    """The parser property on one input (see the module docstring)."""
    if not data:
        return
    control, rest = data[0], data[1:]
    limits = _LIMITS[control & 3]
    split = 1 + (control >> 2) * 17 % 4096
    parser = resp.RespParser(limits)
    try:
        for start in range(0, len(rest), split):
            parser.receive_data(rest[start:start + split])
            _drain(parser)
            assert parser.buffered <= limits.max_buffer + limits.max_inline + split + 64
        parser.receive_data(b"")
        _drain(parser)
    except ProtocolError:
        pass


def _drain(parser: resp.RespParser) -> None:
    while True:
        event = parser.next_event()
        if event is resp.NEED_DATA or event is None:
            return
        if isinstance(event, list):
            assert event and all(isinstance(arg, bytes) for arg in event)


def main(argv: list[str]) -> None:
    import atheris

    corpus = [a for a in argv[1:] if not a.startswith("-")]
    if corpus:
        os.makedirs(corpus[0], exist_ok=True)
        for i, sample in enumerate(samples()):
            with open(os.path.join(corpus[0], f"seed-{i}"), "wb") as f:
                f.write(b"\x01" + sample)
    atheris.instrument_all()
    atheris.Setup(argv, check_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
