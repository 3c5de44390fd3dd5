"""A replica whose disk rots (outside tester, damaged storage): the bytes LevelDB keeps are
checked against its block checksums when read, so a damaged copy is never served nor
merged into the healthy ones; it answers as a failed replica would, the others answer,
and a write or a read repair replaces it. Real LevelDB files, bits flipped in them."""

from __future__ import annotations

import json
import os
from functools import partial
from pathlib import Path

import plyvel
import pytest
import trio

from kvd.client import open_client
from kvd.errors import KvdError
from kvd.storage import keys, open_storage
from kvd.storage.base import DamagedData, StorageError
from tests.procs import KvdProcess, kvctl
from tests.realcluster import SMALL_RING, form_cluster, key_of, wait_states


def flip_a_bit_in_the_log(directory: Path, needle: bytes) -> Path:
    """Flip one bit inside ``needle`` in the write-ahead log (.log) of the LevelDB in
    ``directory``, which has not been opened since ``needle`` was written; returns the log."""
    (log,) = directory.glob("*.log")
    data = bytearray(log.read_bytes())
    at = data.find(needle)
    assert at >= 0, "the bytes are not in the current log"
    data[at + 5] ^= 0x01
    log.write_bytes(bytes(data))
    return log


def flip_a_bit_in(directory: Path, needles: list[bytes]) -> list[bytes]:
    """Flip one bit inside each of ``needles`` where a table (.ldb) of the LevelDB in
    ``directory`` holds it; returns those found. Opening the store first turns its log into
    a table, as LevelDB does at every start."""
    plyvel.DB(str(directory)).close()
    found = []
    for table in sorted(directory.glob("*.ldb")):
        data = bytearray(table.read_bytes())
        for needle in needles:
            at = data.find(needle)
            if at >= 0:
                data[at + len(needle) // 2] ^= 0x10
                found.append(needle)
        table.write_bytes(bytes(data))
    return found


async def test_a_damaged_copy_is_refused_naming_its_key_and_can_be_replaced(tmp_path):
    values = {b"key-%03d" % i: os.urandom(48) for i in range(200)}  # incompressible
    async with open_storage(str(tmp_path / "db")) as storage:
        await storage.write(list(values.items()))
    damaged = flip_a_bit_in(tmp_path / "db", [values[b"key-071"]])
    assert damaged, "the value's bytes were not found in a table"
    async with open_storage(str(tmp_path / "db")) as storage:
        with pytest.raises(DamagedData, match="damaged.*checksum"):
            storage.get(b"key-071", checked=True)
        assert storage.get(b"key-150", checked=True) == values[b"key-150"]  # another block
        await storage.write([(b"key-071", b"a good copy")])  # a repair replaces it
        assert storage.get(b"key-071", checked=True) == b"a good copy"


@pytest.mark.slow
async def test_a_replica_with_rotted_bytes_never_spreads_them(tmp_path, procs):
    """Before: read through the rotted node, the damaged copy met a healthy one with the
    same dot, and 'keeping one by a fixed order' kept the damaged bytes about half the time
    and wrote them onto the healthy replicas (all three then agreed on the wrong value)."""
    n1, n2, n3 = await form_cluster(tmp_path, procs, SMALL_RING)
    nodes = [n1, n2, n3]
    values = {key_of(i, "rot"): os.urandom(64) for i in range(40)}
    async with open_client(n1.address) as client:
        for key, value in values.items():
            await client.put(key, value, w=3)
    assert n3.stop() == 0
    damaged_values = flip_a_bit_in(n3.data_dir, list(values.values())[:12])
    damaged = [key for key, value in values.items() if value in damaged_values]
    assert len(damaged) >= 8, "too few values found in n3's tables to damage"
    n3.start()
    await wait_states(nodes, {"n1": "UN", "n2": "UN", "n3": "UN"}, nodes)

    async def read_all(node, r):
        wrong = {}
        async with open_client(node.address) as client:
            for key in damaged:
                got = [s.value for s in (await client.get(key, r=r)).siblings]
                if got != [values[key]]:
                    wrong[key] = got
        return wrong

    assert await read_all(n3, 2) == {}, "a damaged copy was served"
    with trio.fail_after(30):  # read repair rewrites n3's copies: then every replica answers
        while True:
            try:
                if await read_all(n1, 3) == {}:
                    break
            except KvdError:  # n3 answered with its damaged copy, not yet replaced
                pass
            await trio.sleep(0.5)
    assert await read_all(n3, 3) == {}
    # The keys no client read that shared a damaged block with those: `kvctl repair
    # --verify` reads every copy on n3 and has read repair rewrite the damaged ones.
    verify = kvctl("--json", "repair", "--wait", "--verify", host=n3.address)
    first = json.loads(verify.stdout)["repair"]
    # 40 small objects fill about one LevelDB block: most of it holds unread keys (28 here).
    assert first["copies_checked"] == len(values) and first["copies_damaged"] > 0, first
    assert verify.returncode == 1, verify
    with trio.fail_after(30):
        while json.loads(kvctl("--json", "repair", "--wait", "--verify",
                               host=n3.address).stdout)["repair"]["copies_damaged"]:
            await trio.sleep(0.5)
    assert "Traceback" not in n3.log_text()
    assert "damaged" in n3.log_text()


async def test_a_store_missing_its_current_file_is_refused_and_left_as_it_was(tmp_path):
    """Outside tester: with LevelDB's CURRENT file gone (a bad tool, a crash), kvd opened
    the directory as a new, empty store, and LevelDB deleted the tables of the old one:
    damage that one line of shell could have undone became a loss."""
    async with open_storage(str(tmp_path / "db")) as storage:
        await storage.write([(b"k%d" % i, b"v" * 100) for i in range(1000)])
    plyvel.DB(str(tmp_path / "db")).close()  # the log becomes a table
    (tmp_path / "db" / "CURRENT").unlink()
    before = sorted(p.name for p in (tmp_path / "db").iterdir())
    assert any(name.endswith(".ldb") for name in before)
    with pytest.raises(StorageError, match=r"no CURRENT file.*MANIFEST-\d+"):
        async with open_storage(str(tmp_path / "db")):
            pass
    assert sorted(p.name for p in (tmp_path / "db").iterdir()) == before


def run_to_exit(node: KvdProcess) -> int:
    """Start ``node`` and wait for it to end (a start expected to fail)."""
    node.start(wait=False)
    assert node.proc is not None
    return node.proc.wait(30)


def test_a_second_kvd_cannot_open_a_data_dir_whose_lock_file_was_deleted(tmp_path, procs):
    """Outside tester: LevelDB's LOCK file is its only guard; once deleted (a cleanup
    script), a second kvd opened the same directory and, when both had written, writes
    acknowledged by the first were gone at its restart."""
    first = KvdProcess(tmp_path / "data", node_id="n1")
    procs.append(first)
    first.start()
    (tmp_path / "data" / "LOCK").unlink()
    second = KvdProcess(tmp_path / "data", node_id="n1")
    second.log_path = tmp_path / "second.log"
    procs.append(second)
    code = run_to_exit(second)
    assert code == 2, second.log_text()
    assert f"data dir {tmp_path / 'data'} is in use by another kvd process" in second.log_text()
    assert "Traceback" not in second.log_text()
    assert first.proc.poll() is None


@pytest.mark.parametrize("record", ["identity", "cluster"])
def test_a_damaged_record_of_the_node_stops_the_start_with_one_line(tmp_path, procs, record):
    """Outside tester: garbage in the node's identity or cluster record ended the start in
    a 60-line traceback (msgpack's ExtraData). It is one line naming the record."""
    node = KvdProcess(tmp_path / "data", node_id="n1")
    procs.append(node)
    node.start()
    assert node.stop() == 0
    db = plyvel.DB(str(tmp_path / "data"))
    db.put(keys.meta_key(record), db.get(keys.meta_key(record)) + b"\x00garbage")
    db.close()
    code = run_to_exit(node)
    assert code == 1, node.log_text()
    last = node.log_text().strip().splitlines()[-1]
    assert last.startswith("kvd: error: ") and f"{record} record" in last and "damaged" in last
    assert "Traceback" not in node.log_text()


async def test_writes_leveldb_drops_from_a_damaged_log_at_open_are_reported(tmp_path, caplog):
    """Outside tester: one flipped bit in LevelDB's write-ahead log, and at the next open
    LevelDB dropped the rest of the log's block (200 of 300 synced writes here), saying so
    only in its own LOG file, which the next open replaces. kvd now logs it at ERROR; the
    key's other replicas hold those writes, and anti-entropy brings them back."""
    values = {b"k%03d" % i: os.urandom(50) for i in range(300)}
    async with open_storage(str(tmp_path / "db")) as storage:
        for key, value in values.items():
            await storage.write([(key, value)])
    log = flip_a_bit_in_the_log(tmp_path / "db", values[b"k100"])
    async with open_storage(str(tmp_path / "db")) as storage:
        lost = sum(storage.get(key) != value for key, value in values.items())
    assert lost > 0, "the damage cost no write: the test shows nothing"
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert any("dropped" in m and log.name in m and "bytes" in m for m in errors), errors


async def test_a_node_whose_log_was_damaged_mints_under_a_new_incarnation(tmp_path):
    """A damaged write-ahead log can take the durable high-water mark of the node's dot
    counters with it (kvd.node.local Rule 6), and the sequence would then go on below dots
    already minted: the same dot twice, for two different values. After LevelDB dropped
    part of its log, the node mints under a new incarnation, as a wiped node does."""
    from kvd.node.data_dir import load_identity

    async with open_storage(str(tmp_path / "db")) as storage:
        before = await load_identity(storage, "n1", 1.0)
    marker = os.urandom(50)
    async with open_storage(str(tmp_path / "db")) as storage:  # a clean restart: the same
        assert (await load_identity(storage, "n1", 2.0)).actor == before.actor
        for i in range(300):
            await storage.write([(b"k%03d" % i, marker if i == 100 else os.urandom(50))])
    flip_a_bit_in_the_log(tmp_path / "db", marker)
    async with open_storage(str(tmp_path / "db")) as storage:
        after = await load_identity(storage, "n1", 3.0)
    assert after.node == "n1" and after.actor != before.actor


# ------------------------------------------------- large values: blob files rot too

MiB = 1 << 20


def flip_a_bit_in_blob(blob: Path, offset: int) -> None:
    data = bytearray(blob.read_bytes())
    data[offset] ^= 0x04
    blob.write_bytes(bytes(data))


async def test_a_rotted_blob_fails_its_checksum_where_it_is_read_and_is_noted(tmp_path):
    """A blob file keeps a checksum of every block beside it (written before its manifest
    is): a read of a block whose bytes changed on disk raises Damaged, the blob is noted
    as damaged (the store then says its bytes are not all here), and blocks elsewhere in
    it still read. Before, rotted bytes were served at every R."""
    from kvd.errors import Damaged
    from kvd.storage.blobs import BlobStore

    blobs = BlobStore(tmp_path / "blobs")
    vid = os.urandom(16)
    data = os.urandom(3 * MiB + 1234)  # a last block shorter than the others
    for offset in range(0, len(data), MiB):  # in the order a lane may send them
        await blobs.write(vid, offset, data[offset : offset + MiB])
    assert await blobs.seal(vid) == len(data)
    assert await blobs.read(vid, 0, len(data)) == data
    assert await blobs.read(vid, 100_000, 5) == data[100_000:100_005]  # not block-aligned
    flip_a_bit_in_blob(blobs._path(vid), 2 * MiB + 70_000)
    assert await blobs.read(vid, 0, MiB) == data[:MiB]
    assert not blobs.is_damaged(vid)
    with pytest.raises(Damaged, match=f"{vid.hex()}.*checksum"):
        await blobs.read(vid, 2 * MiB, MiB)
    assert blobs.is_damaged(vid) and blobs.damaged_found == 1  # kvd_damaged_copies_total
    fd = await blobs.open(vid, len(data))
    try:  # the path that sends a file without reading it checks it first
        with pytest.raises(Damaged):
            await blobs.check(vid, fd, 2 * MiB, MiB)
        await blobs.check(vid, fd, 0, 2 * MiB)
    finally:
        os.close(fd)
    blobs.sums_path(vid).unlink()  # a blob written before checksums: read unchecked
    fresh = BlobStore(tmp_path / "blobs")
    assert len(await fresh.read(vid, 2 * MiB, MiB)) == MiB


async def test_a_blob_whose_checksum_file_was_cut_is_not_held_whole(tmp_path):
    """A sealed blob's .sum file names every block. One cut short (a torn write, a file
    system repair) left the blocks past its end unchecked: rotted bytes there were served
    as the replica's copy. Now such a blob is not held whole: it is noted as damaged, so
    reads take the value from the key's other replicas and read repair refills it (as a
    rotted one). A blob with no .sum file at all (written before checksums) is held as
    before, unchecked."""
    from kvd.storage.blobs import BlobStore
    from kvd.storage.checksums import BLOCK, SUM

    blobs = BlobStore(tmp_path / "blobs")
    vid = os.urandom(16)
    data = os.urandom(5 * BLOCK + 99)
    await blobs.write(vid, 0, data)
    await blobs.seal(vid)
    assert blobs.holds(vid, len(data))
    os.truncate(blobs.sums_path(vid), 2 * SUM.size)  # entries of blocks 0 and 1 only
    assert not blobs.holds(vid, len(data))
    assert blobs.is_damaged(vid) and blobs.damaged_found == 1  # kvd_damaged_copies_total
    assert not blobs.holds(vid, len(data)) and blobs.damaged_found == 1  # counted once
    await blobs.write(vid, 0, data)  # a refill rewrites it in place
    await blobs.seal(vid)
    assert blobs.holds(vid, len(data)) and not blobs.is_damaged(vid)
    blobs.sums_path(vid).unlink()
    assert BlobStore(tmp_path / "blobs").holds(vid, len(data))


async def test_a_backup_refuses_a_rotted_blob_naming_it(tmp_path):
    """A backup copies blob files: one whose bytes fail their checksum ends the backup with
    an error naming it (before, the backup carried the rot and its digest certified it)."""
    from kvd.backup import BackupError, backup_records
    from kvd.storage.blobs import BlobStore

    blobs = BlobStore(tmp_path / "blobs")
    vid = os.urandom(16)
    data = os.urandom(2 * MiB)
    await blobs.write(vid, 0, data)
    await blobs.seal(vid)
    whole = b"".join(backup_records({"node": "n1"}, [], blobs.root))
    assert data[:1000] in whole
    flip_a_bit_in_blob(blobs._path(vid), MiB + 5)
    with pytest.raises(BackupError, match=f"{vid.hex()}.*damaged"):
        b"".join(backup_records({"node": "n1"}, [], blobs.root))


@pytest.mark.slow
async def test_a_replica_with_a_rotted_large_value_never_serves_it(tmp_path, procs):
    """A large value written to all three replicas; n3's blob file gets a flipped bit.
    A backup of n3 is refused, naming it. Reads through n3 at R=1 and R=2, and through n1
    at R=2, return the right bytes (the first read through n3 finds the rot as it streams
    and takes the rest from another replica); once found, n3's copy counts as a failed
    replica, and read repair sends n3 the value's bytes again: R=3 is met, n3's file is
    whole, and a backup of n3 succeeds."""
    n1, n2, n3 = await form_cluster(tmp_path, procs, SMALL_RING)
    nodes = [n1, n2, n3]
    value = os.urandom(5 * MiB + 4321)
    cold = os.urandom(2 * MiB + 5)  # a value no client reads after its rot
    async with open_client(n1.address) as client:
        await client.put(b"big", value, w=3)
        await client.put(b"cold", cold, w=3)
    assert n3.stop() == 0
    blobs = sorted((p for p in (n3.data_dir / "blobs").glob("??/*")
                    if not p.name.endswith(".sum")), key=lambda p: -p.stat().st_size)
    assert len(blobs) == 2
    flip_a_bit_in_blob(blobs[0], 3 * MiB + 77)
    flip_a_bit_in_blob(blobs[1], MiB + 3)
    n3.start()
    await wait_states(nodes, {"n1": "UN", "n2": "UN", "n3": "UN"}, nodes)
    backup = kvctl("backup", "-o", str(tmp_path / "n3.backup"), host=n3.address)
    assert backup.returncode == 1  # rot is not carried into a backup
    assert backup.stderr.decode().count("\n") == 1 and "damaged" in backup.stderr.decode()
    assert not (tmp_path / "n3.backup").exists()

    async def read(node, r):
        async with open_client(node.address) as client:
            return [s.value for s in (await client.get(b"big", r=r)).siblings]

    assert await read(n3, 1) == [value], "rotted bytes were served"
    assert await read(n3, 1) == [value]
    assert await read(n3, 2) == [value]
    assert await read(n1, 2) == [value]
    with trio.fail_after(30):  # read repair refills n3's copy: then R=3 is met
        while blobs[0].read_bytes() != value:
            await trio.sleep(0.2)
    assert await read(n1, 3) == [value]
    # No read reaches "cold": `kvctl repair --verify` finds its rot (exit 1, naming what it
    # found) and read repair rewrites it, without any client reading it.
    verify = kvctl("--json", "repair", "--wait", "--verify", host=n3.address)
    assert verify.returncode == 1, verify
    found = json.loads(verify.stdout)["repair"]
    assert found["copies_damaged"] == 1 and found["copies_checked"] == 2, found
    assert "1 damaged" in verify.stderr.decode() and verify.stderr.decode().count("\n") == 1
    with trio.fail_after(30):
        while blobs[1].read_bytes() != cold:
            await trio.sleep(0.2)
    verify = kvctl("--json", "repair", "--wait", "--verify", host=n3.address)
    assert verify.returncode == 0, verify
    assert json.loads(verify.stdout)["repair"]["copies_damaged"] == 0
    assert kvctl("backup", "-o", str(tmp_path / "n3.backup"), host=n3.address).returncode == 0
    log = n3.log_text()
    assert "Traceback" not in log
    assert "checksum" in log


async def test_a_node_whose_dot_lease_record_was_lost_mints_under_a_new_incarnation(tmp_path):
    """The durable high-water mark of the node's dot counters (kvd.node.local Rule 6) is
    one LevelDB record. Lost (deleted, or rotted and dropped), the node restarted its
    sequence at 1: a write to a key it had written before was refused as "a forged
    context" (the outside tester's D12), and a key whose clock a purge forgot could get a
    dot a surviving copy already holds. The node now mints under a new incarnation."""
    from kvd.node.data_dir import load_identity
    from kvd.node.dot_leases import lease_key
    from kvd.node.local import LocalStore
    from kvd.storage.blobs import MemoryBlobStore

    async with open_storage(str(tmp_path / "db")) as storage:
        before = await load_identity(storage, "n1", 1.0)
        store = LocalStore(storage, MemoryBlobStore(), 64)
        await store.sweep()  # as every start does: the store is under Rule 6 from day one
        obj = await store.coordinate(b"k", None, before.actor, value=b"one")
        obj = await store.coordinate(b"k", obj.clock, before.actor, value=b"two")
    db = plyvel.DB(str(tmp_path / "db"))
    assert db.get(lease_key(before.actor)) is not None
    db.delete(lease_key(before.actor), sync=True)
    db.close()
    async with open_storage(str(tmp_path / "db")) as storage:
        after = await load_identity(storage, "n1", 2.0)
        assert after.node == "n1" and after.actor != before.actor
        store = LocalStore(storage, MemoryBlobStore(), 64)
        await store.sweep()
        obj = await store.coordinate(b"k", store.read(b"k").clock, after.actor, value=b"three")
        assert [s.value for s in obj.siblings] == [b"three"]
    async with open_storage(str(tmp_path / "db")) as storage:  # a clean restart: the same
        assert (await load_identity(storage, "n1", 3.0)).actor == after.actor


async def test_a_transfer_never_copies_a_rotted_object_to_the_new_owner(tmp_path):
    """A partition's objects are sent to a joining node (or any new owner) from a scan of
    LevelDB. Scans were not checked, so a rotted copy went out as it was, and the new
    owner stored it under fresh checksums: a damaged value with a healthy dot, which read
    repair could then spread. The pages a source serves are now checked; a damaged object
    is left out (the new owner gets the key from the other replicas through anti-entropy;
    LevelDB checks whole blocks, so the other keys of its block go with it) and every
    other object of the partition is sent, byte for byte."""
    from kvd.node.transfers import scan_page

    slot = 3
    values = {b"key-%03d" % i: os.urandom(48) for i in range(300)}
    async with open_storage(str(tmp_path / "db")) as storage:
        await storage.write([(keys.object_key(slot, k), v) for k, v in values.items()])
    assert flip_a_bit_in(tmp_path / "db", [values[b"key-150"]])
    async with open_storage(str(tmp_path / "db")) as storage:
        start, stop = keys.object_range(slot)
        sent: dict[bytes, bytes] = {}
        while True:
            page = scan_page(storage, start, stop, limit=64, max_bytes=1 << 20)
            sent.update(page["objects"])
            if page["done"]:
                break
            start = keys.object_key(slot, page["objects"][-1][0]) + b"\x00"
        assert b"key-150" not in sent, "a rotted object was sent"
        assert all(values[k] == v for k, v in sent.items())
        left_out = set(values) - set(sent)
        assert len(left_out) < 100  # one 4 KiB block of 48-byte values
        for key in left_out:  # each one unreadable here, not merely skipped
            with pytest.raises(DamagedData):
                storage.get(keys.object_key(slot, key), checked=True)


async def test_a_checked_scan_names_each_damaged_record_and_yields_the_rest(tmp_path):
    """What transfers and hint deliveries read (Storage.iterate_sound): every record once,
    in key order, either yielded with its stored bytes or named as damaged, never served
    rotted. Hints named damaged are dropped, not delivered (kvd.node.handoff)."""
    values = {b"key-%03d" % i: os.urandom(48) for i in range(300)}
    async with open_storage(str(tmp_path / "db")) as storage:
        await storage.write(list(values.items()))
    assert flip_a_bit_in(tmp_path / "db", [values[b"key-222"]])
    async with open_storage(str(tmp_path / "db")) as storage:
        damaged: list[bytes] = []
        seen = []
        for key, value in storage.iterate_sound(b"", b"\xff", damaged.append):
            assert value == values[key]
            seen.append(key)
        assert b"key-222" in damaged and 0 < len(damaged) < 100
        assert sorted(seen + damaged) == sorted(values) and seen == sorted(seen)


def spoil_a_compressed_block(directory: Path) -> None:
    """Overwrite 8 bytes a third of the way into the LevelDB table in ``directory``: a
    data block, which snappy compressed whole, so not even its keys can be read back."""
    plyvel.DB(str(directory)).close()
    (table,) = directory.glob("*.ldb")
    data = bytearray(table.read_bytes())
    at = len(data) // 3
    data[at:at + 8] = bytes(b ^ 0xFF for b in data[at:at + 8])
    table.write_bytes(bytes(data))


async def test_a_checked_scan_goes_past_a_block_too_damaged_to_list_its_keys(tmp_path):
    """Compressible values (most values are) share snappy-compressed blocks, and one damaged
    byte makes a whole block unreadable, its keys included. A checked scan stopped there
    with DamagedData: a transfer of the partition retried that page for good (a stuck
    join or leave), hint deliveries stopped at it, and `repair --verify` checked nothing
    past it. The scan now skips just that block, tells which span it skipped, and yields
    every readable record after it, in key order."""
    values = {b"key-%04d" % i: b"compressible text number %d, " % i * 8 for i in range(2000)}
    async with open_storage(str(tmp_path / "db")) as storage:
        await storage.write(list(values.items()))
    spoil_a_compressed_block(tmp_path / "db")
    async with open_storage(str(tmp_path / "db")) as storage:
        with pytest.raises(DamagedData):  # the damage this test is about: keys unlisted
            list(storage.iterate_keys(b"", b"\xff"))
        damaged: list[bytes] = []
        skipped: list[tuple[bytes, bytes]] = []
        seen = []
        for key, value in storage.iterate_sound(b"", b"\xff", damaged.append,
                                                lambda *span: skipped.append(span)):
            assert value == values[key]
            seen.append(key)
        assert seen == sorted(seen) and seen[-1] == b"key-1999"
        assert len(skipped) == 1, skipped
        after, until = skipped[0]
        lost = set(values) - set(seen) - set(damaged)
        assert 0 < len(lost) <= 40, sorted(lost)  # a block or two of 4 KiB, no more
        assert all(after <= key < until for key in lost), (skipped, sorted(lost))


async def test_verify_rereads_the_keys_of_a_block_too_damaged_to_list_them(tmp_path, caplog):
    """`kvctl repair --verify` on a partition with a block too damaged to list its keys:
    the scan steps over the block, checks every copy past it, and takes the block's keys
    from the anti-entropy index, so that read repair rewrites those copies too. Before,
    the scan stopped at the block (an error) and checked nothing past it."""
    import logging

    from kvd.node.antientropy import AntiEntropy, RepairStats
    from kvd.node.local import LocalStore
    from kvd.storage.blobs import MemoryBlobStore

    values = {b"key-%04d" % i: b"compressible text number %d, " % i * 8 for i in range(2000)}
    async with open_storage(str(tmp_path / "db"), sync="none") as storage:
        store = LocalStore(storage, MemoryBlobStore(), 1)  # one partition, 0, holds every key
        async with trio.open_nursery() as nursery:
            for key, value in values.items():
                nursery.start_soon(partial(store.coordinate, key, {}, "a:1", value=value))
    spoil_a_compressed_block(tmp_path / "db")
    async with open_storage(str(tmp_path / "db")) as storage:
        store = LocalStore(storage, MemoryBlobStore(), 1)
        with pytest.raises(DamagedData):  # the damage this test is about: keys unlisted
            list(storage.iterate_keys(*keys.object_range(store.slot(0))))
        unreadable = set()
        for key in values:
            try:
                storage.get(keys.object_key(store.slot(0), key), checked=True)
            except DamagedData:
                unreadable.add(key)
        reread: list[bytes] = []

        async def record(key: bytes) -> None:
            reread.append(key)

        stats = RepairStats()
        with caplog.at_level(logging.ERROR, logger="kvd.aae"):
            await AntiEntropy(None, store, None).verify(0, record, stats)
    assert 0 < len(unreadable) <= 40
    assert set(reread) == unreadable, sorted(set(reread) ^ unreadable)
    assert (stats.copies_checked, stats.copies_damaged, stats.errors) == (
        len(values), len(unreadable), 0)
    assert "too damaged to list their keys" in caplog.text


async def test_a_transfer_pages_past_a_block_too_damaged_to_list_its_keys(tmp_path):
    """A partition's transfer to a new owner, from a store with a block too damaged to list
    its keys: every page from that block on failed, and the new owner's fetcher asked for
    it again and again, so the join or leave never finished. The pages now step over the
    block and reach the end; every object sent is the one stored."""
    from kvd.node.transfers import scan_page

    slot = 3
    values = {b"key-%04d" % i: b"compressible text number %d, " % i * 8 for i in range(2000)}
    async with open_storage(str(tmp_path / "db")) as storage:
        await storage.write([(keys.object_key(slot, k), v) for k, v in values.items()])
    spoil_a_compressed_block(tmp_path / "db")
    async with open_storage(str(tmp_path / "db")) as storage:
        start, stop = keys.object_range(slot)
        sent: dict[bytes, bytes] = {}
        for _ in range(100):
            page = scan_page(storage, start, stop, limit=64, max_bytes=1 << 20)
            sent.update(page["objects"])
            if page["done"]:
                break
            start = keys.object_key(slot, page["objects"][-1][0]) + b"\x00"
        assert page["done"], "the transfer never got past the damaged block"
        assert all(values[k] == v for k, v in sent.items())
        assert len(values) - 40 <= len(sent) < len(values)


async def test_a_node_whose_hints_share_a_block_too_damaged_to_list_starts(tmp_path, caplog):
    """A node counts its stored hints as it starts (kvd.node.handoff Rule 2). A block of
    hints too damaged to list its keys stopped the count with DamagedData, and with it the
    node's start. The count now steps over the block, once logged."""
    import logging
    from types import SimpleNamespace

    from kvd.clocks import REAL
    from kvd.node.handoff import Handoff

    hints = {keys.hint_key("n2", seq): b"a compressible hint number %d, " % seq * 8
             for seq in range(1, 2001)}
    async with open_storage(str(tmp_path / "db")) as storage:
        await storage.write(list(hints.items()))
    spoil_a_compressed_block(tmp_path / "db")
    async with open_storage(str(tmp_path / "db")) as storage:
        handoff = Handoff(SimpleNamespace(storage=storage, store=None, config=None,
                                          clocks=REAL))
        with caplog.at_level(logging.ERROR, logger="kvd.handoff"):
            await handoff.load()
    assert len(hints) - 40 <= handoff.pending()["n2"] < len(hints)
    assert caplog.text.count("too damaged to list their keys") == 1


async def test_a_verify_whose_index_cannot_name_a_damaged_block_s_keys_counts_an_error(caplog):
    """When the anti-entropy index cannot name the keys of a block too damaged to list them
    (its own block damaged too), `repair --verify` counts an error and logs it; the copies
    found damaged are still re-read, and the repair goes on. A repair runs in the node's
    nursery: an exception out of it would take the node down."""
    import logging

    from kvd import versions
    from kvd.node.antientropy import AntiEntropy, RepairStats
    from kvd.storage.blobs import MemoryBlobStore

    sound = versions.encode_object(versions.update(versions.empty(), {}, "a:1", value=b"v")[0])

    class Storage:
        def iterate_sound(self, start, stop, damaged, skipped):
            yield keys.object_key(3, b"good"), sound
            damaged(keys.object_key(3, b"rotted"))
            skipped(keys.object_key(3, b"s"), keys.object_key(3, b"t"))
            yield keys.object_key(3, b"undecodable"), b"\xc1 not an object"

        def iterate_keys(self, start, stop):
            raise DamagedData("corruption: bad block handle")
            yield

    class Store:
        storage, blobs = Storage(), MemoryBlobStore()

        def slot(self, partition):
            return partition

    reread: list[bytes] = []

    async def record(key: bytes) -> None:
        reread.append(key)

    stats = RepairStats()
    with caplog.at_level(logging.ERROR, logger="kvd.aae"):
        await AntiEntropy(None, Store(), None).verify(3, record, stats)
    assert (stats.copies_checked, stats.copies_damaged, stats.errors) == (3, 2, 1)
    assert sorted(reread) == [b"rotted", b"undecodable"]
    assert "its anti-entropy index cannot name them either" in caplog.text
