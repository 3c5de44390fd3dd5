"""Backup and restore of a node, and export/import of a cluster, with real processes
(issue 12, "Must show"): back up one node of three, keep writing, SIGKILL it, wipe its
data directory, `kvd restore` the backup, start it: it fetches what it missed before it
serves, every acknowledged key (written before or after the backup, small or streamed) is
present and every replica agrees. Then `kvctl export` of the cluster imported into a new
one-node cluster holds the same keys and values."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import msgpack
import pytest
import trio

from kvd.backup import BackupError, restore
from kvd.client import open_client
from kvd.node.data_dir import RESTORE_MARKER
from kvd.storage.keys import meta_key
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
    assert "new incarnation" not in n2.log_text()  # the restore's own one has its first lease

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
    # Every value of the cluster: private like a backup (outside tester: it was 0644)
    assert export_file.stat().st_mode & 0o777 == 0o600
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

    identity = msgpack.packb({"node": "n1", "incarnation": "i1", "created": 0.0})
    whole = b"".join(backup_records({"node": "n1", "cluster": "c"},
                                    [(meta_key("identity"), identity), (b"mx", b"1")],
                                    tmp_path / "no-blobs"))
    truncated = tmp_path / "truncated"
    truncated.write_bytes(whole[:-4])
    with open(truncated, "rb") as source, pytest.raises(BackupError, match="truncated"):
        await restore(source, tmp_path / "d2")
    assert (tmp_path / "d2" / RESTORE_MARKER).exists()  # kvd refuses to start on d2

    # One flipped bit anywhere, a byte appended, or a format-1 file (no checksum): refused.
    value = whole.index(b"mx\xc4\x01") + 4  # the value b"1" of mx
    damaged = {
        "flipped": whole[:value] + b"3" + whole[value + 1:],
        "appended": whole + b"\x00",
        "format 1": whole.replace(b"\xa6format\x02", b"\xa6format\x01", 1),
    }
    for name, data in damaged.items():
        (tmp_path / name).write_bytes(data)
        with open(tmp_path / name, "rb") as source, pytest.raises(BackupError) as caught:
            await restore(source, tmp_path / f"d-{name}")
        assert ("format 1 is not 2" if name == "format 1" else "damaged") in str(caught.value)

    with open(tmp_path / "intact", "wb") as f:
        f.write(whole)
    with open(tmp_path / "intact", "rb") as source:
        assert (await restore(source, tmp_path / "d3"))["records"] == 2
    assert not (tmp_path / "d3" / RESTORE_MARKER).exists()


def start_failing(node: KvdProcess) -> tuple[int, str]:
    """Start ``node`` expecting it to refuse its data directory: its exit code and the
    lines it logged."""
    before = len(node.log_text())
    node.start(wait=False)
    assert node.proc is not None
    code = node.proc.wait(60)
    return code, node.log_text()[before:]


async def test_a_damaged_backup_is_refused_and_leaves_no_startable_directory(tmp_path, procs):
    """Outside tester: one byte flipped in a blob passed for a backup and the node served the
    damaged value; a truncated backup left a directory kvd started on as healthy (UN), whose
    large value then failed. Both restores exit 1, and kvd refuses either directory."""
    config = {**CONFIG, "n": 1, "r": 1, "w": 1}
    n1 = start_node(tmp_path, procs, "n1", config)
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(3_000_000))
    out = await trio.to_thread.run_sync(lambda: run_kvctl(n1, "put", "bigkey", "-f", str(big)))
    assert out.returncode == 0, out.stderr.decode()
    backup_file = tmp_path / "n1.bk"
    out = await trio.to_thread.run_sync(
        lambda: run_kvctl(n1, "backup", "--output", str(backup_file)))
    assert out.returncode == 0, out.stderr.decode()
    n1.stop()

    whole = backup_file.read_bytes()
    flipped = bytearray(whole)
    flipped[2_000_000] ^= 0xFF  # inside the blob's bytes
    damaged = {"flip": bytes(flipped), "trunc": whole[:1_000_000]}
    for name, data in damaged.items():
        (tmp_path / f"{name}.bk").write_bytes(data)
        shutil.rmtree(n1.data_dir)
        done = await trio.to_thread.run_sync(
            lambda: kvd_restore(str(tmp_path / f"{name}.bk"), "--data-dir", str(n1.data_dir)))
        assert done.returncode == 1, (name, done.stderr)
        assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr
        assert "damaged" in done.stderr and "incomplete: wipe it" in done.stderr, done.stderr
        code, logged = await trio.to_thread.run_sync(start_failing, n1)
        assert code == 1, (name, logged)
        assert "restore" in logged and "wipe" in logged, logged
        assert "Traceback" not in logged, logged

    # The intact backup still restores, and the node serves the value it held.
    shutil.rmtree(n1.data_dir)
    done = await trio.to_thread.run_sync(
        lambda: kvd_restore(str(backup_file), "--data-dir", str(n1.data_dir)))
    assert done.returncode == 0, done.stderr
    n1.start()
    got = tmp_path / "got.bin"
    out = await trio.to_thread.run_sync(
        lambda: run_kvctl(n1, "get", "bigkey", "--output", str(got)))
    assert out.returncode == 0, out.stderr.decode()
    assert got.read_bytes() == big.read_bytes()




@pytest.fixture
def one_node(tmp_path, procs):
    node = KvdProcess(tmp_path / "n1" / "data").start()
    procs.append(node)
    return node


def test_backup_to_a_directory_is_refused_before_the_node_is_asked(tmp_path, kvctl_cli):
    """As `get -o DIR`: refused at once (the port has no node: nothing was asked of one),
    not after streaming the whole backup ("[Errno 21] Is a directory")."""
    from tests.procs import free_port

    refused = kvctl_cli("backup", "-o", str(tmp_path), host=f"127.0.0.1:{free_port()}")
    assert refused.returncode == 2, refused.stderr
    assert refused.stderr.decode().startswith(f"kvctl: error: --output {tmp_path}: is a "
                                              "directory")
    assert not tmp_path.with_name(tmp_path.name + ".partial").exists()


def test_a_backup_file_is_private_whatever_the_umask(tmp_path, one_node, kvctl_cli):
    """A backup is a copy of every value: 0600, as kvd keeps its data directory 0700."""
    import os

    target = tmp_path / "n1.kvdbackup"
    target.write_bytes(b"an older file")
    target.chmod(0o644)
    (tmp_path / "n1.kvdbackup.partial").write_bytes(b"left over")
    old = os.umask(0)
    try:
        out = kvctl_cli("backup", "-o", str(target), host=one_node.address)
    finally:
        os.umask(old)
    assert out.returncode == 0, out.stderr
    assert target.stat().st_mode & 0o777 == 0o600
    assert target.read_bytes()[:13] != b"an older file"


def test_backup_to_stdout_restores_and_never_goes_to_a_terminal(tmp_path, one_node, kvctl_cli,
                                                               monkeypatch):
    """`-o -` is standard output, as for export (for `kvd restore -` at the other end of a
    pipe); never a file named '-'."""
    from kvctl import render

    monkeypatch.chdir(tmp_path)
    out = kvctl_cli("backup", "-o", "-", host=one_node.address)
    assert out.returncode == 0, out.stderr
    assert "standard output" in out.stderr.decode()
    assert not (tmp_path / "-").exists()
    piped = tmp_path / "piped.kvdbackup"
    piped.write_bytes(out.stdout)
    restored = kvd_restore(str(piped), "--data-dir", str(tmp_path / "restored"))
    assert restored.returncode == 0, restored.stderr
    assert "restored node n1" in restored.stderr

    both = kvctl_cli("--json", "backup", "-o", "-", host=one_node.address)
    assert both.returncode == 2 and b"--json" in both.stderr and both.stdout == b""
    monkeypatch.setattr(render, "stdout_is_terminal", lambda: True)
    terminal = kvctl_cli("backup", "-o", "-", host=one_node.address)
    assert terminal.returncode == 2 and b"terminal" in terminal.stderr
    assert terminal.stdout == b""
