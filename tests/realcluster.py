"""Helpers for tests that drive a cluster of real kvd processes (ring 3): form it, wait
for a condition, observe it through the client and the real kvctl, show the logs on failure.

One process is tests/procs.py; the ``procs`` fixture that kills them all is in conftest.py.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path

import pytest
import trio

from kvd.client import open_client
from kvd.errors import KvdError
from tests.procs import KvdProcess, kvctl, wait_port

GOSSIP = {"gossip_interval": 0.2}
NODE_IDS = ("n1", "n2", "n3")
Q = 1024  # the default ring_size
# Tests whose point is not the claim run on a smaller ring: forming moves 64 partitions,
# not 1,024, and every wait for "transfers drained" is that much shorter.
SMALL_Q = 64
SMALL_RING = {"ring_size": SMALL_Q}


# ----------------------------------------------------------------------------- helpers


def log_tails(nodes: Iterable[KvdProcess], lines: int = 25) -> str:
    """The end of every node's log, for failure messages."""
    out = []
    for node in nodes:
        tail = node.log_text().splitlines()[-lines:]
        out.append(f"--- {node.node_id} ({node.log_path}) ---\n" + "\n".join(tail))
    return "\n".join(out)


def run_kvctl(node: KvdProcess, *args: str, timeout: float = 60):
    return kvctl(*args, host=node.address, timeout=timeout)


def kvctl_json(node: KvdProcess, *args: str, expect: int = 0) -> dict:
    """``kvctl --json ARGS`` against ``node``; asserts the exit code, returns the document."""
    out = run_kvctl(node, "--json", *args)
    assert out.returncode == expect, (
        f"kvctl {' '.join(args)} on {node.node_id}: exit {out.returncode}\n"
        f"stdout: {out.stdout.decode(errors='replace')}\nstderr: {out.stderr.decode(errors='replace')}"
    )
    return json.loads(out.stdout)


async def akvctl_json(node: KvdProcess, *args: str, expect: int = 0) -> dict:
    return await trio.to_thread.run_sync(lambda: kvctl_json(node, *args, expect=expect))


async def eventually(what: str, check: Callable[[], Awaitable[tuple[bool, object]]],
                     timeout: float, nodes: Iterable[KvdProcess], interval: float = 0.2):
    """Poll ``check`` (returning (done, observation)) until done or the deadline passes."""
    deadline = trio.current_time() + timeout
    while True:
        try:
            done, seen = await check()
        except (KvdError, OSError) as exc:  # a node restarting or refusing: keep polling
            done, seen = False, repr(exc)  # (anything else is a bug in the test: raise it)
        if done:
            return seen
        if trio.current_time() >= deadline:
            pytest.fail(f"{what}: not within {timeout} s; last seen: {seen!r}\n{log_tails(nodes)}")
        await trio.sleep(interval)


async def plan_seen_by(node: KvdProcess, staged: list[str], nodes: Iterable[KvdProcess],
                       timeout: float = 30) -> dict:
    """``kvctl cluster plan`` on ``node`` once it shows ``staged``: changes staged on another
    member reach this one by gossip, so right after staging it may not have them yet."""
    async def check():
        out = await trio.to_thread.run_sync(lambda: run_kvctl(node, "--json", "cluster", "plan"))
        if out.returncode != 0:  # "nothing staged" (exit 2) until gossip brings the changes
            return False, out.stderr.decode(errors="replace").strip()
        plan = json.loads(out.stdout)
        return sorted(plan["staged"]) == sorted(staged), plan

    return await eventually(f"{node.node_id} plans {staged}", check, timeout, nodes)


async def client_status(node: KvdProcess) -> dict:
    async with open_client(node.address) as client:
        return await client.status()


async def states_seen_by(node: KvdProcess) -> dict[str, str]:
    return {row["node"]: row["state"] for row in (await client_status(node))["nodes"]}


async def wait_states(observers: Iterable[KvdProcess], expected: dict[str, str],
                      nodes: Iterable[KvdProcess], timeout: float = 20) -> None:
    """Wait until every observer's status shows exactly ``expected`` (node -> UN/DN/...)."""
    for observer in observers:
        async def check(observer=observer):
            seen = await states_seen_by(observer)
            return seen == expected, seen

        await eventually(f"{observer.node_id} sees {expected}", check, timeout, nodes)


async def transfers_of(node: KvdProcess) -> list:
    async with open_client(node.address) as client:
        return (await client.admin({"op": "transfers"}))["transfers"]


async def for_each(address: str, items, work, concurrency: int = 32) -> None:
    """Run ``await work(client, item)`` for every item over one client connection."""
    items = list(items)
    async with open_client(address) as client:
        async def worker(offset: int) -> None:
            for item in items[offset::concurrency]:
                await work(client, item)

        async with trio.open_nursery() as nursery:
            for offset in range(concurrency):
                nursery.start_soon(worker, offset)


def key_of(i: int, prefix: str) -> bytes:
    return f"{prefix}-{i:05d}".encode()


def value_of(key: bytes) -> bytes:
    return b"value of " + key + b" " + bytes(range(32))


