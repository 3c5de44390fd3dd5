"""Coordinator failure handling in the whole-node simulator (issue 9, section 4: bugs 12, 15, 16).

Every test runs real nodes (kvd.server.serve) on kvd.net.memory under trio's autojump
MockClock, so the times asserted are simulated seconds and a run is repeatable.
"""

from __future__ import annotations

import os
import sys
from functools import partial

import pytest
import trio

sys.path.insert(0, os.path.dirname(__file__))
from sim.harness import SimCluster, seeded  # noqa: E402

from kvd.errors import QuorumFailed  # noqa: E402
from kvd.ring import partition_of, preference_list  # noqa: E402


@pytest.fixture(autouse=True)
def _seeded():
    with seeded(1):
        yield


async def _cluster(nursery, names=("n1", "n2", "n3"), **config) -> SimCluster:
    """A committed cluster of ``names``, every node up everywhere, with some gossip history."""
    sim = SimCluster(nursery, seed=1, **config)
    await sim.form(names, settle=10.0)
    for sn in sim.nodes.values():
        assert all(sn.node.cluster.is_up(other) for other in sim.nodes), sn.name
    return sim


def _primaries(sim: SimCluster, key: bytes, via: str = "n1") -> list[str]:
    cluster = sim.nodes[via].node.cluster
    return preference_list(cluster.routing.serving_ring(), partition_of(key, cluster.state.ring.q), 3)


async def _timed_puts(sim: SimCluster, keys: list[bytes], pause) -> list[float]:
    """Put each key at W=2 through n1 and return how long each took (simulated seconds);
    ``pause(i)`` seconds pass after the i-th."""
    took = []
    async with sim.open_client("n1", sim.client_address()) as c:
        for i, key in enumerate(keys):
            began = trio.current_time()
            await c.put(key, b"v", w=2)
            took.append(round(trio.current_time() - began, 3))
            await trio.sleep(pause(i))
    return took


def _key_with(sim: SimCluster, first: str, not_first: str | None = None, prefix=b"k") -> bytes:
    """A key whose preference list starts with ``first``."""
    for i in range(10_000):
        key = prefix + str(i).encode()
        if _primaries(sim, key)[0] == first:
            return key
    raise AssertionError("no such key")


def _stall(sim: SimCluster, name: str, seconds: float) -> None:
    """Make ``name`` stall ``seconds`` after receiving each mint request, then apply it: what a
    SIGSTOPped process does with a request already in its socket buffer when it resumes."""
    store = sim.nodes[name].node.store
    coordinate = store.coordinate

    async def stalled(*args, **kwargs):
        await trio.sleep(seconds)
        return await coordinate(*args, **kwargs)

    store.coordinate = stalled


async def test_put_retried_on_another_primary_is_applied_once(autojump_clock):
    """Bug 15: the first primary stalls while it mints; the coordinator mints again on the next
    primary; then the first attempt lands too. The client made one write, so the key must
    hold one sibling."""
    async with trio.open_nursery() as nursery:
        # Four nodes: the coordinator is not one of the key's replicas (one that is mints
        # itself), so it asks the first primary, n3, which stalls.
        sim = await _cluster(nursery, ("n1", "n2", "n3", "n4"))
        key = _key_with(sim, "n3")
        coordinator = next(n for n in sim.nodes if n not in _primaries(sim, key))
        src = sim.client_address()
        _stall(sim, "n3", 12.0)  # longer than request_timeout (5 s in the simulator)
        async with sim.open_client(coordinator, src) as c:
            await c.put(key, b"once")
        await trio.sleep(30)  # the stalled mint lands; read repair and gossip settle
        async with sim.open_client(coordinator, src) as c:
            reply = await c.get(key, r=3)
        values = [s.value for s in reply.siblings]
        assert values == [b"once"], f"one client write became {len(values)} siblings: {values}"
        assert not sim.crashes, sim.crashes
        nursery.cancel_scope.cancel()


