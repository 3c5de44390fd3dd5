"""A replica write its coordinator gave up on must not arrive after its key's tombstone was
purged (docs/DECISIONS.md, "hint_window + request_timeout must be shorter than
tombstone_grace"), on whole simulated nodes (tests/sim/harness.py).

The chaos suite's resurrection, replayed in the simulator now that kvd.net.memory buffers
what is sent into a partition (its rules 2 and 3): n1 coordinates a put while its link to
n3 is cut, so n3's replica PUT sits queued on n1's connection and n1 gives up on it (a
hint, which expires); the key is deleted through n2, which reaches every replica; once the
grace has passed, n2 (the partition's first primary) purges the tombstone everywhere; then
the link heals, and TCP's next retransmission would hand n3 the old PUT. Peer connections
set TCP_USER_TIMEOUT (kvd.net.peer), so the connection is reset instead. The control, with
the option left out, shows the old PUT does arrive and bring the key back: the test can
fail.
"""

from __future__ import annotations

import pytest
import trio

from kvd.net.peer import PeerPool
from kvd.ring import partition_of, preference_list
from sim.harness import SimCluster, seeded

GRACE, HINT_WINDOW, REQUEST_TIMEOUT = 12.0, 5.0, 5.0  # grace > hint_window + request_timeout


@pytest.fixture(autouse=True)
def _seeded():
    with seeded(1):
        yield


@pytest.fixture
def without_user_timeout(monkeypatch):
    """Peer connections as before the fix: no TCP_USER_TIMEOUT."""

    async def dial_peer(self, address):
        return await self._dial(address)

    monkeypatch.setattr(PeerPool, "_dial_peer", dial_peer)


def _key_first_on(sim: SimCluster, first: str) -> bytes:
    cluster = sim.nodes["n1"].node.cluster
    ring = cluster.routing.serving_ring()
    for i in range(10_000):
        key = b"doomed%d" % i
        if preference_list(ring, partition_of(key, cluster.state.ring.q), 3)[0] == first:
            return key
    raise AssertionError("no such key")


async def _resurrects(nursery) -> bool:
    """Play the scenario; whether the deleted key came back."""
    sim = SimCluster(nursery, seed=1, tombstone_grace=GRACE, hint_window=HINT_WINDOW,
                     request_timeout=REQUEST_TIMEOUT, anti_entropy_interval=2.0)
    try:
        await sim.form(["n1", "n2", "n3"], settle=10.0)
        key = _key_first_on(sim, "n2")  # n2 runs the purge: it reaches n1 and n3 throughout
        n1, n3 = sim.nodes["n1"], sim.nodes["n3"]
        sim.net.partition(n1.peer_address, n3.peer_address)
        cut = trio.current_time()
        async with sim.open_client("n1", sim.client_address()) as c:
            put = await c.put(key, b"old", w=2)  # n1 and n2; n3's leg is queued in the cut
        await trio.sleep(REQUEST_TIMEOUT + 1)
        assert n1.node.cluster.handoff.pending().get("n3"), "n1 never gave up on n3's leg"
        async with sim.open_client("n2", sim.client_address()) as c:
            await c.delete(key, context=put.context, w=3)
        await trio.sleep(GRACE + 10)  # past the grace and an anti-entropy round or more
        held = {name: sim.nodes[name].node.store.read(key) for name in ("n1", "n2", "n3")}
        assert held == dict.fromkeys(held), f"the tombstone was not purged everywhere: {held}"
        assert not n1.node.cluster.handoff.pending(), "the hint outlived hint_window"
        sim.net.heal()
        await trio.sleep(max(0.0, cut + 60 - trio.current_time()))  # past a retransmission
        assert not sim.crashes, sim.crashes
        async with sim.open_client("n2", sim.client_address()) as c:
            return (await c.get(key, r=3)).found
    finally:
        sim.close()


async def test_a_write_sent_into_a_partition_does_not_outlive_its_tombstone(autojump_clock):
    async with trio.open_nursery() as nursery:
        assert not await _resurrects(nursery), "the deleted key came back"
        nursery.cancel_scope.cancel()


async def test_control_without_tcp_user_timeout_the_deleted_key_comes_back(
        autojump_clock, without_user_timeout):
    async with trio.open_nursery() as nursery:
        assert await _resurrects(nursery), "the old write did not arrive late: the model lost it"
        nursery.cancel_scope.cancel()
