"""MemoryStorage: the Storage interface over a dict and a sorted key list, for fast tests.

It group-commits through the same base logic as LevelDB, so tests see the same batching and
failure behaviour; syncing is a no-op (but is counted, so sync-mode logic is testable). A
commit yields once before applying, like a disk write would, and applies its ops in one step,
so readers never see half a batch.

A ``MemoryDisk`` given to it plays the disk for the simulator (tests/sim): what a synced
commit (or a later sync) wrote survives ``MemoryDisk.crash()`` and is what the next
MemoryStorage on that disk starts from; what was committed without a sync is lost, as
LevelDB loses it when the host dies. Without a disk nothing survives the process.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator

import trio

from kvd.storage.base import DEFAULT_MAX_BATCH_BYTES, Op, Storage


class MemoryStorage(Storage):
    """An in-process ordered keyspace."""

    def __init__(
        self,
        *,
        sync: str = "batch",
        sync_interval: float = 1.0,
        max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES,
        disk: MemoryDisk | None = None,
    ) -> None:
        super().__init__(sync=sync, sync_interval=sync_interval, max_batch_bytes=max_batch_bytes)
        self._disk = disk
        self._incarnation = disk.incarnation if disk is not None else 0
        self._data: dict[bytes, bytes] = dict(disk.synced) if disk is not None else {}
        self._keys: list[bytes] = sorted(self._data)
        self._size = sum(len(k) + len(v) for k, v in self._data.items())
        self._unsynced: list[Op] = []

    def get(self, key: bytes, *, checked: bool = False) -> bytes | None:
        return self._data.get(key)  # memory does not rot

    def _snapshot(self, start: bytes, stop: bytes) -> list[bytes]:
        lo = bisect.bisect_left(self._keys, start)
        hi = bisect.bisect_left(self._keys, stop, lo)
        return self._keys[lo:hi]

    def iterate(self, start: bytes, stop: bytes, *,
                checked: bool = False) -> Iterator[tuple[bytes, bytes]]:
        data = self._data
        return iter([(key, data[key]) for key in self._snapshot(start, stop)])

    def iterate_keys(self, start: bytes, stop: bytes) -> Iterator[bytes]:
        return iter(self._snapshot(start, stop))

    def approximate_size(self) -> int:
        return self._size

    async def _commit(self, ops: list[Op], sync: bool) -> None:
        await trio.lowlevel.checkpoint()
        data, keys = self._data, self._keys
        for key, value in ops:
            old = data.get(key)
            if old is not None:
                self._size -= len(key) + len(old)
            if value is None:
                if old is not None:
                    del data[key]
                    del keys[bisect.bisect_left(keys, key)]
                continue
            if old is None:
                bisect.insort(keys, key)
            data[key] = value
            self._size += len(key) + len(value)
        if self._disk is not None:
            self._unsynced += ops
            if sync:
                self._flush_to_disk()

    def _flush_to_disk(self) -> None:
        assert self._disk is not None
        if self._disk.incarnation != self._incarnation:
            return  # the host crashed: this process's writes reach no disk any more
        synced = self._disk.synced
        for key, value in self._unsynced:
            if value is None:
                synced.pop(key, None)
            else:
                synced[key] = value
        self._unsynced = []

    async def _sync(self) -> None:
        await trio.lowlevel.checkpoint()
        if self._disk is not None:
            self._flush_to_disk()

    async def _close_backend(self) -> None:
        pass


class MemoryDisk:
    """What survives a simulated crash of one node: synced keys and sealed blobs."""

    def __init__(self) -> None:
        self.synced: dict[bytes, bytes] = {}
        self.blobs: dict[bytes, bytes] = {}  # sealed blob bytes, by vid
        self.incarnation = 0  # bumped by a crash: the crashed process writes nothing more

    def crash(self) -> None:
        """The host dies now: what was synced stays, the process that used it writes no more."""
        self.incarnation += 1

    def wipe(self) -> None:
        """Lose everything, as an operator replacing a dead disk does."""
        self.synced.clear()
        self.blobs.clear()
