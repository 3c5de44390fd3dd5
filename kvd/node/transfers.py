"""Transfers: a node pulls the partitions it newly replicates, then drops those it no longer does.

Pull-based (docs/DECISIONS.md, "Transfers are pulled by the new replica"). A node stores the
keys of every partition whose preference list includes it, so when a commit changes the
ring, each node works out which partitions it now replicates and did not before
(preference lists of the new ring against the ring that served until then), and fetches
them from their previous replicas, in key order and in batches.

1. The plan is saved when it is made (the prior ring, a mark per partition to fetch); each
   fetched partition removes its mark, so a node killed mid-transfer resumes where it was
   (saving the whole plan per partition wrote 8-16 GiB at 65,536). Once its plan is done, a
   node publishes ``node_done``; until then the old replicas serve the moving partitions,
   and writes reach the new ones too (kvd.node.routing).
2. A fetch merges every up prior replica (a key acknowledged by W of them may be on one
   only); a departing holder that is down is waited for. A failed fetch is retried from the
   start of its partition (merges are idempotent) without cancelling the others.
3. Scan replies are capped in bytes (``scan_budget``); an object larger than that travels in
   pieces; one throttle holds all of a node's fetches to ``transfer_rate_mb``.
4. A copy kept from when this node last replicated a partition is stale: it is dropped
   before fetching, and a partition this node no longer replicates is dropped
   ``DROP_DELAY`` after the transition ends (LocalStore Rule 10); its space is reclaimed in
   the background at ``reclaim_rate``.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import msgpack
import trio

from kvd import versions
from kvd.errors import KvdError, unwrap_single_error
from kvd.membership import cluster_state as cs
from kvd.node.remote import RemoteReplica
from kvd.ring import Ring, preference_list
from kvd.storage import keys

if TYPE_CHECKING:
    from kvd.node.cluster import Cluster

log = logging.getLogger("kvd.cluster")

MIB = 1 << 20
# Seconds between the end of a transition (as this node sees it) and dropping the
# partitions it no longer replicates: coordinators that have not heard yet still read
# from the prior ring. Gossip reaches 64 nodes in 15 s (tests/test_gossip_sim.py).
DROP_DELAY = 60.0
TRANSFER_BATCH = 256  # most objects per scan reply when fetching a partition

_RETRYABLE = (KvdError, trio.TooSlowError, OSError)
_IDLE = {"keys_done": 0, "bytes_done": 0, "state": "idle"}  # progress with no plan (copied)


def scan_page(storage, start: bytes, stop: bytes, limit: int, max_bytes: int) -> dict:
    """One page of ``Transfers.scan_partition``: the objects from ``start`` (a LevelDB key)
    on, at most ``limit`` of them and ``max_bytes`` bytes, checked against LevelDB's
    checksums: a new owner stores what it receives under fresh ones, so a rotted copy sent
    would pass for a sound one there (kvd.node.local Rule 9). A damaged object is left out,
    and so are those of a block too damaged to list its keys; the new owner gets them from
    the other replicas through anti-entropy."""

    def damaged(object_key: bytes) -> None:
        log.error("the object of key %r is damaged here: not sent to its new owner",
                  keys.user_key_of(object_key)[1][:64])

    def skipped(after: bytes, until: bytes) -> None:
        log.error("a block too damaged to list its keys (LevelDB keys %r to %r) was stepped "
                  "over: its objects are not sent to their new owner", after[:80], until[:80])

    out: list = []
    size = 0
    for object_key, raw in storage.iterate_sound(start, stop, damaged, skipped):
        key = keys.user_key_of(object_key)[1]
        entry = len(key) + len(raw) + 16  # with msgpack's headers: the reply must fit
        if len(out) == limit or size + entry > max_bytes:
            if not out:
                return {"objects": [], "large": key, "done": False}
            return {"objects": out, "done": False}
        out.append((key, raw))
        size += entry
    return {"objects": out, "done": True}


def scan_budget(max_frame: int) -> int:
    """Most bytes of objects in one scan reply: half a frame leaves room for keys and framing."""
    return max_frame // 2


def _all_expected(group: BaseExceptionGroup) -> bool:
    """Whether every error in ``group`` is a peer or network failure (retry), not a bug."""
    return all(isinstance(e, _RETRYABLE) or
               (isinstance(e, BaseExceptionGroup) and _all_expected(e))
               for e in group.exceptions)


class Transfers:
    """This node's fetch plan, the fetches, and the scans it answers for other nodes."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.progress: dict = dict(_IDLE)  # this node's totals over the current plan
        self.partitions: dict[int, dict] = {}  # each planned partition's own progress
        self.plan: dict | None = None  # {"old": Ring | None, "todo": set of partitions}
        self._planned: tuple[str, int] | None = None  # the ring the plan was made for
        self._throttle_at = 0.0  # when the transfer throttle's reserved bytes are paid off
        self._dropped_for: tuple[str, int] | None = None  # the ring stale partitions were dropped for
        self._settled_since: tuple[tuple[str, int], float] | None = None  # (ring, when it settled)

    # ------------------------------------------------------------- the plan (Rule 1)

    def load(self, state: cs.ClusterState) -> None:
        """At start: the saved plan, made for the saved state's ring (Rule 1)."""
        storage = self.cluster.storage
        raw = storage.get(keys.meta_key("fetch"))
        if raw is not None:
            doc = msgpack.unpackb(raw, raw=False)
            marks = storage.iterate_keys(*keys.fetch_todo_range())
            # "todo": a plan an older kvd saved whole (fetched whole again: merges are idempotent)
            todo = doc.get("todo") or [keys.fetch_todo_partition(k) for k in marks]
            self.plan = {"old": None if doc["old"] is None else Ring.from_dict(doc["old"]),
                         "todo": set(todo)}
        self._planned = (state.cluster_id, state.ring.version)

    async def _save_plan(self) -> None:
        """Write the whole plan (Rule 1): the prior ring, and exactly the current marks."""
        plan, storage = self.plan, self.cluster.storage
        todo = set() if plan is None else plan["todo"]
        ops: list = [(key, None) for key in storage.iterate_keys(*keys.fetch_todo_range())
                     if keys.fetch_todo_partition(key) not in todo]
        ops += [(keys.fetch_todo_key(q), b"") for q in todo]
        old = None if plan is None or plan["old"] is None else plan["old"].to_dict()
        doc = None if plan is None else msgpack.packb({"old": old}, use_bin_type=True)
        await storage.write(ops + [(keys.meta_key("fetch"), doc)])

    async def refetch_all(self) -> None:
        """Plan every partition this node replicates (a node restored from a backup)."""
        cluster = self.cluster
        ring = cluster.state.ring
        alone = set(ring.nodes()) <= {cluster.me}  # nobody else holds anything to fetch
        mine = set() if alone else cs.replicated_by(ring, cluster.me, cluster.config.n)
        self.plan = {"old": None, "todo": set(mine)}
        await self._save_plan()

    async def plan_fetches(self, before: cs.ClusterState, after: cs.ClusterState) -> None:
        """On a ring change, add the partitions this node newly replicates to its plan."""
        if before.cluster_id == after.cluster_id and before.ring.version == after.ring.version:
            return
        cluster = self.cluster
        me, store = cluster.me, cluster.store
        self._planned = None
        new, n = after.ring, cluster.config.n
        if before.cluster_id != after.cluster_id:
            old = None  # we joined (or were wiped): nothing of this cluster is here
        else:
            old = cs.serving_ring(before)
        mine = cs.replicated_by(new, me, n)
        todo = mine if old is None else mine - cs.replicated_by(old, me, n)
        plan = self.plan or {"old": None, "todo": set()}
        # A copy kept from when this node last replicated a partition is stale (deletes
        # since then may be purged): drop it before fetching (Rule 4); the prior
        # replicas it is fetched from hold everything written meanwhile. Only when this
        # commit starts a transition: during one, what this node holds of a partition it
        # does not replicate on the prior ring is what it fetched (or is fetching) for it.
        if not before.in_transition:
            for q in sorted(todo - plan["todo"]):
                if store.holds(q):
                    await store.drop_partition(q)
        # Partitions this node no longer replicates (a force-remove, an abort) are not fetched.
        plan["todo"] = (plan["todo"] & mine) | todo
        if old is not None:
            plan["old"] = old
        self.plan = plan
        await self._save_plan()
        self._planned = (after.cluster_id, new.version)
        if todo:
            log.info("ring version %d: %d partitions to fetch", new.version, len(todo))

    # ------------------------------------------------------------- running it

    async def run(self) -> None:
        """Carry out the plan, retrying what fails; then drop stale partitions."""
        while True:
            try:
                with unwrap_single_error():  # fetches run in a nursery: errors come grouped
                    await self._run_plan()
            except (KvdError, trio.TooSlowError, OSError, BaseExceptionGroup) as exc:
                if isinstance(exc, BaseExceptionGroup) and not _all_expected(exc):
                    raise
                log.info("transfer paused, will resume: %s", exc)
                self.progress["state"] = "retrying"
                await trio.sleep(1.0)
                continue
            await self._drop_stale_partitions()
            with trio.move_on_after(1.0):
                await self.cluster.wait_state_change()

    async def _run_plan(self) -> None:
        cluster = self.cluster
        # Partitions added to the plan while it runs (a commit during a transition) are
        # fetched in the next round: the plan is done only when a round finds it empty.
        while True:
            if self._planned != (cluster.state.cluster_id, cluster.state.ring.version):
                return  # the plan for this ring is not worked out yet (persist_loop does it)
            plan = self.plan
            todo = sorted(plan["todo"]) if plan is not None else []
            if not todo:
                break
            for q in todo:
                self._partition(q)["state"] = "pending"
            progress = self.progress
            progress.setdefault("started", cluster.clocks.wall())
            progress.update(state="running", partitions_left=len(todo))
            failed: list[tuple[int, BaseException]] = []
            queue = iter(todo)  # shared by the workers: each partition is taken once

            async def worker() -> None:  # transfer_limit of them, not a task per partition
                for q in queue:  # (224 MiB of tasks waiting for a slot at 65,536 partitions)
                    await self._fetch_guarded(q, failed)

            async with trio.open_nursery() as nursery:
                for _ in range(min(cluster.config.transfer_limit, len(todo))):
                    nursery.start_soon(worker)
            if failed:  # the others went on meanwhile; run() retries these
                q, exc = failed[0]
                raise KvdError(f"{len(failed)} partitions not fetched yet (partition {q}: {exc})")
        # No checkpoint since the check above: the plan is empty for the current ring.
        finished = self.plan is not None
        if finished and self.partitions:  # an empty plan (a join's first state) is no news
            log.info("fetched every partition of the plan: %d keys", self.progress["keys_done"])
        if finished:
            self.plan = None
            self.progress = dict(_IDLE)
            self.partitions = {}
        done = cs.node_done(cluster.state, cluster.me)
        if done is not cluster.state:
            cluster.gossiper.publish(done)
        if finished:
            await self._save_plan()
        if cluster.restore.restoring:
            await cluster.restore.finish()

    async def _drop_stale_partitions(self) -> None:
        """Once a transition is over (every new replica holds its data: the handoff is
        confirmed), drop the partitions this node no longer replicates, so a stale copy is
        never served or repaired back if it becomes a replica again (Rule 4)."""
        cluster = self.cluster
        state = cluster.state
        ring_id = (state.cluster_id, state.ring.version)
        if (self._dropped_for == ring_id or state.in_transition or not cluster.restore.has_its_data
                or self._planned != ring_id or (self.plan and self.plan["todo"])
                or state.status(cluster.me) is None):  # force-removed: nothing was handed off
            self._settled_since = None
            return
        if self._settled_since is None or self._settled_since[0] != ring_id:
            self._settled_since = (ring_id, cluster.clocks.monotonic())
        if cluster.clocks.monotonic() - self._settled_since[1] < DROP_DELAY:
            return  # let the end of the transition reach every coordinator first
        mine = cs.replicated_by(state.ring, cluster.me, cluster.config.n)
        stale = [q for q in range(state.ring.q) if q not in mine and cluster.store.holds(q)]
        for q in stale:
            await cluster.store.drop_partition(q)
        if stale:
            log.info("dropped %d partitions this node no longer replicates", len(stale))
        self._dropped_for = ring_id

    async def reclaim_loop(self) -> None:
        """Free the space of dropped partitions in the background, ``reclaim_rate`` keys/s."""
        store, rate = self.cluster.store, self.cluster.config.reclaim_rate
        step = max(1, min(256, rate))
        while True:
            slots = store.reclaimable()
            if not slots:
                await trio.sleep(5.0)
                continue
            try:
                for slot in slots:
                    while deleted := await store.reclaim(slot, step):
                        await trio.sleep(deleted / rate)
            except OSError as exc:  # a blob directory fsync meeting EMFILE: try again later
                log.warning("reclaiming dropped partitions: %s; retrying in 5 s",
                            exc.strerror or exc)
                await trio.sleep(5.0)

    # ------------------------------------------------------------- fetching (Rules 2, 3)

    async def _fetch_guarded(self, q: int, failed: list) -> None:
        """Fetch ``q``; a peer or network failure is noted in ``failed`` instead of
        cancelling the fetches of other partitions (one unreachable source must not keep
        restarting every transfer)."""
        fetch = self._partition(q)
        now = self.cluster.clocks.monotonic()
        fetch.update(state="running", keys_done=0, bytes_done=0, started=now, ended=None)
        try:
            await self._fetch_partition(q)
        except _RETRYABLE as exc:
            fetch.update(state="retrying", ended=self.cluster.clocks.monotonic(),
                         error=str(exc))  # until it succeeds: kvctl transfers says why
            failed.append((q, exc))
            return
        fetch.update(state="done", ended=self.cluster.clocks.monotonic(), error=None)
        plan = self.plan
        assert plan is not None  # only _run_plan ends a plan, once its fetches are over
        plan["todo"].discard(q)
        self.progress["partitions_left"] = len(plan["todo"])
        await self.cluster.storage.write([(keys.fetch_todo_key(q), None)])  # Rule 1

    def _partition(self, q: int) -> dict:
        """Partition ``q``'s own progress (what `kvctl transfers` shows on its row)."""
        return self.partitions.setdefault(q, {"state": "pending", "keys_done": 0,
                                              "bytes_done": 0, "started": None, "ended": None,
                                              "error": None})

    def _count(self, q: int, nkeys: int, nbytes: int) -> None:
        """Fetched ``nkeys`` objects and ``nbytes`` bytes of partition ``q``."""
        for progress in (self.progress, self._partition(q)):
            progress["keys_done"] += nkeys
            progress["bytes_done"] += nbytes

    def _sources(self, q: int) -> list[str]:
        """Every up node that held partition ``q`` before: a key acknowledged by W of them
        may be on any one only, so the fetch merges all of them.

        A holder that is down and departing (it will not be a replica, so anti-entropy can
        not bring its keys later) is waited for: KvdError, the plan retries. With no holder
        up at all (a wiped node restoring on a changed ring), the current replicas serve.
        """
        cluster = self.cluster
        old = self._old_ring()
        holders = self._holders(q)
        new = cluster.state.ring
        staying = set(preference_list(new, q, cluster.replication(new)))
        up = [n for n in holders if cluster.is_up(n)]
        departing_down = [n for n in holders if n not in up and n not in staying
                          and cluster.state.status(n) is not None]
        if departing_down:
            down = ", ".join(departing_down)  # the caller names the partition
            raise KvdError(f"waiting for {down}, which holds it, is leaving, and is down: start "
                           f"it again, or drop it with `kvctl cluster force-remove NODE`")
        if not up:
            up = [n for n in preference_list(cluster.routing.serving_ring(), q, cluster.replication(old))
                  + sorted(staying) if n != cluster.me and cluster.is_up(n)]
        return list(dict.fromkeys(up))

    def _old_ring(self) -> Ring:
        return (self.plan and self.plan["old"]) or self.cluster.routing.serving_ring()

    def _holders(self, q: int) -> list[str]:
        """The other nodes that held partition ``q`` before: where it is fetched from."""
        old, me = self._old_ring(), self.cluster.me
        return [n for n in preference_list(old, q, self.cluster.replication(old)) if n != me]

    async def _fetch_partition(self, q: int) -> None:
        sources = self._sources(q)
        if not sources:
            raise KvdError(f"no replica of partition {q} is up to copy it from")
        cluster = self.cluster
        for node in sources:
            await self._fetch_from(RemoteReplica(node, cluster.peer_address(node), cluster.peers), q)

    async def _fetch_large(self, source: RemoteReplica, q: int, key: bytes) -> bytes | None:
        """One object too large for a scan reply, in pieces (restarted if it changes)."""
        budget = scan_budget(self.cluster.config.max_frame)
        for _ in range(5):
            parts: list[bytes] = []
            total = None
            while total is None or sum(map(len, parts)) < total:
                with trio.fail_after(self.cluster.config.request_timeout * 3):
                    reply = await source.scan_piece(q, key, sum(map(len, parts)), budget)
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
        store = self.cluster.store
        after = b""
        while True:
            with trio.fail_after(self.cluster.config.request_timeout * 3):
                reply = await source.scan(q, after, TRANSFER_BATCH,
                                          scan_budget(self.cluster.config.max_frame))
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
                    if sibling.chunks is not None and not store.has_value_bytes(sibling.chunks):
                        await self._fetch_blob_anywhere(source, q, key, sibling.chunks)
            # Merged concurrently, so the whole batch shares a group commit (one fsync).
            async with trio.open_nursery() as nursery:
                for key, obj in objects:
                    nursery.start_soon(store.merge, key, obj)
            if objects:
                after = objects[-1][0]
            batch_bytes = sum(len(raw) for _, raw in raws)
            self._count(q, len(objects), batch_bytes)
            await self._throttle(batch_bytes)
            if reply["done"]:
                return

    async def _throttle(self, nbytes: int) -> None:
        """Hold every fetch of this node together to ``transfer_rate_mb``: each batch reserves
        its share of time after those already reserved (concurrent fetches queue up)."""
        now = self.cluster.clocks.monotonic()
        rate = self.cluster.config.transfer_rate_mb * MIB
        self._throttle_at = max(self._throttle_at, now) + nbytes / rate
        if self._throttle_at > now:
            await trio.sleep(self._throttle_at - now)

    async def _fetch_blob_anywhere(self, source: RemoteReplica, q: int, key, ref) -> None:
        """A value's bytes from ``source``, or from another holder when ``source`` lacks
        them (its blob file deleted or cut): one holder's damage must not stop the fetch
        for good, as it stopped a restore (outside tester)."""
        cluster = self.cluster
        try:
            return await self._fetch_blob(source, q, key, ref)
        except KvdError as exc:
            failures = [f"{source.node}: {exc}"]
        for node in self._sources(q):
            if node != source.node:
                other = RemoteReplica(node, cluster.peer_address(node), cluster.peers)
                try:
                    await self._fetch_blob(other, q, key, ref)
                except KvdError as exc:
                    failures.append(f"{node}: {exc}")
                else:
                    log.warning("the bytes of the value of %r were fetched from %s: %s",
                                key[:64], node, failures[0])
                    return
        raise KvdError(f"no holder could send the bytes of the value of {key[:64]!r} "
                       f"({'; '.join(failures)})")

    async def _fetch_blob(self, source, q: int, key, ref) -> None:
        offset = 0
        piece = min(MIB, scan_budget(self.cluster.config.max_frame))  # a reply fits our frame limit
        async for data in source.read_chunks(key, ref, piece):
            await self.cluster.store.write_chunk(key, ref.vid, offset, data)
            offset += len(data)
            self._count(q, 0, len(data))
            await self._throttle(len(data))  # large values count towards the rate too

    # ------------------------------------------------------------- answering fetchers

    def scan_partition(self, q: int, after: bytes, limit: int, max_bytes: int) -> dict:
        """Objects of partition ``q`` after user key ``after`` (for a fetching node): at most
        ``limit`` objects and ``max_bytes`` bytes. An object larger than that on its own is
        named as ``large`` (the fetcher reads it with ``scan_piece``)."""
        slot = self.cluster.store.slot(q)
        start, stop = keys.object_range(slot)
        if after:
            start = keys.object_key(slot, after) + b"\x00"
        return scan_page(self.cluster.storage, start, stop, limit, max_bytes)

    def scan_piece(self, q: int, key: bytes, offset: int, max_bytes: int) -> dict:
        """Bytes ``offset..offset+max_bytes`` of one stored object of partition ``q``."""
        raw = self.cluster.storage.get(keys.object_key(self.cluster.store.slot(q), key)) or b""
        return {"piece": raw[offset:offset + max_bytes], "total": len(raw), "done": False}

    def rows(self) -> list[dict]:
        """This node's view of pending moves, and every partition it fetches as a new
        replica (a join's or a force-remove's refill: ``from`` lists its holders), with its
        progress and state (pending, running, retrying with its ``error``, done)."""
        me = self.cluster.me
        rows = []
        for move in self.cluster.state.pending:
            row = {"partition": move.partition, "from": move.source, "to": move.target,
                   "keys_done": 0, "bytes_done": 0, "rate_bps": 0, "state": "pending",
                   "error": None}
            if move.target == me and move.partition in self.partitions:
                row.update(self._progress_of(move.partition))
            rows.append(row)
        moving = {move.partition for move in self.cluster.state.pending if move.target == me}
        for q in sorted(set(self.partitions) - moving):
            rows.append({"partition": q, "from": ",".join(self._holders(q)), "to": me,
                         **self._progress_of(q)})
        return rows

    def _progress_of(self, q: int) -> dict:
        fetch = self.partitions[q]
        ended = fetch["ended"] if fetch["ended"] is not None else self.cluster.clocks.monotonic()
        elapsed = max(ended - (fetch["started"] or ended), 1e-3)
        return {"keys_done": fetch["keys_done"], "bytes_done": fetch["bytes_done"],
                "rate_bps": round(fetch["bytes_done"] / elapsed) if fetch["started"] else 0,
                "state": fetch["state"], "error": fetch["error"]}
