"""Routing: which replicas a request goes to (riak_core's apl), from the live cluster view.

The rules are the pure core's; this module feeds them who is up and hands back replicas.

1. Reads go to the key's primaries on the *serving* ring (``cluster_state.serving_ring``:
   during a transition the prior ring, whose replicas hold every key, until every new
   replica holds its data: cluster_state Rule 3), and only to those that are up and hold
   their data.
2. Writes go to the same primaries, each down primary replaced by a fallback that keeps a
   durable hint (``annotated_preference_list``), and also to the new ring's replicas during
   a transition. Only primaries mint versions: a fallback knows nothing of the key's
   history, so it could reuse a dot (``LocalHintStore`` and ``HintedReplica`` never mint).
3. A coordinator may name nodes that failed its request: they count as down for it (its
   local failure view), so fallbacks stand in for them.
4. A down primary with no fallback to stand in for it gets a hint kept by the coordinator
   itself (as Cassandra does); such a hint never counts towards W.
5. During a transition a write needs W of the key's replicas on the serving ring and W on
   the new ring (``write_quorum``; kvd.node.replication.WriteQuorum says why).
"""

from __future__ import annotations

from collections.abc import Collection
from typing import TYPE_CHECKING

from kvd import versions
from kvd.errors import Unavailable
from kvd.membership import cluster_state as cs
from kvd.node.remote import HintedReplica
from kvd.node.replica import LocalReplica, Replica, Role
from kvd.node.replication import WriteQuorum
from kvd.ring import Ring, annotated_preference_list, partition_of, preference_list

if TYPE_CHECKING:
    from kvd.node.cluster import Cluster
    from kvd.node.handoff import Handoff
    from kvd.node.local import LocalStore


class LocalHintStore(LocalReplica):
    """This node as a fallback: hints for a down primary, kept durably in storage.

    A whole replica as the coordinator sees it (kvd.node.replica.Replica): a large value's
    chunks are stored here like any upload (LocalReplica's chunk calls) and kept with the
    hint that names them, and are sent before the manifest when the hint is delivered. It
    never mints and holds nothing to read.
    """

    stands_for: str

    def __init__(self, node: str, handoff: Handoff, store: LocalStore, stands_for: str,
                 role: Role = Role.FALLBACK):
        super().__init__(node, "", store)  # no actor: it never mints
        self.handoff = handoff
        self.stands_for = stands_for
        self.role = role  # HINT when kept by the coordinator: it never counts towards W

    async def get(self, key: bytes) -> versions.VersionedObject | None:
        return None

    async def digest(self, key: bytes) -> bytes | None:
        return None

    async def coordinate(self, key: bytes, context: versions.VersionVector,
                         payload: dict) -> versions.VersionedObject:
        raise Unavailable(f"{self.node} only keeps hints for {self.stands_for}: it does not mint")

    async def merge(self, key: bytes, obj: versions.VersionedObject) -> None:
        await self.handoff.store(self.stands_for, key, obj)


class Routing:
    """Preference lists on the serving ring, and the replicas of a read or a write."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self._serving: tuple[str, Ring] | None = None
        self._pl_cache: dict[tuple[int, int], list[str]] = {}
        self._pl_cache_version = ""

    def serving_ring(self) -> Ring:
        """The ring with each moving partition still owned by its source (Rule 1)."""
        state = self.cluster.state
        # Keyed on the digest: merged states can differ at the same version.
        if self._serving is None or self._serving[0] != state.digest():
            self._serving = (state.digest(), cs.serving_ring(state))
        return self._serving[1]

    def primaries(self, partition: int, n: int) -> list[str]:
        """The preference list on the serving ring, cached per state version (the walk
        over the ring is the most expensive step of routing a request)."""
        version = self.cluster.state.digest()
        if self._pl_cache_version != version:
            self._pl_cache.clear()
            self._pl_cache_version = version
        found = self._pl_cache.get((partition, n))
        if found is None:
            found = self._pl_cache[(partition, n)] = preference_list(self.serving_ring(), partition, n)
        return found

    def member_count(self) -> int:
        """Distinct replicas a key can have now: during a transition the serving (prior)
        ring may have fewer nodes (a one-node cluster growing), and R/W clamp to it."""
        return max(1, min(len(self.cluster.state.ring.nodes()), len(self.serving_ring().nodes())))

    def replicas_for_read(self, key: bytes, n: int) -> list[Replica]:
        """The up primaries of ``key`` (Rule 1); this node only once it holds its data."""
        cluster = self.cluster
        partition = partition_of(key, cluster.state.ring.q)
        return [cluster.replica(node) for node in self.primaries(partition, n)
                if cluster.is_up(node) and not (node == cluster.me and not cluster.restore.has_its_data)]

    def replicas_for_write(self, key: bytes, n: int,
                           failed: Collection[str] = ()) -> list[Replica]:
        """Replicas for a write; nodes in ``failed`` (those that did not answer this request:
        the coordinator's local failure view) are treated as down, so fallbacks stand in."""
        cluster = self.cluster
        state = cluster.state
        partition = partition_of(key, state.ring.q)
        primaries = self.primaries(partition, n)
        hinted_handoff = cluster.config.hinted_handoff

        def is_up(node: str) -> bool:
            return node not in failed and cluster.is_up(node)

        if all(is_up(node) for node in primaries) and not state.in_transition:
            return [cluster.replica(node) for node in primaries]  # the common case
        out: list[Replica] = []
        for node, _, stands_for in annotated_preference_list(
                self.serving_ring(), partition, n, is_up):
            if stands_for is None:  # an up primary (only a fallback stands for another)
                out.append(cluster.replica(node))
            elif not hinted_handoff:
                continue
            elif node == cluster.me:
                out.append(LocalHintStore(node, cluster.handoff, cluster.store, stands_for))
            else:
                out.append(HintedReplica(node, cluster.peer_address(node), cluster.peers, stands_for))
        if hinted_handoff:  # Rule 4
            covered = {r.stands_for for r in out if r.stands_for is not None}
            for node in primaries:
                if node not in covered and not is_up(node):
                    out.append(LocalHintStore(cluster.me, cluster.handoff, cluster.store, node,
                                              role=Role.HINT))
        if state.in_transition:
            named = {r.node for r in out}
            new = state.ring
            for node in preference_list(new, partition, cluster.replication(new)):
                if node not in named and is_up(node):
                    out.append(cluster.replica(node))  # a new replica, fetching the partition
        return out

    def write_quorum(self, key: bytes, n: int, w: int) -> WriteQuorum:
        """Which replicas must hold a write of ``key`` before it is acknowledged (Rule 5)."""
        state = self.cluster.state
        if not state.in_transition:
            return WriteQuorum(w)
        partition = partition_of(key, state.ring.q)
        new = preference_list(state.ring, partition, cs.replication(state.ring, n))
        return WriteQuorum(w, (frozenset(self.primaries(partition, n)), frozenset(new)))

    def replica_roles(self, key: bytes, n: int) -> list[tuple[str, Role]]:
        """(node, role) for inspect: every primary, down or not."""
        partition = partition_of(key, self.cluster.state.ring.q)
        return [(node, Role.PRIMARY) for node in self.primaries(partition, n)]
