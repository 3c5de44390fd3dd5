"""Cluster and topology scenarios of issues 3 and 4 on whole simulated nodes
(tests/sim/harness.py: the real ``serve`` on the in-memory network under MockClock).

These were real-process tests (tests/test_cluster.py, tests/test_topology.py); what they
asserted about the cluster is asserted here in simulated seconds, so timing is exact and no
assertion depends on the machine being fast. What needs real processes (LevelDB, SIGKILL,
a node exiting by itself, TCP, the real kvctl) stays there as smoke tests.

- read repair: one R=2 read of each key refills the replica that missed them;
- siblings across coordinators, resolved by a write with the merged context;
- growing one node to four under a writer, one join at a time;
- shrinking five to three under a writer, with crashes mid-transfer and the refusals;
- anti-entropy converges keys written at W=1 without a read; later rounds are idle;
- a wiped node never answers as a replica while it restores;
- deletes with a replica away never come back; tombstones purged only after the grace and
  only once every replica holds them.
"""

from __future__ import annotations

import pytest
import trio

from kvd.errors import KvdError
from kvd.ring import partition_of
from kvd.storage.memory import MemoryDisk
from tests.realcluster import replica_problem

NODES3 = ("n1", "n2", "n3")
Q = 32  # the simulator's ring_size
DETECT = 15.0  # simulated seconds for every node to see a crash or a restart (gossip 1 s)




def value_of(key: bytes) -> bytes:
    return b"value of " + key + b" " + bytes(range(32))


def client(sim, name):
    return sim.open_client(name, sim.client_address())


async def status_rows(sim, name) -> dict[str, dict]:
    async with client(sim, name) as c:
        return {row["node"]: row for row in (await c.status())["nodes"]}


async def states(sim, name) -> dict[str, str]:
    return {n: row["state"] for n, row in (await status_rows(sim, name)).items()}


async def write_keys(sim, name, keys, w=None, replicas=None) -> None:
    async with client(sim, name) as c:
        for key in keys:
            result = await c.put(key, value_of(key), w=w)
            if replicas is not None:
                assert result.replicas == replicas, (key, result)


async def disagreeing(sim, name, keys, expected: set[str]) -> dict:
    """key -> problem, for the keys whose replicas (inspected through ``name``) differ."""
    problems = {}
    async with client(sim, name) as c:
        for key in keys:
            problem = replica_problem(await c.inspect(key), expected)
            if problem:
                problems[key] = problem
    return problems


async def read_problems(sim, names, expected: dict[bytes, bytes], r: int) -> list:
    """(key, problem) for every key not read back as exactly its value at R=r; the keys
    are spread over ``names`` as coordinators."""
    problems = []
    items = sorted(expected.items())
    for index, name in enumerate(names):
        async with client(sim, name) as c:
            for key, value in items[index::len(names)]:
                try:
                    result = await c.get(key, r=r)
                except KvdError as exc:
                    problems.append((key, f"{type(exc).__name__}: {exc}"))
                    continue
                values = [(s.value, s.deleted) for s in result.siblings]
                if not result.found or values != [(value, False)]:
                    problems.append((key, f"found={result.found} siblings={values[:3]}"))
    return problems


async def not_found_problems(sim, names, keys, r: int) -> list:
    problems = []
    for index, name in enumerate(names):
        async with client(sim, name) as c:
            for key in keys[index::len(names)]:
                result = await c.get(key, r=r)
                if result.found or any(not s.deleted for s in result.siblings):
                    problems.append((key, [s.value for s in result.siblings][:2]))
    return problems


async def repair(sim, name, partition=None) -> dict:
    fields = {"op": "repair", "wait": True}
    if partition is not None:
        fields["partition"] = partition
    stats = (await sim.admin(name, fields))["repair"]
    assert set(stats) >= {"partitions", "partitions_differing", "segments_differing",
                          "keys_repaired", "tombstones_purged", "bytes_exchanged", "errors"}, stats
    return stats


