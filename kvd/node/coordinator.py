"""The request coordinator: quorum reads and writes over a key's replicas.

Any node coordinates any request. For a write it (1) streams a large value's chunks to every
target replica, (2) asks one replica (itself when it is one) to mint the new version, so dots
are only ever minted by a replica that holds the key's history, (3) merges that version into
the other replicas, and answers once W replicas hold it durably. For a read it asks R
replicas for the object and the others for a digest, answers after R objects with their
merge, then repairs the replicas that were stale (kvd.node.reads).

Requests keep running on the remaining replicas after the answer (Dynamo's behaviour): the
background work lives in the node's nursery, not the request's.

Failure handling (DESIGN section 4):

1. Every call to one replica has ``replica_timeout`` to answer; one that does not counts as
   failed for this request (Dynamo's local failure view), whatever the failure detector
   says. A mint that fails moves to the next primary at once; the whole request (mint and
   replication, not the client's upload) is bounded by ``request_timeout``. Reads and
   inline values' mints on this node alone have none (a shielded commit: none could cut it).
2. Every attempt of one client write carries the same write id, so a mint that times out
   but lands later is the same sibling as its retry (versions rule 7): at most once.
3. A replication leg that fails or times out leaves a hint for its node here, kept before
   the leg is given up (Cassandra's behaviour); it never counts towards W. When W is then
   short, routing is asked again with the failed nodes taken as down, and the fallbacks it
   names stand in for them (sloppy quorum) and count, as they would had the failure
   detector seen the failure. (Not for large values: a fallback has none of their bytes.)
4. A quorum error names every replica asked and what happened to it.
5. A replica suspected (a call to it is a hedge delay late, or one timed out recently) is
   tried last for minting and is not waited for where others can answer, so a partition
   the failure detector cannot see (gossip relayed around it) costs the requests in flight
   when it began a hedge delay, not every request a ``replica_timeout``. So is a slow one
   (a lossy link). kvd.node.replica_health keeps this view, and the hedge delay.
6. Every ``get`` and ``put`` ends by telling the ``observer`` (if any) how long it took and
   how it ended; kvd.metrics is the observer, so this module knows nothing of metrics.
7. A write without a context (None) supersedes what the key's replicas hold when it is
   made: the coordinator reads them first, in the same request (DESIGN section 2). Only
   writes it cannot see, made concurrently elsewhere, become siblings. A blind write (an
   empty context) supersedes nothing. Those of one key take turns here (kvd.node.turns;
   a streamed value's turn starts once its upload is in, so it never holds the turn while
   its client's connection waits),
   except when this node is the key's only replica: then the mint reads what it supersedes
   itself, pending writes included (kvd.node.local Rule 4), so there is no read before it
   and same-key writes share a group commit.
8. A late replica does not hold a request up while others can answer (Dynamo's hedged
   requests): a mint not answered within the hedge delay (a few times the typical mint
   time, at least ``HEDGE_FLOOR``, at most ``replica_timeout``) is also asked of the next
   primary, with the same write id (rule 2 makes the two one write); the read that rule 7
   makes returns once the hedge delay has passed after its first answer.
9. Nor does a silent replica hold a write's replication up: the primaries that have not
   answered a hedge delay after the legs were sent (at once when they are suspected, rule
   5, and the others cannot make W) are taken as down, and rule 3's fallbacks stand in for
   them while their legs go on (a late answer still counts; a failure leaves a hint). Rule
   7's read does not wait for suspected replicas. Fallbacks only hold hints (only
   primaries mint, docs/DECISIONS.md). Not for large values (rule 3). kvd.node.replication
   holds rules 3 and 9.
10. A read that has fewer than R replicas not suspected (rule 5) cannot expect R answers:
    it waits a hedge delay at most, then fails (exit 3), naming every replica
    (kvd.node.reads).
11. A write is acknowledged once W distinct nodes hold it, and, during a transition, W of
    the key's replicas on the serving ring and W on the new ring (``write_quorum``, from
    routing; kvd.node.replication.WriteQuorum): a leaving replica and a new one alone are
    not enough, since the new ring would then hold one copy.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import trio

from kvd import versions
from kvd.clocks import REAL
from kvd.errors import BadRequest, KvdError, QuorumFailed, TooManySiblings
from kvd.node.large_values import chunk_source, discard_upload, minted_inline, stream_chunks
from kvd.node.outcomes import Outcomes
from kvd.node.quorum_message import quorum_message
from kvd.node.reads import ReadResult, current_context, quorum_read
from kvd.node.replica import LocalReplica, Replica, Role
from kvd.node.replica_health import ReplicaHealth, ReplicaTimedOut
from kvd.node.replication import WriteQuorum, replicate, spread_late_twins
from kvd.node.turns import KeyTurns

log = logging.getLogger("kvd.coordinator")

MAX_VALUE = 1 << 30  # 1 GiB, DESIGN section 2
WRITE_ID_BYTES = 8  # unique among one key's siblings is all a write id needs

T = TypeVar("T")  # what one replica call returns
# How one replica call ended: (replica, True, its result) or (replica, False, its error).
Outcome = tuple[Replica, bool, Any]


@dataclass
class WriteResult:
    obj: versions.VersionedObject
    replicas: int


class RequestObserver(Protocol):
    """What wants to know about each client request the coordinator answers (rule 6)."""

    def request_finished(self, op: str, seconds: float, obj: versions.VersionedObject | None,
                         error: BaseException | None) -> None:
        """``op`` is "get", "put" or "delete"; ``seconds`` the time to reach R or W replicas
        on the node's monotonic clock; ``obj`` what was read (None: nothing) or written;
        ``error`` what the request raised (a KvdError, trio.Cancelled, a bug), else None."""


class Coordinator:
    """Quorum logic over whatever replicas ``replicas_for`` names for a key."""

    def __init__(
        self,
        read_replicas: Callable[[bytes, int], Sequence[Replica]],
        write_replicas: Callable[..., Sequence[Replica]],
        background: trio.Nursery,
        request_timeout: float,
        read_repair: bool = True,
        *,
        replica_timeout: float | None = None,
        keep_hint: Callable[[str, bytes, versions.VersionedObject], Awaitable] | None = None,
        clock: Callable[[], float] | None = None,
        write_quorum: Callable[[bytes, int, int], WriteQuorum] | None = None,
    ):
        """``keep_hint(node, key, obj)`` stores a durable hint for a failed leg (None: hinted
        handoff is off); ``clock`` is the node's monotonic
        clock (trio's: deadlines are cancel scopes); ``write_quorum(key, n, w)`` what a write
        needs (rule 11; None: W replicas). ``observer`` starts empty: kvd.metrics
        sets itself there when it attaches to the node (rule 6)."""
        self.read_replicas = read_replicas
        self.write_replicas = write_replicas
        self.background = background
        self.request_timeout = request_timeout
        self.replica_timeout = min(replica_timeout or request_timeout, request_timeout)
        self.read_repair = read_repair
        self.keep_hint = keep_hint
        self.clock = clock or REAL.monotonic
        self.write_quorum = write_quorum or (lambda key, n, w: WriteQuorum(w))
        self.read_repairs = 0
        self.hints_kept = 0  # hints kept for replication legs that failed (rule 3)
        self.health = ReplicaHealth(self.clock, self.replica_timeout)  # rules 1, 5 and 8
        self._call = self.health.call
        self.observer: RequestObserver | None = None
        self._turns = KeyTurns()  # writes without a context, per key (rule 7)

    async def _quorum(
        self,
        replicas: Sequence[Replica],
        call: Callable[[Replica], Awaitable[T]],
        enough: Callable[[list[tuple[Replica, T]]], bool],
        deadline: float | None = None,
        on_failure: Callable[[Replica, BaseException], Awaitable] | None = None,
        patience: float | None = None,
        hedge: float | None = None,
    ) -> tuple[list[tuple[Replica, T]], list[tuple[Replica, BaseException]],
               Outcomes[Outcome]]:
        """Run ``call`` on every replica; return once those that succeeded are ``enough`` or
        all finished.

        Each call has ``replica_timeout`` (rule 1). Calls still running when we return go on
        in the background nursery; their outcomes arrive later on the returned channel (read
        repair waits for them). ``on_failure(replica, exc)`` runs in the failed call's task
        before its outcome is reported, so what it does is done before a quorum error.
        A call fails with a KvdError or an OSError; anything else is a bug, not a failed
        replica, and ends the node (docs/DECISIONS.md). ``hedge`` (seconds): return then
        too, short or not; the calls not answered are not counted failed (rule 9).
        """
        if deadline is None:
            deadline = self.clock() + self.request_timeout
        outcomes = Outcomes[Outcome]()
        for replica in replicas:
            self.background.start_soon(self._reported, replica, call, deadline, outcomes,
                                       patience, on_failure)
        ok: list[tuple[Replica, T]] = []
        failed: list[tuple[Replica, BaseException]] = []
        # The calls end by the deadline; the margin lets their failure handlers finish.
        until = deadline + (patience or self.replica_timeout)
        if hedge is not None:
            until = min(until, self.clock() + hedge)
        with trio.move_on_at(until):
            while not enough(ok) and len(ok) + len(failed) < len(replicas):
                replica, success, value = await outcomes.receive()
                (ok if success else failed).append((replica, value))
        if hedge is not None:
            return ok, failed, outcomes
        answered = {id(rep) for rep, _ in ok + failed}
        if not enough(ok):
            failed += [(rep, ReplicaTimedOut("no answer")) for rep in replicas
                       if id(rep) not in answered]
        return ok, failed, outcomes

    async def _reported(self, replica: Replica, call: Callable[[Replica], Awaitable[T]],
                        deadline: float, outcomes: Outcomes[Outcome],
                        patience: float | None = None,
                        on_failure: Callable[[Replica, BaseException], Awaitable] | None = None
                        ) -> None:
        """One call of a fan-out, in its own task: its outcome goes to ``send``, after
        ``on_failure(replica, exc)`` when it failed (``_quorum``)."""
        try:
            result = await self._call(replica, call, deadline, patience)
        except (KvdError, OSError) as exc:
            if on_failure is not None:
                await on_failure(replica, exc)
            outcomes.send_nowait((replica, False, exc))
        else:
            outcomes.send_nowait((replica, True, result))

    async def _observed(self, op: str, request: Awaitable):
        """Await ``request`` (a read or a write), then tell the observer how it went."""
        started = self.clock()
        try:
            result = await request
        except BaseException as exc:
            if self.observer is not None:
                self.observer.request_finished(op, self.clock() - started, None, exc)
            raise
        if self.observer is not None:
            self.observer.request_finished(op, self.clock() - started, result.obj, None)
        return result

    async def get(self, key: bytes, n: int, r: int) -> ReadResult:
        """Read ``key`` at quorum R from its ``n`` replicas (observed, rule 6)."""
        replicas = self.read_replicas(key, n)
        if len(replicas) == 1 and r == 1 and isinstance(replicas[0], LocalReplica):
            return self._read_here(key, replicas[0])  # the single-node hot path: no await
        return await self._observed("get", self._read(key, replicas, r))

    def get_here(self, key: bytes, n: int, r: int) -> ReadResult | None:
        """``get`` when this node's replica is the only one it asks (one node, or N=1
        here), at once: a local read never blocks, so it needs no task, deadline or
        schedule point. None when other replicas must be asked."""
        replicas = self.read_replicas(key, n)
        if len(replicas) == 1 and r == 1 and isinstance(replicas[0], LocalReplica):
            return self._read_here(key, replicas[0])
        return None

    def _read_here(self, key: bytes, here: LocalReplica) -> ReadResult:
        started = self.clock()
        try:
            obj = here.read_now(key)
        except BaseException as exc:
            if self.observer is not None:
                self.observer.request_finished("get", self.clock() - started, None, exc)
            raise
        if self.observer is not None:
            self.observer.request_finished("get", self.clock() - started, obj, None)
        return ReadResult(obj, 1, chunk_source(obj, [(here, obj)]))

    async def _read(self, key: bytes, replicas: Sequence[Replica], r: int) -> ReadResult:
        if len(replicas) == 1 and r == 1:  # one remote replica: no fan-out, no task
            try:
                obj = await self._call(replicas[0], lambda rep: rep.get(key),
                                       self.clock() + self.request_timeout)
            except ReplicaTimedOut as exc:
                raise QuorumFailed(quorum_message("read", r, [], [(replicas[0], exc)])) from None
            return ReadResult(obj, 1, chunk_source(obj, [(replicas[0], obj)]))
        return await quorum_read(self, key, list(replicas), r)

    async def put(self, key: bytes, context: versions.VersionVector | None, n: int, w: int, *,
                  value: bytes = b"", deleted: bool = False, length: int = 0,
                  chunks: AsyncIterator[bytes] | None = None, timestamp: float = 0.0,
                  vid: bytes = b"") -> WriteResult:
        """Write a value (inline, or streamed from ``chunks``) or a tombstone at quorum W
        (observed, rule 6). ``context`` None: supersede what the replicas hold now (rule 7);
        an empty context adds a sibling to whatever is there (a blind write)."""
        op = "delete" if deleted else "put"
        if context is None and chunks is None and w == 1:
            only = self._only_replica_here(key, n)
            if only is not None:
                return await self._observed(op, self._write_here(
                    key, only, {"value": value, "deleted": deleted, "timestamp": timestamp,
                                "wid": os.urandom(WRITE_ID_BYTES)}))
        return await self._observed(op, self._write(
            key, context, n, w, value=value, deleted=deleted, length=length,
            chunks=chunks, timestamp=timestamp, vid=vid))

    def _only_replica_here(self, key: bytes, n: int) -> LocalReplica | None:
        """This node's replica when it is the only one a write of ``key`` goes to and the
        only one rule 7's read would ask (one node, or N=1 on this node)."""
        written = self.write_replicas(key, n)
        if len(written) != 1 or written[0].role is not Role.PRIMARY:
            return None
        here = written[0]
        read = self.read_replicas(key, n)
        if not isinstance(here, LocalReplica) or len(read) != 1 or read[0] is not here:
            return None
        return here

    async def _write_here(self, key: bytes, here: LocalReplica, payload: dict) -> WriteResult:
        """Rule 7 on the only replica: the mint supersedes the latest object it holds,
        read in the mint itself. No read, no turn, no task (redis-benchmark SET on one key:
        450-850/s before; 2,800-3,800/s after), no deadline (rule 1: 6% of a SET's CPU)."""
        minted = await self._mint_alone(here, lambda rep: here.supersede_latest(key, payload),
                                        1, None)
        return WriteResult(minted, 1)

    async def _write(self, key: bytes, context: versions.VersionVector | None, n: int, w: int,
                     *, value: bytes, deleted: bool, length: int,
                     chunks: AsyncIterator[bytes] | None, timestamp: float,
                     vid: bytes) -> WriteResult:
        replicas = list(self.write_replicas(key, n))
        if length > MAX_VALUE:
            raise BadRequest(f"value of {length} bytes exceeds the 1 GiB limit")
        # Rule 2: one id for every attempt of this write, wherever it is minted.
        payload: dict = {"deleted": deleted, "timestamp": timestamp,
                         "wid": os.urandom(WRITE_ID_BYTES)}
        # Rule 7's turn is taken after a streamed value's upload: a write waiting for the
        # turn must not leave its chunks unread, or the connection they share with the
        # writer holding the turn stalls, and the turn is never given back.
        turn = self._turns.turn(key) if context is None else nullcontext()
        if chunks is None:
            payload["value"] = value
            async with turn:
                if context is None:
                    context = await current_context(self, key, n, w)
                deadline = self.clock() + self.request_timeout
                minted, minter, failed = await self._mint(key, context, payload, replicas, w,
                                                          deadline)
                return await self._replicate(key, n, w, minted, minter, replicas, replicas,
                                             failed, deadline)
        try:
            targets, count = await stream_chunks(self._call, key, vid, length, chunks,
                                                 replicas, w)
        except BaseException:
            self._discard_upload(replicas, key, vid)
            raise
        payload["chunks"] = versions.ChunkRef(vid=vid, length=length, count=count)
        async with turn:
            try:
                if context is None:
                    context = await current_context(self, key, n, w)
                deadline = self.clock() + self.request_timeout  # the upload is the client's
                # A replica seals (fsyncs) the value's bytes before it stores the manifest:
                # proportional to the size, so these calls get the whole request's time.
                minted, minter, failed = await self._mint(key, context, payload, targets, w,
                                                          deadline, self.request_timeout)
            except BaseException:
                self._discard_upload(replicas, key, vid)
                raise
            return await self._replicate(key, n, w, minted, minter, targets, replicas, failed,
                                         deadline, self.request_timeout)

    def _discard_upload(self, replicas, key: bytes, vid: bytes) -> None:
        """No manifest references this upload anywhere: its chunks are garbage."""
        for replica in replicas:
            self.background.start_soon(discard_upload, replica, key, vid, self.replica_timeout)

    async def _replicate(self, key, n, w, minted, minter, targets, replicas, failed, deadline,
                         patience=None) -> WriteResult:
        """The version ``minter`` minted to the other ``targets`` (of the ``replicas`` the
        write was routed to), answered once its quorum holds it (rules 3, 9 and 11)."""
        quorum = self.write_quorum(key, n, w)
        others = [rep for rep in targets if rep is not minter]
        hints = [rep for rep in others if rep.role is Role.HINT]
        others = [rep for rep in others if rep not in hints]
        for hint in hints:  # local and durable before we answer; not counted towards W
            await hint.merge(key, minted)
        ok: list = []
        if others:  # rules 3 and 9 (kvd.node.replication)

            async def keep_hint(replica, exc) -> None:
                await self._keep_hint(replica, key, minted, exc)

            hedge = self.health.hedge_delay() if minted_inline(minted) else None
            ok = await replicate(self._quorum, self.write_replicas, key, n, minted, minter,
                                 others, quorum, replicas, failed, deadline,
                                 on_failure=keep_hint, patience=patience, hedge=hedge,
                                 suspected=self.health.suspected)
        holders = [minter] + [rep for rep, _ in ok]
        if quorum.missing(holders) > 0:
            raise QuorumFailed(quorum_message("write", w, holders, failed,
                                              quorum.short_rings(holders)))
        return WriteResult(minted, len(holders))

    async def _keep_hint(self, replica, key, obj, exc) -> None:
        """Rule 3: a replication leg failed; keep the write for its node (or for the down
        primary a fallback stood in for) and deliver it once that node is back."""
        target = replica.stands_for or replica.node
        if self.keep_hint is None or replica.role is Role.HINT:
            return
        try:
            await self.keep_hint(target, key, obj)
            self.hints_kept += 1
        except (KvdError, OSError) as hint_exc:  # the leg's own error is what the client sees
            log.warning("no hint kept for %s after %s: %s", target, exc, hint_exc)

    async def _mint(self, key, context, payload, replicas, w, deadline, patience=None):
        """Have the first primary that answers mint the new version (rules 1, 2, 5, 8);
        return it, the replica that minted it, and the primaries that failed to mint (the
        write still goes to them: one that timed out may have it, and otherwise they get a
        hint)."""
        errors: list[tuple[Replica, BaseException]] = []
        # Fallbacks hold hints; only a replica with the key's history mints.
        # This node first when it is a primary (as the module's step 2 says: no round trip
        # before the merges), a suspected replica last (rule 5).
        health = self.health
        waiting = sorted((rep for rep in replicas if rep.role is Role.PRIMARY),
                         key=lambda rep: (health.suspected(rep.node), health.slow(rep.node),
                                          not isinstance(rep, LocalReplica)))
        if len(waiting) == 1:
            only = waiting[0]
            minted = await self._mint_alone(
                only, lambda rep: rep.coordinate(key, context, payload), w,
                None if isinstance(only, LocalReplica) and not patience else deadline, patience)
            return minted, only, errors
        # A large value's mint seals bytes proportional to its size: one at a time.
        hedge = None if patience else self.health.hedge_delay()
        outcomes = Outcomes[tuple[Replica, Any, Any]]()

        async def attempt(replica: Replica) -> None:
            began = self.clock()
            try:
                minted = await self._call(
                    replica, lambda rep: rep.coordinate(key, context, payload), deadline, patience)
            except (KvdError, OSError) as exc:  # anything else is a bug (docs/DECISIONS.md)
                outcomes.send_nowait((replica, None, exc))
                return
            self.health.minted(replica.node, self.clock() - began)
            outcomes.send_nowait((replica, minted, None))

        running = 0
        while waiting or running:
            if waiting and (running == 0 or hedge is not None):
                replica = waiting.pop(0)
                if self.clock() >= deadline:
                    errors.append((replica, ReplicaTimedOut("not tried: the request timed out")))
                    continue
                # In the background: a late mint lands as a twin of the winner (rule 2).
                self.background.start_soon(attempt, replica)
                running += 1
            with trio.move_on_after(hedge if waiting and hedge is not None else math.inf):
                replica, minted, exc = await outcomes.receive()
                running -= 1
                if exc is None:
                    if running:
                        self.background.start_soon(
                            spread_late_twins, key, outcomes, running, replicas,
                            self.request_timeout, self.replica_timeout)
                    return minted, replica, errors
                if isinstance(exc, (TooManySiblings, BadRequest)):
                    raise exc  # no other replica would accept it either
                errors.append((replica, exc))
        raise QuorumFailed(quorum_message("write", w, [], errors))

    async def _mint_alone(self, replica: Replica, call, w: int, deadline: float | None,
                          patience: float | None = None) -> versions.VersionedObject:
        """A mint with no other primary to hedge with: ``call(replica)`` within its deadline
        (None: one that cannot block, rule 1), with no task and no channel (on one node the
        task, channel and wait loop were about 5% of the event loop under kvctl bench)."""
        try:
            if deadline is None:
                return await call(replica)
            return await self._call(replica, call, deadline, patience)
        except (TooManySiblings, BadRequest):
            raise  # no other replica would accept it either
        except (KvdError, OSError) as exc:  # anything else is a bug (docs/DECISIONS.md)
            raise QuorumFailed(quorum_message("write", w, [], [(replica, exc)])) from None
