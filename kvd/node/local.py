"""This node's replica store: versioned objects and their chunks on top of Storage.

Invariants:
- Rule 1: an object record naming a blob (a chunked value) is written only after that blob
  is sealed (fsynced): ``coordinate`` and ``merge`` seal before they write.
- Rule 2: a blob is deleted only after the object that no longer names it is durable, so a
  crash never leaves a manifest without its bytes. Nothing deletes a blob the key's latest
  object names: ``discard_upload`` of it, or of one sealed for a manifest, is a no-op, and
  ``write_chunk`` of it is never marked "uploading": skipped when the blob is here whole
  and sound (a re-send), else written in place (a refill of a damaged copy, Rule 9).
- Rule 3: no blob is ever forgotten. A blob ledger entry (its mark and the key it belongs
  to) is written before an upload's first byte ("u": uploading) and removed in the batch of
  the manifest naming it; the batch dropping the last manifest naming a blob marks it "g"
  (garbage). ``sweep`` at start deletes every blob still in the ledger unless its key's
  object names it (then only the entry goes): a crash leaves no orphan, and no live blob is
  swept. A chunk past offset 0 of a discarded upload is refused: it never recreates it.
- Rule 4: every write of a key builds on the latest object *written* for it, durable or not
  (``_pending`` while its batch commits), with no checkpoint between reading it and
  publishing the next. So concurrent writes never lose one another, and writes to a hot key
  share group commits. Storage applies batches in write() order, so the later object lands
  last. A published commit lands even if its caller is cancelled (``lands=True``; the
  caller still sees the cancellation), so ``_pending`` and the tree describe it until then.
- Rule 5: every object write also updates, in the same batch, the partition's anti-entropy
  tree (kvd/aae.py) and the key's index entry, so the tree on disk always matches the
  objects, and the tombstone index: a key whose object is only tombstones is indexed at the
  time this node stored it, on its own wall clock, so no clock skew between nodes shortens
  the tombstone grace (full simulator seed 498).
- Rule 6: a dot is never reused (DESIGN section 2). Each actor's counters come from one
  growing sequence shared by all keys, leased in blocks by a durable high-water mark before
  use (kvd.node.dot_leases), continued above the mark after a restart. So a purge, which
  forgets a key's clock, never lets the actor mint a dot a surviving copy covers (kv679).
- Rule 7: a merge returns only once the object it leaves is durable: when the incoming
  object adds nothing to one still committing, it waits for that commit (a W ack or a hint
  deletion must never precede the fsync). Two siblings with one dot and different payloads
  are logged and counted (``dot_collisions``); ``versions.sync`` keeps the same one.
- Rule 8: a blob an overwrite superseded while it was being read stays until its readers
  are done (kvd.node.blob_linger), its ledger entry still "garbage" (Rule 3).
- Rule 9: an object (or blob) whose stored bytes rotted fails its checksum, is never served
  nor merged: its read fails with Damaged (logged once), the other replicas answer, read
  repair rewrites an object; a write builds on it as on nothing.
- Rule 10: a partition no longer replicated here is dropped in O(1) by bumping its generation
  (kvd/storage/keys.py rule 5): its objects, tree and indexes vanish from reads at once, and
  ``reclaim`` deletes them in bounded background steps. Stale copies never come back.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
from collections import Counter
from collections.abc import AsyncIterator, Callable

import trio

from kvd import aae, versions
from kvd.clocks import REAL
from kvd.errors import BadRequest, Damaged, Unavailable
from kvd.node.blob_linger import BlobLinger
from kvd.node.dot_leases import SEQUENCES, DotLeases
from kvd.storage import Storage, keys
from kvd.storage.base import DamagedData
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


def _names(obj: versions.VersionedObject | None, vid: bytes) -> versions.ChunkRef | None:
    """The chunks of upload ``vid`` when ``obj`` names them."""
    chunks = (s.chunks for s in (obj.siblings if obj else ()) if s.chunks)
    return next((ref for ref in chunks if ref.vid == vid), None)


class _Commit:
    """An object published as its key's latest while its batch commits (Rule 4)."""

    __slots__ = ("obj", "digest", "durable")

    def __init__(self, obj: versions.VersionedObject, digest: bytes | None):
        self.obj, self.digest = obj, digest
        self.durable = trio.Event()  # set when the batch committed or failed


