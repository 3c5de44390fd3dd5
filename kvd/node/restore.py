"""Restore of a wiped node: it must never answer for data it lost (docs/DECISIONS.md).

A node that starts with an empty data directory but is listed as a member by the cluster it
reaches (through its seeds, or when a member gossips to it) was wiped.

1. Until it knows whether it lost its data (``settled``: a seed answered, or none did within
   ``SEED_WAIT``), it answers neither clients nor replica reads.
2. A wiped node adopts the cluster's state and refuses replica reads while ``restoring``
   (coordinators then count it as down); the transfer task fetches every partition it
   replicates, and calls ``finish`` once its plan is done. Only then does it serve.
3. The restoring mark is saved, so a restart mid-restore carries on.
4. A node that holds data of its own cluster is never taken for a wiped one: that is an
   operator mistake, not a wipe.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import trio

from kvd.errors import KvdError
from kvd.membership import cluster_state as cs
from kvd.proto.messages import MsgType
from kvd.storage import keys

if TYPE_CHECKING:
    from kvd.node.cluster import Cluster

log = logging.getLogger("kvd.cluster")

SEED_WAIT = 30  # seconds a node with a new data directory waits for a seed to answer


class Restore:
    """Whether this node holds its data, and the restore of a wiped one."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.fresh = False  # a new data directory: maybe a wiped member
        self.restoring = False
        # Set once we know whether this node lost its data (Rule 1).
        self.settled = trio.Event()

    def load(self, fresh: bool) -> None:
        """At start: read the restoring mark (Rule 3); settle at once unless a new data
        directory has seeds to ask."""
        cluster = self.cluster
        self.fresh = fresh
        self.restoring = cluster.storage.get(keys.meta_key("restoring")) is not None
        config = cluster.config
        if not (fresh and [s for s in config.seeds if s != config.peer_listen]):
            self.settled.set()

    @property
    def has_its_data(self) -> bool:
        """False while this node may have lost its data (checking seeds, or restoring)."""
        return self.settled.is_set() and not self.restoring

    async def maybe_restore(self, fields: dict) -> None:
        """Called with a peer's gossip or state reply; restores when it names us."""
        cluster = self.cluster
        if not self.fresh or "state" not in fields:
            return
        try:
            theirs = cs.ClusterState.from_dict(fields["state"])
        except ValueError:
            return
        if theirs.cluster_id == cluster.state.cluster_id or theirs.status(cluster.me) is None:
            return
        if cluster.holds_data():
            return  # Rule 4
        log.warning("this node's data directory is empty but cluster %s lists it as a member: "
                    "restoring its replicas from the other nodes before serving", theirs.cluster_id)
        self.fresh = False
        self.restoring = True
        await cluster.storage.write([(keys.meta_key("restoring"), b"1")])
        cluster.members.merge(fields.get("members", []), cluster.now())
        cluster.gossiper.replace_state(theirs)

    async def ask_seeds(self) -> None:
        """At start with a new data directory: ask the seeds whether we are a member.

        Until one answers (or SEED_WAIT passes with none reachable) the node serves nothing,
        so a wiped member never answers "not found" for data it lost."""
        config = self.cluster.config
        seeds = [s for s in config.seeds if s != config.peer_listen]
        reported: set[str] = set()
        with trio.move_on_after(SEED_WAIT):
            while seeds and not self.settled.is_set():
                for seed in seeds:
                    try:
                        with trio.fail_after(3):
                            reply = await self.cluster.peers.call(
                                seed, MsgType.ADMIN, {"op": "state"}, MsgType.ADMIN_REPLY)
                    except (KvdError, trio.TooSlowError, OSError) as exc:
                        if seed not in reported:  # once per seed, not once per retry
                            reported.add(seed)
                            log.info("seed %s: %s", seed, exc)
                        continue
                    await self.maybe_restore(reply)
                    self.settled.set()
                    break
                else:
                    await trio.sleep(1.0)
        if not self.settled.is_set():
            log.warning("no seed answered within %d s: starting as a new node", SEED_WAIT)
            self.settled.set()

    async def finish(self) -> None:
        """Every partition this node replicates is fetched: serve again (Rule 2)."""
        self.restoring = False
        await self.cluster.storage.write([(keys.meta_key("restoring"), None)])
        log.info("restore complete: serving as a replica again")