async def wait_for(what: str, check, limit: float, interval: float = 1.0):
    """Poll ``check`` (returning (done, observation)) for ``limit`` simulated seconds."""
    seen = None
    with trio.move_on_after(limit):
        while True:
            done, seen = await check()
            if done:
                return seen
            await trio.sleep(interval)
    pytest.fail(f"{what}: not within {limit} simulated s; last seen {seen!r}")


async def wait_mid_transfer(sim, name="n1") -> list:
    async def moving():
        rows = (await sim.admin(name, {"op": "transfers"}))["transfers"]
        return bool(rows) and any(r["keys_done"] > 0 for r in rows), rows[:3]

    return await wait_for("a transfer in progress", moving, 120, interval=0.2)


async def wait_ring_seen(sim, names, source="n1") -> None:
    """Until every named node has ``source``'s committed ring (gossip takes a few seconds)."""
    version = sim.nodes[source].node.cluster.state.ring.version
    with trio.fail_after(60):
        while any(sim.nodes[n].node.cluster.state.ring.version < version for n in names):
            await trio.sleep(0.1)


def ownership(sim, name) -> dict[str, int]:
    ring = sim.nodes[name].node.cluster.state.ring
    owned: dict[str, int] = {}
    for owner in ring.owners:
        owned[owner] = owned.get(owner, 0) + 1
    return owned


class Writer:
    """Writes new keys through one node about ``rate`` times a simulated second and keeps
    every acknowledged (key, value); a failed write is not acknowledged."""

    def __init__(self, sim, name: str, prefix: str, rate: float = 10.0):
        self.sim, self.name, self.prefix, self.rate = sim, name, prefix, rate
        self.acked: dict[bytes, bytes] = {}
        self.failed: list[str] = []
        self.scope = trio.CancelScope()
        self.started = self.stopped = 0.0

    async def run(self) -> None:
        with self.scope:
            self.started = trio.current_time()
            i = 0
            while True:
                try:
                    async with client(self.sim, self.name) as c:
                        while True:
                            i += 1
                            key = f"{self.prefix}-{i:06d}".encode()
                            try:
                                await c.put(key, value_of(key))
                                self.acked[key] = value_of(key)
                            except KvdError as exc:
                                self.failed.append(f"{key!r}: {exc}")
                            await trio.sleep(1 / self.rate)
                except KvdError as exc:
                    self.failed.append(repr(exc))
                    await trio.sleep(0.2)

    def stop(self) -> None:
        self.stopped = trio.current_time()
        self.scope.cancel()

    def check_rate(self) -> None:
        elapsed = self.stopped - self.started
        assert len(self.acked) >= 0.5 * self.rate * elapsed, (
            f"{len(self.acked)} acked in {elapsed:.0f} s; failures {self.failed[:5]}")


# ----------------------------------------------------------------------------- cluster


async def test_one_read_of_each_key_refills_a_replica_that_missed_them(sim, autojump_clock):
    """Was test_cluster.py::test_read_repair_refills_a_replica_that_missed_500_writes."""
    sim.config.update(hinted_handoff=False, anti_entropy=False)
    await sim.form(NODES3)
    everyone = set(NODES3)
    keys = [f"rr-{i:05d}".encode() for i in range(200)]

    sim.crash("n3")
    await trio.sleep(DETECT)
    assert await states(sim, "n1") == {"n1": "UN", "n2": "UN", "n3": "DN"}
    await write_keys(sim, "n1", keys, replicas=2)
    for name in ("n1", "n2"):
        rows = await status_rows(sim, name)
        assert rows[name]["hints_held"] == 0 and sum(r["hints_pending"] for r in rows.values()) == 0

    await sim.start("n3")
    await trio.sleep(DETECT)
    for name in NODES3:
        assert await states(sim, name) == {n: "UN" for n in NODES3}, name
    # n3 missed every write: nothing but the reads below can give it the keys.
    missing = await disagreeing(sim, "n1", keys, everyone)
    assert len(missing) == len(keys) and set(missing.values()) == {"absent on ['n3']"}
    repairs_before = (await status_rows(sim, "n1"))["n1"]["read_repairs"]

    async with client(sim, "n1") as c:
        for key in keys:
            result = await c.get(key, r=2)
            assert result.found and [s.value for s in result.siblings] == [value_of(key)], key
            assert result.replicas == 2
    await trio.sleep(5)
    assert await disagreeing(sim, "n2", keys, everyone) == {}
    assert (await status_rows(sim, "n1"))["n1"]["read_repairs"] - repairs_before == len(keys)
    assert not sim.crashes


