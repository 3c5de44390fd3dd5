"""What a write or read of a large (chunked) value needs beside the coordinator's quorum
logic: streaming its chunks to the replicas, dropping a failed upload, and finding a replica
that holds every chunk of what was read."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence

import trio

from kvd import versions
from kvd.errors import (BadRequest, Damaged, KvdError, QuorumFailed, Unavailable,
                        unwrap_single_error)
from kvd.node.quorum_message import quorum_message
from kvd.node.replica import LocalReplica, Replica
from kvd.proto import codec
from kvd.storage.blobs import BlobStore

log = logging.getLogger("kvd.coordinator")


async def discard_upload(replica: Replica, key: bytes, vid: bytes, timeout: float) -> None:
    """Ask ``replica`` to drop the chunks of upload ``vid`` (no manifest names them)."""
    try:
        with trio.fail_after(timeout):
            await replica.discard_upload(key, vid)
    except (KvdError, trio.TooSlowError, OSError) as exc:
        log.info("could not discard failed upload on %s: %s", replica.node, exc)


# Chunks in flight per replica during an upload. One at a time (a round trip and a blob
# write per chunk, in series) a 256 MiB put through 3 nodes ran at 35-42 MB/s; 8 raised the
# coordinator's peak RSS to 106 MiB.
WINDOW = 4


class _Lane:
    """One replica's share of an upload: its chunks in order, up to WINDOW in flight (the
    first alone: it opens the upload on the replica, which refuses later chunks of an upload
    it does not know). A failed call ends the lane; the coordinator goes on without it."""

    def __init__(self, replica: Replica, key: bytes, vid: bytes):
        self.replica = replica
        self.key = key
        self.vid = vid
        self.send, self._receive = trio.open_memory_channel[tuple[int, bytes]](1)
        self.error: BaseException | None = None

    async def run(self, call) -> None:
        slots = trio.Semaphore(WINDOW)
        async with trio.open_nursery() as nursery:
            first = True
            async for offset, data in self._receive:
                await slots.acquire()
                if self.error is not None:
                    break
                if first:
                    await self._write(call, slots, offset, data)
                    first = False
                else:
                    nursery.start_soon(self._write, call, slots, offset, data)
            self._receive.close()  # after a failure: the coordinator's next send fails

    async def _write(self, call, slots: trio.Semaphore, offset: int, data: bytes) -> None:
        key, vid = self.key, self.vid
        try:
            # Not cancelled when the upload ends early (a refused stream, a client gone): a
            # chunk cut off half-sent would break the peer connection and every request on
            # it. The call's own timeout (replica_timeout) bounds the wait.
            with trio.CancelScope(shield=True):
                # No deadline of its own: each chunk gets replica_timeout. Bulk: its time
                # says nothing of how the replica answers requests (replica_health rule 2).
                await call(self.replica, lambda rep: rep.write_chunk(key, vid, offset, data),
                           math.inf, bulk=True)
        except (KvdError, OSError) as exc:
            if self.error is None:
                log.info("replica %s dropped from upload of %r: %s", self.replica.node,
                         key[:64], exc)
                self.error = exc
        finally:
            slots.release()


async def stream_chunks(call, key, vid, length, chunks, replicas, w):
    """Send each chunk to every replica (``call(replica, fn, deadline)`` is the coordinator's
    call with its per-replica timeout); keep those that stored them all. Returns (those replicas, the
    number of chunks). Memory: at most WINDOW + 2 chunks per replica, shared by them."""
    lanes = [_Lane(replica, key, vid) for replica in replicas]
    count = 0
    received = 0
    with unwrap_single_error():
        async with trio.open_nursery() as nursery:
            for lane in lanes:
                nursery.start_soon(lane.run, call)
            try:
                async for data in chunks:
                    offset = received
                    received += len(data)
                    if received > length:
                        raise BadRequest(f"value is longer than the declared {length} bytes")
                    for lane in lanes:
                        if lane.error is None:
                            try:
                                await lane.send.send((offset, data))
                            except trio.BrokenResourceError:
                                pass  # the lane failed meanwhile (lane.error says why)
                    _check(lanes, w)
                    count += 1
                if received != length:
                    raise BadRequest(f"value ended after {received} of {length} declared bytes")
            except BaseException:
                nursery.cancel_scope.cancel()
                raise
            finally:
                for lane in lanes:
                    lane.send.close()
    _check(lanes, w)
    return [lane.replica for lane in lanes if lane.error is None], count


def _check(lanes: list[_Lane], w: int) -> None:
    """QuorumFailed once fewer than ``w`` replicas still hold every chunk sent so far."""
    ok = [(lane.replica, None) for lane in lanes if lane.error is None]
    if len(ok) < w:
        failed = [(lane.replica, lane.error) for lane in lanes if lane.error is not None]
        raise QuorumFailed(quorum_message("write", w, ok, failed))


# Pieces read ahead of the one being sent when streaming a value out. One at a time (each
# read, local or from a peer, waiting for the previous send) a 256 MiB get ran at 128-157 MB/s.
READ_AHEAD = 4
PIECE = 1 << 20  # bytes per piece read (and per CHUNK frame sent)


class _Piece:
    def __init__(self) -> None:
        self.done = trio.Event()
        self.data = b""
        self.error: BaseException | None = None


class Holders:
    """The replicas whose objects include every chunked sibling of a read, this node first
    (no peer hop), then the key's other replicas. A piece one of them cannot give whole
    (its copy rotted or cut on disk, its connection gone) is read from the next one: the
    blobs of one upload id hold the same bytes wherever they are, and each replica checks
    its own against their checksums."""

    def __init__(self, replicas: list[Replica]):
        self.replicas = replicas

    def drop_first(self, why: BaseException) -> None:
        """Read no more from the first holder; raises ``why`` when it was the last."""
        if len(self.replicas) == 1:
            raise why
        dropped = self.replicas.pop(0)
        log.warning("reading the rest of a value from %s instead of %s: %s",
                    self.replicas[0].node, dropped.node, why)

    async def read_piece(self, key: bytes, ref: versions.ChunkRef, offset: int,
                         size: int) -> bytes:
        while True:
            replica = self.replicas[0]
            try:
                data = await replica.read_piece(key, ref, offset, size)
                if len(data) != size:
                    raise Unavailable(f"{replica.node} holds {len(data)} of the {size} bytes "
                                      f"at {offset}")
                return data
            except (KvdError, OSError) as exc:
                if replica is self.replicas[0]:  # not dropped meanwhile by another piece
                    self.drop_first(exc)


async def send_value(source: Replica | Holders, key: bytes, ref: versions.ChunkRef, send,
                     start: int = 0) -> None:
    """Stream the stored value ``ref`` from ``source``, from byte ``start`` on, to ``await
    send(data, end)``, in order, with up to READ_AHEAD pieces being read meanwhile (memory:
    READ_AHEAD + 1 pieces)."""
    if ref.length == 0:
        await send(b"", True)
        return
    slots = trio.Semaphore(READ_AHEAD + 1)
    ready, pending = trio.open_memory_channel[_Piece](READ_AHEAD + 1)

    async def read(piece: _Piece, offset: int) -> None:
        try:
            piece.data = await source.read_piece(key, ref, offset,
                                                 min(PIECE, ref.length - offset))
        except (KvdError, OSError) as exc:
            piece.error = exc
        piece.done.set()

    async def read_all(nursery) -> None:
        async with ready:
            for offset in range(start, ref.length, PIECE):
                await slots.acquire()
                piece = _Piece()
                await ready.send(piece)
                nursery.start_soon(read, piece, offset)

    with unwrap_single_error():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_all, nursery)
            sent = start
            async for piece in pending:
                await piece.done.wait()
                if piece.error is not None:
                    raise piece.error
                sent += len(piece.data)
                await send(piece.data, sent >= ref.length)
                piece.data = b""
                slots.release()


# CHUNK frames per send_file call (the connection's send lock is given up between calls).
FILE_BATCH = 8


def blob_file_store(source: Replica | None) -> BlobStore | None:
    """The blob files of ``source`` when it is this node's replica on disk (send_file)."""
    if isinstance(source, LocalReplica) and isinstance(source.store.blobs, BlobStore):
        return source.store.blobs
    return None


