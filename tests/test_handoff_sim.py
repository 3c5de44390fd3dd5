"""Hinted handoff, anti-entropy and tombstone GC under faults, on whole simulated nodes
(tests/sim/harness.py: real nodes, in-memory network, MockClock). Issue 9, section 4."""

from __future__ import annotations

import os
import sys

import pytest
import trio

sys.path.insert(0, os.path.dirname(__file__))

from sim.harness import SimCluster, seeded  # noqa: E402

from kvd.proto.messages import MsgType  # noqa: E402


@pytest.fixture(autouse=True)
def _seeded():
    with seeded(1):
        yield


async def cluster(nursery, names=("n1", "n2", "n3"), **config) -> SimCluster:
    """A committed cluster of ``names`` (the first is the seed), every move done."""
    sim = SimCluster(nursery, seed=1, **config)
    first = await sim.start(names[0], seeds=[])
    for name in names[1:]:
        await sim.start(name, seeds=[first.peer_address])
    src = sim.client_address()
    for name in names[1:]:
        async with sim.open_client(name, src) as c:
            await c.admin({"op": "join", "seed": first.peer_address})
    if len(names) > 1:
        async with sim.open_client(names[0], src) as c:
            await c.admin({"op": "commit"})
            while (await c.admin({"op": "ring"}))["pending"]:
                await trio.sleep(1)
    await trio.sleep(5)  # every node sees every other up
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
        assert node(sim, "n1").cluster.hints_pending() == {"n3": 5}
        await trio.sleep(60)  # n3 stays down, past hint_window
        assert node(sim, "n1").cluster.hints_pending() == {}, "expired hints are still kept"
        assert not sim.crashes
        nursery.cancel_scope.cancel()
