"""The coverage query (kvctl keys, RESP SCAN): every live key once, from a 3-node simulated
cluster, each partition read from one replica; deleted keys are not listed."""

from __future__ import annotations

import json

import trio

from kvctl import keys
from kvd.node import coverage


async def _all_keys(sim, via: str, **fields) -> list[bytes]:
    listed: list[bytes] = []
    position = [0, b""]
    while position is not None:
        reply = await sim.admin(via, {"op": "keys", "partition": position[0],
                                      "after": position[1], **fields})
        listed += reply["keys"]
        position = reply["next"]
    return listed


async def _write(sim, names, keys, value=b"v") -> None:
    async def writer(part):
        source = sim.client_address()
        async with sim.open_client(names[len(part) % len(names)], source) as client:
            for key in part:
                await client.put(key, value)

    async with trio.open_nursery() as nursery:
        for i in range(16):
            nursery.start_soon(writer, keys[i::16])


async def test_kvctl_keys_lists_every_key_once_across_full_pages_from_a_3_node_cluster(
        sim, autojump_clock, capsys, monkeypatch):
    # Pages of 100 keys here, not 1,000 (both the node's cap and kvctl's request): 300 keys
    # fill three full pages and end pages at partition boundaries as 3,000 did at the real
    # size, for a tenth of the writes (3,000 cost 15-20 s of make test's CPU).
    monkeypatch.setattr(coverage, "PAGE_LIMIT", 100)
    monkeypatch.setattr(keys, "PAGE", 100)
    names = ["n1", "n2", "n3"]
    await sim.form(names)
    written = [b"user:%05d" % i for i in range(300)]
    await _write(sim, names, written)
    async with sim.open_client("n2", sim.client_address()) as client:
        await keys.walk(b"", None, as_json=True)(client)  # kvctl keys --json, over the sim
    out = capsys.readouterr()
    listed = [json.loads(line)["key"].encode() for line in out.out.splitlines()]
    assert "full scan" in out.err
    assert len(listed) == len(set(listed)), "a key was listed twice"
    assert set(listed) == set(written)
    assert sorted(await _all_keys(sim, "n3", prefix=b"user:0029")) == [
        b"user:0029%d" % i for i in range(10)]
    assert not sim.crashes, sim.crashes


async def test_keys_skips_deleted_keys_and_survives_a_down_replica(sim, autojump_clock):
    names = ["n1", "n2", "n3"]
    await sim.form(names)
    written = [b"k%03d" % i for i in range(200)]
    await _write(sim, names, written)
    async with sim.open_client("n1", sim.client_address()) as client:
        for key in written[:50]:
            reply = await client.get(key)
            await client.delete(key, context=reply.context)
    sim.crash("n3")
    await trio.sleep(30)  # the failure detector notices
    assert sorted(await _all_keys(sim, "n1")) == written[50:]
    assert await coverage.count(sim.nodes["n2"].node) == 150


def test_listing_keys_needs_the_read_role_only():
    from kvd.proto.messages import MsgType
    from kvd.security import required_role

    assert required_role(MsgType.ADMIN, {"op": "keys"}) == "read"