async def test_write_through_an_isolated_node_fails_fast_naming_every_replica(autojump_clock):
    """Bug 16: the coordinator is cut off from everyone but still judges them up. Its write
    must fail within request_timeout (not one request_timeout per primary), and the error
    must name every replica with a reason an operator can read."""
    async with trio.open_nursery() as nursery:
        sim = await _cluster(nursery, request_timeout=10.0, replica_timeout=1.0)
        key = _key_with(sim, "n2")  # minted elsewhere: n1 has to ask n2, then n3
        src = sim.client_address()
        async with sim.open_client("n1", src) as c:
            sim.isolate("n1")
            began = trio.current_time()
            with pytest.raises(QuorumFailed) as failure:
                await c.put(key, b"v")
            took = trio.current_time() - began
        message = str(failure.value)
        # The read of what the write supersedes returns a hedge delay after the local
        # answer; the two remote primaries are asked to mint a hedge delay apart and each
        # gets one replica_timeout (rule 8).
        assert took <= 1.0 + 0.5, f"failed after {took:.1f} s: {message}"
        for node in ("n2", "n3"):  # the read timed out on them; the mint then knows why
            assert (f"{node}: timed out after 1.0 s" in message
                    or f"{node}: cannot reach peer" in message), message
        assert not sim.crashes, sim.crashes
        nursery.cancel_scope.cancel()


def _ring_partition(sim: SimCluster, names: list[str]) -> None:
    """Each node reaches only its two neighbours on a ring of ``names``."""
    for i, a in enumerate(names):
        neighbours = {names[i - 1], names[(i + 1) % len(names)]}
        far = [sim.nodes[b].peer_address for b in names if b != a and b not in neighbours]
        sim.net.partition(sim.nodes[a].peer_address, far)


async def test_ring_partition_never_stalls_a_write(autojump_clock):
    """Bug 16, and issue 14's latency through faults: with a ring partition (each node
    reaches only its neighbours) gossip relayed by the neighbours keeps every node up, so
    only the request itself can notice that a replica does not answer. n1 reaches n2 and
    n5, a quorum: every write through it must succeed within a couple of hedge delays,
    and only the first that asks each silent replica something may wait for it at all
    (rule 5: a replica with a call a hedge delay late is suspected)."""
    from kvd.node.replica_health import HEDGE_FLOOR

    names = ["n1", "n2", "n3", "n4", "n5"]
    async with trio.open_nursery() as nursery:
        sim = await _cluster(nursery, names, request_timeout=10.0, replica_timeout=1.0)
        _ring_partition(sim, names)
        src = sim.client_address()
        took = []
        async with sim.open_client("n1", src) as c:
            # Right after the cut (connections still open, sends black-holed) and again once
            # gossip has had time to notice, which it cannot.
            for batch in ("at once", "after 30 s"):
                if batch != "at once":
                    await trio.sleep(30)
                    cluster = sim.nodes["n1"].node.cluster
                    assert all(cluster.is_up(n) for n in names), "the detector saw it after all"
                for i in range(20):
                    key = f"ring{batch}{i}".encode()
                    began = trio.current_time()
                    await c.put(key, b"v")
                    took.append((batch, _primaries(sim, key),
                                 round(trio.current_time() - began, 3)))
        assert max(t for _, _, t in took) <= 0.3, took
        assert len([t for _, _, t in took if t >= HEDGE_FLOOR]) <= 2, took
        assert not sim.crashes, sim.crashes
        nursery.cancel_scope.cancel()


async def test_a_silent_first_primary_costs_a_write_a_hedge_not_a_replica_timeout(
        autojump_clock):
    """Issue 14, latency through faults: the link from the coordinator to a key's first
    primary is cut and nothing else (the failure detector, fed by gossip relayed around
    the cut, cannot see it). The quorum is reachable, so no write may wait a whole
    replica_timeout: the next primary is asked once the first is late (rule 8), for every
    write, not only those after the first that timed out."""
    names = ["n1", "n2", "n3", "n4", "n5"]
    async with trio.open_nursery() as nursery:
        sim = await _cluster(nursery, names, request_timeout=10.0, replica_timeout=1.0)
        keys = []
        for i in range(100_000):
            key = b"hedge" + str(i).encode()
            primaries = _primaries(sim, key)
            if primaries[0] == "n2" and "n1" not in primaries:
                keys.append(key)
            if len(keys) == 12:
                break
        sim.net.partition(sim.nodes["n1"].peer_address, [sim.nodes["n2"].peer_address])
        took = await _timed_puts(sim, keys, lambda i: 6)  # past SUSPECT_FOR every other write
        assert max(took) <= 0.3, took
        assert not sim.crashes, sim.crashes
        nursery.cancel_scope.cancel()


