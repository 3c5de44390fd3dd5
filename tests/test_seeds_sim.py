"""A node started with seeds and an empty data directory never silently becomes a cluster
of its own (issue 12): it refuses client reads and writes, says why (status, /ready, log),
and waits for `kvctl cluster join`, even when its seeds do not answer and across restarts.
A node started without seeds (or with only its own address) founds a cluster as before.
Whole simulated nodes (tests/sim/harness.py) on the autojump clock."""

from __future__ import annotations

import logging

import pytest
import trio

from kvd.errors import BadRequest, Unavailable
from kvd.node.restore import SEED_WAIT


async def _status(sim, name):
    async with sim.open_client(name, sim.client_address()) as client:
        return await client.status()


async def _put(sim, name, key=b"k", value=b"v"):
    async with sim.open_client(name, sim.client_address()) as client:
        return await client.put(key, value)


async def _wait_settled_seeds(sim, name):
    with trio.fail_after(SEED_WAIT + 60):
        while not sim.nodes[name].node.cluster.restore.settled.is_set():
            await trio.sleep(0.5)


async def test_seeded_fresh_node_refuses_data_until_joined(sim, autojump_clock, caplog):
    caplog.set_level(logging.INFO, logger="kvd")
    n1 = await sim.start("n1", seeds=[])
    await _put(sim, "n1", b"before", b"x")
    await sim.start("n2", seeds=[n1.peer_address])
    await _wait_settled_seeds(sim, "n2")
    with pytest.raises(Unavailable, match="cluster join"):
        await _put(sim, "n2")
    with pytest.raises(Unavailable, match="cluster join"):
        async with sim.open_client("n2", sim.client_address()) as client:
            await client.get(b"before")
    # Nor does it show a one-node cluster of its own (outside tester): ring, transfers,
    # repair, keys and inspect say it is in no cluster yet; only the join is taken.
    for fields in ({"op": "ring"}, {"op": "transfers"}, {"op": "repair"}, {"op": "keys"},
                   {"op": "plan"}, {"op": "commit"}):
        with pytest.raises(Unavailable, match="in no cluster yet"):
            await sim.admin("n2", fields)
    with pytest.raises(Unavailable, match="in no cluster yet"):
        async with sim.open_client("n2", sim.client_address()) as client:
            await client.inspect(b"before")
    status = await _status(sim, "n2")
    assert status["awaiting_join"] is True
    # Its own row is no UN member owning every partition (outside tester: health checks
    # that look for rows other than UN passed it as healthy).
    mine = next(row for row in status["nodes"] if row["node"] == "n2")
    assert (mine["state"], mine["status"], mine["partitions"]) == ("UJ", "none", 0), mine
    assert "waits for `kvctl --host 127.0.1.2:7379 cluster join SEED`" in caplog.text
    assert sim.nodes["n2"].node.cluster.state.cluster_id != n1.node.cluster.state.cluster_id

    await sim.admin("n2", {"op": "join", "seed": n1.peer_address})
    await sim.admin("n1", {"op": "commit"})
    await sim.wait_settled("n1")
    assert (await _status(sim, "n2"))["awaiting_join"] is False
    await _put(sim, "n2", b"after", b"y")
    async with sim.open_client("n2", sim.client_address()) as client:
        assert (await client.get(b"before")).siblings[0].value == b"x"


async def test_a_cleared_join_leaves_the_node_waiting_to_be_joined_again(sim, autojump_clock):
    """Outside tester: `cluster clear` of a staged join left the joiner a member of no
    cluster that still coordinated reads and writes, refused a new join ("already a member
    of a cluster") and could not be removed ("not a member"): only a wipe helped. It now
    waits to be joined again, as before its join, and the next join and commit work."""
    n1 = await sim.start("n1", seeds=[])
    await sim.start("n2", seeds=[n1.peer_address])
    await _wait_settled_seeds(sim, "n2")
    await sim.admin("n2", {"op": "join", "seed": n1.peer_address})
    await sim.admin("n1", {"op": "clear"})
    n2 = sim.nodes["n2"].node.cluster
    with trio.fail_after(60):
        while "n2" in n2.state.members:
            await trio.sleep(0.5)
    with pytest.raises(Unavailable, match="in no cluster yet"):
        await _put(sim, "n2")
    assert (await _status(sim, "n2"))["awaiting_join"] is True
    await sim.admin("n2", {"op": "join", "seed": n1.peer_address})
    await sim.admin("n1", {"op": "commit"})
    await sim.wait_settled("n1")
    await _put(sim, "n2")
    assert (await _status(sim, "n2"))["awaiting_join"] is False
    assert not sim.crashes


