"""Issue 10, holes 2, 4 and 5: each attack reproduced against a node, then refused.

Hole 2 (forged contexts) and hole 4 (malformed bodies) run whole nodes in the simulator
(tests/sim: kvd.server.serve on kvd.net.memory under MockClock), where a logged traceback
is recorded in ``SimCluster.crashes``. Hole 5 (data directory modes) needs a real LevelDB
directory and a real umask, so it starts a real kvd process.
"""

from __future__ import annotations

import os
import sys

import msgpack
import pytest
import trio

sys.path.insert(0, os.path.dirname(__file__))
from sim.harness import SimCluster, seeded  # noqa: E402

from kvd import versions  # noqa: E402
from kvd.errors import BadRequest  # noqa: E402
from kvd.security import context_key  # noqa: E402


@pytest.fixture(autouse=True)
def _seeded():
    with seeded(1):
        yield


def _raw_context(vv: dict) -> bytes:
    """A context as a client could build it by hand: the flat sorted clock, packed."""
    flat: list = []
    for actor in sorted(vv):
        flat += [actor, vv[actor]]
    return msgpack.packb(flat, use_bin_type=True)


def _actor(sim: SimCluster, name: str = "n1") -> str:
    return sim.nodes[name].node.identity.actor


# ------------------------------------------------------------------ hole 2: forged contexts


async def test_a_forged_huge_counter_cannot_make_a_key_unwritable(autojump_clock):
    """Before: a context claiming counter 2**64-2 was accepted; every later PUT or DELETE of
    the key failed with `internal error` (OverflowError). Now the forged context is refused
    with bad_request and the key stays writable."""
    async with trio.open_nursery() as nursery:
        sim = SimCluster(nursery, seed=1)
        await sim.start("n1", seeds=[])
        async with sim.open_client("n1", sim.client_address()) as c:
            await c.put(b"k", b"v1")
            forged = _raw_context({_actor(sim): 2**64 - 2})
            with pytest.raises(BadRequest, match="context"):
                await c.put(b"k", b"poison", context=forged)
            got = await c.get(b"k")
            await c.put(b"k", b"v2", context=got.context)
            await c.delete(b"k", context=(await c.get(b"k")).context)
            await c.put(b"k", b"v3", context=(await c.get(b"k")).context)
            assert [s.value for s in (await c.get(b"k")).siblings] == [b"v3"]
        assert not sim.crashes, sim.crashes
        nursery.cancel_scope.cancel()


async def test_a_forged_context_cannot_replace_values_it_never_read(autojump_clock):
    """Before: a context claiming counter 2**63 for the writing node covered every dot, so a
    write with it silently replaced another writer's value it had never read. Now refused."""
    async with trio.open_nursery() as nursery:
        sim = SimCluster(nursery, seed=1)
        await sim.start("n1", seeds=[])
        async with sim.open_client("n1", sim.client_address()) as c:
            await c.put(b"k", b"theirs")
            forged = _raw_context({_actor(sim): 2**63})
            with pytest.raises(BadRequest, match="context"):
                await c.put(b"k", b"mine", context=forged)
            assert [s.value for s in (await c.get(b"k")).siblings] == [b"theirs"]
        assert not sim.crashes, sim.crashes
        nursery.cancel_scope.cancel()


async def _committed(nursery, names=("n1", "n2", "n3"), **config) -> SimCluster:
    sim = SimCluster(nursery, seed=1, **config)
    first = await sim.start(names[0], seeds=[])
    for name in names[1:]:
        await sim.start(name, seeds=[first.peer_address])
    src = sim.client_address()
    for name in names[1:]:
        async with sim.open_client(name, src) as c:
            await c.admin({"op": "join", "seed": first.peer_address})
    async with sim.open_client(names[0], src) as c:
        await c.admin({"op": "commit"})
        while (await c.admin({"op": "ring"}))["pending"]:
            await trio.sleep(1)
    await trio.sleep(10)
    return sim