async def test_a_mint_that_lost_the_hedge_race_reaches_every_replica(autojump_clock):
    """Rule 8: the first primary mints late (after the next one won), so it holds a twin
    dot the others lack. With anti-entropy and read repair off, only the coordinator can
    give the twin to the others: every replica must end with the same object."""
    async with trio.open_nursery() as nursery:
        # Four nodes, keys whose replicas are n2, n3, n4: the coordinator, n1, is not one of
        # them (one that is mints itself), so it asks the first primary, n2, which is slow.
        sim = await _cluster(nursery, ("n1", "n2", "n3", "n4"), anti_entropy=False,
                             read_repair=False)
        keys = []
        for i in range(1000):
            key = _key_with(sim, "n2", prefix=b"twin%d-" % i)
            if "n1" not in _primaries(sim, key) and len(keys) < 5:
                keys.append(key)
        store = sim.nodes["n2"].node.store
        coordinate = store.coordinate

        async def slow_to_answer(*args, **kwargs):  # a slow fsync: applied, answered late
            minted = await coordinate(*args, **kwargs)
            await trio.sleep(0.5)  # past the hedge delay, within replica_timeout
            return minted

        store.coordinate = slow_to_answer
        src = sim.client_address()
        async with sim.open_client("n1", src) as c:
            for key in keys:
                await c.put(key, b"v", w=3)
        await trio.sleep(10)
        assert len(keys) == 5
        for key in keys:
            held = {name: sim.nodes[name].node.store.read(key) for name in _primaries(sim, key)}
            assert len(set(held.values())) == 1, (key, held)
        assert not sim.crashes, sim.crashes
        nursery.cancel_scope.cancel()


async def test_detection_time_stays_bounded_after_earlier_pauses(autojump_clock):
    """Bug 16, whole nodes: n3 is cut off for 20 s five times, a minute apart. Every other
    node must judge it down as fast after the fifth pause as after the first."""
    names = ["n1", "n2", "n3", "n4", "n5"]
    async with trio.open_nursery() as nursery:
        sim = await _cluster(nursery, names)
        watchers = [sim.nodes[n].node.cluster for n in names if n != "n3"]
        times = []
        for _ in range(5):
            await trio.sleep(40)
            sim.isolate("n3")
            began = trio.current_time()
            while any(w.is_up("n3") for w in watchers):
                await trio.sleep(0.1)
            times.append(round(trio.current_time() - began, 1))
            await trio.sleep(max(0.0, 20 - (trio.current_time() - began)))
            sim.net.heal()
            while not all(w.is_up("n3") for w in watchers):
                await trio.sleep(0.1)
        assert max(times[1:]) <= times[0] + 1.0 and max(times) <= 10.0, times
        assert not sim.crashes, sim.crashes
        nursery.cancel_scope.cancel()


