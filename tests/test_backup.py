"""Backup and restore of a node, and export/import of a cluster, with real processes
(issue 12, "Must show"): back up one node of three, keep writing, SIGKILL it, wipe its
data directory, `kvd restore` the backup, start it: it fetches what it missed before it
serves, every acknowledged key (written before or after the backup, small or streamed) is
present and every replica agrees. Then `kvctl export` of the cluster imported into a new
one-node cluster holds the same keys and values."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import trio

from kvd.backup import BackupError, restore
from kvd.client import open_client
from tests.procs import ROOT, KvdProcess
from tests.realcluster import (
    SMALL_RING,
    eventually,
    for_each,
    form_cluster,
    key_of,
    replicas_disagreeing,
    run_kvctl,
    start_node,
    value_of,
)

pytestmark = pytest.mark.slow

CONFIG = {**SMALL_RING, "chunk_size": 65536, "anti_entropy_interval": 2.0}
LARGE = bytes(range(256)) * 1024  # 256 KiB: streamed, kept in a blob file


async def put_all(node: KvdProcess, keys: list[bytes], suffix: bytes = b"") -> None:
    """Acknowledged writes of ``keys``, each superseding what its key held."""
    async def put(client, key):
        context = (await client.get(key)).context
        await client.put(key, value_of(key) + suffix, context=context)

    await for_each(node.address, keys, put, concurrency=16)


async def latest(node: KvdProcess, keys: list[bytes]) -> dict[bytes, list[bytes]]:
    seen = {}

    async def get(client, key):
        seen[key] = [s.value for s in (await client.get(key)).siblings if not s.deleted]

    await for_each(node.address, keys, get, concurrency=16)
    return seen


def kvd_restore(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kvd.main", "restore", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


async def test_backup_wipe_restore_rejoin_and_export_import(tmp_path, procs):
    nodes = await form_cluster(tmp_path, procs, CONFIG)
    n1, n2, _ = nodes
    before = [key_of(i, "before") for i in range(300)]
    await put_all(n1, before)
    async with open_client(n1.address) as client:
        await client.put(b"large", LARGE)

    backup_file = tmp_path / "n2.kvdbackup"
    out = await trio.to_thread.run_sync(
        lambda: run_kvctl(n2, "--json", "backup", "--output", str(backup_file)))
    assert out.returncode == 0, out.stderr.decode()
    doc = json.loads(out.stdout)
    assert doc["node"] == "n2" and doc["bytes"] == backup_file.stat().st_size > len(LARGE)

    # Acknowledged after the backup: new keys and new values of old ones.
    after = [key_of(i, "after") for i in range(200)]
    await put_all(n1, after)
    await put_all(n1, before[:50], b" v2")

    n2.kill()
    shutil.rmtree(n2.data_dir)
    restored = await trio.to_thread.run_sync(
        lambda: kvd_restore(str(backup_file), "--data-dir", str(n2.data_dir)))
    assert restored.returncode == 0, restored.stderr
    assert "restored node n2" in restored.stderr
    again = await trio.to_thread.run_sync(
        lambda: kvd_restore(str(backup_file), "--data-dir", str(n2.data_dir)))
    assert again.returncode == 1 and "is not empty" in again.stderr, again.stderr
    n2.start()

    async def restore_complete():
        return "restore complete" in n2.log_text(), n2.log_text()[-500:]

    await eventually("n2 restores", restore_complete, 120, nodes)
    assert "restored from a backup" in n2.log_text()

    everything = before + after + [b"large"]
    # Before any read (read repair): n2's own replica of every key is there already.
    async with open_client(n2.address) as client:
        absent = [k for k in everything
                  if not next(r for r in (await client.inspect(k))["replicas"]
                              if r["node"] == "n2")["present"]]
    assert not absent, absent[:5]

    async def converged():  # a replica a W=2 write missed gets it from anti-entropy
        problems = await replicas_disagreeing(n2, everything, {"n1", "n2", "n3"})
        return not problems, dict(list(problems.items())[:3])

    await eventually("replicas agree", converged, 120, nodes)
    expected = {k: [value_of(k) + (b" v2" if k in before[:50] else b"")] for k in before + after}
    expected[b"large"] = [LARGE]
    assert await latest(n2, everything) == expected

    # Export the cluster, import it into a new one-node cluster: the same keys and values,
    # siblings included.
    async with open_client(n1.address) as client:
        await client.put(b"twins", b"one", blind=True)
        await client.put(b"twins", b"two", blind=True)
    everything.append(b"twins")
    expected[b"twins"] = [b"one", b"two"]
    export_file = tmp_path / "cluster.jsonl"
    out = await trio.to_thread.run_sync(
        lambda: run_kvctl(n1, "export", "--output", str(export_file)))
    assert out.returncode == 0, out.stderr.decode()
    lines = [json.loads(line) for line in export_file.read_text().splitlines()]
    assert len(lines) == len(everything)
    assert all(line["context"] for line in lines)
    fresh = start_node(tmp_path, procs, "m1", CONFIG)
    out = await trio.to_thread.run_sync(lambda: run_kvctl(fresh, "import", str(export_file)))
    assert out.returncode == 0, out.stderr.decode()
    imported = await latest(fresh, everything)
    assert {k: sorted(v) for k, v in imported.items()} == expected


async def test_restore_refuses_what_is_not_a_complete_backup(tmp_path):
    bogus = tmp_path / "bogus"
    bogus.write_bytes(b"\x93\x01\x02\x03")
    with open(bogus, "rb") as source, pytest.raises(BackupError, match="not a kvd backup"):
        await restore(source, tmp_path / "d1")

    from kvd.backup import backup_records

    whole = b"".join(backup_records({"node": "n1", "cluster": "c"}, [(b"mx", b"1")],
                                    tmp_path / "no-blobs"))
    truncated = tmp_path / "truncated"
    truncated.write_bytes(whole[:-4])
    with open(truncated, "rb") as source, pytest.raises(BackupError, match="truncated"):
        await restore(source, tmp_path / "d2")
