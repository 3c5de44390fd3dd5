"""Blob files: the bytes of large (chunked) values, kept beside LevelDB rather than in it.

Why not in LevelDB (docs/DECISIONS.md, "large values"): LevelDB rewrites every value at each
compaction level, so 1 MiB chunks of GiB-sized values cost many times their size in disk I/O,
and it reads tables through mmap, so streaming a 100 MiB value out of it maps 100 MiB into
the daemon's resident set. Like WiscKey/BlobDB key-value separation, the object record (the
manifest) stays in LevelDB and names a blob by its upload id (vid); the blob is one
append-only file read with pread in a worker thread, so memory stays at one chunk.

Rules: a blob is fsynced (``seal``) before the manifest that names it is written; a blob is
deleted only in the same step that removes the last manifest naming it (LocalStore).
A file's name is durable only once its directory is fsynced: ``seal`` fsyncs the blob's
directory (and a new subdirectory's parent), and ``delete`` fsyncs the directory after the
unlink, so a crash neither loses a sealed blob's name nor brings back a deleted blob the
ledger has forgotten. All of it runs in worker threads, never on the event loop.
While a backup is ``hold``ing the store, deletions are deferred until it ends, so every blob
the backup's LevelDB snapshot names is still there to be copied.

Checksums: beside each blob ``<vid>`` a file ``<vid>.sum`` holds the crc32 of every BLOCK of
it, recorded as the bytes are written (blocks a write covers whole) and at ``seal`` (the
rest), and fsynced with the blob, so before its manifest. Every read checks the blocks it
touches: a blob whose bytes rotted on disk raises Damaged and is noted (``is_damaged``); the
node then reads the value from another replica instead of serving it. A blob written before
checksums existed has no ``.sum`` and reads unchecked. zlib's crc32 (1.4 GB/s here) finds
flipped bits and torn blocks; the bytes need no defence against a forger on the node's disk.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import zlib
from contextlib import asynccontextmanager
from pathlib import Path

import trio

from kvd.errors import Damaged, Unavailable
from kvd.storage.base import StorageError
from kvd.storage.checksums import BLOCK, SUM, block_sums, first_mismatch

log = logging.getLogger("kvd.storage.blobs")


def _writeback_starter():
    """sync_file_range(SYNC_FILE_RANGE_WRITE) from libc, or None where there is none: it
    starts writing a range to disk without waiting, so the disk works while the rest of the
    value arrives and ``seal``'s fsync has little left to do (with LevelDB's and the other
    replicas' writes on one disk, a 1 GiB blob otherwise waited until the seal to be written)."""
    try:
        call = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    call.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    return call


_start_writeback = _writeback_starter()
_SYNC_FILE_RANGE_WRITE = 2
VERIFY_PIECE = 8 << 20  # bytes of a blob read and checked at a time by ``sound``


