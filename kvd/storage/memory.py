"""MemoryStorage: the Storage interface over a dict and a sorted key list, for fast tests.

It group-commits through the same base logic as LevelDB, so tests see the same batching and
failure behaviour; syncing is a no-op (but is counted, so sync-mode logic is testable). A
commit yields once before applying, like a disk write would, and applies its ops in one step,
so readers never see half a batch. Nothing survives the process.
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
    ) -> None:
        super().__init__(sync=sync, sync_interval=sync_interval, max_batch_bytes=max_batch_bytes)
        self._data: dict[bytes, bytes] = {}
        self._keys: list[bytes] = []  # sorted
        self._size = 0

    def get(self, key: bytes) -> bytes | None:
        return self._data.get(key)

    def _snapshot(self, start: bytes, stop: bytes) -> list[bytes]:
        lo = bisect.bisect_left(self._keys, start)
        hi = bisect.bisect_left(self._keys, stop, lo)
        return self._keys[lo:hi]

    def iterate(self, start: bytes, stop: bytes) -> Iterator[tuple[bytes, bytes]]:
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

    async def _sync(self) -> None:
        await trio.lowlevel.checkpoint()

    async def _close_backend(self) -> None:
        pass