async def test_every_acknowledged_write_reaches_a_replica_killed_just_before(autojump_clock):
    """Bug 12: n3 dies; for the seconds the failure detector needs, writes still go to it,
    fail there, and are acknowledged by the two others (W=2). Each failed leg must leave a
    hint, so that once n3 is back every acknowledged write reached it, with anti-entropy
    off."""
    async with trio.open_nursery() as nursery:
        sim = await _cluster(nursery, anti_entropy=False)
        src = sim.client_address()
        acknowledged = []
        sim.crash("n3")
        async with sim.open_client("n1", src) as c:
            for i in range(100):
                key = b"w" + str(i).encode()
                await c.put(key, b"v%d" % i, w=2)
                acknowledged.append(key)
        await trio.sleep(5)
        await sim.start("n3")
        await trio.sleep(60)  # n3 is seen up again and the hints are handed off
        store = sim.nodes["n3"].node.store
        missing = [k for k in acknowledged if "n3" in _primaries(sim, k) and store.read(k) is None]
        assert not missing, f"{len(missing)} acknowledged writes never reached n3: {missing[:5]}"
        assert not sim.crashes, sim.crashes
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("names", [("n1", "n2", "n3"), ("n1", "n2", "n3", "n4")])
async def test_large_write_with_a_down_primary_is_hinted_with_its_bytes(autojump_clock, names):
    """Bug 12: n3 is down. With three nodes the coordinator (n1) keeps n3's hint itself; with
    four, n1 is picked as the fallback that stands in for n3 (and counts towards W=3). A
    value larger than chunk_size travels as chunks, which the local hint store could not
    take (a traceback, no hint, and the fallback dropped from W). The hint must hold the
    bytes, n3 must get the whole value once back, and then the hinted bytes are freed."""
    async with trio.open_nursery() as nursery:
        sim = await _cluster(nursery, names, anti_entropy=False)
        sim.crash("n3")
        await trio.sleep(20)  # judged down: the write is routed with a hint for n3
        cluster = sim.nodes["n1"].node.cluster
        key = next(k for k in (b"big" + str(i).encode() for i in range(10_000))
                   if "n3" in _primaries(sim, k) and
                   any(getattr(r, "stands_for", None) == "n3" and r.node == "n1"
                       for r in cluster.routing.replicas_for_write(k, 3)))
        w = len(names) - 1  # n3's stand-in is needed when there is one
        value = bytes(range(256)) * 1000  # 256 000 bytes, four chunks of 65 536
        src = sim.client_address()
        async with sim.open_client("n1", src) as c:
            await c.put(key, value, w=w)
        assert not sim.crashes, sim.crashes
        await sim.start("n3")
        await trio.sleep(60)
        node = sim.nodes["n3"].node
        obj = node.store.read(key)
        assert obj is not None, "the hint never reached n3"
        (sibling,) = obj.siblings
        stored = b"".join([piece async for piece in node.store.read_chunks(key, sibling.chunks)])
        assert stored == value
        async with sim.open_client("n3", src) as c:
            assert [s.value for s in (await c.get(key, r=3)).siblings] == [value]
        n1 = sim.nodes["n1"].node
        assert not n1.cluster.handoff.pending(), "the hint was not handed off"
        if "n1" not in _primaries(sim, key):  # n1 held the bytes for the hint only
            assert not n1.store.blobs.exists(sibling.chunks.vid), "hinted bytes were kept"
        assert not sim.crashes, sim.crashes
        nursery.cancel_scope.cancel()


async def test_silent_replicas_cost_a_write_a_hedge_not_a_replica_timeout(autojump_clock):
    """Issue 14, latency through faults: n1 is cut off from n3 and n4 and nothing else (the
    failure detector, fed by gossip relayed around the cut, cannot see it). A key whose
    primaries include n3 and n4 has one reachable primary, which mints; W=2 then needs a
    stand-in (rule 3). The quorum is reachable (n2 and n5 can stand in), so no write may
    wait a whole replica_timeout for the silent primaries: the stand-ins are asked once
    the replication legs are a hedge delay late (rule 9)."""
    names = ["n1", "n2", "n3", "n4", "n5"]
    async with trio.open_nursery() as nursery:
        sim = await _cluster(nursery, names, request_timeout=10.0, replica_timeout=1.0)
        keys = [key for key in (b"stand" + str(i).encode() for i in range(100_000))
                if {"n3", "n4"} <= set(_primaries(sim, key))][:12]
        silent = [sim.nodes[n].peer_address for n in ("n3", "n4")]
        sim.net.partition(sim.nodes["n1"].peer_address, silent)
        # Every other write comes after the last one's legs timed out, too.
        took = await _timed_puts(sim, keys, lambda i: 6 if i % 2 else 0)
        cluster = sim.nodes["n1"].node.cluster
        assert cluster.is_up("n3") and cluster.is_up("n4"), "the detector saw the cut"
        assert max(took) <= 0.3, took
        assert not sim.crashes, sim.crashes
        nursery.cancel_scope.cancel()


async def test_a_silent_replica_costs_one_write_a_hedge_not_every_write_until_it_times_out(
        autojump_clock):
    """Issue 14, latency through faults: right after n1's link to n3 is cut (n3 still up to
    the failure detector), the first write through n1 that asks n3 anything waits a hedge
    delay or two for it. The writes after it must not, though no call to n3 has timed out
    yet (replica_timeout is 1 s): a replica with a call a hedge delay late is suspected
    until it answers (rule 5), so rule 7's read and the mints go elsewhere at once."""
    from kvd.node.replica_health import HEDGE_FLOOR

    names = ["n1", "n2", "n3", "n4", "n5"]
    async with trio.open_nursery() as nursery:
        sim = await _cluster(nursery, names, request_timeout=10.0, replica_timeout=1.0)
        keys = [key for key in (b"late" + str(i).encode() for i in range(100_000))
                if "n3" in _primaries(sim, key)][:12]
        sim.net.partition(sim.nodes["n1"].peer_address, [sim.nodes["n3"].peer_address])
        took = await _timed_puts(sim, keys, lambda i: 0)
        assert sum(took) < 1.0, f"the writes outlasted the replica timeout: {took}"
        assert max(took) <= 0.3, took
        assert len([t for t in took if t >= HEDGE_FLOOR]) <= 1, took
        assert not sim.crashes, sim.crashes
        nursery.cancel_scope.cancel()


