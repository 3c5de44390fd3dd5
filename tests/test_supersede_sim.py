"""Writes without a context (RESP SET/DEL, kvctl put/delete without --context) in a 3-node
simulated cluster: concurrent ones through one coordinator supersede each other in turn;
concurrent ones through different coordinators still become siblings (DESIGN section 2)."""

from __future__ import annotations

import trio


async def _concurrent_puts(sim, coordinators: list[str], key: bytes) -> None:
    async def put(i: int, name: str) -> None:
        async with sim.open_client(name, sim.client_address()) as client:
            await client.put(key, b"value %d" % i)

    async with trio.open_nursery() as nursery:
        for i, name in enumerate(coordinators):
            nursery.start_soon(put, i, name)


async def test_concurrent_writes_through_one_coordinator_leave_one_value(sim, autojump_clock):
    await sim.form(["n1", "n2", "n3"])
    await _concurrent_puts(sim, ["n2"] * 16, b"hot")
    async with sim.open_client("n1", sim.client_address()) as client:
        assert len((await client.get(b"hot")).siblings) == 1
    assert not sim.crashes, sim.crashes


async def test_concurrent_writes_through_different_coordinators_become_siblings(
        sim, autojump_clock):
    await sim.form(["n1", "n2", "n3"])
    await _concurrent_puts(sim, ["n1", "n2", "n3"], b"contended")
    async with sim.open_client("n1", sim.client_address()) as client:
        values = {s.value for s in (await client.get(b"contended")).siblings}
    assert len(values) > 1, "a concurrent write was silently superseded"
    assert values <= {b"value 0", b"value 1", b"value 2"}


async def test_concurrent_writes_on_the_only_replica_share_group_commits(sim, autojump_clock):
    # One node: the mint reads what it supersedes itself (coordinator rule 7), so writes of
    # one key need not wait for each other's fsync, and still leave one value.
    await sim.form(["n1"])
    storage = sim.nodes["n1"].node.store.storage
    batches = storage.statistics().batches_committed
    await _concurrent_puts(sim, ["n1"] * 16, b"hot")
    async with sim.open_client("n1", sim.client_address()) as client:
        siblings = (await client.get(b"hot")).siblings
    assert len(siblings) == 1
    assert siblings[0].value in {b"value %d" % i for i in range(16)}
    assert storage.statistics().batches_committed - batches < 16
    assert not sim.crashes, sim.crashes