async def send_file_value(conn, rid: int, ref: versions.ChunkRef, blobs: BlobStore) -> int:
    """Stream the stored value ``ref`` as CHUNK frames of request ``rid`` straight from its
    blob file to ``conn`` (a FrameConnection that ``can_send_file``): no byte of it passes
    through Python (a 1 GiB get: 0.4 s of the coordinator's CPU, against 1.4 s reading it
    piece by piece). Each batch is checked against its checksums before it is sent; returns
    where it stopped: ``ref.length``, or the first byte of a batch that failed them."""
    offsets = range(0, ref.length, PIECE)
    batches = [offsets[first : first + FILE_BATCH] for first in range(0, len(offsets), FILE_BATCH)]
    damaged: list[int] = []

    async def check(batch: range) -> None:
        try:
            await blobs.check(ref.vid, fd, batch[0], min(batch[-1] + PIECE, ref.length) - batch[0])
        except Damaged:
            damaged.append(batch[0])

    fd = await blobs.open(ref.vid, ref.length)
    try:
        await check(batches[0])
        for i, batch in enumerate(batches):
            if damaged:
                return damaged[0]
            frames = []
            for offset in batch:
                size = min(PIECE, ref.length - offset)
                frames.append((codec.chunk_header(rid, size, offset + size >= ref.length),
                               offset, size))
            # The next batch is checked while this one is sent: in series, a 512 MiB get
            # ran at 270-350 MB/s against 380-570 unchecked.
            async with trio.open_nursery() as nursery:
                if i + 1 < len(batches):
                    nursery.start_soon(check, batches[i + 1])
                await conn.send_file(frames, fd)
    finally:
        os.close(fd)
    return ref.length


def minted_inline(obj: versions.VersionedObject) -> bool:
    """Whether every sibling of ``obj`` is inline (a fallback can then hold all of it)."""
    return all(s.chunks is None for s in obj.siblings)


def chunk_source(merged, ok, others: Sequence[Replica] = ()) -> Holders | None:
    """The replicas whose objects include every chunked sibling of the merged object, then
    ``others`` (the key's replicas that answered a digest, or not yet)."""
    if merged is None:
        return None
    wanted = {s.dot for s in merged.siblings if s.chunks is not None}
    if not wanted:
        return None
    holding = [replica for replica, obj in ok
               if obj is not None and wanted <= {s.dot for s in obj.siblings}]
    # This node's own copy first: no peer hop (and its bytes are read in parallel pieces).
    holding.sort(key=lambda replica: not isinstance(replica, LocalReplica))
    return Holders(holding + [rep for rep in others if rep not in holding]) if holding else None