async def test_unanswered_seeds_never_found_a_cluster_even_after_a_restart(sim, autojump_clock):
    await sim.start("n2", seeds=["127.0.1.9:7380"])  # nobody listens there
    await _wait_settled_seeds(sim, "n2")
    await trio.sleep(SEED_WAIT)
    with pytest.raises(Unavailable, match="cluster join"):
        await _put(sim, "n2")
    sim.crash("n2")
    await sim.start("n2", seeds=["127.0.1.9:7380"])
    await _wait_settled_seeds(sim, "n2")
    with pytest.raises(Unavailable, match="cluster join"):
        await _put(sim, "n2")
    assert (await _status(sim, "n2"))["awaiting_join"] is True


async def test_waiting_node_restarted_without_seeds_founds_a_cluster(sim, autojump_clock):
    await sim.start("n2", seeds=["127.0.1.9:7380"])
    sim.crash("n2")
    await sim.start("n2", seeds=[])
    await _put(sim, "n2")
    assert (await _status(sim, "n2"))["awaiting_join"] is False


async def test_a_node_whose_only_seed_is_itself_founds_a_cluster(sim, autojump_clock):
    n1 = sim.add("n1")
    await sim.start("n1", seeds=[n1.peer_address])
    await _put(sim, "n1")
    assert (await _status(sim, "n1"))["awaiting_join"] is False


async def test_two_waiting_nodes_form_a_cluster_by_a_join(sim, autojump_clock):
    """Both list each other as seeds: a join of one at the other makes them one cluster."""
    a, b = sim.add("n1"), sim.add("n2")
    await sim.start("n1", seeds=[b.peer_address])
    await sim.start("n2", seeds=[a.peer_address])
    await _wait_settled_seeds(sim, "n2")
    await sim.admin("n2", {"op": "join", "seed": a.peer_address})
    await sim.admin("n1", {"op": "commit"})
    await sim.wait_settled("n1")
    await _put(sim, "n1")
    await _put(sim, "n2", b"k2")


async def _four_nodes_and_n4_has_left(sim) -> None:
    await sim.form(["n1", "n2", "n3", "n4"], settle=0.0)
    await sim.admin("n1", {"op": "leave", "node": "n4"})
    await sim.admin("n1", {"op": "commit"})
    await sim.wait_settled("n1")
    with trio.fail_after(120):
        while not sim.nodes["n4"].node.cluster.left.is_set():
            await trio.sleep(1.0)


async def test_a_node_restarted_after_leaving_says_to_wipe_its_data_dir(sim, autojump_clock,
                                                                         caplog):
    """It shows DL in status until the next commit drops it (kvctl(1) lists the states);
    restarted, it says how to become a member again."""
    await _four_nodes_and_n4_has_left(sim)
    sim.crash("n4")
    with trio.fail_after(120):
        while (await _status(sim, "n1"))["nodes"][-1]["state"] != "DL":
            await trio.sleep(1.0)
    caplog.clear()
    caplog.set_level(logging.INFO, logger="kvd")
    await sim.start("n4")
    with trio.fail_after(60):
        while not sim.nodes["n4"].node.cluster.left.is_set():
            await trio.sleep(0.5)
    assert "wipe its data_dir" in caplog.text and "cluster join" in caplog.text, caplog.text


async def test_a_node_that_has_left_refuses_cluster_changes(sim, autojump_clock):
    """Simulator short seed 10376: a force-remove and a commit sent to a node that had left
    were answered as committed, but a node that has left gossips to nobody, so the removed
    node stayed in everyone's ring and reads at R=N failed for good."""
    await _four_nodes_and_n4_has_left(sim)
    version = sim.nodes["n1"].node.cluster.state.version
    for fields in ({"op": "force-remove", "node": "n3"}, {"op": "leave", "node": "n2"},
                   {"op": "commit"}, {"op": "plan"}, {"op": "clear"}, {"op": "abort"}):
        with pytest.raises(BadRequest, match="has left"):
            await sim.admin("n4", fields)
    await trio.sleep(5.0)
    assert sim.nodes["n1"].node.cluster.state.version == version
    assert "n3" in sim.nodes["n1"].node.cluster.state.ring.nodes()


async def test_a_seed_that_is_not_host_port_is_a_usage_error(sim, autojump_clock):
    """`kvctl cluster join foo` said the seed "did not answer" (exit 3); it is bad input
    (exit 2), named as such, and nothing is dialled."""
    sim.add("n1")
    await sim.start("n1", seeds=[])
    for seed in ("foo", "host:", "host:99999", ":7380"):
        with pytest.raises(BadRequest, match="not a peer address HOST:PORT"):
            await sim.admin("n1", {"op": "join", "seed": seed})
