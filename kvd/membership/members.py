"""The gossiped heartbeat table: who exists, where to reach them, and who looks alive.

Pure: no I/O and no clock; ``now`` (seconds, the caller's monotonic clock) is an argument.
The gossip task (kvd/node/) calls ``tick(now)`` once per round, sends ``digest(now)`` to
``choose_gossip_targets(...)``, and ``merge``s every digest it receives.  The target of a
round answers with its own ``digest(now)`` (push-pull): with push alone, news about a node
reaches a given observer of a 64-node cluster up to ~14 s late, and no detector can then
both stay quiet and convict a dead node within 10 s (see phi.py).

Rules:

1. One record per node; the record with the higher ``(generation, heartbeat)`` wins.  A
   node's generation is its start epoch, so a restarted node outranks everything it said in
   its previous life even though its heartbeat starts again at 0.
2. Only the node itself writes its record (``tick``).  If gossip brings back a record about
   me that outranks mine (I restarted within the same second, or my clock went backwards),
   I jump past it so that my fresh record wins again.
3. Each gossiped record carries its ``age``: how long ago its node emitted it, as known by
   the sender (the time the sender has held it plus the age it arrived with).  Ages are
   sums of local durations, so no clocks need to agree; network transit (milliseconds) is
   ignored.  A record given without an age (a MemberInfo object) counts as emitted ``now``.
4. Liveness is a local judgement, never gossiped: node X is *up* for me while X's phi
   accrual detector is below the threshold.  The detector is fed each time X's heartbeat
   advances in my table, whoever brought the news, with the arrival time and the emission
   time (now - age); a newer generation resets X's detector (a restarted node's last
   heartbeat says nothing) and counts as a heartbeat.
5. Every detector of one table shares one history ("pooled"): all news travels by the same
   epidemic, so the delay distribution is one property of the cluster, learnt 60 times
   faster in a 64-node cluster, and one unlucky peer's short history cannot make its
   detector twitchy.  The per-node part is only the last emission heard.
6. A node first learned second-hand is up only if the news is fresh (its age is known and
   small); a stale record of a dead node can circulate for a while and proves nothing.  I am
   always up; nodes I have never heard of are down.
7. Records are never dropped here: a node that left stays in the table, judged down, and
   the cluster state (cluster_state.py) says whether it is still a member.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from kvd.membership.phi import HeartbeatHistory, PhiAccrualDetector

__all__ = ["STATUSES", "MemberInfo", "MemberTable"]

# Member statuses of the cluster state (cluster_state.py).  "down" is a local judgement of the
# failure detector, never gossiped; kvctl's UN/DN derive from it, UJ/UL from these.
STATUSES = ("joining", "valid", "leaving", "exiting")

# Ages above this are clamped: a peer's garbage must not push an estimate to -inf.
_MAX_AGE = 86400.0


@dataclass(frozen=True)
class MemberInfo:
    """One node's self-description, as gossiped."""

    node: str
    address: str  # client listener HOST:PORT
    peer_address: str  # peer listener HOST:PORT, what gossip dials
    generation: int  # start epoch (seconds): a restarted node has a higher generation
    heartbeat: int  # incremented by the node itself every gossip round
    ring_version: int = 0
    load_bytes: int = 0  # for `kvctl status`
    restoring: bool = False  # refetching its data after a wipe: `kvctl status` shows UJ

    @property
    def key(self) -> tuple[int, int]:
        """The order in which records of the same node supersede each other."""
        return (self.generation, self.heartbeat)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for the wire (msgpack/JSON)."""
        return {
            "node": self.node,
            "address": self.address,
            "peer_address": self.peer_address,
            "generation": self.generation,
            "heartbeat": self.heartbeat,
            "ring_version": self.ring_version,
            "load_bytes": self.load_bytes,
            "restoring": self.restoring,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> MemberInfo:
        """Inverse of to_dict; unknown keys (``age``, newer fields) are ignored.

        ValueError on a malformed record: it comes off the wire.
        """
        try:
            rec = cls(
                node=d["node"],
                address=d["address"],
                peer_address=d["peer_address"],
                generation=int(d["generation"]),
                heartbeat=int(d["heartbeat"]),
                ring_version=int(d.get("ring_version", 0)),
                load_bytes=int(d.get("load_bytes", 0)),
                restoring=d.get("restoring", False),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"malformed member record: {exc!r}") from None
        for name in ("node", "address", "peer_address"):
            if not isinstance(getattr(rec, name), str) or not getattr(rec, name):
                raise ValueError(f"malformed member record: {name} must be a non-empty string")
        if rec.generation < 0 or rec.heartbeat < 0:
            raise ValueError("malformed member record: negative generation or heartbeat")
        if not isinstance(rec.restoring, bool):
            raise ValueError("malformed member record: restoring must be true or false")
        return rec


def _age(raw: Any) -> float | None:
    """A gossiped age, sanitised: None when absent or not a finite number, else clamped."""
    if raw is None or isinstance(raw, bool):
        return None
    try:
        age = float(raw)
    except (TypeError, ValueError):
        return None
    if not math.isfinite(age):
        return None
    return min(max(age, 0.0), _MAX_AGE)


class MemberTable:
    """This node's view of every node's latest record and liveness."""

    def __init__(
        self,
        me: MemberInfo,
        threshold: float = 8.0,
        detector_options: Mapping[str, float] | None = None,
        pooled: bool = True,
    ) -> None:
        """``detector_options`` go to every PhiAccrualDetector (min_std, acceptable_pause,
        first_interval, window); ``pooled=False`` gives each node its own history."""
        self.me = me.node
        self.threshold = threshold
        self._detector_options: dict[str, Any] = dict(detector_options or {})
        window = int(self._detector_options.get("window", 1000))
        self._pool = HeartbeatHistory(window) if pooled else None
        self._records: dict[str, MemberInfo] = {me.node: me}
        self._emitted: dict[str, float] = {}  # my-clock estimate of each record's emission
        self._detectors: dict[str, PhiAccrualDetector] = {}
        self._was_up: dict[str, bool] = {me.node: True}

    def _new_detector(self) -> PhiAccrualDetector:
        return PhiAccrualDetector(threshold=self.threshold, history=self._pool, **self._detector_options)

    def tick(self, now: float, *, ring_version: int | None = None, load_bytes: int | None = None,
             restoring: bool | None = None) -> MemberInfo:
        """Bump my heartbeat (and refresh what I advertise); return my record."""
        mine = self._records[self.me]
        mine = replace(mine, heartbeat=mine.heartbeat + 1,
                       ring_version=mine.ring_version if ring_version is None else ring_version,
                       load_bytes=mine.load_bytes if load_bytes is None else load_bytes,
                       restoring=mine.restoring if restoring is None else restoring)
        self._records[self.me] = mine
        self._emitted[self.me] = now
        return mine

    def merge(self, records: Iterable[MemberInfo | Mapping[str, Any]], now: float) -> list[str]:
        """Take every record newer than mine; return the nodes whose liveness changed.

        ``records`` are digest dicts (from ``digest(now)``, with ``age``) or MemberInfo
        objects (no age).  A malformed dict raises ValueError before anything is applied.
        The returned list is ``check(now)``: changes caused by silence are reported too.
        """
        parsed: list[tuple[MemberInfo, float | None]] = []
        for item in records:
            if isinstance(item, MemberInfo):
                parsed.append((item, None))
                continue
            if type(item) is not dict and not isinstance(item, Mapping):  # the ABC check is slow
                raise ValueError(f"malformed member record: {type(item).__name__}")
            node = item.get("node")
            old = self._records.get(node) if isinstance(node, str) else None
            if old is not None and node != self.me:  # cheap skip of what I already have
                try:
                    theirs = (int(item["generation"]), int(item["heartbeat"]))
                    if theirs <= (old.generation, old.heartbeat):
                        continue
                except (KeyError, TypeError, ValueError):
                    pass  # from_dict below reports it
            parsed.append((MemberInfo.from_dict(item), _age(item.get("age"))))
        for rec, age in parsed:
            self._merge_one(rec, age, now)
        return self.check(now)

    def _merge_one(self, rec: MemberInfo, age: float | None, now: float) -> None:
        if rec.node == self.me:
            self._refute(rec)
            return
        old = self._records.get(rec.node)
        if old is not None and rec.key <= old.key:
            return
        emitted = now if age is None else now - age
        self._records[rec.node] = rec
        self._emitted[rec.node] = emitted
        if old is None:
            det = self._detectors[rec.node] = self._new_detector()
            if age is not None:  # rule 6: first sight proves life only with a known age
                det.heartbeat(now, emitted)
            return
        det = self._detectors[rec.node]
        if rec.generation > old.generation:
            det.reset()
        det.heartbeat(now, emitted)

    def _refute(self, rec: MemberInfo) -> None:
        mine = self._records[self.me]
        if rec.key < mine.key or rec == mine:
            return
        # rec.key >= mine.key, so rec.generation >= mine.generation: adopt it and go one past.
        self._records[self.me] = replace(mine, generation=rec.generation, heartbeat=rec.heartbeat + 1)

    def check(self, now: float) -> list[str]:
        """Nodes whose liveness changed since the last ``merge``/``check`` (sorted).

        A node first seen down is not a change; it is reported when it comes up.
        """
        changed = []
        was_up, detectors, me = self._was_up, self._detectors, self.me
        for node in self._records:
            det = detectors.get(node)  # is_up(), inline: this loop is gossip's hot spot
            up = node == me if det is None else det.heard_and_available(now)
            before = was_up.get(node)  # None: never judged
            if before != up:
                if before is not None or up:
                    changed.append(node)
                was_up[node] = up
        return sorted(changed)

    def digest(self, now: float | None = None) -> list[dict[str, Any]]:
        """What to gossip: every record as a plain dict, sorted by node.

        With ``now`` each dict carries ``age`` (rule 3); the gossip task should always pass
        it, or every observer falls back to arrival times and detects failures later.
        """
        out = []
        records, emitted_at = self._records, self._emitted
        for n in sorted(records):
            d = records[n].to_dict()
            if now is not None:
                emitted = emitted_at.get(n)
                d["age"] = 0.0 if emitted is None else round(max(now - emitted, 0.0), 3)
            out.append(d)
        return out

    def is_up(self, node: str, now: float) -> bool:
        """My judgement of ``node`` at ``now``: me always up, unknown nodes down."""
        det = self._detectors.get(node)
        if det is None:
            return node == self.me
        return det.heard_and_available(now)

    def phi(self, node: str, now: float) -> float | None:
        """The detector's phi for ``node`` (None for me and for unknown nodes)."""
        det = self._detectors.get(node)
        return None if det is None else det.phi(now)

    def up_nodes(self, now: float) -> set[str]:
        """Every node I judge up at ``now``, me included."""
        return {n for n in self._records if self.is_up(n, now)}

    def get(self, node: str) -> MemberInfo | None:
        """The latest record of ``node``, or None."""
        return self._records.get(node)

    def all(self) -> list[MemberInfo]:
        """Every record, sorted by node."""
        return [self._records[n] for n in sorted(self._records)]

    def choose_gossip_targets(self, now: float, rng: random.Random,
                              seeds: Sequence[str]) -> list[str]:
        """Peer addresses to gossip with this round: none when there is nobody at all.

        A random live peer whenever one is live; besides it, with probability
        1/(live + 1), or always when no peer is live, a seed or a node I judge down: that is
        how a partition heals and how a restarted node is found again (memberlist gossips to
        dead nodes for the same reason).  Besides, not instead (Cassandra's order): a round
        spent only on a dead node, such as a member that has left until the next commit
        drops it, was a round without news among the live, and now and then a live node
        went unheard for 6 s and was judged down (short simulator seed 140160).
        Peer addresses (HOST:PORT) in every case, since a seed is known only by its
        address; my own address is never returned.
        """
        my_address = self._records[self.me].peer_address
        live: list[str] = []
        others: set[str] = set()
        for node in sorted(self._records):
            if node == self.me:
                continue
            rec = self._records[node]
            if self.is_up(node, now):
                live.append(rec.peer_address)
            else:
                others.add(rec.peer_address)
        others.update(seeds)
        others.difference_update(live)
        others.discard(my_address)
        fallback = sorted(others)
        targets = [rng.choice(live)] if live else []
        if fallback and (not live or rng.random() < 1.0 / (len(live) + 1)):
            targets.append(rng.choice(fallback))
        return targets
