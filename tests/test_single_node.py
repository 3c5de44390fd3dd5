"""A real single kvd process on loopback, driven by the client library and the kvctl CLI."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import struct
import threading
import time

import pytest
import trio

from kvd.client import open_client
from kvd.errors import ConnectFailed, KvdError
from kvd.proto import codec
from kvd.proto.messages import MsgType
from tests.procs import KvdProcess, free_port, kvctl, rss_kib

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    """One daemon for the tests that each use keys of their own and measure no memory."""
    proc = KvdProcess(tmp_path_factory.mktemp("single") / "n1" / "data").start()
    yield proc
    proc.kill()


@pytest.fixture
def own_node(tmp_path):
    """A daemon of the test's own: its memory is measured."""
    proc = KvdProcess(tmp_path / "n1" / "data").start()
    yield proc
    proc.kill()


async def test_acknowledged_writes_survive_sigkill(tmp_path):
    proc = KvdProcess(tmp_path / "n1" / "data", extra={"sync": "batch"}).start()
    acked: dict[bytes, bytes] = {}
    target = 6000

    async def writer(client, worker):
        i = 0
        while True:
            key = b"w%d-%d" % (worker, i)
            value = hashlib.sha256(key).digest() * 4
            try:
                await client.put(key, value)
            except KvdError:
                return
            acked[key] = value
            i += 1

    async def killer():
        while len(acked) < target:
            await trio.sleep(0.01)
        proc.kill()  # SIGKILL while 64 writers are mid-flight

    try:
        async with trio.open_nursery() as nursery:
            clients = []
            for _ in range(4):
                clients.append(await nursery.start(_client_task, proc.address))
            nursery.start_soon(killer)
            with trio.fail_after(120):
                async with trio.open_nursery() as writers:
                    for worker in range(64):
                        writers.start_soon(writer, clients[worker % 4], worker)
            nursery.cancel_scope.cancel()
        assert len(acked) >= 5000
        proc.start()
        missing = []
        async with open_client(proc.address) as client:
            for key, value in acked.items():
                result = await client.get(key)
                if not result.found or [s.value for s in result.siblings] != [value]:
                    missing.append(key)
        assert missing == [], f"{len(missing)} of {len(acked)} acknowledged writes lost"
    finally:
        proc.kill()


async def _client_task(address, *, task_status=trio.TASK_STATUS_IGNORED):
    try:
        async with open_client(address) as client:
            task_status.started(client)
            await trio.sleep_forever()
    except KvdError:
        pass


