"""The RESP front door with real clients nobody here wrote: redis-cli and redis-benchmark
(Debian redis-tools, installed by `make ops-tools`) against one real node, redis-py over
RESP2 and RESP3 against a real 3-node cluster; tokens; hostile input. The semantics of
writes without a context are asserted in-process (tests/test_supersede_sim.py)."""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import subprocess
import time
import urllib.request

import pytest
import redis
import trio

from fuzz.fuzz_resp import samples
from kvd.client import open_client
from tests.procs import KvdProcess, free_port, kvctl, rss_kib
from tests.realcluster import GOSSIP, SMALL_RING, join_all, akvctl_json, wait_formed

REDIS_TOOLS = shutil.which("redis-cli") and shutil.which("redis-benchmark")
needs_tools = pytest.mark.skipif(
    not REDIS_TOOLS, reason="redis-tools is not installed (as root: make ops-tools)")


def _start(tmp_path, node_id="n1", seeds=None, **extra) -> KvdProcess:
    """A kvd daemon with a RESP port (``node.resp_port``)."""
    node = KvdProcess(tmp_path / node_id / "data", node_id=node_id, seeds=seeds,
                      extra={"resp_listen": f"127.0.0.1:{free_port()}", **extra})
    node.resp_port = int(node.extra["resp_listen"].rpartition(":")[2])
    return node.start()


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    started = _start(tmp_path_factory.mktemp("resp"), metrics_listen=f"127.0.0.1:{free_port()}")
    yield started
    started.kill()


def cli(node, *args, input: bytes | None = None, timeout: float = 60) -> bytes:
    done = subprocess.run(["redis-cli", "-p", str(node.resp_port), *args], input=input,
                          capture_output=True, timeout=timeout, check=True)
    return done.stdout


@needs_tools
def test_redis_cli_ping_set_get_del_a_10_mib_value_and_scan(node, tmp_path):
    assert cli(node, "PING") == b"PONG\n"
    assert cli(node, "SET", "greeting", "hello") == b"OK\n"
    assert cli(node, "SET", "greeting", "hello again") == b"OK\n"  # supersedes: no sibling
    assert cli(node, "GET", "greeting") == b"hello again\n"
    assert cli(node, "DEL", "greeting", "never-written") == b"1\n"
    assert cli(node, "GET", "greeting") == b"\n"  # nil
    assert cli(node, "EXISTS", "greeting") == b"0\n"
    value = random.Random(1).randbytes(10 << 20)
    assert cli(node, "-x", "SET", "big", input=value) == b"OK\n"
    assert cli(node, "STRLEN", "big") == b"10485760\n"
    assert cli(node, "--raw", "GET", "big")[:-1] == value  # redis-cli adds a newline
    for i in range(30):
        cli(node, "SET", f"scan:{i}", str(i))
    listed = cli(node, "--scan", "--pattern", "scan:*").split()
    assert sorted(listed) == sorted(f"scan:{i}".encode() for i in range(30))
    assert b"unknown command 'FLUSHALL'" in cli(node, "FLUSHALL")
    assert b"kvd_node:n1" in cli(node, "INFO", "server")
    assert cli(node, "CONFIG", "GET", "appendonly") == b"appendonly\nno\n"
    with urllib.request.urlopen(f"http://{node.extra['metrics_listen']}/metrics") as page:
        metrics = page.read().decode()
    assert 'kvd_resp_command_duration_seconds_count{command="set",outcome="ok"}' in metrics


