"""The local replica store: large-value blobs are never orphaned, writes never lose each other."""

import hashlib
import logging
import os
from contextlib import asynccontextmanager

import pytest
import trio
from trio.testing import wait_all_tasks_blocked

from kvd import versions
from kvd.errors import Unavailable
from kvd.node.local import LocalStore, new_vid
from kvd.storage import open_storage
from kvd.storage.blobs import BlobStore, MemoryBlobStore
from kvd.storage.memory import MemoryStorage


async def _upload(store, key, data: bytes):
    vid = new_vid()
    for offset in range(0, len(data), 4):
        await store.write_chunk(key, vid, offset, data[offset : offset + 4])
    return versions.ChunkRef(vid=vid, length=len(data), count=(len(data) + 3) // 4)


async def test_superseded_blob_is_deleted(tmp_path):
    async with open_storage(str(tmp_path / "db")) as storage:
        blobs = BlobStore(tmp_path / "blobs")
        store = LocalStore(storage, blobs, 64)
        first = await _upload(store, b"k", b"0123456789")
        obj = await store.coordinate(b"k", {}, "a:1", chunks=first)
        second = await _upload(store, b"k", b"abcdefgh")
        obj = await store.coordinate(b"k", obj.clock, "a:1", chunks=second)
        assert [s.chunks.vid for s in obj.siblings] == [second.vid]
        assert not blobs.exists(first.vid) and blobs.exists(second.vid)
        assert await store.sweep() == 0  # nothing left in the ledger


async def test_a_value_being_read_survives_its_overwrite_until_its_readers_are_done(tmp_path):
    """A GET streams a large value piece by piece (here, or for a peer asking piece after
    piece); an overwrite meanwhile must not delete the bytes under it (the RESP tester saw
    reads of 5 MB values cut off while they were overwritten). The superseded blob goes once
    nobody has read it for LINGER seconds, and a crash meanwhile leaves no orphan.

    The linger's clock is the test's own: real LevelDB and blob files work in threads, and
    trio's autojump clock would leap past LINGER while a slow host ran them (CI saw it)."""
    from kvd.node.blob_linger import LINGER

    now = [0.0]
    async with open_storage(str(tmp_path / "db")) as storage:
        blobs = BlobStore(tmp_path / "blobs")
        store = LocalStore(storage, blobs, 64)
        store.linger.clock = lambda: now[0]
        first = await _upload(store, b"k", b"0123456789")
        obj = await store.coordinate(b"k", {}, "a:1", chunks=first)
        assert await store.read_piece(b"k", first, 0, 4) == b"0123"
        second = await _upload(store, b"k", b"abcdefgh")
        await store.coordinate(b"k", obj.clock, "a:1", chunks=second)
        now[0] += LINGER / 2
        assert await store.read_piece(b"k", first, 4, 4) == b"4567"  # the reader goes on
        now[0] += LINGER / 2
        await store.delete_lingering()
        assert blobs.exists(first.vid), "read LINGER / 2 ago: still being read"
        assert await store.read_piece(b"k", first, 8, 2) == b"89"
        now[0] += LINGER
        await store.delete_lingering()
        assert not blobs.exists(first.vid) and blobs.exists(second.vid)
        assert await store.sweep() == 0
        # A crash while a superseded blob lingers: the start's sweep deletes it.
        third = await _upload(store, b"k", b"ABCD")
        obj = store.read(b"k")
        await store.read_piece(b"k", second, 0, 4)
        await store.coordinate(b"k", obj.clock, "a:1", chunks=third)
        assert blobs.exists(second.vid)
    async with open_storage(str(tmp_path / "db")) as storage:
        store = LocalStore(storage, BlobStore(tmp_path / "blobs"), 64)
        assert await store.sweep() == 1
        assert not blobs.exists(second.vid) and blobs.exists(third.vid)


async def test_sweep_removes_blobs_of_uploads_cut_short(tmp_path):
    async with open_storage(str(tmp_path / "db")) as storage:
        blobs = BlobStore(tmp_path / "blobs")
        store = LocalStore(storage, blobs, 64)
        unfinished = new_vid()
        await store.write_chunk(b"k", unfinished, 0, b"partial")
        finished = await _upload(store, b"k2", b"complete")
        await store.coordinate(b"k2", {}, "a:1", chunks=finished)
    # "Restart": a new store over the same files, as after a crash mid-upload.
    async with open_storage(str(tmp_path / "db")) as storage:
        store = LocalStore(storage, BlobStore(tmp_path / "blobs"), 64)
        assert await store.sweep() == 1
        assert not blobs.exists(unfinished)
        assert blobs.exists(finished.vid)


async def test_concurrent_writes_to_one_key_all_survive():
    async with open_storage(None) as storage:
        store = LocalStore(storage, None, 64)
        async with trio.open_nursery() as nursery:
            for i in range(50):
                nursery.start_soon(lambda i=i: store.coordinate(b"hot", {}, "a:1", value=b"%d" % i))
        obj = store.read(b"hot")
        assert sorted(s.value for s in obj.siblings) == sorted(b"%d" % i for i in range(50))


# --- issue 9 section 4: data-loss bugs of the replica store ----------------------------------


class SlowDisk(MemoryStorage):
    """A MemoryStorage that, once slowed down, commits a batch only when the test lets one
    through (a disk busy with someone else's fsync)."""

    def __init__(self):
        super().__init__()
        self.permits = trio.Semaphore(0)
        self.slow = False

    async def _commit(self, ops, sync):
        if self.slow:
            await self.permits.acquire()
        await super()._commit(ops, sync)

    def slow_down(self):
        self.slow = True

    def speed_up(self):
        self.slow = False
        self.permits.release()

    async def let_one_batch_through(self):
        self.permits.release()
        await wait_all_tasks_blocked()


@asynccontextmanager
async def slow_disk():
    storage = SlowDisk()
    async with trio.open_nursery() as nursery:
        await nursery.start(storage._run)
        try:
            yield storage
        finally:
            storage.speed_up()
            await storage.aclose()


def _values(obj):
    return sorted(s.value for s in obj.siblings if not s.deleted)


async def test_a_cancelled_write_never_gives_its_dot_to_the_next_write():
    """Bug 1: a write cancelled while its batch is queued still lands; the next write must
    not mint the same dot with another value (the same-dot tie-break would then pick one)."""
    async with slow_disk() as disk, open_storage(None) as other_disk:
        store = LocalStore(disk, None, 64)
        other = LocalStore(other_disk, None, 64)
        await store.coordinate(b"other key", {}, "a:1", value=b"")  # a node already running
        disk.slow_down()
        async with trio.open_nursery() as nursery:
            cancelled = trio.CancelScope()

            async def cancelled_write():
                with cancelled:
                    await store.coordinate(b"k", {}, "a:1", value=b"zzz cancelled")

            acked = []

            async def acknowledged_write():
                acked.append(await store.coordinate(b"k", {}, "a:1", value=b"aaa acked"))

            nursery.start_soon(cancelled_write)
            await wait_all_tasks_blocked()  # its ops are queued, the disk is slow
            cancelled.cancel()
            await wait_all_tasks_blocked()
            nursery.start_soon(acknowledged_write)
            await wait_all_tasks_blocked()
            await disk.let_one_batch_through()  # the cancelled write lands after all...
            landed = store.read(b"k")
            await other.merge(b"k", landed)  # ...and a read repair copies it elsewhere
            await disk.let_one_batch_through()
        disk.speed_up()
        assert acked, "the second write was acknowledged"
        await other.merge(b"k", acked[0])
        await store.merge(b"k", other.read(b"k"))
        assert b"aaa acked" in _values(other.read(b"k"))
        assert store.read(b"k") == other.read(b"k")
        # The hash trees agree once the objects do (no stale digest left in memory).
        partition = store.partition(b"k")
        assert store.tree(partition).root() == other.tree(partition).root()
        restarted = LocalStore(disk, None, 64)  # the tree as stored on disk agrees too
        assert restarted.tree(partition).root() == other.tree(partition).root()


async def test_a_cancelled_merge_is_not_overwritten_by_the_next_write():
    """Bug 1, merge side: a merge cancelled while queued still lands; a write that follows
    builds on it instead of on the older object on disk (else it drops what was merged)."""
    async with slow_disk() as disk:
        store = LocalStore(disk, None, 64)
        incoming = versions.update(versions.empty(), {}, "b:1", value=b"from b")[0]
        await store.coordinate(b"other key", {}, "a:1", value=b"")  # a node already running
        disk.slow_down()
        async with trio.open_nursery() as nursery:
            cancelled = trio.CancelScope()

            async def cancelled_merge():
                with cancelled:
                    await store.merge(b"k", incoming)

            nursery.start_soon(cancelled_merge)
            await wait_all_tasks_blocked()
            cancelled.cancel()
            await wait_all_tasks_blocked()
            nursery.start_soon(lambda: store.coordinate(b"k", {}, "a:1", value=b"from a"))
            await wait_all_tasks_blocked()
            await disk.let_one_batch_through()
            await disk.let_one_batch_through()
        assert _values(store.read(b"k")) == [b"from a", b"from b"]


async def test_same_dot_with_different_values_is_loud_and_deterministic(caplog):
    """Bug 1: should two objects ever carry one dot with different values, the merge logs
    an error, counts it, and both replicas still pick the same sibling."""
    one = versions.update(versions.empty(), {}, "a:1", value=b"one")[0]
    two = versions.update(versions.empty(), {}, "a:1", value=b"two")[0]
    async with open_storage(None) as s1, open_storage(None) as s2:
        first, second = LocalStore(s1, None, 64), LocalStore(s2, None, 64)
        await first.merge(b"k", one)
        await second.merge(b"k", two)
        with caplog.at_level(logging.ERROR, logger="kvd.local"):
            await first.merge(b"k", two)
            await second.merge(b"k", one)
        assert first.read(b"k") == second.read(b"k")
        assert first.dot_collisions == 1 and second.dot_collisions == 1
        assert "same dot" in caplog.text


async def _write_then_purge(store, other, key):
    """Write, delete, replicate the tombstone to ``other``, then purge it on ``store`` only
    (``other`` keeps an older copy, as a replica or a hint the purge never reached does)."""
    obj = await store.coordinate(key, {}, "a:1", value=b"old")
    obj = await store.coordinate(key, obj.clock, "a:1", value=b"old 2")
    tomb = await store.coordinate(key, obj.clock, "a:1", deleted=True)
    await other.merge(key, tomb)
    digest = hashlib.blake2b(versions.encode_object(tomb), digest_size=8).digest()
    assert await store.purge(key, digest)
    assert store.read(key) is None


async def test_a_write_after_a_purge_survives_an_older_copy():
    """Bug 2 (kv679): after a purge the minting replica must not restart the key's counter,
    or a surviving older copy covers the new dot and drops the new write."""
    async with open_storage(None) as s1, open_storage(None) as s2:
        store, other = LocalStore(s1, None, 64), LocalStore(s2, None, 64)
        await _write_then_purge(store, other, b"k")
        new = await store.coordinate(b"k", {}, "a:1", value=b"new")
        await other.merge(b"k", new)
        await store.merge(b"k", other.read(b"k"))
        assert b"new" in _values(other.read(b"k"))
        assert store.read(b"k") == other.read(b"k")


async def test_a_write_after_a_purge_and_a_restart_survives_an_older_copy(tmp_path):
    """Bug 2 across a restart: the counter continues above everything minted before it."""
    async with open_storage(None) as s2:
        other = LocalStore(s2, None, 64)
        async with open_storage(str(tmp_path / "db")) as s1:
            await _write_then_purge(LocalStore(s1, None, 64), other, b"k")
        async with open_storage(str(tmp_path / "db")) as s1:
            store = LocalStore(s1, None, 64)
            new = await store.coordinate(b"k", {}, "a:1", value=b"new")
            await other.merge(b"k", new)
            await store.merge(b"k", other.read(b"k"))
            assert b"new" in _values(other.read(b"k"))
            assert b"new" in _values(store.read(b"k"))


async def test_dots_never_repeat_across_keys_and_restarts(tmp_path):
    """Bug 2: every dot an actor mints is new, whatever the key and however often we restart."""
    seen = set()
    for _ in range(3):
        async with open_storage(str(tmp_path / "db")) as storage:
            store = LocalStore(storage, None, 64)
            for i in range(5):
                obj = await store.coordinate(b"k%d" % (i % 2), {}, "a:1", value=b"v")
                dot = max(s.dot for s in obj.siblings)
                assert dot not in seen
                seen.add(dot)


async def test_merge_of_an_object_still_committing_returns_once_it_is_durable():
    """Bug 3: a merge of an object equal to one still being committed must not return (and
    let the coordinator ack or a hint be deleted) before that object is on disk."""
    obj = versions.update(versions.empty(), {}, "b:1", value=b"v")[0]
    async with slow_disk() as disk:
        store = LocalStore(disk, None, 64)
        disk.slow_down()
        on_disk_when_acked = []

        async def replicate():
            await store.merge(b"k", obj)
            on_disk_when_acked.append(store.read(b"k"))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(replicate)  # e.g. the coordinator's replication
            await wait_all_tasks_blocked()
            nursery.start_soon(replicate)  # e.g. a hint delivery of the same version
            await wait_all_tasks_blocked()
            await disk.let_one_batch_through()
            await disk.let_one_batch_through()
        assert on_disk_when_acked == [obj, obj]


async def test_a_blob_sent_again_survives_a_restart(tmp_path):
    """Bug 4: anti-entropy re-sends a blob this replica already holds; the next start's
    sweep must not delete a blob that a stored manifest names."""
    async with open_storage(str(tmp_path / "db")) as storage:
        store = LocalStore(storage, BlobStore(tmp_path / "blobs"), 64)
        ref = await _upload(store, b"k", b"0123456789")
        obj = await store.coordinate(b"k", {}, "a:1", chunks=ref)
        for offset in range(0, 10, 4):  # the re-send, then the merge of the same object
            await store.write_chunk(b"k", ref.vid, offset, b"0123456789"[offset : offset + 4])
        await store.merge(b"k", obj)
        ref2 = await _upload(store, b"k2", b"abcdefgh")
        obj2 = await store.coordinate(b"k2", {}, "a:1", chunks=ref2)
        await store.write_chunk(b"k2", ref2.vid, 0, b"abcd")  # a re-send cut short
    async with open_storage(str(tmp_path / "db")) as storage:
        store = LocalStore(storage, BlobStore(tmp_path / "blobs"), 64)
        await store.sweep()
        for key, ref, data in ((b"k", ref, b"0123456789"), (b"k2", ref2, b"abcdefgh")):
            got = [c async for c in store.read_chunks(key, store.read(key).siblings[0].chunks)]
            assert b"".join(got) == data
    assert obj2.siblings[0].chunks == ref2


async def test_a_discard_after_the_manifest_landed_keeps_the_bytes():
    """Bug 5: a mint that timed out but landed is followed by a discard of the same upload;
    the discard must not delete bytes a manifest names."""
    async with open_storage(None) as storage:
        store = LocalStore(storage, MemoryBlobStore(), 64)
        ref = await _upload(store, b"k", b"0123456789")
        await store.coordinate(b"k", {}, "a:1", chunks=ref)
        sibling = await store.coordinate(b"k", {}, "a:1", value=b"inline")  # acknowledged
        await store.discard_upload(b"k", ref.vid)
        obj = store.read(b"k")
        assert obj == sibling
        chunked = [s for s in obj.siblings if s.chunks is not None]
        got = [c async for c in store.read_chunks(b"k", chunked[0].chunks)]
        assert b"".join(got) == b"0123456789"
        # A discard of an upload no manifest names still removes its bytes.
        orphan = await _upload(store, b"k", b"never used")
        await store.discard_upload(b"k", orphan.vid)
        assert not store.blobs.exists(orphan.vid)
        assert await store.sweep() == 0


async def test_a_discard_during_the_mint_keeps_the_bytes():
    """Bug 5, racing: the discard arrives while the mint is sealing the blob."""
    class SlowSeal(MemoryBlobStore):
        def __init__(self):
            super().__init__()
            self.sealing = trio.Event()
            self.go = trio.Event()

        async def seal(self, vid):
            self.sealing.set()
            await self.go.wait()
            return await super().seal(vid)

    async with open_storage(None) as storage:
        blobs = SlowSeal()
        store = LocalStore(storage, blobs, 64)
        ref = await _upload(store, b"k", b"0123456789")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: store.coordinate(b"k", {}, "a:1", chunks=ref))
            await blobs.sealing.wait()
            nursery.start_soon(store.discard_upload, b"k", ref.vid)
            await wait_all_tasks_blocked()
            blobs.go.set()
        obj = store.read(b"k")
        got = [c async for c in store.read_chunks(b"k", obj.siblings[0].chunks)]
        assert b"".join(got) == b"0123456789"


