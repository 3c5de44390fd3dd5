"""Topology changes on whole simulated nodes (tests/sim/harness.py): transfers, ownership
changes and the liveness of staging, on MockClock over the in-memory network.

Each test states what an operator relies on while partitions move: acknowledged writes are
readable, a node answers only for data it holds, a plan always finishes or can be aborted.
"""

from __future__ import annotations

from types import SimpleNamespace

import msgpack
import pytest
import trio

from kvd.errors import KvdError
from kvd.node.transfers import Transfers
from kvd.ring import partition_of
from kvd.ring.apl import preference_list
from kvd.storage.keys import fetch_todo_range, meta_key
from kvd.storage.memory import MemoryStorage


async def _join(sim, names, seed_node="n1"):
    for name in names:
        await sim.admin(name, {"op": "join", "seed": sim.nodes[seed_node].peer_address})


async def _settle(sim, name="n1", limit=600):
    """Wait until the transition is over; returns the simulated seconds it took."""
    return await sim.wait_settled(name, limit)


async def _four_nodes_then_a_fifth_joins(sim, value_size: int) -> list[bytes]:
    """Four nodes holding 600 keys, then n5 joins (committed, moving); returns the keys."""
    await sim.form(["n1", "n2", "n3", "n4"], settle=0.0)
    keys = [f"key-{i}".encode() for i in range(600)]
    await _fill(sim, "n1", keys, size=value_size)
    await sim.start("n5", seeds=[sim.nodes["n1"].peer_address])
    await _join(sim, ["n5"])
    await sim.admin("n1", {"op": "commit"})
    return keys


async def _n2_joins_n1_holding(sim, items: dict[bytes, bytes]) -> float:
    """n1 holds ``items``; n2 joins at transfer_rate_mb = 0.05. The seconds until settled."""
    sim.config.update(transfer_rate_mb=0.05)
    n1 = await sim.start("n1", seeds=[])
    await sim.start("n2", seeds=[n1.peer_address])
    async with sim.open_client("n1", sim.client_address()) as c:
        for key, value in items.items():
            await c.put(key, value)
    await _join(sim, ["n2"])
    await sim.admin("n1", {"op": "commit"})
    return await _settle(sim, limit=3600)


def _in_transition(sim, name="n1"):
    return sim.nodes[name].node.cluster.state.in_transition


async def _wait_all_see_commit(sim, names):
    """Until every named node has the committed ring (gossip takes a few seconds)."""
    version = sim.nodes["n1"].node.cluster.state.ring.version
    with trio.fail_after(60):
        while any(sim.nodes[n].node.cluster.state.ring.version < version for n in names):
            await trio.sleep(0.1)


def _tasks_under(task) -> int:
    return 1 + sum(_tasks_under(child) for nursery in task.child_nurseries
                   for child in nursery.child_tasks)


async def test_a_join_writes_its_plan_once_and_fetches_through_a_few_workers(sim, autojump_clock):
    """A join's bookkeeping grows with the ring, not its square, nor holds a task per
    partition. The fetch plan (the prior ring and the partitions still to fetch) was written
    whole again after every fetched partition: at 65,536 partitions, 256 KiB and 7.5 ms of
    the event loop per partition, some 8-16 GiB written in all; it is now written once, and
    each fetched partition removes one small key. And every partition to fetch had a task
    at once, waiting for one of transfer_limit slots: 224 MiB of waiting tasks at 65,536
    partitions (measured with empty ones); transfer_limit workers now take them in turn."""
    sim.config.update(ring_size=1024)
    await sim.form(["n1", "n2", "n3"], settle=0.0)
    n4 = await sim.start("n4", seeds=[sim.nodes["n1"].peer_address])
    storage = n4.node.storage
    plan_bytes: list[int] = []  # each write of the plan's keys, as it is made
    write = storage.write

    async def noted(ops, **options):
        plan_bytes.extend(len(k) + len(v or b"") for k, v in ops
                          if k.startswith(meta_key("fetch")))
        return await write(ops, **options)

    storage.write = noted
    root = trio.lowlevel.current_root_task()
    before = most = _tasks_under(root)
    transfers = n4.node.cluster.transfers
    fetch = transfers._fetch_partition

    async def counted_fetch(q):  # every task a fetch needs exists once one runs
        nonlocal most
        most = max(most, _tasks_under(root))
        return await fetch(q)

    transfers._fetch_partition = counted_fetch
    await _join(sim, ["n4"])
    await sim.admin("n1", {"op": "commit"})
    await _settle(sim)
    ring = n4.node.cluster.state.ring
    fetched = sum(1 for q in range(ring.q) if "n4" in preference_list(ring, q, 3))
    assert fetched > 500, fetched
    ring_doc = max(plan_bytes)  # the prior ring, written once
    assert sum(plan_bytes) <= 2 * ring_doc + 64 * fetched, (sum(plan_bytes), ring_doc, fetched)
    assert not transfers.plan
    assert not list(storage.iterate(*fetch_todo_range())), "todo keys left behind"
    assert most - before < 100, (before, most)  # 2 workers, not 768 tasks
    assert not sim.crashes


