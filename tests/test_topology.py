"""Issue 4, "Must show" with real processes: topology changes and anti-entropy.

Real ``kvd`` daemons (tests/procs.py) driven by the real ``kvctl`` CLI and, where thousands
of requests are needed, the async client. The cluster helpers of tests/test_cluster.py are
reused (forming, waiting for drained transfers and all-UN status, log tails on failure).

- growing: one node with 4,000 keys, three more joined one at a time under a ~100 writes/s
  writer: no acknowledged write lost, 256 partitions each, every key at R=3;
- shrinking: five nodes, two leave one after the other under the writer; the first leaving
  node and then a fetching target are SIGKILLed mid-transfer and restarted; leaving nodes
  exit 0 by themselves; a leave below N=3 and a change staged while data moves are refused;
- repair: a replica that missed a W=2 write (hints off) gets it from `kvctl repair --wait`;
- anti-entropy without reads: 1,000 keys written at W=1 with two replicas stopped converge;
- wiped node: never answers as a replica while restoring; every key is back afterwards;
- deletes: 500 deletes with a replica away never come back; tombstones are purged only after
  the grace period and only when every replica is up and holds them.

Every kvctl call made while a writer runs goes through a worker thread, so the writer's trio
loop is never blocked by a subprocess.
"""

from __future__ import annotations

import json
import shutil
import signal
import time

import pytest
import trio

from kvd.client import open_client
from kvd.errors import ConnectFailed, KvdError
from kvd.ring import partition_of
from tests.procs import KvdProcess, wait_port
from tests.test_cluster import (  # noqa: F401 - procs is a fixture
    GOSSIP,
    NODE_IDS,
    Q,
    akvctl_json,
    client_status,
    eventually,
    for_each,
    form_cluster,
    join_all,
    key_of,
    kvctl_inspect_sample,
    log_tails,
    partitions_owned,
    procs,
    replica_problem,
    replicas_disagreeing,
    run_kvctl,
    start_node,
    transfers_of,
    value_of,
    wait_formed,
    wait_states,
)

pytestmark = pytest.mark.slow


# ----------------------------------------------------------------------------- helpers


async def arun_kvctl(node: KvdProcess, *args: str, timeout: float = 60):
    """``kvctl ARGS`` against ``node`` in a worker thread (the CompletedProcess)."""
    return await trio.to_thread.run_sync(lambda: run_kvctl(node, *args, timeout=timeout))


async def astart(node: KvdProcess, tolerate_exit: bool = False) -> None:
    """Start (or restart) ``node`` without blocking the trio loop while it boots.

    ``tolerate_exit``: a node that has left may exit 0 before its port is seen."""
    node.start(wait=False)
    try:
        await trio.to_thread.run_sync(lambda: wait_port(node.port, 30.0, node.proc))
    except RuntimeError:
        if not (tolerate_exit and node.proc.poll() == 0):
            raise


async def await_exit(node: KvdProcess, timeout: float) -> int | None:
    """The node's exit code once it has exited by itself, None if still running."""
    deadline = trio.current_time() + timeout
    while node.proc.poll() is None and trio.current_time() < deadline:
        await trio.sleep(0.2)
    return node.proc.poll()


def refusal(out, fragment: str) -> str:
    """Assert a kvctl run was refused with one line on stderr containing ``fragment``."""
    stderr = out.stderr.decode(errors="replace")
    assert out.returncode != 0, (out.returncode, out.stdout, stderr)
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line, got {lines!r}"
    assert fragment in lines[0], lines[0]
    return lines[0]


async def write_keys(node: KvdProcess, keys: list[bytes], w: int | None = None,
                     replicas: int | None = None) -> None:
    async def write(client, key):
        result = await client.put(key, value_of(key), w=w)
        if replicas is not None:
            assert result.replicas == replicas, (key, result)

    await for_each(node.address, keys, write)


async def read_problems(nodes: list[KvdProcess], expected: dict[bytes, bytes], r: int) -> list:
    """(key, problem) for every key that does not read back as exactly its value at R=r;
    the keys are spread over ``nodes`` as coordinators."""
    problems: list = []
    items = sorted(expected.items())

    async def read(client, item):
        key, value = item
        try:
            result = await client.get(key, r=r)
        except KvdError as exc:
            problems.append((key, f"{type(exc).__name__}: {exc}"))
            return
        values = [(s.value, s.deleted) for s in result.siblings]
        if not result.found or values != [(value, False)]:
            problems.append((key, f"found={result.found} siblings={values[:3]}"))

    async with trio.open_nursery() as nursery:
        for index, node in enumerate(nodes):
            nursery.start_soon(for_each, node.address, items[index::len(nodes)], read, 16)
    return problems