@needs_tools
@pytest.mark.slow
@pytest.mark.alone  # 32 connections hammering one node: it saturates the machine
def test_redis_benchmark_completes_without_errors(node):
    """500 requests per test here (KVD_RESP_BENCH_N: the issue's 20,000 takes minutes on a
    busy machine, MSET being ten SETs of one key in turn); the figures are make bench's."""
    done = subprocess.run(
        ["redis-benchmark", "-p", str(node.resp_port), "-t", "ping,set,get,mset",
         "-n", os.environ.get("KVD_RESP_BENCH_N", "500"), "-c", "32", "-d", "1024", "--csv"],
        capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.decode().splitlines()
    assert {line.split(",")[0].strip('"') for line in lines[1:]} >= {
        "PING_INLINE", "PING_MBULK", "SET", "GET", "MSET (10 keys)"}, lines
    assert b"Error" not in done.stdout + done.stderr


def _tokens_file(tmp_path) -> str:
    """A tokens file with a read token (viewer) and a write token (app)."""
    tokens = tmp_path / "tokens.toml"
    tokens.write_text('[tokens]\nviewer = { token = "read-token-0123456789", role = "read" }\n'
                      'app = { token = "write-token-0123456789", role = "write" }\n')
    tokens.chmod(0o600)
    return str(tokens)


def test_a_read_token_reads_and_a_missing_token_gets_noauth(tmp_path):
    node = _start(tmp_path, client_tokens_file=_tokens_file(tmp_path))
    try:
        anonymous = redis.Redis(port=node.resp_port)
        with pytest.raises(redis.AuthenticationError):
            anonymous.get("k")
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=node.resp_port, password="wrong-token-0123456789").get("k")
        writer = redis.Redis(port=node.resp_port, password="write-token-0123456789", protocol=3)
        assert writer.set("k", "v") is True
        reader = redis.Redis(port=node.resp_port, username="viewer",
                             password="read-token-0123456789")
        assert reader.get("k") == b"v"
        with pytest.raises(redis.exceptions.NoPermissionError):
            reader.set("k", "w")
        with socket.create_connection(("127.0.0.1", node.resp_port)) as raw:
            raw.sendall(b"HELLO 3\r\n")  # tells nothing about the node before AUTH
            assert raw.recv(100).startswith(b"-NOAUTH HELLO must be called")
        # Before AUTH the limits are Redis's after CVE-2021-32675: 11 arguments close it.
        with socket.create_connection(("127.0.0.1", node.resp_port)) as raw:
            raw.sendall(b"*11\r\n")
            assert raw.recv(100).startswith(b"-ERR Protocol error: invalid multibulk length")
            assert raw.recv(100) == b""
    finally:
        node.kill()


def test_a_read_token_gets_noperm_for_a_set_above_chunk_size_as_for_a_small_one(tmp_path):
    """A value above chunk_size streams (kvd.proto.resp); its SET from a read token got a
    generic -ERR where a small SET gets -NOPERM, so a client could not tell why. The value is
    read through and dropped: the connection stays in step and nothing is written."""
    node = _start(tmp_path, client_tokens_file=_tokens_file(tmp_path), chunk_size=64 * 1024)
    try:
        with socket.create_connection(("127.0.0.1", node.resp_port), timeout=30) as raw:
            replies = raw.makefile("rb")
            raw.sendall(b"AUTH read-token-0123456789\r\n")
            assert replies.readline() == b"+OK\r\n"
            small, large = b"v" * 10, b"v" * (200 * 1024)
            for value, options in ((small, []), (large, []), (large, [b"NX"])):
                args = [b"SET", b"k", value, *options]
                raw.sendall(b"*%d\r\n" % len(args)
                            + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args))
            refused = replies.readline()
            assert refused.startswith(b"-NOPERM viewer has role read"), refused
            assert (replies.readline(), replies.readline()) == (refused, refused)
            raw.sendall(b"EXISTS k\r\nPING\r\n")
            assert (replies.readline(), replies.readline()) == (b":0\r\n", b"+PONG\r\n")
    finally:
        node.kill()


async def _form_resp_cluster(tmp_path, procs) -> list[KvdProcess]:
    nodes: list[KvdProcess] = []
    for node_id in ("n1", "n2", "n3"):
        seeds = [nodes[0].peer_address] if nodes else None
        nodes.append(_start(tmp_path, node_id, seeds, **GOSSIP, **SMALL_RING))
        procs.append(nodes[-1])
    await join_all(nodes[0], nodes[1:])
    await akvctl_json(nodes[0], "cluster", "commit")
    await wait_formed(nodes)
    return nodes


