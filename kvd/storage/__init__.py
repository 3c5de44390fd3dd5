"""Storage: one ordered byte keyspace per node, with atomic group-committed writes.

``open_storage(path)`` opens LevelDB in ``path`` (``kvd.storage.leveldb``, the only plyvel
importer) or, for ``path=None``, an in-memory store for tests (``kvd.storage.memory``); both
share the interface and group commit of ``kvd.storage.base``. ``kvd.storage.keys`` lays out
the keyspace and is pure.

Importing this package imports neither trio nor plyvel (the pure core imports ``keys``
through it): the rest is loaded on first use.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from kvd.storage import keys

if TYPE_CHECKING:
    from kvd.storage.base import Storage, StorageError, StorageStatistics
    from kvd.storage.leveldb import LevelDBStorage
    from kvd.storage.memory import MemoryStorage

__all__ = [
    "LevelDBStorage",
    "MemoryStorage",
    "Storage",
    "StorageError",
    "StorageStatistics",
    "keys",
    "open_storage",
]

_LAZY = {
    "Storage": "kvd.storage.base",
    "StorageError": "kvd.storage.base",
    "StorageStatistics": "kvd.storage.base",
    "MemoryStorage": "kvd.storage.memory",
    "LevelDBStorage": "kvd.storage.leveldb",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)


@asynccontextmanager
async def open_storage(
    path: str | None,
    sync: str = "batch",
    sync_interval: float = 1.0,
    cache_mb: int = 64,
    *,
    max_batch_bytes: int | None = None,
    disk: Any = None,
) -> AsyncIterator[Storage]:
    """Open the store in ``path`` (None: in memory) and run its committer until exit.

    On exit, queued writes are committed and synced and the store is closed, even if the
    block was cancelled. Raises ConfigError for bad options or a data dir that is locked by
    another process or not writable.
    """
    import trio

    from kvd.storage.base import DEFAULT_MAX_BATCH_BYTES, check_options

    if max_batch_bytes is None:
        max_batch_bytes = DEFAULT_MAX_BATCH_BYTES
    check_options(sync, sync_interval, max_batch_bytes)
    storage: Storage
    if path is None:
        from kvd.storage.memory import MemoryStorage

        storage = MemoryStorage(
            sync=sync, sync_interval=sync_interval, max_batch_bytes=max_batch_bytes, disk=disk
        )
    else:
        from kvd.storage.leveldb import LevelDBStorage

        storage = await LevelDBStorage.open(
            path,
            sync=sync,
            sync_interval=sync_interval,
            cache_mb=cache_mb,
            max_batch_bytes=max_batch_bytes,
        )
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(storage._run)
            try:
                yield storage
            finally:
                with trio.CancelScope(shield=True):
                    await storage.aclose()
    finally:
        # Also when the committer never started; aclose is idempotent.
        with trio.CancelScope(shield=True):
            await storage.aclose()