async def not_found_problems(nodes: list[KvdProcess], keys: list[bytes], r: int) -> list:
    """(key, problem) for every key that does not read as not found at R=r."""
    problems: list = []

    async def read(client, key):
        try:
            result = await client.get(key, r=r)
        except KvdError as exc:
            problems.append((key, f"{type(exc).__name__}: {exc}"))
            return
        if result.found or any(not s.deleted for s in result.siblings):
            problems.append((key, f"came back: {[s.value for s in result.siblings][:2]}"))

    async with trio.open_nursery() as nursery:
        for index, node in enumerate(nodes):
            nursery.start_soon(for_each, node.address, keys[index::len(nodes)], read, 16)
    return problems


class Writer:
    """Writes new keys through one node at about ``rate`` per second and remembers every
    acknowledged (key, value). A write that fails or is cancelled is not acknowledged."""

    def __init__(self, address: str, prefix: str, rate: float = 100.0, concurrency: int = 16):
        self.address = address
        self.prefix = prefix
        self.rate = rate
        self.slots = trio.Semaphore(concurrency)
        self.acked: dict[bytes, bytes] = {}
        self.failed = 0
        self.errors: list[str] = []
        self.sent = 0
        self.started = 0.0
        self.stopped = 0.0
        self.scope = trio.CancelScope()

    async def run(self) -> None:
        with self.scope:
            self.started = trio.current_time()
            while True:
                try:
                    async with open_client(self.address) as client:
                        await self._pump(client)
                except KvdError as exc:
                    self.errors.append(repr(exc))
                    await trio.sleep(0.2)

    async def _pump(self, client) -> None:
        async with trio.open_nursery() as nursery:
            while not client.closed.is_set():
                await trio.sleep_until(self.started + self.sent / self.rate)
                await self.slots.acquire()
                self.sent += 1
                nursery.start_soon(self._one, client, f"{self.prefix}-{self.sent:06d}".encode())

    async def _one(self, client, key: bytes) -> None:
        try:
            with trio.fail_after(15):
                await client.put(key, value_of(key))
            self.acked[key] = value_of(key)
        except (KvdError, trio.TooSlowError) as exc:
            self.failed += 1
            if len(self.errors) < 20:
                self.errors.append(f"{key!r}: {type(exc).__name__}: {exc}")
        finally:
            self.slots.release()

    def stop(self) -> None:
        self.stopped = trio.current_time()
        self.scope.cancel()

    def summary(self) -> str:
        elapsed = max(self.stopped - self.started, 1e-6)
        return (f"writer {self.prefix}: {len(self.acked)} acked, {self.failed} failed in "
                f"{elapsed:.1f} s ({len(self.acked) / elapsed:.0f} acked/s); "
                f"errors {self.errors[:5]}")

    def check_rate(self) -> None:
        elapsed = self.stopped - self.started
        assert len(self.acked) >= 0.5 * self.rate * elapsed, self.summary()


async def repair_json(node: KvdProcess, *args: str) -> dict:
    doc = await akvctl_json(node, "repair", "--wait", *args)
    stats = doc["repair"]
    assert set(stats) >= {"partitions", "partitions_differing", "segments_differing",
                          "keys_repaired", "tombstones_purged", "bytes_exchanged", "errors"}, stats
    return stats


async def status_rows(node: KvdProcess) -> dict[str, dict]:
    return {row["node"]: row for row in (await client_status(node))["nodes"]}


async def wait_drained(observer: KvdProcess, nodes: list[KvdProcess], timeout: float) -> None:
    async def drained():
        rows = await transfers_of(observer)
        return rows == [], [(r["partition"], r["from"], r["to"], r["state"], r["keys_done"])
                            for r in rows[:5]] + [f"{len(rows)} rows"]

    await eventually("transfers drained", drained, timeout, nodes, interval=0.3)


async def wait_mid_transfer(observer: KvdProcess, nodes: list[KvdProcess],
                            timeout: float = 30) -> list[dict]:
    """Wait until some pending transfer has moved keys (but not every move is done)."""
    async def moving():
        rows = await transfers_of(observer)
        return bool(rows) and any(r["keys_done"] > 0 for r in rows), rows[:3]

    return await eventually("a transfer in progress", moving, timeout, nodes, interval=0.1)


async def wait_staged(node: KvdProcess, staged: list[str], nodes: list[KvdProcess]) -> None:
    """Staged changes travel by gossip: wait until ``node`` sees them."""
    async def seen():
        async with open_client(node.address) as client:
            doc = await client.admin({"op": "ring"})
        return doc["staged"] == staged, doc["staged"]

    await eventually(f"{node.node_id} sees {staged} staged", seen, 10, nodes)