async def test_a_commit_that_arrives_while_the_join_is_saved_is_planned(sim, autojump_clock):
    """A node saves each cluster state gossip brings, then plans its fetches for the change
    (Cluster.persist_loop). A commit that arrived while it was still saving the state of its
    own join was compared with itself, not with the state before it: the new node never
    planned the partitions the commit gave it, and its transfers stayed pending for good (a
    real 3-node join in make test, once in several runs)."""
    await sim.form(["n1", "n2"], settle=0.0)
    keys = [f"key-{i}".encode() for i in range(100)]
    async with sim.open_client("n1", sim.client_address()) as client:
        for key in keys:
            await client.put(key, b"v", w=2)
    n3 = await sim.start("n3", seeds=[sim.nodes["n1"].peer_address])
    cluster = n3.node.cluster
    note_state = cluster.restore.note_state
    held = []

    async def saved_slowly() -> None:  # the join's state is still being saved at the commit
        await note_state()
        state = cluster.state
        if not held and "n3" in state.members and "n3" not in state.ring.nodes():
            held.append(state.ring.version)
            while "n3" not in cluster.state.ring.nodes():
                await trio.sleep(0.05)

    cluster.restore.note_state = saved_slowly
    await _join(sim, ["n3"])
    await sim.admin("n1", {"op": "commit"})
    await _settle(sim, limit=120)
    assert held, "the commit did not arrive while the join's state was saved"
    ring = cluster.state.ring
    mine = [k for k in keys if "n3" in preference_list(ring, partition_of(k, ring.q), 3)]
    assert mine and all(cluster.store.read(k) is not None for k in mine)
    assert not sim.crashes


async def test_a_fetch_plan_an_older_kvd_saved_whole_is_resumed_whole():
    """An upgrade in mid-transfer: a plan saved whole (its partitions inside the document,
    as kvd did before the marks) is resumed, not taken for finished; the next save turns it
    into marks, which a restart reads back."""
    state = SimpleNamespace(cluster_id="c", ring=SimpleNamespace(version=1))
    async with trio.open_nursery() as nursery:
        storage = MemoryStorage()
        await nursery.start(storage._run)
        await storage.write([(meta_key("fetch"),
                              msgpack.packb({"old": None, "todo": [3, 5, 8]}))])
        transfers = Transfers(SimpleNamespace(storage=storage))
        transfers.load(state)
        assert transfers.plan == {"old": None, "todo": {3, 5, 8}}
        transfers.plan["todo"].discard(5)
        await transfers._save_plan()
        transfers.load(state)
        assert transfers.plan == {"old": None, "todo": {3, 8}}
        nursery.cancel_scope.cancel()


async def test_reads_succeed_while_a_single_node_cluster_grows(sim, autojump_clock):
    """Bug 14: every key is on the old owner; reads at R=2 during the moves must find it."""
    sim.config.update(transfer_rate_mb=0.05)
    n1 = await sim.start("n1", seeds=[])
    await sim.start("n2", seeds=[n1.peer_address])
    await sim.start("n3", seeds=[n1.peer_address])
    keys = [f"key-{i}".encode() for i in range(1500)]
    async with sim.open_client("n1", sim.client_address()) as c:
        for k in keys:
            await c.put(k, b"v" * 8000)
    await _join(sim, ["n2", "n3"])
    await sim.admin("n1", {"op": "commit"})
    await _wait_all_see_commit(sim, ["n1", "n2", "n3"])
    failures, done = [], 0
    async with sim.open_client("n2", sim.client_address()) as c:
        for k in keys[::25]:
            assert _in_transition(sim), f"moves finished after {done} reads"
            try:
                result = await c.get(k, r=2)
                assert result.siblings, f"{k!r} not found"
            except KvdError as exc:
                failures.append(f"{k!r}: {exc}")
            done += 1
    assert not failures, f"{len(failures)} of {done} reads failed: {failures[:3]}"
    assert not sim.crashes


async def test_transfers_respect_the_rate_throttle(sim, autojump_clock):
    """Bug 14 (throttle): 12 MB at transfer_rate_mb=0.05 must take minutes, not seconds."""
    took = await _n2_joins_n1_holding(sim, {f"key-{i}".encode(): b"v" * 8000
                                            for i in range(1500)})
    # 12 MB held by n1; n2 replicates every partition (N=3 > 2 nodes): 12 MB must move.
    assert took >= 12e6 / (0.05 * 1e6) * 0.8, f"12 MB moved in {took:.1f} s at 0.05 MB/s"
    assert not sim.crashes


def _holders_missing(sim, keys, names, ring_of):
    """(key, node) pairs where ``node`` is a replica of ``key`` on ``ring_of(cluster)``, is
    running, and does not hold ``key``."""
    from kvd.ring import partition_of, preference_list

    cluster = sim.nodes["n1"].node.cluster
    ring = ring_of(cluster)
    n = min(3, len(ring.nodes()))
    missing = []
    for key in keys:
        for name in preference_list(ring, partition_of(key, ring.q), n):
            sn = sim.nodes.get(name)
            if sn is not None and sn.running and sn.node.store.read(key) is None:
                missing.append((key, name))
    return missing


async def _fill(sim, name, keys, size=2000):
    async with sim.open_client(name, sim.client_address()) as c:
        for k in keys:
            await c.put(k, b"v" * size, w=3)