async def test_blob_directory_entries_are_fsynced(tmp_path, monkeypatch):
    """Bug 6: a blob's directory entry is durable before its manifest is written, and a
    deletion is durable before the ledger forgets the blob."""
    synced = []
    real_fsync = os.fsync

    def recording_fsync(fd):
        st = os.fstat(fd)
        synced.append((st.st_dev, st.st_ino))
        real_fsync(fd)

    def ident(path):
        st = os.stat(path)
        return (st.st_dev, st.st_ino)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    async with open_storage(str(tmp_path / "db")) as storage:
        blobs = BlobStore(tmp_path / "blobs")
        store = LocalStore(storage, blobs, 64)
        synced.clear()
        ref = await _upload(store, b"k", b"0123456789")
        subdir = blobs._path(ref.vid).parent
        obj = await store.coordinate(b"k", {}, "a:1", chunks=ref)
        assert ident(subdir) in synced  # the new file's name
        assert ident(blobs.root) in synced  # the new subdirectory's name
        synced.clear()
        await store.coordinate(b"k", obj.clock, "a:1", value=b"small now")
        assert not blobs.exists(ref.vid)
        assert ident(subdir) in synced  # the unlink


async def test_a_store_written_before_dot_sequences_still_mints_new_dots():
    """Bug 2, upgrade: a store that holds objects but no counter lease may have minted per-key
    counters for keys since purged; its first sequence starts above any of them."""
    old_tomb = versions.update(versions.empty(), {"a:1": 6}, "a:1", deleted=True)[0]
    async with open_storage(None) as s1, open_storage(None) as s2:
        store, other = LocalStore(s1, None, 64), LocalStore(s2, None, 64)
        await other.merge(b"k", old_tomb)  # a copy of a key this store has since purged
        await store.merge(b"another", versions.update(versions.empty(), {}, "b:1")[0])
        new = await store.coordinate(b"k", {}, "a:1", value=b"new")
        await other.merge(b"k", new)
        assert b"new" in _values(other.read(b"k"))