def assert_alive(nodes: list[KvdProcess], what: str) -> None:
    """Every node in ``nodes`` still runs (a node that exits on its own shows its log)."""
    dead = [(n.node_id, n.proc.poll()) for n in nodes if n.proc.poll() is not None]
    assert not dead, f"{what}: nodes exited {dead}\n{log_tails([n for n in nodes], 15)}"


def sigstop(node: KvdProcess) -> None:
    node.proc.send_signal(signal.SIGSTOP)


def sigcont(node: KvdProcess) -> None:
    node.proc.send_signal(signal.SIGCONT)


# ----------------------------------------------------------------------------- growing


async def test_growing_one_node_with_4000_keys_to_four_under_writes(tmp_path, procs):
    extra = dict(GOSSIP)
    n1 = start_node(tmp_path, procs, "n1", extra)
    nodes = [n1]
    base = [key_of(i, "grow") for i in range(4000)]
    began = trio.current_time()
    await write_keys(n1, base, replicas=1)
    load_s = trio.current_time() - began
    assert partitions_owned(await akvctl_json(n1, "status")) == {"n1": Q}

    writer = Writer(n1.address, "grow-w")
    joins: list[float] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer.run)
        await trio.sleep(1.0)
        for count, nid in enumerate(("n2", "n3", "n4"), start=2):
            began = trio.current_time()
            node = KvdProcess(tmp_path / nid / "data", node_id=nid, extra=extra,
                              seeds=[n1.peer_address])
            procs.append(node)
            await astart(node)
            nodes.append(node)
            staged = await akvctl_json(node, "cluster", "join", n1.peer_address)
            assert staged["staged"] == f"join {nid}"
            plan = await akvctl_json(n1, "cluster", "plan")
            assert plan["staged"] == [f"join {nid}"]
            after = plan["after"]
            assert set(after) == {n.node_id for n in nodes} and sum(after.values()) == Q
            assert all(abs(c - Q / count) <= 1 for c in after.values()), after
            assert {m["to"] for m in plan["moves"]} == {nid}
            assert len(plan["moves"]) == after[nid]
            commit = await akvctl_json(n1, "cluster", "commit")
            assert commit["committed"] == [f"join {nid}"]
            docs = await wait_formed(nodes, timeout=120)
            for observer in nodes:
                assert partitions_owned(docs[observer.node_id]) == after, observer.node_id
            joins.append(trio.current_time() - began)
        await trio.sleep(1.0)
        writer.stop()
    writer.check_rate()
    print(f"\n4,000 keys loaded in {load_s:.1f} s; joins took {[round(j, 1) for j in joins]} s; "
          + writer.summary())

    # Each node owns 25% of the partitions within +-1, everywhere; nothing pending.
    docs = await wait_formed(nodes)
    for observer in nodes:
        owned = partitions_owned(docs[observer.node_id])
        assert set(owned) == {"n1", "n2", "n3", "n4"} and sum(owned.values()) == Q, owned
        assert all(255 <= c <= 257 for c in owned.values()), (observer.node_id, owned)
    assert docs["transfers"]["transfers"] == []
    ring = await akvctl_json(nodes[2], "ring")
    assert ring["pending"] == [] and ring["staged"] == []

    # The transfers copied the data itself (checked before any read could repair it).
    sample = base[::20]
    problems: dict = {}

    async def replicas_of(client, key):
        doc = await client.inspect(key)
        nodes_of = {r["node"] for r in doc["replicas"]}
        problem = replica_problem(doc, nodes_of) if len(nodes_of) == 3 else f"replicas {nodes_of}"
        if problem:
            problems[key] = problem

    await for_each(nodes[1].address, sample, replicas_of, 16)
    assert problems == {}, (f"{len(problems)} of {len(sample)} sampled keys not on all 3 replicas "
                            f"after the transfers, e.g. {list(problems.items())[:5]}\n"
                            f"{log_tails(nodes)}")

    # 0 acknowledged writes lost, and every key reads back at R=3.
    expected = {key: value_of(key) for key in base}
    expected.update(writer.acked)
    bad = await read_problems(nodes, expected, r=3)
    assert bad == [], (f"{len(bad)} of {len(expected)} keys ({len(writer.acked)} acknowledged "
                       f"during the joins) wrong at R=3, e.g. {bad[:5]}\n{log_tails(nodes)}")


# ----------------------------------------------------------------------------- shrinking


# Slow enough that the kills land mid-transfer. Each node's fetches share one throttle and
# copy from every former holder, so this moves about 3x its rate in key bytes.
SLOW_TRANSFERS = {"transfer_rate_mb": 0.05, "transfer_limit": 2}