async def test_a_silent_replica_costs_a_read_a_hedge_not_a_replica_timeout(autojump_clock):
    """Issue 14, latency through faults: n1's link to n3 is cut, and n3 is the first replica
    a read at R=2 through n1 asks for the object. The other replicas can answer, so no
    read may wait a whole replica_timeout for n3: a data read a hedge delay late has the
    next replica asked for the object too (Cassandra's speculative retry), and the reads
    after the first ask n3 only for a digest (rule 5)."""
    from kvd.node.replica_health import HEDGE_FLOOR

    names = ["n1", "n2", "n3", "n4", "n5"]
    async with trio.open_nursery() as nursery:
        sim = await _cluster(nursery, names, request_timeout=10.0, replica_timeout=1.0)
        keys = [key for key in (b"rdl" + str(i).encode() for i in range(100_000))
                if _primaries(sim, key)[0] == "n3"][:8]
        took = []
        async with sim.open_client("n1", sim.client_address()) as c:
            for key in keys:
                await c.put(key, b"v", w=3)
            sim.net.partition(sim.nodes["n1"].peer_address, [sim.nodes["n3"].peer_address])
            for key in keys:
                began = trio.current_time()
                assert [s.value for s in (await c.get(key, r=2)).siblings] == [b"v"]
                took.append(round(trio.current_time() - began, 3))
        assert took[0] <= 0.3, took
        assert max(took[1:]) < HEDGE_FLOOR, took
        assert not sim.crashes, sim.crashes
        nursery.cancel_scope.cancel()


async def test_a_read_whose_spare_a_failure_took_waits_for_its_late_replicas(autojump_clock):
    """Rule 2 of kvd.node.reads, both halves at once: a data read that fails takes the spare
    at once, and a late one would take it after a hedge delay. With the spare gone, the
    read must still wait for its late replicas (up to the request's deadline) rather than
    give up at the hedge delay. Four nodes; the key's replicas are n2, n3 and n4; n3 is
    down (its calls fail at once) and every message to or from n2 and n4 is delayed."""
    from kvd.node.replica_health import HEDGE_FLOOR

    async with trio.open_nursery() as nursery:
        sim = await _cluster(nursery, ("n1", "n2", "n3", "n4"), request_timeout=10.0,
                             replica_timeout=1.0)
        key = next(key for key in (b"sp" + str(i).encode() for i in range(100_000))
                   if _primaries(sim, key) == ["n2", "n3", "n4"])
        async with sim.open_client("n1", sim.client_address()) as c:
            await c.put(key, b"v", w=3)
            sim.crash("n3")
            sim.net.set_delay(0.2, [sim.nodes[n].peer_address for n in ("n2", "n4")])
            began = trio.current_time()
            assert [s.value for s in (await c.get(key, r=2)).siblings] == [b"v"]
            assert trio.current_time() - began > HEDGE_FLOOR  # the case: replicas were late
        assert not sim.crashes, sim.crashes
        nursery.cancel_scope.cancel()


