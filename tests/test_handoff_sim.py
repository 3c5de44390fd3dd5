"""Hinted handoff, anti-entropy and tombstone GC under faults, on whole simulated nodes
(tests/sim/harness.py: real nodes, in-memory network, MockClock). Issue 9, section 4."""

from __future__ import annotations

import logging
import os
import sys

import pytest
import trio

sys.path.insert(0, os.path.dirname(__file__))

from sim.harness import SimCluster, seeded  # noqa: E402



@pytest.fixture(autouse=True)
def _seeded():
    with seeded(1):
        yield


async def cluster(nursery, names=("n1", "n2", "n3"), **config) -> SimCluster:
    """A committed cluster of ``names`` (the first is the seed), every move done."""
    sim = SimCluster(nursery, seed=1, **config)
    await sim.form(names)
    return sim


def node(sim, name):
    return sim.nodes[name].node


# ------------------------------------------------------------------ hints


async def test_hints_for_a_node_that_stays_down_expire(autojump_clock):
    async with trio.open_nursery() as nursery:
        sim = await cluster(nursery, hint_window=20.0, tombstone_grace=30.0)
        sim.crash("n3")
        await trio.sleep(15)  # n1 and n2 see n3 down
        async with sim.open_client("n1", sim.client_address()) as c:
            for i in range(5):
                await c.put(b"k%d" % i, b"v")
        assert node(sim, "n1").cluster.handoff.pending() == {"n3": 5}
        await trio.sleep(60)  # n3 stays down, past hint_window
        assert node(sim, "n1").cluster.handoff.pending() == {}, "expired hints are still kept"
        assert not sim.crashes
        nursery.cancel_scope.cancel()


async def test_hints_for_a_node_that_was_removed_expire(autojump_clock):
    """Bug 12: hints kept for a node that is then force-removed expire like the others; the
    node will never come back for them, and no ring names it any more."""
    async with trio.open_nursery() as nursery:
        sim = await cluster(nursery, ("n1", "n2", "n3", "n4"), hint_window=20.0,
                            tombstone_grace=30.0)
        sim.crash("n4")
        await trio.sleep(15)  # the others see n4 down
        async with sim.open_client("n1", sim.client_address()) as c:
            for i in range(40):
                await c.put(b"k%d" % i, b"v")
        held = {name: node(sim, name).cluster.handoff.pending().get("n4", 0)
                for name in ("n1", "n2", "n3")}
        assert sum(held.values()), "no hint was kept for n4: the test needs some"
        await sim.admin("n1", {"op": "force-remove", "node": "n4"})
        await sim.admin("n1", {"op": "commit"})
        await trio.sleep(60)  # past hint_window
        left = {name: node(sim, name).cluster.handoff.pending() for name in ("n1", "n2", "n3")}
        assert not any(left.values()), f"hints for the removed node are still kept: {left}"
        assert not sim.crashes, sim.crashes
        nursery.cancel_scope.cancel()


async def test_hint_counts_need_no_scan_and_delivery_reads_bounded_batches(autojump_clock):
    HINT_BATCH = 128  # kvd.node.handoff.HINT_BATCH

    async with trio.open_nursery() as nursery:
        sim = await cluster(nursery, hint_window=600.0, tombstone_grace=900.0)
        sim.crash("n3")
        await trio.sleep(15)
        keys = [b"key%d" % i for i in range(3 * HINT_BATCH)]
        async with sim.open_client("n1", sim.client_address()) as c:
            for key in keys:
                await c.put(key, b"v")
        # A restart rebuilds the counts from storage once.
        sim.crash("n1")
        await trio.sleep(1)  # the crashed run's cleanup clears sim.nodes["n1"].node
        await sim.start("n1")
        storage = node(sim, "n1").storage
        iterate, iterate_keys = storage.iterate, storage.iterate_keys
        hint_reads: list[int] = []  # hints taken from each iteration over the hints

        def no_hint_scans(start, stop):
            assert not start.startswith(b"h"), "hints_pending scanned the hints"
            return iterate_keys(start, stop)

        def counted(start, stop, **options):
            if not start.startswith(b"h"):
                return iterate(start, stop, **options)
            hint_reads.append(0)

            def gen():
                for item in iterate(start, stop, **options):
                    hint_reads[-1] += 1
                    yield item
            return gen()

        storage.iterate_keys, storage.iterate = no_hint_scans, counted
        assert node(sim, "n1").cluster.handoff.pending() == {"n3": len(keys)}
        await sim.start("n3")
        for _ in range(60):
            await trio.sleep(1)
            assert not sim.crashes, sim.crashes
            if not node(sim, "n1").cluster.handoff.pending():
                break
        assert node(sim, "n1").cluster.handoff.pending() == {}
        assert max(hint_reads) <= HINT_BATCH + 1, f"read {max(hint_reads)} hints at once"
        store3 = node(sim, "n3").store
        assert all(store3.read(key) is not None for key in keys), "n3 misses handed-off writes"
        assert not sim.crashes, sim.crashes
        nursery.cancel_scope.cancel()