async def test_a_read_replica_holds_the_data_while_partitions_move(sim, autojump_clock):
    """Bug 11: no node is asked to answer for a partition it has not finished fetching."""
    sim.config.update(transfer_rate_mb=0.2)
    n1 = await sim.start("n1", seeds=[])
    for name in ("n2", "n3"):
        await sim.start(name, seeds=[n1.peer_address])
    await _join(sim, ["n2", "n3"])
    await sim.admin("n1", {"op": "commit"})
    await _settle(sim)
    keys = [f"key-{i}".encode() for i in range(600)]
    await _fill(sim, "n1", keys)
    for name in ("n4", "n5"):
        await sim.start(name, seeds=[n1.peer_address])
    await _join(sim, ["n4", "n5"])
    await sim.admin("n1", {"op": "commit"})
    await _wait_all_see_commit(sim, ["n1"])
    seen = []
    while _in_transition(sim):
        missing = _holders_missing(sim, keys, ["n1", "n2", "n3", "n4", "n5"],
                                   lambda cluster: cluster.routing.serving_ring())
        seen.extend(missing)
        await trio.sleep(0.5)
    assert not seen, f"{len(seen)} times a serving replica lacked a key, e.g. {seen[:3]}"
    assert not _holders_missing(sim, keys, [], lambda cluster: cluster.state.ring)
    assert not sim.crashes


async def test_partitions_added_to_a_running_plan_are_fetched(sim, autojump_clock):
    """Bug 10: a force-remove committed during a rebalance adds partitions to the running
    fetch plan; each must be fetched before the node reports its transfers done."""
    sim.config.update(transfer_rate_mb=0.05, anti_entropy=False)
    keys = await _four_nodes_then_a_fifth_joins(sim, value_size=5000)
    with trio.fail_after(30):
        while sim.nodes["n5"].node.cluster.transfers.progress["state"] != "running":
            await trio.sleep(0.1)
    sim.crash("n4")
    await trio.sleep(15)  # judged down
    assert _in_transition(sim), "the rebalance finished before the force-remove"
    await sim.admin("n1", {"op": "force-remove", "node": "n4"})
    await sim.admin("n1", {"op": "commit"})
    await _settle(sim, limit=3600)
    missing = _holders_missing(sim, keys, [], lambda cluster: cluster.state.ring)
    assert not missing, f"{len(missing)} keys missing on their replicas, e.g. {missing[:3]}"
    assert not sim.crashes


async def test_a_key_only_the_departing_replica_holds_moves(sim, autojump_clock):
    """Bug 17: keys that only a leaving replica holds (its peers missed the write and the
    hints expired) are fetched from it, not only from the first old replica."""
    from kvd import versions

    sim.config.update(anti_entropy=False)
    n1 = await sim.start("n1", seeds=[])
    for name in ("n2", "n3", "n4"):
        await sim.start(name, seeds=[n1.peer_address])
    await _join(sim, ["n2", "n3", "n4"])
    await sim.admin("n1", {"op": "commit"})
    await _settle(sim)
    n4 = sim.nodes["n4"].node
    mine = [k for k in (f"only-{i}".encode() for i in range(400))
            if "n4" in n4.cluster.routing.primaries(n4.store.partition(k), 3)][:40]
    for key in mine:
        obj, _ = versions.update(versions.empty(), {}, "n4-actor", value=b"acknowledged", key=key)
        await n4.store.merge(key, obj)
    await sim.admin("n1", {"op": "leave", "node": "n4"})
    await sim.admin("n1", {"op": "commit"})
    await _settle(sim)
    lost = [k for k in mine
            if not any(sim.nodes[x].node.store.read(k) for x in ("n1", "n2", "n3"))]
    assert not lost, f"{len(lost)} of {len(mine)} keys held only by the leaving node were lost"
    assert not sim.crashes


async def test_a_partition_of_large_objects_moves(sim, autojump_clock):
    """Bug 6: scan replies are capped in bytes, so objects of 60 KB (and one of 1.2 MB in
    inline siblings) move through a 1 MiB frame limit."""
    from kvd import versions
    from kvd.ring import partition_of

    n1 = await sim.start("n1", seeds=[])
    await sim.start("n2", seeds=[n1.peer_address])
    big = [k for k in (f"big-{i}".encode() for i in range(3000)) if partition_of(k, 32) == 5][:30]
    await _fill(sim, "n1", big[:-1], size=60_000)
    wide, siblings = big[-1], versions.empty()
    for i in range(20):  # concurrent writers: 20 inline siblings of 60 KB
        siblings, _ = versions.update(siblings, {}, f"writer-{i}", value=bytes([i]) * 60_000, key=wide)
    await sim.nodes["n1"].node.store.merge(wide, siblings)
    await _join(sim, ["n2"])
    await sim.admin("n1", {"op": "commit"})
    await _settle(sim, limit=300)
    n2 = sim.nodes["n2"].node.store
    assert all(n2.read(k) is not None for k in big[:-1])
    assert n2.read(wide) == siblings
    assert not sim.crashes


