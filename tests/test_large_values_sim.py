"""Large values through the coordinator in the whole-node simulator (issue 14, large values):
an upload keeps several chunks in flight per replica and goes on without a replica that
fails; a read streams from a replica on another node; streams of the wrong length are
refused and leave nothing behind.

Real nodes (kvd.server.serve) on kvd.net.memory under trio's autojump MockClock; chunk_size
is 65 536 in the simulator.
"""

from __future__ import annotations

import os
import sys

import pytest
import trio

sys.path.insert(0, os.path.dirname(__file__))
from sim.harness import SimCluster, seeded  # noqa: E402

from kvd.errors import BadRequest, KvdError, QuorumFailed, Unavailable  # noqa: E402
from kvd.node import large_values  # noqa: E402
from kvd.proto import codec  # noqa: E402
from kvd.proto.messages import MsgType  # noqa: E402
from kvd.ring import partition_of, preference_list  # noqa: E402

CHUNK = 65536


@pytest.fixture(autouse=True)
def _seeded():
    with seeded(1):
        yield


async def _cluster(nursery, names=("n1", "n2", "n3")) -> SimCluster:
    sim = SimCluster(nursery, seed=1, anti_entropy=False)
    await sim.form(names, settle=10.0)
    return sim


def _primaries(sim: SimCluster, key: bytes) -> list[str]:
    cluster = sim.nodes["n1"].node.cluster
    return preference_list(cluster.routing.serving_ring(), partition_of(key, cluster.state.ring.q),
                           3)


def _value(chunks: int) -> bytes:
    return os.urandom(CHUNK * chunks - 1000)  # the last chunk short


def _manifests(sim: SimCluster, key: bytes) -> list[str]:
    return [sn.name for sn in sim.running() if sn.node.store.read(key) is not None]


def _blob_count(sim: SimCluster) -> int:
    return sum(len(sn.node.store.blobs.blobs) for sn in sim.running())


def _instrument(sim: SimCluster, name: str, fail_from: int | None = None) -> dict:
    """Record the chunk writes on ``name`` in flight at once; with ``fail_from``, refuse
    every chunk from that offset on (a replica whose disk filled up)."""
    store = sim.nodes[name].node.store
    write_chunk = store.write_chunk
    seen = {"now": 0, "most": 0, "first_alone": True, "calls": 0}

    async def instrumented(key, vid, offset, data):
        seen["calls"] += 1
        seen["now"] += 1
        seen["most"] = max(seen["most"], seen["now"])
        if offset == 0 and seen["now"] > 1:
            seen["first_alone"] = False
        try:
            if fail_from is not None and offset >= fail_from:
                raise Unavailable("no space left for the chunk")
            await trio.sleep(0.001)  # a write takes time: later chunks can arrive meanwhile
            await write_chunk(key, vid, offset, data)
        finally:
            seen["now"] -= 1

    store.write_chunk = instrumented
    return seen


async def test_an_upload_keeps_several_chunks_in_flight_per_replica(autojump_clock):
    """One chunk at a time per replica (a round trip each, in series) held a 1 GiB put to
    75 MiB/s. Chunks overlap now, up to the window, and the first one, which opens the upload
    on the replica, travels alone."""
    async with trio.open_nursery() as nursery:
        sim = await _cluster(nursery)
        key = b"big"
        replica = next(n for n in _primaries(sim, key) if n != "n1")
        seen = _instrument(sim, replica)
        value = _value(24)
        async with sim.open_client("n1", sim.client_address()) as c:
            await c.put(key, value)
            assert [s.value for s in (await c.get(key, r=3)).siblings] == [value]
        assert seen["calls"] == 24
        assert 1 < seen["most"] <= large_values.WINDOW, seen
        assert seen["first_alone"], "a chunk reached the replica before the upload was opened"
        assert not sim.crashes, sim.crashes
        nursery.cancel_scope.cancel()


