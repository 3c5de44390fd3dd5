"""This node's replica store: versioned objects and their chunks on top of Storage.

Invariants:
- Rule 1: an object record is written only after every chunk it references is durable
  (chunks are written by ``write_chunk`` and awaited before ``coordinate``/``merge``).
- Rule 2: chunks of a sibling are deleted in the same atomic batch that writes the object
  which no longer references them, so a reader never sees a manifest without its chunks
  except across that one batch (readers detect it and report the value as changed).
- Rule 3: read-modify-write of one key is serialised by a striped lock, so two concurrent
  writes on this node never both build on the same old object and lose one another.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator

import trio

from kvd import versions
from kvd.errors import Unavailable
from kvd.storage.keys import partition_of
from kvd.storage import Storage, keys

log = logging.getLogger("kvd.local")

_LOCK_STRIPES = 1024


def new_vid() -> bytes:
    """A fresh name for one upload of a chunked value."""
    return os.urandom(16)


class LocalStore:
    """Versioned objects of the partitions this node holds, in one Storage."""

    def __init__(self, storage: Storage, ring_size: int):
        self.storage = storage
        self.ring_size = ring_size
        self._locks = [trio.Lock() for _ in range(_LOCK_STRIPES)]

    def partition(self, key: bytes) -> int:
        return partition_of(key, self.ring_size)

    def _lock(self, key: bytes) -> trio.Lock:
        return self._locks[hash(key) % _LOCK_STRIPES]

    def read(self, key: bytes) -> versions.VersionedObject | None:
        """The stored object of ``key``, or None when this node holds nothing for it."""
        raw = self.storage.get(keys.object_key(self.partition(key), key))
        return None if raw is None else versions.decode_object(raw)

    async def coordinate(
        self,
        key: bytes,
        context: versions.VersionVector,
        actor: str,
        *,
        value: bytes = b"",
        deleted: bool = False,
        chunks: versions.ChunkRef | None = None,
        timestamp: float = 0.0,
    ) -> versions.VersionedObject:
        """Apply a client write as its coordinating replica: mint a new dot for ``actor``."""
        async with self._lock(key):
            current = self.read(key) or versions.empty()
            updated, discarded = versions.update(
                current,
                context,
                actor,
                value=value,
                deleted=deleted,
                chunks=chunks,
                timestamp=timestamp,
                key=key,
            )
            await self._store(key, updated, discarded)
        if versions.needs_warning(updated):
            log.warning("key %r has %d siblings", key[:64], len(updated.siblings))
        return updated

    async def merge(
        self, key: bytes, incoming: versions.VersionedObject
    ) -> versions.VersionedObject:
        """Merge an object from another replica (replication, read repair, handoff)."""
        async with self._lock(key):
            current = self.read(key)
            if current is None:
                merged, discarded = incoming, []
            else:
                merged, discarded = versions.sync_with_discarded(current, incoming)
                if merged == current:
                    return current
            await self._store(key, merged, discarded)
        return merged

    async def _store(self, key, obj, discarded) -> None:
        partition = self.partition(key)
        ops: list[tuple[bytes, bytes | None]] = [
            (keys.object_key(partition, key), versions.encode_object(obj))
        ]
        kept = {s.chunks.vid for s in obj.siblings if s.chunks is not None}
        for sibling in discarded:
            ref = sibling.chunks
            if ref is not None and ref.vid not in kept:
                ops.extend(
                    (keys.chunk_key(partition, key, ref.vid, i), None)
                    for i in range(ref.count)
                )
        await self.storage.write(ops)

    async def write_chunk(self, key: bytes, vid: bytes, index: int, data: bytes) -> None:
        """Store chunk ``index`` of upload ``vid`` durably (before its manifest)."""
        await self.storage.write([(keys.chunk_key(self.partition(key), key, vid, index), data)])

    async def discard_upload(self, key: bytes, vid: bytes) -> None:
        """Remove the chunks of an upload that never got its manifest (client went away)."""
        prefix = keys.chunk_prefix(self.partition(key), key, vid)
        stale = list(self.storage.iterate_keys(prefix, prefix + b"\xff" * 5))
        if stale:
            await self.storage.write([(k, None) for k in stale])

    def has_chunks(self, key: bytes, ref: versions.ChunkRef) -> bool:
        """Whether every chunk of ``ref`` is present (used before serving a manifest)."""
        partition = self.partition(key)
        return all(
            self.storage.get(keys.chunk_key(partition, key, ref.vid, i)) is not None
            for i in (0, ref.count - 1)
        )

    async def read_chunks(self, key: bytes, ref: versions.ChunkRef) -> AsyncIterator[bytes]:
        """Yield the chunks of a stored value in order, one at a time (bounded memory)."""
        partition = self.partition(key)
        for index in range(ref.count):
            data = self.storage.get(keys.chunk_key(partition, key, ref.vid, index))
            if data is None:
                raise Unavailable(
                    f"value of key {key[:64]!r} changed while it was being read; read it again"
                )
            yield data
            await trio.lowlevel.checkpoint()
