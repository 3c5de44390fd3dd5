"""This node's view of the cluster: the gossiped state, who is up, where each peer listens.

``Cluster`` owns that view, saves it, and wires the rooms that act on it; each room has its
own module and public surface, and reaches the others only through ``Cluster``:

    routing    kvd.node.routing    which replicas a read or a write goes to
    staging    kvd.node.staging    join, leave, replace, force-remove, plan, commit, abort
    transfers  kvd.node.transfers  fetching newly replicated partitions, dropping stale ones
    restore    kvd.node.restore    a wiped node getting its data back before it serves
    handoff    kvd.node.handoff    hints for down replicas

1. The decisions are the pure cores' (kvd.ring, kvd.membership); this module and its rooms
   feed them live inputs (time, the peer connections, storage) and carry out what they return.
2. Every state gossip brings is saved after the fetch plan for it is worked out (in that
   order, so a crash between the two is seen again as a ring change at restart).
3. Gossip: every ``gossip_interval`` push-pull with one peer (members table + cluster state),
   run by kvd.node.gossip.
4. A leaving node stops (``left``; the daemon exits) only once no serving ring names it
   and every member up has told gossip it holds that state (at most
   ``LEAVE_LINGER_ROUNDS`` rounds): until then a member that has not heard the transition
   ended still sends it reads, as its serving (prior) ring tells it to. Meanwhile it takes
   no cluster change (``has_left``): one it committed might never spread. A member that a
   commit drops from the members while it runs (a force-remove while it was cut off, an
   abort of its join) stops the same way once it hears so: it belongs to no cluster any
   more, and coordinating for one it is no member of helps nobody (Riak's removed node
   shuts down too).
"""

from __future__ import annotations

import logging
import os
import random

import msgpack
import trio

from kvd.client import Dial
from kvd.clocks import REAL, Clocks
from kvd.membership import cluster_state as cs
from kvd.membership.members import MemberInfo, MemberTable
from kvd.net.peer import PeerPool
from kvd.node.blob_linger import delete_when_due
from kvd.node.data_dir import damaged_record
from kvd.node.gossip import Gossiper
from kvd.node.handoff import Handoff
from kvd.node.local import LocalStore
from kvd.node.remote import RemoteReplica
from kvd.node.replica import LocalReplica, Replica
from kvd.node.restore import Restore
from kvd.node.routing import Routing
from kvd.node.staging import Offload, Staging
from kvd.node.transfers import Transfers
from kvd.ring import Ring
from kvd.storage import keys

log = logging.getLogger("kvd.cluster")

# Rule 4: how many gossip rounds a handed-off node waits at most for every member up to hold
# its final state; a member that never answers must not keep it forever.
LEAVE_LINGER_ROUNDS = 30