async def test_shrinking_five_to_three_with_kills_mid_transfer(tmp_path, procs):
    """Five nodes (so that two can leave without dropping below N=3), 2,000 keys, a
    writer; n5 leaves and is SIGKILLed mid-transfer, then n4 leaves and one of its targets
    is SIGKILLed mid-transfer; both restart, transfers complete, leaving nodes exit 0."""
    extra = {**GOSSIP, **SLOW_TRANSFERS}
    n1 = start_node(tmp_path, procs, "n1", extra)
    others = [KvdProcess(tmp_path / nid / "data", node_id=nid, extra=extra,
                         seeds=[n1.peer_address]) for nid in ("n2", "n3", "n4", "n5")]
    procs.extend(others)
    for node in others:
        node.start(wait=False)
    for node in others:
        wait_port(node.port, proc=node.proc)
    nodes = [n1, *others]
    n2, n3, n4, n5 = others
    await join_all(n1, others)
    await akvctl_json(n1, "cluster", "commit")
    await wait_formed(nodes, timeout=60)
    base = [key_of(i, "shrink") for i in range(2000)]
    await write_keys(n1, base)

    writer = Writer(n1.address, "shrink-w")
    timings: dict[str, float] = {}
    observations: dict = {}
    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer.run)
        await trio.sleep(1.0)

        # ---- n5 leaves; SIGKILLed mid-transfer and restarted.
        began = trio.current_time()
        assert (await akvctl_json(n1, "cluster", "leave", "n5"))["staged"] == "leave n5"
        plan = await akvctl_json(n2, "cluster", "plan")
        assert plan["staged"] == ["leave n5"]
        assert set(plan["after"]) == {"n1", "n2", "n3", "n4"}, plan["after"]
        assert all(255 <= c <= 257 for c in plan["after"].values()), plan["after"]
        assert sum(m["from"] == "n5" for m in plan["moves"]) == plan["before"]["n5"]
        assert all(m["to"] != "n5" for m in plan["moves"])
        commit = await akvctl_json(n1, "cluster", "commit")
        assert commit["committed"] == ["leave n5"]
        observations["leave1 mid"] = await wait_mid_transfer(n1, nodes)
        rows = await status_rows(n1)
        assert rows["n5"]["status"] == "leaving" and rows["n5"]["state"] == "UL", rows["n5"]
        # A second change while the first is still moving data: refused.
        refused = await arun_kvctl(n2, "cluster", "leave", "n4")
        observations["concurrent change"] = refusal(refused, "still moving data")
        n5.kill()
        await trio.sleep(1.0)
        assert_alive([n1, n2, n3, n4], "after SIGKILL of the leaving n5 mid-transfer")
        await astart(n5, tolerate_exit=True)
        await wait_drained(n1, nodes, timeout=90)
        code = await await_exit(n5, 30)
        assert code == 0, f"n5 (left) exit code {code}\n{log_tails([n5], 40)}"
        timings["leave n5"] = trio.current_time() - began
        rows = await status_rows(n1)
        assert rows["n5"]["partitions"] == 0 and rows["n5"]["status"] == "exiting", rows["n5"]

        # ---- n4 leaves; one of its targets is SIGKILLed mid-transfer and restarted.
        began = trio.current_time()
        remaining = [n1, n2, n3, n4]
        assert (await akvctl_json(n3, "cluster", "leave", "n4"))["staged"] == "leave n4"
        await wait_staged(n1, ["leave n4"], nodes)  # staged on n3, planned from n1
        plan = await akvctl_json(n1, "cluster", "plan")
        assert plan["staged"] == ["leave n4"]
        assert set(plan["after"]) == {"n1", "n2", "n3"}, plan["after"]
        assert all(341 <= c <= 342 for c in plan["after"].values()), plan["after"]
        commit = await akvctl_json(n1, "cluster", "commit")
        assert commit["committed"] == ["leave n4"]
        mid = await wait_mid_transfer(n1, remaining)
        observations["leave2 mid"] = mid
        targets = {r["to"] for r in await transfers_of(n1)}
        victim = next((n for n in (n2, n3) if n.node_id in targets), None)
        assert victim is not None, f"no pending move towards n2 or n3: {targets}"
        observations["target killed"] = victim.node_id
        victim.kill()
        await trio.sleep(1.0)
        assert_alive([n for n in remaining if n is not victim],
                     f"after SIGKILL of the target {victim.node_id} mid-transfer")
        await astart(victim)
        await wait_drained(n1, remaining, timeout=90)
        code = await await_exit(n4, 30)
        assert code == 0, f"n4 (left) exit code {code}\n{log_tails([n4], 40)}"
        timings["leave n4"] = trio.current_time() - began

        # ---- A leave that would drop below N=3 valid nodes: refused.
        refused = await arun_kvctl(n1, "cluster", "leave", "n3")
        observations["below N"] = refusal(refused, "fewer than")
        await trio.sleep(1.0)
        writer.stop()
    writer.check_rate()
    print(f"\nshrinking: {timings}; {writer.summary()}\n{json.dumps(observations, default=str)}")

    stayers = [n1, n2, n3]
    for observer in stayers:
        rows = await status_rows(observer)
        owned = {n: r["partitions"] for n, r in rows.items()}
        assert owned.get("n4", 0) == 0 and owned.get("n5", 0) == 0, (observer.node_id, owned)
        kept = sorted(owned.get(n, 0) for n in ("n1", "n2", "n3"))
        assert kept in ([341, 341, 342], [341, 342, 342]) and sum(owned.values()) == Q, \
            (observer.node_id, owned)
    ring = await akvctl_json(n2, "ring")
    assert set(ring["ownership"]) == {"n1", "n2", "n3"} and ring["pending"] == [], ring["ownership"]
    assert (await akvctl_json(n3, "transfers"))["transfers"] == []

    # Departed nodes serve nothing either: every remaining coordinator routes every
    # partition (one key of each that the 3,000 cover) to n1, n2 and n3 only.
    one_per_partition: dict[int, bytes] = {}
    for key in base:
        one_per_partition.setdefault(partition_of(key, Q), key)

    async def routed_to_stayers():
        stale: dict[str, list] = {}

        async def check(observer: KvdProcess):
            async def one(client, key):
                doc = await client.inspect(key)
                names = sorted(r["node"] for r in doc["replicas"])
                if names != ["n1", "n2", "n3"]:
                    stale.setdefault(observer.node_id, []).append((doc["partition"], names))

            await for_each(observer.address, list(one_per_partition.values()), one, 16)

        async with trio.open_nursery() as nursery:
            for observer in stayers:
                nursery.start_soon(check, observer)
        views = {}
        for observer in stayers:
            async with open_client(observer.address) as client:
                ring_doc = await client.admin({"op": "ring"})
            views[observer.node_id] = (ring_doc["version"], len(ring_doc["pending"]))
        return not stale, {"ring (version, pending) per node": views,
                           "stale routes per coordinator": {
                               n: (len(v), sorted(v)[:4]) for n, v in stale.items()}}

    await eventually(f"n1, n2, n3 route all {len(one_per_partition)} partitions to themselves",
                     routed_to_stayers, 10, stayers, interval=1.0)

    expected = {key: value_of(key) for key in base}
    expected.update(writer.acked)
    bad = await read_problems(stayers, expected, r=3)
    assert bad == [], (f"{len(bad)} of {len(expected)} keys ({len(writer.acked)} acknowledged "
                       f"during the leaves) wrong at R=3, e.g. {bad[:5]}\n{log_tails(nodes)}")