async def test_a_cancelled_purge_keeps_the_tree_in_step_with_the_objects():
    """Bug 1, purge side: a purge cancelled while queued still lands; a write that follows
    builds on the purged (empty) key, and the hash tree matches a replica holding the same."""
    async with slow_disk() as disk, open_storage(None) as other_disk:
        store, other = LocalStore(disk, None, 64), LocalStore(other_disk, None, 64)
        tomb = versions.update(versions.empty(), {}, "b:1", deleted=True)[0]
        await store.merge(b"k", tomb)
        await store.coordinate(b"other key", {}, "a:1", value=b"")  # a node already running
        digest = hashlib.blake2b(versions.encode_object(tomb), digest_size=8).digest()
        disk.slow_down()
        async with trio.open_nursery() as nursery:
            cancelled = trio.CancelScope()

            async def cancelled_purge():
                with cancelled:
                    await store.purge(b"k", digest)

            nursery.start_soon(cancelled_purge)
            await wait_all_tasks_blocked()
            cancelled.cancel()
            await wait_all_tasks_blocked()
            nursery.start_soon(lambda: store.coordinate(b"k", {}, "a:1", value=b"new"))
            await wait_all_tasks_blocked()
            await disk.let_one_batch_through()
            await disk.let_one_batch_through()
        disk.speed_up()
        await other.merge(b"k", store.read(b"k"))
        await other.merge(b"other key", store.read(b"other key"))
        assert _values(store.read(b"k")) == [b"new"]
        partition = store.partition(b"k")
        assert store.read(b"k") == other.read(b"k")
        assert store.tree(partition).root() == other.tree(partition).root()


