"""Staging computes rings through the injected offload (kvd/node/staging.py Rule 2)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import trio

from kvd.errors import BadRequest
from kvd.membership import cluster_state as cs
from kvd.node.staging import Staging, run_inline


class FakeCluster:
    """What Staging reads of a Cluster: the state, its config, where it publishes, and which
    members still lack its state (none here: Rule 4 is tested on simulated nodes,
    tests/test_topology_sim.py)."""

    def __init__(self, state: cs.ClusterState) -> None:
        self.state = state
        self.config = SimpleNamespace(n=3, request_timeout=5.0, gossip_interval=1.0)

    def members_without_my_state(self) -> list[str]:
        return []

    async def set_state(self, state: cs.ClusterState) -> None:
        self.state = state


def staged_cluster() -> FakeCluster:
    state = cs.new_cluster("a", 16, "c1")
    for node in ("b", "c"):
        state = cs.stage(state, cs.Change("join", node), 3)
    return FakeCluster(state)


async def test_plan_and_commit_run_claim_through_the_offload():
    cluster = staged_cluster()
    calls = []

    async def offload(fn, *args):
        calls.append(fn)
        return await trio.to_thread.run_sync(fn, *args)

    staging = Staging(cluster, offload)
    before, ring, moves = await staging.plan()
    assert before is cluster.state and moves
    base, committed = await staging.commit()
    assert base is before
    assert calls == [cs.plan, cs.commit]
    assert cluster.state is committed and committed.ring == ring
    assert committed.ring == cs.commit(before, 3).ring  # the same ring as on the event loop


async def test_a_refusal_comes_back_from_the_offload():
    staging = Staging(FakeCluster(cs.new_cluster("a", 16, "c1")), run_inline)
    with pytest.raises(BadRequest, match="nothing staged"):
        await staging.commit()
