"""The backup file of one node, and `kvd restore`, which turns one back into a data
directory (README "Backup and restore", kvd(8) RESTORE).

A backup is a stream of msgpack maps, written by a running node (kvd.node.backup) and read
here; nothing else reads or writes it:

    {"magic": "kvd-backup", "format": 1, "node", "cluster", "created"}   first
    {"kv": [[key, value], ...]}          LevelDB records of one snapshot, in key order
    {"blob": "ab/abcd..."}               a blob file (large values), then its bytes in
    {"data": bytes} ...                  pieces until the next map that is not "data"
    {"end": {"records": n, "blobs": m}}  last: a file without it is truncated

Rules:
1. The records come from one LevelDB snapshot, taken after the node began holding its
   blob files (kvd.storage.blobs ``hold``), so every blob a record names is in the file.
2. A restore writes into an empty data directory only, and checks the end record before it
   reports success: a truncated or foreign file never passes for a backup.
3. A restored directory gets a new incarnation (kvd.node.data_dir), so the node never
   mints a dot it minted after the backup was taken, and a "restored" mark: at start the
   node refuses replica reads and fetches every partition it replicates from the other
   replicas (kvd.node.restore) before it serves, so writes acknowledged after the backup
   are never answered as missing.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO

import msgpack

from kvd.errors import KvdError, unwrap_single_error
from kvd.storage import keys

MAGIC = "kvd-backup"
FORMAT = 1
KV_BATCH_BYTES = 256 * 1024  # LevelDB records per map, by size
BLOB_PIECE = 256 * 1024  # bytes of a blob file per "data" map
RESTORED_MARK = keys.meta_key("restored")


class BackupError(KvdError):
    """A file that is not a complete kvd backup, or a restore that cannot proceed."""


def backup_records(header: dict, items: Iterable[tuple[bytes, bytes]],
                   blob_root: Path) -> Iterator[bytes]:
    """The backup file, piece by piece: ``items`` (a LevelDB snapshot), then every blob
    file under ``blob_root``. Blocking: runs in a worker thread."""
    pack = msgpack.Packer(use_bin_type=True).pack
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
        except FileNotFoundError:
            continue  # an upload discarded since the listing: no record names it
        with f:
            yield pack({"blob": f"{path.parent.name}/{path.name}"})
            while data := f.read(BLOB_PIECE):
                yield pack({"data": data})
        blobs += 1
    yield pack({"end": {"records": records, "blobs": blobs}})


def _maps(source: IO[bytes]) -> Iterator[dict]:
    unpacker = msgpack.Unpacker(source, raw=False, max_buffer_size=64 << 20)
    try:
        for item in unpacker:
            if not isinstance(item, dict):
                raise BackupError("not a kvd backup (unexpected record)")
            yield item
    except (ValueError, msgpack.UnpackException) as exc:
        raise BackupError(f"not a kvd backup, or damaged: {exc}") from None


def _empty_dir(data_dir: Path) -> None:
    if data_dir.exists() and any(data_dir.iterdir()):
        raise BackupError(f"data_dir {data_dir} is not empty: a restore writes into an empty "
                          "directory only (stop kvd, move or wipe the directory first)")


async def restore(source: IO[bytes], data_dir: Path) -> dict:
    """Rebuild ``data_dir`` from the backup read from ``source`` (Rules 2 and 3); returns
    the header with the counts. Raises BackupError with one line on any problem."""
    with unwrap_single_error():  # the store's committer runs in a nursery
        return await _restore(source, data_dir)


async def _restore(source: IO[bytes], data_dir: Path) -> dict:
    import trio

    from kvd.node.data_dir import make_private
    from kvd.storage import open_storage
    from kvd.storage.blobs import fsync_dir

    _empty_dir(data_dir)
    make_private(str(data_dir))
    maps = _maps(source)
    header = await trio.to_thread.run_sync(next, maps, None)
    if not header or header.get("magic") != MAGIC:
        raise BackupError("not a kvd backup (no kvd-backup header)")
    if header.get("format") != FORMAT:
        raise BackupError(f"backup format {header.get('format')!r} is not {FORMAT}: "
                          "restore it with the kvd version that wrote it")
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
            elif "end" in item:
                end = item["end"]
                break
        if end is None or end != {"records": records, "blobs": blobs}:
            raise BackupError(f"the backup is truncated or damaged ({records} records and "
                              f"{blobs} blobs read, end record {end!r}); {data_dir} is "
                              "incomplete: wipe it")
        if blob_root.exists():
            for sub in blob_root.iterdir():
                fsync_dir(sub)
            fsync_dir(blob_root)
        await storage.write(_fresh_incarnation(storage) + [(RESTORED_MARK, b"1")])
    return {**header, "records": records, "blobs": blobs}


def _close_synced(f: IO[bytes]) -> None:
    f.flush()
    os.fsync(f.fileno())
    f.close()


def _fresh_incarnation(storage) -> list:
    """Rule 3: the identity with a new incarnation; the node id stays."""
    raw = storage.get(keys.meta_key("identity"))
    if raw is None:
        raise BackupError("the backup holds no node identity")
    identity = msgpack.unpackb(raw, raw=False)
    identity["incarnation"] = os.urandom(4).hex()
    identity["created"] = time.time()
    return [(keys.meta_key("identity"), msgpack.packb(identity, use_bin_type=True))]