async def test_an_upload_goes_on_without_a_replica_that_fails(autojump_clock):
    """W=2 of 3: a replica that refuses chunks half-way is dropped; the write succeeds on
    the two others, whole."""
    async with trio.open_nursery() as nursery:
        sim = await _cluster(nursery)
        key = b"big"
        failing = next(n for n in _primaries(sim, key) if n != "n1")
        _instrument(sim, failing, fail_from=10 * CHUNK)
        value = _value(20)
        async with sim.open_client("n1", sim.client_address()) as c:
            result = await c.put(key, value)
            assert result.replicas >= 2
            assert [s.value for s in (await c.get(key, r=2)).siblings] == [value]
        for name in _manifests(sim, key):
            store = sim.nodes[name].node.store
            (sibling,) = store.read(key).siblings
            assert store.has_value_bytes(sibling.chunks), f"{name} has a manifest, not the bytes"
        assert not sim.crashes, sim.crashes
        nursery.cancel_scope.cancel()


async def test_an_upload_fails_when_fewer_than_w_replicas_keep_up(autojump_clock):
    """Two of three replicas refuse chunks: the write fails (quorum), no node holds a
    manifest, and the chunks already stored are discarded."""
    async with trio.open_nursery() as nursery:
        sim = await _cluster(nursery)
        key = b"big"
        for name in _primaries(sim, key)[:2]:
            _instrument(sim, name, fail_from=5 * CHUNK)
        with pytest.raises(QuorumFailed):  # the client's errors come out of open_client
            async with sim.open_client("n1", sim.client_address()) as c:
                await c.put(key, _value(20))
        await trio.sleep(10)  # the discards run in the background
        assert _manifests(sim, key) == []
        assert _blob_count(sim) == 0, "chunks of the failed upload were kept"
        assert not sim.crashes, sim.crashes
        nursery.cancel_scope.cancel()


async def test_a_failed_upload_raises_its_own_error_from_put(autojump_clock):
    """Client.put of a streamed value raises the node's error itself, not an exception group
    around it, and the connection serves the next request."""
    async with trio.open_nursery() as nursery:
        sim = await _cluster(nursery)
        key = b"big-error"
        for name in _primaries(sim, key)[:2]:
            _instrument(sim, name, fail_from=5 * CHUNK)
        async with sim.open_client("n1", sim.client_address()) as c:
            with pytest.raises(QuorumFailed):
                await c.put(key, _value(20))
            await c.ping()
        nursery.cancel_scope.cancel()


async def test_a_read_streams_from_a_replica_on_another_node(autojump_clock):
    """Four nodes, N=3: a coordinator that holds no replica of the key reads the value from
    a peer, several pieces ahead of the client, in order."""
    async with trio.open_nursery() as nursery:
        sim = await _cluster(nursery, ("n1", "n2", "n3", "n4"))
        key = next(k for k in (b"big" + str(i).encode() for i in range(1000))
                   if "n1" not in _primaries(sim, k))
        value = _value(30)
        async with sim.open_client("n1", sim.client_address()) as c:
            await c.put(key, value)
            reply = await c.get(key)
        assert [s.value for s in reply.siblings] == [value]
        assert not sim.crashes, sim.crashes
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("damage", ["deleted", "truncated"])
async def test_a_replica_missing_its_value_bytes_reads_them_from_another(autojump_clock, caplog,
                                                                         damage):
    """Outside tester (damaged storage): with one replica's blob file deleted or cut short
    on disk, every read through that node failed (exit 3: "value was replaced while it was
    being read", which was false, or "holds fewer than its bytes") though two replicas held
    the value whole. The coordinator now reads a replica that has every byte, and says
    which copy is incomplete; read repair then sends that replica the value's bytes again,
    after which R=3 is met (before, nothing ever refilled it)."""
    async with trio.open_nursery() as nursery:
        sim = await _cluster(nursery)
        key, value = b"big", _value(5)
        async with sim.open_client("n1", sim.client_address()) as c:
            await c.put(key, value, w=3)
        blobs = sim.nodes["n1"].node.store.blobs
        (vid,) = [s.chunks.vid for s in sim.nodes["n1"].node.store.read(key).siblings]
        if damage == "deleted":
            del blobs.blobs[vid]
        else:
            del blobs.blobs[vid][CHUNK:]
        async with sim.open_client("n1", sim.client_address()) as c:
            for r in (1, 2):
                assert [s.value for s in (await c.get(key, r=r)).siblings] == [value], r
            await trio.sleep(5)  # the read repair's refill, in the background
            assert [s.value for s in (await c.get(key, r=3)).siblings] == [value]
        assert bytes(blobs.blobs[vid]) == value
        assert any("incomplete" in r.getMessage() and "n1" in r.getMessage()
                   for r in caplog.records), "the incomplete copy was not named"
        assert not sim.crashes, sim.crashes
        nursery.cancel_scope.cancel()