class LocalStore:
    """Versioned objects of the partitions this node holds, in one Storage."""

    def __init__(self, storage: Storage, blobs, ring_size: int,
                 wall: Callable[[], float] = REAL.wall):
        """``wall``: this node's wall clock, which stamps the tombstone index (Rule 5)."""
        self.storage, self.wall, self.blobs, self.ring_size = storage, wall, blobs, ring_size
        self._pending: dict[bytes, _Commit] = {}
        self._trees: dict[int, aae.Tree] = {}
        self.leases = DotLeases(storage, self._has_objects)  # Rule 6
        self._sealing: Counter[bytes] = Counter()  # vids a write is sealing for its manifest
        self.linger = BlobLinger()  # Rule 8
        self.dot_collisions = 0  # same dot, different payload: should stay 0 (Rule 7)
        self._damaged: set[bytes] = set()  # keys whose damaged copy was logged (Rule 9)
        self.damaged_found = 0  # such keys, for the metrics (up to 10,000)
        raw = storage.get(_GENERATIONS) or b"{}"
        self._generations = {int(p): g for p, g in json.loads(raw).items()}
        self._slots: dict[int, int] = {}  # partition -> slot of its live generation

    def partition(self, key: bytes) -> int:
        return partition_of(key, self.ring_size)

    def slot(self, partition: int) -> int:
        """Where the live generation of ``partition`` keeps its keys (Rule 10)."""
        found = self._slots.get(partition)  # a write asked 4 times: 2% of a SET's CPU
        if found is None:
            found = self._slots[partition] = keys.slot(
                partition, self._generations.get(partition, 0), self.ring_size)
        return found

    def holds(self, partition: int) -> bool:
        """Whether this node stores any object of ``partition`` (one seek)."""
        start, stop = keys.object_range(self.slot(partition))
        return next(iter(self.storage.iterate_keys(start, stop)), None) is not None

    async def drop_partition(self, partition: int) -> None:
        """Rule 10: forget ``partition`` at once; ``reclaim`` frees its space later."""
        old = self.slot(partition)
        self._generations[partition] = self._generations.get(partition, 0) + 1
        self._slots.pop(partition, None)
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
            current = self.read(keys.user_key_of(object_key)[1], damaged_as_missing=True)
            kept = set() if current is None else {
                s.chunks.vid for s in current.siblings if s.chunks is not None}
            garbage |= {s.chunks.vid for s in versions.decode_object(raw).siblings
                        if s.chunks is not None} - kept
        return garbage

    def read(self, key: bytes, damaged_as_missing: bool = False) -> versions.VersionedObject | None:
        """The stored object of ``key``, or None when this node holds nothing for it."""
        raw = self.read_encoded(key, damaged_as_missing)
        return None if raw is None else versions.decode_object(raw)

    def read_encoded(self, key: bytes, damaged_as_missing: bool = False) -> bytes | None:
        """The stored encoding of ``key``'s object, sent as it is by a replica read. A
        damaged copy raises Damaged, or reads as missing with ``damaged_as_missing``."""
        try:
            return self.storage.get(keys.object_key(self.slot(self.partition(key)), key),
                                    checked=True)
        except DamagedData as exc:
            if key not in self._damaged and len(self._damaged) < 10_000:
                self._damaged.add(key)
                self.damaged_found += 1
                log.error("the stored copy of key %r is damaged and is not used: %s", key[:64], exc)
            if damaged_as_missing:
                return None
            raise DamagedData(f"this replica's copy of key {key[:64]!r} is damaged ({exc})") from None

    def read_digest(self, key: bytes) -> bytes | None:
        """The digest of ``key``'s stored object (as anti-entropy's: blake2b of its
        encoding), None when this node holds nothing for it; a digest read (kvd.node.reads)."""
        raw = self.read_encoded(key)
        return None if raw is None else hashlib.blake2b(raw, digest_size=8).digest()

    async def coordinate(self, key: bytes, context: versions.VersionVector | None, actor: str,
                         *, value: bytes = b"", deleted: bool = False,
                         chunks: versions.ChunkRef | None = None, timestamp: float = 0.0,
                         wid: bytes = b"") -> versions.VersionedObject:
        """Apply a client write as its coordinating replica: mint a new dot for ``actor``
        (none when the write with id ``wid`` is already here: versions rule 7).

        ``context`` None supersedes the latest object written here, pending included (Rule
        4): a write without a context when this node is the key's only replica
        (kvd.node.coordinator rule 7), with no read before it and no turn to wait for."""
        vids = [] if chunks is None else [chunks.vid]
        if vids:  # (Counter.update of nothing still costs a dozen calls per write)
            self._sealing.update(vids)  # from now on a discard of these bytes is a no-op
        try:
            if chunks is not None:
                await self._seal(chunks)
            lease = self.leases.lease(actor)
            while True:
                latest, old_digest = self._latest_read(key)
                current = latest or versions.empty()
                seen = versions.context_of(current) if context is None else context
                if wid and any(s.wid == wid for s in current.siblings):
                    # Applied before (a coordinator's retry): answer once it is durable.
                    committing = self._pending.get(key)
                    if committing is None:
                        return current
                    await committing.durable.wait()
                    continue
                counter = versions.next_counter(current, seen, actor, lease.next)
                if counter <= lease.limit:
                    break
                if counter > lease.limit + 1:
                    # The context (or a clock merged from one) claims dots of this actor
                    # past anything it leased: forged. Refused before the lease, which all
                    # keys share, could jump (issue 10, hole 2; sealing stops it earlier
                    # whenever the cluster has a secret).
                    raise BadRequest(f"context claims writes of {actor} up to {counter - 1}, "
                                     f"which it never made: a forged context")
                await self.leases.extend(actor, lease, counter)
            # No checkpoint from reading ``current`` to publishing ``updated`` (Rule 4).
            updated, discarded = versions.update(
                current, seen, actor, value=value, deleted=deleted, chunks=chunks,
                timestamp=timestamp, key=key, wid=wid, min_counter=lease.next)
            lease.next = counter + 1
            await self._store(key, updated, discarded, old_digest)
        finally:
            self._unhold(vids)
        if versions.needs_warning(updated):
            log.warning("key %r has %d siblings", key[:64], len(updated.siblings))
        return updated

    def _unhold(self, vids) -> None:
        for vid in vids:
            self._sealing[vid] -= 1
            if not self._sealing[vid]:
                del self._sealing[vid]

    async def merge(
        self, key: bytes, incoming: versions.VersionedObject
    ) -> versions.VersionedObject:
        """Merge an object from another replica (replication, read repair, handoff).

        Returns once the resulting object is durable (Rule 7)."""
        vids = [s.chunks.vid for s in incoming.siblings if s.chunks is not None]
        self._sealing.update(vids)
        try:
            for sibling in incoming.siblings:
                if sibling.chunks is not None:
                    await self._seal(sibling.chunks)
            current, old_digest = self._latest_read(key)
            self._check_dots(key, current, incoming)
            while True:
                if current is None:
                    merged, discarded = incoming, list[versions.Sibling]()
                else:
                    merged, discarded = versions.sync_with_discarded(current, incoming)
                    if merged == current:
                        committing = self._pending.get(key)  # ``current`` when there is one
                        if committing is None:
                            return current  # already durable
                        await committing.durable.wait()
                        # Durable now, unless that commit failed: look again.
                        current, old_digest = self._latest_read(key)
                        continue
                await self._store(key, merged, discarded, old_digest)
                return merged
        finally:
            self._unhold(vids)

    def _check_dots(self, key: bytes, current: versions.VersionedObject | None,
                    incoming: versions.VersionedObject) -> None:
        if current is None:
            return
        collisions = versions.conflicting_dots(current, incoming)
        if collisions:
            self.dot_collisions += len(collisions)
            log.error("key %r: same dot with different values on two replicas %s; keeping one by "
                      "a fixed order (a dot was reused: report this)", key[:64], collisions)

    async def _seal(self, ref: versions.ChunkRef) -> None:
        if not self.blobs.exists(ref.vid):
            raise Unavailable(f"value bytes {ref.vid.hex()} are not on this replica")
        size = await self.blobs.seal(ref.vid)
        if size != ref.length:
            raise Unavailable(f"value bytes {ref.vid.hex()} are incomplete ({size} of {ref.length})")

    def _latest(self, key: bytes) -> versions.VersionedObject | None:
        committing = self._pending.get(key)
        return committing.obj if committing is not None else self.read(key, damaged_as_missing=True)

    def _latest_read(self, key: bytes) -> tuple[versions.VersionedObject | None, bytes | None]:
        """``_latest`` and its indexed digest (Rule 5): no second read (2-3% of a SET's CPU)."""
        committing = self._pending.get(key)
        if committing is not None:
            return committing.obj, committing.digest
        try:
            raw = self.read_encoded(key)
        except Damaged:  # Rule 9: build on nothing; the index has the digest it replaces
            index = keys.index_key(self.slot(self.partition(key)), aae.segment_of(key), key)
            return None, self.storage.get(index)
        if raw is None:
            return None, None
        return versions.decode_object(raw), hashlib.blake2b(raw, digest_size=8).digest()

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

    def _index_ops(self, partition: int, key: bytes, digest: bytes | None,
                   old: bytes | None) -> list:
        """Update the tree for ``key``'s new digest (None: removed) from its ``old`` one
        (``_latest_read``'s); the ops that store it go in the same batch as the object, so
        tree and objects never disagree on disk."""
        segment = aae.segment_of(key)
        slot = self.slot(partition)
        index = keys.index_key(slot, segment, key)
        tree = self.tree(partition)
        tree.update(key, old, digest)
        return [(index, digest),
                (keys.segment_key(slot, segment), tree.segment(segment).to_bytes(8, "big"))]

    def segment_entries(self, partition: int, segment: int) -> dict[bytes, bytes]:
        """{key: digest} of one segment, from the index (a range read)."""
        start, stop = keys.index_range(self.slot(partition), segment)
        return {k[len(start):]: v for k, v in self.storage.iterate(start, stop)}

    async def purge(self, key: bytes, digest: bytes) -> bool:
        """Remove a tombstone confirmed on every replica, if it is still exactly that.

        The key's clock goes with it; Rule 6 keeps the next write's dot new all the same."""
        partition = self.partition(key)
        current, old = self._latest_read(key)
        if current is None or versions.is_found(current):
            return False
        raw = versions.encode_object(current)
        if hashlib.blake2b(raw, digest_size=8).digest() != digest:
            return False
        slot = self.slot(partition)
        ops = [(keys.object_key(slot, key), None)] + self._index_ops(partition, key, None, old)
        ops.append(keys.tombstone_op(slot, key, None))
        await self._commit(key, versions.empty(), None, ops)
        return True

    async def _store(self, key, obj, discarded, old_digest) -> None:
        """Publish ``obj`` as the key's latest object (call with no checkpoint since reading
        the object it derives from), then wait until it is durable."""
        partition = self.partition(key)
        raw = versions.encode_object(obj)
        digest = hashlib.blake2b(raw, digest_size=8).digest()
        slot = self.slot(partition)
        ops = [(keys.object_key(slot, key), raw)] + self._index_ops(partition, key, digest,
                                                                     old_digest)
        dead = bool(obj.siblings) and not versions.is_found(obj)  # tombstone index (Rule 5)
        ops.append(keys.tombstone_op(slot, key, self.wall() if dead else None))
        kept = {s.chunks.vid for s in obj.siblings if s.chunks is not None}
        garbage = {s.chunks.vid for s in discarded if s.chunks is not None} - kept
        ops += [(_ledger_key(vid), None) for vid in kept]
        ops += [(_ledger_key(vid), _GARBAGE + key) for vid in garbage]
        await self._commit(key, obj, digest, ops)
        deletable = self.linger.hold_back(garbage) if garbage else []
        if deletable:
            await self._delete_blobs(deletable)

    async def delete_lingering(self) -> None:
        """Delete the superseded blobs held back for their readers, once due (Rule 8),
        unless a later write named one again (its ledger entry is then no longer garbage)."""
        due = [vid for vid in self.linger.due()
               if (self.storage.get(_ledger_key(vid)) or b"")[:1] == _GARBAGE]
        if due:
            await self._delete_blobs(due)

    async def _commit(self, key, obj, digest, ops) -> None:
        """Write ``ops``; meanwhile ``obj`` (digest) is what later writes of ``key`` build on.

        Uncancellable (Rule 4): once published, the batch lands whatever happens to the
        caller, so ``_pending`` stays until it has; a cancelled caller sees Cancelled
        afterwards."""
        committing = self._pending[key] = _Commit(obj, digest)
        try:
            await self.storage.write(ops, lands=True)
        finally:
            if self._pending.get(key) is committing:
                del self._pending[key]
            committing.durable.set()
        await trio.lowlevel.checkpoint_if_cancelled()

    async def _delete_blobs(self, vids) -> None:
        for vid in vids:
            await self.blobs.delete(vid)
        await self.storage.write([(_ledger_key(vid), None) for vid in vids])

    def has_value_bytes(self, ref: versions.ChunkRef) -> bool:
        """Whether every byte of the chunked value ``ref`` is here, sound (an upload that
        failed part-way leaves a short blob, a disk may rot one: neither is trusted)."""
        return self.blobs.holds(ref.vid, ref.length)

    async def write_chunk(self, key: bytes, vid: bytes, offset: int, data: bytes) -> None:
        """Store bytes of upload ``vid`` at ``offset`` (sealed before its manifest)."""
        named = _names(self._latest(key), vid)
        if named and self.blobs.holds(vid, named.length):
            # A re-send of bytes this replica holds whole, for a manifest it has (Rule 2).
            await trio.lowlevel.checkpoint()
            return
        if not named and offset == 0:
            await self.storage.write([(_ledger_key(vid), _UPLOADING + key)])
        elif not named and not self.blobs.exists(vid):
            # Discarded meanwhile: writing would create a blob no ledger entry covers.
            raise Unavailable(f"upload {vid.hex()} was discarded; its chunks are not wanted")
        await self.blobs.write(vid, offset, data)

    async def discard_upload(self, key: bytes, vid: bytes) -> None:
        """Remove the bytes of an upload that never got its manifest (client went away).

        A no-op when a manifest names the upload after all: a mint that timed out at the
        coordinator may still have landed here (Rule 2)."""
        while True:
            if self._sealing[vid] or _names(self._latest(key), vid):
                await trio.lowlevel.checkpoint()
                return
            committing = self._pending.get(key)
            if committing is None:
                break
            await committing.durable.wait()  # the object on disk may name it until then
        await self._delete_blobs([vid])

    def _has_objects(self) -> bool:
        start, _ = keys.object_range(0)
        return next(iter(self.storage.iterate_keys(start, b"p")), None) is not None

    async def sweep(self) -> int:
        """Delete the blobs a crash left behind (see Rule 3); returns how many.

        Run once at start, before any write."""
        if self.storage.get(SEQUENCES) is None and not self._has_objects():
            await self.storage.write([(SEQUENCES, b"1")])  # a new store: Rule 6 from day one
        start = _ledger_key(b"")
        garbage, live = list[bytes](), list[bytes]()
        for k, mark in self.storage.iterate(start, start + b"\xff"):
            vid = k[len(start):]
            owner = mark[1:]  # the key the blob was uploaded for (empty in older ledgers)
            named = owner and _names(self.read(owner, damaged_as_missing=True), vid)
            (live if named else garbage).append(vid)
        if live:
            await self.storage.write([(_ledger_key(vid), None) for vid in live])
            log.info("kept %d large values still named by their keys", len(live))
        if garbage:
            await self._delete_blobs(garbage)
            log.info("removed %d unfinished or superseded large values", len(garbage))
        return len(garbage)

    async def read_chunks(self, key: bytes, ref: versions.ChunkRef) -> AsyncIterator[bytes]:
        """Yield a stored value in READ_SIZE pieces, one at a time (bounded memory)."""
        for offset in range(0, ref.length, READ_SIZE):
            yield await self.read_piece(key, ref, offset, min(READ_SIZE, ref.length - offset))

    async def read_piece(self, key: bytes, ref: versions.ChunkRef, offset: int,
                         size: int) -> bytes:
        """``size`` bytes of a stored value from ``offset`` (read in a worker thread)."""
        self.linger.read(ref.vid)
        data = await self.blobs.read(ref.vid, offset, size)
        if not data:
            raise Unavailable(
                f"value of key {key[:64]!r} changed while it was being read; read it again"
            )
        return data
