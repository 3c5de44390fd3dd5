"""A write's replication, after its mint (coordinator rules 3, 9 and 11): the minted version
goes to the key's other replicas until its quorum holds it, with fallbacks standing in
(sloppy quorum) for the primaries that fail or stay silent; and the late twins of a hedged
mint (rule 8) go to the replicas that lack them.

It is the coordinator's, kept apart so that its module stays legible: ``quorum`` is the
coordinator's fan-out (``Coordinator._quorum``), ``write_replicas`` its routing.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import trio

from kvd import versions
from kvd.errors import KvdError
from kvd.node.replica import Replica, Role
from kvd.node.replica_health import ReplicaTimedOut


log = logging.getLogger("kvd.coordinator")


@dataclass(frozen=True)
class WriteQuorum:
    """Which replicas must hold a write before it is acknowledged (coordinator rule 11).

    ``w`` distinct nodes; and during a transition also ``w`` (at most the ring's count) of
    the key's replicas on each ring of ``rings``, the serving ring's and the new ring's (as
    Cassandra counts its pending replicas). Otherwise a write held by a leaving replica and a
    new one alone ends on one replica of the new ring once the leaver has handed off, and
    one loss loses it (full simulator seed 603). A fallback counts for the primary it stands
    for; a hint the coordinator keeps (Role.HINT) for none.
    """

    w: int
    rings: tuple[frozenset[str], ...] = ()

    def missing(self, holders: Iterable[Replica]) -> int:
        """How many more replicas must hold the write, at least (0 or less: enough)."""
        held = [rep for rep in holders if rep.role is not Role.HINT]
        missing = self.w - len({rep.node for rep in held})
        for ring in self.rings:
            missing = max(missing, min(self.w, len(ring)) - _count_on(ring, held))
        return missing

    def short_rings(self, holders: Iterable[Replica]) -> str:
        """The rings ``holders`` fall short on, for a quorum error ("": none)."""
        held = [rep for rep in holders if rep.role is not Role.HINT]
        said = [f"{_count_on(ring, held)} of {', '.join(sorted(ring))}" for ring in self.rings
                if _count_on(ring, held) < min(self.w, len(ring))]
        if not said:
            return ""
        return ("while the ring changes, a write needs W on the key's replicas of both rings;"
                f" it has {' and '.join(said)}")


def _count_on(ring: frozenset[str], held: list[Replica]) -> int:
    """Distinct nodes of ``held`` holding the write for one of ``ring``'s replicas."""
    return len({rep.node for rep in held if (rep.stands_for or rep.node) in ring})


async def replicate(fan_out, write_replicas, key: bytes, n: int, minted: versions.VersionedObject,
                    minter: Replica, others: list[Replica], quorum: WriteQuorum,
                    asked: list[Replica], failed: list, deadline: float, *, on_failure,
                    patience: float | None, hedge: float | None, suspected) -> list:
    """Merge ``minted`` (held by ``minter``) into ``others`` until ``quorum`` holds it; return
    the (replica, result) pairs of those that do.

    Rule 3: a leg that fails leaves a hint (``on_failure``, before the leg is given up), and
    when W is short the fallbacks routing names with the failed primaries taken as down
    stand in and count. Rule 9: when ``hedge`` (seconds) is given and the legs are still
    short after it, the primaries that have not answered are taken as down too: fallbacks
    stand in for them at once, while their legs go on (an answer that comes later still
    counts; one that fails still leaves a hint). When the primaries not ``suspected`` (a
    node -> bool: coordinator rule 5) cannot make W alone, the suspected ones get their
    stand-ins at once, without the hedge delay. ``hedge`` None (a large value: a fallback
    has none of its bytes) waits for the legs and asks no stand-in. Failures are appended
    to ``failed``, for the quorum error (rule 4).
    """
    def merge(rep: Replica):
        return rep.merge(key, minted)

    def enough(held: Sequence) -> bool:
        return quorum.missing([minter] + [rep for rep, _ in held]) <= 0

    at_once = hedge is not None and quorum.missing(
        [minter] + [rep for rep in others if not suspected(rep.node)]) > 0
    ok, lost, late = await fan_out(others, merge, enough, deadline, on_failure=on_failure,
                                   patience=patience, hedge=0.0 if at_once else hedge)
    failed += lost
    if enough(ok) or hedge is None:
        return ok
    answered = {id(rep) for rep, _ in ok + lost}
    silent = [rep for rep in others if id(rep) not in answered]
    down = {rep.node for rep, _ in failed if rep.role is Role.PRIMARY}
    down |= {rep.node for rep in silent if rep.role is Role.PRIMARY
             and (suspected(rep.node) or not at_once)}
    named = {(rep.node, rep.stands_for) for rep in asked}
    stand_ins = [rep for rep in write_replicas(key, n, down)
                 if rep.role is Role.FALLBACK
                 and (rep.node, rep.stands_for) not in named and rep.node not in down]

    async with trio.open_nursery() as race:  # the silent legs against the stand-ins

        async def silent_legs() -> None:
            try:
                with trio.move_on_at(deadline + (patience or 0.0) + hedge):
                    for _ in silent:
                        replica, success, value = await late.receive()
                        answered.add(id(replica))
                        (ok if success else failed).append((replica, value))
                        if enough(ok):
                            race.cancel_scope.cancel()
            finally:  # the legs still silent when we answer, for the quorum error
                failed.extend((rep, _no_answer()) for rep in silent
                              if id(rep) not in answered and not enough(ok))

        async def fallbacks() -> None:
            got, lost_too, _ = await fan_out(stand_ins, merge, lambda got: enough(ok + got),
                                             deadline)
            ok.extend(got)
            failed.extend(lost_too)
            if enough(ok):
                race.cancel_scope.cancel()

        if silent:
            race.start_soon(silent_legs)
        if stand_ins:
            race.start_soon(fallbacks)
    return ok


def _no_answer() -> ReplicaTimedOut:
    return ReplicaTimedOut("no answer")


async def spread_late_twins(key: bytes, late, outstanding: int, replicas: list[Replica],
                            request_timeout: float, replica_timeout: float) -> None:
    """Rule 8: a mint that lost the race may have applied its own dot of the write before
    the winner's version reached it (a twin). The others lack that dot, so it goes to
    them as read repair would send it, or replicas stay different until anti-entropy.
    ``late`` is the mint race's channel, with ``outstanding`` attempts still to report."""
    with trio.move_on_after(request_timeout):
        for _ in range(outstanding):
            loser, minted, exc = await late.receive()
            if exc is not None:
                continue
            for replica in replicas:
                if replica is not loser:
                    try:
                        with trio.fail_after(replica_timeout):
                            await replica.merge(key, minted)
                    except (KvdError, OSError, trio.TooSlowError) as err:
                        log.info("late twin of %r for %s not delivered: %s", key[:64],
                                 replica.node, err)
