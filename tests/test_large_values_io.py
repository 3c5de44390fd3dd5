"""The I/O pieces of streaming a large value out (issue 14, large values): pieces read ahead
of the socket and sent in order, CHUNK frames sent from a blob file with sendfile over real
TCP, and a blob file opened for sending that outlives its deletion."""

from __future__ import annotations

import os
import random
from functools import partial

import pytest
import trio
import trio.testing

from kvd import versions
from kvd.errors import Unavailable
from kvd.net import rawstream
from kvd.net.connection import FrameConnection
from kvd.node import large_values
from kvd.proto import codec
from kvd.proto.messages import FLAG_END, MsgType
from kvd.storage.blobs import BlobStore

MiB = 1 << 20


class SlowSource:
    """A replica whose pieces take random times to read; one piece can fail."""

    def __init__(self, data: bytes, fail_at: int | None = None):
        self.data = data
        self.fail_at = fail_at
        self.reading = 0
        self.most = 0
        self.rng = random.Random(1)

    async def read_piece(self, key, ref, offset, size):
        self.reading += 1
        self.most = max(self.most, self.reading)
        try:
            await trio.sleep(self.rng.uniform(0, 0.01))
            if offset == self.fail_at:
                raise Unavailable("value was replaced while it was being read; read it again")
            return self.data[offset : offset + size]
        finally:
            self.reading -= 1


