"""Claim's working layout and steps 1 to 3: targets, freed partitions, joiners' takes.

``Layout`` holds one claim in progress: ``owners[p]`` is a member index (-1 = unowned) and
``owned[x]`` how many partitions member ``x`` holds.  Its methods are the cost primitives
every step shares and the steps that change counts (kvd/ring/claim.py states the rules and
the order of the steps; claim_repair.py and claim_fresh.py are steps 4 and 5).

Rule: every method here is deterministic (ties broken by index), as Rule 4 requires.

Pure: no I/O, no trio, no plyvel.
"""

from __future__ import annotations

import heapq
from typing import Sequence

# A window with the same node twice outweighs any number of windows sharing only a zone.
NODE_WEIGHT = 1 << 20
ZONE_WEIGHT = 1


def targets_for(count: Sequence[int], q: int) -> list[int]:
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


class Layout:
    """Working state of one claim.  Members are indexes into the sorted member names.

    ``q``            partitions in the ring
    ``n_val``        N, the replicas of a key
    ``window``       min(N, q): Rule 2 looks at every run of this many consecutive partitions
    ``owners[p]``    the member owning partition ``p``, -1 while it has none
    ``n_members``    how many members there are
    ``owned[x]``     how many partitions member ``x`` owns (``assign`` keeps it current)
    ``zone_of[x]``   member ``x``'s zone index (a member without a zone is its own zone)
    ``zoned``        whether zones are configured; ``zone_weight`` is then their weight in picks
    ``effort``       repair work done so far; repairs stop at ``max_effort``
    """

    def __init__(
        self,
        q: int,
        n_val: int,
        owners: list[int],
        n_members: int,
        zone_of: Sequence[int],
        zoned: bool,
    ) -> None:
        self.q = q
        self.n_val = n_val
        # A window is this many consecutive partitions: distances 1 .. window - 1 are checked.
        self.window = min(n_val, q)
        self.owners = owners
        self.n_members = n_members
        self.zone_of = zone_of
        self.zoned = zoned
        self.zone_weight = ZONE_WEIGHT if zoned else 0
        self.owned = [0] * n_members  # partitions each member owns
        for x in owners:
            if x >= 0:
                self.owned[x] += 1
        # Repairs count their work here and stop at the cap, so a claim is bounded
        # (deterministically) even on layouts that no local repair can fix.
        self.effort = 0
        self.max_effort = 300_000 + 100 * q

    # -- primitives ---------------------------------------------------------------------

    def assign(self, p: int, r: int) -> None:
        """Give partition ``p`` to member ``r``, keeping ``owned`` current."""
        x = self.owners[p]
        if x >= 0:
            self.owned[x] -= 1
        self.owners[p] = r
        self.owned[r] += 1

    def pair_weight(self, x: int, y: int, zone_weight: int) -> int:
        """What members ``x`` and ``y`` in one window cost: a shared node, a shared zone, 0."""
        if x < 0 or y < 0:
            return 0
        if x == y:
            return NODE_WEIGHT
        if zone_weight and self.zone_of[x] == self.zone_of[y]:
            return zone_weight
        return 0

    def cost_with(self, r: int, p: int, zone_weight: int) -> int:
        """Weighted conflicts ``r`` would have at ``p`` counting zones with ``zone_weight``."""
        owners, q, zone_of = self.owners, self.q, self.zone_of
        cost = 0
        if not zone_weight:
            for d in range(1, self.window):
                cost += (owners[(p - d) % q] == r) + (owners[(p + d) % q] == r)
            return cost * NODE_WEIGHT
        zr = zone_of[r]
        for d in range(1, self.window):
            for s in ((p - d) % q, (p + d) % q):
                y = owners[s]
                if y == r:
                    cost += NODE_WEIGHT
                elif zone_weight and y >= 0 and zone_of[y] == zr:
                    cost += zone_weight
        return cost

    def cost_at(self, r: int, p: int) -> int:
        """Weighted conflicts ``r`` would have at ``p`` (whoever owns ``p`` now), zones
        counted whenever they are configured (picks prefer distinct zones even when the
        rule is not enforced)."""
        return self.cost_with(r, p, self.zone_weight)

    def conflicts(self, zone_weight: int) -> list[tuple[int, int]]:
        """``(p, d)`` for every pair of partitions ``d < N`` apart that share a node/zone."""
        owners, q = self.owners, self.q
        out = []
        for p in range(q):
            x = owners[p]
            if x < 0:
                continue
            for d in range(1, self.window):
                if self.pair_weight(x, owners[(p + d) % q], zone_weight):
                    out.append((p, d))
        return out

    def local_cost(self, ps: Sequence[int], zone_weight: int) -> int:
        """Weighted conflicts of every pair that involves one of the partitions ``ps``."""
        owners, q = self.owners, self.q
        seen: set[tuple[int, int]] = set()
        total = 0
        for p in ps:
            for d in range(1, self.window):
                for s in ((p - d) % q, p):
                    if (s, d) in seen:
                        continue
                    seen.add((s, d))
                    total += self.pair_weight(owners[s], owners[(s + d) % q], zone_weight)
        return total

    def surplus(self, x: int, targets: Sequence[int]) -> int:
        """How many partitions member ``x`` owns above its target (0 for unowned)."""
        return self.owned[x] - targets[x] if x >= 0 else 0

    # -- step 2: partitions of departed nodes -------------------------------------------

    def fill_free(self, targets: list[int]) -> None:
        """Give unowned partitions to members under target (updates ``targets``).

        A departed node's partitions are N apart when the old ring kept Rule 2, so each can
        be filled independently: this is a bipartite b-matching (partition -> member that
        fits there, within the member's need), solved greedily, most constrained first,
        with augmenting paths where the greedy choice runs out.  Which of the members tied
        for the q % n extra partitions get one is left to the matching (``flex``).
        """
        free = [p for p in range(self.q) if self.owners[p] < 0]
        if not free:
            return
        base = self.q // self.n_members
        flex, bonus = _tie_group(self.owned, targets, base)
        receivers = [r for r in range(self.n_members) if self.owned[r] < targets[r] or r in flex]
        cap = {r: (base if r in flex else targets[r]) - self.owned[r] for r in receivers}
        for clean_zone in (True, False) if self.zoned else (False,):
            limit = ZONE_WEIGHT if clean_zone else NODE_WEIGHT
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
                (r for r in range(self.n_members) if self.owned[r] < targets[r]),
                key=lambda r: (self.cost_at(r, p), self.owned[r] - targets[r], r),
            )
            self.assign(p, best)

    # -- step 3: members under target take from members over target --------------------

    def take_stripe(self, targets: list[int]) -> list[int]:
        """Small clusters (n <= N): a joiner takes a whole residue class ``p % N``."""
        q, n_val = self.q, self.n_val
        base = q // self.n_members
        for r in range(self.n_members):
            if self.owned[r] >= targets[r]:
                continue
            others = [x for x in range(self.n_members) if x != r and self.owned[x] > 0]
            if not others or len(others) >= n_val:
                continue
            per_class = [[0] * n_val for _ in range(self.n_members)]
            for p, x in enumerate(self.owners):
                if x >= 0:
                    per_class[x][p % n_val] += 1
            anchored = {max(range(n_val), key=lambda s: (per_class[x][s], -s)) for x in others}
            open_classes = [s for s in range(n_val) if s not in anchored]
            if not open_classes:
                continue
            own = list(range(open_classes[0], q, n_val))
            for i in _spread(len(own), targets[r] - self.owned[r]):
                x = self.owners[own[i]]
                # Owners may go down to the floor here; who keeps the +1 is settled below.
                if x >= 0 and x != r and self.owned[x] > base:
                    self.assign(own[i], r)
            targets = targets_for(self.owned, q)
            reserved = sorted(p for s in open_classes[1:] for p in range(s, q, n_val))
            self.take_in_order(r, reserved, targets)
        return targets

    def take_in_order(self, r: int, positions: Sequence[int], targets: Sequence[int]) -> None:
        need = targets[r] - self.owned[r]
        if need <= 0 or not positions:
            return
        taken = set()
        for i in _spread(len(positions), need):
            for k in range(len(positions)):
                p = positions[(i + k) % len(positions)]
                x = self.owners[p]
                if p not in taken and x != r and self.surplus(x, targets) > 0:
                    self.assign(p, r)
                    taken.add(p)
                    break

    def take_repairs(self, targets: Sequence[int]) -> None:
        """Receivers take over-target partitions that sit in a violating window."""
        if not any(self.owned[r] < targets[r] for r in range(self.n_members)):
            return
        q = self.q
        for p, d in self.conflicts(self.zone_weight):
            pair = (p, (p + d) % q)
            if not self.pair_weight(self.owners[pair[0]], self.owners[pair[1]], self.zone_weight):
                continue  # fixed by an earlier pick
            for c in pair:
                x = self.owners[c]
                if self.surplus(x, targets) <= 0:
                    continue
                fits = [
                    r
                    for r in range(self.n_members)
                    if self.owned[r] < targets[r] and self.cost_at(r, c) == 0
                ]
                if fits:
                    self.assign(c, min(fits, key=lambda r: (self.owned[r] - targets[r], r)))
                    break

    def take_spread(self, targets: Sequence[int]) -> None:
        for r in range(self.n_members):
            if self.owned[r] < targets[r]:
                self._spread_one(r, targets)

    def _spread_one(self, r: int, targets: Sequence[int]) -> None:
        q = self.q
        mine = [p for p in range(q) if self.owners[p] == r]
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
        while self.owned[r] < targets[r] and heap:
            _, a, b = heapq.heappop(heap)
            c = self._pick_in_gap(r, a, b, targets)
            if c is None:
                continue
            self.assign(c % q, r)
            heapq.heappush(heap, (a - c, a, c))
            heapq.heappush(heap, (c - b, c, b))

    def _pick_in_gap(self, r: int, a: int, b: int, targets: Sequence[int]) -> int | None:
        """Best partition strictly inside gap (a, b) of ``r``'s partitions, or None."""
        lo, hi = a + self.window, b - self.window
        if lo > hi:
            return None
        mid = (a + b) // 2
        radius = max(self.window, min((b - a) // 4, 2 * self.n_members + self.window))
        fallback = None
        for first, last in ((max(lo, mid - radius), min(hi, mid + radius)), (lo, hi)):
            best = None
            for c in range(first, last + 1):
                p = c % self.q
                s = self.surplus(self.owners[p], targets)
                if s <= 0 or self.owners[p] == r:
                    continue
                key = (self.cost_at(r, p), -s, abs(c - mid), c)
                if best is None or key < best:
                    best = key
            if best is not None and best[0] == 0:
                return best[3]
            if best is not None and best[0] < NODE_WEIGHT:
                fallback = best[3]
        return fallback

    def _pick_anywhere(self, r: int, targets: Sequence[int]) -> int | None:
        best = None
        for p in range(self.q):
            x = self.owners[p]
            s = self.surplus(x, targets)
            if s <= 0 or x == r:
                continue
            key = (self.cost_at(r, p), -s, p)
            if best is None or key < best:
                best = key
        return None if best is None else best[2]

    def take_rest(self, targets: Sequence[int]) -> None:
        """Whatever could not be placed cleanly: least conflicting partitions (repaired later)."""
        for r in range(self.n_members):
            while self.owned[r] < targets[r]:
                p = self._pick_anywhere(r, targets)
                if p is None:
                    break
                self.assign(p, r)

    def is_bad(self, p: int, zone_weight: int) -> bool:
        """Whether the owner of ``p`` shares a node or weighted zone within a window."""
        x, owners, q = self.owners[p], self.owners, self.q
        return any(
            self.pair_weight(x, owners[(p + d) % q], zone_weight)
            or self.pair_weight(x, owners[(p - d) % q], zone_weight)
            for d in range(1, self.window)
        )

    def near(self, s: int) -> set[int]:
        """The members within N - 1 partitions of ``s``."""
        owners, q = self.owners, self.q
        return {owners[(s + d) % q] for d in range(1 - self.window, self.window) if d}

    def bad_weight(self, zone_weight: int) -> int:
        """The weighted violations of the whole layout (0: Rule 2 holds)."""
        q, owners = self.q, self.owners
        return sum(
            self.pair_weight(owners[p], owners[(p + d) % q], zone_weight)
            for p, d in self.conflicts(zone_weight)
        )
