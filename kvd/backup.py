"""The backup file of one node, and `kvd restore`, which turns one back into a data
directory (README "Backup and restore", kvd(8) RESTORE).

A backup is a stream of msgpack maps, written by a running node (kvd.node.backup) and read
here; nothing else reads or writes it:

    {"magic": "kvd-backup", "format": 2, "node", "cluster", "created"}   first
    {"kv": [[key, value], ...]}          LevelDB records of one snapshot, in key order
    {"blob": "ab/abcd..."}               a blob file (large values), then its bytes in
    {"data": bytes} ...                  pieces until the next map that is not "data"
    {"end": {"records": n, "blobs": m, "sha256": digest}}
                                         last: a file without it is truncated; the digest
                                         is of every byte before this map

Format 1 had no digest: one flipped byte in a blob restored as a damaged value. It is
refused, not restored unchecked.

Rules:
1. The records come from one LevelDB snapshot, taken after the node began holding its
   blob files (kvd.storage.blobs ``hold``), so every blob a record names is in the file.
2. A restore writes into an empty data directory only, and checks the end record (counts
   and digest, nothing after it) before it reports success: a truncated, damaged or foreign
   file never passes for a backup. It writes a marker file (kvd.node.data_dir
   RESTORE_MARKER) before its first record and removes it last, so a directory that a
   failed or killed restore left behind is refused by kvd at start, never served.
3. A restored directory gets a new incarnation (kvd.node.data_dir), so the node never
   mints a dot it minted after the backup was taken, and a "restored" mark: at start the
   node refuses replica reads and fetches every partition it replicates from the other
   replicas (kvd.node.restore) before it serves, so writes acknowledged after the backup
   are never answered as missing.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO

import msgpack

from kvd.errors import KvdError, unwrap_single_error
from kvd.storage import keys
from kvd.storage.checksums import BLOCK, SUM, first_mismatch

MAGIC = "kvd-backup"
FORMAT = 2  # 2: the end record carries the SHA-256 of the stream
KV_BATCH_BYTES = 256 * 1024  # LevelDB records per map, by size
BLOB_PIECE = 256 * 1024  # bytes of a blob file per "data" map
RESTORED_MARK = keys.meta_key("restored")


class BackupError(KvdError):
    """A file that is not a complete kvd backup, or a restore that cannot proceed."""


def backup_records(header: dict, items: Iterable[tuple[bytes, bytes]],
                   blob_root: Path) -> Iterator[bytes]:
    """The backup file, piece by piece: ``items`` (a LevelDB snapshot), then every blob
    file under ``blob_root``. Blocking: runs in a worker thread."""
    packer = msgpack.Packer(use_bin_type=True)
    digest = hashlib.sha256()

    def pack(item: dict) -> bytes:
        piece = packer.pack(item)
        digest.update(piece)
        return piece

    yield pack({"magic": MAGIC, "format": FORMAT, **header})
    batch: list = []
    size = records = 0
    for key, value in items:
        batch.append((key, value))
        size += len(key) + len(value)
        records += 1
        if size >= KV_BATCH_BYTES:
            yield pack({"kv": batch})
            batch, size = [], 0
    if batch:
        yield pack({"kv": batch})
    blobs = 0
    for path in sorted(blob_root.glob("??/*")):
        try:
            f = open(path, "rb")
            sums = b"" if path.suffix else _read_if_there(path.with_suffix(".sum"))
        except FileNotFoundError:
            continue  # an upload discarded since the listing: no record names it
        with f:
            yield pack({"blob": f"{path.parent.name}/{path.name}"})
            offset = 0
            while data := f.read(BLOB_PIECE):
                at = offset // BLOCK * SUM.size
                bad = first_mismatch(sums[at : at + -(-len(data) // BLOCK) * SUM.size],
                                     offset, data)
                if bad is not None:  # never carry rot into a backup, certified by its digest
                    raise BackupError(f"value bytes {path.name} on this node are damaged "
                                      f"(checksum mismatch at byte {bad}); its other "
                                      "replicas hold it: see kvd(8) DAMAGED DATA")
                yield pack({"data": data})
                offset += len(data)
        blobs += 1
    yield packer.pack({"end": {"records": records, "blobs": blobs,
                               "sha256": digest.digest()}})


def _read_if_there(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return b""  # a blob written before checksums


class _Hashing:
    """The source as the unpacker reads it (ahead, in large reads), hashed only up to the
    map the unpacker has reached: the end record holds the digest of the bytes before it."""

    def __init__(self, source: IO[bytes]) -> None:
        self.source = source
        self.sha = hashlib.sha256()
        self.unhashed = bytearray()  # read, not hashed yet
        self.hashed = self.total = 0  # offsets: hashed up to, read up to

    def read(self, n: int) -> bytes:
        data = self.source.read(n)
        self.unhashed += data
        self.total += len(data)
        return data

    def hash_to(self, offset: int) -> None:
        take = offset - self.hashed
        self.sha.update(self.unhashed[:take])
        del self.unhashed[:take]
        self.hashed = offset


def _maps(source: IO[bytes]) -> Iterator[dict]:
    """The maps of the file; the end record only once its digest matches the bytes before
    it and nothing follows it."""
    reader = _Hashing(source)
    unpacker = msgpack.Unpacker(reader, raw=False, max_buffer_size=64 << 20)
    try:
        for item in unpacker:
            if not isinstance(item, dict):
                raise BackupError("not a kvd backup, or damaged (unexpected record)")
            if "end" in item:
                if not isinstance(item["end"], dict) or \
                        item["end"].get("sha256") != reader.sha.digest():
                    raise BackupError("the backup is damaged: its SHA-256 does not match")
                if unpacker.tell() != reader.total or reader.read(1):
                    raise BackupError("the backup is damaged: bytes follow its end record")
            yield item
            reader.hash_to(unpacker.tell())  # up to the start of the next map
    except (ValueError, msgpack.UnpackException) as exc:
        raise BackupError(f"not a kvd backup, or damaged: {exc}") from None


def _empty_dir(data_dir: Path) -> None:
    if data_dir.exists() and any(data_dir.iterdir()):
        raise BackupError(f"data_dir {data_dir} is not empty: a restore writes into an empty "
                          "directory only (stop kvd, move or wipe the directory first)")


async def restore(source: IO[bytes], data_dir: Path) -> dict:
    """Rebuild ``data_dir`` from the backup read from ``source`` (Rules 2 and 3); returns
    the header with the counts. Raises BackupError with one line on any problem."""
    import trio

    from kvd.node.data_dir import RESTORE_MARKER, make_private
    from kvd.storage.blobs import fsync_dir

    _empty_dir(data_dir)
    make_private(str(data_dir))
    maps = _maps(source)
    header = await trio.to_thread.run_sync(next, maps, None)
    if not header or header.get("magic") != MAGIC:
        raise BackupError("not a kvd backup (no kvd-backup header)")
    if header.get("format") != FORMAT:
        raise BackupError(f"backup format {header.get('format')!r} is not {FORMAT}, the "
                          "only one this kvd restores (format 1 carries no checksum): "
                          "restore it with the kvd version that wrote it")
    marker = data_dir / RESTORE_MARKER  # Rule 2: removed only once all is on disk
    marker.write_text("kvd restore has not completed: wipe this directory\n")
    fsync_dir(data_dir)
    try:
        with unwrap_single_error():  # the store's committer runs in a nursery
            counts = await _restore_records(maps, data_dir)
    except (TypeError, ValueError, AttributeError) as exc:  # a map of the wrong shape
        raise BackupError(f"the backup is damaged ({exc}); {data_dir} is incomplete: "
                          "wipe it") from None
    except BackupError as exc:
        raise BackupError(f"{exc}; {data_dir} is incomplete: wipe it") from None
    marker.unlink()
    fsync_dir(data_dir)
    return {**header, **counts}


async def _restore_records(maps: Iterator[dict], data_dir: Path) -> dict:
    """The records and blob files after the header, checked against the end record."""
    import trio

    from kvd.storage import open_storage
    from kvd.storage.blobs import fsync_dir

    records = blobs = 0
    end = None
    blob_root = data_dir / "blobs"
    out = None
    async with open_storage(str(data_dir), sync="batch") as storage:
        while (item := await trio.to_thread.run_sync(next, maps, None)) is not None:
            if "data" in item and out is not None:
                await trio.to_thread.run_sync(out.write, item["data"])
                continue
            if out is not None:
                await trio.to_thread.run_sync(_close_synced, out)
                out = None
            if "kv" in item:
                await storage.write([(bytes(k), bytes(v)) for k, v in item["kv"]])
                records += len(item["kv"])
            elif "blob" in item:
                name = Path(item["blob"])
                if len(name.parts) != 2 or name.is_absolute() or ".." in name.parts:
                    raise BackupError(f"backup names a blob outside blobs/: {item['blob']!r}")
                (blob_root / name.parent).mkdir(parents=True, exist_ok=True)
                out = open(blob_root / name, "wb")
                blobs += 1
            elif "end" in item:  # its digest was checked by _maps
                end = item["end"]
                break
        if end is None or (end.get("records"), end.get("blobs")) != (records, blobs):
            raise BackupError(f"the backup is truncated or damaged ({records} records and "
                              f"{blobs} blobs read, end record {_counts(end)})")
        if blob_root.exists():
            for sub in blob_root.iterdir():
                fsync_dir(sub)
            fsync_dir(blob_root)
        await storage.write(_fresh_incarnation(storage) + [(RESTORED_MARK, b"1")])
    return {"records": records, "blobs": blobs}


def _counts(end: dict | None) -> str:
    return "missing" if end is None else f"{end.get('records')} records, {end.get('blobs')} blobs"


def _close_synced(f: IO[bytes]) -> None:
    f.flush()
    os.fsync(f.fileno())
    f.close()


def _fresh_incarnation(storage) -> list:
    """Rule 3: the identity with a new incarnation, and its first lease; the node id stays."""
    from kvd.node.dot_leases import first_lease

    raw = storage.get(keys.meta_key("identity"))
    if raw is None:
        raise BackupError("the backup holds no node identity")
    identity = msgpack.unpackb(raw, raw=False)
    identity["incarnation"] = os.urandom(4).hex()
    identity["created"] = time.time()
    return [(keys.meta_key("identity"), msgpack.packb(identity, use_bin_type=True)),
            first_lease(f"{identity['node']}:{identity['incarnation']}")]
