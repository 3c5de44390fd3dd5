"""Anti-entropy: compare replicas' hash trees and repair only what differs; tombstone GC.

For one partition and one peer replica, an exchange walks the TicTac trees (kvd/aae.py):
roots, then the 32 branches of a differing root, then the 32 segments of each differing
branch, then the (key, digest) lists of each differing segment; only the objects of the
keys that differ travel, in both directions (the initiator pushes what the peer lacks and
pulls what it lacks). In-sync replicas cost one 8-byte root per partition.

Background: every ``anti_entropy_interval`` each node exchanges the partitions for which it
is the first primary, one partition at a time (throttled). ``kvctl repair`` runs the same
exchange on demand for every partition the node replicates; with ``--verify`` it first reads
this node's copies whole against their checksums (rot that the trees cannot see, since the
digests agree) and re-reads each damaged key so that read repair rewrites it.

Tombstone GC (DESIGN section 2: deleted data must never come back): when an exchange finds
a partition identical on *every* replica of it (all up, all compared), its tombstones that
this node stored over ``tombstone_grace`` ago, by its own clock (kvd.node.local Rule 5:
skew between nodes never shortens the grace), are purged on every replica, each replica
purging only the tombstone it holds with that exact digest. Never while a replica is
unreachable. A partition with one replica (n = 1, a one-node cluster) purges after the
grace alone. The candidates come from the tombstone index (``keys.tombstone_range``,
written with each object), so a round costs in proportion to the tombstones, not the
data, and yields.

While partitions move, only the moving ones are left out (their replica sets change).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import trio

from kvd import aae, versions
from kvd.errors import BadRequest, KvdError
from kvd.node.remote import RemoteReplica
from kvd.ring import partition_of, preference_list
from kvd.storage import keys
from kvd.storage.base import DamagedData

log = logging.getLogger("kvd.aae")

PURGE_BATCH = 256  # tombstones per aae-purge request
PURGE_BATCH_BYTES = 256 << 10  # and at most this many bytes of keys (or max_frame / 2)
KEY_ENTRY_OVERHEAD = 8  # msgpack framing of one [key, digest] pair, rounded up
SCAN_YIELD = 512  # tombstone index entries read between checkpoints

# A peer that fails, times out or goes away: counted as an error, never fatal to the node.
_PEER_FAILURES = (KvdError, trio.TooSlowError, OSError)


@dataclass
class RepairStats:
    partitions: int = 0
    partitions_differing: int = 0
    segments_differing: int = 0
    keys_repaired: int = 0
    tombstones_purged: int = 0
    bytes_exchanged: int = 0
    errors: int = 0
    copies_checked: int = 0  # kvctl repair --verify: this node's copies read whole
    copies_damaged: int = 0  # ... that failed their checksums (read repair rewrites them)
    unreachable: list[str] = field(default_factory=list)  # peers down or failing: not compared

    def add(self, other: "RepairStats") -> None:
        for name in self.__dataclass_fields__:
            if name != "unreachable":
                setattr(self, name, getattr(self, name) + getattr(other, name))
        self.unreachable = sorted(set(self.unreachable) | set(other.unreachable))

    def to_dict(self) -> dict:
        return {**self.__dict__, "unreachable": list(self.unreachable)}


class AntiEntropy:
    def __init__(self, cluster, store, config):
        self.cluster = cluster
        self.store = store
        self.config = config
        self.totals = RepairStats()
        self.progress: dict = {}

    # ------------------------------------------------------------- answering peers

    def answer(self, fields: dict) -> dict:
        """REPLICA_GET aae-* operations (the peer side of an exchange)."""
        op = fields["op"]
        if op == "aae-root":
            return {"root": self.store.tree(fields["partition"]).root()}
        if op == "aae-branches":
            return {"branches": self.store.tree(fields["partition"]).branches()}
        if op == "aae-segments":
            return {"segments": self.store.tree(fields["partition"]).branch_segments(fields["branch"])}
        if op == "aae-keys":
            return self._key_page(fields["partition"], fields["segment"], fields.get("after"))
        raise BadRequest(f"unknown anti-entropy operation {op!r}")

    def _key_page(self, partition: int, segment: int, after: bytes | None) -> dict:
        """One reply's worth of a segment's (key, digest) list, in key order after ``after``:
        at most half of max_frame, so a crowded segment never closes the connection."""
        start, stop = keys.index_range(self.store.slot(partition), segment)
        if after is not None:
            start = start + after + b"\x00"
        budget = self.config.max_frame // 2
        entries: list[list[bytes]] = []
        size = 0
        for index_key, digest in self.store.storage.iterate(start, stop):
            key = keys.indexed_key(index_key)
            size += len(key) + len(digest) + KEY_ENTRY_OVERHEAD
            if entries and size > budget:
                return {"entries": entries, "more": True}
            entries.append([key, digest])
        return {"entries": entries, "more": False}

    async def _their_entries(self, peer, partition: int, segment: int) -> dict[bytes, bytes]:
        """The peer's (key, digest) list of one segment, page by page."""
        out: dict[bytes, bytes] = {}
        after = None
        while True:
            with trio.fail_after(self.config.request_timeout):
                reply = await peer.segment_keys(partition, segment, after)
            out.update((k, d) for k, d in reply["entries"])
            if not reply.get("more") or not reply["entries"]:
                return out
            after = reply["entries"][-1][0]

    async def purge_confirmed(self, partition: int, tombstones: list) -> int:
        """Purge tombstones every replica confirmed holding (REPLICA_PUT aae-purge)."""
        purged = 0
        for key, digest in tombstones:
            if partition_of(key, self.store.ring_size) != partition:
                continue
            if await self.store.purge(key, digest):
                purged += 1
            else:
                obj = self.store._latest(key)  # with a write still committing, if any
                if obj is None or versions.is_found(obj):  # a stale index entry: drop it
                    await self.store.storage.write(
                        [keys.tombstone_op(self.store.slot(partition), key, None)])
        return purged

    # ------------------------------------------------------------- exchanges

    def _replicas(self, partition: int) -> list[str]:
        ring = self.cluster.routing.serving_ring()
        return preference_list(ring, partition, self.cluster.replication(ring))

    def my_partitions(self, first_only: bool = False) -> list[int]:
        me = self.cluster.me
        out = []
        for p in range(self.cluster.state.ring.q):
            replicas = self._replicas(p)
            if (replicas[:1] == [me]) if first_only else (me in replicas):
                out.append(p)
        return out

    async def exchange(self, partition: int, node: str) -> RepairStats:
        """Compare this node's tree of ``partition`` with ``node``'s; repair both ways."""
        stats = RepairStats()
        peer = RemoteReplica(node, self.cluster.peer_address(node), self.cluster.peers)
        tree = self.store.tree(partition)
        timeout = self.config.request_timeout
        with trio.fail_after(timeout):
            root = await peer.tree_root(partition)
        stats.bytes_exchanged += 8
        if root == tree.root():
            return stats
        stats.partitions_differing = 1
        with trio.fail_after(timeout):
            theirs = await peer.tree_branches(partition)
        stats.bytes_exchanged += 8 * aae.BRANCHES
        for branch in aae.differing_branches(tree.branches(), theirs):
            with trio.fail_after(timeout):
                their_segments = await peer.tree_segments(partition, branch)
            stats.bytes_exchanged += 8 * aae.SEGMENTS_PER_BRANCH
            for segment in aae.differing_segments(branch, tree.branch_segments(branch), their_segments):
                stats.segments_differing += 1
                theirs_keys = await self._their_entries(peer, partition, segment)
                stats.bytes_exchanged += sum(len(k) + len(d) for k, d in theirs_keys.items())
                mine = self.store.segment_entries(partition, segment)
                need, give = aae.diff_keys(mine, theirs_keys)
                for key in need:
                    obj = await peer.get(key)
                    if obj is not None:
                        await self._pull_blobs(peer, key, obj)
                        await self.store.merge(key, obj)
                        stats.keys_repaired += 1
                for key in give:
                    obj = self.store.read(key, damaged_as_missing=True)  # never push rot
                    if obj is not None:
                        await self._push_blobs(peer, key, obj)
                        await peer.merge(key, obj)
                        stats.keys_repaired += 1
        return stats

    async def _pull_blobs(self, peer, key, obj) -> None:
        for sibling in obj.siblings:
            ref = sibling.chunks
            if ref is not None and not self.store.has_value_bytes(ref):
                offset = 0
                async for data in peer.read_chunks(key, ref):
                    await self.store.write_chunk(key, ref.vid, offset, data)
                    offset += len(data)

    async def _push_blobs(self, peer, key, obj) -> None:
        """Stream the bytes of chunked siblings the peer lacks (only those: see has_blob)."""
        for sibling in obj.siblings:
            ref = sibling.chunks
            if ref is not None and not await peer.has_blob(key, ref):
                offset = 0
                async for data in self.store.read_chunks(key, ref):
                    await peer.write_chunk(key, ref.vid, offset, data)
                    offset += len(data)

    async def repair_partition(self, partition: int) -> RepairStats:
        """Exchange with every other replica; then, if all agreed, purge old tombstones.

        Never raises for a peer that fails or goes away: that is an error in the stats."""
        stats = RepairStats()
        others = [n for n in self._replicas(partition) if n != self.cluster.me]
        all_in_sync = True
        for node in others:
            if not self.cluster.is_up(node):
                stats.unreachable.append(node)
                all_in_sync = False
                continue
            try:
                result = await self.exchange(partition, node)
            except _PEER_FAILURES as exc:
                log.info("anti-entropy of partition %d with %s failed: %s", partition, node, exc)
                stats.errors += 1
                stats.unreachable.append(node)
                all_in_sync = False
                continue
            stats.add(result)
            if result.partitions_differing:
                all_in_sync = False
        stats.partitions = 1
        if all_in_sync:  # also with no other replica (n = 1, a one-node cluster)
            try:
                stats.tombstones_purged += await self._collect_tombstones(partition, others)
            except _PEER_FAILURES as exc:
                log.info("tombstone purge of partition %d stopped: %s", partition, exc)
                stats.errors += 1
        return stats

    async def _old_tombstones(self, partition: int, cutoff: float):
        """Batches of [key, digest] of the tombstones stored here before ``cutoff``, read from
        the tombstone index (never the objects), bounded in count and bytes, yielding
        between batches."""
        start, stop = keys.tombstone_range(self.store.slot(partition))
        limit = min(PURGE_BATCH_BYTES, self.config.max_frame // 2)
        batch: list[list[bytes]] = []
        size = scanned = 0
        for entry_key, value in self.store.storage.iterate(start, stop):
            scanned += 1
            if scanned % SCAN_YIELD == 0:
                await trio.lowlevel.checkpoint()
            key, deleted_at = keys.tombstone_entry(partition, entry_key, value)
            if deleted_at >= cutoff:
                continue
            digest = self.store.storage.get(keys.index_key(partition, aae.segment_of(key), key))
            if digest is None:
                continue
            if batch and (len(batch) == PURGE_BATCH or size + len(key) + 16 > limit):
                yield batch
                batch, size = [], 0
            batch.append([key, digest])
            size += len(key) + 16
        if batch:
            yield batch

    async def _collect_tombstones(self, partition: int, others: list[str]) -> int:
        """Every replica holds exactly what we hold: purge tombstones past the grace.

        Each batch is purged on every other replica first, then here. When a replica fails
        the purge stops: the replicas that purged already differ from the rest by those
        tombstones only, and the next exchange gives them back (same digests), after which
        the purge runs again. A tombstone is never lost while a live version could return."""
        cutoff = self.cluster.clocks.wall() - self.config.tombstone_grace
        purged = 0
        async for doomed in self._old_tombstones(partition, cutoff):
            for node in others:
                peer = RemoteReplica(node, self.cluster.peer_address(node), self.cluster.peers)
                with trio.fail_after(self.config.request_timeout):
                    await peer.purge_tombstones(partition, doomed)
            purged += await self.purge_confirmed(partition, doomed)
        if purged:
            log.info("partition %d: purged %d tombstones confirmed on every replica",
                     partition, purged)
        return purged

    async def repair(self, partitions: list[int] | None = None,
                     reread: Callable[[bytes], Awaitable[None]] | None = None) -> RepairStats:
        """kvctl repair: exchange every partition this node replicates (or the given ones);
        with ``reread`` (--verify), check this node's copies of them first (``verify``)."""
        todo = self.my_partitions() if partitions is None else partitions
        stats = RepairStats()
        self.progress = {"partitions_total": len(todo), "partitions_done": 0, "state": "running"}
        for partition in todo:
            if reread is not None:
                await self.verify(partition, reread, stats)
            stats.add(await self.repair_partition(partition))
            await trio.sleep(0)
            self.progress["partitions_done"] += 1
        self.progress["state"] = "done"
        self.totals.add(stats)
        log.info("repair: %d partitions, %d differed, %d keys repaired, %d errors, "
                 "unreachable: %s%s", stats.partitions, stats.partitions_differing,
                 stats.keys_repaired, stats.errors, ", ".join(stats.unreachable) or "none",
                 "" if reread is None else f"; verified {stats.copies_checked} copies, "
                 f"{stats.copies_damaged} damaged")
        return stats

    async def verify(self, partition: int, reread: Callable[[bytes], Awaitable[None]],
                     stats: RepairStats) -> None:
        """Check every copy this node holds of ``partition`` against its checksums: the
        object (LevelDB's blocks) and each large value's blob file, read whole. An exchange
        cannot see rot (the objects' digests agree), and a copy no read reaches stayed
        damaged until one did. Each key found damaged is passed to ``reread``, a read this
        node coordinates, whose read repair rewrites the copy from the other replicas.
        The keys of a block too damaged to list them are taken from the anti-entropy
        index. Counted in ``stats``: copies checked and damaged, and an error when even
        the index cannot name them."""
        slot = self.store.slot(partition)
        start, stop = keys.object_range(slot)
        rotted: list[bytes] = []  # objects failing LevelDB's checksums: the scan skips them
        unlisted: list[tuple[bytes, bytes]] = []  # spans of blocks whose keys cannot be read
        damaged: list[bytes] = []
        checked = 0
        for object_key, raw in self.store.storage.iterate_sound(
                start, stop, rotted.append, lambda *span: unlisted.append(span)):
            checked += 1
            if checked % SCAN_YIELD == 0:
                await trio.lowlevel.checkpoint()
            try:
                refs = [s.chunks for s in versions.decode_object(raw).siblings
                        if s.chunks is not None]
            except ValueError:
                damaged.append(object_key)
                continue
            for ref in refs:
                if not await self.store.blobs.sound(ref.vid, ref.length):
                    # Not a value overwritten meanwhile (its bytes go with it).
                    if self.store.storage.get(object_key) == raw:
                        damaged.append(object_key)
                    break
        if unlisted:
            rotted += self._indexed_within(partition, unlisted, stats)
        found = [keys.user_key_of(object_key)[1] for object_key in rotted + damaged]
        stats.copies_checked += checked + len(rotted)
        stats.copies_damaged += len(found)
        for key in found:
            log.warning("verify: this node's copy of key %r is damaged: read repair rewrites "
                        "it from the other replicas", key[:64])
            await reread(key)

    def _indexed_within(self, partition: int, spans: list[tuple[bytes, bytes]],
                        stats: RepairStats) -> list[bytes]:
        """The object keys that this node's anti-entropy index lists within ``spans`` (of
        blocks too damaged to list their own keys)."""
        slot = self.store.slot(partition)
        start, stop = keys.index_space(slot)
        found = []
        try:
            for index_key in self.store.storage.iterate_keys(start, stop):
                object_key = keys.object_key(slot, keys.indexed_key(index_key))
                if any(after <= object_key < until for after, until in spans):
                    found.append(object_key)
        except DamagedData as exc:
            log.error("verify: partition %d has a block too damaged to list its keys, and its "
                      "anti-entropy index cannot name them either: %s", partition, exc)
            stats.errors += 1
            return found
        log.error("verify: partition %d has %d block(s) too damaged to list their keys; the "
                  "anti-entropy index names %d key(s) in them", partition, len(spans),
                  len(found))
        return found

    def moving_partitions(self) -> set[int]:
        """Partitions whose replicas change with the pending moves: anti-entropy leaves them
        alone until the move is done (their new replicas are still being filled)."""
        state = self.cluster.state
        if not state.pending:
            return set()
        serving, future = self.cluster.routing.serving_ring(), state.ring
        n_now, n_next = self.cluster.replication(serving), self.cluster.replication(future)
        return {p for p in range(future.q)
                if preference_list(serving, p, n_now) != preference_list(future, p, n_next)}

    async def index_old_tombstones(self) -> int:
        """Once per data directory: index the tombstones written before the tombstone index
        existed (one scan of the objects, yielding), so they are collected too. An entry
        that a concurrent write made stale is harmless: purge refuses a live key, and
        ``purge_confirmed`` then drops the entry."""
        done_key = keys.meta_key("tombstone-index")
        if self.store.storage.get(done_key) is not None:
            return 0
        found = scanned = 0
        batch: list = []
        for object_key, raw in self.store.storage.iterate(*keys.object_space()):
            slot, key = keys.user_key_of(object_key)  # object keys are built on slots
            obj = versions.decode_object(raw)
            if obj.siblings and not versions.is_found(obj):
                found += 1
                # Stored before now, when is not known: the grace runs from now.
                batch.append(keys.tombstone_op(slot, key, self.store.wall()))
            scanned += 1
            if scanned % SCAN_YIELD == 0:
                if batch:
                    await self.store.storage.write(batch)
                    batch = []
                await trio.sleep(0)
        await self.store.storage.write(batch + [(done_key, b"1")])
        if found:
            log.info("indexed %d tombstones written before the tombstone index", found)
        return found

    async def run(self) -> None:
        """Background exchanges, throttled: the partitions this node is first primary of,
        except those that are moving."""
        await self.index_old_tombstones()
        while True:
            await trio.sleep(self.config.anti_entropy_interval)
            if not self.config.anti_entropy or self.cluster.restore.restoring:
                continue
            stats = RepairStats()
            state, moving = self.cluster.state, self.moving_partitions()
            for partition in self.my_partitions(first_only=True):
                if self.cluster.state is not state:  # a commit mid-round moves others
                    state, moving = self.cluster.state, self.moving_partitions()
                if partition in moving:
                    continue
                stats.add(await self.repair_partition(partition))
                await trio.sleep(0)  # let requests through between partitions
            self.totals.add(stats)
            if stats.keys_repaired or stats.tombstones_purged:
                log.info("anti-entropy: %d partitions, %d segments differed, %d keys repaired, "
                         "%d tombstones purged", stats.partitions, stats.segments_differing,
                         stats.keys_repaired, stats.tombstones_purged)