def fsync_dir(path: Path) -> None:
    """fsync a directory, so the names created or removed in it are durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class BlobStore:
    """Append-only blob files under ``root`` (data_dir/blobs), one per upload id."""

    def __init__(self, root: str | os.PathLike, sync: bool = True):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.sync = sync
        self._root_durable = not sync  # root's own name, fsynced before the first seal
        self._size = 0  # the last approximate_size that could be measured
        self._size_failing = False
        self._holds = 0  # backups running: deletions wait in _deferred until they end
        self._deferred: list[bytes] = []
        self._damaged: set[bytes] = set()  # blobs a read found rotted (logged once each)
        self.damaged_found = 0  # times a blob was found rotted, for the metrics

    def _path(self, vid: bytes) -> Path:
        name = vid.hex()
        return self.root / name[:2] / name

    def sums_path(self, vid: bytes) -> Path:
        return self._path(vid).with_suffix(".sum")

    def is_damaged(self, vid: bytes) -> bool:
        """Whether a read found bytes of blob ``vid`` that fail their checksum."""
        return vid in self._damaged

    def holds(self, vid: bytes, length: int) -> bool:
        """Whether blob ``vid`` is here with ``length`` bytes, none found damaged, and its
        .sum file names every block (two stats: it is asked at every local read of a large
        value). A .sum cut short would leave the blocks past its end unchecked: such a blob
        is noted as damaged. No .sum file at all: a blob from before checksums."""
        if vid in self._damaged:
            return False
        try:
            if self._path(vid).stat().st_size < length:
                return False
        except FileNotFoundError:
            return False
        try:
            recorded = self.sums_path(vid).stat().st_size // SUM.size
        except FileNotFoundError:
            return True
        if recorded < -(-length // BLOCK):
            self._note_damaged(vid, recorded * BLOCK, "has no checksum from byte")
            return False
        return True

    async def sound(self, vid: bytes, length: int) -> bool:
        """Whether blob ``vid`` holds ``length`` bytes that all pass their checksums, read
        whole, 8 MiB at a time in a thread (kvctl repair --verify). A blob replaced before
        it was opened counts as sound: its value is no longer this one."""
        if not self.holds(vid, length):
            return False
        try:
            fd = await self.open(vid, length)
        except Unavailable:
            return True
        try:
            for offset in range(0, length, VERIFY_PIECE):
                await self.check(vid, fd, offset, min(VERIFY_PIECE, length - offset))
        except Damaged:
            return False
        finally:
            os.close(fd)
        return True

    def _append(self, vid: bytes, offset: int, data: bytes) -> None:
        path = self._path(vid)
        try:
            path.parent.mkdir()
        except FileExistsError:
            pass
        else:
            if self.sync:  # the new subdirectory's name, before any blob relies on it
                fsync_dir(self.root)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            # All of it: a write the kernel took in part (the disk filling) left the rest out,
            # and the next chunk's write past it would have left zeros in the hole.
            rest = memoryview(data)
            while rest:
                written = os.pwrite(fd, rest, offset)
                if not written:
                    raise OSError(errno.EIO, "no byte written")
                rest, offset = rest[written:], offset + written
            if self.sync and _start_writeback is not None:  # a hint: seal still fsyncs
                _start_writeback(fd, offset - len(data), len(data), _SYNC_FILE_RANGE_WRITE)
        finally:
            os.close(fd)
        start = offset - len(data)
        skip = -start % BLOCK  # to the first block this write covers whole
        sums = block_sums(memoryview(data)[skip:])
        if sums:
            self._write_sums(vid, sums, (start + skip) // BLOCK)

    def _write_sums(self, vid: bytes, sums: bytes, block: int) -> None:
        fd = os.open(self.sums_path(vid), os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            os.pwrite(fd, sums, block * SUM.size)
        finally:
            os.close(fd)

    async def write(self, vid: bytes, offset: int, data: bytes) -> None:
        """Write ``data`` at ``offset`` of blob ``vid`` (chunks arrive in order); a failure
        (a full disk) is a StorageError naming its cause."""
        try:
            await trio.to_thread.run_sync(self._append, vid, offset, data)
        except OSError as exc:
            raise StorageError(f"cannot write value bytes in {self.root}: "
                               f"{exc.strerror or exc}") from None

    def _seal(self, vid: bytes) -> int:
        path = self._path(vid)
        fd = os.open(path, os.O_RDONLY)
        try:
            self._complete_sums(vid, fd)
            if self.sync:
                os.fsync(fd)
                fsync_dir(path.parent)  # the file's name, created by the first write
                if not self._root_durable:
                    fsync_dir(self.root.parent)
                    self._root_durable = True
            return os.fstat(fd).st_size
        finally:
            os.close(fd)

    def _complete_sums(self, vid: bytes, fd: int) -> None:
        """Record the blocks no write covered whole (the last one, those of writes that did
        not start on a block boundary), and make the .sum file durable with the blob."""
        size = os.fstat(fd).st_size
        sums_fd = os.open(self.sums_path(vid), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            sums = bytearray(os.pread(sums_fd, -(-size // BLOCK) * SUM.size, 0))
            for block in range(-(-size // BLOCK)):
                at = block * SUM.size
                length = min(BLOCK, size - block * BLOCK)
                if sums[at : at + SUM.size][4:] != length.to_bytes(4, "little"):
                    crc = zlib.crc32(os.pread(fd, length, block * BLOCK))
                    os.pwrite(sums_fd, SUM.pack(crc, length), at)
            os.ftruncate(sums_fd, -(-size // BLOCK) * SUM.size)
            if self.sync:
                os.fsync(sums_fd)
        finally:
            os.close(sums_fd)

    async def seal(self, vid: bytes) -> int:
        """Make blob ``vid`` durable; returns its size. A blob found damaged is trusted
        again (a refill rewrote it): a block still rotted is found by the next read."""
        try:
            size = await trio.to_thread.run_sync(self._seal, vid)
            self._damaged.discard(vid)
            return size
        except FileNotFoundError:
            raise
        except OSError as exc:
            raise StorageError(f"cannot make value bytes durable in {self.root}: "
                               f"{exc.strerror or exc}") from None

    def _read(self, vid: bytes, offset: int, size: int) -> bytes:
        try:
            fd = os.open(self._path(vid), os.O_RDONLY)
        except FileNotFoundError:
            raise Unavailable("value was replaced while it was being read; read it again") from None
        try:
            return self._checked(vid, fd, offset, size)
        finally:
            os.close(fd)

    async def read(self, vid: bytes, offset: int, size: int) -> bytes:
        """``size`` bytes of blob ``vid`` from ``offset``, checked (Damaged when rotted)."""
        return await trio.to_thread.run_sync(self._read, vid, offset, size)

    def _checked(self, vid: bytes, fd: int, offset: int, size: int) -> bytes:
        """Read whole blocks around the range (at most a block more on each side) and check
        each against the .sum file; no .sum file: a blob from before checksums."""
        start = offset - offset % BLOCK
        end = -(-(offset + size) // BLOCK) * BLOCK
        try:
            sums_fd = os.open(self.sums_path(vid), os.O_RDONLY)
        except FileNotFoundError:
            return os.pread(fd, size, offset)
        try:
            sums = os.pread(sums_fd, (end - start) // BLOCK * SUM.size,
                            start // BLOCK * SUM.size)
        finally:
            os.close(sums_fd)
        data = os.pread(fd, end - start, start)
        bad = first_mismatch(sums, start, data)
        if bad is not None:
            self._refuse_damaged(vid, bad)
        return data[offset - start : offset - start + size]

    def _note_damaged(self, vid: bytes, at: int,
                      what: str = "fail their checksum at byte") -> None:
        """Note blob ``vid`` as damaged: counted and logged once."""
        if vid not in self._damaged and len(self._damaged) < 10_000:
            self._damaged.add(vid)
            self.damaged_found += 1
            log.error("value bytes %s in %s %s %d (damaged on disk): this copy is not "
                      "served (reads use the key's other replicas)", vid.hex(), self.root,
                      what, at)

    def _refuse_damaged(self, vid: bytes, at: int) -> None:
        """Note blob ``vid`` as damaged and raise Damaged."""
        self._note_damaged(vid, at)
        raise Damaged(f"value bytes {vid.hex()} on this node are damaged (checksum mismatch "
                      f"at byte {at})")

    async def check(self, vid: bytes, fd: int, offset: int, size: int) -> None:
        """Check a range of blob ``vid``, open as ``fd``, before it is sent without being
        read (send_file); Damaged when rotted."""
        await trio.to_thread.run_sync(self._checked, vid, fd, offset, size)

    def _open(self, vid: bytes, length: int) -> int:
        try:
            fd = os.open(self._path(vid), os.O_RDONLY)
        except FileNotFoundError:
            raise Unavailable("value was replaced while it was being read; read it again") from None
        if os.fstat(fd).st_size < length:
            os.close(fd)
            raise Unavailable(f"blob {vid.hex()} holds fewer than its {length} bytes")
        return fd

    async def open(self, vid: bytes, length: int) -> int:
        """A file descriptor of blob ``vid`` (holding at least ``length`` bytes) for reading;
        the caller closes it. Its bytes stay readable even if the blob is deleted meanwhile."""
        return await trio.to_thread.run_sync(self._open, vid, length)

    def exists(self, vid: bytes) -> bool:
        return self._path(vid).exists()

    def size(self, vid: bytes) -> int:
        """Bytes held of blob ``vid`` (0 when absent): a failed upload leaves a short one."""
        try:
            return self._path(vid).stat().st_size
        except FileNotFoundError:
            return 0

    def _delete(self, vid: bytes) -> None:
        path = self._path(vid)
        try:
            path.unlink()
        except FileNotFoundError:
            return
        finally:
            self.sums_path(vid).unlink(missing_ok=True)
            self._damaged.discard(vid)
        if self.sync:  # before the caller forgets the blob in its ledger
            fsync_dir(path.parent)

    async def delete(self, vid: bytes) -> None:
        if self._holds:
            self._deferred.append(vid)
            return
        await trio.to_thread.run_sync(self._delete, vid)

    @asynccontextmanager
    async def hold(self):
        """Keep every blob file while the block runs (a backup copying them); deletions
        asked for meanwhile happen when the last hold ends."""
        self._holds += 1
        try:
            yield
        finally:
            self._holds -= 1
            if not self._holds:
                deferred, self._deferred = self._deferred, []
                with trio.CancelScope(shield=True):
                    for vid in deferred:
                        await trio.to_thread.run_sync(self._delete, vid)

    def approximate_size(self) -> int:
        """Bytes held in blobs (a directory scan: for status, not the hot path). When the
        scan fails (EMFILE, a file removed meanwhile) the last figure stands: a status
        number must never take its caller (gossip, metrics) down."""
        try:
            self._size = sum(p.stat().st_size for p in self.root.glob("??/*"))
            self._size_failing = False
        except OSError as exc:
            if not self._size_failing:  # once per streak of failures, not per gossip round
                log.warning("blob directory %s: cannot measure its size: %s", self.root,
                            exc.strerror or exc)
            self._size_failing = True
        return self._size


class MemoryBlobStore:
    """The same interface in memory, for the fast in-process tests."""

    damaged_found = 0  # memory does not rot

    def __init__(self, disk=None):
        # disk: a kvd.storage.memory.MemoryDisk keeping sealed blobs across a simulated crash.
        self._disk = disk
        self._incarnation = disk.incarnation if disk is not None else 0
        self.blobs: dict[bytes, bytearray] = {}
        if disk is not None:
            self.blobs = {vid: bytearray(data) for vid, data in disk.blobs.items()}

    async def write(self, vid, offset, data):
        blob = self.blobs.setdefault(vid, bytearray())
        if len(blob) < offset:  # as a file does: a write past the end leaves a hole of zeros
            blob.extend(bytes(offset - len(blob)))
        blob[offset : offset + len(data)] = data
        await trio.lowlevel.checkpoint()

    async def seal(self, vid):
        await trio.lowlevel.checkpoint()
        if self._on_disk() and vid in self.blobs:
            self._disk.blobs[vid] = bytes(self.blobs[vid])
        return len(self.blobs.get(vid, b""))

    async def read(self, vid, offset, size):
        await trio.lowlevel.checkpoint()
        if vid not in self.blobs:
            raise Unavailable("value was replaced while it was being read; read it again")
        return bytes(self.blobs[vid][offset : offset + size])

    def exists(self, vid):
        return vid in self.blobs

    def holds(self, vid, length):
        return vid in self.blobs and len(self.blobs[vid]) >= length

    async def sound(self, vid, length):
        await trio.lowlevel.checkpoint()
        return self.holds(vid, length)

    def size(self, vid):
        return len(self.blobs.get(vid, b""))

    def _on_disk(self) -> bool:
        """Whether writes reach the simulated disk (not after its host crashed)."""
        return self._disk is not None and self._disk.incarnation == self._incarnation

    async def delete(self, vid):
        self.blobs.pop(vid, None)
        if self._on_disk():
            self._disk.blobs.pop(vid, None)
        await trio.lowlevel.checkpoint()

    def approximate_size(self):
        return sum(len(b) for b in self.blobs.values())
