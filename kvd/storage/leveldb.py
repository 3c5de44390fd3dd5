"""LevelDBStorage: the Storage interface on LevelDB. The only module in kvd that imports plyvel.

Invariants:

1. Every write goes through the base group commit as one ``WriteBatch``, built and written on
   the store's committer thread (kvd/storage/committer.py), so the trio loop never blocks on
   the disk. Commits are never abandoned: a cancelled caller still waits for the thread.
2. Reads (``get``, iteration over a snapshot) run on the caller's thread: they are served
   from the memtable, the block cache or the page cache in microseconds.
3. Opening never leaves a half-open store: it either returns a usable store or raises a
   one-line ConfigError/StorageError naming the data dir. The directory is locked
   (flock) for as long as the store is open: LevelDB's LOCK file alone let a second kvd in
   once it was deleted, and the two lost each other's writes. A directory holding tables
   but no CURRENT file is refused, not opened as a new store (which deletes the tables).
4. After a write fails (a full disk, an I/O error), every later write is refused until the
   store is opened again (kvd restarts); reads go on. LevelDB keeps appending to its log
   after an append failed, and at the next open it drops, silently, what was appended
   after the torn record: every write acknowledged after the disk was freed was lost
   (tests/test_disk_full.py). Opening again starts a new log.
5. A ``checked`` read (an object's: kvd.node.local Rule 9) checks the bytes it reads
   against LevelDB's block checksums: a block that rotted on disk raises DamagedData
   (tests/test_damaged_storage.py) instead of serving wrong bytes, which read repair had
   merged into the healthy replicas. So are the scans whose records leave the node (a
   transfer's pages, hint deliveries) and ``kvctl repair --verify``'s: ``Storage.
   iterate_sound`` names a damaged record and goes on past it, and steps over a block too
   damaged to list its keys (a compressed block: one bad byte makes all of it unreadable).
   Other reads are not checked: a node's own records sharing a
   block with a rotted value still read (it starts), and anti-entropy's scans of its
   index only compare digests. Only checked reads fill the block cache, since LevelDB
   does not check a block it serves from its cache.

6. What LevelDB drops of a damaged write-ahead log when it opens (a checksum that fails in
   the middle of the log: it drops the rest of that block) is logged at ERROR. A crash's
   torn last record is no damage: LevelDB reads it as the end of the log, silently.

Options, and why: ``write_buffer_size`` 8 MiB (fewer, larger level-0 files than the 4 MiB
default at the cost of 8 MiB of memtable); ``max_file_size`` 32 MiB (a 10 TB node would
otherwise hold five million 2 MiB tables); ``max_open_files`` half the process's descriptor
limit, capped (the other half is for connections); bloom filters of 10 bits per key (point
reads of absent keys skip the disk); the block cache is ``cache_mb`` (leave the rest of RAM
to the OS page cache); snappy compression (cheap, and skipped by LevelDB on blocks that do
not shrink).
"""

from __future__ import annotations

import fcntl
import logging
import os
import resource
from collections.abc import Iterator

import plyvel
import trio

from kvd.clocks import REAL
from kvd.errors import ConfigError
from kvd.storage.base import DEFAULT_MAX_BATCH_BYTES, DamagedData, Op, Storage, StorageError
from kvd.storage.committer import CommitterThread

log = logging.getLogger("kvd.storage")

MIB = 1024 * 1024
WRITE_BUFFER_SIZE = 8 * MIB
MAX_FILE_SIZE = 32 * MIB
BLOOM_FILTER_BITS = 10
MAX_OPEN_FILES_CAP = 10_000
# approximate_size() is for `kvctl status`: a few seconds stale is fine, a directory walk on
# every call is not.
_clock = REAL.monotonic  # LevelDB never runs in the simulator; the daemon's clock
SIZE_REFRESH_SECONDS = 10.0


