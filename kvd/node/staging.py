"""Staging: topology changes (join, leave, replace, force-remove), plan, commit, clear, abort.

riak_core's claimant, as the shell around ``kvd.membership.cluster_state``: every change is
a pure function of the cluster state; this module publishes its result through gossip.

1. A node joins by asking a member (``join_at``): only an empty node that is in no cluster
   yet may, and it takes that cluster's state as its own.
2. ``plan`` and ``commit`` compute a ring (``ring.claim``), which can take long on a large
   ring: they run it off the event loop, through the injected ``offload`` (a worker thread
   in the daemon, inline in the simulator, whose runs must replay exactly).
3. Any node may commit (docs/DECISIONS.md, "Any member may commit"): commit is a pure
   function of the state, so two nodes committing the same staged set make the same ring,
   and gossip's merge settles two different commits on one ring everywhere.
4. An acknowledged commit is never undone by a commit made elsewhere (merge keeps one of
   two rings of the same version). Two steps make sure of it:
   - every member up holds the committing node's state (riak_core's "ring ready"): a
     push-pull exchange with each member that has not told gossip it holds it, until all
     have (Unavailable past ``request_timeout``). A newer state one of them holds, another
     node's commit, comes back in the same exchange, so a commit is computed on top of
     every commit acknowledged before it, or refused when what it staged was superseded
     (full simulator seed 112);
   - the ring is published only if the state it was computed from is still this node's,
     checked and published with no wait between; otherwise it is computed again. A state
     that arrived while the claim ran may carry another node's staged change or commit.
   Two nodes that see each other up cannot both publish a ring of the same version from
   different states: each held, when it checked, the state the other had told it it held
   before its own ring-ready check ended, and states only grow (gossip's merge), so each
   state would come before the other. What remains: members each side of a partition sees
   down are not asked (docs/DECISIONS.md, "Any member may commit").
5. A leave or a replace needs its node up (as this node judges it) when it is staged: the
   node hands its own data off, and its transfers would wait for it forever. A dead node
   takes a force-remove instead.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import trio

from kvd.address import parse_address
from kvd.errors import BadRequest, KvdError, Unauthorized, Unavailable
from kvd.membership import cluster_state as cs
from kvd.node.gossip import EXCHANGE_ERRORS
from kvd.node.remote import RemoteNode
from kvd.ring import Move, Ring

if TYPE_CHECKING:
    from kvd.node.cluster import Cluster

COMPUTE_ATTEMPTS = 3  # rings computed for one commit while the state keeps changing (Rule 4)

# How CPU-heavy pure work (claim) runs: ``await offload(fn, *args)`` returns ``fn(*args)``.
Offload = Callable[..., Awaitable[Any]]


async def run_inline(fn: Callable[..., Any], *args: Any) -> Any:
    """An ``Offload`` for a deterministic world (the simulator): on the event loop."""
    await trio.lowlevel.checkpoint()
    return fn(*args)


class Staging:
    """The staged changes of this node's cluster state, and their commit."""

    def __init__(self, cluster: Cluster, offload: Offload = trio.to_thread.run_sync) -> None:
        self.cluster = cluster
        self.offload = offload

    async def join_at(self, seed: str) -> dict:
        """Run on the joining node: ask the cluster at ``seed`` to stage our join (Rule 1)."""
        cluster = self.cluster
        config = cluster.config
        if cluster.holds_data():
            raise BadRequest("this node holds data; only an empty node can join a cluster")
        if cluster.state.status(cluster.me) is not None and len(cluster.state.members) > 1:
            raise BadRequest("this node is already a member of a cluster")
        try:
            parse_address(seed, to_dial=True)
        except ValueError as exc:
            raise BadRequest(f"seed {seed!r} is not a peer address HOST:PORT: {exc}") from None
        if seed == config.peer_listen:
            raise BadRequest(f"seed {seed} is this node's own peer address: SEED is the peer "
                             "address of a member of the cluster to join")
        try:
            # Bounded: a wrong SEED (a closed port, a client or metrics port) must get an
            # answer naming it, not a request that waits forever.
            with trio.fail_after(config.request_timeout):
                reply = await RemoteNode(seed, cluster.peers).stage_join(
                    cluster.me, config.listen, config.peer_listen)
        except BadRequest as exc:
            raise BadRequest(f"seed {seed} refused the join: {exc}") from None
        except Unauthorized:
            raise  # the secrets differ: exit 4 with the reason, not "did not answer"
        except (KvdError, OSError, trio.TooSlowError) as exc:
            reason = str(exc) or "no answer"
            # Not only a wrong port: a member that is down or paused is silent too.
            raise Unavailable(f"seed {seed} did not answer ({reason}): SEED must be the peer "
                              "address (peer_listen HOST:PORT) of a cluster member that is "
                              "running") from None
        try:
            state = cs.ClusterState.from_dict(reply["state"])
        except (KeyError, ValueError) as exc:
            raise BadRequest(f"seed {seed} answered with a malformed cluster state: {exc}") from None
        cluster.members.merge(reply.get("members", []), cluster.now())
        cluster.gossiper.replace_state(state)  # our own one-node cluster held no data
        return {"staged": f"join {cluster.me}", "cluster": cluster.state.cluster_id}

    async def stage(self, change: cs.Change) -> cs.ClusterState:
        """Stage ``change`` (cluster_state Rule 2 refuses what cannot be staged; Rule 5)."""
        cluster = self.cluster
        state = cs.stage(cluster.state, change, cluster.config.n)
        if change.kind in ("leave", "replace") and not cluster.is_up(change.node):
            raise BadRequest(
                f"{change.node} is down: a {change.kind} needs it up to hand its data off "
                f"(it would wait for it forever); start it and stage the {change.kind} "
                f"again, or drop it with `kvctl cluster force-remove {change.node}`, which "
                "rebuilds its replicas from the others")
        await cluster.set_state(state)
        return state

    async def plan(self) -> tuple[cs.ClusterState, Ring, list[Move]]:
        """The state planned from, the ring its staged changes would make, and the moves."""
        state = self.cluster.state
        ring, moves = await self.offload(cs.plan, state, self.cluster.config.n)
        return state, ring, moves

    async def commit(self) -> tuple[cs.ClusterState, cs.ClusterState]:
        """Commit what is staged in the current state (Rules 3 and 4); returns the state
        the commit was computed from (its staged set is what was committed) and the
        committed state."""
        cluster = self.cluster
        first_ring = cluster.state.ring
        for _attempt in range(COMPUTE_ATTEMPTS):
            silent = await self._members_hold_my_state()
            if silent:
                raise Unavailable(
                    f"not committed: {', '.join(silent)} did not confirm holding this node's "
                    "cluster state (a commit is made on the state every member up holds); "
                    "commit again once they answer")
            base = cluster.state
            try:
                state = await self.offload(cs.commit, base, cluster.config.n)
            except BadRequest:
                if base.ring == first_ring:
                    raise
                raise BadRequest(
                    f"nothing left to commit: a commit made meanwhile on another node (ring "
                    f"version {base.ring.version}) replaced this node's state; kvctl status "
                    "shows what it committed: stage again what it lacks") from None
            if cluster.state.digest() == base.digest():
                await cluster.set_state(state)  # Rule 4: publishes before it waits
                return base, state
        raise Unavailable("not committed: the cluster state changed while each of "
                          f"{COMPUTE_ATTEMPTS} rings was computed; commit again")

    async def _members_hold_my_state(self) -> list[str]:
        """Rule 4: push-pull with every member up that has not told us it holds our state
        (a node staged for force-remove aside: it is dead, though not yet seen down);
        returns those that still have not after ``request_timeout``."""
        cluster = self.cluster

        def waiting() -> list[str]:
            removed = {c.node for c in cluster.state.staged if c.kind == "force-remove"}
            return [n for n in cluster.members_without_my_state() if n not in removed]

        silent = waiting()
        with trio.move_on_after(cluster.config.request_timeout):
            while silent:
                for node in silent:
                    # One gossip interval each, as a gossip round's: a silent member must
                    # not keep the others from being asked.
                    with trio.move_on_after(cluster.config.gossip_interval):
                        try:
                            await cluster.gossiper.exchange(cluster.peer_address(node))
                        except EXCHANGE_ERRORS:
                            pass  # asked again on the next pass, until the deadline
                silent = waiting()
                if silent:
                    await trio.sleep(cluster.config.gossip_interval / 4)
        return silent

    async def abort(self) -> cs.ClusterState:
        """End the transition that cannot finish (cluster_state Rule 3)."""
        state = cs.abort(self.cluster.state)
        await self.cluster.set_state(state)
        return state

    async def clear(self) -> cs.ClusterState:
        """Discard everything staged."""
        state = cs.clear(self.cluster.state)
        await self.cluster.set_state(state)
        return state