async def test_a_wiped_node_restores_large_objects(sim, autojump_clock):
    """Bug 6 (restore path): a wiped node refetches objects larger than a scan reply."""
    from kvd import versions
    from kvd.ring import partition_of
    from kvd.storage.memory import MemoryDisk

    n1 = await sim.start("n1", seeds=[])
    await sim.start("n2", seeds=[n1.peer_address])
    await _join(sim, ["n2"])
    await sim.admin("n1", {"op": "commit"})
    await _settle(sim)
    big = [k for k in (f"big-{i}".encode() for i in range(3000)) if partition_of(k, 32) == 7][:30]
    await _fill(sim, "n1", big, size=60_000)
    wide, siblings = b"wide", versions.empty()
    for i in range(20):
        siblings, _ = versions.update(siblings, {}, f"writer-{i}", value=bytes([i]) * 60_000, key=wide)
    for name in ("n1", "n2"):
        await sim.nodes[name].node.store.merge(wide, siblings)
    sim.crash("n2")
    sim.nodes["n2"].disk = MemoryDisk()  # the operator wiped its data directory
    await sim.start("n2")
    n2 = sim.nodes["n2"]
    with trio.fail_after(300):
        while not (n2.node and n2.node.cluster.restore.has_its_data):
            await trio.sleep(1)
    assert all(n2.node.store.read(k) is not None for k in big)
    assert n2.node.store.read(wide) == siblings
    assert not sim.crashes


async def test_join_with_a_wrong_seed_fails_with_a_clear_error(sim, autojump_clock):
    """Bug 13: an unreachable seed, a client port or a port that never answers (metrics)
    gets an error naming the seed within seconds, never a request that hangs."""
    n1 = await sim.start("n1", seeds=[])
    await sim.start("n2", seeds=[])
    silent = sim.client_address()  # accepts nothing and says nothing, like an HTTP port
    for seed in ("127.0.1.99:7380", n1.address, silent):
        began = trio.current_time()
        with trio.fail_after(120):
            with pytest.raises(KvdError, match=f"seed {seed}"):
                await sim.admin("n2", {"op": "join", "seed": seed})
        assert trio.current_time() - began <= 30
    # Its own peer address (outside tester: "already a member", which misled)
    with pytest.raises(KvdError, match="this node's own peer address"):
        await sim.admin("n2", {"op": "join", "seed": sim.nodes["n2"].peer_address})
    await sim.admin("n2", {"op": "join", "seed": n1.peer_address})  # the right one works
    assert not sim.crashes


async def _three(sim, keys=()):
    n1 = await sim.start("n1", seeds=[])
    for name in ("n2", "n3"):
        await sim.start(name, seeds=[n1.peer_address])
    await _join(sim, ["n2", "n3"])
    await sim.admin("n1", {"op": "commit"})
    await _settle(sim)
    await _fill(sim, "n1", keys)
    return n1


async def test_replace_with_a_node_that_never_contacted_the_cluster_is_refused(sim, autojump_clock):
    """Bug 13: `cluster replace n3 TYPO` must not stage a phantom that wedges the cluster."""
    await _three(sim)
    with pytest.raises(KvdError, match="TYPO has not contacted"):
        await sim.admin("n1", {"op": "replace", "node": "n3", "target": "TYPO"})
    # The real way still works: the new node joins, then replaces.
    await sim.start("n4", seeds=[sim.nodes["n1"].peer_address])
    await _join(sim, ["n4"])
    await sim.admin("n1", {"op": "replace", "node": "n3", "target": "n4"})
    with trio.fail_after(30):  # gossip carries it to every node
        while (await sim.admin("n2", {"op": "ring"}))["staged"] != ["replace n3 with n4"]:
            await trio.sleep(1)
    assert not sim.crashes


async def test_a_transition_that_cannot_finish_can_be_aborted(sim, autojump_clock):
    """Bug 13: a joining node dies for good mid-transfer; `cluster abort` restores the prior
    ring, reads work throughout and the next change can be staged and finishes."""
    sim.config.update(transfer_rate_mb=0.05)
    keys = [f"key-{i}".encode() for i in range(300)]
    n1 = await _three(sim, keys)
    await sim.start("n4", seeds=[n1.peer_address])
    await _join(sim, ["n4"])
    await sim.admin("n1", {"op": "commit"})
    await trio.sleep(3)
    sim.crash("n4")  # gone for good, mid-transfer
    await trio.sleep(60)
    assert _in_transition(sim)
    with pytest.raises(KvdError, match="still moving data"):
        await sim.admin("n1", {"op": "leave", "node": "n3"})
    reply = await sim.admin("n2", {"op": "abort"})
    assert reply["dropped"] == ["n4"]
    assert "n4" not in (await sim.admin("n2", {"op": "ring"}))["ownership"]
    await _settle(sim, limit=60)
    async with sim.open_client("n3", sim.client_address()) as c:
        for k in keys[::10]:
            assert (await c.get(k, r=2)).siblings
    await sim.start("n5", seeds=[n1.peer_address])
    await _join(sim, ["n5"])
    await sim.admin("n1", {"op": "commit"})
    await _settle(sim, limit=3600)
    assert not _holders_missing(sim, keys, [], lambda cluster: cluster.state.ring)
    assert not sim.crashes