async def test_chunked_value_hints_are_delivered_and_do_not_block_others(autojump_clock):
    from kvd.ring import partition_of

    async with trio.open_nursery() as nursery:
        sim = await cluster(nursery, names=("n1", "n2", "n3", "n4"), anti_entropy=False,
                            hint_window=600.0, tombstone_grace=900.0)
        c1 = node(sim, "n1").cluster

        def primaries(key):
            return c1.routing.primaries(partition_of(key, c1.state.ring.q), 3)

        # Keys with n4 as a primary, coordinated by another primary (so a *remote*
        # fallback, the fourth node, keeps the hint and gets the chunks).
        big = next(b"big%d" % i for i in range(1000) if "n4" in primaries(b"big%d" % i))
        coordinator = next(n for n in primaries(big) if n != "n4")
        # Same replicas, so the same fallback holds all the hints, the big one first.
        small = [k for k in (b"small%d" % i for i in range(1000))
                 if primaries(k) == primaries(big)][:3]
        value = os.urandom(200_000)  # chunk_size is 64 KiB in the simulator
        sim.crash("n4")
        await trio.sleep(15)
        async with sim.open_client(coordinator, sim.client_address()) as c:
            await c.put(big, value)
            for key in small:
                await c.put(key, b"after the big one")
        held = {name: node(sim, name).cluster.handoff.pending() for name in ("n1", "n2", "n3")}
        assert sum(h.get("n4", 0) for h in held.values()) >= 1 + len(small), held
        await sim.start("n4")
        for _ in range(60):
            await trio.sleep(1)
            if not any(node(sim, n).cluster.handoff.pending() for n in ("n1", "n2", "n3")):
                break
        left = {n: node(sim, n).cluster.handoff.pending() for n in ("n1", "n2", "n3")}
        assert not any(left.values()), f"hints stuck: {left}"
        store4 = node(sim, "n4").store
        for key in small:
            assert store4.read(key) is not None, f"n4 misses {key!r}"
        obj = store4.read(big)
        assert obj is not None, "n4 misses the chunked value"
        ref = obj.siblings[0].chunks
        data = b"".join([piece async for piece in store4.read_chunks(big, ref)])
        assert data == value
        fallback = next(n for n in ("n1", "n2", "n3") if n not in primaries(big))
        assert not node(sim, fallback).store.blobs.exists(ref.vid), "the fallback leaks the bytes"
        assert not sim.crashes, sim.crashes
        nursery.cancel_scope.cancel()


# ------------------------------------------------------------------ anti-entropy and GC


def replicas_of(sim, key, n=3):
    from kvd.ring import partition_of

    cluster = next(sn.node for sn in sim.nodes.values() if sn.node is not None).cluster
    return cluster.routing.primaries(partition_of(key, cluster.state.ring.q), n)


async def test_failed_purge_rpc_neither_crashes_the_node_nor_resurrects(autojump_clock):
    async with trio.open_nursery() as nursery:
        sim = await cluster(nursery, tombstone_grace=30.0, hint_window=20.0,
                            anti_entropy_interval=10.0)
        key = b"doomed"
        async with sim.open_client("n1", sim.client_address()) as c:
            await c.put(key, b"v", w=3)
            context = (await c.get(key, r=3)).context
            await c.delete(key, context=context, w=3)
        first, middle, victim = replicas_of(sim, key)
        addresses = {name: sim.nodes[name].peer_address for name in sim.nodes}
        peers = node(sim, first).cluster.peers
        real_call = peers.call
        cut = []

        async def call(address, kind, fields, expect):
            if fields.get("op") == "aae-purge" and address == addresses[victim] and not cut:
                # The purge request to the victim fails: it is cut off just now.
                cut.append(trio.current_time())
                sim.net.partition(address, [a for n, a in addresses.items() if n != victim])
            return await real_call(address, kind, fields, expect)

        peers.call = call
        for _ in range(120):
            await trio.sleep(1)
            if cut:
                break
        assert cut, f"no purge was attempted {node(sim, first).aae.totals} {[node(sim, n).store.read(key) for n in sim.nodes]}"
        await trio.sleep(30)
        assert not sim.crashes, sim.crashes
        assert node(sim, first) is not None, f"{first} stopped"
        sim.net.heal()
        await trio.sleep(120)
        assert not sim.crashes, sim.crashes
        for name in (first, middle, victim):
            assert node(sim, name).store.read(key) is None, f"{name} still holds the tombstone"
        async with sim.open_client(first, sim.client_address()) as c:
            assert not (await c.get(key, r=3)).found
        nursery.cancel_scope.cancel()