# ----------------------------------------------------------------------------- repair

# Background exchanges are on but far apart, so only `kvctl repair` can have done the work
# (and "anti_entropy = false" cannot be read as "no tombstone removal" either).
ON_DEMAND_AAE = {"hinted_handoff": False, "anti_entropy": True, "anti_entropy_interval": 3600.0}


async def test_repair_refills_a_replica_that_missed_a_w2_write(tmp_path, procs):
    n1, n2, n3 = await form_cluster(tmp_path, procs, ON_DEMAND_AAE)
    nodes = [n1, n2, n3]
    everyone = set(NODE_IDS)

    assert n3.stop() == 0
    await wait_states([n1, n2], {"n1": "UN", "n2": "UN", "n3": "DN"}, nodes)
    put = await akvctl_json(n1, "put", "repair-me", "the-value", "-w", "2")
    assert put["replicas"] == 2
    await astart(n3)
    await wait_states(nodes, {nid: "UN" for nid in NODE_IDS}, nodes)
    before = await akvctl_json(n2, "inspect", "repair-me")
    assert replica_problem(before, everyone) == "absent on ['n3']", before  # hints are off

    first = await repair_json(n1)
    assert first["partitions"] == Q and first["errors"] == 0, first
    assert first["partitions_differing"] == 1 and first["segments_differing"] == 1, first
    assert first["keys_repaired"] == 1, first
    after = await akvctl_json(n2, "inspect", "repair-me")
    assert replica_problem(after, everyone) is None and after["agree"] is True, after
    assert [r["siblings"] for r in after["replicas"]] == [1, 1, 1], after

    second = await repair_json(n1)
    assert second["segments_differing"] == 0 and second["partitions_differing"] == 0, second
    assert second["keys_repaired"] == 0 and second["errors"] == 0, second
    print(f"\nrepair: first {first}\nsecond {second}")
    # Nothing but the repair touched n3's copy: no read went through the coordinators.
    for node in nodes:
        rows = await status_rows(node)
        assert rows[node.node_id]["read_repairs"] == 0