async def test_a_former_replica_does_not_bring_back_purged_deletes(sim, autojump_clock):
    """Bug 3: n4 stops replicating some partitions (n5 joins), their keys are deleted and
    the tombstones purged, then n4 replicates them again (n5 leaves). Its stale copies
    must be gone: no read, read repair or anti-entropy brings the deleted keys back."""
    from kvd.ring import partition_of, preference_list

    sim.config.update(tombstone_grace=30.0, hint_window=20.0, anti_entropy_interval=5.0)
    n1 = await sim.start("n1", seeds=[])
    for name in ("n2", "n3", "n4"):
        await sim.start(name, seeds=[n1.peer_address])
    await _join(sim, ["n2", "n3", "n4"])
    await sim.admin("n1", {"op": "commit"})
    await _settle(sim)
    keys = [f"key-{i}".encode() for i in range(400)]
    await _fill(sim, "n1", keys, size=100)
    await sim.start("n5", seeds=[n1.peer_address])
    await _join(sim, ["n5"])
    await sim.admin("n1", {"op": "commit"})
    await _settle(sim)
    ring = sim.nodes["n1"].node.cluster.state.ring
    left_n4 = [k for k in keys if "n4" not in preference_list(ring, partition_of(k, ring.q), 3)]
    assert left_n4
    async with sim.open_client("n1", sim.client_address()) as c:
        for k in left_n4:
            await c.delete(k, context=(await c.get(k)).context, w=3)
    # Wait until anti-entropy purged the tombstones on the replicas.
    with trio.fail_after(600):
        while any(sim.nodes[x].node.store.read(k) is not None for k in left_n4
                  for x in preference_list(ring, partition_of(k, ring.q), 3)):
            await trio.sleep(5)
    await sim.admin("n1", {"op": "leave", "node": "n5"})
    await sim.admin("n1", {"op": "commit"})
    await _settle(sim)
    back = []
    async with sim.open_client("n4", sim.client_address()) as c:
        for k in left_n4:
            found = (await c.get(k, r=3)).siblings
            if any(not s.deleted for s in found):
                back.append(k)
    await sim.admin("n4", {"op": "repair", "wait": True})
    stale = [k for k in left_n4 if sim.nodes["n4"].node.store.read(k) is not None]
    assert not back and not stale, (
        f"{len(back)} deleted keys readable again, {len(stale)} stale copies on n4")
    # The dropped generations' keys are deleted in the background.
    with trio.fail_after(120):
        while any(sim.nodes[x].node.store.reclaimable() for x in ("n1", "n2", "n3", "n4")):
            await trio.sleep(5)
    n4 = sim.nodes["n4"].node
    objects = sum(1 for _ in n4.storage.iterate_keys(b"o", b"p"))
    assert objects == sum(1 for k in keys if n4.store.read(k) is not None)
    assert not sim.crashes


async def test_large_values_count_towards_the_transfer_throttle(sim, autojump_clock):
    """Bug 14 (throttle, chunked values): 8 values of 1 MB at 0.05 MiB/s take minutes."""
    took = await _n2_joins_n1_holding(sim, {f"large-{i}".encode(): bytes([i]) * 1_000_000
                                            for i in range(8)})
    assert took >= 8e6 / (0.05 * (1 << 20)) * 0.8, f"8 MB moved in {took:.1f} s at 0.05 MiB/s"
    async with sim.open_client("n2", sim.client_address()) as c:
        assert (await c.get(b"large-7", r=2)).siblings[0].value == bytes([7]) * 1_000_000
    assert not sim.crashes


async def test_a_down_departing_holder_delays_only_its_own_partitions(sim, autojump_clock):
    """Bug 17: a partition whose departing holder is down waits for it (its keys may be
    there only), while every other partition moves on; it finishes once it is back."""
    from kvd.ring import preference_list

    sim.config.update(transfer_rate_mb=0.2, anti_entropy=False)
    keys = await _four_nodes_then_a_fifth_joins(sim, value_size=3000)
    n5 = sim.nodes["n5"]
    with trio.fail_after(30):
        while n5.node.cluster.transfers.progress["state"] != "running":
            await trio.sleep(0.1)
    sim.crash("n4")
    await trio.sleep(300)
    cluster = n5.node.cluster
    state = cluster.state
    waiting = {q for q in range(state.ring.q)
               if "n4" in preference_list(state.prior, q, 3)
               and "n4" not in preference_list(state.ring, q, 3)}
    left = set(cluster.transfers.plan["todo"]) if cluster.transfers.plan else set()
    assert left and left <= waiting, f"still to fetch {sorted(left)}; waiting on n4 {sorted(waiting)}"
    # kvctl transfers says why (outside tester: "retrying", and no reason anywhere but the log)
    rows = (await sim.admin("n5", {"op": "transfers"}))["transfers"]
    reasons = {row["partition"]: row["error"] for row in rows if row["to"] == "n5"}
    assert all("waiting for n4" in (reasons[q] or "") for q in left), reasons
    await sim.start("n4")
    await _settle(sim, limit=3600)
    missing = _holders_missing(sim, keys, [], lambda c: c.state.ring)
    assert not missing, f"{len(missing)} keys missing on their replicas, e.g. {missing[:3]}"
    assert not sim.crashes


async def test_writes_acknowledged_during_growth_are_on_every_new_replica(sim, autojump_clock):
    """Bug 14 (writes): while one node grows to three, acknowledged writes reach the new
    replicas too, so none is missing once the new ring serves."""
    sim.config.update(transfer_rate_mb=0.05)
    n1 = await sim.start("n1", seeds=[])
    for name in ("n2", "n3"):
        await sim.start(name, seeds=[n1.peer_address])
    await _fill(sim, "n1", [f"key-{i}".encode() for i in range(300)], size=4000)
    await _join(sim, ["n2", "n3"])
    await sim.admin("n1", {"op": "commit"})
    await _wait_all_see_commit(sim, ["n1", "n2", "n3"])
    acked: dict[bytes, bytes] = {}
    async with sim.open_client("n2", sim.client_address()) as c:
        i = 0
        while _in_transition(sim):
            key, value = f"key-{i % 300}".encode(), f"new-{i}".encode()
            await c.put(key, value, context=(await c.get(key)).context)
            acked[key] = value
            i += 1
            await trio.sleep(0.2)
    assert len(acked) > 50
    await trio.sleep(5)  # background merges of the last writes
    for key, value in acked.items():
        for name in ("n1", "n2", "n3"):
            obj = sim.nodes[name].node.store.read(key)
            assert obj is not None and [s.value for s in obj.siblings] == [value], (name, key)
    assert not sim.crashes


