"""The Storage interface and the group commit both backends share.

Invariants:

1. ``write(ops)`` applies its ops atomically: all of one call's ops land in one batch, which a
   backend commits all-or-nothing. Within a batch, ops apply in arrival order (the last op on
   a key wins).
2. Group commit: one committer task takes every pending op (from any number of ``write()``
   callers) into one batch, commits it, then wakes every caller of that batch. Callers that
   arrive during a commit form the next batch, so at most one batch is in flight and one is
   forming, and fsync is paid once per batch.
3. When ``write()`` returns, its ops are readable and durable according to the sync mode; if
   the commit failed, every caller of that batch gets a ``StorageError`` (never silent loss).
4. Memory stays bounded: a forming batch holds at most ``max_batch_bytes`` (counting a small
   overhead per op); further writers wait, first come first served. One ``write()`` larger
   than the bound is accepted alone, since splitting it would break atomicity.
5. A ``write()`` cancelled before its ops are queued has no effect; one cancelled after may
   or may not be applied (as with any timed-out database write).
6. ``aclose()`` refuses new writes, commits everything already queued, syncs (periodic mode),
   then closes the backend. It is idempotent. A committer cancelled before it (its node
   cancelled as a whole) commits what is queued as it stops, and later writes are refused:
   no uncancellable (``lands``) writer waits for a committer that is gone.
7. ``flush()`` makes every returned write durable whatever the sync mode (except "none").

Sync modes: ``batch`` commits each batch with sync=True; ``periodic`` commits with sync=False
and a background task issues one synced write every ``sync_interval`` seconds when something
was written since the last sync; ``none`` never syncs.

Reads are synchronous: a LevelDB point read is microseconds. Long range iterations run on the
caller's task, so callers scanning many keys should checkpoint between items.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable, Iterator, Sequence

import trio

from kvd.errors import ConfigError, Damaged, KvdError

SYNC_MODES = ("batch", "periodic", "none")
DEFAULT_MAX_BATCH_BYTES = 64 * 1024 * 1024
# Accounted per op on top of key and value, so a flood of tiny ops is bounded too.
OP_OVERHEAD = 32

Op = tuple[bytes, bytes | None]


class StorageError(KvdError):
    """A storage operation failed (a commit that did not reach the disk, a closed store)."""


class DamagedData(StorageError, Damaged):
    """Stored bytes failed their checksum when read (disk rot, a damaged file)."""


@dataclasses.dataclass(frozen=True)
class StorageStatistics:
    """Counters since the store was opened (trio's ``statistics()`` convention)."""

    batches_committed: int = 0
    ops_committed: int = 0
    largest_batch: int = 0  # ops in the largest committed batch
    syncs: int = 0  # synced writes: one per batch ("batch"), one per tick ("periodic")
    writes_committed: int = 0  # write() calls whose batch committed
    bytes_committed: int = 0  # keys + values
    batches_failed: int = 0
    pending_ops: int = 0  # queued in the forming batch right now


def check_options(sync: str, sync_interval: float, max_batch_bytes: int) -> None:
    """Raise ConfigError naming the first bad storage option."""
    if sync not in SYNC_MODES:
        raise ConfigError(f"sync must be one of {', '.join(SYNC_MODES)}, not {sync!r}")
    if not sync_interval > 0:
        raise ConfigError(f"sync_interval must be > 0 seconds, not {sync_interval!r}")
    if max_batch_bytes < 1:
        raise ConfigError(f"max_batch_bytes must be >= 1, not {max_batch_bytes!r}")


class _Batch:
    """Ops of one group commit and the event that wakes its callers."""

    __slots__ = ("ops", "nbytes", "data_bytes", "writers", "done", "landing", "error")

    def __init__(self) -> None:
        self.ops: list[Op] = []
        self.nbytes = 0
        self.data_bytes = 0
        self.writers = 0
        self.done = trio.Event()
        self.landing: list[trio.lowlevel.Task] = []  # writers that cannot be cancelled
        self.error: BaseException | None = None

    def finish(self) -> None:
        """Wake every writer of the batch, committed or failed (``error``)."""
        self.done.set()
        for task in self.landing:
            trio.lowlevel.reschedule(task)


def _measure(ops: Sequence[Op]) -> tuple[list[Op], int]:
    """Copy and validate ``ops`` before queueing them: one bad op must not fail a batch."""
    checked: list[Op] = []
    data_bytes = 0
    for op in ops:
        key, value = op
        if type(key) is not bytes:
            raise TypeError(f"storage keys are bytes, not {type(key).__name__}")
        if value is not None and type(value) is not bytes:
            raise TypeError(f"storage values are bytes or None, not {type(value).__name__}")
        data_bytes += len(key) + (len(value) if value is not None else 0)
        checked.append((key, value))
    return checked, data_bytes


class Storage(abc.ABC):
    """An ordered byte keyspace with atomic, group-committed writes.

    Open one with ``kvd.storage.open_storage``, which runs the committer.
    """

    # Why every write is refused until the store is opened again (a backend sets it after a
    # failed write it cannot recover from in place: kvd/storage/leveldb.py Rule 4).
    refusing_writes: str | None = None
    # Whether opening dropped part of a damaged write-ahead log (LevelDB): what was written
    # there, a durable high-water mark included, may be gone (kvd.node.data_dir).
    lost_log_records = False

    def __init__(
        self,
        *,
        sync: str = "batch",
        sync_interval: float = 1.0,
        max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES,
    ) -> None:
        check_options(sync, sync_interval, max_batch_bytes)
        self._sync_mode = sync
        self._sync_interval = sync_interval
        self._max_batch_bytes = max_batch_bytes
        self._forming = _Batch()
        self._work = trio.Event()  # set when ops are queued or on close
        self._batch_taken = trio.Event()  # set (and replaced) when the committer takes a batch
        self._admission = trio.Lock()  # FIFO among writers waiting for room
        self._closing = False
        self._closed = trio.Event()
        self._committer_started = False
        self._committer_exited = trio.Event()
        self._background = trio.CancelScope()
        self._nursery: trio.Nursery | None = None
        self._unsynced_batches = 0
        self._stats = StorageStatistics()

    # --- reads (backends) -----------------------------------------------------------------

    @abc.abstractmethod
    def get(self, key: bytes, *, checked: bool = False) -> bytes | None:
        """The value stored under ``key``, or None. ``checked``: the bytes read are checked
        against the store's own checksums (DamagedData when they fail)."""

    @abc.abstractmethod
    def iterate(self, start: bytes, stop: bytes, *,
                checked: bool = False) -> Iterator[tuple[bytes, bytes]]:
        """``(key, value)`` pairs with ``start <= key < stop`` in key order. ``checked``:
        as for ``get``; the first damaged block ends the iteration with DamagedData.

        The snapshot is taken when ``iterate`` is called: writes that commit while the
        iterator is consumed are not seen.
        """

    def iterate_sound(self, start: bytes, stop: bytes, damaged: Callable[[bytes], object],
                      skipped: Callable[[bytes, bytes], object] | None = None,
                      ) -> Iterator[tuple[bytes, bytes]]:
        """``iterate``, checked, for records that leave this node (a transfer, a hint, a
        verify scan): a record whose bytes fail their checksum is passed to ``damaged`` and
        left out, with the others of its block (LevelDB checks whole blocks), in key order.
        A block so damaged that not even its keys can be read (a compressed one) is
        stepped over: ``skipped(after, until)`` is told the span of keys left unread, and
        the scan goes on from ``until``. Stopping there instead stalled every scan of the
        range for good (a transfer retrying its page, hint deliveries)."""
        last = None
        try:
            for key, value in self.iterate(start, stop, checked=True):
                last = key
                yield key, value
            return
        except DamagedData:  # from this block on, one record at a time
            pass
        position = start if last is None else last + b"\x00"
        for key in self.iterate_keys_past_damage(position, stop, skipped):
            try:
                found = self.get(key, checked=True)
            except DamagedData:
                damaged(key)
                continue
            if found is not None:
                yield key, found

    def iterate_keys_past_damage(self, start: bytes, stop: bytes,
                                 skipped: Callable[[bytes, bytes], object] | None = None,
                                 ) -> Iterator[bytes]:
        """``iterate_keys``, stepping over a block too damaged for its keys to be read:
        ``skipped(after, until)`` is told the span left unread, and the keys from ``until``
        on follow."""
        position = start
        while True:
            try:
                for key in self.iterate_keys(position, stop):
                    position = key + b"\x00"
                    yield key
                return
            except DamagedData:
                until = self._past_unreadable(position, stop)
                if skipped is not None:
                    skipped(position, until)
                position = until

    def _past_unreadable(self, position: bytes, stop: bytes) -> bytes:
        """The least seek target after ``position`` (whose keys cannot be listed) from which
        they can, to a byte: the end of the unreadable block, found by bisection between a
        nearby readable target and ``position`` (a few hundred seeks, only on damage).
        ``stop`` when nothing after ``position`` can be read."""

        def readable(target: bytes) -> bool:
            try:
                next(iter(self.iterate_keys(target, stop)), None)
            except DamagedData:
                return False
            return True

        # A readable target near ``position``: its prefixes' successors, shortest jump first.
        high = stop
        for i in range(len(position) - 1, -1, -1):
            if position[i] < 0xFF:
                target = position[:i] + bytes([position[i] + 1])
                if target < stop and readable(target):
                    high = target
                    break
        width = max(len(position), len(high)) + 1
        low_n = int.from_bytes(position.ljust(width, b"\x00"), "big")
        high_n = int.from_bytes(high.ljust(width, b"\x00"), "big")
        while high_n - low_n > 1:  # ``low`` unreadable; ``high`` readable, or the end
            middle = (low_n + high_n) // 2
            target = middle.to_bytes(width, "big")
            if readable(target):
                high, high_n = target, middle
            else:
                low_n = middle
        return high

    @abc.abstractmethod
    def iterate_keys(self, start: bytes, stop: bytes) -> Iterator[bytes]:
        """Keys with ``start <= key < stop`` in key order, over a snapshot like ``iterate``."""

    @abc.abstractmethod
    def approximate_size(self) -> int:
        """Bytes the store occupies (on disk for LevelDB); cheap, possibly a little stale."""

    # --- backend hooks --------------------------------------------------------------------

    @abc.abstractmethod
    async def _commit(self, ops: list[Op], sync: bool) -> None:
        """Apply ``ops`` atomically, synced to disk if ``sync``; raise if they were not."""

    @abc.abstractmethod
    async def _sync(self) -> None:
        """Make every committed batch durable (an empty synced write)."""

    @abc.abstractmethod
    async def _close_backend(self) -> None:
        """Release the backend; called once, after the last commit."""

    # --- writes ---------------------------------------------------------------------------

    async def write(self, ops: Sequence[Op], *, lands: bool = False) -> None:
        """Apply puts ``(key, value)`` and deletes ``(key, None)`` atomically.

        Returns once the ops are committed (and synced in "batch" mode) together with those
        of every concurrent caller. Raises StorageError if the commit failed or the store is
        closed. ``lands``: the call cannot be cancelled (a cancelled caller waits until its
        batch has committed, then sees the cancellation at its next checkpoint), for callers
        whose bookkeeping describes the ops until they land (kvd.node.local Rule 4).
        """
        checked, data_bytes = _measure(ops)
        if not checked:
            await trio.lowlevel.checkpoint()
            return
        nbytes = data_bytes + OP_OVERHEAD * len(checked)
        if self._closing or self._committer_exited.is_set():
            # Nobody would commit it: a committer cancelled with its node, before aclose.
            raise StorageError("storage is closed")
        if not self._admission.locked() and self._fits(nbytes):
            # Fast path, no schedule point before queueing: concurrent writers that run in
            # the same scheduler round all land in the same batch.
            batch = self._enqueue(checked, nbytes, data_bytes)
        else:
            with trio.CancelScope(shield=lands):
                batch = await self._enqueue_when_room(checked, nbytes, data_bytes)
        if lands:
            # Parked with no cancel scope (a shielded one per write was 2-3% of a SET's CPU).
            batch.landing.append(trio.lowlevel.current_task())
            await trio.lowlevel.wait_task_rescheduled(lambda _: trio.lowlevel.Abort.FAILED)
        else:
            await batch.done.wait()
        if batch.error is not None:
            if isinstance(batch.error, StorageError):  # already says what failed and why
                raise StorageError(str(batch.error)) from batch.error
            raise StorageError(
                f"commit of a batch of {len(batch.ops)} ops failed: {batch.error!r}"
            ) from batch.error

    async def flush(self) -> None:
        """Make every write that has returned durable now, in every sync mode but "none".

        For the rare write that must be on disk before anything builds on it (a lease of
        version counters) even when the store syncs only periodically.
        """
        if self._sync_mode == "periodic":
            if self._closing:
                raise StorageError("storage is closed")
            await self._sync_now()
        else:
            await trio.lowlevel.checkpoint()

    async def _enqueue_when_room(self, ops: list[Op], nbytes: int, data_bytes: int) -> _Batch:
        async with self._admission:  # FIFO: first to wait is first to get room
            while True:
                if self._closing or self._committer_exited.is_set():
                    raise StorageError("storage is closed")
                if self._fits(nbytes):
                    return self._enqueue(ops, nbytes, data_bytes)
                await self._batch_taken.wait()

    def _fits(self, nbytes: int) -> bool:
        queued = self._forming.nbytes
        return queued == 0 or queued + nbytes <= self._max_batch_bytes

    def _enqueue(self, ops: list[Op], nbytes: int, data_bytes: int) -> _Batch:
        batch = self._forming
        batch.ops.extend(ops)
        batch.nbytes += nbytes
        batch.data_bytes += data_bytes
        batch.writers += 1
        self._work.set()
        return batch

    def statistics(self) -> StorageStatistics:
        """Group commit counters; see StorageStatistics."""
        return dataclasses.replace(self._stats, pending_ops=len(self._forming.ops))

    # --- lifecycle ------------------------------------------------------------------------

    async def _run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the committer (and the periodic sync) until ``aclose``."""
        with self._background:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                self._committer_started = True
                nursery.start_soon(self._committer)
                if self._sync_mode == "periodic":
                    nursery.start_soon(self._periodic_sync)
                task_status.started()

    async def aclose(self) -> None:
        """Commit what is queued, sync, close. Later writes raise StorageError."""
        if self._closing:
            await self._closed.wait()
            return
        self._closing = True
        self._work.set()
        self._batch_taken.set()  # writers waiting for room see the store is closing
        try:
            if self._committer_started:
                await self._committer_exited.wait()
            # The committer may have been cancelled (or never run): finish its work here.
            while self._forming.ops:
                await self._commit_batch(self._take_batch())
            if self._sync_mode == "periodic" and self._unsynced_batches:
                await self._sync_now()
        finally:
            self._background.cancel()
            with trio.CancelScope(shield=True):
                await self._close_backend()
            self._closed.set()

    # --- the committer --------------------------------------------------------------------

    def _take_batch(self) -> _Batch:
        batch = self._forming
        self._forming = _Batch()
        self._batch_taken.set()
        self._batch_taken = trio.Event()
        return batch

    async def _committer(self) -> None:
        try:
            while True:
                if not self._forming.ops:
                    if self._closing:
                        return
                    await self._work.wait()
                    self._work = trio.Event()
                    continue
                batch = self._take_batch()
                # Never abandon a batch halfway: its callers are waiting for the outcome.
                with trio.CancelScope(shield=True):
                    await self._commit_batch(batch)
        finally:
            self._committer_exited.set()
            # Cancelled with its node: the writers queued now may not be cancelled (``lands``),
            # and aclose runs only once they have returned. Commit their batch here.
            with trio.CancelScope(shield=True):
                while self._forming.ops:
                    await self._commit_batch(self._take_batch())

    async def _commit_batch(self, batch: _Batch) -> None:
        sync = self._sync_mode == "batch"
        try:
            await self._commit(batch.ops, sync)
        except BaseException as exc:
            batch.error = exc
            self._stats = dataclasses.replace(
                self._stats, batches_failed=self._stats.batches_failed + 1
            )
            if not isinstance(exc, Exception):
                raise
        else:
            s = self._stats
            self._stats = dataclasses.replace(
                s,
                batches_committed=s.batches_committed + 1,
                ops_committed=s.ops_committed + len(batch.ops),
                largest_batch=max(s.largest_batch, len(batch.ops)),
                syncs=s.syncs + sync,
                writes_committed=s.writes_committed + batch.writers,
                bytes_committed=s.bytes_committed + batch.data_bytes,
            )
            if not sync:
                self._unsynced_batches += 1
        finally:
            batch.finish()

    async def _periodic_sync(self) -> None:
        while True:
            await trio.sleep(self._sync_interval)
            if self._unsynced_batches:
                await self._sync_now()

    async def _sync_now(self) -> None:
        # Reset first: batches committed while the sync runs may not be covered by it.
        self._unsynced_batches = 0
        try:
            await self._sync()
        except Exception as exc:
            # A failed fsync may have lost acknowledged data: stop the node loudly.
            raise StorageError(f"periodic sync failed: {exc!r}") from exc
        self._stats = dataclasses.replace(self._stats, syncs=self._stats.syncs + 1)