async def test_repair_verify_refills_a_copy_that_no_read_reaches(autojump_clock):
    """A replica whose value bytes are gone, with no client reading the key: an exchange of
    hash trees sees nothing (the objects agree). `kvctl repair --verify` on that node finds
    the copy, and read repair refills it; a second run finds nothing."""
    async with trio.open_nursery() as nursery:
        sim = await _cluster(nursery)
        key, value = b"big", _value(5)
        async with sim.open_client("n2", sim.client_address()) as c:
            await c.put(key, value, w=3)
            await c.put(b"small", b"v", w=3)
        blobs = sim.nodes["n1"].node.store.blobs
        (vid,) = [s.chunks.vid for s in sim.nodes["n1"].node.store.read(key).siblings]
        del blobs.blobs[vid][CHUNK:]
        first = (await sim.admin("n1", {"op": "repair", "wait": True, "verify": True}))["repair"]
        assert (first["copies_checked"], first["copies_damaged"]) == (2, 1), first
        await trio.sleep(5)  # the read repair's refill, in the background
        assert bytes(blobs.blobs[vid]) == value
        again = (await sim.admin("n1", {"op": "repair", "wait": True, "verify": True}))["repair"]
        assert again["copies_damaged"] == 0, again
        assert not sim.crashes, sim.crashes
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("reader", ["n1", "holder"])
async def test_a_value_overwritten_while_it_streams_is_read_whole(autojump_clock, reader):
    """A GET streams the value it read (from a peer, or from this node's own copy) while
    another client overwrites the key: every piece is read after the overwrite, and the
    reader still gets the whole old value (it used to lose its connection: an outside
    tester saw 14 of 463 reads of 5 MB values cut off). Once nobody reads it, the old value's
    bytes go from every node."""
    from kvd.node.blob_linger import CHECK_EVERY, LINGER

    async with trio.open_nursery() as nursery:
        sim = await _cluster(nursery, ("n1", "n2", "n3", "n4"))
        key = next(k for k in (b"big" + str(i).encode() for i in range(1000))
                   if "n1" not in _primaries(sim, k))
        via = "n1" if reader == "n1" else _primaries(sim, key)[0]
        old, new = _value(40), _value(20)
        async with sim.open_client(via, sim.client_address()) as c:
            await c.put(key, old)
        old_vid = sim.nodes[_primaries(sim, key)[0]].node.store.read(key).siblings[0].chunks.vid
        overwritten = trio.Event()

        async def overwrite() -> None:
            async with sim.open_client("n2", sim.client_address()) as writer:
                await writer.put(key, new)
            overwritten.set()

        for sn in sim.running():  # every piece of the old value is read after the overwrite
            blobs = sn.node.store.blobs
            plain_read = blobs.read

            async def read(vid, offset, size, blobs=blobs, plain_read=plain_read):
                if vid == old_vid:
                    if not blobs.overwrite_started:
                        blobs.overwrite_started = True
                        nursery.start_soon(overwrite)
                    await overwritten.wait()
                return await plain_read(vid, offset, size)

            blobs.overwrite_started = False
            blobs.read = read
        started = [sn.node.store.blobs for sn in sim.running()]
        async with sim.open_client(via, sim.client_address()) as c:
            reply = await c.get(key)
        assert [s.value for s in reply.siblings] == [old]
        assert any(blobs.overwrite_started for blobs in started)
        async with sim.open_client("n3", sim.client_address()) as c:
            assert [s.value for s in (await c.get(key)).siblings] == [new]
        await trio.sleep(LINGER + 2 * CHECK_EVERY)
        assert not [sn.name for sn in sim.running() if sn.node.store.blobs.exists(old_vid)]
        assert not sim.crashes, sim.crashes
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("sent", [CHUNK * 3 - 1, CHUNK * 3 + 1])
async def test_a_stream_of_the_wrong_length_is_refused(autojump_clock, sent):
    """A streamed PUT declares its length; a stream that ends short of it, or runs past it,
    is refused, and leaves neither a manifest nor chunks."""
    async with trio.open_nursery() as nursery:
        sim = await _cluster(nursery)
        key = b"big"
        declared = CHUNK * 3
        data = os.urandom(sent)
        async with sim.open_client("n1", sim.client_address()) as c:
            async with c._request(MsgType.PUT, {"key": key, "length": declared}) as (rid, reply):
                for offset in range(0, sent, CHUNK):
                    piece = data[offset : offset + CHUNK]
                    await c._conn.send(codec.encode_chunk(rid, piece,
                                                          end=offset + CHUNK >= sent))
                with pytest.raises(BadRequest, match="declared"):
                    await reply()
        await trio.sleep(10)
        assert _manifests(sim, key) == []
        assert _blob_count(sim) == 0, "chunks of the refused upload were kept"
        assert not sim.crashes, sim.crashes
        nursery.cancel_scope.cancel()