async def test_a_large_upload_does_not_make_its_replicas_suspects(autojump_clock, monkeypatch):
    """A large value's chunks take time in proportion to their size (here a slow blob disk
    on n2 and n3: 0.2 s a chunk), far more than a hedge delay. Those calls must not make
    n2 and n3 look late or slow (rule 5): the small writes made meanwhile through n1, to
    keys n2 and n3 replicate and answer at once, must go to them, not to fallbacks
    standing in for them and keeping hints."""
    from kvd.node.local import LocalStore

    names = ["n1", "n2", "n3", "n4", "n5"]
    async with trio.open_nursery() as nursery:
        sim = await _cluster(nursery, names, request_timeout=10.0, replica_timeout=1.0)
        write_chunk = LocalStore.write_chunk
        slow_disks = {id(sim.nodes[n].node.store) for n in ("n2", "n3")}

        async def slow_write_chunk(self, *args):
            if id(self) in slow_disks:
                await trio.sleep(0.2)
            return await write_chunk(self, *args)

        monkeypatch.setattr(LocalStore, "write_chunk", slow_write_chunk)
        big = _key_with(sim, "n1", prefix=b"big")
        small = [key for key in (b"small" + str(i).encode() for i in range(100_000))
                 if _primaries(sim, key) == ["n1", "n2", "n3"]][:10]
        assert _primaries(sim, big) == ["n1", "n2", "n3"]
        async with sim.open_client("n1", sim.client_address()) as uploader:
            async with trio.open_nursery() as writers:
                writers.start_soon(partial(uploader.put, big, b"x" * (2 << 20), w=2))
                await trio.sleep(0.5)  # chunks in flight to n2 and n3
                took = await _timed_puts(sim, small, lambda i: 0.05)
        assert max(took) < 0.05, took
        handoffs = [sn.node.cluster.handoff for sn in sim.nodes.values()]
        stood_in = sum(h.delivered + sum(h.pending().values()) for h in handoffs)
        assert stood_in == 0, f"fallbacks stood in for n2 and n3 {stood_in} times"
        assert not sim.crashes, sim.crashes
        nursery.cancel_scope.cancel()


def _silence(monkeypatch, sim: SimCluster, names: set[str]) -> None:
    """The replicas on ``names`` never answer a data call (reads, mints, merges), while gossip
    still flows: what a hung disk, or a ring partition relayed by gossip, looks like to a
    coordinator. The failure detector cannot see it; only the requests can."""
    from kvd.node import connections, peer_service
    from kvd.proto.codec import MsgType

    def silenced(handler):
        async def handle(node, conn, message, chunks):
            if node.node_id in names:
                await trio.sleep_forever()
            return await handler(node, conn, message, chunks)
        return handle

    for kind in (MsgType.REPLICA_GET, MsgType.REPLICA_PUT):
        monkeypatch.setitem(peer_service.PEER_HANDLERS, kind,
                            silenced(peer_service.PEER_HANDLERS[kind]))
    # Reads the connection's reader answers itself go to the (silenced) handler instead.
    inline = ("peer", MsgType.REPLICA_GET)
    read_now = connections._ANSWER_NOW[inline]
    monkeypatch.setitem(connections._ANSWER_NOW, inline, lambda node, conn, message: (
        None if node.node_id in names else read_now(node, conn, message)))


async def test_suspected_replicas_cost_a_write_no_hedge(autojump_clock, monkeypatch):
    """Issue 14, latency through faults: n3 and n4 answer no data call and the failure
    detector cannot see it. Once their calls timed out (rule 5: suspected for SUSPECT_FOR),
    a write through n1 to a key whose primaries include both must not wait for them at all:
    not in the read that rule 7 makes (n - w + 1 answers asked, one can come), nor in its
    replication (fallbacks stand in at once, rule 9). Each write then takes less than one
    hedge delay (HEDGE_FLOOR)."""
    from kvd.node.replica_health import HEDGE_FLOOR

    names = ["n1", "n2", "n3", "n4", "n5"]
    async with trio.open_nursery() as nursery:
        sim = await _cluster(nursery, names, request_timeout=10.0, replica_timeout=1.0)
        keys = [key for key in (b"susp" + str(i).encode() for i in range(100_000))
                if {"n3", "n4"} <= set(_primaries(sim, key))][:13]
        _silence(monkeypatch, sim, {"n3", "n4"})
        await _timed_puts(sim, keys[:1], lambda i: 1.5)  # may pay the hedges; its legs time out
        took = await _timed_puts(sim, keys[1:], lambda i: 0.5)
        cluster = sim.nodes["n1"].node.cluster
        assert cluster.is_up("n3") and cluster.is_up("n4"), "the detector saw it"
        assert max(took) < HEDGE_FLOOR, took
        assert not sim.crashes, sim.crashes
        nursery.cancel_scope.cancel()


