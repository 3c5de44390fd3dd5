"""Claim: which member owns which partition; plan: what moves to get there.

``claim(ring, members, n_val, zones)`` returns the new owners tuple for a member set.  Its
rules (tests/test_ring.py checks them for every cluster size 1..64 and Q 64..4096):

Rule 1 (balance).  Every member owns floor(q/n) or ceil(q/n) partitions.  Always achievable.

Rule 2 (N-distinct).  Any ``n_val`` consecutive partitions (mod q) have ``n_val`` distinct
  owners -- and ``n_val`` distinct zones when zones are configured -- whenever that is
  achievable.  A node owning c partitions needs them ``n_val`` apart, so c * N <= q, and
  with exactly N owners the layout must repeat with period N.  The exact condition
  (``distinct_feasible``; balanced counts):
        n >= N + 1  and  N * ceil(q / n) <= q,     or     n == N  and  q % N == 0.
  Q is a power of two, so with the default N = 3 a 3-node cluster can never satisfy it: its
  layout is a 3-stripe with a single seam (N - 1 bad windows) that the 4th node removes.
  For zones the same condition is applied to the zones' partition totals (so 3 zones and
  N = 3 is never enough for a power-of-two Q: use 4 or more zones).  When the condition
  fails the rule is best effort: picks still prefer distinct nodes and zones, but no
  partition is moved only to improve an infeasible layout.

Rule 3 (movement).  Only what balance and Rule 2 require moves.  When one node joins n
  nodes it takes floor(q/(n+1)) partitions, evenly from the nodes that must shed them,
  choosing partitions where it keeps (or restores) Rule 2, so the ideal q/(n+1) is
  exceeded only by repair swaps (two moves each), which are rare.  When a node leaves,
  only its partitions move, plus swaps where no remaining node fits a freed partition.

Rule 4 (determinism).  Same inputs, same output: members are sorted, every choice has a
  total order as tie-break, nothing depends on hash randomisation or set order.

How (riak_core's claim is the model; the algorithm is our own):
  1. Targets: q // n each, the q % n extra partitions going to the members that own most
     now (fewest moves).
  2. Partitions of departed nodes go to members under target, most constrained first,
     preferring a member that fits (no same node or zone within N - 1 on either side).
  3. Members still under target take partitions from members over target:
     - while the cluster is small (n <= N) a joiner takes one residue class p % N whole
       (a "stripe"), plus an even share of the classes not yet claimed; so the N-th
       node completes the N-stripe and node N + 1 only needs to break the seam;
     - otherwise it first takes partitions that repair an existing violation, then fills
       the largest gap between its own partitions (farthest-point insertion), picking
       near the gap's middle the partition whose owner has the most to shed.
  4. Repair (only when Rule 2 is achievable): each partition in a violating window is
     swapped with the partition elsewhere that removes the most violations for the fewest
     moves (swaps keep the balance).
  5. If violations remain although Rule 2 is achievable, the layout is rebuilt by a
     greedy cyclic sequence (most remaining first, old owner as tie-break) and repaired.
     A first claim from a one-node ring uses that construction directly.

Pure: no I/O, no trio, no plyvel.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Mapping, Sequence

from kvd.ring.ring import Ring

# A window with the same node twice outweighs any number of windows sharing only a zone.
_NODE_W = 1 << 20
_ZONE_W = 1

__all__ = ["Move", "claim", "distinct_feasible", "n_distinct_feasible", "plan", "violations"]


@dataclass(frozen=True)
class Move:
    """Partition ``partition`` changes owner from ``source`` to ``target``."""

    partition: int
    source: str
    target: str


def plan(old: Ring, new_owners: Sequence[str]) -> list[Move]:
    """Every partition whose owner differs between ``old`` and ``new_owners``, ascending."""
    if len(new_owners) != old.q:
        raise ValueError(f"{len(new_owners)} owners for a ring of q={old.q}")
    return [
        Move(p, src, dst)
        for p, (src, dst) in enumerate(zip(old.owners, new_owners))
        if src != dst
    ]


def distinct_feasible(q: int, counts: Sequence[int], n_val: int) -> bool:
    """Whether owners with these partition ``counts`` can make every ``n_val`` consecutive
    partitions of a ring of ``q`` distinct (the condition of Rule 2).

    Necessary: each owner's partitions are ``n_val`` apart (c * N <= q) and, with exactly
    N owners, the layout has period N.  With more owners it is also sufficient (blocks of
    N and N + 1 distinct owners tile any long enough ring); claim achieves it.
    """
    counts = [c for c in counts if c > 0]
    if n_val <= 1:
        return True
    if len(counts) < n_val:
        return False
    if len(counts) == n_val:
        return q % n_val == 0 and all(c == q // n_val for c in counts)
    return max(counts) * n_val <= q


def n_distinct_feasible(q: int, n: int, n_val: int) -> bool:
    """``distinct_feasible`` for n members with balanced counts."""
    if n < 1:
        return False
    base, extra = divmod(q, n)
    return distinct_feasible(q, [base + 1] * extra + [base] * (n - extra), n_val)


def violations(owners: Sequence[str], n_val: int, zones: Mapping[str, str] | None = None) -> int:
    """Number of windows of ``n_val`` consecutive partitions with a repeated owner (or a
    repeated zone, when ``zones`` is given; nodes missing from it are their own zone)."""
    q = len(owners)
    width = min(n_val, q)
    labels = [zones.get(x, "\0" + x) for x in owners] if zones else list(owners)
    return sum(
        1 for p in range(q) if len({labels[(p + d) % q] for d in range(width)}) < width
    )


def claim(
    ring: Ring,
    members: Sequence[str],
    n_val: int = 3,
    zones: Mapping[str, str] | None = None,
) -> tuple[str, ...]:
    """The owners tuple for ``members`` (joiners added, departed nodes removed).

    ``zones`` (node -> zone) defaults to ``ring.zones``; a member missing from a non-empty
    zone map is a zone of its own.  See the module docstring for the rules it keeps.
    """
    if isinstance(n_val, bool) or not isinstance(n_val, int) or n_val < 1:
        raise ValueError(f"n_val must be a positive int, got {n_val!r}")
    names = sorted(set(members))
    if not names:
        raise ValueError("claim needs at least one member")
    for name in names:
        if not isinstance(name, str) or not name:
            raise ValueError(f"member must be a non-empty str, got {name!r}")
    zone_map = dict(ring.zones if zones is None else zones)
    member_set = set(names)
    live = [x for x in ring.nodes() if x in member_set]
    departed = len(live) < len(ring.nodes())
    joiners = [m for m in names if m not in set(live)]

    if len(live) <= 1 and len(names) > n_val:
        # No prior layout worth keeping: build one, keeping the old owner's share in place.
        return tuple(_bootstrap(ring, names, n_val, zone_map))
    owners = list(ring.owners)
    if not departed and len(joiners) > 1:
        # Several joins are claimed one at a time (each a minimal step); only the net
        # difference moves, and the intermediate small-cluster stripes stay intact.
        current = list(live)
        for joiner in joiners:
            current.append(joiner)
            owners = _rebalance(ring.q, owners, sorted(current), n_val, zone_map)
        return tuple(owners)
    return tuple(_rebalance(ring.q, owners, names, n_val, zone_map))


def _targets(count: Sequence[int], q: int) -> list[int]:
    """q // n each; the q % n extra partitions to the members owning most (then by index)."""
    n = len(count)
    base, extra = divmod(q, n)
    targets = [base] * n
    for x in sorted(range(n), key=lambda x: (-count[x], x))[:extra]:
        targets[x] += 1
    return targets


