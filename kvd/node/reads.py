"""Quorum reads: the object from R replicas, a digest from the others, then read repair
(docs/DECISIONS.md, "Reads ask R replicas for the object, the others for a digest").

1. Of a key's replicas, R are asked for the object: this node first when it is one (a
   local read sends no message), then those not suspected (coordinator rule 5), in
   preference-list order. The others are asked only for a digest of what they hold
   (8 bytes instead of the object, and nothing for the coordinator to decode or merge).
2. A data read that fails (an error, or no answer within ``replica_timeout``: coordinator
   rule 1) is replaced at once by a data read of a replica asked only for its digest, so
   any R replicas that answer make the quorum, as when every replica was asked for data.
   So are the data reads still short of R a hedge delay after they were sent (Dynamo's
   and Cassandra's speculative retry): a silent replica costs a read a hedge delay, not
   ``replica_timeout``.
3. Digests never count towards R. After the answer, read repair waits for the calls still
   running (up to ``request_timeout``), merges the late objects in, and writes the merged
   object back to every replica whose object, or digest, differs from it, or whose copy
   was damaged (``Damaged``: disk rot; kvd.node.local Rule 9). A large value's copy that
   was damaged (its bytes rotted, missing or short) gets the value's bytes first, read
   from the replicas that hold it; a stale one is left to anti-entropy, which streams them.
4. With fewer than R replicas that have not timed out recently (coordinator rule 5), R
   answers cannot be expected: the read waits a hedge delay at most, then fails naming
   every replica that answered nothing (coordinator rule 10). A replica only late is
   asked last for the object, not counted out.
5. The read before a write without a context (coordinator rule 7, ``current_context``)
   asks n - w + 1 replicas for the object, this node's inline, and a spare for each that
   fails or for none answering within a hedge delay (docs/DECISIONS.md).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import trio

from kvd import versions
from kvd.errors import Damaged, KvdError, QuorumFailed
from kvd.node.large_values import PIECE, Holders, chunk_source
from kvd.node.outcomes import Outcomes
from kvd.node.quorum_message import quorum_message
from kvd.node.replica import LocalReplica, Replica, Role
from kvd.node.replica_health import ReplicaTimedOut

if TYPE_CHECKING:
    from kvd.node.coordinator import Coordinator

log = logging.getLogger("kvd.coordinator")


@dataclass
class ReadResult:
    obj: versions.VersionedObject | None
    replicas: int  # how many replicas answered before we replied
    source: Holders | None  # the replicas holding every chunk of obj's chunked siblings

# How one call of a read ended: (replica, a data read?, succeeded?, object/digest or error).
Answer = tuple[Replica, bool, bool, Any]


def split_reads(replicas: list[Replica], r: int,
                suspected) -> tuple[list[Replica], list[Replica]]:
    """Rule 1: (the replicas asked for the object, those asked for a digest)."""
    ordered = sorted(replicas, key=lambda rep: (not isinstance(rep, LocalReplica),
                                                suspected(rep.node)))
    return ordered[:r], ordered[r:]


async def quorum_read(co: Coordinator, key: bytes, replicas: list[Replica],
                      r: int) -> ReadResult:
    deadline = co.clock() + co.request_timeout
    data, spare = split_reads(replicas, r, co.health.suspected)
    answers = Outcomes[Answer]()

    async def ask(replica: Replica, full: bool) -> None:
        result: Any
        try:
            if full:
                result = await co._call(replica, lambda rep: rep.get(key), deadline)
            else:
                result = await co._call(replica, lambda rep: rep.digest(key), deadline)
        except (KvdError, OSError) as exc:  # anything else is a bug (docs/DECISIONS.md)
            answers.send_nowait((replica, full, False, exc))
        else:
            answers.send_nowait((replica, full, True, result))

    for replica in replicas:
        if replica in data and isinstance(replica, LocalReplica) and replica.role is Role.PRIMARY:
            # A local read never blocks: read now, with no task and no deadline (a task and
            # its cancel scope cost about 15 µs of CPU a call on this machine).
            try:
                answers.send_nowait((replica, True, True, replica.read_now(key)))
            except (KvdError, OSError) as exc:
                answers.send_nowait((replica, True, False, exc))
        else:
            co.background.start_soon(ask, replica, replica in data)
    running, reading = len(replicas), len(data)
    ok: list[tuple[Replica, Any]] = []
    failed: list[tuple[Replica, BaseException]] = []
    digests: dict[Replica, bytes | None] = {}
    damaged: list[Replica] = []  # replicas whose copy failed its checksum: repaired (rule 3)
    # The calls end by the deadline; the margin lets their tasks report. Coordinator rule
    # 10: with fewer than R replicas that have not timed out, a hedge delay at most, then
    # fail fast. A replica merely late is no reason to fail: rule 2 asks a spare instead.
    until = deadline + co.replica_timeout
    hedge_at = co.clock() + co.health.hedge_delay()
    trusted = sum(not co.health.timed_out(rep.node) for rep in replicas)
    if trusted < r:
        until = min(until, hedge_at)
    while len(ok) < r and reading:
        with trio.move_on_at(min(until, hedge_at) if spare else until):
            while len(ok) < r and reading:
                replica, full, success, value = await answers.receive()
                running -= 1
                if not success and isinstance(value, Damaged):
                    damaged.append(replica)
                if not full:
                    if success:
                        digests[replica] = value
                    continue
                reading -= 1
                if success:
                    ok.append((replica, value))
                    continue
                failed.append((replica, value))
                if spare:  # rule 2
                    co.background.start_soon(ask, spare.pop(0), True)
                    running += 1
                    reading += 1
        if len(ok) >= r or co.clock() >= until:
            break
        # Rule 2: the data reads are a hedge delay late; spares are asked for the object
        # (none left when failures took them all: then the reads are awaited until ``until``).
        for _ in range(min(r - len(ok), len(spare))):
            co.background.start_soon(ask, spare.pop(0), True)
            running += 1
            reading += 1
        hedge_at = until
    if len(ok) < r:
        heard = {id(rep) for rep, _ in ok + failed} | {id(rep) for rep in digests}
        why = "no answer" if trusted >= r else "no answer; it timed out recently"
        failed += [(rep, ReplicaTimedOut(why)) for rep in replicas if id(rep) not in heard]
        raise QuorumFailed(quorum_message("read", r, ok, failed))
    merged = None
    for _, obj in ok:
        if obj is not None:
            merged = obj if merged is None else versions.sync(merged, obj)
    source = chunk_source(merged, ok, replicas)
    if co.read_repair and merged is not None:
        co.background.start_soon(repair, co, key, merged, dict(ok), digests, answers, running,
                                 damaged, source)
    return ReadResult(merged, len(ok), source)


async def repair(co: Coordinator, key: bytes, merged: versions.VersionedObject,
                 answered: dict, digests: dict, late: Outcomes[Answer],
                 outstanding: int, damaged: list[Replica], source: Holders | None) -> None:
    """Rule 3: after answering, wait for the calls still running, merge their objects in,
    and write the result back to every replica that was stale or damaged."""
    with trio.move_on_after(co.request_timeout):
        for _ in range(outstanding):
            replica, full, success, value = await late.receive()
            if not success:
                if isinstance(value, Damaged):
                    damaged.append(replica)
                continue
            if full:
                answered[replica] = value
                if value is not None:
                    merged = versions.sync(merged, value)
            else:
                digests[replica] = value
    if any(s.chunks is not None for s in merged.siblings):
        for replica in damaged:
            if source is not None:
                await _refill(co, key, merged, replica, source)
        return  # stale copies of large values are repaired by anti-entropy
    want = versions.object_digest(merged)
    stale = [rep for rep, obj in answered.items() if obj != merged]
    stale += [rep for rep, digest in digests.items() if rep not in answered and digest != want]
    stale += damaged
    for replica in stale:
        try:
            with trio.fail_after(co.replica_timeout):
                await replica.merge(key, merged)
            co.read_repairs += 1
        except (KvdError, trio.TooSlowError, OSError) as exc:
            log.info("read repair of %r on %s failed: %s", key[:64], replica.node, exc)


async def _refill(co: Coordinator, key: bytes, merged: versions.VersionedObject,
                  replica: Replica, source: Holders) -> None:
    """Rule 3 for a large value's damaged copy: send ``replica`` the bytes it lacks, a
    piece at a time from the other holders, then the object (which seals them there)."""
    refill = (id(co), replica.node, key)
    holders = Holders([rep for rep in source.replicas if rep is not replica])
    if refill in _REFILLING or not holders.replicas:  # one refill at a time
        return
    _REFILLING.add(refill)
    try:
        for ref in [s.chunks for s in merged.siblings if s.chunks is not None]:
            with trio.fail_after(co.replica_timeout):
                if await replica.has_blob(key, ref):
                    continue
            for offset in range(0, ref.length, PIECE):
                data = await holders.read_piece(key, ref, offset, min(PIECE, ref.length - offset))
                with trio.fail_after(co.replica_timeout):
                    await replica.write_chunk(key, ref.vid, offset, data)
        with trio.fail_after(co.replica_timeout):
            await replica.merge(key, merged)
        co.read_repairs += 1
        log.info("refilled the large value of %r on %s", key[:64], replica.node)
    except (KvdError, trio.TooSlowError, OSError) as exc:
        log.info("read repair of the large value of %r on %s failed: %s", key[:64],
                 replica.node, exc)
    finally:
        _REFILLING.discard(refill)


_REFILLING: set[tuple[int, str, bytes]] = set()  # (coordinator, replica, key) being refilled


async def current_context(co: Coordinator, key: bytes, n: int, w: int) -> versions.Context:
    """Rule 7: what a write without a context supersedes, read from the key's replicas.
    It reads n - w + 1 of them, enough to meet every write acknowledged at this W: this
    node's object inline when it is one, then the others in the order mints try them
    (rule 5: suspected and slow ones last), a spare asked at once for each that fails.
    It waits no longer than the hedge delay after the first answer (rule 8), nor for
    replicas suspected (rule 5): a replica it missed can only make this write a sibling
    of what that replica holds, never lose a value. (Asking only n - w + 1 instead of
    all n: one peer read less per write at N3 W2.)"""
    replicas = co.read_replicas(key, n)
    # A suspected replica (rule 5) is not waited for: it would cost every write a hedge.
    trusted = sum(not co.health.suspected(rep.node) for rep in replicas)
    needed = max(1, min(trusted, n - w + 1))
    ok: list[tuple[Replica, Any]] = []
    others = []
    for rep in replicas:
        if isinstance(rep, LocalReplica) and rep.role is Role.PRIMARY:
            # A local read never blocks: read now, with no task and no deadline.
            try:
                ok.append((rep, rep.read_now(key)))
            except (KvdError, OSError) as exc:
                log.info("rule 7's read of %r here failed: %s", key[:64], exc)
        else:
            others.append(rep)
    health = co.health
    spares = sorted(others, key=lambda rep: (health.suspected(rep.node), health.slow(rep.node)))
    deadline = co.clock() + co.replica_timeout
    # (replica, succeeded?, its object or error), as Coordinator._quorum's outcomes
    outcomes = Outcomes[tuple[Replica, bool, Any]]()
    running = 0

    def get(replica: Replica):
        return replica.get(key)

    def ask(count: int) -> None:
        nonlocal running
        for _ in range(min(count, len(spares))):
            co.background.start_soon(co._reported, spares.pop(0), get, deadline, outcomes)
            running += 1

    ask(needed - len(ok))
    # A hedge delay after the first answer (this node's, when it is one) at most. With
    # none by then, the spares are asked too (rule 8), and the first answer is awaited
    # until the calls' deadline (the margin lets them report).
    until = co.clock() + co.health.hedge_delay()
    while len(ok) < needed and (running or (spares and not ok)):
        with trio.move_on_at(until) as waiting:
            replica, success, value = await outcomes.receive()
        if waiting.cancelled_caught:
            if ok or not spares:
                break
            ask(len(spares))
            until = deadline + co.replica_timeout
            continue
        running -= 1
        if success:
            if not ok:
                until = co.clock() + co.health.hedge_delay()
            ok.append((replica, value))
        else:
            ask(1)
    merged = versions.empty()
    for _, obj in ok:
        if obj is not None:
            merged = versions.sync(merged, obj)
    return versions.context_of(merged)