async def test_a_leaving_node_serves_until_every_member_knows_it_has_left(sim, autojump_clock):
    """The leaver stops (the daemon exits) only once every member up has the state in which
    the transition has ended: a member that had not heard yet would still route the leaver's
    partitions to it, and its reads at R=N would fail. After the exit, reads at R=3 through
    every member succeed at once."""
    await sim.form(["n1", "n2", "n3", "n4"], settle=0.0)
    keys = [f"leave-{i}".encode() for i in range(200)]
    await _fill(sim, "n1", keys, size=100)
    await sim.admin("n1", {"op": "leave", "node": "n4"})
    await sim.admin("n1", {"op": "commit"})
    with trio.fail_after(600):
        await sim.nodes["n4"].node.cluster.left.wait()
    stale = [name for name in ("n1", "n2", "n3")
             if "n4" in sim.nodes[name].node.cluster.routing.serving_ring().nodes()]
    assert not stale, f"n4 stopped serving while {stale} still routed to it"
    sim.crash("n4")  # as the daemon exits
    for name in ("n1", "n2", "n3"):
        async with sim.open_client(name, sim.client_address()) as c:
            for key in keys[:40]:
                assert (await c.get(key, r=3)).found, (name, key)
    assert not sim.crashes


async def test_a_leaver_dropped_by_a_later_commit_while_it_waits_still_exits(sim, autojump_clock, caplog):
    """Rule 4 of kvd/node/cluster.py, its two edges: a handed-off leaver that a member
    never tells directly (cut off from it, though seen up through the others' gossip) waits
    at most LEAVE_LINGER_ROUNDS rounds, then leaves naming that member; and a commit made
    meanwhile, which drops it from the members (an exiting node is dropped at the next
    commit), does not keep it from leaving."""
    from kvd.node.cluster import LEAVE_LINGER_ROUNDS

    await sim.form(["n1", "n2", "n3", "n4", "n5"], settle=0.0)
    await sim.admin("n1", {"op": "leave", "node": "n5"})
    await sim.admin("n1", {"op": "commit"})
    with trio.fail_after(600):
        while _in_transition(sim):
            await trio.sleep(0.1)
    # The data has moved: from now on n2 never tells n5 anything directly.
    sim.net.partition(sim.nodes["n5"].peer_address, sim.nodes["n2"].peer_address)
    n5 = sim.nodes["n5"].node.cluster
    with trio.fail_after(60):
        while not n5.has_left():
            await trio.sleep(0.1)
    handed_off = trio.current_time()
    await sim.start("n6", seeds=[sim.nodes["n1"].peer_address])
    await _join(sim, ["n6"])
    await sim.admin("n1", {"op": "commit"})
    with trio.fail_after(60):
        while "n5" in n5.state.members:
            await trio.sleep(0.1)
    assert not n5.left.is_set() and n5.is_up("n2")
    with trio.fail_after(LEAVE_LINGER_ROUNDS * 2):
        await n5.left.wait()
    assert trio.current_time() - handed_off >= LEAVE_LINGER_ROUNDS - 1
    assert "leaving without word from n2" in caplog.text
    assert not sim.crashes


async def test_a_commit_acknowledged_is_never_undone_by_one_made_elsewhere(sim, autojump_clock):
    """Full seed 112: two dead nodes force-removed one after the other through two members,
    two seconds apart. The second member had not heard the first commit yet and committed on
    the older ring; gossip's merge kept one of the two rings of the same version, so the first
    force-remove, acknowledged as committed, was silently undone: a dead node stayed in the
    ring and reads at R=N failed for good. A commit first makes every member up hold the
    committing node's state (staging Rule 4), so the second commit is computed on top of the
    first, or refused when its staged change was superseded; never lost."""
    sim.config.update(anti_entropy=False)
    await sim.form(["n1", "n2", "n3", "n4", "n5", "n6"], settle=5.0)
    sim.crash("n6")
    sim.crash("n5")
    # n4 stages before it can hear of n1's commit: the two staged sets differ.
    await sim.admin("n1", {"op": "force-remove", "node": "n6"})
    await sim.admin("n4", {"op": "force-remove", "node": "n5"})
    committed = []
    for name in ("n1", "n4"):
        try:
            committed.append((await sim.admin(name, {"op": "commit"}))["committed"])
        except KvdError as exc:
            committed.append(str(exc))
    await trio.sleep(30)
    for name in ("n1", "n2", "n3", "n4"):
        members = set(sim.nodes[name].node.cluster.state.members)
        for outcome, dead in zip(committed, ("n6", "n5")):
            if isinstance(outcome, list):  # acknowledged: it must hold everywhere
                assert dead not in members, (name, committed, sorted(members))
    assert any(isinstance(outcome, list) for outcome in committed), committed
    assert not sim.crashes