@pytest.mark.slow
async def test_redis_py_resp2_and_resp3_pipelines_conflicts_and_kvctl_keys(tmp_path, procs):
    nodes = await _form_resp_cluster(tmp_path, procs)
    clients = [redis.Redis(port=nodes[0].resp_port),
               redis.Redis(port=nodes[1].resp_port, protocol=3)]
    # 300 keys a prefix: a deep pipeline, and keys in nearly every one of the 64 partitions;
    # each pipelined SET is a replicated write (~4 CPU-s a thousand over the three nodes).
    count = 300
    for number, r in enumerate(clients):
        with r.pipeline(transaction=False) as pipe:
            for i in range(count):
                pipe.set(f"p{number}:{i}", f"value {i}")
            assert pipe.execute() == [True] * count
        with r.pipeline(transaction=False) as pipe:
            for i in range(count):
                pipe.get(f"p{number}:{i}")
            assert pipe.execute() == [f"value {i}".encode() for i in range(count)]
    for r in clients:  # what a client library asks on its own, in both protocols
        table = r.command()
        assert table["get"]["arity"] == 2
        # Key positions (first, last, step), as a cluster-aware client or proxy reads them.
        positions = {name: (table[name]["first_key_pos"], table[name]["last_key_pos"],
                            table[name]["step_count"])
                     for name in ("get", "set", "mget", "mset", "del", "exists", "scan",
                                  "dbsize", "ping")}
        assert positions == {"get": (1, 1, 1), "set": (1, 1, 1), "mget": (1, -1, 1),
                             "mset": (1, -1, 2), "del": (1, -1, 1), "exists": (1, -1, 1),
                             "scan": (0, 0, 0), "dbsize": (0, 0, 0), "ping": (0, 0, 0)}
        flags = {name: {f if isinstance(f, str) else f.decode() for f in table[name]["flags"]}
                 for name in ("get", "set")}
        assert "readonly" in flags["get"] and "write" in flags["set"], flags
        # COMMAND GETKEYS, as a proxy asks for a command it cannot parse itself.
        def getkeys(*call):  # redis-py decodes them in RESP2, not in RESP3
            return [k.decode() if isinstance(k, bytes) else k for k in r.command_getkeys(*call)]

        assert getkeys("MSET", "a", "1", "b", "2") == ["a", "b"]
        assert getkeys("GET", "k") == ["k"]
        for call, error in ((("PING",), "no key arguments"), (("NOPE", "x"), "Invalid command"),
                            (("GET", "a", "b"), "number of arguments")):
            with pytest.raises(redis.ResponseError, match=error):
                r.command_getkeys(*call)
        assert r.info("cluster")["kvd_members"] == 3
    other = redis.Redis(port=nodes[2].resp_port, protocol=3)
    assert other.mget(["p0:1", "p1:2", "absent"]) == [b"value 1", b"value 2", None]
    assert other.client_info()["resp"] == "3"
    assert other.dbsize() == 2 * count
    assert sorted(other.scan_iter(match="p1:29*", count=50)) == sorted(
        [b"p1:29"] + [b"p1:29%d" % i for i in range(10)])

    # Two blind writes are siblings: GET refuses to pick one; KV.GET + KV.PUT resolve it.
    async with open_client(nodes[0].address) as native:
        await native.put(b"sib", b"one", blind=True)
        await native.put(b"sib", b"two", blind=True)
    for r in clients:
        with pytest.raises(redis.ResponseError, match="CONFLICT .* has 2 siblings"):
            r.get("sib")
    context, *values = clients[1].execute_command("KV.GET", "sib")
    assert sorted(values) == [b"one", b"two"]
    assert clients[0].execute_command("KV.PUT", "sib", "merged", context) == 1
    assert clients[1].get("sib") == b"merged"
    # A SET by a client that has seen both siblings leaves one.
    async with open_client(nodes[1].address) as native:
        await native.put(b"sib2", b"a", blind=True)
        await native.put(b"sib2", b"b", blind=True)
    assert clients[0].set("sib2", "c") is True
    assert clients[1].get("sib2") == b"c"

    # kvctl keys over the same cluster (the real CLI): complete, once each, as JSON lines.
    listed = await trio.to_thread.run_sync(lambda: kvctl("--json", "keys", "--prefix", "p0:",
                                                         host=nodes[1].address))
    assert listed.returncode == 0, listed.stderr
    assert b"full scan" in listed.stderr
    keys = [json.loads(line)["key"] for line in listed.stdout.splitlines()]
    assert sorted(keys) == sorted(f"p0:{i}" for i in range(count))
    limited = await trio.to_thread.run_sync(lambda: kvctl("keys", "--limit", "5",
                                                          host=nodes[2].address))
    assert len(limited.stdout.splitlines()) == 5


