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
            assert sim.nodes["n1"].node.store._lease(actor).limit < 2**20
        assert not sim.crashes, sim.crashes
        nursery.cancel_scope.cancel()
