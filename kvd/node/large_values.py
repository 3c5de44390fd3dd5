"""What a write or read of a large (chunked) value needs beside the coordinator's quorum
logic: streaming its chunks to the replicas, dropping a failed upload, and finding a replica
that holds every chunk of what was read."""

from __future__ import annotations

import logging

import trio

from kvd import versions
from kvd.errors import BadRequest, KvdError, QuorumFailed
from kvd.node.quorum_message import quorum_message
from kvd.node.replica import Replica

log = logging.getLogger("kvd.coordinator")


async def discard_upload(replica: Replica, key: bytes, vid: bytes, timeout: float) -> None:
    """Ask ``replica`` to drop the chunks of upload ``vid`` (no manifest names them)."""
    try:
        with trio.fail_after(timeout):
            await replica.discard_upload(key, vid)
    except (KvdError, trio.TooSlowError, OSError) as exc:
        log.info("could not discard failed upload on %s: %s", replica.node, exc)


async def stream_chunks(quorum, key, vid, length, chunks, replicas, w):
    """Send each chunk to every replica in order (``quorum`` is the coordinator's); keep
    those that stored them all. Returns (those replicas, the number of chunks)."""
    alive = list(replicas)
    count = 0
    received = 0
    async for data in chunks:
        offset = received
        received += len(data)
        if received > length:
            raise BadRequest(f"value is longer than the declared {length} bytes")
        ok, failed, _ = await quorum(
            alive, lambda rep: rep.write_chunk(key, vid, offset, data), len(alive)
        )
        for replica, exc in failed:
            log.info("replica %s dropped from upload of %r: %s", replica.node, key[:64], exc)
        alive = [rep for rep, _ in ok]
        if len(alive) < w:
            raise QuorumFailed(quorum_message("write", w, ok, failed))
        count += 1
    if received != length:
        raise BadRequest(f"value ended after {received} of {length} declared bytes")
    return alive, count


def minted_inline(obj: versions.VersionedObject) -> bool:
    """Whether every sibling of ``obj`` is inline (a fallback can then hold all of it)."""
    return all(s.chunks is None for s in obj.siblings)


def chunk_source(merged, ok) -> Replica | None:
    """A replica whose object includes every chunked sibling of the merged object."""
    if merged is None:
        return None
    wanted = {s.dot for s in merged.siblings if s.chunks is not None}
    if not wanted:
        return None
    for replica, obj in ok:
        if obj is not None and wanted <= {s.dot for s in obj.siblings}:
            return replica
    return None