async def test_tombstone_collection_reads_tombstones_not_every_object(autojump_clock):
    async with trio.open_nursery() as nursery:
        sim = await cluster(nursery, tombstone_grace=30.0, hint_window=20.0,
                            anti_entropy_interval=3600.0)  # on demand only
        live = [b"live%d" % i for i in range(300)]
        dead = [b"dead%d" % i for i in range(3)]
        async with sim.open_client("n1", sim.client_address()) as c:
            for key in live + dead:
                await c.put(key, b"v", w=3)
            for key in dead:
                context = (await c.get(key, r=3)).context
                await c.delete(key, context=context, w=3)
        await trio.sleep(60)  # past the grace
        reads = []
        for name in sim.nodes:
            store = node(sim, name).store
            real_read = store.read
            store.read = lambda key, real_read=real_read: reads.append(key) or real_read(key)
        purged = 0
        for name in sim.nodes:
            purged += (await node(sim, name).aae.repair()).tombstones_purged
        assert purged >= len(dead)
        assert all(node(sim, n).store.read(k) is None for n in sim.nodes for k in dead)
        live_reads = [k for k in reads if k in set(live)]
        assert not live_reads, f"the collector read {len(live_reads)} live objects"
        assert not sim.crashes, sim.crashes
        nursery.cancel_scope.cancel()


async def test_one_replica_partitions_purge_tombstones(autojump_clock):
    async with trio.open_nursery() as nursery:
        sim = await cluster(nursery, names=("n1",), tombstone_grace=30.0, hint_window=20.0,
                            anti_entropy_interval=10.0)
        async with sim.open_client("n1", sim.client_address()) as c:
            await c.put(b"k", b"v")
            await c.delete(b"k", context=(await c.get(b"k")).context)
        assert node(sim, "n1").store.read(b"k") is not None  # the tombstone
        await trio.sleep(90)
        assert node(sim, "n1").store.read(b"k") is None, "the tombstone outlived its grace"
        assert not sim.crashes, sim.crashes
        nursery.cancel_scope.cancel()


async def test_anti_entropy_repairs_partitions_that_are_not_moving(autojump_clock):
    async with trio.open_nursery() as nursery:
        sim = await cluster(nursery, hinted_handoff=False, anti_entropy_interval=10.0,
                            tombstone_grace=30.0, hint_window=20.0)
        sim.crash("n3")
        await trio.sleep(15)
        keys = [b"k%d" % i for i in range(64)]
        async with sim.open_client("n1", sim.client_address()) as c:
            for key in keys:
                await c.put(key, b"v", w=2)
        # A join that stays pending: n4 is cut off right after the commit.
        n4 = await sim.start("n4", seeds=[sim.nodes["n1"].peer_address])
        async with sim.open_client("n4", sim.client_address()) as c:
            await c.admin({"op": "join", "seed": sim.nodes["n1"].peer_address})
        await trio.sleep(5)
        await sim.start("n3")
        await trio.sleep(2)
        sim.net.partition(n4.peer_address, [sim.nodes[n].peer_address for n in ("n1", "n2", "n3")])
        async with sim.open_client("n1", sim.client_address()) as c:
            await c.admin({"op": "commit"})
        await trio.sleep(60)
        cluster1 = node(sim, "n1").cluster
        assert cluster1.state.pending, "the move finished: the test needs it pending"
        from kvd.ring import partition_of, preference_list

        serving, future = cluster1.routing.serving_ring(), cluster1.state.ring
        moving = {p for p in range(future.q)
                  if preference_list(serving, p, 3) != preference_list(future, p, 3)}
        steady = [k for k in keys if partition_of(k, cluster1.state.ring.q) not in moving
                  and "n3" in replicas_of(sim, k)]
        assert steady, "every partition moves: pick other keys"
        missing = [k for k in steady if node(sim, "n3").store.read(k) is None]
        assert not missing, f"n3 still misses {len(missing)} of {len(steady)} keys of steady partitions"
        assert not sim.crashes, sim.crashes
        nursery.cancel_scope.cancel()


