"""The simulator's disk (issue 9, section 1): a simulated crash keeps what was synced and
loses what was not, for LevelDB's keys and for blob files alike."""

from __future__ import annotations

import trio

from kvd.storage.blobs import MemoryBlobStore
from kvd.storage.memory import MemoryDisk, MemoryStorage


async def test_a_crash_keeps_what_was_synced_and_loses_the_rest():
    disk = MemoryDisk()
    async with trio.open_nursery() as nursery:
        storage = MemoryStorage(sync="periodic", sync_interval=3600.0, disk=disk)
        await nursery.start(storage._run)
        await storage.write([(b"a", b"1"), (b"c", b"3")])
        await storage.flush()  # synced
        await storage.write([(b"b", b"2"), (b"a", None)])  # committed, never synced
        assert (storage.get(b"a"), storage.get(b"b")) == (None, b"2")
        blobs = MemoryBlobStore(disk)
        await blobs.write(b"sealed", 0, b"xyz")
        await blobs.seal(b"sealed")
        await blobs.write(b"open", 0, b"abc")  # an upload not sealed yet
        disk.crash()
        await storage.flush()  # the crashed process goes on a moment: it reaches no disk
        await blobs.seal(b"open")
        nursery.cancel_scope.cancel()
    restarted = MemoryStorage(disk=disk)
    assert [restarted.get(k) for k in (b"a", b"b", b"c")] == [b"1", None, b"3"]
    blobs = MemoryBlobStore(disk)
    assert blobs.exists(b"sealed") and not blobs.exists(b"open")
    assert await blobs.read(b"sealed", 0, 3) == b"xyz"