async def test_a_ring_computed_from_a_state_since_replaced_is_never_published(sim, autojump_clock):
    """Two commits computed at once from different staged sets: n4 staged and committed
    while n1's claim was running (a claim of a large ring takes a while in its worker
    thread), and its ring-ready exchange gave n1 the new staged set too late for n1's
    claim. Both were acknowledged, and gossip's merge kept one of the two rings of the same
    version: n4's force-remove of n5 was silently undone. A ring is published only if the
    state it was computed from is still the node's (staging Rule 4); n1 computes again, on
    top of n4's commit, and finds nothing left to commit."""
    sim.config.update(anti_entropy=False)
    await sim.form(["n1", "n2", "n3", "n4", "n5", "n6"], settle=5.0)
    sim.crash("n6")
    sim.crash("n5")
    await trio.sleep(10.0)  # both seen down: no commit waits for them
    n1 = sim.nodes["n1"].node.cluster.staging
    quick = n1.offload

    async def slow_claim(fn, *args):  # the claim takes 2 s, as in a worker thread
        await trio.sleep(2.0)
        return await quick(fn, *args)

    n1.offload = slow_claim
    await sim.admin("n1", {"op": "force-remove", "node": "n6"})
    await trio.sleep(3.0)  # every member holds n1's staged change
    outcomes: dict[str, object] = {}

    async def commit(name: str) -> None:
        try:
            outcomes[name] = (await sim.admin(name, {"op": "commit"}))["committed"]
        except KvdError as exc:
            outcomes[name] = exc

    async with trio.open_nursery() as nursery:
        nursery.start_soon(commit, "n1")
        await trio.sleep(0.5)  # n1's claim is running: n4 stages another change and commits
        await sim.admin("n4", {"op": "force-remove", "node": "n5"})
        nursery.start_soon(commit, "n4")
    await trio.sleep(30)
    rings = {sim.nodes[name].node.cluster.state.ring.to_dict().__repr__()
             for name in ("n1", "n2", "n3", "n4")}
    assert len(rings) == 1, "the members disagree on the ring"
    members = set(sim.nodes["n2"].node.cluster.state.members)
    for name, dead in (("n1", "n6"), ("n4", "n5")):
        if isinstance(outcomes[name], list):  # acknowledged: it must hold everywhere
            assert dead not in members, (outcomes, sorted(members))
    assert any(isinstance(outcome, list) for outcome in outcomes.values()), outcomes
    assert "nothing left to commit" in str(outcomes["n1"]), outcomes
    assert not sim.crashes


async def test_a_write_during_a_transition_is_acknowledged_only_when_both_rings_hold_it(
        sim, autojump_clock):
    """Full simulator seed 603: while n4 replaces n3, n1 and n2 (replicas on both rings) are
    cut off from n3 and n4. A write acknowledged by n3 (leaving) and n4 (new) alone is held
    by one replica of the new ring: once n3 has handed off, losing n4 loses it, where W=2
    promises to survive one loss. During a transition a write needs W replicas of the ring
    that serves and W of the new one (coordinator rule 11). Large values: a fallback holds
    none of their bytes, so no hint can rescue them either."""
    sim.config.update(transfer_rate_mb=0.005, anti_entropy=False)  # a transition of minutes
    n1 = await _three(sim, [f"key-{i}".encode() for i in range(200)])
    await sim.start("n4", seeds=[n1.peer_address])
    await _join(sim, ["n4"])
    await sim.admin("n1", {"op": "replace", "node": "n3", "target": "n4"})
    await sim.admin("n1", {"op": "commit"})
    await _wait_all_see_commit(sim, ["n1", "n2", "n3", "n4"])
    near, far = ["n1", "n2"], ["n3", "n4"]
    sim.net.partition([sim.nodes[n].peer_address for n in near],
                      [sim.nodes[n].peer_address for n in far])
    acked, refused = [], 0
    async with sim.open_client("n3", sim.client_address()) as c:
        for i in range(20):
            key = f"big-{i}".encode()
            try:
                await c.put(key, bytes([i]) * 150_000, w=2)
            except KvdError:
                refused += 1
            else:
                holders = [name for name in ("n1", "n2", "n4")
                           if sim.nodes[name].node.store.read(key) is not None]
                acked.append((key, holders))
            await trio.sleep(1.0)
            assert _in_transition(sim, "n3")
    short = [(key, holders) for key, holders in acked if len(holders) < 2]
    assert not short, f"acknowledged on fewer than W=2 new replicas: {short[:3]}"
    assert refused, "n3 and n4 alone cannot reach W on the new ring"
    sim.net.heal()
    await trio.sleep(20)  # the failure detectors see n1 and n2 again
    async with sim.open_client("n3", sim.client_address()) as c:
        await c.put(b"after-heal", b"x" * 150_000, w=2)
    assert sum(sim.nodes[name].node.store.read(b"after-heal") is not None
               for name in ("n1", "n2", "n4")) >= 2
    assert not sim.crashes