async def test_with_a_secret_contexts_are_cluster_wide_and_unforgeable(autojump_clock, tmp_path):
    """A context minted by one node is accepted by every other (the key comes from the
    cluster secret); one sealed with the public no-secret key, or with another secret, is
    refused as forged; a context of another key is refused too."""
    secret = tmp_path / "secret"
    secret.write_bytes(os.urandom(32).hex().encode())
    secret.chmod(0o600)
    async with trio.open_nursery() as nursery:
        sim = await _committed(nursery, cluster_secret_file=str(secret))
        src = sim.client_address()
        async with sim.open_client("n1", src) as c1, sim.open_client("n2", src) as c2:
            await c1.put(b"a", b"a1")
            await c2.put(b"b", b"b1")
            read = await c1.get(b"a")
            written = await c2.put(b"a", b"a2", context=read.context)  # minted by n1
            await c1.put(b"a", b"a3", context=written.context)  # minted by n2 (PUT_REPLY)
            assert [s.value for s in (await c2.get(b"a", r=3)).siblings] == [b"a3"]
            clock = {a: versions.MAX_COUNTER for a in
                     (sn.node.identity.actor for sn in sim.nodes.values())}
            for key in (context_key(None), context_key(b"another cluster's secret")):
                with pytest.raises(BadRequest, match="forged or altered"):
                    await c1.put(b"a", b"x", context=versions.seal_context(key, b"a", clock))
            with pytest.raises(BadRequest, match="forged or altered"):
                await c1.put(b"b", b"x", context=(await c1.get(b"a")).context)
            assert [s.value for s in (await c1.get(b"b", r=3)).siblings] == [b"b1"]
        assert not sim.crashes, sim.crashes
        nursery.cancel_scope.cancel()


async def test_without_a_secret_a_well_sealed_forgery_cannot_exhaust_a_node(autojump_clock):
    """Without a cluster secret the sealing key is public (docs/DECISIONS.md), so a client can
    seal a forged clock. Bounds still hold: a counter past 2**53 is refused, and a counter
    this node never minted is refused before its dot sequence (shared by all keys) jumps."""
    public = context_key(None)
    async with trio.open_nursery() as nursery:
        sim = SimCluster(nursery, seed=1)
        await sim.start("n1", seeds=[])
        actor = _actor(sim)
        async with sim.open_client("n1", sim.client_address()) as c:
            await c.put(b"k", b"v1")
            for counter in (2**64 - 2, 2**63, versions.MAX_COUNTER + 1):
                with pytest.raises(BadRequest, match="bad counter"):
                    await c.put(b"k", b"x", context=versions.seal_context(
                        public, b"k", {actor: counter}))
            with pytest.raises(BadRequest, match="never made"):
                await c.put(b"k", b"x", context=versions.seal_context(
                    public, b"k", {actor: versions.MAX_COUNTER}))
            await c.put(b"k", b"v2", context=(await c.get(b"k")).context)
            await c.put(b"other", b"o1")
            assert [s.value for s in (await c.get(b"k")).siblings] == [b"v2"]
            assert sim.nodes["n1"].node.store.leases.lease(actor).limit < 2**20
        assert not sim.crashes, sim.crashes
        nursery.cancel_scope.cancel()


# ------------------------------------------------------------------ hole 4: malformed bodies

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from kvd.net.connection import FrameConnection  # noqa: E402
from kvd.proto import codec  # noqa: E402
from kvd.proto.messages import OPS, SCHEMA, ListOf, MsgType, Tuple  # noqa: E402


def _frame(kind: int, rid: int, body: object) -> bytes:
    """A frame with any body at all: the codec's encoder would refuse most of these."""
    raw = msgpack.packb(body, use_bin_type=True)
    return codec.HEADER.pack(codec.MAGIC, 1, kind, 0, rid, len(raw)) + raw