async def test_a_chunk_arriving_after_its_upload_was_discarded_leaves_no_orphan(tmp_path):
    """A chunk write still in flight when the coordinator discarded the upload must not
    recreate the blob behind the ledger's back (no ledger entry: never collected)."""
    async with open_storage(str(tmp_path / "db")) as storage:
        blobs = BlobStore(tmp_path / "blobs")
        store = LocalStore(storage, blobs, 64)
        vid = new_vid()
        await store.write_chunk(b"k", vid, 0, b"0123")
        await store.discard_upload(b"k", vid)
        with pytest.raises(Unavailable):
            await store.write_chunk(b"k", vid, 4, b"4567")  # the late one
        assert not blobs.exists(vid)


async def test_a_dropped_partition_vanishes_at_once_and_is_reclaimed(tmp_path):
    """Bug 3: dropping a partition is one small write; its objects, tree and blobs are gone
    from every read at once, a later write starts from nothing, and reclaim frees the old
    keys (and blobs) in bounded steps, keeping a blob a refetched copy names again."""
    async with open_storage(str(tmp_path / "db")) as storage:
        blobs = BlobStore(tmp_path / "blobs")
        store = LocalStore(storage, blobs, 64)
        p = store.partition(b"k")
        same = [k for k in (f"x{i}".encode() for i in range(2000)) if store.partition(k) == p][:20]
        for key in same:
            await store.coordinate(key, {}, "a:1", value=b"old")
        ref = await _upload(store, b"k", b"0123456789")
        kept = await store.coordinate(b"k", {}, "a:1", chunks=ref)
        gone = await _upload(store, same[0], b"abcdefgh")
        await store.coordinate(same[0], {}, "a:1", chunks=gone)
        assert store.holds(p) and store.tree(p).root() != 0
        await store.drop_partition(p)
        assert not store.holds(p) and store.tree(p).root() == 0
        assert all(store.read(k) is None for k in same + [b"k"])
        assert store.segment_entries(p, 0) == {}
        # Refetched while the old generation is reclaimed: its blob is shared, so kept.
        await store.merge(b"k", kept)
        assert store.reclaimable() != []
        steps = 0
        for slot in store.reclaimable():
            while await store.reclaim(slot, 5):
                steps += 1
        assert steps >= 4 and store.reclaimable() == []
        assert store.read(b"k") == kept and blobs.exists(ref.vid)
        assert not blobs.exists(gone.vid) and await store.sweep() == 0
        assert sum(1 for _ in storage.iterate_keys(b"o", b"p")) == 1
    async with open_storage(str(tmp_path / "db")) as storage:  # generations survive a restart
        store = LocalStore(storage, BlobStore(tmp_path / "blobs"), 64)
        assert store.read(b"k") == kept and all(store.read(k) is None for k in same)