async def test_a_short_blob_left_by_a_broken_upload_is_fetched_again(autojump_clock):
    """Found by the simulator (a seed whose replicas never converged): an upload cut off
    after its first chunk left a short blob on n3; anti-entropy saw "bytes exist", skipped
    fetching them, and every exchange then failed sealing "incomplete" bytes, forever."""
    async with trio.open_nursery() as nursery:
        sim = await cluster(nursery, hinted_handoff=False, anti_entropy_interval=10.0)
        others = [sim.nodes[n].peer_address for n in ("n1", "n2")]
        sim.net.partition(sim.nodes["n3"].peer_address, others)
        value = bytes(range(256)) * 800  # 200 KiB: above the 64 KiB chunk size
        async with sim.open_client("n1", sim.client_address()) as c:
            await c.put(b"big", value, w=2)
        ref = node(sim, "n1").store.read(b"big").siblings[0].chunks
        await node(sim, "n3").store.write_chunk(b"big", ref.vid, 0, value[:65536])
        sim.net.heal()
        await trio.sleep(60)  # several anti-entropy rounds
        copy = node(sim, "n3").store.read(b"big")
        assert copy is not None, "anti-entropy never completed the short blob"
        data = b"".join([piece async for piece in node(sim, "n3").store.read_chunks(
            b"big", copy.siblings[0].chunks)])
        assert data == value
        assert not sim.crashes, sim.crashes
        nursery.cancel_scope.cancel()


# ------------------------------------------------------------------ config


def test_hint_window_and_request_timeout_must_be_shorter_than_tombstone_grace():
    """A hint is delivered at most hint_window after it was stored, a replica write at most
    request_timeout after it was sent (peer connections' TCP_USER_TIMEOUT): either arriving
    after its key's tombstone was purged would bring the key back."""
    from kvd.config import load_config
    from kvd.errors import ConfigError

    def refusal(**env: str) -> str:
        with pytest.raises(ConfigError) as info:
            load_config(None, {f"KVD_{k.upper()}": v for k, v in env.items()}, {})
        message = str(info.value)
        assert "\n" not in message
        return message

    message = refusal(hint_window="7200", tombstone_grace="3600")
    assert "hint_window" in message and "tombstone_grace" in message, message
    message = refusal(hint_window="3595", request_timeout="10", tombstone_grace="3600")
    assert "hint_window (3595 s) + request_timeout (10 s)" in message, message
    message = refusal(hinted_handoff="false", request_timeout="20", tombstone_grace="15")
    assert "request_timeout (20 s) must be shorter than tombstone_grace" in message, message
    # Without hinted handoff there are no hints to resurrect anything.
    load_config(None, {"KVD_HINT_WINDOW": "7200", "KVD_TOMBSTONE_GRACE": "3600",
                       "KVD_HINTED_HANDOFF": "false"}, {})
    load_config(None, {"KVD_HINT_WINDOW": "3589", "KVD_TOMBSTONE_GRACE": "3600"}, {})


# ------------------------------------------------------------------ objects larger than a frame

PATHS = {  # how n3 gets what it missed while down: one repair path at a time
    "hint": dict(hinted_handoff=True, read_repair=False, anti_entropy=False),
    "read-repair": dict(hinted_handoff=False, read_repair=True, anti_entropy=False),
    "anti-entropy": dict(hinted_handoff=False, read_repair=False, anti_entropy=True),
}