class _Raw:
    """One raw connection to a simulated node's client or peer port."""

    def __init__(self, sim: SimCluster, name: str, role: str):
        sn = sim.nodes[name]
        self.sim, self.role = sim, role
        self.address = sn.peer_address if role == "peer" else sn.address
        self.source = sim.client_address()
        self.conn = None
        self.rid = 0

    async def _open(self):
        stream = await self.sim.net.connector(self.source)(self.address)
        conn = FrameConnection(stream)
        hello = {"versions": [1], "role": self.role, "node": "fuzzer"}
        await conn.send(codec.encode(MsgType.HELLO, 1, hello))
        reply = await conn.receive()
        assert reply is not None and reply.type == MsgType.HELLO_OK, reply
        conn.max_frame = 1 << 21
        return conn

    async def ask(self, kind: int, body: object):
        """Send one request; the reply (an ERROR's fields included), "closed" when the node
        closed the connection (it must have sent an ERROR first), or "timeout"."""
        if self.conn is None:
            self.conn = await self._open()
        self.rid += 1
        await self.conn.send(_frame(kind, self.rid, body))
        error = None
        with trio.move_on_after(60):
            while True:
                message = await self.conn.receive()
                if message is None:
                    self.conn = None
                    assert error is not None, f"closed without an ERROR frame after {body!r}"
                    return ("closed", error)
                if message.type == MsgType.ERROR:
                    error = message.fields
                    if message.request_id == self.rid:
                        return ("error", error)
                    continue  # a connection-level ERROR (id 0): the close follows
                if message.request_id == self.rid and message.type != MsgType.CHUNK:
                    return ("reply", message.fields)
        return ("timeout", None)


async def test_an_admin_op_that_is_a_list_gets_a_protocol_error(autojump_clock):
    """Before: ADMIN {"op": ["ring"]} raised TypeError (unhashable) in the role check, logged a
    traceback and dropped the connection without an ERROR frame."""
    async with trio.open_nursery() as nursery:
        sim = SimCluster(nursery, seed=1)
        await sim.start("n1", seeds=[])
        raw = _Raw(sim, "n1", "client")
        outcome, error = await raw.ask(MsgType.ADMIN, {"op": ["ring"]})
        assert outcome == "closed" and error["code"] == "protocol", (outcome, error)
        assert "'op'" in error["message"]
        outcome, reply = await raw.ask(MsgType.ADMIN, {"op": "ring"})  # a new connection
        assert outcome == "reply" and reply["q"] == 32
        assert not sim.crashes, sim.crashes
        nursery.cancel_scope.cancel()


async def test_a_string_vid_in_a_blob_request_gets_a_protocol_error(autojump_clock):
    """Before: REPLICA_GET blob with a str vid answered `internal` (a traceback in the log)."""
    async with trio.open_nursery() as nursery:
        sim = SimCluster(nursery, seed=1)
        await sim.start("n1", seeds=[])
        raw = _Raw(sim, "n1", "peer")
        outcome, error = await raw.ask(MsgType.REPLICA_GET, {
            "op": "blob", "key": b"k", "vid": "0123", "offset": 0, "size": 10})
        assert outcome == "closed" and error["code"] == "protocol", (outcome, error)
        assert "'vid'" in error["message"]
        outcome, error = await raw.ask(MsgType.REPLICA_GET, {
            "op": "blob", "key": b"k", "vid": b"", "offset": 0, "size": 10})
        assert outcome == "error" and error["code"] == "bad_request", (outcome, error)
        assert not sim.crashes, sim.crashes
        nursery.cancel_scope.cancel()


_ANY = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats()
    | st.text(max_size=8) | st.binary(max_size=24),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                max_size=4),
    max_leaves=8)
_INTS = st.one_of(st.integers(-3, 40), st.integers(-2**63, 2**64 - 1),
                  st.sampled_from([2**31, 2**53, 2**63, 1 << 40]))