async def test_siblings_across_coordinators_and_merge(sim, autojump_clock):
    """Was test_cluster.py::test_siblings_across_coordinators_and_merge."""
    await sim.form(NODES3)
    # Writes without a context, one after the other through different coordinators: each
    # supersedes what the cluster held (the coordinator reads first), so no siblings.
    for name in NODES3:
        async with client(sim, name) as c:
            assert (await c.put(b"one", name.encode())).siblings == 1
    async with client(sim, "n1") as c:
        assert [s.value for s in (await c.get(b"one", r=3)).siblings] == [b"n3"]
    # Blind writes supersede nothing: siblings.
    async with client(sim, "n1") as c:
        assert (await c.put(b"sib", b"from-n1", blind=True)).siblings == 1
    async with client(sim, "n2") as c:
        assert (await c.put(b"sib", b"from-n2", blind=True)).siblings == 2
    async with client(sim, "n3") as c:
        got = await c.get(b"sib", r=2)
        assert sorted(s.value for s in got.siblings) == [b"from-n1", b"from-n2"]
        assert [s.deleted for s in got.siblings] == [False, False]
        assert (await c.put(b"sib", b"merged", context=got.context)).siblings == 1
    for name in NODES3:
        async with client(sim, name) as c:
            after = await c.get(b"sib", r=3)
        assert [s.value for s in after.siblings] == [b"merged"], name

    async def converged():
        async with client(sim, "n1") as c:
            doc = await c.inspect(b"sib")
        problem = replica_problem(doc, set(NODES3))
        siblings = [r["siblings"] for r in doc["replicas"]]
        return problem is None and siblings == [1, 1, 1], (problem, siblings)

    await wait_for("every replica holds the single merged value", converged, 10)
    assert not sim.crashes


async def test_writes_without_context_that_cannot_see_each_other_become_siblings(
        sim, autojump_clock):
    """Only writes the coordinator cannot read first are concurrent: two made on either side
    of a partition both survive the heal as siblings (none is lost to the read-first)."""
    await sim.form(NODES3)
    async with client(sim, "n1") as c:
        await c.put(b"split", b"before", w=3)
    sim.isolate("n1")
    async with client(sim, "n1") as c:
        assert (await c.put(b"split", b"lonely", w=1)).siblings == 1
    async with client(sim, "n2") as c:
        assert (await c.put(b"split", b"majority", w=2)).siblings == 1
    sim.net.heal()

    async def both_kept():
        async with client(sim, "n3") as c:
            got = await c.get(b"split", r=3)
        values = sorted(s.value for s in got.siblings)
        return values == [b"lonely", b"majority"], values

    await wait_for("both sides' writes are siblings after the heal", both_kept, 300)
    assert not sim.crashes


# ----------------------------------------------------------------------------- topology


