"""The coverage query: every live key of the cluster, each partition read from one replica.

This is riak_core's coverage plan as Riak's list-keys uses it: the keyspace is walked
partition by partition in ring order; each partition is read from one live primary (this
node first when it is one), the next primary answering when one fails. A page is a few
partitions' keys, so the walk is resumable from ``(partition, after)`` and nothing holds more
than one page. kvctl keys (ADMIN ``keys`` on the client port) and RESP SCAN/DBSIZE
(kvd.node.resp_service) both page through ``page``; a replica answers with ``local_keys``
(REPLICA_GET ``keys`` on the peer port).

Rules:

1. A key is listed once: partitions are disjoint and walked in order, and each partition's
   keys come from one replica in key order, resumed after the last key returned.
2. Tombstones are not keys: a key whose siblings are all deletes is skipped.
3. It is a full scan, at R=1: a replica that missed a recent write (hinted handoff or
   anti-entropy not yet done) may miss its key, as in Riak.
"""

from __future__ import annotations

import trio

from kvd import versions
from kvd.errors import BadRequest, KvdError, Unavailable
from kvd.node.remote import RemoteReplica
from kvd.proto.messages import MAX_KEY_LEN
from kvd.storage import keys as layout

PAGE_LIMIT = 1000  # keys in one reply, at most
PARTITIONS_PER_PAGE = 64  # a page ends after this many partitions even when short of keys
SCAN_FACTOR = 8  # stored objects a replica may read per key asked (tombstones are skipped)


def local_keys(node, partition: int, after: bytes, prefix: bytes, limit: int) -> dict:
    """This replica's live keys of ``partition`` after ``after`` that start with ``prefix``:
    ``{keys, after, done}``; ``after`` is the last key looked at, where the next call
    resumes (rules 1, 2)."""
    if not node.cluster.restore.has_its_data:
        raise Unavailable(f"{node.node_id} is restoring its replicas after losing its data")
    _check_bounds(after, prefix, limit)
    slot = node.store.slot(partition)
    start, stop = layout.object_range(slot)
    if prefix > after:
        start = layout.object_key(slot, prefix)
    elif after:
        start = layout.object_key(slot, after) + b"\x00"
    found: list[bytes] = []
    last = after
    budget = limit * SCAN_FACTOR
    for object_key, raw in node.storage.iterate(start, stop):
        key = layout.user_key_of(object_key)[1]
        if not key.startswith(prefix):
            break
        last = key
        if versions.is_found(versions.decode_object(raw)):
            found.append(key)
        budget -= 1
        if len(found) == limit or budget == 0:
            return {"keys": found, "after": last, "done": False}
    return {"keys": found, "after": last, "done": True}


def _check_bounds(after: bytes, prefix: bytes, limit: int) -> None:
    if len(after) > MAX_KEY_LEN or len(prefix) > MAX_KEY_LEN:
        raise BadRequest(f"after and prefix must be at most {MAX_KEY_LEN} bytes")
    if not 1 <= limit <= PAGE_LIMIT:
        raise BadRequest(f"limit must be 1..{PAGE_LIMIT}, got {limit}")


async def page(node, partition: int, after: bytes = b"", prefix: bytes = b"",
               limit: int = PAGE_LIMIT) -> tuple[list[bytes], tuple[int, bytes] | None]:
    """Up to ``limit`` keys from ``(partition, after)`` on, and the position to resume at
    (None: the walk is complete)."""
    q = node.store.ring_size
    if not 0 <= partition < q:
        raise BadRequest(f"partition {partition} is not in 0..{q - 1}")
    _check_bounds(after, prefix, limit)
    out: list[bytes] = []
    for _ in range(PARTITIONS_PER_PAGE):
        reply = await _one_replica(node, partition, after, prefix, limit - len(out))
        out += reply["keys"]
        if reply["done"]:
            partition, after = partition + 1, b""
            if partition == q:
                return out, None
        else:
            after = reply["after"]
        if len(out) == limit:
            break
    return out, (partition, after)


async def _one_replica(node, partition: int, after: bytes, prefix: bytes, limit: int) -> dict:
    """Ask the partition's live primaries in turn, this node first, until one answers."""
    cluster = node.cluster
    n = min(node.config.n, node.member_count())
    primaries = [m for m in cluster.routing.primaries(partition, n) if cluster.is_up(m)]
    primaries.sort(key=lambda member: member != cluster.me)
    failures = []
    for member in primaries:
        try:
            if member == cluster.me:
                return local_keys(node, partition, after, prefix, limit)
            replica = RemoteReplica(member, cluster.peer_address(member), cluster.peers)
            with trio.fail_after(node.config.replica_timeout):
                return await replica.live_keys(partition, after, prefix, limit)
        except (KvdError, OSError, trio.TooSlowError) as exc:
            failures.append(f"{member}: {str(exc) or 'timed out'}")
    raise Unavailable(f"no replica of partition {partition} answered the key listing"
                      + (f" ({'; '.join(failures)})" if failures else " (none is up)"))


async def count(node) -> int:
    """The number of live keys in the cluster: the whole coverage walk, counted (exact at
    the moment each partition is read, and as costly as listing every key)."""
    total = 0
    position: tuple[int, bytes] | None = (0, b"")
    while position is not None:
        found, position = await page(node, *position)
        total += len(found)
    return total