async def test_a_coordinator_crash_mid_upload_leaves_no_manifest(autojump_clock):
    """The coordinator dies half-way through an upload (while several chunks are in flight):
    no node may hold a manifest for the value, and the dead node's chunks go at its restart."""
    async with trio.open_nursery() as nursery:
        sim = await _cluster(nursery)
        key = b"big"
        replica = next(n for n in _primaries(sim, key) if n != "n1")
        store = sim.nodes[replica].node.store
        write_chunk = store.write_chunk

        async def crash_half_way(key_, vid, offset, data):
            if offset == 10 * CHUNK and sim.nodes["n1"].running:
                sim.crash("n1")
            await write_chunk(key_, vid, offset, data)

        store.write_chunk = crash_half_way
        with pytest.raises(KvdError):  # the connection to the coordinator is gone
            async with sim.open_client("n1", sim.client_address()) as c:
                await c.put(key, _value(20))
        await trio.sleep(10)
        assert _manifests(sim, key) == []
        await sim.start("n1")
        await trio.sleep(10)
        assert _manifests(sim, key) == []
        assert not sim.nodes["n1"].node.store.blobs.blobs, "the crashed upload's chunks stayed"
        assert not sim.crashes, sim.crashes
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("how", ["overlong", "client gone"])
async def test_an_abandoned_upload_leaves_the_peer_connections_whole(autojump_clock, how):
    """A refused (overlong) stream, or a client that goes away, ends the upload while
    chunks are on their way to the replicas. Those writes finish (or time out) rather than
    being cancelled half-sent, which would break the coordinator's connection to the peer
    and every other request on it."""
    async with trio.open_nursery() as nursery:
        sim = await _cluster(nursery)
        key = b"big"
        for name in _primaries(sim, key):
            if name != "n1":
                _instrument(sim, name)  # each chunk write takes a little while
        peers = sim.nodes["n1"].node.cluster.peers
        before = dict(peers._clients)
        assert len(before) == 2
        declared = CHUNK * 12
        data = os.urandom(declared + 1)
        async with sim.open_client("n1", sim.client_address()) as c:
            async with c._request(MsgType.PUT, {"key": key, "length": declared}) as (rid, reply):
                for offset in range(0, CHUNK * 11 if how == "client gone" else len(data), CHUNK):
                    piece = data[offset : offset + CHUNK]
                    await c._conn.send(codec.encode_chunk(rid, piece,
                                                          end=offset + CHUNK >= len(data)))
                if how == "overlong":
                    with pytest.raises(BadRequest, match="declared"):
                        await reply()
        await trio.sleep(10)
        broken = [address for address, client in before.items() if client.closed.is_set()]
        assert not broken, f"peer connections broken by the abandoned upload: {broken}"
        assert _manifests(sim, key) == []
        assert _blob_count(sim) == 0, "chunks of the abandoned upload were kept"
        assert not sim.crashes, sim.crashes
        nursery.cancel_scope.cancel()