def _ref(length: int) -> versions.ChunkRef:
    return versions.ChunkRef(vid=b"v" * 16, length=length, count=-(-length // MiB))


async def test_pieces_are_read_ahead_and_sent_in_order(autojump_clock):
    data = os.urandom(10 * MiB + 5)
    source = SlowSource(data)
    sent: list[tuple[bytes, bool]] = []

    async def send(piece, end):
        await trio.sleep(0.002)  # the socket takes its time too
        sent.append((piece, end))

    await large_values.send_value(source, b"k", _ref(len(data)), send)
    assert b"".join(piece for piece, _ in sent) == data
    assert [end for _, end in sent] == [False] * (len(sent) - 1) + [True]
    assert 1 < source.most <= large_values.READ_AHEAD + 1


async def test_a_piece_that_fails_ends_the_stream_after_the_pieces_before_it(autojump_clock):
    data = os.urandom(6 * MiB)
    source = SlowSource(data, fail_at=3 * MiB)
    sent: list[bytes] = []

    async def send(piece, end):
        sent.append(piece)

    with pytest.raises(Unavailable, match="replaced"):
        await large_values.send_value(source, b"k", _ref(len(data)), send)
    assert b"".join(sent) == data[: 3 * MiB]


async def _tcp_pair() -> tuple[trio.SocketStream, trio.SocketStream]:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    client = await trio.open_tcp_stream("127.0.0.1", port)
    server = await listeners[0].accept()
    await listeners[0].aclose()
    return server, client


async def _read_slowly(client: trio.SocketStream, received: list, count: int) -> None:
    """Read ``count`` frames into ``received``, slower than a sender can write them."""
    decoder = codec.FrameDecoder(max_frame=2 * MiB)
    while len(received) < count:
        await trio.sleep(0.005)
        decoder.receive_data(await client.receive_some(256 * 1024))
        while (message := decoder.next_message()) not in (codec.NEED_DATA, None):
            received.append(message)


@pytest.mark.parametrize("raw", [False, True])
async def test_send_file_sends_chunk_frames_from_a_file_behind_queued_frames(tmp_path, raw):
    """Over real TCP, with a reader slower than the sender (the thread waits for room):
    the frame sent before comes first, then the CHUNK frames, bodies byte for byte. 24 MiB:
    more than loopback's socket buffers hold."""
    data = os.urandom(24 * MiB + 123)
    path = tmp_path / "blob"
    path.write_bytes(data)
    server, client = await _tcp_pair()
    conn = FrameConnection(rawstream.wrap(server) if raw else server)  # the server wraps
    assert conn.can_send_file()
    pieces = [(offset, min(MiB, len(data) - offset)) for offset in range(0, len(data), MiB)]
    frames = [(codec.chunk_header(7, size, offset + size >= len(data)), offset, size)
              for offset, size in pieces]
    received: list[codec.Message] = []
    read_slowly = partial(_read_slowly, client, received, 1 + len(frames))

    fd = os.open(path, os.O_RDONLY)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_slowly)
            await conn.send(codec.encode(MsgType.PING, 6, {}))
            await conn.send_file(frames, fd)
    finally:
        os.close(fd)
    assert received[0].type == MsgType.PING
    chunks = received[1:]
    assert all(m.type == MsgType.CHUNK and m.request_id == 7 for m in chunks)
    assert b"".join(m.fields["data"] for m in chunks) == data
    assert [bool(m.flags & FLAG_END) for m in chunks] == [False] * (len(chunks) - 1) + [True]
    await client.aclose()
    await server.aclose()


async def test_send_file_is_only_for_plain_sockets():
    send, receive = trio.testing.memory_stream_pair()
    assert not FrameConnection(send).can_send_file()


async def test_an_open_blob_outlives_its_deletion_and_a_short_one_is_refused(tmp_path):
    blobs = BlobStore(tmp_path / "blobs")
    vid = b"\x01" * 16
    data = os.urandom(3 * MiB)
    await blobs.write(vid, 0, data)
    with pytest.raises(Unavailable, match="fewer"):
        await blobs.open(vid, len(data) + 1)
    fd = await blobs.open(vid, len(data))
    try:
        await blobs.delete(vid)  # the value was replaced while it was being sent
        assert not blobs.exists(vid)
        assert os.pread(fd, len(data) + 1, 0) == data
    finally:
        os.close(fd)
    with pytest.raises(Unavailable, match="replaced"):
        await blobs.open(vid, len(data))


async def test_frames_queued_while_a_file_is_sent_go_out_after_it(tmp_path):
    """Replies of other requests on the connection, queued while send_file holds the send
    lock, are sent when it ends (they were left in the queue: a multiplexed client waited
    for them until it gave up)."""
    data = os.urandom(16 * MiB)
    path = tmp_path / "blob"
    path.write_bytes(data)
    server, client = await _tcp_pair()
    conn = FrameConnection(server)
    frames = [(codec.chunk_header(7, MiB, offset + MiB >= len(data)), offset, MiB)
              for offset in range(0, len(data), MiB)]
    received: list[codec.Message] = []
    read_slowly = partial(_read_slowly, client, received, 1 + len(frames))

    async def reply_meanwhile():
        await trio.sleep(0.05)  # send_file has the lock by now
        await conn.send(codec.encode(MsgType.PING, 8, {}))

    fd = os.open(path, os.O_RDONLY)
    try:
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(read_slowly)
                nursery.start_soon(reply_meanwhile)
                await conn.send_file(frames, fd)
    finally:
        os.close(fd)
    assert [m.request_id for m in received].count(8) == 1
    assert b"".join(m.fields["data"] for m in received if m.request_id == 7) == data
    await client.aclose()
    await server.aclose()


async def test_send_file_value_stops_before_the_first_batch_that_fails_its_checksums(tmp_path):
    """A value sent from its blob file is checked a batch ahead of what is sent: with a
    bit flipped in its third 8 MiB batch, the first two batches go out, byte for byte, and
    it returns where the damaged batch starts (the caller reads the rest elsewhere)."""
    blobs = BlobStore(tmp_path / "blobs")
    vid = os.urandom(16)
    data = os.urandom(20 * MiB + 5)
    for offset in range(0, len(data), MiB):
        await blobs.write(vid, offset, data[offset : offset + MiB])
    await blobs.seal(vid)
    rotted = bytearray(blobs._path(vid).read_bytes())
    rotted[17 * MiB + 3] ^= 0x01
    blobs._path(vid).write_bytes(bytes(rotted))
    ref = versions.ChunkRef(vid=vid, length=len(data), count=20)
    server, client = await _tcp_pair()
    conn = FrameConnection(server)
    received: list[codec.Message] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_read_slowly, client, received, 16)
        stopped = await large_values.send_file_value(conn, 7, ref, blobs)
    assert stopped == 16 * MiB
    assert b"".join(m.fields["data"] for m in received) == data[: 16 * MiB]
    assert blobs.is_damaged(vid)
    await client.aclose()
    await server.aclose()
