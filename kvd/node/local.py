"""This node's replica store: versioned objects and their chunks on top of Storage.

Invariants:
- Rule 1: an object record naming a blob (a chunked value) is written only after that blob
  is sealed (fsynced): ``coordinate`` and ``merge`` seal before they write.
- Rule 2: a blob is deleted only after the object that no longer names it is durable, so a
  crash never leaves a manifest without its bytes.
- Rule 3: no blob is ever forgotten. A blob ledger entry is written before an upload's first
  byte ("u": uploading) and removed in the same batch as the manifest that names it; the
  batch that drops the last manifest naming a blob marks it "g" (garbage). ``sweep`` at
  start deletes every blob still in the ledger, so a crash at any point leaves no orphan.
- Rule 5: every object write also updates the partition's anti-entropy tree (kvd/aae.py)
  and the key's index entry, in the same batch: the tree on disk always matches the
  objects, and is never rebuilt by a scan.
- Rule 6: a partition this node stopped replicating is dropped in O(1): its generation is
  bumped (kvd/storage/keys.py rule 5), so its objects, tree and index vanish from every
  read at once; ``reclaim`` deletes the old keys (and blobs) in the background, in bounded
  steps. The new generation starts empty: stale copies never come back as "data".
- Rule 4: every write of a key builds on the latest object *written* for it, durable or not:
  the not-yet-durable object waits in ``_pending`` while its batch commits, and reading it,
  deriving the next object and publishing that happen with no checkpoint in between. So two
  concurrent writes never build on the same old object (and lose one another), and writes to
  a hot key share group commits instead of queueing for one fsync each. Storage applies
  batches in write() order, so the later object is also the one that lands last.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
from collections.abc import AsyncIterator


from kvd import aae, versions
from kvd.errors import Unavailable
from kvd.storage import Storage, keys
from kvd.ring import partition_of

log = logging.getLogger("kvd.local")

READ_SIZE = 1 << 20  # bytes per CHUNK frame when streaming a stored value out


_UPLOADING = b"u"
_GARBAGE = b"g"


def _ledger_key(vid: bytes) -> bytes:
    return keys.meta_key("blob:") + vid


_GENERATIONS = keys.meta_key("generations")  # {partition: generation}, only those above 0
_RECLAIM = keys.meta_key("reclaim:")  # + slot u32: a dropped slot whose keys remain


def new_vid() -> bytes:
    """A fresh name for one upload of a chunked value."""
    return os.urandom(16)


class LocalStore:
    """Versioned objects of the partitions this node holds, in one Storage."""

    def __init__(self, storage: Storage, blobs, ring_size: int):
        self.storage = storage
        self.blobs = blobs
        self.ring_size = ring_size
        self._pending: dict[bytes, versions.VersionedObject] = {}
        self._pending_digest: dict[bytes, bytes] = {}
        self._trees: dict[int, aae.Tree] = {}
        raw = storage.get(_GENERATIONS)
        self._generations: dict[int, int] = (
            {} if raw is None else {int(p): g for p, g in json.loads(raw).items()})

    def partition(self, key: bytes) -> int:
        return partition_of(key, self.ring_size)

    def slot(self, partition: int) -> int:
        """Where the live generation of ``partition`` keeps its keys (Rule 6)."""
        return keys.slot(partition, self._generations.get(partition, 0), self.ring_size)

    def holds(self, partition: int) -> bool:
        """Whether this node stores any object of ``partition`` (one seek)."""
        start, stop = keys.object_range(self.slot(partition))
        return next(iter(self.storage.iterate_keys(start, stop)), None) is not None

    async def drop_partition(self, partition: int) -> None:
        """Rule 6: forget ``partition`` at once; ``reclaim`` frees its space later."""
        old = self.slot(partition)
        self._generations[partition] = self._generations.get(partition, 0) + 1
        self._trees.pop(partition, None)
        doc = json.dumps({str(p): g for p, g in sorted(self._generations.items())}).encode()
        await self.storage.write([(_GENERATIONS, doc), (_RECLAIM + old.to_bytes(4, "big"), b"")])

    def reclaimable(self) -> list[int]:
        """Dropped slots whose keys are not all deleted yet."""
        return [int.from_bytes(k[len(_RECLAIM):], "big")
                for k in self.storage.iterate_keys(_RECLAIM, _RECLAIM + b"\xff")]

    async def reclaim(self, slot: int, limit: int) -> int:
        """Delete up to ``limit`` keys of dropped ``slot`` (objects first, with the blobs
        they name: Rule 3's ledger marks them garbage in the same batch). Returns how many
        were deleted; 0 once the slot is empty (its reclaim mark is then removed)."""
        objects = keys.object_range(slot)
        for start, stop in keys.slot_prefixes(slot):
            batch = list(itertools.islice(self.storage.iterate(start, stop), limit))
            if not batch:
                continue
            garbage = self._blobs_of_dropped(batch) if (start, stop) == objects else set()
            await self.storage.write([(k, None) for k, _ in batch]
                                     + [(_ledger_key(vid), _GARBAGE) for vid in garbage])
            if garbage:
                await self._delete_blobs(garbage)
            return len(batch)
        await self.storage.write([(_RECLAIM + slot.to_bytes(4, "big"), None)])
        return 0

    def _blobs_of_dropped(self, batch: list[tuple[bytes, bytes]]) -> set[bytes]:
        """Blobs named by dropped object records and not by the key's live object (a copy
        fetched again after the drop finds the blob present and names it again)."""
        garbage: set[bytes] = set()
        for object_key, raw in batch:
            current = self.read(keys.user_key_of(object_key)[1])
            kept = set() if current is None else {
                s.chunks.vid for s in current.siblings if s.chunks is not None}
            garbage |= {s.chunks.vid for s in versions.decode_object(raw).siblings
                        if s.chunks is not None} - kept
        return garbage

    def read(self, key: bytes) -> versions.VersionedObject | None:
        """The stored object of ``key``, or None when this node holds nothing for it."""
        raw = self.storage.get(keys.object_key(self.slot(self.partition(key)), key))
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
        if chunks is not None:
            await self._seal(chunks)
        current = self._latest(key) or versions.empty()
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
        for sibling in incoming.siblings:
            if sibling.chunks is not None:
                await self._seal(sibling.chunks)
        current = self._latest(key)
        if current is None:
            merged, discarded = incoming, []
        else:
            merged, discarded = versions.sync_with_discarded(current, incoming)
            if merged == current:
                return current
        await self._store(key, merged, discarded)
        return merged

    async def _seal(self, ref: versions.ChunkRef) -> None:
        if not self.blobs.exists(ref.vid):
            raise Unavailable(f"value bytes {ref.vid.hex()} are not on this replica")
        size = await self.blobs.seal(ref.vid)
        if size != ref.length:
            raise Unavailable(f"value bytes {ref.vid.hex()} are incomplete ({size} of {ref.length})")

    def _latest(self, key: bytes) -> versions.VersionedObject | None:
        pending = self._pending.get(key)
        return pending if pending is not None else self.read(key)

    def tree(self, partition: int) -> aae.Tree:
        """The partition's anti-entropy tree (loaded from its stored segments once)."""
        tree = self._trees.get(partition)
        if tree is None:
            segments = [0] * aae.SEGMENTS
            start, stop = keys.segment_range(self.slot(partition))
            for k, v in self.storage.iterate(start, stop):
                segments[int.from_bytes(k[-2:], "big")] = int.from_bytes(v, "big")
            tree = self._trees[partition] = aae.Tree(segments)
        return tree

    def _index_ops(self, partition: int, key: bytes, digest: bytes | None) -> list:
        """Update the tree for ``key``'s new digest (None: removed); the ops that store it
        go in the same batch as the object, so tree and objects never disagree on disk."""
        segment = aae.segment_of(key)
        index = keys.index_key(self.slot(partition), segment, key)
        if key in self._pending_digest:  # a write of this key is still committing
            old = self._pending_digest[key]
        else:
            old = self.storage.get(index)
        tree = self.tree(partition)
        tree.update(key, old, digest)
        return [(index, digest),
                (keys.segment_key(self.slot(partition), segment), tree.segment(segment).to_bytes(8, "big"))]

    def segment_entries(self, partition: int, segment: int) -> dict[bytes, bytes]:
        """{key: digest} of one segment, from the index (a range read)."""
        start, stop = keys.index_range(self.slot(partition), segment)
        return {k[len(start):]: v for k, v in self.storage.iterate(start, stop)}

    async def purge(self, key: bytes, digest: bytes) -> bool:
        """Remove a tombstone confirmed on every replica, if it is still exactly that."""
        partition = self.partition(key)
        current = self._latest(key)
        if current is None or versions.is_found(current):
            return False
        raw = versions.encode_object(current)
        if hashlib.blake2b(raw, digest_size=8).digest() != digest:
            return False
        ops = [(keys.object_key(self.slot(partition), key), None)] + self._index_ops(partition, key, None)
        await self._commit(key, versions.empty(), None, ops)
        return True

    async def _store(self, key, obj, discarded) -> None:
        """Publish ``obj`` as the key's latest object (call with no checkpoint since reading
        the object it derives from), then wait until it is durable."""
        partition = self.partition(key)
        raw = versions.encode_object(obj)
        digest = hashlib.blake2b(raw, digest_size=8).digest()
        ops = [(keys.object_key(self.slot(partition), key), raw)] + self._index_ops(partition, key, digest)
        kept = {s.chunks.vid for s in obj.siblings if s.chunks is not None}
        garbage = {s.chunks.vid for s in discarded if s.chunks is not None} - kept
        ops += [(_ledger_key(vid), None) for vid in kept]
        ops += [(_ledger_key(vid), _GARBAGE) for vid in garbage]
        await self._commit(key, obj, digest, ops)
        if garbage:
            await self._delete_blobs(garbage)

    async def _commit(self, key, obj, digest, ops) -> None:
        """Write ``ops``; meanwhile ``obj`` (digest) is what later writes of ``key`` build on."""
        self._pending[key] = obj
        self._pending_digest[key] = digest
        try:
            await self.storage.write(ops)
        finally:
            if self._pending.get(key) is obj:
                del self._pending[key]
                del self._pending_digest[key]

    async def _delete_blobs(self, vids) -> None:
        for vid in vids:
            await self.blobs.delete(vid)
        await self.storage.write([(_ledger_key(vid), None) for vid in vids])

    async def write_chunk(self, key: bytes, vid: bytes, offset: int, data: bytes) -> None:
        """Store bytes of upload ``vid`` at ``offset`` (sealed before its manifest)."""
        if offset == 0:
            await self.storage.write([(_ledger_key(vid), _UPLOADING)])
        await self.blobs.write(vid, offset, data)

    async def discard_upload(self, key: bytes, vid: bytes) -> None:
        """Remove the bytes of an upload that never got its manifest (client went away)."""
        await self._delete_blobs([vid])

    async def sweep(self) -> int:
        """Delete the blobs a crash left behind (see Rule 3); returns how many."""
        start = _ledger_key(b"")
        vids = [k[len(start):] for k in self.storage.iterate_keys(start, start + b"\xff")]
        if vids:
            await self._delete_blobs(vids)
            log.info("removed %d unfinished or superseded large values", len(vids))
        return len(vids)

    async def read_chunks(self, key: bytes, ref: versions.ChunkRef) -> AsyncIterator[bytes]:
        """Yield a stored value in READ_SIZE pieces, one at a time (bounded memory)."""
        for offset in range(0, ref.length, READ_SIZE):
            data = await self.blobs.read(ref.vid, offset, min(READ_SIZE, ref.length - offset))
            if not data:
                raise Unavailable(
                    f"value of key {key[:64]!r} changed while it was being read; read it again"
                )
            yield data
