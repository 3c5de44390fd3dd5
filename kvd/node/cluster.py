"""This node's place in the cluster: state, routing, gossip, hinted handoff and transfers.

The decisions are made by the pure cores (kvd.ring, kvd.membership); this module feeds them
live inputs (time, the peer connections, storage) and carries out what they return.

- Routing. Reads go to the key's primaries on the *serving* ring (during a transition the
  prior ring, whose replicas hold every key, until every new replica holds its data:
  cluster_state Rule 3). Writes go to the same primaries, each down primary replaced by a
  fallback that keeps a durable hint, and also to the new ring's replicas during a
  transition. Only primaries mint versions (a fallback knows nothing of the key's history,
  so it could reuse a dot). A coordinator may name nodes that failed its request: they
  count as down for it (its local failure view).
- Gossip: every ``gossip_interval`` push-pull with one peer (members table + cluster state).
- Handoff (kvd.node.handoff): hints are delivered to their node once the failure detector
  sees it up, and dropped once older than ``hint_window`` (anti-entropy covers what they
  miss). Hints keep the bytes of large values uploaded to this node until delivered.
- Transfers: a node that becomes a replica of a partition fetches it from every old replica
  (pull, batched in bytes, throttled), then publishes ``node_done`` once its plan is empty.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Collection

import msgpack
import trio

from kvd import versions
from kvd.client import Dial
from kvd.clocks import REAL, Clocks
from kvd.errors import BadRequest, KvdError, Unauthorized, Unavailable, unwrap_single_error
from kvd.membership import cluster_state as cs
from kvd.membership.members import MemberInfo, MemberTable
from kvd.net.peer import PeerPool
from kvd.node.gossip import Gossiper
from kvd.node.handoff import Handoff
from kvd.node.local import LocalStore
from kvd.node.remote import HintedReplica, RemoteReplica
from kvd.node.replica import LocalReplica
from kvd.proto.messages import MsgType
from kvd.ring import Ring, annotated_preference_list, partition_of, preference_list
from kvd.storage import keys

log = logging.getLogger("kvd.cluster")

MIB = 1 << 20
SEED_WAIT = 30  # seconds a node with a new data directory waits for a seed to answer
# Seconds between the end of a transition (as this node sees it) and dropping the
# partitions it no longer replicates: coordinators that have not heard yet still read
# from the prior ring. Gossip reaches 64 nodes in 15 s (tests/test_gossip_sim.py).
DROP_DELAY = 60.0
TRANSFER_BATCH = 256  # most objects per scan reply when fetching a partition


def scan_budget(max_frame: int) -> int:
    """Most bytes of objects in one scan reply: half a frame leaves room for keys and framing."""
    return max_frame // 2


def _pack(obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def _unpack(data: bytes):
    return msgpack.unpackb(data, raw=False)


class LocalHintStore:
    """This node as a fallback: hints for a down primary, kept durably in storage.

    A whole replica as the coordinator sees it (kvd.node.replica.Replica): a large value's
    chunks are stored here like any upload and kept with the hint that names them, and are
    sent before the manifest when the hint is delivered. It never mints.
    """

    def __init__(self, node: str, cluster: "Cluster", stands_for: str, role: str = "fallback"):
        self.node = node
        self.cluster = cluster
        self.stands_for = stands_for
        self.role = role  # "hint" when kept by the coordinator: it never counts towards W

    async def get(self, key):
        return None

    async def coordinate(self, key, context, payload):
        raise Unavailable(f"{self.node} only keeps hints for {self.stands_for}: it does not mint")

    async def merge(self, key, obj):
        await self.cluster.store_hint(self.stands_for, key, obj)

    async def write_chunk(self, key, vid, offset, data):
        await self.cluster.store.write_chunk(key, vid, offset, data)

    def read_chunks(self, key, ref):
        return self.cluster.store.read_chunks(key, ref)

    async def discard_upload(self, key, vid):
        await self.cluster.store.discard_upload(key, vid)


class Cluster:
    def __init__(self, config, identity, storage, store: LocalStore, local: LocalReplica,
                 nursery: trio.Nursery, *, clocks: Clocks = REAL, dial: Dial | None = None,
                 rng: random.Random | None = None):
        self.config = config
        self.clocks = clocks
        self.me = identity.node
        self.storage = storage
        self.store = store
        self.local = local
        self.nursery = nursery
        self.peers = PeerPool(nursery, {"node": self.me}, dial=dial)
        self.peers.frame_budget = config.max_frame // 2  # object bytes per request (remote.py)
        self.rng = rng or random.Random()
        self.gossiper: Gossiper | None = None
        self.fresh = False
        self.restoring = False
        # Set once we know whether this node lost its data (see maybe_restore); until then
        # it answers neither clients nor replica reads.
        self.settled = trio.Event()
        self.left = trio.Event()  # set once this node is exiting and nothing moves from it
        self._serving: tuple[int, Ring] | None = None
        self._pl_cache: dict[tuple[int, int], list[str]] = {}
        self._pl_cache_version = ""
        me = MemberInfo(self.me, config.listen, config.peer_listen, int(clocks.wall() * 1000), 0)
        self.members = MemberTable(me, threshold=config.phi_threshold)
        self.addresses: dict[str, tuple[str, str]] = {}
        self.handoff = Handoff(self)
        self.transfer_progress: dict = {"keys_done": 0, "bytes_done": 0, "state": "idle"}
        self._plan: dict | None = None  # {"old": Ring | None, "todo": set of partitions}
        self._planned: tuple[str, int] | None = None  # the ring the plan was made for
        self._throttle_at = 0.0  # when the transfer throttle's reserved bytes are paid off
        self._dropped_for: tuple[str, int] | None = None  # the ring stale partitions were dropped for
        self._settled_since: tuple[tuple[str, int], float] | None = None  # (ring, when it settled)

    # ------------------------------------------------------------- state

    async def load(self) -> None:
        raw = self.storage.get(keys.meta_key("cluster"))
        self.restoring = self.storage.get(keys.meta_key("restoring")) is not None
        if raw is None:
            self.fresh = True  # a new data directory: maybe a wiped member (see maybe_restore)
            state = cs.new_cluster(self.me, self.config.ring_size, os.urandom(8).hex())
            await self._save(state)
        else:
            saved = _unpack(raw)
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
            clock=self.clocks.monotonic)
        self._saved = state.digest()
        self._load_plan()
        self._planned = (state.cluster_id, state.ring.version)
        if not (self.fresh and [s for s in self.config.seeds if s != self.config.peer_listen]):
            self.settled.set()

    @property
    def state(self) -> cs.ClusterState:
        return self.gossiper.state

    async def _save(self, state) -> None:
        doc = {"state": state.to_dict(), "addresses": {n: list(a) for n, a in self.addresses.items()}}
        await self.storage.write([(keys.meta_key("cluster"), _pack(doc))])

    async def set_state(self, state: cs.ClusterState) -> None:
        """Publish a state derived from ours (staging, commit, transfer done); persist_loop
        works out the fetch plan for it, then saves it (in that order, so a crash between
        the two is seen again as a ring change at restart)."""
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

    def _check_left(self) -> None:
        state = self.state
        if state.status(self.me) == "exiting" and not any(
                m.source == self.me for m in state.pending):
            self.left.set()

    async def persist_loop(self) -> None:
        """Save every state gossip brings, so a restarted node knows its ring and peers."""
        while True:
            self._check_left()
            before = self.state
            await self.gossiper.wait_state(lambda s: s is not before)
            await self._plan_fetches(before, self.state)
            if before.ring.version != self.state.ring.version:
                log.info("ring version %d: %d nodes", self.state.ring.version,
                         len(self.state.ring.nodes()))
            await self._persist()

    async def wait_state_change(self) -> None:
        before = self.state
        await self.gossiper.wait_state(lambda s: s is not before)

    def now(self) -> float:
        return self.clocks.monotonic()

    def member_count(self) -> int:
        """Distinct replicas a key can have now: during a transition the serving (prior)
        ring may have fewer nodes (a one-node cluster growing), and R/W clamp to it."""
        return max(1, min(len(self.state.ring.nodes()), len(self.serving_ring().nodes())))

    def is_up(self, node: str) -> bool:
        return self.members.is_up(node, self.now())

    # ------------------------------------------------------------- routing

    def serving_ring(self) -> Ring:
        """The ring with each moving partition still owned by its source (Rule 3)."""
        state = self.state
        # Keyed on the digest: merged states can differ at the same version.
        if self._serving is None or self._serving[0] != state.digest():
            self._serving = (state.digest(), self._serving_ring_of(state))
        return self._serving[1]

    def peer_address(self, node: str) -> str:
        record = self.members.get(node)
        if record is not None:
            return record.peer_address
        return self.addresses.get(node, ("", ""))[1]

    def _replica(self, node: str):
        if node == self.me:
            return self.local
        return RemoteReplica(node, self.peer_address(node), self.peers)

    def primaries(self, partition: int, n: int) -> list[str]:
        """The preference list on the serving ring, cached per state version (the walk
        over the ring is the most expensive step of routing a request)."""
        version = self.state.digest()
        if self._pl_cache_version != version:
            self._pl_cache.clear()
            self._pl_cache_version = version
        found = self._pl_cache.get((partition, n))
        if found is None:
            found = self._pl_cache[(partition, n)] = preference_list(self.serving_ring(), partition, n)
        return found

    @property
    def has_its_data(self) -> bool:
        """False while this node may have lost its data (checking seeds, or restoring)."""
        return self.settled.is_set() and not self.restoring

    def replicas_for_read(self, key: bytes, n: int):
        partition = partition_of(key, self.state.ring.q)
        return [self._replica(node) for node in self.primaries(partition, n)
                if self.is_up(node) and not (node == self.me and not self.has_its_data)]

    def replicas_for_write(self, key: bytes, n: int, failed: Collection[str] = ()):
        """Replicas for a write; nodes in ``failed`` (those that did not answer this request:
        the coordinator's local failure view) are treated as down, so fallbacks stand in."""
        partition = partition_of(key, self.state.ring.q)
        primaries = self.primaries(partition, n)

        def is_up(node: str) -> bool:
            return node not in failed and self.is_up(node)

        if all(is_up(node) for node in primaries) and not self.state.in_transition:
            return [self._replica(node) for node in primaries]  # the common case
        out = []
        for node, role, stands_for in annotated_preference_list(
                self.serving_ring(), partition, n, is_up):
            if role == "primary":
                out.append(self._replica(node))
            elif not self.config.hinted_handoff:
                continue
            elif node == self.me:
                out.append(LocalHintStore(node, self, stands_for))
            else:
                out.append(HintedReplica(node, self.peer_address(node), self.peers, stands_for))
        if self.config.hinted_handoff:
            # A down primary with no fallback to stand in for it: the coordinator keeps the
            # hint itself (as Cassandra does). Such a hint does not count towards W.
            covered = {r.stands_for for r in out if getattr(r, "stands_for", None)}
            for node in primaries:
                if node not in covered and not is_up(node):
                    out.append(LocalHintStore(self.me, self, node, role="hint"))
        if self.state.in_transition:
            named = {r.node for r in out}
            new = self.state.ring
            for node in preference_list(new, partition, self._replication(new)):
                if node not in named and is_up(node):
                    out.append(self._replica(node))  # a new replica, fetching the partition
        return out

    def replica_roles(self, key: bytes, n: int) -> list[tuple[str, str]]:
        """(node, primary|fallback) for inspect: every primary, down or not."""
        partition = partition_of(key, self.state.ring.q)
        return [(node, "primary") for node in self.primaries(partition, n)]

    # ------------------------------------------------------------- hints

    async def store_hint(self, target: str, key: bytes, obj) -> None:
        """Keep ``obj`` durably for the down node ``target`` (kvd.node.handoff)."""
        await self.handoff.store(target, key, obj)

    async def keep_hint_for_failed_leg(self, target: str, key: bytes, obj) -> None:
        """The coordinator's hint for a replica that failed a write (kvd.node.coordinator
        rule 3). Refused when a large value's bytes are not here: delivering its manifest
        alone would fail on the target (anti-entropy repairs that replica instead)."""
        if not all(self.store.has_value_bytes(s.chunks) for s in obj.siblings if s.chunks is not None):
            raise Unavailable(f"the bytes of a large value of {key[:64]!r} are not on "
                              f"{self.me}")
        await self.store_hint(target, key, obj)

    def hints_pending(self) -> dict[str, int]:
        """{node: hints held for it}, from memory (no scan)."""
        return self.handoff.pending()

    @property
    def hints_delivered(self) -> int:
        return self.handoff.delivered

    async def handoff_loop(self) -> None:
        await self.handoff.run()

    # ------------------------------------------------------------- gossip

    def gossip_reply(self, fields: dict) -> dict:
        """Answer a GOSSIP (push-pull) through the gossiper."""
        return self.gossiper.handle_gossip(fields, self.now())

    def full_gossip(self) -> dict:
        """Members and the whole state: what a node that joins needs first."""
        return {"members": self.members.digest(self.now()), "state": self.state.to_dict()}

    # ------------------------------------------------------------- wiped nodes
    #
    # A node that starts with an empty data directory but is listed as a member by the
    # cluster it reaches (through its seeds, or when a member gossips to it) was wiped. It
    # must not answer as a replica of data it no longer has: it adopts the cluster's state,
    # refuses replica reads while "restoring" (coordinators then count it as down), fetches
    # every partition it replicates from the other replicas, and only then serves. The
    # restoring mark is saved, so a restart mid-restore carries on.

    async def maybe_restore(self, fields: dict) -> None:
        """Called with a peer's gossip or state reply; restores when it names us."""
        if not self.fresh or "state" not in fields:
            return
        try:
            theirs = cs.ClusterState.from_dict(fields["state"])
        except ValueError:
            return
        if theirs.cluster_id == self.state.cluster_id or theirs.status(self.me) is None:
            return
        if any(True for _ in self.storage.iterate_keys(b"o", b"p")):
            return  # we hold data of our own cluster: an operator mistake, not a wipe
        log.warning("this node's data directory is empty but cluster %s lists it as a member: "
                    "restoring its replicas from the other nodes before serving", theirs.cluster_id)
        self.fresh = False
        self.restoring = True
        await self.storage.write([(keys.meta_key("restoring"), b"1")])
        self.members.merge(fields.get("members", []), self.now())
        self.gossiper.replace_state(theirs)

    async def ask_seeds(self) -> None:
        """At start with a new data directory: ask the seeds whether we are a member.

        Until one answers (or SEED_WAIT passes with none reachable) the node serves nothing,
        so a wiped member never answers "not found" for data it lost."""
        seeds = [s for s in self.config.seeds if s != self.config.peer_listen]
        reported: set[str] = set()
        with trio.move_on_after(SEED_WAIT):
            while seeds and not self.settled.is_set():
                for seed in seeds:
                    try:
                        with trio.fail_after(3):
                            reply = await self.peers.call(seed, MsgType.ADMIN, {"op": "state"},
                                                          MsgType.ADMIN_REPLY)
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

    async def _restored(self) -> None:
        self.restoring = False
        await self.storage.write([(keys.meta_key("restoring"), None)])
        log.info("restore complete: serving as a replica again")

    # ------------------------------------------------------------- topology

    async def stage_join_at(self, seed: str) -> dict:
        """Run on the joining node: ask the cluster at ``seed`` to stage our join."""
        if any(True for _ in self.storage.iterate_keys(b"o", b"p")):
            raise BadRequest("this node holds data; only an empty node can join a cluster")
        if len(self.state.members) > 1:
            raise BadRequest("this node is already a member of a cluster")
        try:
            # Bounded: a wrong SEED (a closed port, a client or metrics port) must get an
            # answer naming it, not a request that waits forever.
            with trio.fail_after(self.config.request_timeout):
                reply = await self.peers.call(seed, MsgType.ADMIN, {
                    "op": "stage-join", "node": self.me,
                    "address": self.config.listen, "peer_address": self.config.peer_listen,
                }, MsgType.ADMIN_REPLY)
        except BadRequest as exc:
            raise BadRequest(f"seed {seed} refused the join: {exc}") from None
        except Unauthorized:
            raise  # the secrets differ: exit 4 with the reason, not "did not answer"
        except (KvdError, OSError, trio.TooSlowError) as exc:
            reason = str(exc) or "no answer"
            raise Unavailable(f"seed {seed} did not answer as a member's peer address ({reason});"
                              " SEED is the peer_listen HOST:PORT of a cluster member") from None
        try:
            state = cs.ClusterState.from_dict(reply["state"])
        except (KeyError, ValueError) as exc:
            raise BadRequest(f"seed {seed} answered with a malformed cluster state: {exc}") from None
        self.members.merge(reply.get("members", []), self.now())
        self.gossiper.replace_state(state)  # our own one-node cluster held no data
        return {"staged": f"join {self.me}", "cluster": self.state.cluster_id}

    async def stage(self, change: cs.Change) -> cs.ClusterState:
        state = cs.stage(self.state, change, self.config.n)
        await self.set_state(state)
        return state

    async def commit(self) -> cs.ClusterState:
        state = cs.commit(self.state, self.config.n)
        await self.set_state(state)
        return state

    async def abort(self) -> cs.ClusterState:
        state = cs.abort(self.state)
        await self.set_state(state)
        return state

    async def clear(self) -> cs.ClusterState:
        state = cs.clear(self.state)
        await self.set_state(state)
        return state

    # ------------------------------------------------------------- transfers
    #
    # Pull-based. A node stores the keys of every partition whose preference list includes
    # it, so when a commit changes the ring, each node works out which partitions it now
    # replicates and did not before (preference lists of the new ring against the ring that
    # served until then), and fetches them from their previous replicas, in key order and
    # in batches. That plan is saved with every finished partition, so a node killed
    # mid-transfer resumes where it was. Once its plan is done, a node publishes
    # transfer_done for the moves towards it; until then the old owners serve the moving
    # partitions, and writes reach the new ones too (routing above).

    def _replication(self, ring: Ring) -> int:
        return min(self.config.n, max(1, len(ring.nodes())))

    async def _plan_fetches(self, before: cs.ClusterState, after: cs.ClusterState) -> None:
        """On a ring change, add the partitions this node newly replicates to its plan."""
        if before.cluster_id == after.cluster_id and before.ring.version == after.ring.version:
            return
        self._planned = None
        new = after.ring
        n_new = self._replication(new)
        if before.cluster_id != after.cluster_id:
            old, n_old = None, 0  # we joined (or were wiped): nothing of this cluster is here
        else:
            old = self._serving_ring_of(before)
            n_old = self._replication(old)
        mine = {q for q in range(new.q) if self.me in preference_list(new, q, n_new)}
        todo = {q for q in mine if old is None or self.me not in preference_list(old, q, n_old)}
        plan = self._plan or {"old": None, "todo": set()}
        # A copy kept from when this node last replicated a partition is stale (deletes
        # since then may be purged): drop it before fetching (LocalStore Rule 6); the prior
        # replicas it is fetched from hold everything written meanwhile. Only when this
        # commit starts a transition: during one, what this node holds of a partition it
        # does not replicate on the prior ring is what it fetched (or is fetching) for it.
        if not before.in_transition:
            for q in sorted(todo - plan["todo"]):
                if self.store.holds(q):
                    await self.store.drop_partition(q)
        # Partitions this node no longer replicates (a force-remove, an abort) are not fetched.
        plan["todo"] = (plan["todo"] & mine) | todo
        if old is not None:
            plan["old"] = old
        self._plan = plan
        await self._save_plan()
        self._planned = (after.cluster_id, new.version)
        if todo:
            log.info("ring version %d: %d partitions to fetch", new.version, len(todo))

    def _serving_ring_of(self, state: cs.ClusterState) -> Ring:
        return cs.serving_ring(state)

    async def _save_plan(self) -> None:
        plan = self._plan
        doc = None if plan is None else {
            "old": None if plan["old"] is None else plan["old"].to_dict(),
            "todo": sorted(plan["todo"])}
        await self.storage.write([(keys.meta_key("fetch"), None if doc is None else _pack(doc))])

    def _load_plan(self) -> None:
        raw = self.storage.get(keys.meta_key("fetch"))
        if raw is not None:
            doc = _unpack(raw)
            self._plan = {"old": None if doc["old"] is None else Ring.from_dict(doc["old"]),
                          "todo": set(doc["todo"])}

    async def transfer_loop(self) -> None:
        while True:
            try:
                with unwrap_single_error():  # fetches run in a nursery: errors come grouped
                    await self._run_plan()
            except (KvdError, trio.TooSlowError, OSError, BaseExceptionGroup) as exc:
                if isinstance(exc, BaseExceptionGroup) and not _all_expected(exc):
                    raise
                log.info("transfer paused, will resume: %s", exc)
                self.transfer_progress["state"] = "retrying"
                await trio.sleep(1.0)
                continue
            await self._drop_stale_partitions()
            with trio.move_on_after(1.0):
                await self.wait_state_change()

    async def _run_plan(self) -> None:
        # Partitions added to the plan while it runs (a commit during a transition) are
        # fetched in the next round: the plan is done only when a round finds it empty.
        while True:
            if self._planned != (self.state.cluster_id, self.state.ring.version):
                return  # the plan for this ring is not worked out yet (persist_loop does it)
            plan = self._plan
            todo = sorted(plan["todo"]) if plan is not None else []
            if not todo:
                break
            progress = self.transfer_progress
            progress.setdefault("started", self.clocks.wall())
            progress.update(state="running", partitions_left=len(todo))
            limiter = trio.CapacityLimiter(self.config.transfer_limit)
            failed: list[tuple[int, BaseException]] = []
            async with trio.open_nursery() as nursery:
                for q in todo:
                    nursery.start_soon(self._fetch_guarded, q, limiter, failed)
            if failed:  # the others went on meanwhile; transfer_loop retries these
                q, exc = failed[0]
                raise KvdError(f"{len(failed)} partitions not fetched yet (partition {q}: {exc})")
        # No checkpoint since the check above: the plan is empty for the current ring.
        finished = self._plan is not None
        if finished:
            log.info("fetched every partition of the plan: %d keys",
                     self.transfer_progress["keys_done"])
            self._plan = None
            self.transfer_progress = {"keys_done": 0, "bytes_done": 0, "state": "idle"}
        done = cs.node_done(self.state, self.me)
        if done is not self.state:
            self.gossiper.publish(done)
        if finished:
            await self._save_plan()
        if self.restoring:
            await self._restored()

    async def _drop_stale_partitions(self) -> None:
        """Once a transition is over (every new replica holds its data: the handoff is
        confirmed), drop the partitions this node no longer replicates, so a stale copy is
        never served or repaired back if it becomes a replica again (LocalStore Rule 6)."""
        state = self.state
        ring_id = (state.cluster_id, state.ring.version)
        if (self._dropped_for == ring_id or state.in_transition or not self.has_its_data
                or self._planned != ring_id or (self._plan and self._plan["todo"])
                or state.status(self.me) is None):  # force-removed: nothing was handed off
            self._settled_since = None
            return
        if self._settled_since is None or self._settled_since[0] != ring_id:
            self._settled_since = (ring_id, self.clocks.monotonic())
        if self.clocks.monotonic() - self._settled_since[1] < DROP_DELAY:
            return  # let the end of the transition reach every coordinator first
        n = self._replication(state.ring)
        stale = [q for q in range(state.ring.q) if self.me not in preference_list(state.ring, q, n)
                 and self.store.holds(q)]
        for q in stale:
            await self.store.drop_partition(q)
        if stale:
            log.info("dropped %d partitions this node no longer replicates", len(stale))
        self._dropped_for = ring_id

    async def reclaim_loop(self) -> None:
        """Free the space of dropped partitions in the background, ``reclaim_rate`` keys/s."""
        step = max(1, min(256, self.config.reclaim_rate))
        while True:
            slots = self.store.reclaimable()
            if not slots:
                await trio.sleep(5.0)
                continue
            try:
                for slot in slots:
                    while deleted := await self.store.reclaim(slot, step):
                        await trio.sleep(deleted / self.config.reclaim_rate)
            except OSError as exc:  # a blob directory fsync meeting EMFILE: try again later
                log.warning("reclaiming dropped partitions: %s; retrying in 5 s",
                            exc.strerror or exc)
                await trio.sleep(5.0)

    async def _fetch_guarded(self, q: int, limiter, failed: list) -> None:
        """Fetch ``q``; a peer or network failure is noted in ``failed`` instead of
        cancelling the fetches of other partitions (one unreachable source must not keep
        restarting every transfer)."""
        async with limiter:
            try:
                await self._fetch_partition(q)
            except _RETRYABLE as exc:
                failed.append((q, exc))
                return
        self._plan["todo"].discard(q)
        self.transfer_progress["partitions_left"] = len(self._plan["todo"])
        await self._save_plan()

    def _sources(self, q: int) -> list[str]:
        """Every up node that held partition ``q`` before: a key acknowledged by W of them
        may be on any one only, so the fetch merges all of them.

        A holder that is down and departing (it will not be a replica, so anti-entropy can
        not bring its keys later) is waited for: KvdError, the plan retries. With no holder
        up at all (a wiped node restoring on a changed ring), the current replicas serve.
        """
        old = (self._plan and self._plan["old"]) or self.serving_ring()
        holders = [n for n in preference_list(old, q, self._replication(old)) if n != self.me]
        new = self.state.ring
        staying = set(preference_list(new, q, self._replication(new)))
        up = [n for n in holders if self.is_up(n)]
        departing_down = [n for n in holders if n not in up and n not in staying
                          and self.state.status(n) is not None]
        if departing_down:
            raise KvdError(f"partition {q}: waiting for {', '.join(departing_down)}, which holds "
                           "it, leaves, and is down")
        if not up:
            up = [n for n in preference_list(self.serving_ring(), q, self._replication(old))
                  + sorted(staying) if n != self.me and self.is_up(n)]
        return list(dict.fromkeys(up))

    async def _fetch_partition(self, q: int) -> None:
        sources = self._sources(q)
        if not sources:
            raise KvdError(f"no replica of partition {q} is up to copy it from")
        for node in sources:
            await self._fetch_from(RemoteReplica(node, self.peer_address(node), self.peers), q)

    async def _scan(self, source: RemoteReplica, fields: dict) -> dict:
        with trio.fail_after(self.config.request_timeout * 3):
            return await self.peers.call(source.address, MsgType.REPLICA_GET,
                                         {"op": "scan", **fields}, MsgType.REPLICA_GET_REPLY)

    async def _fetch_large(self, source: RemoteReplica, q: int, key: bytes) -> bytes | None:
        """One object too large for a scan reply, in pieces (restarted if it changes)."""
        for _ in range(5):
            parts: list[bytes] = []
            total = None
            while total is None or sum(map(len, parts)) < total:
                reply = await self._scan(source, {"partition": q, "within": key,
                                                  "offset": sum(map(len, parts)),
                                                  "max_bytes": scan_budget(self.config.max_frame)})
                if not reply["total"]:
                    return None  # deleted meanwhile (purged): nothing to fetch
                if (total is not None and reply["total"] != total) or not reply["piece"]:
                    break  # it changed while we read it
                total = reply["total"]
                parts.append(reply["piece"])
            else:
                raw = b"".join(parts)
                try:
                    versions.decode_object(raw)
                    return raw
                except ValueError:
                    pass  # pieces of two versions
        raise KvdError(f"object {key[:64]!r} of partition {q} kept changing while it was fetched")

    async def _fetch_from(self, source: RemoteReplica, q: int) -> None:
        after = b""
        progress = self.transfer_progress
        while True:
            reply = await self._scan(source, {"partition": q, "after": after,
                                              "limit": TRANSFER_BATCH,
                                              "max_bytes": scan_budget(self.config.max_frame)})
            raws = list(reply["objects"])
            if reply.get("large") is not None:
                key = reply["large"]
                raw = await self._fetch_large(source, q, key)
                if raw is not None:
                    raws.append((key, raw))
                after = key
            objects = [(key, versions.decode_object(raw)) for key, raw in raws]
            for key, obj in objects:
                for sibling in obj.siblings:
                    if sibling.chunks is not None and not self.store.has_value_bytes(sibling.chunks):
                        await self._fetch_blob(source, key, sibling.chunks)
            # Merged concurrently, so the whole batch shares a group commit (one fsync).
            async with trio.open_nursery() as nursery:
                for key, obj in objects:
                    nursery.start_soon(self.store.merge, key, obj)
            if objects:
                after = objects[-1][0]
            batch_bytes = sum(len(raw) for _, raw in raws)
            progress["keys_done"] += len(objects)
            progress["bytes_done"] += batch_bytes
            await self._throttle(batch_bytes)
            if reply["done"]:
                return

    async def _throttle(self, nbytes: int) -> None:
        """Hold every fetch of this node together to ``transfer_rate_mb``: each batch reserves
        its share of time after those already reserved (concurrent fetches queue up)."""
        now = self.clocks.monotonic()
        self._throttle_at = max(self._throttle_at, now) + nbytes / (self.config.transfer_rate_mb * MIB)
        if self._throttle_at > now:
            await trio.sleep(self._throttle_at - now)

    async def _fetch_blob(self, source, key, ref) -> None:
        offset = 0
        piece = min(MIB, scan_budget(self.config.max_frame))  # a reply fits our frame limit
        async for data in source.read_chunks(key, ref, piece):
            await self.store.write_chunk(key, ref.vid, offset, data)
            offset += len(data)
            self.transfer_progress["bytes_done"] += len(data)
            await self._throttle(len(data))  # large values count towards the rate too

    def scan_partition(self, q: int, after: bytes, limit: int, max_bytes: int) -> dict:
        """Objects of partition ``q`` after user key ``after`` (for a fetching node): at most
        ``limit`` objects and ``max_bytes`` bytes. An object larger than that on its own is
        named as ``large`` (the fetcher reads it with ``scan_piece``)."""
        slot = self.store.slot(q)
        start, stop = keys.object_range(slot)
        if after:
            start = keys.object_key(slot, after) + b"\x00"
        out: list = []
        size = 0
        for object_key, raw in self.storage.iterate(start, stop):
            key = keys.user_key_of(object_key)[1]
            entry = len(key) + len(raw) + 16  # with msgpack's headers: the reply must fit
            if len(out) == limit or size + entry > max_bytes:
                if not out:
                    return {"objects": [], "large": key, "done": False}
                return {"objects": out, "done": False}
            out.append((key, raw))
            size += entry
        return {"objects": out, "done": True}

    def scan_piece(self, q: int, key: bytes, offset: int, max_bytes: int) -> dict:
        """Bytes ``offset..offset+max_bytes`` of one stored object of partition ``q``."""
        raw = self.storage.get(keys.object_key(self.store.slot(q), key)) or b""
        return {"piece": raw[offset:offset + max_bytes], "total": len(raw), "done": False}

    def transfer_rows(self) -> list[dict]:
        """This node's view of pending moves, with progress for those it is fetching."""
        progress = self.transfer_progress
        elapsed = max(self.clocks.wall() - progress.get("started", self.clocks.wall()), 1e-3)
        rows = []
        for move in self.state.pending:
            row = {"partition": move.partition, "from": move.source, "to": move.target,
                   "keys_done": 0, "bytes_done": 0, "rate_bps": 0, "state": "pending"}
            if move.target == self.me:
                row.update(keys_done=progress["keys_done"], bytes_done=progress["bytes_done"],
                           rate_bps=round(progress["bytes_done"] / elapsed),
                           state=progress["state"])
            rows.append(row)
        return rows

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.gossiper.run)
            if self.fresh:
                nursery.start_soon(self.ask_seeds)
            nursery.start_soon(self.persist_loop)
            nursery.start_soon(self.handoff_loop)
            nursery.start_soon(self.transfer_loop)
            nursery.start_soon(self.reclaim_loop)



_RETRYABLE = (KvdError, trio.TooSlowError, OSError)


def _all_expected(group: BaseExceptionGroup) -> bool:
    """Whether every error in ``group`` is a peer or network failure (retry), not a bug."""
    return all(isinstance(e, _RETRYABLE) or
               (isinstance(e, BaseExceptionGroup) and _all_expected(e))
               for e in group.exceptions)