async def test_leave_with_an_empty_node_name_is_refused_and_a_removed_node_answers_status(
        sim, autojump_clock):
    """Outside tester: `kvctl cluster leave ""` (an empty shell variable) staged the leave of
    the node --host names; and a live node force-removed from the cluster answered STATUS
    with "internal error" (its own row was missing: StopIteration in the log)."""
    await sim.form(["n1", "n2", "n3", "n4"], settle=5.0)
    with pytest.raises(KvdError, match="leave needs a NODE"):
        await sim.admin("n1", {"op": "leave", "node": ""})
    assert (await sim.admin("n1", {"op": "ring"}))["staged"] == []
    await sim.admin("n1", {"op": "force-remove", "node": "n4"})
    await sim.admin("n1", {"op": "commit"})
    await trio.sleep(10)
    async with sim.open_client("n4", sim.client_address()) as c:
        status = await c.status()
    mine = [row for row in status["nodes"] if row["node"] == "n4"]
    assert mine and mine[0]["status"] == "none", status["nodes"]
    assert mine[0]["state"] == "UL", status["nodes"]  # it has left, if not by itself: not N
    assert not sim.crashes


async def test_a_live_node_force_removed_stops_like_one_that_left(sim, autojump_clock, caplog):
    """Outside tester: a node force-removed while it ran (cut off, the operator took it for
    dead) went on coordinating reads and writes for a cluster it was no member of, and
    never said it had been removed. Once it hears of its removal it now says so, takes no
    cluster change and stops (``left``), like a node that has left; the members rebuild
    its replicas and every acknowledged write stays readable at R=3."""
    await sim.form(["n1", "n2", "n3", "n4"], settle=5.0)
    keys = [f"removed-{i}".encode() for i in range(100)]
    await _fill(sim, "n1", keys, size=100)
    n1, n4 = sim.nodes["n1"].node.cluster, sim.nodes["n4"].node.cluster
    sim.isolate("n4")
    with trio.fail_after(60):
        while n1.is_up("n4"):
            await trio.sleep(0.5)
    await sim.admin("n1", {"op": "force-remove", "node": "n4"})
    await sim.admin("n1", {"op": "commit"})
    await trio.sleep(10)
    assert not n4.left.is_set() and "n4" in n4.state.members  # it has not heard yet
    sim.net.heal()
    with trio.fail_after(120):
        await n4.left.wait()
    assert "was removed from cluster" in caplog.text and "force-remove" in caplog.text
    with pytest.raises(KvdError, match="has left"):
        await sim.admin("n4", {"op": "commit"})
    sim.crash("n4")  # as the daemon exits
    await _settle(sim)
    for name in ("n1", "n2", "n3"):
        async with sim.open_client(name, sim.client_address()) as c:
            for key in keys[::5]:
                assert (await c.get(key, r=3)).found, (name, key)
    assert not sim.crashes


async def test_a_leave_or_replace_of_a_down_node_is_refused_naming_force_remove(
        sim, autojump_clock):
    """Outside tester: the leave of a node that was down was staged and committed without a
    word, then waited for it forever (a leaving node must hand its data off itself). Such a
    leave or replace is now refused, naming the way out; force-remove is what a dead node
    takes."""
    await sim.form(["n1", "n2", "n3", "n4"], settle=5.0)
    await sim.start("n5", seeds=[sim.nodes["n1"].peer_address])
    await _join(sim, ["n5"])
    await sim.admin("n1", {"op": "clear"})
    sim.crash("n4")
    n1 = sim.nodes["n1"].node.cluster
    with trio.fail_after(60):
        while n1.is_up("n4"):
            await trio.sleep(0.5)
    with pytest.raises(KvdError, match="n4 is down: a leave needs it up.*force-remove n4"):
        await sim.admin("n1", {"op": "leave", "node": "n4"})
    with pytest.raises(KvdError, match="n4 is down: a replace needs it up.*force-remove n4"):
        await sim.admin("n1", {"op": "replace", "node": "n4", "target": "n5"})
    assert (await sim.admin("n1", {"op": "ring"}))["staged"] == []
    await sim.admin("n1", {"op": "force-remove", "node": "n4"})
    assert (await sim.admin("n1", {"op": "ring"}))["staged"] == ["force-remove n4"]
    # Its commit moves no partition, yet the others refill n4's replicas: the reply names
    # them (outside tester: "0 partitions to transfer", and nothing else)
    committed = await sim.admin("n1", {"op": "commit"})
    assert committed["moves"] == [] and committed["fetching"], committed
    assert set(committed["fetching"]) <= {"n1", "n2", "n3"}
    assert not sim.crashes


async def test_status_shows_a_node_fetching_after_its_join_as_joining(sim, autojump_clock):
    """Outside tester: a node still fetching its partitions after the commit of its join
    showed UN, where kvctl(1) and the README promise UJ until it has them all."""
    sim.config.update(transfer_rate_mb=0.05)
    await sim.form(["n1", "n2", "n3"], settle=5.0)
    await _fill(sim, "n1", [f"joining-{i}".encode() for i in range(300)], size=2000)
    await sim.start("n4", seeds=[sim.nodes["n1"].peer_address])
    await _join(sim, ["n4"])
    await sim.admin("n1", {"op": "commit"})
    await _wait_all_see_commit(sim, ["n4"])

    async def n4_row():
        async with sim.open_client("n1", sim.client_address()) as c:
            return next(row for row in (await c.status())["nodes"] if row["node"] == "n4")

    assert "n4" in sim.nodes["n1"].node.cluster.state.fetching
    row = await n4_row()
    assert (row["state"], row["status"]) == ("UJ", "valid"), row
    await _settle(sim, limit=3600)
    assert (await n4_row())["state"] == "UN"
    assert not sim.crashes
