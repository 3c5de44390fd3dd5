"""A full disk (ENOSPC), on real LevelDB and real blob files in a small tmpfs (root only, as
the chaos suite): nothing acknowledged is lost, and the errors name the cause.

LevelDB keeps appending to its log after an append failed, and at its next open it drops,
without a word, what was appended after the torn record: in this test before the fix, every
write acknowledged after the disk was freed (20 of 20) was gone after a reopen. So the store
refuses writes after a failed one until kvd restarts (kvd/storage/leveldb.py Rule 4)."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from kvd.storage import StorageError, open_storage
from kvd.storage.blobs import BlobStore
from tests.procs import KvdProcess

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("mount") is None,
    reason="needs root to mount a small tmpfs")


@pytest.fixture
def small_disk(tmp_path):
    """An 8 MiB tmpfs: filled in milliseconds, freed by deleting a file."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs",
                              str(mount_point)], capture_output=True, text=True)
    if mounted.returncode != 0:  # root without CAP_SYS_ADMIN (a container)
        pytest.skip(f"cannot mount a tmpfs: {mounted.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def _fill(disk) -> None:
    """Take every free byte with a file of junk (large values filling the disk)."""
    try:
        with open(disk / "junk", "wb", buffering=0) as junk:
            while True:
                junk.write(os.urandom(1 << 16))
    except OSError:
        pass


async def test_no_acknowledged_write_is_lost_to_a_full_disk_and_writes_wait_for_a_restart(
        small_disk):
    path = str(small_disk / "db")
    acknowledged = []
    async with open_storage(path) as storage:
        for i in range(100):
            await storage.write([(b"before%03d" % i, os.urandom(300))])
            acknowledged.append(b"before%03d" % i)
        _fill(small_disk)
        with pytest.raises(StorageError, match="No space left on device"):
            for i in range(10_000):
                await storage.write([(b"full%05d" % i, os.urandom(300))])
                acknowledged.append(b"full%05d" % i)
        (small_disk / "junk").unlink()  # the operator frees space
        refused = []
        for i in range(20):
            try:
                await storage.write([(b"after%02d" % i, os.urandom(300))])
                acknowledged.append(b"after%02d" % i)
            except StorageError as exc:
                refused.append(str(exc))
        assert len(refused) == 20 and "restart" in refused[0], refused[:1]
    async with open_storage(path) as storage:  # kvd restarted
        missing = [key for key in acknowledged if storage.get(key) is None]
        assert not missing, f"{len(missing)} acknowledged writes lost, e.g. {missing[:3]}"
        await storage.write([(b"restarted", b"v")])
        assert storage.get(b"restarted") == b"v"


async def test_a_value_written_to_a_full_disk_fails_naming_it_and_is_never_short(
        small_disk, monkeypatch):
    blobs = BlobStore(small_disk / "blobs")
    value = os.urandom(200_000)
    # A write the kernel takes only in part (as when the disk fills mid-write) is finished,
    # not left with a hole that a later write past it would fill with zeros.
    real_pwrite = os.pwrite
    monkeypatch.setattr(os, "pwrite", lambda fd, data, offset: real_pwrite(
        fd, bytes(data[:7000]), offset))
    await blobs.write(b"\x01" * 16, 0, value)
    monkeypatch.undo()
    assert await blobs.seal(b"\x01" * 16) == len(value)
    assert await blobs.read(b"\x01" * 16, 0, len(value)) == value
    _fill(small_disk)
    with pytest.raises(StorageError, match="No space left on device"):
        await blobs.write(b"\x02" * 16, 0, value)


def test_a_daemon_whose_disk_fills_refuses_writes_until_restarted_and_keeps_them_all(
        small_disk):
    """The same through a real kvd process: the refusal names the cause, /ready says why,
    reads go on, and after the operator frees space and restarts kvd every write it
    acknowledged is there and writes work again."""
    from kvd.blocking_client import connect
    from kvd.errors import KvdError
    from tests.procs import free_port
    from tests.test_ops import http_get

    metrics = free_port()
    node = KvdProcess(small_disk / "n1" / "data",
                      extra={"metrics_listen": f"127.0.0.1:{metrics}"}).start()
    acknowledged, refusals = [], []
    try:
        free = os.statvfs(small_disk)
        with open(small_disk / "junk", "wb", buffering=0) as junk:  # leave 64 KiB free
            junk.write(b"\0" * (free.f_bavail * free.f_frsize - (64 << 10)))
        with connect(node.address, timeout=10) as client:
            for i in range(400):
                try:
                    client.put(b"k%03d" % i, os.urandom(1000))
                    acknowledged.append(b"k%03d" % i)
                except KvdError as exc:
                    refusals.append(str(exc))
            assert acknowledged and refusals, (len(acknowledged), refusals[:1])
            assert "No space left on device" in refusals[0], refusals[0]
            (small_disk / "junk").unlink()  # the operator frees space
            with pytest.raises(KvdError, match="refuses writes since one failed.*restart"):
                client.put(b"after", b"v")
            assert client.get(acknowledged[0]).found  # reads go on
        status, body = http_get(metrics, "/ready")
        assert status == 503 and "refuses writes" in body, (status, body)
        node.kill()
        node.start()
        with connect(node.address, timeout=10) as client:
            missing = [key for key in acknowledged if not client.get(key).found]
            assert not missing, f"{len(missing)} acknowledged writes lost"
            client.put(b"after", b"v")
        assert http_get(metrics, "/ready")[0] == 200
    finally:
        node.kill()