def _spread(length: int, k: int) -> list[int]:
    """``k`` indexes spread evenly over ``range(length)`` (all of them when k >= length)."""
    if k >= length:
        return list(range(length))
    return [((2 * i + 1) * length) // (2 * k) for i in range(k)]


class _Layout:
    """Working state of one claim: owners as member indexes (-1 = unowned)."""

    def __init__(
        self,
        q: int,
        n_val: int,
        owners: list[int],
        n: int,
        zone_of: list[int],
        zoned: bool,
    ) -> None:
        self.q = q
        self.N = n_val
        self.D = min(n_val, q)  # distances 1 .. D-1 are checked
        self.o = owners
        self.n = n
        self.zone_of = zone_of
        self.zoned = zoned
        self.zone_w = _ZONE_W if zoned else 0
        self.count = [0] * n
        for x in owners:
            if x >= 0:
                self.count[x] += 1

    # -- primitives ---------------------------------------------------------------------

    def assign(self, p: int, r: int) -> None:
        x = self.o[p]
        if x >= 0:
            self.count[x] -= 1
        self.o[p] = r
        self.count[r] += 1

    def weight(self, x: int, y: int, zone_w: int) -> int:
        if x < 0 or y < 0:
            return 0
        if x == y:
            return _NODE_W
        if zone_w and self.zone_of[x] == self.zone_of[y]:
            return zone_w
        return 0

    def cost_at(self, r: int, p: int) -> int:
        """Weighted conflicts ``r`` would have at ``p`` (whoever owns ``p`` now)."""
        o, q, zr = self.o, self.q, self.zone_of[r]
        zoned = self.zoned
        cost = 0
        for d in range(1, self.D):
            for s in ((p - d) % q, (p + d) % q):
                y = o[s]
                if y < 0:
                    continue
                if y == r:
                    cost += _NODE_W
                elif zoned and self.zone_of[y] == zr:
                    cost += _ZONE_W
        return cost

    def conflicts(self, zone_w: int) -> list[tuple[int, int]]:
        """``(p, d)`` for every pair of partitions ``d < N`` apart that share a node/zone."""
        o, q = self.o, self.q
        out = []
        for p in range(q):
            x = o[p]
            if x < 0:
                continue
            for d in range(1, self.D):
                if self.weight(x, o[(p + d) % q], zone_w):
                    out.append((p, d))
        return out

    def local_cost(self, ps: Sequence[int], zone_w: int) -> int:
        o, q = self.o, self.q
        seen: set[tuple[int, int]] = set()
        total = 0
        for p in ps:
            for d in range(1, self.D):
                for s in ((p - d) % q, p):
                    if (s, d) in seen:
                        continue
                    seen.add((s, d))
                    total += self.weight(o[s], o[(s + d) % q], zone_w)
        return total

    def surplus(self, x: int, targets: Sequence[int]) -> int:
        return self.count[x] - targets[x] if x >= 0 else 0

    # -- step 2: partitions of departed nodes -------------------------------------------

    def fill_free(self, targets: list[int]) -> None:
        """Give unowned partitions to members under target.

        A departed node's partitions are N apart when the old ring kept Rule 2, so each can
        be filled independently: this is a bipartite b-matching (partition -> member that
        fits there, within the member's need), solved greedily, most constrained first,
        with augmenting paths where the greedy choice runs out.
        """
        free = [p for p in range(self.q) if self.o[p] < 0]
        if not free:
            return
        receivers = [r for r in range(self.n) if self.count[r] < targets[r]]
        cap = {r: targets[r] - self.count[r] for r in receivers}
        for clean_zone in (True, False) if self.zoned else (False,):
            limit = _ZONE_W if clean_zone else _NODE_W
            options = {
                p: [r for r in receivers if self.cost_at(r, p) < limit] for p in free
            }
            held: dict[int, list[int]] = {r: [] for r in receivers}
            match: dict[int, int] = {}

            def augment(p: int, seen: set[int]) -> bool:
                for r in options[p]:
                    if r in seen:
                        continue
                    seen.add(r)
                    if len(held[r]) < cap[r]:
                        held[r].append(p)
                        match[p] = r
                        return True
                    for p2 in held[r]:
                        if augment(p2, seen):
                            held[r].remove(p2)
                            held[r].append(p)
                            match[p] = r
                            return True
                return False

            for p in sorted(free, key=lambda p: (len(options[p]), p)):
                ranked = sorted(
                    options[p], key=lambda r: (self.cost_at(r, p), len(held[r]) - cap[r], r)
                )
                options[p] = ranked
                augment(p, set())
            if len(match) == len(free) or clean_zone is False:
                break
        for p in sorted(match):
            self.assign(p, match[p])
        # Unmatched partitions take the least conflicting member (repaired later).
        for p in free:
            if p in match:
                continue
            best = min(
                (r for r in receivers if self.count[r] < targets[r]),
                key=lambda r: (self.cost_at(r, p), self.count[r] - targets[r], r),
            )
            self.assign(p, best)

    # -- step 3: members under target take from members over target --------------------

    def take_stripe(self, targets: list[int]) -> list[int]:
        """Small clusters (n <= N): a joiner takes a whole residue class ``p % N``."""
        q, N = self.q, self.N
        base = q // self.n
        for r in range(self.n):
            if self.count[r] >= targets[r]:
                continue
            others = [x for x in range(self.n) if x != r and self.count[x] > 0]
            if not others or len(others) >= N:
                continue
            per_class = [[0] * N for _ in range(self.n)]
            for p, x in enumerate(self.o):
                if x >= 0:
                    per_class[x][p % N] += 1
            anchored = {max(range(N), key=lambda s: (per_class[x][s], -s)) for x in others}
            open_classes = [s for s in range(N) if s not in anchored]
            if not open_classes:
                continue
            own = list(range(open_classes[0], q, N))
            for i in _spread(len(own), targets[r] - self.count[r]):
                x = self.o[own[i]]
                # Owners may go down to the floor here; who keeps the +1 is settled below.
                if x >= 0 and x != r and self.count[x] > base:
                    self.assign(own[i], r)
            targets = _targets(self.count, q)
            reserved = sorted(p for s in open_classes[1:] for p in range(s, q, N))
            self.take_in_order(r, reserved, targets)
        return targets

    def take_in_order(self, r: int, positions: Sequence[int], targets: Sequence[int]) -> None:
        need = targets[r] - self.count[r]
        if need <= 0 or not positions:
            return
        taken = set()
        for i in _spread(len(positions), need):
            for k in range(len(positions)):
                p = positions[(i + k) % len(positions)]
                x = self.o[p]
                if p not in taken and x != r and self.surplus(x, targets) > 0:
                    self.assign(p, r)
                    taken.add(p)
                    break

    def take_repairs(self, targets: Sequence[int]) -> None:
        """Receivers take over-target partitions that sit in a violating window."""
        if not any(self.count[r] < targets[r] for r in range(self.n)):
            return
        q = self.q
        for p, d in self.conflicts(self.zone_w):
            pair = (p, (p + d) % q)
            if not self.weight(self.o[pair[0]], self.o[pair[1]], self.zone_w):
                continue  # fixed by an earlier pick
            for c in pair:
                x = self.o[c]
                if self.surplus(x, targets) <= 0:
                    continue
                fits = [
                    r
                    for r in range(self.n)
                    if self.count[r] < targets[r] and self.cost_at(r, c) == 0
                ]
                if fits:
                    self.assign(c, min(fits, key=lambda r: (self.count[r] - targets[r], r)))
                    break

    def take_spread(self, targets: Sequence[int]) -> None:
        for r in range(self.n):
            if self.count[r] < targets[r]:
                self._spread_one(r, targets)

    def _spread_one(self, r: int, targets: Sequence[int]) -> None:
        q = self.q
        mine = [p for p in range(q) if self.o[p] == r]
        if not mine:
            start = self._pick_anywhere(r, targets)
            if start is None:
                return
            self.assign(start, r)
            mine = [start]
        heap = []
        for i, a in enumerate(mine):
            b = mine[i + 1] if i + 1 < len(mine) else mine[0] + q
            heap.append((a - b, a, b))
        heapq.heapify(heap)
        while self.count[r] < targets[r] and heap:
            _, a, b = heapq.heappop(heap)
            c = self._pick_in_gap(r, a, b, targets)
            if c is None:
                continue
            self.assign(c % q, r)
            heapq.heappush(heap, (a - c, a, c))
            heapq.heappush(heap, (c - b, c, b))

    def _pick_in_gap(self, r: int, a: int, b: int, targets: Sequence[int]) -> int | None:
        """Best partition strictly inside gap (a, b) of ``r``'s partitions, or None."""
        lo, hi = a + self.N, b - self.N
        if lo > hi:
            return None
        mid = (a + b) // 2
        radius = max(self.N, min((b - a) // 4, 2 * self.n + self.N))
        for first, last in ((max(lo, mid - radius), min(hi, mid + radius)), (lo, hi)):
            best = None
            for c in range(first, last + 1):
                p = c % self.q
                s = self.surplus(self.o[p], targets)
                if s <= 0 or self.o[p] == r:
                    continue
                key = (self.cost_at(r, p), -s, abs(c - mid), c)
                if best is None or key < best:
                    best = key
            if best is not None and best[0] < _NODE_W:
                return best[3]
        return None

    def _pick_anywhere(self, r: int, targets: Sequence[int]) -> int | None:
        best = None
        for p in range(self.q):
            x = self.o[p]
            s = self.surplus(x, targets)
            if s <= 0 or x == r:
                continue
            key = (self.cost_at(r, p), -s, p)
            if best is None or key < best:
                best = key
        return None if best is None else best[2]

    def take_rest(self, targets: Sequence[int]) -> None:
        """Whatever could not be placed cleanly: least conflicting partitions (repaired later)."""
        for r in range(self.n):
            while self.count[r] < targets[r]:
                p = self._pick_anywhere(r, targets)
                if p is None:
                    break
                self.assign(p, r)

    # -- step 4: repair by swaps -------------------------------------------------------

    def repair(self, zone_w: int, old: Sequence[int], max_rounds: int = 50) -> None:
        q = self.q
        for _ in range(max_rounds):
            bad = sorted({s for p, d in self.conflicts(zone_w) for s in (p, (p + d) % q)})
            if not bad:
                return
            improved = False
            for p in bad:
                if not self._is_bad(p, zone_w):
                    continue
                p2 = self._best_swap(p, zone_w, old)
                if p2 is not None:
                    self._swap(p, p2)
                    improved = True
            if not improved:
                return

    def _is_bad(self, p: int, zone_w: int) -> bool:
        x, o, q = self.o[p], self.o, self.q
        return any(
            self.weight(x, o[(p + d) % q], zone_w) or self.weight(x, o[(p - d) % q], zone_w)
            for d in range(1, self.D)
        )

    def _swap(self, p: int, p2: int) -> None:
        self.o[p], self.o[p2] = self.o[p2], self.o[p]

    def _best_swap(self, p: int, zone_w: int, old: Sequence[int]) -> int | None:
        o, q, D = self.o, self.q, self.D
        x = o[p]
        near = {o[(p + d) % q] for d in range(1 - D, D) if d}
        best = None
        for p2 in range(q):
            y = o[p2]
            if y == x or y < 0:
                continue
            dist = min((p2 - p) % q, (p - p2) % q)
            if dist >= D:
                # Cheap necessary condition before the exact evaluation.
                if y in near or any(o[(p2 + d) % q] == x for d in range(1 - D, D) if d):
                    continue
            before = self.local_cost((p, p2), zone_w)
            self._swap(p, p2)
            after = self.local_cost((p, p2), zone_w)
            self._swap(p, p2)
            delta = after - before
            if delta >= 0:
                continue
            moves = (
                (y != old[p]) - (x != old[p]) + (x != old[p2]) - (y != old[p2])
            )
            key = (moves, delta, dist, p2)
            if best is None or key < best:
                best = key
        return None if best is None else best[3]

    def bad_weight(self, zone_w: int) -> int:
        q, o = self.q, self.o
        return sum(self.weight(o[p], o[(p + d) % q], zone_w) for p, d in self.conflicts(zone_w))


def _construct(
    q: int,
    n_val: int,
    targets: Sequence[int],
    zone_of: Sequence[int],
    zoned: bool,
    prefer: Sequence[int],
) -> list[int]:
    """A fresh layout: greedy cyclic sequence, most remaining (zone, then node) first.

    A node may go at p when its previous partition is at least N back and, cyclically, its
    first partition at least N ahead.  ``prefer[p]`` (the old owner) breaks ties.
    """
    n = len(targets)
    rem = list(targets)
    zrem: dict[int, int] = {}
    for x in range(n):
        zrem[zone_of[x]] = zrem.get(zone_of[x], 0) + rem[x]
    last = [-q] * n
    first = [-1] * n
    zlast: dict[int, int] = {z: -q for z in zrem}
    zfirst: dict[int, int] = {z: -1 for z in zrem}
    out = [-1] * q
    for p in range(q):
        best = None
        for x in range(n):
            if rem[x] == 0:
                continue
            z = zone_of[x]
            node_ok = p - last[x] >= n_val and (first[x] < 0 or first[x] + q - p >= n_val)
            zone_ok = zoned and p - zlast[z] >= n_val and (
                zfirst[z] < 0 or zfirst[z] + q - p >= n_val
            )
            key = (
                not node_ok,
                not zone_ok,
                -zrem[z] if zoned else 0,
                -rem[x],
                prefer[p] != x,
                last[x],
                x,
            )
            if best is None or key < best[0]:
                best = (key, x)
        assert best is not None
        x = best[1]
        z = zone_of[x]
        out[p] = x
        rem[x] -= 1
        zrem[z] -= 1
        last[x] = p
        zlast[z] = p
        if first[x] < 0:
            first[x] = p
        if zfirst[z] < 0:
            zfirst[z] = p
    return out


def _zones_for(names: Sequence[str], zone_map: Mapping[str, str]) -> tuple[list[int], bool]:
    """Zone index per member (members without a zone get their own); whether zoned."""
    if not zone_map:
        return list(range(len(names))), False
    known = sorted({zone_map[x] for x in names if x in zone_map})
    index = {zone: i for i, zone in enumerate(known)}
    zone_of = [
        index[zone_map[x]] if x in zone_map else len(known) + i for i, x in enumerate(names)
    ]
    return zone_of, True


def _feasibility(
    q: int, n_val: int, targets: Sequence[int], zone_of: Sequence[int], zoned: bool
) -> tuple[bool, bool]:
    node_ok = distinct_feasible(q, targets, n_val)
    zone_ok = False
    if zoned:
        totals: dict[int, int] = {}
        for x, t in enumerate(targets):
            totals[zone_of[x]] = totals.get(zone_of[x], 0) + t
        zone_ok = node_ok and distinct_feasible(q, [totals[z] for z in sorted(totals)], n_val)
    return node_ok, zone_ok


def _finish(
    layout: _Layout,
    old: list[int],
    targets: list[int],
    node_ok: bool,
    zone_ok: bool,
) -> list[int]:
    """Steps 4 and 5: repair, and rebuild if repair could not reach an achievable Rule 2."""
    if not node_ok:
        return layout.o
    zone_w = _ZONE_W if zone_ok else 0
    layout.repair(zone_w, old)
    if layout.bad_weight(zone_w) == 0:
        return layout.o
    rebuilt = _Layout(
        layout.q,
        layout.N,
        _construct(layout.q, layout.N, targets, layout.zone_of, layout.zoned, old),
        layout.n,
        layout.zone_of,
        layout.zoned,
    )
    rebuilt.repair(zone_w, old)
    if rebuilt.bad_weight(zone_w) < layout.bad_weight(zone_w):
        return rebuilt.o
    return layout.o


def _rebalance(
    q: int, old_owners: Sequence[str], names: Sequence[str], n_val: int, zone_map: Mapping[str, str]
) -> list[str]:
    index = {name: i for i, name in enumerate(names)}
    old = [index.get(x, -1) for x in old_owners]
    zone_of, zoned = _zones_for(names, zone_map)
    layout = _Layout(q, n_val, list(old), len(names), zone_of, zoned)
    targets = _targets(layout.count, q)
    layout.fill_free(targets)
    if len(names) <= n_val:
        targets = layout.take_stripe(targets)
    layout.take_repairs(targets)
    layout.take_spread(targets)
    layout.take_rest(targets)
    node_ok, zone_ok = _feasibility(q, n_val, targets, zone_of, zoned)
    owners = _finish(layout, old, targets, node_ok, zone_ok)
    return [names[x] for x in owners]


def _bootstrap(ring: Ring, names: Sequence[str], n_val: int, zone_map: Mapping[str, str]) -> list[str]:
    q = ring.q
    index = {name: i for i, name in enumerate(names)}
    old = [index.get(x, -1) for x in ring.owners]
    zone_of, zoned = _zones_for(names, zone_map)
    count = [0] * len(names)
    for x in old:
        if x >= 0:
            count[x] += 1
    targets = _targets(count, q)
    layout = _Layout(q, n_val, _construct(q, n_val, targets, zone_of, zoned, old), len(names), zone_of, zoned)
    node_ok, zone_ok = _feasibility(q, n_val, targets, zone_of, zoned)
    owners = _finish(layout, old, targets, node_ok, zone_ok)
    return [names[x] for x in owners]