def replica_problem(doc: dict, expected_nodes: set[str]) -> str | None:
    """None when ``doc`` (an inspect reply) shows every expected node present and agreeing."""
    replicas = doc["replicas"]
    nodes = {r["node"] for r in replicas}
    if nodes != expected_nodes:
        return f"replicas are {sorted(nodes)}"
    absent = sorted(r["node"] for r in replicas if not r["present"])
    if absent:
        return f"absent on {absent}"
    digests = {r["digest"] for r in replicas}
    if len(digests) != 1:
        return f"digests differ: {[(r['node'], r['digest']) for r in replicas]}"
    return None


async def replicas_disagreeing(node: KvdProcess, keys: list[bytes], expected: set[str]) -> dict:
    """key -> problem, for the keys whose replicas do not all hold the same object."""
    problems: dict[bytes, str] = {}

    async def one(client, key):
        problem = replica_problem(await client.inspect(key), expected)
        if problem:
            problems[key] = problem

    await for_each(node.address, keys, one, concurrency=16)
    return problems


async def kvctl_inspect_sample(node: KvdProcess, keys: list[bytes], expected: set[str],
                               parallel: int = 4) -> dict:
    """``kvctl --json inspect`` on each key (a few CLI processes at a time)."""
    problems: dict[bytes, str] = {}
    limiter = trio.CapacityLimiter(parallel)

    async def one(key: bytes) -> None:
        async with limiter:
            doc = await akvctl_json(node, "inspect", key.decode())
        problem = replica_problem(doc, expected)
        if problem is None and doc.get("agree") is not True:
            problem = f"kvctl says agree={doc.get('agree')!r}"
        if problem:
            problems[key] = problem

    async with trio.open_nursery() as nursery:
        for key in keys:
            nursery.start_soon(one, key)
    return problems


def start_node(tmp_path: Path, procs: list, node_id: str, extra: dict,
               seeds: list[str] | None = None, wait: bool = True) -> KvdProcess:
    node = KvdProcess(tmp_path / node_id / "data", node_id=node_id, extra=extra, seeds=seeds)
    procs.append(node)
    return node.start(wait=wait)


def start_nodes(tmp_path: Path, procs: list, node_ids: Iterable[str], extra: dict,
                seeds: list[str] | None = None) -> list[KvdProcess]:
    """Start several daemons at once (their imports overlap), then wait for their ports."""
    nodes = [start_node(tmp_path, procs, nid, extra, seeds, wait=False) for nid in node_ids]
    for node in nodes:
        wait_port(node.port, proc=node.proc)
    return nodes


async def wait_formed(nodes: list[KvdProcess], timeout: float = 60) -> dict:
    """Transfers drained and every node sees every node UN (polled with the client, then
    confirmed once with kvctl). Returns the kvctl documents: "transfers" and one
    ``status`` per node id."""
    first = nodes[0]

    async def drained():
        rows = await transfers_of(first)
        return rows == [], rows

    await eventually("transfers drained", drained, timeout, nodes)
    expected = {n.node_id: "UN" for n in nodes}
    await wait_states(nodes, expected, nodes, timeout)
    # The same, through the CLI (concurrently: each kvctl process costs ~0.1 s of CPU).
    docs: dict = {}

    async def cli(name, node, *args):
        docs[name] = await akvctl_json(node, *args)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(cli, "transfers", first, "transfers")
        for node in nodes:
            nursery.start_soon(cli, node.node_id, node, "status")
    assert docs["transfers"]["transfers"] == []
    for node in nodes:
        states = {r["node"]: r["state"] for r in docs[node.node_id]["nodes"]}
        assert states == expected, (node.node_id, states)
    return docs


async def join_all(seed: KvdProcess, joiners: list[KvdProcess]) -> None:
    """``kvctl --host NEW cluster join SEED`` for every joiner, concurrently."""
    docs = {}

    async def join(node):
        docs[node.node_id] = await akvctl_json(node, "cluster", "join", seed.peer_address)

    async with trio.open_nursery() as nursery:
        for node in joiners:
            nursery.start_soon(join, node)
    for node in joiners:
        assert docs[node.node_id]["staged"] == f"join {node.node_id}"


async def form_cluster(tmp_path: Path, procs: list, extra: dict | None = None) -> list[KvdProcess]:
    """n1 alone, n2 and n3 seeded with n1, both joined, committed; returns [n1, n2, n3]."""
    extra = {**GOSSIP, **(extra or {})}
    n1 = start_node(tmp_path, procs, "n1", extra)
    others = start_nodes(tmp_path, procs, NODE_IDS[1:], extra, seeds=[n1.peer_address])
    await join_all(n1, others)
    commit = await akvctl_json(n1, "cluster", "commit")
    assert sorted(commit["committed"]) == ["join n2", "join n3"]
    nodes = [n1, *others]
    await wait_formed(nodes)
    return nodes


def partitions_owned(doc: dict) -> dict[str, int]:
    return {row["node"]: row["partitions"] for row in doc["nodes"]}


async def read_repairs(node: KvdProcess) -> int:
    rows = (await client_status(node))["nodes"]
    return next(r for r in rows if r["node"] == node.node_id)["read_repairs"]


async def hint_counts(nodes: list[KvdProcess]) -> dict[str, tuple[int, int]]:
    """node -> (its own hints_held, sum of hints_pending over the rows it reports)."""
    out = {}
    for node in nodes:
        rows = (await client_status(node))["nodes"]
        mine = next(r for r in rows if r["node"] == node.node_id)
        out[node.node_id] = (mine["hints_held"], sum(r["hints_pending"] for r in rows))
    return out