@needs_tools
def test_hostile_input_leaves_the_node_serving_others(tmp_path):
    node = _start(tmp_path)
    try:
        cli(node, "SET", "canary", "alive")
        before = rss_kib(node.proc.pid)
        hostile = [b"*2147483647\r\n", b"*1\r\n$4294967296\r\n", b"A" * (1 << 20),
                   b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$5\r\nab", b"\x00\xff*-1\r\n$",
                   b"*2\r\n$3\r\nGET\r\n:1\r\n"]
        rng = random.Random(7)
        hostile += [rng.randbytes(rng.randrange(1, 2000)) for _ in range(100)]
        for _ in range(100):  # valid requests with a few bytes changed
            mutated = bytearray(rng.choice(samples()))
            for _ in range(rng.randrange(1, 4)):
                mutated[rng.randrange(len(mutated))] = rng.randrange(256)
            hostile.append(bytes(mutated))
        for data in hostile:
            with socket.create_connection(("127.0.0.1", node.resp_port)) as raw:
                try:
                    raw.sendall(data)
                    raw.shutdown(socket.SHUT_WR)
                    raw.settimeout(10)
                    while raw.recv(65536):
                        pass
                except OSError:
                    pass  # closed on us mid-send: refused, as it should be
        half_open = []
        for _ in range(500):
            s = socket.create_connection(("127.0.0.1", node.resp_port))
            s.sendall(b"*3\r\n$3\r\nSET\r\n")
            half_open.append(s)
        assert cli(node, "GET", "canary") == b"alive\n"
        for s in half_open:
            s.close()
        # A client that pipelines without ever reading replies: kvd stops reading it once
        # its replies back up, so its memory for that connection stays bounded.
        with socket.create_connection(("127.0.0.1", node.resp_port)) as greedy:
            greedy.setblocking(False)
            pings, sent, stuck_since = b"PING\r\n" * 50_000, 0, None
            while sent < 200 << 20:
                try:
                    sent += greedy.send(pings)
                    stuck_since = None
                except BlockingIOError:
                    stuck_since = stuck_since or time.monotonic()
                    if time.monotonic() - stuck_since > 3:
                        break
                    time.sleep(0.05)
            assert sent < 200 << 20, "kvd kept reading a client that reads no replies"
            assert cli(node, "GET", "canary") == b"alive\n"
            assert rss_kib(node.proc.pid) - before < 20 * 1024
        assert node.proc.poll() is None
        assert rss_kib(node.proc.pid) - before < 20 * 1024
    finally:
        node.kill()