@pytest.mark.parametrize("path", sorted(PATHS))
async def test_object_with_many_near_1mib_inline_siblings_travels(autojump_clock, path):
    """Six inline siblings of ~1 MB: a 6 MB object, over the 4 MiB max_frame."""
    async with trio.open_nursery() as nursery:
        sim = await cluster(nursery, chunk_size=1 << 20, max_frame=4 << 20,
                            anti_entropy_interval=10.0, **PATHS[path])
        key = b"crowded"
        values = [bytes([i]) * 1_000_000 for i in range(1, 7)]
        sim.crash("n3")
        await trio.sleep(15)
        async with sim.open_client("n1", sim.client_address()) as c:
            await c.put(key, b"first")
            context = (await c.get(key)).context
            for value in values:  # concurrent with one another: each becomes a sibling
                await c.put(key, value, context=context)
        await sim.start("n3")
        await trio.sleep(10)
        if path == "read-repair":
            async with sim.open_client("n1", sim.client_address()) as c:
                got = await c.get(key, r=3)
            assert sorted(s.value for s in got.siblings) == values
        await trio.sleep(60)
        obj = node(sim, "n3").store.read(key)
        assert obj is not None, f"n3 never got the object by {path}"
        assert sorted(s.value for s in obj.siblings) == values
        assert not sim.crashes, sim.crashes
        nursery.cancel_scope.cancel()


def same_segment_keys(q: int, count: int, length: int = 1000) -> list[bytes]:
    """``count`` keys of ``length`` bytes in one partition (of ``q``) and one AAE segment."""
    import hashlib

    from kvd import aae
    from kvd.ring import partition_of

    prefix = b"p" * (length - 8)
    # The hashes of the shared prefix, computed once (partition_of and aae.segment_of).
    by_partition = hashlib.blake2b(prefix, digest_size=8)
    by_segment = hashlib.blake2b(prefix, digest_size=8, person=b"kvd-aae")
    want, out, i = None, [], 0
    while len(out) < count:
        suffix = i.to_bytes(8, "big")
        i += 1
        h = by_partition.copy()
        h.update(suffix)
        partition = int.from_bytes(h.digest(), "big") >> (64 - (q.bit_length() - 1))
        if want is not None and partition != want[0]:
            continue
        h = by_segment.copy()
        h.update(suffix)
        where = (partition, int.from_bytes(h.digest(), "big") % aae.SEGMENTS)
        want = want or where
        if where == want:
            out.append(prefix + suffix)
    assert {(partition_of(k, q), aae.segment_of(k)) for k in out} == {want}
    return out


async def test_anti_entropy_key_lists_are_capped_by_the_frame(autojump_clock):
    """A segment listing larger than max_frame (64 KiB) arrives in pieces."""
    async with trio.open_nursery() as nursery:
        # An 8-partition ring: finding 80 keys of one partition and one segment is a search
        # over partitions x 1,024 segments (5 CPU-s at the harness's 32 partitions, 1 s here).
        sim = await cluster(nursery, chunk_size=64 << 10, max_frame=64 << 10, ring_size=8,
                            hinted_handoff=False, read_repair=False, anti_entropy_interval=10.0)
        keys = same_segment_keys(node(sim, "n1").cluster.state.ring.q, 80)
        sim.crash("n3")
        await trio.sleep(15)
        async with sim.open_client("n1", sim.client_address()) as c:
            for key in keys:
                await c.put(key, b"v")
        await sim.start("n3")
        await trio.sleep(90)
        missing = [k for k in keys if node(sim, "n3").store.read(k) is None]
        assert not missing, f"n3 still misses {len(missing)} of {len(keys)} keys"
        assert not sim.crashes, sim.crashes
        nursery.cancel_scope.cancel()


async def test_tombstones_written_before_the_index_are_indexed_once_and_collected(autojump_clock):
    from kvd.storage import keys as layout

    async with trio.open_nursery() as nursery:
        sim = await cluster(nursery, names=("n1",), tombstone_grace=30.0, hint_window=20.0,
                            anti_entropy_interval=10.0)
        async with sim.open_client("n1", sim.client_address()) as c:
            await c.put(b"old", b"v")
            await c.delete(b"old", context=(await c.get(b"old")).context)
        # As a data directory from before the index: no entry, no "indexed" mark.
        storage = node(sim, "n1").storage
        q = layout.partition_of(b"old", node(sim, "n1").store.ring_size)
        await storage.write([layout.tombstone_op(q, b"old", None),
                             (layout.meta_key("tombstone-index"), None)])
        sim.crash("n1")
        await trio.sleep(1)
        await sim.start("n1", seeds=[])
        await trio.sleep(90)
        assert node(sim, "n1").store.read(b"old") is None, "the old tombstone was never collected"
        assert not sim.crashes, sim.crashes
        nursery.cancel_scope.cancel()