def _max_open_files() -> int:
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return MAX_OPEN_FILES_CAP
    return max(64, min(MAX_OPEN_FILES_CAP, soft // 2))


def _dir_size(path: str) -> int:
    total = 0
    with os.scandir(path) as entries:
        for entry in entries:
            try:
                if entry.is_file(follow_symlinks=False):
                    total += entry.stat(follow_symlinks=False).st_size
            except FileNotFoundError:  # compaction removed it meanwhile
                pass
    return total


def _message(exc: BaseException) -> str:
    arg = exc.args[0] if exc.args else exc
    return arg.decode("utf-8", "replace") if isinstance(arg, bytes) else str(arg)


def _open_db(path: str, cache_mb: int) -> tuple[plyvel.DB, int, int]:
    """Open (creating if needed) the LevelDB in ``path``, and lock the directory (Rule 3);
    runs in a worker thread. Returns the store, its size and the lock's descriptor."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"data dir {path} cannot be created: {exc.strerror}") from None
    if not os.path.isdir(path):
        raise ConfigError(f"data dir {path} is not a directory")
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"data dir {path} is not writable")
    lock = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        _refuse_lost_current(path)
        db, size = _open_locked(path, cache_mb)
    except BlockingIOError:
        os.close(lock)
        raise ConfigError(f"data dir {path} is in use by another kvd process") from None
    except BaseException:
        os.close(lock)
        raise
    return db, size, lock


def _refuse_lost_current(path: str) -> None:
    """LevelDB opens a directory without its CURRENT file as a new store and deletes the
    old one's tables (create_if_missing): refuse instead, naming the fix (Rule 3)."""
    names = os.listdir(path)
    manifests = sorted(n for n in names if n.startswith("MANIFEST-"))  # zero-padded numbers
    if "CURRENT" in names or not (manifests or any(n.endswith(".ldb") for n in names)):
        return
    newest = manifests[-1] if manifests else "MANIFEST-NNNNNN"
    raise StorageError(
        f"data dir {path} holds LevelDB tables but no CURRENT file, so it was not opened "
        f"(LevelDB would have started an empty store and deleted them): if CURRENT was "
        f"lost, `echo {newest} > {path}/CURRENT` brings it back; to start this node afresh "
        "instead, empty the directory (it then fetches its data from the other replicas)")


def _open_locked(path: str, cache_mb: int) -> tuple[plyvel.DB, int]:
    try:
        db = plyvel.DB(
            path,
            create_if_missing=True,
            write_buffer_size=WRITE_BUFFER_SIZE,
            max_file_size=MAX_FILE_SIZE,
            max_open_files=_max_open_files(),
            lru_cache_size=cache_mb * MIB,
            bloom_filter_bits=BLOOM_FILTER_BITS,
            compression="snappy",
        )
    except plyvel.Error as exc:
        message = _message(exc)
        if "lock " in message and (
            "already held" in message or "temporarily unavailable" in message
        ):
            raise ConfigError(f"data dir {path} is in use by another kvd process") from None
        if "Permission denied" in message or "Read-only file system" in message:
            raise ConfigError(f"data dir {path} is not writable: {message}") from None
        raise StorageError(f"cannot open data dir {path}: {message}") from None
    try:
        size = _dir_size(path)
    except OSError:
        size = 0
    return db, size


def _dropped_log(path: str) -> bool:
    """Rule 6: what LevelDB dropped of a damaged write-ahead log at this open, at ERROR (it
    says so only in its own LOG file, which the next open replaces); whether it dropped any."""
    try:
        with open(os.path.join(path, "LOG"), errors="replace") as info:
            dropped = [line.split(" ", 2)[-1].strip() for line in info if "dropping" in line]
    except OSError:
        return False
    for what in dropped:
        log.error("LevelDB dropped part of its write-ahead log at open: %s. The writes in it "
                  "are lost on this replica; the key's other replicas hold them, and "
                  "anti-entropy brings them back", what)
    return bool(dropped)


class LevelDBStorage(Storage):
    """A Storage in one LevelDB directory. Create with ``await LevelDBStorage.open(...)``."""

    def __init__(
        self,
        db: plyvel.DB,
        path: str,
        size: int,
        lock: int,
        *,
        sync: str = "batch",
        sync_interval: float = 1.0,
        max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES,
    ) -> None:
        super().__init__(sync=sync, sync_interval=sync_interval, max_batch_bytes=max_batch_bytes)
        self._db = db
        self._path = path
        self._lock = lock  # the directory's flock (Rule 3), released when the store closes
        self._size = size
        self._size_at = _clock()
        self._size_refreshing = False
        self._committer_thread = CommitterThread(f"kvd-commit {os.path.basename(path)}")

    @classmethod
    async def open(
        cls,
        path: str,
        *,
        sync: str = "batch",
        sync_interval: float = 1.0,
        cache_mb: int = 64,
        max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES,
    ) -> LevelDBStorage:
        """Open the store in ``path``; ConfigError if it is locked or not writable."""
        if cache_mb < 0:
            raise ConfigError(f"cache_mb must be >= 0, not {cache_mb!r}")
        # Opening replays the write-ahead log, which can take seconds: not on the loop.
        db, size, lock = await trio.to_thread.run_sync(_open_db, path, cache_mb)
        try:
            storage = cls(
                db,
                path,
                size,
                lock,
                sync=sync,
                sync_interval=sync_interval,
                max_batch_bytes=max_batch_bytes,
            )
            storage.lost_log_records = await trio.to_thread.run_sync(_dropped_log, path)
            return storage
        except BaseException:
            db.close()
            os.close(lock)
            raise

    # --- reads ----------------------------------------------------------------------------

    def get(self, key: bytes, *, checked: bool = False) -> bytes | None:
        try:
            return self._db.get(key, verify_checksums=checked, fill_cache=checked)  # Rule 5
        except plyvel.CorruptionError as exc:
            raise DamagedData(f"the data in {self._path} is damaged ({_message(exc)})") from None

    def iterate(self, start: bytes, stop: bytes, *,
                checked: bool = False) -> Iterator[tuple[bytes, bytes]]:
        # The snapshot is taken now, not when the generator first runs.
        return _scan(self._db.snapshot(), start, stop, include_value=True, checked=checked)

    def iterate_keys(self, start: bytes, stop: bytes) -> Iterator[bytes]:
        return _scan(self._db.snapshot(), start, stop, include_value=False, checked=False)

    def approximate_size(self) -> int:
        if (
            not self._closing
            and not self._size_refreshing
            and self._nursery is not None
            and _clock() - self._size_at >= SIZE_REFRESH_SECONDS
        ):
            self._size_refreshing = True
            self._nursery.start_soon(self._refresh_size)
        return self._size

    async def _refresh_size(self) -> None:
        try:
            self._size = await trio.to_thread.run_sync(_dir_size, self._path)
        except OSError:
            pass
        finally:
            self._size_at = _clock()
            self._size_refreshing = False

    # --- writes ---------------------------------------------------------------------------

    def _write_batch(self, ops: list[Op], sync: bool) -> None:
        """Build and write one WriteBatch; runs in a worker thread."""
        batch = self._db.write_batch(sync=sync)
        for key, value in ops:
            if value is None:
                batch.delete(key)
            else:
                batch.put(key, value)
        batch.write()

    async def _commit(self, ops: list[Op], sync: bool) -> None:
        if self.refusing_writes is not None:
            raise StorageError(self.refusing_writes)
        try:
            await self._committer_thread.run(self._write_batch, ops, sync)
        except plyvel.Error as exc:
            cause = _message(exc)
            self.refusing_writes = (
                f"this node refuses writes since one failed ({cause}): its store must be "
                "opened again first; fix the cause (free disk space?), then restart kvd")
            log.error("a write to %s failed (%s): every later write is refused until kvd "
                      "restarts, since LevelDB would drop them at its next open; reads go on. "
                      "Fix the cause (free disk space?), then restart kvd", self._path, cause)
            raise StorageError(f"write to {self._path} failed: {cause}") from None

    async def _sync(self) -> None:
        # An empty synced batch makes LevelDB fsync its log, covering every earlier write.
        await self._commit([], True)

    async def _close_backend(self) -> None:
        try:
            await self._committer_thread.run(self._db.close)
        finally:
            self._committer_thread.stop()
            os.close(self._lock)


def _scan(snapshot, start: bytes, stop: bytes, *, include_value: bool, checked: bool) -> Iterator:
    try:
        iterator = snapshot.iterator(start=start, stop=stop, include_value=include_value,
                                     verify_checksums=checked, fill_cache=False)  # Rule 5
        try:
            yield from iterator
        except plyvel.CorruptionError as exc:  # a checksum failed, or a block cannot decode
            raise DamagedData(f"stored data is damaged ({_message(exc)})") from None
        finally:
            iterator.close()
    finally:
        snapshot.close()