def _raw_connection(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    return sock


def _closed_by_server(sock: socket.socket) -> bytes:
    """Read until the server closes; returns what it sent (an ERROR frame, at most)."""
    data = b""
    sock.settimeout(10)
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk


def _hello() -> bytes:
    return codec.encode(MsgType.HELLO, 0, {"versions": [1], "role": "client"})


@pytest.mark.parametrize(
    "attack",
    ["garbage", "truncated", "oversized_preauth", "oversized_4gib", "garbage_after_hello"],
)
async def test_bad_frames_close_only_that_connection(node, attack):
    async with open_client(node.address) as bystander:
        await bystander.put(b"bystander", b"still here")
        sock = _raw_connection(node.port)
        header = struct.Struct(">2sBBBII")
        if attack == "garbage":
            sock.sendall(os.urandom(64) + b"\x00" * 64)
        elif attack == "truncated":
            frame = _hello()
            sock.sendall(frame[:-3])
            sock.shutdown(socket.SHUT_WR)
        elif attack == "oversized_preauth":
            sock.sendall(header.pack(b"KV", 1, MsgType.HELLO, 0, 1, 17 * 1024))
        elif attack == "oversized_4gib":
            sock.sendall(_hello())
            sock.sendall(header.pack(b"KV", 1, MsgType.PUT, 0, 7, 0xFFFFFFFF))
        elif attack == "garbage_after_hello":
            sock.sendall(_hello() + b"\xde\xad\xbe\xef" * 8)
        reply = await trio.to_thread.run_sync(_closed_by_server, sock)
        sock.close()
        if attack != "truncated":
            # The server says why before closing (an ERROR frame with code protocol).
            decoder = codec.FrameDecoder(1 << 20)
            decoder.receive_data(reply)
            messages = []
            while (m := decoder.next_message()) not in (codec.NEED_DATA, None):
                messages.append(m)
            errors = [m for m in messages if m.type == MsgType.ERROR]
            assert errors and errors[-1].fields["code"] in ("protocol", "frame_too_large")
        # The daemon and the other client are unaffected.
        result = await bystander.get(b"bystander")
        assert result.siblings[0].value == b"still here"
    async with open_client(node.address) as fresh:
        await fresh.ping()
    assert node.proc.poll() is None


def test_unreachable_host_exits_4_with_one_line():
    port = free_port()  # nothing listens there
    result = kvctl("get", "k", host=f"127.0.0.1:{port}")
    assert result.returncode == 4
    err = result.stderr.decode()
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert "cannot connect" in err


def test_kvctl_put_get_delete_and_siblings(node, kvctl_cli):
    kvctl = kvctl_cli  # in process: the same app, without a subprocess per call
    host = node.address
    assert kvctl("put", "greeting", "hello", host=host).returncode == 0
    got = kvctl("--json", "get", "greeting", host=host)
    assert got.returncode == 0, got.stderr
    doc = json.loads(got.stdout)
    assert doc["siblings"] == [{"value": "hello", "encoding": "utf-8", "deleted": False,
                                "length": 5}]
    context = doc["context"]
    # A write without a context supersedes what the cluster holds: one value, not two.
    assert kvctl("put", "greeting", "bonjour", host=host).returncode == 0
    doc = json.loads(kvctl("--json", "get", "greeting", host=host).stdout)
    assert [s["value"] for s in doc["siblings"]] == ["bonjour"]
    # A stale context from the first read does not discard the newer write: sibling.
    assert kvctl("put", "greeting", "stale", "--context", context, host=host).returncode == 0
    doc = json.loads(kvctl("--json", "get", "greeting", host=host).stdout)
    assert sorted(s["value"] for s in doc["siblings"]) == ["bonjour", "stale"]
    # Writing back with the merged context resolves them.
    assert kvctl("put", "greeting", "hi", "--context", doc["context"], host=host).returncode == 0
    doc = json.loads(kvctl("--json", "get", "greeting", host=host).stdout)
    assert [s["value"] for s in doc["siblings"]] == ["hi"]
    # A delete without a context deletes (it used to leave the value as a sibling).
    assert kvctl("delete", "greeting", host=host).returncode == 0
    missing = kvctl("get", "greeting", host=host)
    assert missing.returncode == 1
    assert "not found" in missing.stderr.decode()
    # Binary values come back base64 in JSON; stdin works.
    assert kvctl("put", "bin", "-", host=host, input=b"\xff\x00\xfe").returncode == 0
    doc = json.loads(kvctl("--json", "get", "bin", host=host).stdout)
    assert doc["siblings"][0]["encoding"] == "base64"
    raw = kvctl("get", "bin", host=host)
    assert raw.stdout == b"\xff\x00\xfe"


def test_kvctl_usage_errors(node, kvctl_cli):
    kvctl = kvctl_cli  # in process: the same app, without a subprocess per call
    too_long = "k" * 1025
    result = kvctl("put", too_long, "v", host=node.address)
    assert result.returncode == 2
    result = kvctl("put", "k", "v", "--context", "!!notbase64!!", host=node.address)
    assert result.returncode in (1, 2)
    assert "Traceback" not in result.stderr.decode()
    result = kvctl("put", "k", "v", "-w", "5", host=node.address)
    assert result.returncode == 2
    assert "w=5" in result.stderr.decode()


def test_status_and_inspect_json(node, kvctl_cli):
    kvctl = kvctl_cli  # in process: the same app, without a subprocess per call
    kvctl("put", "k1", "v1", host=node.address)
    status = json.loads(kvctl("--json", "status", host=node.address).stdout)
    (me,) = status["nodes"]
    for field in ("node", "state", "address", "peer_address", "load_bytes", "partitions",
                  "ownership"):
        assert field in me
    assert me["state"] == "UN" and me["node"] == "n1"
    inspect = json.loads(kvctl("--json", "inspect", "k1", host=node.address).stdout)
    assert inspect["key"] == "k1"
    (replica,) = inspect["replicas"]
    assert replica["present"] and replica["role"] == "primary" and replica["siblings"] == 1
    assert replica["digest"]


def test_large_value_round_trip_with_bounded_memory(own_node, tmp_path):
    node = own_node
    size = 100 * 1024 * 1024
    source = tmp_path / "big.bin"
    with open(source, "wb") as out:
        block = os.urandom(1 << 20)
        for i in range(size >> 20):
            out.write(hashlib.sha256(b"%d" % i).digest() + block[32:])
    peak = [rss_kib(node.proc.pid)]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            try:
                peak.append(rss_kib(node.proc.pid))
            except (OSError, KeyError):
                return
            time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        put = kvctl("put", "big", "--file", str(source), host=node.address, timeout=300)
        assert put.returncode == 0, put.stderr
        target = tmp_path / "copy.bin"
        got = kvctl("get", "big", "--output", str(target), host=node.address, timeout=300)
        assert got.returncode == 0, got.stderr
    finally:
        stop.set()
        sampler.join()
    assert _sha(target) == _sha(source)
    peak_mib = max(max(peak), rss_kib(node.proc.pid, "VmHWM")) / 1024
    print(f"kvd peak RSS during 100 MiB put+get: {peak_mib:.1f} MiB")
    assert peak_mib < 100


def _sha(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def test_sigterm_drains_and_exits_zero(tmp_path):
    proc = KvdProcess(tmp_path / "n1" / "data").start()
    kvctl("put", "k", "v", host=proc.address)
    assert proc.stop() == 0
    assert "Traceback" not in proc.log_text()
    proc.start()
    got = kvctl("get", "k", host=proc.address)
    assert got.stdout == b"v"
    proc.kill()


async def test_many_requests_in_flight_on_one_connection(node):
    async with open_client(node.address) as client:
        async with trio.open_nursery() as nursery:
            for i in range(200):
                nursery.start_soon(client.put, b"m%d" % i, b"v%d" % i)
        results = {}

        async def read(i):
            results[i] = await client.get(b"m%d" % i)

        async with trio.open_nursery() as nursery:
            for i in range(200):
                nursery.start_soon(read, i)
    assert all(results[i].siblings[0].value == b"v%d" % i for i in range(200))


async def test_connect_refused_raises_connect_failed():
    with pytest.raises(ConnectFailed):
        async with open_client(f"127.0.0.1:{free_port()}"):
            pass


async def test_a_client_that_never_reads_its_replies_is_bounded(own_node):
    """The connection's reader answers GETs itself (no task each); it stops reading when
    the client does not read what it answered, so memory stays bounded."""
    node = own_node
    value = os.urandom(64 * 1024)
    async with open_client(node.address) as client:
        await client.put(b"big", value)
    before = rss_kib(node.proc.pid)
    sock = _raw_connection(node.port)
    sock.sendall(_hello())
    decoder = codec.FrameDecoder(1 << 20)
    while (hello := decoder.next_message()) is codec.NEED_DATA:
        decoder.receive_data(sock.recv(65536))
    assert hello.type == MsgType.HELLO_OK
    # 4,000 GETs whose replies (256 MiB) the client never reads; sent from a thread, since
    # the node stops reading them too.
    requests = b"".join(codec.encode(MsgType.GET, rid, {"key": b"big"})
                        for rid in range(1, 4001))
    sender = threading.Thread(target=lambda: _send_ignoring_errors(sock, requests))
    sender.start()
    await trio.sleep(3)
    grown_mib = (rss_kib(node.proc.pid) - before) / 1024
    async with open_client(node.address) as other:  # and the node serves others meanwhile
        assert (await other.get(b"big")).siblings[0].value == value
    sock.close()
    sender.join(10)
    assert grown_mib < 32, f"RSS grew {grown_mib:.0f} MiB"


def _send_ignoring_errors(sock: socket.socket, data: bytes) -> None:
    try:
        sock.sendall(data)
    except OSError:
        pass  # closed by the test
