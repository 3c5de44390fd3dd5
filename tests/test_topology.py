"""Issue 4, "Must show" with real processes: topology changes and anti-entropy.

The smoke tests of what only real daemons show (tests/procs.py, tests/realcluster.py): a
departing node exits 0 by itself, ``kvctl repair --wait`` and ``kvctl cluster`` over TCP,
a wrong seed on a real socket. The scenarios themselves (growing and shrinking under writes
with crashes mid-transfer, anti-entropy without reads, a wiped node restoring, deletes and
the tombstone grace) run on the simulator in tests/test_cluster_sim.py.

- leaving: four nodes, one leaves and exits 0 by itself; a leave below N=3 is refused;
- repair: a replica that missed a W=2 write (hints off) gets it from `kvctl repair --wait`;
- a wrong seed for `kvctl cluster join` fails with an error naming it.
"""

from __future__ import annotations

import pytest
import trio

from tests.procs import KvdProcess, free_port, wait_port
from tests.realcluster import (
    GOSSIP,
    NODE_IDS,
    SMALL_Q,
    SMALL_RING,
    akvctl_json,
    client_status,
    eventually,
    for_each,
    form_cluster,
    join_all,
    key_of,
    log_tails,
    plan_seen_by,
    replica_problem,
    run_kvctl,
    start_node,
    start_nodes,
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


# ----------------------------------------------------------------------------- leaving


async def test_a_leaving_node_hands_off_and_exits_zero_by_itself(tmp_path, procs):
    """The process side of shrinking (the scenario itself is in test_cluster_sim.py): the
    departing daemon exits 0 on its own once its data has moved."""
    extra = {**GOSSIP, **SMALL_RING}
    n1 = start_node(tmp_path, procs, "n1", extra)
    others = start_nodes(tmp_path, procs, ("n2", "n3", "n4"), extra, seeds=[n1.peer_address])
    nodes = [n1, *others]
    n2, n3, n4 = others
    await join_all(n1, others)
    await akvctl_json(n1, "cluster", "commit")
    await wait_formed(nodes)
    keys = [key_of(i, "leave") for i in range(300)]
    await write_keys(n1, keys)

    assert (await akvctl_json(n1, "cluster", "leave", "n4"))["staged"] == "leave n4"
    plan = await plan_seen_by(n2, ["leave n4"], nodes)
    assert set(plan["after"]) == {"n1", "n2", "n3"}
    assert (await akvctl_json(n1, "cluster", "commit"))["committed"] == ["leave n4"]
    await wait_drained(n1, nodes, timeout=60)
    code = await await_exit(n4, 30)
    assert code == 0, f"n4 (left) exit code {code}\n{log_tails([n4], 40)}"

    stayers = [n1, n2, n3]
    for observer in stayers:
        rows = await status_rows(observer)
        owned = {n: r["partitions"] for n, r in rows.items()}
        assert owned.get("n4", 0) == 0 and sum(owned.values()) == SMALL_Q, (observer.node_id, owned)
    # A leave that would drop below N=3 valid nodes: refused, one line.
    refusal(await arun_kvctl(n1, "cluster", "leave", "n3"), "fewer than")
    # n4 exited only once every member had told it they knew the handoff had ended
    # (kvd/node/cluster.py Rule 4), so reads at R=3 through any of them succeed at once.
    bad: list = []

    async def read(client, key):
        result = await client.get(key, r=3)
        if not (result.found and [s.value for s in result.siblings] == [value_of(key)]):
            bad.append((key, result))

    await for_each(n2.address, keys, read)
    assert bad == [], bad[:5]


# ----------------------------------------------------------------------------- repair

# Background exchanges are on but far apart, so only `kvctl repair` can have done the work
# (and "anti_entropy = false" cannot be read as "no tombstone removal" either).
ON_DEMAND_AAE = {"hinted_handoff": False, "anti_entropy": True, "anti_entropy_interval": 3600.0,
                 **SMALL_RING}


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
    assert first["partitions"] == SMALL_Q and first["errors"] == 0, first
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



def test_join_with_a_wrong_seed_fails_with_an_error_naming_it(tmp_path, procs, monkeypatch):
    """Bug 13 over real TCP (what the simulator cannot show): `kvctl cluster join` with the
    metrics port (HTTP), the client port or a closed port as SEED exits non-zero within
    seconds with a message naming the seed; the right seed still works."""
    metrics = f"127.0.0.1:{free_port()}"
    monkeypatch.setenv("KVD_METRICS_LISTEN", metrics)  # the test config turns it off
    n1 = start_node(tmp_path, procs, "n1", GOSSIP)
    monkeypatch.delenv("KVD_METRICS_LISTEN")
    n2 = start_node(tmp_path, procs, "n2", GOSSIP)
    wait_port(int(metrics.rsplit(":", 1)[1]), proc=n1.proc)
    for seed in (metrics, n1.address, f"127.0.0.1:{free_port()}"):
        # A join that hangs raises TimeoutExpired here (the simulator times it exactly).
        out = run_kvctl(n2, "cluster", "join", seed, timeout=30)
        err = out.stderr.decode(errors="replace")
        assert out.returncode != 0 and seed in err, (seed, out.returncode, err)
    assert run_kvctl(n2, "cluster", "join", n1.peer_address).returncode == 0
