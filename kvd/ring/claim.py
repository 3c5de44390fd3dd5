"""Claim: which member owns which partition; plan: what moves to get there.

``claim(ring, members, n_val, zones)`` returns the new owners tuple for a member set.  Its
rules (tests/test_ring.py checks them for every cluster size 1..64 and Q 64..4096):

Rule 1 (balance).  Every member owns floor(q/n) or ceil(q/n) partitions.  Always achievable.

Rule 2 (N-distinct).  Any ``n_val`` consecutive partitions (mod q) have ``n_val`` distinct
  owners whenever that is achievable.  A node owning c partitions needs them N apart, so
  c * N <= q, and with exactly N owners the layout must repeat with period N.  The exact
  condition (``n_distinct_feasible``, balanced counts):
        n >= N + 1  and  N * ceil(q / n) <= q,     or     n == N  and  q % N == 0.
  Q is a power of two, so with the default N = 3 a 3-node cluster can never satisfy it: its
  layout is a 3-stripe with one seam (N - 1 bad windows) that the 4th node's join removes.
  Zones: N distinct zones per window are enforced when every zone holds fewer than 1/N of
  the members (``zones_enforced``; it implies N + 1 zones or more) and the zone totals
  pass the same condition.  3 zones with N = 3 never qualify (a power-of-two Q is not a
  multiple of 3), nor does a zone with exactly 1/N of the members (it would need a
  perfectly periodic layout).  Where the rule is not enforced it is best effort: picks
  prefer distinct nodes and zones, but nothing moves just to improve the layout.

Rule 3 (movement).  A node joining n nodes takes floor(q/(n+1)) partitions, spread evenly,
  from the nodes that must shed them, choosing partitions that keep (or restore) Rule 2;
  nothing else moves unless a repair is needed (none is, anywhere in the test grid: every
  moved partition goes to the joiner).  When a node leaves, only its partitions move, plus
  a few repair moves where no remaining node fits a freed partition.  Exception: with
  exactly N + 1 nodes left every window holds N of them, the layout is rigid and the
  repairs move up to about half as much again as the leaver owned.  A change that makes
  zones enforceable for the first time may move much more: the layout is rebuilt.

Rule 4 (determinism).  Same inputs, same output: members are sorted, every choice has a
  total order as tie-break, no hash randomisation or set order leaks, and the work spent
  on repairs is capped by a count, never by a clock.

How (riak_core's claim is the model; the algorithm is our own):
  1. Targets: q // n each, the q % n extra partitions to the members owning most now.
  2. Partitions of departed nodes go to members under target: a bipartite matching
     (partition -> member that fits there), most constrained partition first, with
     augmenting paths; members tied for an extra partition share it flexibly.
  3. Members still under target take partitions from members over target:
     - while the cluster is small (n <= N) a joiner takes one residue class p % N whole
       (a "stripe"), plus an even share of the classes not yet claimed, so the N-th node
       completes the N-stripe and node N + 1 only has to break its seam;
     - otherwise it first takes partitions that repair a violating window, then fills the
       largest gap between its own partitions (farthest-point insertion), picking near
       the gap's middle a partition that fits whose owner has the most to shed.
  4. Repair, only where Rule 2 is enforced, each step keeping the counts and strictly
     lowering the weighted violations (a repeated node outweighs any repeated zones):
     swaps of two partitions' owners (fewest moves first); chains (p goes to a member
     that fits, which gives up a partition to the next, ..., back to p's owner); and
     re-ordering a small window around a violation, alone or trading one partition with
     a far one.
  5. If violations remain, fresh layouts are tried and repaired -- rounds of all members
     in a fixed (zone-interleaved) order, a greedy cyclic sequence, and for tiny rings an
     exhaustive search -- and the one with fewest violations, then fewest moves, wins.
     A first claim from a one-node ring (no prior layout) starts here.

Cost: a claim in the test grid takes at most a few tens of milliseconds at q = 4096;
repairs of hard layouts are capped (about a second or two).  The claimant should still
call it off the event loop (``trio.to_thread.run_sync``).

Pure: no I/O, no trio, no plyvel.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Iterator, Mapping, Sequence

from kvd.ring.ring import Ring

# A window with the same node twice outweighs any number of windows sharing only a zone.
_NODE_W = 1 << 20
_ZONE_W = 1

__all__ = [
    "Move",
    "claim",
    "distinct_feasible",
    "n_distinct_feasible",
    "plan",
    "violations",
    "zones_enforced",
]


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
    """Whether owners with these partition ``counts`` can give every ``n_val`` consecutive
    partitions of a ring of ``q`` distinct owners (Rule 2's condition).

    Necessary: each owner's partitions are N apart (c * N <= q), and with exactly N owners
    the layout has period N.  For balanced counts and more owners it is also sufficient:
    claim builds such a layout for every q < 200, n <= 40, N <= 5 (checked exhaustively
    while developing it) and for every cluster of the test grid.
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
    for name in members:
        if not isinstance(name, str) or not name:
            raise ValueError(f"member must be a non-empty str, got {name!r}")
    names = sorted(set(members))
    if not names:
        raise ValueError("claim needs at least one member")
    zone_map = dict(ring.zones if zones is None else zones)
    member_set = set(names)
    live = [x for x in ring.nodes() if x in member_set]
    departed = len(live) < len(ring.nodes())
    joiners = [m for m in names if m not in set(live)]  # includes members owning nothing

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


def _tie_group(count: Sequence[int], targets: Sequence[int], base: int) -> tuple[set[int], int]:
    """Members tied at the boundary of the q % n extra partitions, and how many of the
    extras they share: any ``bonus`` of them may take base + 1 (receivers only)."""
    given = [x for x in range(len(count)) if targets[x] > base]
    if not given:
        return set(), 0
    edge = min(count[x] for x in given)
    tied = {x for x in range(len(count)) if count[x] == edge}
    if edge > base or tied <= set(given):
        return set(), 0
    return tied, sum(1 for x in tied if targets[x] > base)


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
        # Repairs count their work here and stop at the cap, so a claim is bounded
        # (deterministically) even on layouts that no local repair can fix.
        self.effort = 0
        self.max_effort = 300_000 + 100 * q

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

    def cost_w(self, r: int, p: int, zone_w: int) -> int:
        """Weighted conflicts ``r`` would have at ``p`` counting zones with ``zone_w``."""
        o, q, zone_of = self.o, self.q, self.zone_of
        cost = 0
        if not zone_w:
            for d in range(1, self.D):
                cost += (o[(p - d) % q] == r) + (o[(p + d) % q] == r)
            return cost * _NODE_W
        zr = zone_of[r]
        for d in range(1, self.D):
            for s in ((p - d) % q, (p + d) % q):
                y = o[s]
                if y == r:
                    cost += _NODE_W
                elif zone_w and y >= 0 and zone_of[y] == zr:
                    cost += zone_w
        return cost

    def cost_at(self, r: int, p: int) -> int:
        """Weighted conflicts ``r`` would have at ``p`` (whoever owns ``p`` now), zones
        counted whenever they are configured (picks prefer distinct zones even when the
        rule is not enforced)."""
        return self.cost_w(r, p, self.zone_w)

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
        """Give unowned partitions to members under target (updates ``targets``).

        A departed node's partitions are N apart when the old ring kept Rule 2, so each can
        be filled independently: this is a bipartite b-matching (partition -> member that
        fits there, within the member's need), solved greedily, most constrained first,
        with augmenting paths where the greedy choice runs out.  Which of the members tied
        for the q % n extra partitions get one is left to the matching (``flex``).
        """
        free = [p for p in range(self.q) if self.o[p] < 0]
        if not free:
            return
        base = self.q // self.n
        flex, bonus = _tie_group(self.count, targets, base)
        receivers = [r for r in range(self.n) if self.count[r] < targets[r] or r in flex]
        cap = {r: (base if r in flex else targets[r]) - self.count[r] for r in receivers}
        for clean_zone in (True, False) if self.zoned else (False,):
            limit = _ZONE_W if clean_zone else _NODE_W
            options = {p: [r for r in receivers if self.cost_at(r, p) < limit] for p in free}
            held: dict[int, list[int]] = {r: [] for r in receivers}
            holders: set[int] = set()  # flex members holding one of the bonus partitions
            match: dict[int, int] = {}

            def take(p: int, r: int) -> bool:
                held[r].append(p)
                match[p] = r
                return True

            def augment(p: int, seen: set[int]) -> bool:
                for r in options[p]:
                    if r in seen:
                        continue
                    seen.add(r)
                    if len(held[r]) < cap[r] + (r in holders):
                        return take(p, r)
                    if r in flex and r not in holders:
                        if len(holders) < bonus:
                            holders.add(r)
                            return take(p, r)
                        if -1 not in seen:  # free a bonus held by another flex member
                            seen.add(-1)
                            for s in sorted(holders - seen):
                                seen.add(s)
                                for p2 in list(held[s]):
                                    if augment(p2, seen):
                                        held[s].remove(p2)
                                        holders.discard(s)
                                        holders.add(r)
                                        return take(p, r)
                    for p2 in list(held[r]):
                        if augment(p2, seen):
                            held[r].remove(p2)
                            return take(p, r)
                return False

            for p in sorted(free, key=lambda p: (len(options[p]), p)):
                options[p].sort(key=lambda r: (self.cost_at(r, p), len(held[r]) - cap[r], r))
                augment(p, set())
            if len(match) == len(free) or not clean_zone:
                break
        spare = bonus - len(holders)
        for r in sorted(flex):
            targets[r] = base + (r in holders or (spare > 0))
            if r not in holders and spare > 0:
                spare -= 1
        for p in sorted(match):
            self.assign(p, match[p])
        # Unmatched partitions take the least conflicting member (repaired later).
        for p in free:
            if p in match:
                continue
            best = min(
                (r for r in range(self.n) if self.count[r] < targets[r]),
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
        lo, hi = a + self.D, b - self.D
        if lo > hi:
            return None
        mid = (a + b) // 2
        radius = max(self.D, min((b - a) // 4, 2 * self.n + self.D))
        fallback = None
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
            if best is not None and best[0] == 0:
                return best[3]
            if best is not None and best[0] < _NODE_W:
                fallback = best[3]
        return fallback

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
        self._where: dict[int, set[int]] = {}
        for p, x in enumerate(self.o):
            self._where.setdefault(x, set()).add(p)
        for _ in range(max_rounds):
            bad = sorted({s for p, d in self.conflicts(zone_w) for s in (p, (p + d) % q)})
            if not bad:
                return
            improved = False
            for p in bad:
                if self.effort > self.max_effort:
                    return
                if not self._is_bad(p, zone_w):
                    continue
                p2 = self._best_swap(p, zone_w, old)
                if p2 is not None:
                    x, y = self.o[p], self.o[p2]
                    self._where[x].discard(p)
                    self._where[y].discard(p2)
                    self._where[x].add(p2)
                    self._where[y].add(p)
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
        """The partition to swap owners with ``p`` that lowers the weighted violations,
        fewest moves first; None if no swap helps."""
        o, q, D = self.o, self.q, self.D
        x = o[p]
        near = self._near(p)
        here = self.cost_w(x, p, zone_w)
        best = None

        def consider(p2: int, delta: int) -> None:
            nonlocal best
            if delta >= 0:
                return
            y = o[p2]
            moves = (y != old[p]) - (x != old[p]) + (x != old[p2]) - (y != old[p2])
            key = (moves, delta, min((p2 - p) % q, (p - p2) % q), p2)
            if best is None or key < best:
                best = key

        for d in range(1 - D, D):
            p2 = (p + d) % q
            if d and o[p2] != x and o[p2] >= 0:
                before = self.local_cost((p, p2), zone_w)
                self._swap(p, p2)
                after = self.local_cost((p, p2), zone_w)
                self._swap(p, p2)
                consider(p2, after - before)
        # Far apart, the two positions' costs are independent.  A member already next to
        # p cannot help there, so only the others' partitions are examined.
        # When p only shares a zone, a member of a zone already next to p cannot help.
        near_zones = (
            {self.zone_of[y] for y in near if y >= 0} if zone_w and here < _NODE_W else set()
        )
        for y in sorted(self._where):
            if y == x or y < 0 or y in near or self.zone_of[y] in near_zones:
                continue
            c1 = self.cost_w(y, p, zone_w)
            for p2 in self._where[y]:
                if min((p2 - p) % q, (p - p2) % q) < D:
                    continue
                self.effort += 1
                c2 = self.cost_w(x, p2, zone_w)
                if c1 + c2 >= here:
                    continue  # does nothing for p (other swaps fix y's own conflicts)
                consider(p2, c1 + c2 - here - self.cost_w(y, p2, zone_w))
        return None if best is None else best[3]

    def chain_repair(self, zone_w: int, max_rounds: int = 20) -> None:
        """Where no single swap helps (tight layouts, n = N + 1): move ``p`` to a member
        that fits there and let the loss ripple along the shortest chain of members, each
        taking a partition from the next, back to ``p``'s owner.  Counts are kept."""
        q = self.q
        for _ in range(max_rounds):
            bad = sorted({s for p, d in self.conflicts(zone_w) for s in (p, (p + d) % q)})
            if not bad:
                return
            improved = False
            for p in bad:
                if self.effort > self.max_effort:
                    return
                if not self._is_bad(p, zone_w):
                    continue
                self.effort += q
                chain = self._find_chain(p, zone_w)
                if not chain:
                    continue
                spots = [s for s, _ in chain]
                before = self.local_cost(spots, zone_w)
                undo = [(s, self.o[s]) for s in spots]
                for s, v in chain:
                    self.o[s] = v
                if self.local_cost(spots, zone_w) < before:
                    improved = True
                else:
                    for s, v in undo:
                        self.o[s] = v
            if not improved:
                return

    def _near(self, s: int) -> set[int]:
        o, q = self.o, self.q
        return {o[(s + d) % q] for d in range(1 - self.D, self.D) if d}

    def _fits(self, v: int, near: set[int], near_zones: set[int], zone_w: int) -> bool:
        return v not in near and not (zone_w and self.zone_of[v] in near_zones)

    def _find_chain(self, p: int, zone_w: int) -> list[tuple[int, int]]:
        """Breadth-first: ``[(p, y1), (s1, y2), ..., (sk, x)]`` with x the owner of p."""
        o, q, D = self.o, self.q, self.D
        x = o[p]
        near_p = self._near(p)
        zones_p = {self.zone_of[y] for y in near_p if y >= 0}
        parent: dict[int, tuple[int, int]] = {}
        frontier = []
        for v in range(self.n):
            if v != x and self._fits(v, near_p, zones_p, zone_w):
                parent[v] = (-1, p)
                frontier.append(v)
        held: dict[int, list[int]] = {}
        for s, u in enumerate(o):
            if min((s - p) % q, (p - s) % q) >= D:
                held.setdefault(u, []).append(s)
        while frontier:
            nxt = []
            for u in frontier:
                for s in held.get(u, ()):
                    near = self._near(s)
                    zones = {self.zone_of[y] for y in near if y >= 0} if zone_w else set()
                    if self._fits(x, near, zones, zone_w):
                        chain = [(s, x)]
                        while u != -1:
                            prev, spot = parent[u]
                            chain.append((spot, u))
                            u = prev
                        return chain[::-1]
                    for v in range(self.n):
                        if v not in parent and v != x and self._fits(v, near, zones, zone_w):
                            parent[v] = (u, s)
                            nxt.append(v)
            frontier = nxt
        return []

    def window_repair(self, zone_w: int, old: Sequence[int], max_width: int = 10) -> None:
        """Where a violation's neighbourhood is full (every member is within N - 1 of it):
        re-order the partitions of a small window around it -- same owners, same counts --
        into a valid order, the one that moves fewest partitions from ``old``."""
        q = self.q
        max_width = min(max_width, q - 2 * (self.D - 1))
        for _ in range(4):
            bad = sorted({s for p, d in self.conflicts(zone_w) for s in (p, (p + d) % q)})
            if not bad:
                return
            improved = False
            for p in bad:
                if self.effort > self.max_effort:
                    return
                if not self._is_bad(p, zone_w):
                    continue
                for width in range(2, max_width + 1):
                    start = p - (width - 1) // 2
                    fill = self._best_order(start, width, zone_w, old)
                    if fill is not None:
                        for i, v in enumerate(fill):
                            self.o[(start + i) % q] = v
                        improved = True
                        break
                else:
                    improved = self._exchange_fix(p, zone_w, old, max_width) or improved
            if not improved:
                return

    def _exchange_fix(self, p: int, zone_w: int, old: Sequence[int], max_width: int) -> bool:
        """Re-order a window around ``p`` with one of its partitions traded for one from
        far away: the window sheds a unit of ``x`` and gains a unit of ``z``, and a far
        partition of ``z`` where ``x`` fits goes to ``x`` (counts are kept)."""
        o, q, D = self.o, self.q, self.D
        lo = p - (max_width - 1) // 2
        kinds = sorted({o[(lo + i) % q] for i in range(max_width)})
        # Where each kind fits, clear of every window tried (so the re-order cannot spoil it).
        reach = max_width + 2 * D
        spots_for: dict[int, list[int]] = {}
        for x in kinds:
            spots_for[x] = [
                s for s in range(q)
                if (s - lo + D) % q >= reach and self.cost_w(x, s, zone_w) == 0
            ]
            self.effort += q
        for width in range(3, max_width + 1):
            start = p - (width - 1) // 2
            spots = [(start + i) % q for i in range(width)]
            pool: dict[int, int] = {}
            for s in spots:
                pool[o[s]] = pool.get(o[s], 0) + 1
            for x in sorted(pool):
                by_owner: dict[int, int] = {}
                for s in spots_for.get(x, ()):
                    z = o[s]
                    if z != x and (z not in by_owner or (old[s] == x) > (old[by_owner[z]] == x)):
                        by_owner[z] = s
                for z in sorted(by_owner):
                    if self.effort > self.max_effort:
                        return False
                    trade = dict(pool)
                    trade[x] -= 1
                    trade[z] = trade.get(z, 0) + 1
                    fill = self._best_order(start, width, zone_w, old, trade)
                    if fill is not None:
                        for i, v in enumerate(fill):
                            o[spots[i]] = v
                        o[by_owner[z]] = x
                        return True
        return False

    def _best_order(
        self,
        start: int,
        width: int,
        zone_w: int,
        old: Sequence[int],
        pool: dict[int, int] | None = None,
        budget: int = 3000,
    ) -> list[int] | None:
        o, q, D = self.o, self.q, self.D
        spots = [(start + i) % q for i in range(width)]
        if pool is None:
            pool = {}
            for s in spots:
                pool[o[s]] = pool.get(o[s], 0) + 1
        pool = dict(pool)
        kinds = sorted(pool)
        # Compare labels: zones when zones count (a shared node is a shared zone), else nodes.
        label = {x: (self.zone_of[x] if zone_w else x) for x in range(self.n)}
        label[-1] = -1 - q
        left = [label[o[(start - k) % q]] for k in range(D - 1, 0, -1)]
        right = [label[o[(start + width + k) % q]] for k in range(D - 1)]
        olds = [old[s] for s in spots]
        best: list = [None, width + 1]
        seq: list[int] = []
        labels = list(left)
        steps = [0]

        def dfs(i: int, cost: int) -> None:
            if cost >= best[1] or steps[0] > budget:
                return
            if i == width:
                best[0], best[1] = list(seq), cost
                return
            steps[0] += 1
            self.effort += 4
            recent = labels[-(D - 1) :] if D > 1 else []
            ahead = right[: max(0, D - 1 - (width - 1 - i))]
            keep = olds[i]
            for v in sorted(kinds, key=lambda v: v != keep):
                if not pool[v]:
                    continue
                lv = label[v]
                if lv in recent or lv in ahead:
                    continue
                pool[v] -= 1
                seq.append(v)
                labels.append(lv)
                dfs(i + 1, cost + (v != olds[i]))
                labels.pop()
                seq.pop()
                pool[v] += 1

        dfs(0, 0)
        return best[0]

    def bad_weight(self, zone_w: int) -> int:
        q, o = self.q, self.o
        return sum(self.weight(o[p], o[(p + d) % q], zone_w) for p, d in self.conflicts(zone_w))


def _construct(
    q: int,
    n_val: int,
    targets: Sequence[int],
    zone_of: Sequence[int],
    zone_first: bool,
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
            zone_ok = p - zlast[z] >= n_val and (
                zfirst[z] < 0 or zfirst[z] + q - p >= n_val
            )
            if zone_first:
                key = (not node_ok, not zone_ok, -zrem[z], -rem[x], prefer[p] != x, last[x], x)
            else:
                key = (not node_ok, -rem[x], not zone_ok, prefer[p] != x, last[x], x)
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
    """Whether Rule 2 is enforced (partitions moved for it) for nodes, and for zones."""
    node_ok = distinct_feasible(q, targets, n_val)
    zone_ok = False
    if zoned and node_ok:
        totals: dict[int, int] = {}
        members: dict[int, int] = {}
        for x, t in enumerate(targets):
            totals[zone_of[x]] = totals.get(zone_of[x], 0) + t
            members[zone_of[x]] = members.get(zone_of[x], 0) + 1
        zone_ok = zones_enforced(list(members.values()), n_val) and distinct_feasible(
            q, [totals[z] for z in sorted(totals)], n_val
        )
    return node_ok, zone_ok


def zones_enforced(zone_sizes: Sequence[int], n_val: int) -> bool:
    """Whether claim enforces distinct zones for zones of these member counts: each zone
    must hold fewer than 1/N of the members (which implies at least N + 1 zones).  A zone
    with exactly 1/N of them would need a perfectly periodic layout, which Q, a power of
    two, rarely allows; such layouts are best effort, like fewer zones."""
    n = sum(zone_sizes)
    return n > 0 and all(n_val * size < n for size in zone_sizes)


def _rounds(q: int, targets: Sequence[int], order: Sequence[int]) -> list[int]:
    """A fresh layout of rounds: ``order`` repeated, the members with one partition fewer
    each left out of one round.  The omissions go in ``order`` order into all rounds but
    the last, so a member's next partition is at least n - (omissions per round) ahead;
    with n >= N + 1 that is N unless q/n is tiny (the caller checks the result)."""
    n = len(order)
    base = q // n
    if base == 0:
        return [x for x in order if targets[x] > 0]
    omit = [x for x in order if targets[x] == base]
    if len(omit) == n:
        return list(order) * base
    out: list[int] = []
    for j in range(base + 1):
        skip = set(omit[j * len(omit) // base : (j + 1) * len(omit) // base]) if j < base else ()
        out.extend(x for x in order if x not in skip)
    return out


def _member_order(
    old: Sequence[int], n: int, zone_of: Sequence[int], zoned: bool, n_val: int
) -> list[int]:
    """Members by first appearance in the old ring.  With zones, the order is itself a
    cyclic layout whose every ``n_val`` consecutive entries are in distinct zones when
    that is possible (found by ``_search``), else zones interleaved largest first."""
    first: dict[int, int] = {}
    for p, x in enumerate(old):
        if x >= 0 and x not in first:
            first[x] = p
    order = sorted(range(n), key=lambda x: (first.get(x, len(old)), x))
    if not zoned:
        return order
    by_zone: dict[int, list[int]] = {}
    for x in order:
        by_zone.setdefault(zone_of[x], []).append(x)
    zones = sorted(by_zone, key=lambda z: (-len(by_zone[z]), by_zone[z][0]))
    sizes = [len(by_zone[z]) for z in zones]
    slots = None
    if n <= 256 and distinct_feasible(n, sizes, n_val):  # _search recurses n deep
        slots = _search(n, n_val, sizes, list(range(len(zones))), False, budget=20_000)
    if slots is None:
        queues = [list(by_zone[z]) for z in zones]
        out = []
        while any(queues):
            for xs in queues:
                if xs:
                    out.append(xs.pop(0))
        return out
    queues = [list(by_zone[z]) for z in zones]
    return [queues[i].pop(0) for i in slots]


def _search(
    q: int, n_val: int, targets: Sequence[int], zone_of: Sequence[int], zone_ok: bool,
    budget: int = 200_000,
) -> list[int] | None:
    """Exhaustive (budgeted) search for a valid cyclic layout; for the tiny rings where the
    two constructions above can miss (q below a few dozen)."""
    n = len(targets)
    rem = list(targets)
    seq: list[int] = []
    steps = [0]
    label = zone_of if zone_ok else list(range(n))

    def free(x: int, p: int) -> bool:
        for d in range(1, min(n_val, p + 1)):
            if label[seq[p - d]] == label[x]:
                return False
        for d in range(1, n_val):  # wrap-around: partitions 0 .. N-2 follow the last ones
            if p + d >= q and label[seq[p + d - q]] == label[x]:
                return False
        return True

    def dfs(p: int) -> bool:
        if p == q:
            return True
        steps[0] += 1
        if steps[0] > budget:
            return False
        left = q - p
        if any(r and (r - 1) * n_val + 1 > left for r in rem):
            return False
        last = {x: p for x in range(n)}
        for i in range(p - 1, max(-1, p - n), -1):
            last[seq[i]] = min(last[seq[i]], i)
        order = sorted(
            (x for x in range(n) if rem[x] and free(x, p)), key=lambda x: (-rem[x], last[x], x)
        )
        for x in order:
            rem[x] -= 1
            seq.append(x)
            if dfs(p + 1):
                return True
            seq.pop()
            rem[x] += 1
        return False

    return list(seq) if dfs(0) else None


def _fresh(
    q: int, n_val: int, targets: Sequence[int], zone_of: Sequence[int], zone_ok: bool,
    old: Sequence[int], zoned: bool,
) -> Iterator[_Layout]:
    """Fresh layouts ignoring the old one except as a tie-break, cheapest first: rounds,
    greedy sequence, and for tiny rings a search."""
    n = len(targets)
    yield _Layout(q, n_val, _rounds(q, targets, _member_order(old, n, zone_of, zoned, n_val)),
                  n, zone_of, zoned)
    yield _Layout(q, n_val, _construct(q, n_val, targets, zone_of, zone_ok, old),
                  n, zone_of, zoned)
    if q <= 64:
        found = _search(q, n_val, targets, zone_of, zone_ok)
        if found is not None:
            yield _Layout(q, n_val, found, n, zone_of, zoned)


def _best_fresh(
    q: int, n_val: int, targets: Sequence[int], zone_of: Sequence[int], zone_ok: bool,
    old: Sequence[int], zoned: bool, zone_w: int, first: _Layout | None = None,
) -> _Layout:
    """The first fresh layout that repairs to zero violations, else the least bad."""
    options = [] if first is None else [first]
    for fresh in _fresh(q, n_val, targets, zone_of, zone_ok, old, zoned):
        _fix(fresh, zone_w, old)
        options.append(fresh)
        if fresh.bad_weight(zone_w) == 0:
            break
    return min(
        options,
        key=lambda lay: (lay.bad_weight(zone_w), sum(a != b for a, b in zip(lay.o, old))),
    )


def _fix(layout: _Layout, zone_w: int, old: Sequence[int]) -> _Layout:
    layout.repair(zone_w, old)
    if layout.bad_weight(zone_w):
        layout.chain_repair(zone_w)
        layout.window_repair(zone_w, old)
        layout.repair(zone_w, old)
    return layout


def _finish(
    layout: _Layout | None,
    old: list[int],
    targets: list[int],
    node_ok: bool,
    zone_ok: bool,
) -> list[int]:
    """Steps 4 and 5: repair, and rebuild if repair could not reach an achievable Rule 2."""
    assert layout is not None
    if not node_ok:
        return layout.o
    zone_w = _ZONE_W if zone_ok else 0
    _fix(layout, zone_w, old)
    if layout.bad_weight(zone_w) == 0:
        return layout.o
    return _best_fresh(
        layout.q, layout.N, targets, layout.zone_of, zone_ok, old, layout.zoned, zone_w, layout
    ).o


def _rebalance(
    q: int, old_owners: Sequence[str], names: Sequence[str], n_val: int, zone_map: Mapping[str, str]
) -> list[str]:
    """Steps 1 to 5 from the old owners to a layout for ``names``."""
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


def _bootstrap(
    ring: Ring, names: Sequence[str], n_val: int, zone_map: Mapping[str, str]
) -> list[str]:
    """Claim with no prior layout worth keeping (at most one old owner stays): the best
    fresh layout; the old owner keeps its own partitions where the layout puts it."""
    q = ring.q
    index = {name: i for i, name in enumerate(names)}
    old = [index.get(x, -1) for x in ring.owners]
    zone_of, zoned = _zones_for(names, zone_map)
    count = [0] * len(names)
    for x in old:
        if x >= 0:
            count[x] += 1
    targets = _targets(count, q)
    node_ok, zone_ok = _feasibility(q, n_val, targets, zone_of, zoned)
    if not node_ok:
        fresh = next(_fresh(q, n_val, targets, zone_of, zone_ok, old, zoned))
        return [names[x] for x in fresh.o]
    zone_w = _ZONE_W if zone_ok else 0
    best = _best_fresh(q, n_val, targets, zone_of, zone_ok, old, zoned, zone_w)
    return [names[x] for x in best.o]