# ----------------------------------------------------------------------------- anti-entropy


async def test_anti_entropy_converges_1000_keys_without_reads(tmp_path, procs):
    extra = {"hinted_handoff": False, "anti_entropy": True, "anti_entropy_interval": 2.0}
    n1, n2, n3 = await form_cluster(tmp_path, procs, extra)
    nodes = [n1, n2, n3]
    everyone = set(NODE_IDS)
    keys = [key_of(i, "aae") for i in range(1000)]

    assert n2.stop() == 0 and n3.stop() == 0
    await wait_states([n1], {"n1": "UN", "n2": "DN", "n3": "DN"}, nodes)
    await write_keys(n1, keys, w=1, replicas=1)
    assert (await status_rows(n1))["n1"]["hints_held"] == 0

    await astart(n2)
    await astart(n3)
    started = trio.current_time()
    await wait_states(nodes, {nid: "UN" for nid in NODE_IDS}, nodes)

    async def agreed():
        problems = await replicas_disagreeing(n1, keys, everyone)
        return not problems, (len(problems), dict(list(problems.items())[:3]))

    await eventually("every replica of the 1,000 keys agrees", agreed, 120, nodes, interval=1.0)
    elapsed = trio.current_time() - started
    assert elapsed <= 120
    assert await kvctl_inspect_sample(n2, keys[::200], everyone) == {}

    # Later exchanges find nothing to do: on demand, and in the background.
    totals_before = {n.node_id: (await status_rows(n))[n.node_id]["anti_entropy"] for n in nodes}
    # n1 replicates every partition (3 nodes, N=3): its repair compares all of them with
    # both other replicas.
    stats = await repair_json(n1)
    assert stats["partitions"] == Q and stats["errors"] == 0, stats
    assert stats["segments_differing"] == 0 and stats["partitions_differing"] == 0, stats
    assert stats["keys_repaired"] == 0, stats
    await trio.sleep(2.5)  # at least one more background round
    for node in nodes:
        totals = (await status_rows(node))[node.node_id]["anti_entropy"]
        assert totals["keys_repaired"] == totals_before[node.node_id]["keys_repaired"], \
            (node.node_id, totals_before[node.node_id], totals)
        # No client read ran, so no read repair did any of this.
        assert (await status_rows(node))[node.node_id]["read_repairs"] == 0
    print(f"\nanti-entropy: all replicas agreed {elapsed:.1f} s after the restart; "
          f"totals {totals_before}")


# ----------------------------------------------------------------------------- wiped node