async def test_tree_and_index_match_the_stored_objects_after_overwrites_merges_and_purges():
    """Rule 5 with the old digest taken from the bytes the write read (no index read): the
    index holds each stored object's digest and the tree equals one built from scratch."""
    from kvd import aae
    from kvd.storage import keys

    async with open_storage(None) as disk:
        store = LocalStore(disk, None, 4)
        names = [b"k%d" % i for i in range(12)]
        async with trio.open_nursery() as nursery:  # concurrent: some build on pending ones
            for round_ in range(3):
                for key in names:
                    nursery.start_soon(lambda k=key, r=round_: store.coordinate(
                        k, None, "a:1", value=b"v%d" % r))
        tomb = versions.update(versions.empty(), {}, "b:1", deleted=True)[0]
        for key in names[:4]:
            await store.merge(key, store.read(key))  # nothing new
            await store.coordinate(key, None, "a:1", deleted=True)
        await store.merge(b"k0", tomb)
        for key in names[:3]:
            current = store.read(key)
            raw = versions.encode_object(current)
            assert await store.purge(key, hashlib.blake2b(raw, digest_size=8).digest())
        await store.coordinate(b"k1", None, "a:1", value=b"back")
        for partition in range(4):
            rebuilt = aae.Tree()
            for key in names:
                if store.partition(key) != partition:
                    continue
                raw = disk.get(keys.object_key(store.slot(partition), key))
                index = disk.get(keys.index_key(store.slot(partition), aae.segment_of(key), key))
                digest = None if raw is None else hashlib.blake2b(raw, digest_size=8).digest()
                assert index == digest, key
                rebuilt.update(key, None, digest)
            assert store.tree(partition).root() == rebuilt.root()