async def test_two_large_puts_of_one_key_on_one_connection_both_finish(autojump_clock):
    """An outside test wedged a key for good: two concurrent large PUTs of one key on one
    connection. The second waited for the key's turn (coordinator rule 7) before reading its
    upload; the connection's reader, holding one of its chunks, waited for it; the first,
    holding the turn, waited for its own chunks behind that reader. Nothing ended it, not
    even the client leaving: later large PUTs of that key waited for the turn forever. An
    upload is now read whole before the turn is taken."""
    async with trio.open_nursery() as nursery:
        sim = await _cluster(nursery)
        values = [_value(12), _value(9)]
        done = []
        async with sim.open_client("n1", sim.client_address()) as c:
            async def put(value: bytes) -> None:
                await c.put(b"shared", value)
                done.append(value)

            with trio.fail_after(60):
                async with trio.open_nursery() as puts:
                    for value in values:
                        puts.start_soon(put, value)
            assert len(done) == 2
            got = await c.get(b"shared", r=3)
            # Rule 7 still holds: the later write superseded the first.
            assert [s.value in values for s in got.siblings] == [True], got
        nursery.cancel_scope.cancel()


async def test_a_restore_takes_a_value_from_another_holder_when_one_lacks_its_bytes(
        autojump_clock):
    """Outside tester (damaged storage): with one holder's blob file of a value deleted, a
    wiped node restoring itself fetched the partition from that holder first, failed on the
    value ("value was replaced while it was being read"), and retried that partition every
    second for good: it never served again. It now takes the value's bytes from another
    holder."""
    from kvd.storage.memory import MemoryDisk

    async with trio.open_nursery() as nursery:
        sim = await _cluster(nursery)
        key, value = b"big", _value(3)
        async with sim.open_client("n1", sim.client_address()) as c:
            await c.put(key, value, w=3)
        first = [n for n in _primaries(sim, key) if n != "n3"][0]  # n3's first source
        store = sim.nodes[first].node.store
        (vid,) = [s.chunks.vid for s in store.read(key).siblings]
        del store.blobs.blobs[vid]
        sim.crash("n3")
        await trio.sleep(15)
        sim.nodes["n3"].disk = MemoryDisk()  # the operator wiped its data directory
        await sim.start("n3")
        with trio.fail_after(120):
            while not (sim.nodes["n3"].node and sim.nodes["n3"].node.cluster.restore.has_its_data):
                await trio.sleep(1)
        assert sim.nodes["n3"].node.store.blobs.blobs[vid] == value
        async with sim.open_client("n3", sim.client_address()) as c:
            assert [s.value for s in (await c.get(key, r=1)).siblings] == [value]
        assert not sim.crashes, sim.crashes
        nursery.cancel_scope.cancel()
