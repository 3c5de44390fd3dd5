"""Answers `kvctl backup`: streams a consistent backup of this node (kvd.backup) to the
client as CHUNK frames after one ADMIN_REPLY, without blocking the event loop.

The file is produced in a worker thread (LevelDB iteration and blob reads are blocking
I/O) and handed to the connection through a small channel, so memory stays at a few
pieces however large the node is, and a slow client slows the producer, not the node.
"""

from __future__ import annotations

import trio

from kvd.backup import backup_records
from kvd.errors import BadRequest, unwrap_single_error
from kvd.proto import codec
from kvd.proto.messages import MsgType
from kvd.storage.blobs import BlobStore

PIECE_BYTES = 256 * 1024  # bytes per CHUNK frame, at most half of max_frame


async def send_backup(node, conn, rid: int) -> None:
    """ADMIN {"op": "backup"}: reply with the node and an estimate of the size, then the
    backup file in CHUNK frames, the last one with FLAG_END."""
    blobs = node.store.blobs
    if not isinstance(blobs, BlobStore):
        raise BadRequest(f"{node.node_id} keeps its data in memory: there is nothing to back up")
    piece_bytes = min(PIECE_BYTES, node.config.max_frame // 2)
    cluster = node.cluster
    header = {"node": node.node_id, "cluster": cluster.state.cluster_id,
              "created": node.clocks.wall()}
    async with blobs.hold():  # kvd.backup Rule 1: hold the blobs, then take the snapshot
        items = node.storage.iterate(b"", b"\xff")
        estimate = (node.storage.approximate_size()
                    + await trio.to_thread.run_sync(blobs.approximate_size))
        await conn.send(codec.encode(MsgType.ADMIN_REPLY, rid,
                                     {**header, "estimated_bytes": estimate}))
        send, receive = trio.open_memory_channel(2)

        def produce() -> None:
            """In the worker thread: every call into the channel goes through from_thread
            (a channel is not thread-safe)."""
            pending = bytearray()
            try:
                for piece in backup_records(header, items, blobs.root):
                    pending += piece
                    while len(pending) >= piece_bytes:
                        trio.from_thread.run(send.send, bytes(pending[:piece_bytes]))
                        del pending[:piece_bytes]
                if pending:
                    trio.from_thread.run(send.send, bytes(pending))
            except (trio.BrokenResourceError, trio.Cancelled, trio.RunFinishedError):
                return  # the client went away: the sending side stopped reading
            finally:
                try:
                    trio.from_thread.run_sync(send.close)
                except trio.RunFinishedError:
                    pass

        with unwrap_single_error():  # a BackupError of the producer (a damaged blob)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(trio.to_thread.run_sync, produce)
                async with receive:
                    async for piece in receive:
                        await conn.send(codec.encode_chunk(rid, piece, end=False))
        await conn.send(codec.encode_chunk(rid, b"", end=True))