async def test_a_slow_replica_costs_writes_no_hedge_once_it_is_known_slow(autojump_clock):
    """Issue 14, a lossy or slow link: every send to or from n2 is delayed by up to 0.3 s (the
    failure detector still sees n2 up). n2 answering slowly must not make the hedge delay
    long for every key (it is learnt per replica, from the fastest), and once n2 is known to
    be slower than that delay it is asked to mint last (rule 5): after a few writes, a
    write through n1 to a key whose first primary is n2 takes less than one hedge delay."""
    from kvd.node.replica_health import HEDGE_FLOOR

    names = ["n1", "n2", "n3", "n4", "n5"]
    async with trio.open_nursery() as nursery:
        sim = await _cluster(nursery, names, request_timeout=10.0, replica_timeout=1.0)
        keys = [key for key in (b"slow" + str(i).encode() for i in range(100_000))
                if _primaries(sim, key)[0] == "n2" and "n1" not in _primaries(sim, key)][:30]
        sim.net.set_delay(0.3, [sim.nodes["n2"].peer_address])
        took = await _timed_puts(sim, keys, lambda i: 0.2)
        assert sim.nodes["n1"].node.cluster.is_up("n2"), "the detector saw it"
        assert max(took[5:]) < HEDGE_FLOOR, took
        assert not sim.crashes, sim.crashes
        nursery.cancel_scope.cancel()


async def test_a_read_short_of_r_unsuspected_replicas_fails_fast(autojump_clock, monkeypatch):
    """Issue 14, fail fast: n3 and n4 answer no data call (the failure detector cannot see
    it). A read at R=2 of a key whose primaries include both has one replica that answers:
    it cannot succeed. Once n3 and n4 timed out (rule 5), such a read must fail (exit 3)
    within a hedge delay, not wait a whole replica_timeout each time; a read at R=1 still
    succeeds at once."""
    from kvd.node.replica_health import HEDGE_FLOOR

    names = ["n1", "n2", "n3", "n4", "n5"]
    async with trio.open_nursery() as nursery:
        sim = await _cluster(nursery, names, request_timeout=10.0, replica_timeout=1.0)
        keys = [key for key in (b"rd" + str(i).encode() for i in range(100_000))
                if {"n3", "n4"} <= set(_primaries(sim, key))][:8]
        src = sim.client_address()
        async with sim.open_client("n1", src) as c:
            for key in keys:
                await c.put(key, b"v", w=3)
            _silence(monkeypatch, sim, {"n3", "n4"})
            with pytest.raises(QuorumFailed):  # this one waits: nobody is suspected yet
                await c.get(keys[0], r=2)
            took = []
            for key in keys[1:]:
                began = trio.current_time()
                with pytest.raises(QuorumFailed) as failure:
                    await c.get(key, r=2)
                took.append(round(trio.current_time() - began, 3))
                assert "n3" in str(failure.value) and "n4" in str(failure.value), failure.value
                assert [s.value for s in (await c.get(key, r=1)).siblings] == [b"v"]
                await trio.sleep(0.5)
        assert max(took) <= 2 * HEDGE_FLOOR, took
        assert not sim.crashes, sim.crashes
        nursery.cancel_scope.cancel()


def _count_reads(monkeypatch, counts: dict) -> None:
    """Count, per node, the object reads (op "get") it answers on its peer port, by the
    reader itself or in a task."""
    from kvd.node import peer_service

    read_now = peer_service._read_now

    def counted(node, message):
        if message.fields.get("op") == "get":
            counts[node.node_id] = counts.get(node.node_id, 0) + 1
        return read_now(node, message)

    monkeypatch.setattr(peer_service, "_read_now", counted)


async def test_rule_7_reads_n_minus_w_plus_1_replicas_and_a_spare_for_a_failure(
        autojump_clock, monkeypatch):
    """Issue 14, one peer read less per write: a write without a context through a primary
    (N3 W2) reads n - w + 1 = 2 replicas, this node's object and one other's, not all
    three; when that other fails, the spare is read at once, so the write still
    supersedes a value only the spare holds."""
    async with trio.open_nursery() as nursery:
        sim = await _cluster(nursery)
        counts: dict[str, int] = {}
        _count_reads(monkeypatch, counts)
        async with sim.open_client("n1", sim.client_address()) as c:
            for i in range(10):
                await c.put(b"seven%d" % i, b"v", w=2)
        reads = sum(counts.values())
        # n2 fails every read; a value only n3 holds must still be superseded.
        key = next(k for k in (b"spare%d" % i for i in range(1000))
                   if _primaries(sim, k)[1:] == ["n2", "n3"])
        from kvd import versions
        only_n3, _ = versions.update(versions.empty(), {}, "n3-actor", value=b"only on n3")
        await sim.nodes["n3"].node.store.merge(key, only_n3)
        store = sim.nodes["n2"].node.store
        monkeypatch.setattr(store, "read_encoded", _failing_read)  # every read of n2 fails
        async with sim.open_client("n1", sim.client_address()) as c:
            await c.put(key, b"new", w=2)
            monkeypatch.undo()
            values = [s.value for s in (await c.get(key, r=3)).siblings]
        nursery.cancel_scope.cancel()
    assert reads == 10, counts
    assert values == [b"new"]


