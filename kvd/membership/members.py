"""The gossiped heartbeat table: who exists, where to reach them, and who looks alive.

Pure: no I/O and no clock; ``now`` (seconds) is an argument.  The gossip task (kvd/node/)
calls ``tick`` once per round, sends ``digest()`` to ``choose_gossip_target(...)``, and
``merge``s every digest it receives (the target answers with its own digest: push-pull).

Rules:

1. One record per node; the record with the higher ``(generation, heartbeat)`` wins.  A
   node's generation is its start epoch, so a restarted node outranks everything it said in
   its previous life even though its heartbeat starts again at 0.
2. Only the node itself writes its record (``tick``).  If gossip brings back a record about
   me that outranks mine (I restarted within the same second, or my clock went backwards),
   I jump past it so that my fresh record wins again.
3. Liveness is a local judgement, never gossiped: node X is *up* for me while X's phi
   accrual detector is below the threshold.  The detector is fed each time X's heartbeat
   advances in my table, whoever brought the news; a newer generation resets the detector
   (a restarted node's old rhythm says nothing) and counts as an arrival.
4. A node first learned second-hand (a stale record of a dead node can circulate for a
   while) is *down* until its heartbeat advances once in my table: only progress proves
   life.  I am always up; nodes I have never heard of are down.
5. Records are never dropped here: a node that left stays in the table, judged down, and
   the cluster state (cluster_state.py) says whether it is still a member.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

from kvd.membership.phi import PhiAccrualDetector

__all__ = ["STATUSES", "MemberInfo", "MemberTable"]

# Ages above this are clamped: a peer's garbage must not push an estimate to -inf.
_MAX_AGE = 86400.0

# Member statuses of the cluster state (cluster_state.py).  "down" is a local judgement of the
# failure detector, never gossiped; kvctl's UN/DN derive from it, UJ/UL from these.
STATUSES = ("joining", "valid", "leaving", "exiting")


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

    @property
    def key(self) -> tuple[int, int]:
        """The order in which records of the same node supersede each other."""
        return (self.generation, self.heartbeat)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for the wire (msgpack/JSON)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MemberInfo:
        """Inverse of to_dict; unknown keys (from newer nodes) are ignored."""
        return cls(
            node=str(d["node"]),
            address=str(d["address"]),
            peer_address=str(d["peer_address"]),
            generation=int(d["generation"]),
            heartbeat=int(d["heartbeat"]),
            ring_version=int(d.get("ring_version", 0)),
            load_bytes=int(d.get("load_bytes", 0)),
        )


def _age(raw: Any) -> float | None:
    """A gossiped age, sanitised: None when absent or not a finite number, else clamped."""
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
        detector_options: dict[str, float] | None = None,
    ) -> None:
        self.me = me.node
        self.threshold = threshold
        self._detector_options = dict(detector_options or {})
        self._records: dict[str, MemberInfo] = {me.node: me}
        self._detectors: dict[str, PhiAccrualDetector] = {}
        self._was_up: dict[str, bool] = {me.node: True}
        # My-clock estimate of when each record was emitted by its node (rule 3).
        self._emitted: dict[str, float] = {}

    def _new_detector(self) -> PhiAccrualDetector:
        return PhiAccrualDetector(threshold=self.threshold, **self._detector_options)

    def tick(self, now: float, *, ring_version: int | None = None, load_bytes: int | None = None) -> MemberInfo:
        """Bump my heartbeat (and refresh what I advertise); return my record."""
        mine = self._records[self.me]
        changes: dict[str, int] = {"heartbeat": mine.heartbeat + 1}
        if ring_version is not None:
            changes["ring_version"] = ring_version
        if load_bytes is not None:
            changes["load_bytes"] = load_bytes
        mine = replace(mine, **changes)
        self._records[self.me] = mine
        self._emitted[self.me] = now
        return mine

    def merge(self, records: Iterable[MemberInfo | dict[str, Any]], now: float) -> list[str]:
        """Take every record newer than mine; return the nodes whose liveness changed.

        ``records`` are digest dicts (``digest(now)``: each may carry its ``age``) or
        MemberInfo objects (no age: taken as emitted ``now``).  Liveness changes caused by
        time alone (silence) are reported too, since the table compares every node's
        judgement now with the last one it reported.
        """
        for item in records:
            if isinstance(item, MemberInfo):
                rec, age = item, None
            else:
                rec = MemberInfo.from_dict(item)
                age = _age(item.get("age"))
            if rec.node == self.me:
                self._refute(rec)
                continue
            old = self._records.get(rec.node)
            if old is not None and rec.key <= old.key:
                continue
            emitted = now if age is None else now - age
            self._records[rec.node] = rec
            self._emitted[rec.node] = emitted
            if old is None:
                det = self._detectors[rec.node] = self._new_detector()
                if age is not None:
                    # Rule 4: first sight counts only when we know how old the news is.
                    det.heartbeat(now, emitted)
            elif rec.generation > old.generation:
                det = self._detectors[rec.node]
                det.reset()
                det.heartbeat(now, emitted)
            else:
                self._detectors[rec.node].heartbeat(now, emitted)
        return self.check(now)

    def check(self, now: float) -> list[str]:
        """Nodes whose liveness changed since the last ``merge``/``check`` (sorted)."""
        changed = []
        for node in self._records:
            up = self.is_up(node, now)
            if self._was_up.get(node) != up:
                if node in self._was_up or up:
                    changed.append(node)
                self._was_up[node] = up
        return sorted(changed)

    def _refute(self, rec: MemberInfo) -> None:
        mine = self._records[self.me]
        if rec.key < mine.key or rec == mine:
            return
        # rec.key >= mine.key, so rec.generation >= mine.generation: adopt it and go one past.
        self._records[self.me] = replace(mine, generation=rec.generation, heartbeat=rec.heartbeat + 1)

    def digest(self, now: float | None = None) -> list[dict[str, Any]]:
        """What to gossip: every record as a plain dict, sorted by node.

        With ``now``, each dict also carries ``age``: how many seconds ago its node emitted
        it, as far as I know (rule 3).  The gossip task should always pass ``now``.
        """
        out = []
        for n in sorted(self._records):
            d = self._records[n].to_dict()
            if now is not None:
                emitted = self._emitted.get(n)
                d["age"] = 0.0 if emitted is None else round(max(now - emitted, 0.0), 3)
            out.append(d)
        return out

    def is_up(self, node: str, now: float) -> bool:
        """My judgement of ``node`` at ``now``: me always up, unknown nodes down."""
        if node == self.me:
            return True
        det = self._detectors.get(node)
        if det is None or det.last_heartbeat is None:
            return False
        return det.is_available(now)

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

    def choose_gossip_target(self, now: float, rng: random.Random, seeds: Sequence[str]) -> str | None:
        """Peer address to gossip with this round, or None when there is nobody at all.

        Usually a random live peer.  With probability 1/(live + 1), or always when no peer is
        live, a seed or a node I judge down instead: that is how a partition heals and how a
        node restarted elsewhere is found again (memberlist gossips to dead nodes for the
        same reason).  Returns a peer address (HOST:PORT) in every case, since a seed is known
        only by its address.
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
        others.update(s for s in seeds if s != my_address)
        others.difference_update(live)
        fallback = sorted(others)
        if live and (not fallback or rng.random() >= 1.0 / (len(live) + 1)):
            return rng.choice(live)
        if fallback:
            return rng.choice(fallback)
        return None