def _value(spec) -> st.SearchStrategy:
    """A value of ``spec``'s type (with hostile contents), or now and then of any type."""
    if isinstance(spec, ListOf):
        right = st.lists(_value(spec.item), max_size=3)
    elif isinstance(spec, Tuple):
        right = st.tuples(*map(_value, spec.items)).map(list)
    elif isinstance(spec, dict):
        right = _body(spec)
    else:
        options = []
        for t in spec:
            options.append({bytes: st.binary(max_size=40), str: st.text(max_size=12),
                            int: _INTS, bool: st.booleans(), float: st.floats(),
                            dict: st.dictionaries(st.text(max_size=4), _ANY, max_size=3),
                            list: st.lists(_ANY, max_size=3),
                            type(None): st.none()}[t])
        right = st.one_of(*options)
    return st.one_of(right, right, right, _ANY)


def _body(schema: dict) -> st.SearchStrategy:
    fields = {name: _value(spec) for name, (spec, _required) in schema.items()}
    return st.fixed_dictionaries({}, optional={**fields, "zz": _ANY})


def _bodies(kind: MsgType) -> st.SearchStrategy:
    schema = SCHEMA.get(kind, {})
    if kind not in OPS:
        return _body(schema)
    ops = OPS[kind]
    return st.one_of(*[_body({**ops[op], "op": ((str,), True)}).map(
        lambda b, op=op: {**b, "op": op}) for op in ops], _body(schema))


_REQUESTS = st.sampled_from([t for t in MsgType if t not in (MsgType.HELLO, MsgType.CHUNK)]
                            ).flatmap(lambda t: st.tuples(st.just(t), _bodies(t)))


@settings(max_examples=int(os.environ.get("KVD_FUZZ_EXAMPLES", 25)), deadline=None, suppress_health_check=list(HealthCheck))
@given(client=st.lists(_REQUESTS, min_size=1, max_size=12),
       peer=st.lists(_REQUESTS, min_size=1, max_size=12))
def test_no_body_of_any_message_type_reaches_a_traceback(client, peer):
    """Random bodies for every message type, on both ports of a live node (with some data,
    so reads, scans and blobs have something to find): every request gets a reply or an
    ERROR (`protocol` closes the connection first), never `internal`, never a traceback."""

    async def main():
        async with trio.open_nursery() as nursery:
            sim = SimCluster(nursery, seed=1)
            try:
                await sim.start("n1", seeds=[])
                async with sim.open_client("n1", sim.client_address()) as c:
                    await c.put(b"k", b"v")
                    await c.put(b"big", b"x" * 200_000)  # chunked (chunk_size 64 KiB)
                    await c.delete(b"k", context=(await c.get(b"k")).context)
                for role, requests in (("client", client), ("peer", peer)):
                    raw = _Raw(sim, "n1", role)
                    for kind, body in requests:
                        outcome, fields = await raw.ask(kind, body)
                        if outcome in ("error", "closed"):
                            assert fields["code"] != "internal", (kind.name, body, fields)
                    assert not sim.crashes, sim.crashes
            finally:
                sim.close()
                nursery.cancel_scope.cancel()

    with seeded(1):
        trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


# ------------------------------------------------------------------ hole 5: data directory modes

import stat  # noqa: E402
import subprocess  # noqa: E402

from procs import KvdProcess, kvctl  # noqa: E402


def _modes(root) -> dict[str, int]:
    """Mode of every directory and file under ``root`` (root included), by relative path."""
    out = {".": stat.S_IMODE(os.stat(root).st_mode)}
    for parent, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(parent, name)
            out[os.path.relpath(path, root)] = stat.S_IMODE(os.lstat(path).st_mode)
    return out