async def test_an_unreadable_hint_does_not_stop_the_others(autojump_clock, caplog):
    """And its drop is not reported as one of age (outside tester: "dropped 10 hints for
    n3 older than hint_window (10800 s)" summed up unreadable hints)."""
    from kvd.storage import keys as layout

    caplog.set_level(logging.INFO, logger="kvd.handoff")
    async with trio.open_nursery() as nursery:
        sim = await cluster(nursery)
        sim.crash("n3")
        await trio.sleep(15)
        async with sim.open_client("n1", sim.client_address()) as c:
            await c.put(b"good", b"v")
        # Sorts first: a record damaged on disk (or written by a buggy version).
        await node(sim, "n1").storage.write([(layout.hint_key("n3", 1), b"\xc1garbage")])
        await sim.start("n3")
        await trio.sleep(30)
        assert node(sim, "n3").store.read(b"good") is not None, "the good hint was not delivered"
        assert node(sim, "n1").cluster.handoff.pending() == {}
        summaries = [r.getMessage() for r in caplog.records if "dropped 1 hint" in r.getMessage()]
        assert summaries == ["dropped 1 hints for n3 (1 unreadable, 0 older than "
                             "hint_window 3600 s)"], summaries
        assert not sim.crashes, sim.crashes
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("path", sorted(PATHS))
async def test_a_partition_of_large_objects_travels(autojump_clock, path):
    """Twelve ~1 MB inline objects in one partition (max_frame 4 MiB): batches stay bounded."""
    from kvd.ring import partition_of

    async with trio.open_nursery() as nursery:
        sim = await cluster(nursery, chunk_size=1 << 20, max_frame=4 << 20,
                            anti_entropy_interval=10.0, **PATHS[path])
        q = node(sim, "n1").cluster.state.ring.q
        keys = [k for k in (b"big%d" % i for i in range(2000)) if partition_of(k, q) == 0][:12]
        values = {key: bytes([i]) * 1_000_000 for i, key in enumerate(keys)}
        sim.crash("n3")
        await trio.sleep(15)
        async with sim.open_client("n1", sim.client_address()) as c:
            for key, value in values.items():
                await c.put(key, value)
        await sim.start("n3")
        await trio.sleep(10)
        if path == "read-repair":
            async with sim.open_client("n1", sim.client_address()) as c:
                for key in keys:
                    await c.get(key, r=3)
        await trio.sleep(60)
        store3 = node(sim, "n3").store
        got = {key: store3.read(key) for key in keys}
        missing = [key for key, obj in got.items() if obj is None]
        assert not missing, f"n3 misses {len(missing)} of {len(keys)} by {path}"
        assert all(got[k].siblings[0].value == values[k] for k in keys)
        assert not sim.crashes, sim.crashes
        nursery.cancel_scope.cancel()


async def test_anti_entropy_push_never_leaves_a_named_blob_to_the_sweep(autojump_clock):
    """The initiator pushes a chunked value to a replica that already has it (and more): the
    bytes it re-sends must not be swept at that replica's next start."""
    async with trio.open_nursery() as nursery:
        sim = await cluster(nursery, hinted_handoff=False, read_repair=False,
                            anti_entropy_interval=10.0)
        key = next(k for k in (b"k%d" % i for i in range(1000)) if replicas_of(sim, k)[0] == "n1")
        other = replicas_of(sim, key)[1]
        async with sim.open_client("n1", sim.client_address()) as c:
            await c.put(key, b"v0", w=3)
            context = (await c.get(key, r=3)).context
            await c.put(key, os.urandom(200_000), context=context, w=3)  # chunked, everywhere
        vid = node(sim, other).store.read(key).siblings[0].chunks.vid
        sim.crash("n1")
        await trio.sleep(15)
        async with sim.open_client(other, sim.client_address()) as c:
            await c.put(key, b"concurrent", context=context, w=2)  # n1 misses this sibling
        await sim.start("n1")
        await trio.sleep(60)  # n1, first replica, exchanges: it has less than the others
        assert vid in {s.chunks.vid for s in node(sim, other).store.read(key).siblings if s.chunks}
        sim.crash(other)
        await trio.sleep(1)
        await sim.start(other)
        assert node(sim, other).store.blobs.exists(vid), "a restart swept bytes a manifest names"
        assert not sim.crashes, sim.crashes
        nursery.cancel_scope.cancel()