class Cluster:
    """The cluster as this node sees it, and the rooms that act on it."""

    def __init__(self, config, identity, storage, store: LocalStore, local: LocalReplica,
                 nursery: trio.Nursery, *, clocks: Clocks = REAL, dial: Dial | None = None,
                 rng: random.Random | None = None, offload: Offload = trio.to_thread.run_sync):
        self.config = config
        self.clocks = clocks
        self.me = identity.node
        self.storage = storage
        self.store = store
        self.local = local
        self.nursery = nursery
        self.peers = PeerPool(nursery, {"node": self.me}, dial=dial,
                              unacknowledged_limit=config.request_timeout)
        self.peers.frame_budget = config.max_frame // 2  # object bytes per request (remote.py)
        self.rng = rng or random.Random()
        self.gossiper: Gossiper  # made by load(), from the saved state
        self.left = trio.Event()  # set once this node has left the cluster (Rule 4)
        # (cluster id, status) when this node was last a committed member (Rule 4)
        self._membership: tuple[str, str] | None = None
        me = MemberInfo(self.me, config.listen, config.peer_listen, int(clocks.wall() * 1000), 0)
        self.members = MemberTable(me, threshold=config.phi_threshold)
        self.addresses: dict[str, tuple[str, str]] = {}
        self.routing = Routing(self)
        self.staging = Staging(self, offload)
        self.transfers = Transfers(self)
        self.restore = Restore(self)
        self.handoff = Handoff(self)

    # ------------------------------------------------------------- the state (Rule 2)

    async def load(self) -> None:
        """Read the saved state (or make a new one-node cluster) and each room's own."""
        raw = self.storage.get(keys.meta_key("cluster"))
        fresh = raw is None  # a new data directory: maybe a wiped member (kvd.node.restore)
        if fresh:
            state = cs.new_cluster(self.me, self.config.ring_size, os.urandom(8).hex())
            await self._save(state)
        else:
            with damaged_record("cluster"):
                saved = msgpack.unpackb(raw, raw=False)
                state = cs.ClusterState.from_dict(saved["state"])
                self.addresses = {n: tuple(a) for n, a in saved.get("addresses", {}).items()}
            for node, (address, peer_address) in self.addresses.items():
                if node != self.me:
                    self.members.merge([MemberInfo(node, address, peer_address, 0, 0)], self.now())
        self.addresses[self.me] = (self.config.listen, self.config.peer_listen)
        await self.handoff.load()
        self.gossiper = Gossiper(
            self.members, self.peers.call, state=state, seeds=self.config.seeds,
            interval=self.config.gossip_interval, rng=self.rng,
            load_bytes=lambda: self.storage.approximate_size() + self.store.blobs.approximate_size(),
            restoring=lambda: self.restore.restoring, clock=self.clocks.monotonic)
        self._saved = state.digest()
        self.transfers.load(state)
        await self.restore.load(fresh)

    @property
    def state(self) -> cs.ClusterState:
        state = self.gossiper.state
        assert state is not None  # load() gives the gossiper one
        return state

    async def _save(self, state) -> None:
        doc = {"state": state.to_dict(), "addresses": {n: list(a) for n, a in self.addresses.items()}}
        await self.storage.write([(keys.meta_key("cluster"), msgpack.packb(doc, use_bin_type=True))])

    async def set_state(self, state: cs.ClusterState) -> None:
        """Publish a state derived from ours (staging, commit, transfer done); persist_loop
        works out the fetch plan for it, then saves it (Rule 2)."""
        self.gossiper.publish(state)
        await trio.lowlevel.checkpoint()

    async def _persist(self) -> None:
        state = self.state
        if state.digest() == self._saved:
            return
        for rec in self.members.all():
            self.addresses[rec.node] = (rec.address, rec.peer_address)
        await self._save(state)
        self._saved = state.digest()

    def members_without_my_state(self) -> list[str]:
        """Members up that have not told gossip they hold this node's current state."""
        return self.gossiper.without_my_state(n for n in self.state.members if self.is_up(n))

    def has_left(self) -> bool:
        """Whether this node has left the cluster, or has handed off and only waits for the
        members to hear so (Rule 4): either way it takes no cluster change any more."""
        return self.left.is_set() or self._handed_off(self.state)

    def _handed_off(self, state: cs.ClusterState) -> bool:
        """Rule 4: this node is exiting, or was a member of this cluster and a commit has
        dropped it from the members since (after its leave, or by a force-remove), and no
        ring that serves reads names it any more."""
        status = state.status(self.me)
        if status in ("valid", "leaving", "exiting"):
            self._membership = (state.cluster_id, status)
        dropped = (status is None and self._membership is not None
                   and self._membership[0] == state.cluster_id)
        return (status == "exiting" or dropped) and self.me not in cs.serving_ring(state).nodes()

    async def leave_when_handed_off(self) -> None:
        """Rule 4: set ``left`` (the daemon exits) once this node is handed off and every
        member up has told gossip it holds that state, so none still routes a read here."""
        linger = LEAVE_LINGER_ROUNDS * self.config.gossip_interval
        while True:
            await self.gossiper.wait_state(self._handed_off)
            give_up = self.now() + linger
            waiting = self.members_without_my_state()
            while waiting and self.now() < give_up and self._handed_off(self.state):
                await trio.sleep(self.config.gossip_interval / 2)
                waiting = self.members_without_my_state()
            if self._handed_off(self.state):
                break  # else it was asked to join again while it waited
        if waiting:
            log.warning("leaving without word from %s, which may still route reads here for "
                        "a gossip round or two", ", ".join(waiting))
        state = self.state
        if self._membership is not None and self._membership[1] == "valid":
            log.warning("this node was removed from cluster %s by a commit made elsewhere "
                        "(a force-remove, or an abort of its join): it serves nothing and "
                        "stops. To make it a member again, wipe its data_dir (%s) and run "
                        "`kvctl --host %s cluster join SEED` on it",
                        state.cluster_id, self.config.data_dir, self.config.listen)
        else:
            log.warning("this node has left cluster %s and handed off its data: it serves "
                        "nothing and stops. To make it a member again, first drop it from the "
                        "member list (on a member: `kvctl cluster force-remove %s` and `kvctl "
                        "cluster commit`, unless another commit has dropped it already), then "
                        "wipe its data_dir (%s) and run `kvctl --host %s cluster join SEED` on it",
                        state.cluster_id, self.me, self.config.data_dir, self.config.listen)
        self.left.set()

    async def persist_loop(self) -> None:
        """Save every state gossip brings, so a restarted node knows its ring and peers.

        Each change is planned from the state the last round handled, not from the state
        when this round began: one that arrived while the last round was saving would
        otherwise be compared with itself, and a ring it brings never planned (tests/
        test_topology_sim.py, a commit that arrives while the join is saved)."""
        before = self.state
        while True:
            await self.gossiper.wait_state(lambda s: s is not before)
            after = self.state
            await self.transfers.plan_fetches(before, after)
            await self.restore.note_state()
            if before.ring.version != after.ring.version:
                log.info("ring version %d: %d nodes", after.ring.version,
                         len(after.ring.nodes()))
            await self._persist()
            before = after

    async def wait_state_change(self) -> None:
        """Wait until the cluster state is another one than now."""
        before = self.state
        await self.gossiper.wait_state(lambda s: s is not before)

    def holds_data(self) -> bool:
        """Whether any object is stored here (only an empty node joins, or is taken for wiped)."""
        return any(True for _ in self.storage.iterate_keys(b"o", b"p"))

    # ------------------------------------------------------------- members and peers

    def now(self) -> float:
        return self.clocks.monotonic()

    def is_up(self, node: str) -> bool:
        return self.members.is_up(node, self.now())

    def replication(self, ring: Ring) -> int:
        """Replicas of each partition on ``ring`` with this node's ``n``."""
        return cs.replication(ring, self.config.n)

    def peer_address(self, node: str) -> str:
        record = self.members.get(node)
        if record is not None:
            return record.peer_address
        return self.addresses.get(node, ("", ""))[1]

    def replica(self, node: str) -> Replica:
        """``node`` as a replica: this node's local one, or a remote one."""
        if node == self.me:
            return self.local
        return RemoteReplica(node, self.peer_address(node), self.peers)

    def add_member(self, node: str, address: str, peer_address: str) -> None:
        """Learn where a node that asks to join listens, before its join is staged."""
        self.addresses[node] = (address, peer_address)
        self.members.merge([MemberInfo(node, address, peer_address, 0, 0)], self.now())

    # ------------------------------------------------------------- gossip (Rule 3)

    def gossip_reply(self, fields: dict) -> dict:
        """Answer a GOSSIP (push-pull) through the gossiper."""
        return self.gossiper.handle_gossip(fields, self.now())

    def full_gossip(self) -> dict:
        """Members and the whole state: what a node that joins needs first."""
        return {"members": self.members.digest(self.now()), "state": self.state.to_dict()}

    async def run(self) -> None:
        """The node's cluster tasks: gossip, saving, handoff, transfers, reclaim, and the
        deletion of superseded blobs once their readers are done."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.gossiper.run)
            if self.restore.fresh:
                nursery.start_soon(self.restore.ask_seeds)
            nursery.start_soon(self.persist_loop)
            nursery.start_soon(self.leave_when_handed_off)
            nursery.start_soon(self.handoff.run)
            nursery.start_soon(self.transfers.run)
            nursery.start_soon(self.transfers.reclaim_loop)
            nursery.start_soon(delete_when_due, self.store)  # LocalStore Rule 8