def test_resp_listen_is_off_by_default_and_set_by_file_env_or_flag(tmp_path):
    from kvd.config import load_config
    from kvd.errors import ConfigError
    from kvd.main import build_parser, overrides_from_args

    assert load_config(None, env={}).resp_listen == ""
    assert load_config(None, env={"KVD_RESP_LISTEN": "127.0.0.1:7382"}).resp_listen \
        == "127.0.0.1:7382"
    flags = overrides_from_args(build_parser().parse_args(["--resp-listen", "[::1]:7382"]))
    assert load_config(None, env={}, overrides=flags).resp_listen == "[::1]:7382"
    secret = tmp_path / "secret"
    secret.write_text("a-cluster-secret-of-some-length")
    secret.chmod(0o600)
    with pytest.raises(ConfigError, match="resp_listen 0.0.0.0:7382 is not loopback: set "
                                          "client_tokens_file"):
        load_config(None, env={"KVD_RESP_LISTEN": "0.0.0.0:7382",
                               "KVD_CLUSTER_SECRET_FILE": str(secret)})
    with pytest.raises(ConfigError, match="collides"):
        load_config(None, env={"KVD_RESP_LISTEN": "127.0.0.1:7379"})


def _piece(i: int) -> bytes:
    return i.to_bytes(4, "big") * (1 << 18)  # 1 MiB, different for each i


def test_a_256_mib_set_and_get_stream_through_bounded_memory(tmp_path):
    import hashlib

    node = _start(tmp_path)
    size, pieces = 256 << 20, 256
    try:
        with socket.create_connection(("127.0.0.1", node.resp_port)) as raw:
            raw.sendall(b"*3\r\n$3\r\nSET\r\n$3\r\nbig\r\n$%d\r\n" % size)
            sent = hashlib.sha256()
            for i in range(pieces):
                raw.sendall(_piece(i))
                sent.update(_piece(i))
            raw.sendall(b"\r\n")
            reader = raw.makefile("rb")
            assert reader.readline() == b"+OK\r\n"
            raw.sendall(b"*2\r\n$3\r\nGET\r\n$3\r\nbig\r\n")
            assert reader.readline() == b"$%d\r\n" % size
            received = hashlib.sha256()
            left = size
            while left:
                data = reader.read(min(left, 1 << 20))
                assert data, "connection closed in the middle of the value"
                received.update(data)
                left -= len(data)
            assert reader.read(2) == b"\r\n"
        assert received.hexdigest() == sent.hexdigest()
        peak = rss_kib(node.proc.pid, "VmHWM")
        assert peak < 150 * 1024, f"kvd's peak RSS was {peak / 1024:.0f} MiB"
    finally:
        node.kill()


def test_with_tls_configured_the_resp_port_speaks_tls(tmp_path):
    trustme = pytest.importorskip("trustme")
    from tests.test_security import tls_files

    files = tls_files(tmp_path / "tls", trustme.CA(), "n1")
    node = _start(tmp_path, **files, handshake_timeout=2.0)
    try:
        secure = redis.Redis(port=node.resp_port, ssl=True, ssl_ca_certs=files["tls_ca_file"])
        assert secure.set("k", "over tls") is True
        assert secure.get("k") == b"over tls"
        with pytest.raises(redis.ConnectionError):
            redis.Redis(port=node.resp_port, socket_timeout=10).get("k")
    finally:
        node.kill()


def test_a_pipeline_sent_whole_before_its_replies_are_read_completes(node):
    """redis-py's pipeline writes every command, then reads every reply. kvd used to stop
    reading while its replies waited for the client, which was still writing: both waited
    for good (an outside test: 1,000 GET and SET pairs of 100 KB; 60 pairs were enough).
    Replies now wait in a per-connection queue, up to 4 MiB (resp_service Rule 3), while
    commands are read, as Redis's output buffers do (without their limit)."""
    client = redis.Redis(port=node.resp_port, socket_timeout=20)
    value = os.urandom(100_000)
    client.set(b"pipe:src", value)
    pipe = client.pipeline(transaction=False)
    for i in range(60):
        pipe.get(b"pipe:src")
        pipe.set(b"pipe:%d" % i, value)
    replies = pipe.execute()  # a deadlock ends in TimeoutError at the 20 s socket_timeout
    assert replies == [value, True] * 60
    assert client.get(b"pipe:59") == value
