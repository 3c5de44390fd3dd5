"""`kvctl transfers` reports each partition's own progress (issue 12): a node fetching with
``transfer_limit = 2`` shows at most two partitions running, the others pending or done,
and each row counts its own partition's keys and bytes, not the node's total."""

from __future__ import annotations

import trio


async def test_rows_show_each_partitions_own_progress_and_state(sim, autojump_clock):
    sim.config.update(transfer_rate_mb=0.05, transfer_limit=2)
    n1 = await sim.start("n1", seeds=[])
    await sim.start("n2", seeds=[n1.peer_address])
    async with sim.open_client("n1", sim.client_address()) as client:
        for i in range(400):
            await client.put(f"key-{i}".encode(), b"v" * 2000)
    await sim.admin("n2", {"op": "join", "seed": n1.peer_address})
    await sim.admin("n1", {"op": "commit"})

    seen_done = None
    with trio.fail_after(3600):
        while seen_done is None:
            rows = [r for r in (await sim.admin("n1", {"op": "transfers"}))["transfers"]
                    if r["to"] == "n2"]
            assert rows, "the commit moved nothing to n2"
            states = [r["state"] for r in rows]
            assert states.count("running") <= 2, states
            assert set(states) <= {"pending", "running", "done", "retrying"}, states
            for row in rows:
                if row["state"] == "pending":
                    assert (row["keys_done"], row["bytes_done"]) == (0, 0), row
            if "done" in states and "pending" in states:
                seen_done = rows
            await trio.sleep(1.0)
    progress = sim.nodes["n2"].node.cluster.transfers.progress
    done = [r for r in seen_done if r["state"] == "done"]
    assert all(0 < r["keys_done"] < progress["keys_done"] for r in done), (done, progress)
    assert sum(r["bytes_done"] for r in seen_done) <= progress["bytes_done"]
    await sim.wait_settled("n1", 3600)