@pytest.mark.slow
def test_data_dir_is_private_whatever_the_umask(tmp_path):
    """Before: started with umask 022, kvd made 0755 directories and 0644 LevelDB files.
    Now every directory under data_dir is 0700 and every file 0600, blobs included."""
    data = tmp_path / "new" / "data"  # kvd creates it, and its parent
    node = KvdProcess(data)
    big = tmp_path / "big"
    big.write_bytes(os.urandom(3 << 20))  # above chunk_size: a blob file
    old = os.umask(0o022)
    try:
        node.start()
    finally:
        os.umask(old)
    try:
        assert kvctl("put", "small", "v", host=node.address).returncode == 0
        put = kvctl("put", "big", "--file", str(big), host=node.address)
        assert put.returncode == 0, put.stderr
    finally:
        assert node.stop() == 0, node.log_text()
    modes = _modes(data)
    assert any(p.startswith("blobs" + os.sep) and os.path.isfile(data / p) for p in modes)
    assert any(p.endswith(".log") or p.startswith("MANIFEST") for p in modes), modes
    wrong = {p: f"{m:04o}" for p, m in modes.items()
             if m != (0o700 if os.path.isdir(data / p) else 0o600)}
    assert not wrong, f"not private: {wrong}"


@pytest.mark.slow
def test_a_data_dir_open_to_others_stops_the_start(tmp_path):
    """As PostgreSQL does: a data_dir others may enter (or its group may write) is refused
    with one line and exit 2; 0750 (the package's StateDirectoryMode) is accepted."""
    data = tmp_path / "data"
    data.mkdir()
    node = KvdProcess(data)
    for mode, who in ((0o755, "others"), (0o770, "its group")):
        data.chmod(mode)
        config = node.write_config()
        run = subprocess.run([sys.executable, "-m", "kvd.main", "--config", str(config)],
                             capture_output=True, text=True, timeout=20)
        assert run.returncode == 2, run.stderr
        assert run.stderr == (f"kvd: error: data_dir {data} is accessible by {who} "
                              f"(mode {mode:04o}): run chmod -R go-rwx {data}\n")
    data.chmod(0o750)
    node.start()
    try:
        assert kvctl("put", "k", "v", host=node.address).returncode == 0
    finally:
        assert node.stop() == 0


@pytest.mark.slow
def test_malformed_bodies_on_a_real_node_get_errors_not_tracebacks(tmp_path):
    """The two bodies of the report, on a real node (LevelDB, blob files, a cluster secret,
    a peer authenticated by hand): an ERROR frame each, no traceback in the log."""
    from test_security import authenticate_by_hand, raw_connect, read_message

    secret = os.urandom(24).hex()
    path = tmp_path / "secret"
    path.write_text(secret)
    path.chmod(0o600)
    node = KvdProcess(tmp_path / "data", extra={"cluster_secret_file": str(path)}).start()
    try:
        client = raw_connect(node.port)
        decoder = codec.FrameDecoder(1 << 22)
        client.sendall(codec.encode(MsgType.HELLO, 1, {"versions": [1], "role": "client"}))
        assert read_message(client, decoder).type == MsgType.HELLO_OK
        client.sendall(_frame(MsgType.ADMIN, 2, {"op": ["ring"]}))
        error = read_message(client, decoder)
        assert error.type == MsgType.ERROR and error.fields["code"] == "protocol", error
        assert read_message(client, decoder) is None  # then closed

        peer, decoder, _, sealer = authenticate_by_hand(node.peer_port, secret)
        assert read_message(peer, decoder).type == MsgType.HELLO_OK
        for rid, vid, code in ((3, b"", "bad_request"), (4, b"\x00" * 16, "unavailable"),
                               (5, "0123", "protocol")):
            peer.sendall(sealer.seal(_frame(MsgType.REPLICA_GET, rid, {
                "op": "blob", "key": b"k", "vid": vid, "offset": 0, "size": 10})))
            error = read_message(peer, decoder)
            assert error.type == MsgType.ERROR and error.fields["code"] == code, error
        assert kvctl("put", "k", "v", host=node.address).returncode == 0
    finally:
        assert node.stop() == 0
    log = node.log_text()
    assert "Traceback" not in log and "internal" not in log, log
