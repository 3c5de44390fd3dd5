"""A node with a new data directory: restored if it was a wiped member, else a newcomer
that waits to be joined; either way it never answers for data it does not hold
(docs/DECISIONS.md).

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
5. A node started with seeds (other than itself) and a new data directory that is no
   member of their cluster never becomes a cluster of its own: it is ``awaiting_join``,
   answers no client reads or writes, and says so, while its cluster state names no other
   node or does not name it (a join staged, then cleared). A staged join (`kvctl cluster
   join` on it, or another node joining at it) lets it serve; the wait ends for good when
   a commit makes it a member. The mark is saved, so a restart keeps waiting; a restart
   without seeds founds a new cluster.
6. A node restored from a backup (`kvd restore`, kvd.backup Rule 3) restores as a wiped
   member does (Rule 2), fetching every partition it replicates: the backup lacks what was
   written since.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import trio

from kvd.backup import RESTORED_MARK
from kvd.errors import KvdError
from kvd.membership import cluster_state as cs
from kvd.node.remote import RemoteNode
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
        self.awaiting = False  # Rule 5: in no cluster yet, waiting for a join
        # Set once we know whether this node lost its data (Rule 1).
        self.settled = trio.Event()

    async def load(self, fresh: bool) -> None:
        """At start: read the restoring and awaiting-join marks (Rules 3 and 5); settle at
        once unless a new data directory has seeds to ask."""
        cluster = self.cluster
        storage = cluster.storage
        self.restoring = storage.get(keys.meta_key("restoring")) is not None
        self.awaiting = storage.get(keys.meta_key("awaiting-join")) is not None
        if storage.get(RESTORED_MARK) is not None:
            await self._from_backup()
        seeded = bool(self._seeds())
        if fresh and seeded:
            self.awaiting = True
            await storage.write([(keys.meta_key("awaiting-join"), b"1")])
        elif self.awaiting and not seeded:
            self.awaiting = False
            await storage.write([(keys.meta_key("awaiting-join"), None)])
            log.warning("started without seeds: founding a new cluster %s",
                        cluster.state.cluster_id)
        self.fresh = fresh or self.awaiting  # a waiting node holds nothing: maybe wiped too
        if not (self.fresh and seeded):
            self.settled.set()
        if self.awaiting:
            self._say_waiting()

    async def _from_backup(self) -> None:
        """First start after `kvd restore` (kvd.backup Rule 3): restore like a wiped node,
        fetching every partition this node replicates, since the backup misses what was
        written after it was taken."""
        cluster = self.cluster
        self.restoring = True
        await cluster.transfers.refetch_all()
        await cluster.storage.write([(keys.meta_key("restoring"), b"1"), (RESTORED_MARK, None)])
        log.warning("restored from a backup: fetching every partition this node replicates "
                    "from the other replicas before serving")

    def _seeds(self) -> list[str]:
        config = self.cluster.config
        return [s for s in config.seeds if s != config.peer_listen]

    def _say_waiting(self) -> None:
        config = self.cluster.config
        log.warning("this node is in no cluster yet and serves no data: it waits for "
                    "`kvctl --host %s cluster join SEED` (SEED: a member's peer address, "
                    "such as %s); to found a new cluster instead, start it without seeds",
                    config.listen, self._seeds()[0] if self._seeds() else "HOST:PORT")

    @property
    def awaiting_join(self) -> bool:
        """Rule 5: started with seeds, new, and in no cluster with another node yet."""
        state = self.cluster.state
        return self.awaiting and (len(state.members) <= 1
                                  or state.status(self.cluster.me) is None)

    async def note_state(self) -> None:
        """Called as cluster states arrive: the commit of its join ends the wait."""
        state = self.cluster.state
        if self.awaiting and len(state.members) > 1 and state.status(self.cluster.me) == "valid":
            self.awaiting = False
            await self.cluster.storage.write([(keys.meta_key("awaiting-join"), None)])
            log.info("joined cluster %s", self.cluster.state.cluster_id)

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
                            reply = await RemoteNode(seed, self.cluster.peers).cluster_state()
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
            log.warning("no seed answered within %d s", SEED_WAIT)
            self.settled.set()
            self._say_waiting()

    async def finish(self) -> None:
        """Every partition this node replicates is fetched: serve again (Rule 2)."""
        self.restoring = False
        await self.cluster.storage.write([(keys.meta_key("restoring"), None)])
        log.info("restore complete: serving as a replica again")
