"""The local replica store: large-value blobs are never orphaned, writes never lose each other."""

import trio

from kvd import versions
from kvd.node.local import LocalStore, new_vid
from kvd.storage import open_storage
from kvd.storage.blobs import BlobStore


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
        chunks = [c async for c in store.read_chunks(b"k", obj.siblings[0].chunks)]
        assert b"".join(chunks) == b"0123456789"
        second = await _upload(store, b"k", b"abcdefgh")
        obj = await store.coordinate(b"k", obj.clock, "a:1", chunks=second)
        assert [s.chunks.vid for s in obj.siblings] == [second.vid]
        assert not blobs.exists(first.vid) and blobs.exists(second.vid)
        assert await store.sweep() == 0  # nothing left in the ledger


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