async def test_growing_one_node_to_four_under_writes(sim, autojump_clock):
    """Was test_topology.py::test_growing_one_node_with_4000_keys_to_four_under_writes."""
    sim.config.update(transfer_rate_mb=0.2)
    n1 = await sim.start("n1", seeds=[])
    base = [f"grow-{i:05d}".encode() for i in range(400)]
    await write_keys(sim, "n1", base, replicas=1)
    assert ownership(sim, "n1") == {"n1": Q}

    writer = Writer(sim, "n1", "grow-w")
    members = ["n1"]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer.run)
        await trio.sleep(1.0)
        for count, name in enumerate(("n2", "n3", "n4"), start=2):
            await sim.start(name, seeds=[n1.peer_address])
            members.append(name)
            staged = await sim.admin(name, {"op": "join", "seed": n1.peer_address})
            assert staged["staged"] == f"join {name}"
            plan = await sim.admin("n1", {"op": "plan"})
            assert plan["staged"] == [f"join {name}"]
            after = plan["after"]
            assert set(after) == set(members) and sum(after.values()) == Q
            assert all(abs(c - Q / count) <= 1 for c in after.values()), after
            assert {m["to"] for m in plan["moves"]} == {name}
            assert len(plan["moves"]) == after[name]
            assert (await sim.admin("n1", {"op": "commit"}))["committed"] == [f"join {name}"]
            await sim.wait_settled("n1")
            await trio.sleep(5)  # gossip
            for observer in members:
                assert ownership(sim, observer) == after, observer
                assert not (await sim.admin(observer, {"op": "transfers"}))["transfers"]
        await trio.sleep(1.0)
        writer.stop()
    writer.check_rate()

    for observer in members:
        assert ownership(sim, observer) == {n: Q // 4 for n in members}, observer
    ring = await sim.admin("n3", {"op": "ring"})
    assert ring["pending"] == [] and ring["staged"] == []
    # The transfers copied the data itself (checked before any read could repair it).
    problems = {}
    async with client(sim, "n2") as c:
        for key in base[::3]:
            doc = await c.inspect(key)
            holders = {r["node"] for r in doc["replicas"]}
            problem = replica_problem(doc, holders) if len(holders) == 3 else f"replicas {holders}"
            if problem:
                problems[key] = problem
    assert problems == {}
    expected = {key: value_of(key) for key in base} | writer.acked
    assert await read_problems(sim, members, expected, r=3) == []
    assert not sim.crashes


async def test_shrinking_five_to_three_with_crashes_mid_transfer(sim, autojump_clock):
    """Was test_topology.py::test_shrinking_five_to_three_with_kills_mid_transfer (the
    departing node's exit code stays a real-process test there)."""
    sim.config.update(transfer_rate_mb=0.01, transfer_limit=2)  # kills land mid-transfer
    names = ("n1", "n2", "n3", "n4", "n5")
    await sim.form(names)
    base = [f"shrink-{i:05d}".encode() for i in range(500)]
    await write_keys(sim, "n1", base)

    writer = Writer(sim, "n1", "shrink-w")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer.run)
        await trio.sleep(1.0)

        # ---- n5 leaves; crashed mid-transfer and restarted.
        assert (await sim.admin("n1", {"op": "leave", "node": "n5"}))["staged"] == "leave n5"
        await trio.sleep(3)  # staged on n1, planned from n2: gossip carries it
        plan = await sim.admin("n2", {"op": "plan"})
        assert plan["staged"] == ["leave n5"]
        assert set(plan["after"]) == {"n1", "n2", "n3", "n4"}, plan["after"]
        assert all(c == Q // 4 for c in plan["after"].values()), plan["after"]
        assert sum(m["from"] == "n5" for m in plan["moves"]) == plan["before"]["n5"]
        assert all(m["to"] != "n5" for m in plan["moves"])
        assert (await sim.admin("n1", {"op": "commit"}))["committed"] == ["leave n5"]
        await wait_mid_transfer(sim)
        row = (await status_rows(sim, "n1"))["n5"]
        assert row["status"] == "leaving" and row["state"] == "UL", row
        # A second change while the first is still moving data: refused.
        await wait_ring_seen(sim, ["n2"])
        with pytest.raises(KvdError, match="still moving data"):
            await sim.admin("n2", {"op": "leave", "node": "n4"})
        sim.crash("n5")
        await trio.sleep(1.0)
        assert not sim.crashes
        await sim.start("n5")
        await sim.wait_settled("n1", limit=3600)
        await trio.sleep(5)
        row = (await status_rows(sim, "n1"))["n5"]
        assert row["partitions"] == 0 and row["status"] == "exiting", row

        # ---- n4 leaves; one of its targets is crashed mid-transfer and restarted.
        assert (await sim.admin("n3", {"op": "leave", "node": "n4"}))["staged"] == "leave n4"
        await trio.sleep(5)  # staged on n3, planned from n1: gossip carries it
        plan = await sim.admin("n1", {"op": "plan"})
        assert plan["staged"] == ["leave n4"]
        assert set(plan["after"]) == {"n1", "n2", "n3"}, plan["after"]
        assert all(Q // 3 <= c <= Q // 3 + 1 for c in plan["after"].values()), plan["after"]
        assert (await sim.admin("n1", {"op": "commit"}))["committed"] == ["leave n4"]
        await wait_mid_transfer(sim)
        targets = {r["to"] for r in (await sim.admin("n1", {"op": "transfers"}))["transfers"]}
        victim = next((n for n in ("n2", "n3") if n in targets), None)
        assert victim is not None, f"no pending move towards n2 or n3: {targets}"
        sim.crash(victim)
        await trio.sleep(1.0)
        assert not sim.crashes
        await sim.start(victim)
        await sim.wait_settled("n1", limit=3600)

        # ---- A leave that would drop below N=3 valid nodes: refused.
        with pytest.raises(KvdError, match="fewer than"):
            await sim.admin("n1", {"op": "leave", "node": "n3"})
        await trio.sleep(1.0)
        writer.stop()
    writer.check_rate()
    await trio.sleep(5)

    stayers = ["n1", "n2", "n3"]
    for observer in stayers:
        owned = {n: r["partitions"] for n, r in (await status_rows(sim, observer)).items()}
        assert owned.get("n4", 0) == 0 and owned.get("n5", 0) == 0, (observer, owned)
        kept = sorted(owned.get(n, 0) for n in stayers)
        assert kept == [10, 11, 11] and sum(owned.values()) == Q, \
            (observer, owned)
    ring = await sim.admin("n2", {"op": "ring"})
    assert set(ring["ownership"]) == set(stayers) and ring["pending"] == []
    assert (await sim.admin("n3", {"op": "transfers"}))["transfers"] == []
    # Departed nodes serve nothing: every coordinator routes every partition to the stayers.
    one_per_partition: dict[int, bytes] = {}
    for key in base:
        one_per_partition.setdefault(partition_of(key, Q), key)
    for observer in stayers:
        async with client(sim, observer) as c:
            for key in one_per_partition.values():
                doc = await c.inspect(key)
                assert sorted(r["node"] for r in doc["replicas"]) == stayers, (observer, doc)
    expected = {key: value_of(key) for key in base} | writer.acked
    assert await read_problems(sim, stayers, expected, r=3) == []
    assert not sim.crashes


async def test_anti_entropy_converges_writes_without_reads(sim, autojump_clock):
    """Was test_topology.py::test_anti_entropy_converges_1000_keys_without_reads."""
    sim.config.update(hinted_handoff=False, anti_entropy_interval=5.0)
    await sim.form(NODES3)
    everyone = set(NODES3)
    keys = [f"aae-{i:05d}".encode() for i in range(300)]
    sim.crash("n2")
    sim.crash("n3")
    await trio.sleep(DETECT)
    assert await states(sim, "n1") == {"n1": "UN", "n2": "DN", "n3": "DN"}
    await write_keys(sim, "n1", keys, w=1, replicas=1)
    assert (await status_rows(sim, "n1"))["n1"]["hints_held"] == 0

    await sim.start("n2")
    await sim.start("n3")

    async def agreed():
        problems = await disagreeing(sim, "n1", keys, everyone)
        return not problems, (len(problems), list(problems.items())[:3])

    await wait_for("every replica agrees", agreed, 600, interval=5.0)
    before = {n: (await status_rows(sim, n))[n]["anti_entropy"] for n in NODES3}
    # n1 replicates every partition (3 nodes, N=3): its repair compares all of them.
    stats = await repair(sim, "n1")
    assert stats["partitions"] == Q and stats["errors"] == 0, stats
    assert stats["segments_differing"] == 0 and stats["partitions_differing"] == 0, stats
    assert stats["keys_repaired"] == 0, stats
    await trio.sleep(15)  # more background rounds
    for name in NODES3:
        row = (await status_rows(sim, name))[name]
        assert row["anti_entropy"]["keys_repaired"] == before[name]["keys_repaired"], name
        assert row["read_repairs"] == 0, name  # no client read did any of this
    assert not sim.crashes


async def test_a_wiped_node_never_answers_while_it_restores(sim, autojump_clock):
    """Was test_topology.py::test_wiped_node_restores_before_serving."""
    await sim.form(NODES3)
    keys = [f"wipe-{i:05d}".encode() for i in range(300)]
    probe = keys[:20]
    await write_keys(sim, "n1", keys, w=3, replicas=3)
    sim.crash("n3")
    await trio.sleep(DETECT)
    sim.nodes["n3"].disk = MemoryDisk()  # the operator wiped its data directory
    sim.config.update(transfer_rate_mb=0.005)  # a restore slow enough to be probed
    seen = {"ok": 0, "refused": 0, "inspect_refused": 0, "inspect_present": 0}
    violations: list = []
    as_seen_by_n1: set[str] = set()
    n3 = sim.nodes["n3"]

    def restored() -> bool:
        return n3.node is not None and n3.node.cluster.restore.has_its_data

    await sim.start("n3")
    async with client(sim, "n3") as via3, client(sim, "n1") as via1:
        i = 0
        while not restored():
            key = probe[i % len(probe)]
            i += 1
            for c, name in ((via3, "n3"), (via1, "n1")):
                try:
                    result = await c.get(key, r=3)
                except KvdError as exc:
                    if exc.exit_code == 3:
                        seen["refused"] += 1
                    else:
                        violations.append((name, key, repr(exc)))
                else:
                    if result.found and [s.value for s in result.siblings] == [value_of(key)]:
                        seen["ok"] += 1
                    else:
                        violations.append((name, key, result))
            doc = await via1.inspect(key)
            mine = next(r for r in doc["replicas"] if r["node"] == "n3")
            if mine.get("error"):
                seen["inspect_refused"] += 1
            elif mine["present"] and mine["digest"] == doc["replicas"][0]["digest"]:
                seen["inspect_present"] += 1
            else:
                violations.append(("inspect", key, mine))
            as_seen_by_n1.add((await states(sim, "n1"))["n3"])
            await trio.sleep(0.1)
    assert violations == [], violations[:5]
    # Every node's status says so, not only its own (outside tester: n1 showed UN)
    assert "UJ" in as_seen_by_n1, as_seen_by_n1
    # The probes ran while it restored: they were refused (not answered with missing data).
    assert seen["refused"] > 0 and seen["inspect_refused"] > 0, seen
    await trio.sleep(DETECT)
    assert await states(sim, "n1") == {n: "UN" for n in NODES3}
    rest = keys[len(probe):]  # never read: only the restore can have put them back
    assert await disagreeing(sim, "n1", rest, set(NODES3)) == {}
    assert await read_problems(sim, ["n3"], {k: value_of(k) for k in keys}, r=3) == []
    assert not sim.crashes


GRACE = 120.0


async def test_deletes_with_a_replica_away_never_come_back(sim, autojump_clock):
    """Was test_topology.py::test_deletes_with_a_replica_away_never_come_back (SIGSTOP
    there, a partition here; the grace is simulated time, so no check depends on speed)."""
    sim.config.update(hinted_handoff=False, anti_entropy_interval=3600.0,
                      tombstone_grace=GRACE, hint_window=60.0)
    await sim.form(NODES3)
    everyone = set(NODES3)
    keys = [f"del-{i:05d}".encode() for i in range(200)]
    await write_keys(sim, "n1", keys, w=3, replicas=3)

    sim.isolate("n3")  # partitioned away: alive but silent
    await trio.sleep(DETECT)
    assert await states(sim, "n1") == {"n1": "UN", "n2": "UN", "n3": "DN"}
    deleted_at = trio.current_time()
    async with client(sim, "n1") as c:
        for key in keys:
            got = await c.get(key, r=2)
            assert got.found, key
            assert (await c.delete(key, context=got.context, w=2)).replicas == 2, key
    assert await not_found_problems(sim, ["n1", "n2"], keys, r=2) == []

    sim.net.heal()
    await trio.sleep(DETECT)
    part = partition_of(keys[0], Q)
    in_part = [k for k in keys if partition_of(k, Q) == part]
    first = await repair(sim, "n1", part)
    # n3 differs from n1 on each of these keys (n2 agrees with n1). The exchange pulls n3's
    # dominated value and pushes the tombstone, so a key may be counted twice.
    assert first["partitions"] == 1 and first["errors"] == 0, first
    assert len(in_part) <= first["keys_repaired"] <= 2 * len(in_part), (len(in_part), first)
    again = await repair(sim, "n1", part)
    assert again["segments_differing"] == 0 and again["keys_repaired"] == 0, again
    assert first["tombstones_purged"] == 0 and again["tombstones_purged"] == 0, (first, again)

    synced = await repair(sim, "n1")
    assert trio.current_time() < deleted_at + GRACE
    rest = len(keys) - len(in_part)
    assert synced["errors"] == 0 and rest <= synced["keys_repaired"] <= 2 * rest, synced
    assert synced["tombstones_purged"] == 0, synced  # within the grace
    async with client(sim, "n2") as c:
        for key in keys:
            doc = await c.inspect(key)
            assert replica_problem(doc, everyone) is None, (key, doc)
            assert all(r["deleted"] for r in doc["replicas"]), (key, doc)
    assert await not_found_problems(sim, NODES3, keys, r=3) == []

    # Grace over, but n3 is away: still nothing purged (on any node that is asked).
    sim.isolate("n3")
    await trio.sleep(max(DETECT, deleted_at + GRACE + 1.0 - trio.current_time()))
    assert await states(sim, "n1") == {"n1": "UN", "n2": "UN", "n3": "DN"}
    for name in ("n1", "n2"):
        away = await repair(sim, name)
        assert away["tombstones_purged"] == 0, name
        assert away["unreachable"] == ["n3"], away  # kvctl repair --wait names it

    # n3 back, grace over, every replica holds them: purged, everywhere.
    sim.net.heal()
    await trio.sleep(DETECT)
    purged = await repair(sim, "n1")
    assert purged["keys_repaired"] == 0 and purged["tombstones_purged"] == len(keys), purged
    assert purged["unreachable"] == [], purged
    async with client(sim, "n2") as c:
        for key in keys:
            doc = await c.inspect(key)
            assert {r["node"] for r in doc["replicas"]} == everyone, doc
            assert not any(r["present"] or r.get("error") for r in doc["replicas"]), doc
    # ...and nothing came back: reads say not found, later repairs are idle.
    assert await not_found_problems(sim, NODES3, keys, r=3) == []
    after = await repair(sim, "n2")
    assert after["segments_differing"] == 0 and after["keys_repaired"] == 0, after
    assert not sim.crashes


async def test_a_tombstone_outlives_the_grace_on_every_clock_whatever_the_skew(sim, autojump_clock):
    """Full simulator seed 498: the deleting coordinator's wall clock ran 20 s behind, the
    node that collected tombstones 21 s ahead, more than the 40 s grace apart. It purged a
    tombstone 0.8 s after the delete, judged by the timestamp the coordinator's clock had
    put on it; the put's late twin (a hedged mint) then arrived and the key came back. The
    grace now runs from when each node stored the tombstone, on its own clock."""
    grace = 40.0
    sim.config.update(anti_entropy=False, tombstone_grace=grace, hint_window=30.0)
    for name, skew in (("n1", -25.0), ("n2", 25.0), ("n3", 0.0)):
        sim.add(name).skew = skew  # n2's clock is 50 s ahead of n1's, more than the grace
    await sim.form(NODES3)
    keys = [f"skew-{i:03d}".encode() for i in range(60)]
    await write_keys(sim, "n1", keys, w=3, replicas=3)
    async with client(sim, "n1") as c:
        for key in keys:
            got = await c.get(key, r=3)
            assert (await c.delete(key, context=got.context, w=3)).replicas == 3, key
    stored = trio.current_time()
    early = await repair(sim, "n2")  # every replica holds the tombstones: only the grace holds
    assert early["errors"] == 0 and early["keys_repaired"] == 0, early
    assert early["tombstones_purged"] == 0, early
    await trio.sleep(stored + grace + 1.0 - trio.current_time())
    late = await repair(sim, "n2")
    assert late["tombstones_purged"] == len(keys), late
    assert await not_found_problems(sim, NODES3, keys, r=3) == []
    assert not sim.crashes