async def test_wiped_node_restores_before_serving(tmp_path, procs):
    n1, n2, n3 = await form_cluster(tmp_path, procs)
    nodes = [n1, n2, n3]
    everyone = set(NODE_IDS)
    keys = [key_of(i, "wipe") for i in range(2000)]
    await write_keys(n1, keys, w=3, replicas=3)
    probe = keys[:40]

    assert n3.stop() == 0
    await wait_states([n1, n2], {"n1": "UN", "n2": "UN", "n3": "DN"}, nodes)
    shutil.rmtree(n3.data_dir)
    n3.extra.update(transfer_rate_mb=0.02)  # a restore slow enough to be probed
    restores_before = n3.log_text().count("restore complete")
    began = trio.current_time()

    seen = {"ok": 0, "refused": 0, "kvctl_ok": 0, "kvctl_refused": 0, "inspect_refused": 0,
            "inspect_present": 0, "n3_states": set()}
    violations: list = []
    done = trio.Event()
    n3_up = trio.Event()

    def restored() -> bool:
        return n3.log_text().count("restore complete") > restores_before

    async def reads(coordinator: KvdProcess):
        # Started before n3 is: the first read reaches it as soon as it accepts connections.
        while True:
            try:
                async with open_client(coordinator.address, connect_timeout=1) as client:
                    await read_loop(coordinator, client)
                    return
            except ConnectFailed:
                if done.is_set():
                    return
                await trio.sleep(0.002)

    async def read_loop(coordinator: KvdProcess, client):
        i = 0
        while not done.is_set():
            key = probe[i % len(probe)]
            i += 1
            try:
                result = await client.get(key, r=3)
            except KvdError as exc:
                if exc.exit_code == 3:
                    seen["refused"] += 1
                else:
                    violations.append((coordinator.node_id, key, repr(exc)))
            else:
                if result.found and [s.value for s in result.siblings] == [value_of(key)]:
                    seen["ok"] += 1
                else:
                    violations.append((coordinator.node_id, key, result))
            await trio.sleep(0.02)

    async def inspects():
        async with open_client(n1.address) as client:
            i = 0
            while not done.is_set():
                key = probe[i % len(probe)]
                i += 1
                doc = await client.inspect(key)
                mine = next(r for r in doc["replicas"] if r["node"] == "n3")
                if mine.get("error"):
                    seen["inspect_refused"] += n3_up.is_set()  # counted once n3 listens
                elif mine["present"] and mine["digest"] == doc["replicas"][0]["digest"]:
                    seen["inspect_present"] += 1
                else:
                    violations.append(("inspect", key, mine))
                await trio.sleep(0.01)

    async def cli():
        i = 0
        while not done.is_set():
            key = probe[i % len(probe)]
            i += 1
            out = await arun_kvctl(n3, "--json", "get", key.decode(), "-r", "3")
            if out.returncode == 3:
                seen["kvctl_refused"] += 1
            elif out.returncode == 0 and [s["value"] for s in json.loads(out.stdout)["siblings"]] \
                    == [value_of(key).decode()]:
                seen["kvctl_ok"] += 1
            else:
                violations.append(("kvctl via n3", key, out.returncode, out.stdout, out.stderr))

    async def watch():
        while not restored():
            try:
                seen["n3_states"].add((await status_rows(n3))["n3"]["state"])
            except KvdError:
                pass
            if trio.current_time() - began > 90:
                break
            await trio.sleep(0.3)
        done.set()

    async with trio.open_nursery() as nursery:
        for _ in range(3):
            nursery.start_soon(reads, n3)
        nursery.start_soon(inspects)
        await astart(n3)
        n3_up.set()
        nursery.start_soon(reads, n1)
        nursery.start_soon(cli)
        nursery.start_soon(watch)
    restore_s = trio.current_time() - began
    print(f"\nwiped node: restore took {restore_s:.1f} s; probes {seen}")
    assert restored(), f"no 'restore complete' in n3's log within 90 s\n{log_tails(nodes, 40)}"
    assert violations == [], (f"{len(violations)} answers from a restoring replica, e.g. "
                              f"{violations[:5]}\n{log_tails(nodes)}")
    # The probes ran while it restored: they were refused (not answered with missing data).
    assert seen["refused"] > 0 and seen["inspect_refused"] > 0, seen

    await wait_states(nodes, {nid: "UN" for nid in NODE_IDS}, nodes)
    rest = keys[len(probe):]  # never read: only the restore can have put them back
    missing = await replicas_disagreeing(n1, rest, everyone)
    assert missing == {}, (f"{len(missing)} of {len(rest)} keys not back on n3 after the restore, "
                           f"e.g. {list(missing.items())[:5]}\n{log_tails(nodes)}")
    assert await kvctl_inspect_sample(n2, rest[::200], everyone) == {}
    bad = await read_problems([n3], {k: value_of(k) for k in keys}, r=3)
    assert bad == [], bad[:5]


# ----------------------------------------------------------------------------- deletes


GRACE = 10.0