def _failing_read(key):
    from kvd.errors import Unavailable
    raise Unavailable("a failing disk")


async def test_replica_reads_are_answered_by_the_peer_reader_without_a_task(
        autojump_clock, monkeypatch):
    """Issue 14: a peer's replica read (get, digest) needs no task on the replica: its
    connection's reader answers it, like a one-node GET. An object too large to travel
    inline still goes to the task that stages it, and reads back whole."""
    from kvd.node import peer_service
    from kvd.node.remote import RemoteReplica
    from kvd.proto.codec import MsgType

    in_a_task = []
    handler = peer_service.PEER_HANDLERS[MsgType.REPLICA_GET]

    async def counted(node, conn, message, chunks):
        in_a_task.append(message.fields.get("op"))
        return await handler(node, conn, message, chunks)

    monkeypatch.setitem(peer_service.PEER_HANDLERS, MsgType.REPLICA_GET, counted)
    async with trio.open_nursery() as nursery:
        sim = await _cluster(nursery, max_frame=256 << 10, chunk_size=256 << 10)
        async with sim.open_client("n1", sim.client_address()) as c:
            await c.put(b"small", b"v")
            await c.put(b"large", b"x" * (200 << 10))  # past max_frame / 2 with its clock
        n1 = sim.nodes["n1"].node.cluster
        n2 = RemoteReplica("n2", n1.peer_address("n2"), n1.peers)
        in_a_task.clear()
        objects = [await n2.get(b"small") for _ in range(20)]
        assert all([s.value for s in obj.siblings] == [b"v"] for obj in objects)
        assert await n2.digest(b"small") is not None
        assert await n2.get(b"absent") is None
        assert in_a_task == [], in_a_task
        large = await n2.get(b"large")
        assert [len(s.value) for s in large.siblings] == [200 << 10]
        assert in_a_task[0] == "get" and set(in_a_task[1:]) == {"blob"}, in_a_task
        assert not sim.crashes, sim.crashes
        nursery.cancel_scope.cancel()


def test_a_write_quorum_counts_distinct_nodes_and_each_ring_during_a_transition():
    """Rule 11: W distinct nodes; during a transition W on the serving ring's replicas and W
    on the new ring's, a fallback counting for the primary it stands for and a coordinator's
    own hint for none."""
    from types import SimpleNamespace

    from kvd.node.replica import Role
    from kvd.node.replication import WriteQuorum

    def rep(node, stands_for=None, role=Role.PRIMARY):
        return SimpleNamespace(node=node, stands_for=stands_for, role=role)

    steady = WriteQuorum(2)
    assert steady.missing([rep("n1"), rep("n2")]) == 0
    assert steady.missing([rep("n1"), rep("n1", role=Role.HINT)]) == 1
    replacing = WriteQuorum(2, (frozenset({"n1", "n2", "n3"}), frozenset({"n1", "n2", "n4"})))
    assert replacing.missing([rep("n3"), rep("n4")]) == 1  # seed 603: one copy on the new ring
    assert "1 of n1, n2, n4" in replacing.short_rings([rep("n3"), rep("n4")])
    assert replacing.missing([rep("n3"), rep("n4"), rep("n5", stands_for="n1", role=Role.FALLBACK)]) == 0
    # n4 as a new replica and as n1's fallback is still one node of the new ring.
    assert replacing.missing([rep("n3"), rep("n4"), rep("n4", stands_for="n1", role=Role.FALLBACK)]) == 1
    assert replacing.missing([rep("n1"), rep("n2")]) == 0
    growing = WriteQuorum(1, (frozenset({"n1"}), frozenset({"n1", "n2", "n3"})))
    assert growing.missing([rep("n1")]) == 0  # W clamped to one node: per ring, one is enough