async def test_deletes_with_a_replica_away_never_come_back(tmp_path, procs):
    extra = {**ON_DEMAND_AAE, "tombstone_grace": GRACE}
    n1, n2, n3 = await form_cluster(tmp_path, procs, extra)
    nodes = [n1, n2, n3]
    everyone = set(NODE_IDS)
    keys = [key_of(i, "del") for i in range(500)]
    await write_keys(n1, keys, w=3, replicas=3)

    sigstop(n3)  # partitioned away: alive but silent
    await wait_states([n1, n2], {"n1": "UN", "n2": "UN", "n3": "DN"}, nodes)
    deleted_from = time.time()

    async def delete(client, key):
        got = await client.get(key, r=2)
        assert got.found, key
        result = await client.delete(key, context=got.context, w=2)
        assert result.replicas == 2, (key, result)

    await for_each(n1.address, keys, delete)
    deleted_until = time.time()
    assert await not_found_problems([n1, n2], keys, r=2) == []

    # Heal. One partition first, so that this check comes soon after the deletes: once
    # every replica holds its tombstones they are still kept until the grace has passed.
    sigcont(n3)
    await wait_states(nodes, {nid: "UN" for nid in NODE_IDS}, nodes)
    part = partition_of(keys[0], Q)
    in_part = [k for k in keys if partition_of(k, Q) == part]
    first = await repair_json(n1, "--partition", str(part))
    # n3 differs from n1 on each of these keys (n2 agrees with n1). The exchange pulls n3's
    # dominated value and pushes the tombstone, so a key may be counted twice.
    assert first["partitions"] == 1 and first["errors"] == 0, first
    assert len(in_part) <= first["keys_repaired"] <= 2 * len(in_part), (len(in_part), first)
    again = await repair_json(n1, "--partition", str(part))
    checked_at = time.time()
    assert checked_at < deleted_from + GRACE, (
        f"the grace check came {checked_at - deleted_from:.1f} s after the deletes: raise GRACE")
    assert again["segments_differing"] == 0 and again["keys_repaired"] == 0, again
    assert first["tombstones_purged"] == 0 and again["tombstones_purged"] == 0, (first, again)

    # Then every partition: the tombstones reach n3, none of the 500 values comes back.
    synced = await repair_json(n1)
    synced_at = time.time()
    rest = 500 - len(in_part)
    assert synced["errors"] == 0 and rest <= synced["keys_repaired"] <= 2 * rest, synced
    if synced_at < deleted_from + GRACE:
        assert synced["tombstones_purged"] == 0, synced
    confirmed: dict = {}

    async def held_everywhere(client, key):
        doc = await client.inspect(key)
        problem = replica_problem(doc, everyone)
        if problem is None and not all(r["deleted"] for r in doc["replicas"]):
            problem = f"not a tombstone everywhere: {doc['replicas']}"
        if problem:
            confirmed[key] = problem

    await for_each(n2.address, keys, held_everywhere, 16)
    assert confirmed == {}, (f"{len(confirmed)} tombstones not on every replica after the "
                             f"repair, e.g. {list(confirmed.items())[:3]}")
    assert await not_found_problems(nodes, keys, r=3) == []

    # Grace over, but n3 is away: still nothing purged (on any node that is asked).
    sigstop(n3)
    await wait_states([n1, n2], {"n1": "UN", "n2": "UN", "n3": "DN"}, nodes)
    await trio.sleep(max(0.0, deleted_until + GRACE + 1.0 - time.time()))
    for node in (n1, n2):
        stats = await repair_json(node)
        assert stats["tombstones_purged"] == 0, (node.node_id, stats)

    # n3 back, grace over, every replica holds them: purged, everywhere.
    sigcont(n3)
    await wait_states(nodes, {nid: "UN" for nid in NODE_IDS}, nodes)
    purged = await repair_json(n1)
    assert purged["keys_repaired"] == 0 and purged["tombstones_purged"] > 0, purged
    assert purged["tombstones_purged"] + synced["tombstones_purged"] == 500, (synced, purged)
    problems: dict = {}

    async def gone(client, key):
        doc = await client.inspect(key)
        if {r["node"] for r in doc["replicas"]} != everyone or any(
                r["present"] or r.get("error") for r in doc["replicas"]):
            problems[key] = doc["replicas"]

    await for_each(n2.address, keys, gone, 16)
    assert problems == {}, (f"{len(problems)} keys still held after the purge, e.g. "
                            f"{list(problems.items())[:3]}")
    sample = await akvctl_json(n3, "inspect", keys[0].decode())
    assert [r["present"] for r in sample["replicas"]] == [False, False, False], sample
    # ...and nothing came back: reads say not found, kvctl exits 1, later repairs are idle.
    assert await not_found_problems(nodes, keys, r=3) == []
    out = await arun_kvctl(n2, "get", keys[-1].decode(), "-r", "3")
    assert out.returncode == 1 and "not found" in out.stderr.decode(), out
    after = await repair_json(n2)
    assert after["segments_differing"] == 0 and after["keys_repaired"] == 0, after
    print(f"\ndeletes: grace check {checked_at - deleted_from:.1f} s after the first delete "
          f"(grace {GRACE} s); partition {part}: {first}\nsynced {synced}\npurged {purged}")


def test_join_with_a_wrong_seed_fails_with_an_error_naming_it(tmp_path, procs, monkeypatch):
    """Bug 13 over real TCP (what the simulator cannot show): `kvctl cluster join` with the
    metrics port (HTTP), the client port or a closed port as SEED exits non-zero within
    seconds with a message naming the seed; the right seed still works."""
    from tests.procs import free_port

    metrics = f"127.0.0.1:{free_port()}"
    monkeypatch.setenv("KVD_METRICS_LISTEN", metrics)  # the test config turns it off
    n1 = start_node(tmp_path, procs, "n1", GOSSIP)
    monkeypatch.delenv("KVD_METRICS_LISTEN")
    n2 = start_node(tmp_path, procs, "n2", GOSSIP)
    wait_port(int(metrics.rsplit(":", 1)[1]), proc=n1.proc)
    for seed in (metrics, n1.address, f"127.0.0.1:{free_port()}"):
        began = time.monotonic()
        out = run_kvctl(n2, "cluster", "join", seed, timeout=90)
        err = out.stderr.decode(errors="replace")
        assert out.returncode != 0 and seed in err, (seed, out.returncode, err)
        assert time.monotonic() - began < 30, f"join with seed {seed} took {time.monotonic() - began:.0f} s"
    assert run_kvctl(n2, "cluster", "join", n1.peer_address).returncode == 0
