"""Claim step 4: repair a layout's Rule 2 violations without changing anyone's count.

Each repair keeps every member's partition count and only accepts a change that strictly
lowers the weighted violations (a repeated node outweighs any repeated zones), so repairs
cannot undo one another: the total only falls.  Cheapest first: swaps of two partitions'
owners (fewest moves from the old ring first); chains (p goes to a member that fits, which
gives up a partition to the next, ..., back to p's owner); re-ordering a small window
around a violation, alone or trading one partition with a far one.  Work is counted in
``Layout.effort`` and stops at ``Layout.max_effort``: bounded by a count, never by a clock
(Rule 4).

Pure: no I/O, no trio, no plyvel.
"""

from __future__ import annotations

from typing import Sequence

from kvd.ring.claim_layout import NODE_WEIGHT, Layout

__all__ = ["repair"]


def repair(layout: Layout, zone_weight: int, old: Sequence[int]) -> Layout:
    """Swaps; where violations remain, chains, window re-orders and swaps again."""
    repair_by_swaps(layout, zone_weight, old)
    if layout.bad_weight(zone_weight):
        repair_by_chains(layout, zone_weight)
        repair_by_reordering(layout, zone_weight, old)
        repair_by_swaps(layout, zone_weight, old)
    return layout


def repair_by_swaps(
    layout: Layout, zone_weight: int, old: Sequence[int], max_rounds: int = 50
) -> None:
    """Swap owners of a bad partition and the one that helps most, round after round."""
    where: dict[int, set[int]] = {}  # member -> its partitions, kept current by swaps
    for p, x in enumerate(layout.owners):
        where.setdefault(x, set()).add(p)
    for _ in range(max_rounds):
        bad = _bad_partitions(layout, zone_weight)
        if not bad:
            return
        improved = False
        for p in bad:
            if layout.effort > layout.max_effort:
                return
            if not layout.is_bad(p, zone_weight):
                continue
            p2 = _best_swap(layout, p, zone_weight, old, where)
            if p2 is not None:
                x, y = layout.owners[p], layout.owners[p2]
                where[x].discard(p)
                where[y].discard(p2)
                where[x].add(p2)
                where[y].add(p)
                _swap(layout.owners, p, p2)
                improved = True
        if not improved:
            return


def _best_swap(
    layout: Layout, p: int, zone_weight: int, old: Sequence[int], where: dict[int, set[int]]
) -> int | None:
    """The partition to swap owners with ``p`` that lowers the weighted violations,
    fewest moves first; None if no swap helps."""
    owners, q, window = layout.owners, layout.q, layout.window
    x = owners[p]
    near = layout.near(p)
    here = layout.cost_with(x, p, zone_weight)
    best = None

    def consider(p2: int, delta: int) -> None:
        nonlocal best
        if delta >= 0:
            return
        y = owners[p2]
        moves = (y != old[p]) - (x != old[p]) + (x != old[p2]) - (y != old[p2])
        key = (moves, delta, min((p2 - p) % q, (p - p2) % q), p2)
        if best is None or key < best:
            best = key

    for d in range(1 - window, window):
        p2 = (p + d) % q
        if d and owners[p2] != x and owners[p2] >= 0:
            before = layout.local_cost((p, p2), zone_weight)
            _swap(layout.owners, p, p2)
            after = layout.local_cost((p, p2), zone_weight)
            _swap(layout.owners, p, p2)
            consider(p2, after - before)
    # Far apart, the two positions' costs are independent.  A member already next to
    # p cannot help there, so only the others' partitions are examined.
    # When p only shares a zone, a member of a zone already next to p cannot help.
    near_zones = (
        {layout.zone_of[y] for y in near if y >= 0} if zone_weight and here < NODE_WEIGHT else set()
    )
    for y in sorted(where):
        if y == x or y < 0 or y in near or layout.zone_of[y] in near_zones:
            continue
        c1 = layout.cost_with(y, p, zone_weight)
        for p2 in where[y]:
            if min((p2 - p) % q, (p - p2) % q) < window:
                continue
            layout.effort += 1
            c2 = layout.cost_with(x, p2, zone_weight)
            if c1 + c2 >= here:
                continue  # does nothing for p (other swaps fix y's own conflicts)
            consider(p2, c1 + c2 - here - layout.cost_with(y, p2, zone_weight))
    return None if best is None else best[3]


def repair_by_chains(layout: Layout, zone_weight: int, max_rounds: int = 20) -> None:
    """Where no single swap helps (tight layouts, n = N + 1): move ``p`` to a member
    that fits there and let the loss ripple along the shortest chain of members, each
    taking a partition from the next, back to ``p``'s owner.  Counts are kept."""
    q = layout.q
    for _ in range(max_rounds):
        bad = _bad_partitions(layout, zone_weight)
        if not bad:
            return
        improved = False
        for p in bad:
            if layout.effort > layout.max_effort:
                return
            if not layout.is_bad(p, zone_weight):
                continue
            layout.effort += q
            chain = _find_chain(layout, p, zone_weight)
            if not chain:
                continue
            spots = [s for s, _ in chain]
            before = layout.local_cost(spots, zone_weight)
            undo = [(s, layout.owners[s]) for s in spots]
            for s, v in chain:
                layout.owners[s] = v
            if layout.local_cost(spots, zone_weight) < before:
                improved = True
            else:
                for s, v in undo:
                    layout.owners[s] = v
        if not improved:
            return


def _fits(layout: Layout, v: int, near: set[int], near_zones: set[int], zone_weight: int) -> bool:
    """Whether member ``v`` shares neither a node nor (when weighted) a zone with ``near``."""
    return v not in near and not (zone_weight and layout.zone_of[v] in near_zones)


def _find_chain(layout: Layout, p: int, zone_weight: int) -> list[tuple[int, int]]:
    """Breadth-first: ``[(p, y1), (s1, y2), ..., (sk, x)]`` with x the owner of p."""
    owners, q, window = layout.owners, layout.q, layout.window
    x = owners[p]
    near_p = layout.near(p)
    zones_p = {layout.zone_of[y] for y in near_p if y >= 0}
    parent: dict[int, tuple[int, int]] = {}
    frontier = []
    for v in range(layout.n_members):
        if v != x and _fits(layout, v, near_p, zones_p, zone_weight):
            parent[v] = (-1, p)
            frontier.append(v)
    held: dict[int, list[int]] = {}
    for s, u in enumerate(owners):
        if min((s - p) % q, (p - s) % q) >= window:
            held.setdefault(u, []).append(s)
    while frontier:
        nxt = []
        for u in frontier:
            for s in held.get(u, ()):
                near = layout.near(s)
                zones = {layout.zone_of[y] for y in near if y >= 0} if zone_weight else set()
                if _fits(layout, x, near, zones, zone_weight):
                    chain = [(s, x)]
                    while u != -1:
                        prev, spot = parent[u]
                        chain.append((spot, u))
                        u = prev
                    return chain[::-1]
                for v in range(layout.n_members):
                    if v not in parent and v != x and _fits(layout, v, near, zones, zone_weight):
                        parent[v] = (u, s)
                        nxt.append(v)
        frontier = nxt
    return []


def repair_by_reordering(
    layout: Layout, zone_weight: int, old: Sequence[int], max_width: int = 10
) -> None:
    """Where a violation's neighbourhood is full (every member is within N - 1 of it):
    re-order the partitions of a small window around it -- same owners, same counts --
    into a valid order, the one that moves fewest partitions from ``old``."""
    q = layout.q
    max_width = min(max_width, q - 2 * (layout.window - 1))
    for _ in range(4):
        bad = _bad_partitions(layout, zone_weight)
        if not bad:
            return
        improved = False
        for p in bad:
            if layout.effort > layout.max_effort:
                return
            if not layout.is_bad(p, zone_weight):
                continue
            for width in range(2, max_width + 1):
                start = p - (width - 1) // 2
                fill = _best_order(layout, start, width, zone_weight, old)
                if fill is not None:
                    for i, v in enumerate(fill):
                        layout.owners[(start + i) % q] = v
                    improved = True
                    break
            else:
                improved = _exchange_fix(layout, p, zone_weight, old, max_width) or improved
        if not improved:
            return


def _exchange_fix(
    layout: Layout, p: int, zone_weight: int, old: Sequence[int], max_width: int
) -> bool:
    """Re-order a window around ``p`` with one of its partitions traded for one from
    far away: the window sheds a unit of ``x`` and gains a unit of ``z``, and a far
    partition of ``z`` where ``x`` fits goes to ``x`` (counts are kept)."""
    owners, q, window = layout.owners, layout.q, layout.window
    lo = p - (max_width - 1) // 2
    kinds = sorted({owners[(lo + i) % q] for i in range(max_width)})
    # Where each kind fits, clear of every window tried (so the re-order cannot spoil it).
    reach = max_width + 2 * window
    spots_for: dict[int, list[int]] = {}
    for x in kinds:
        spots_for[x] = [
            s for s in range(q)
            if (s - lo + window) % q >= reach and layout.cost_with(x, s, zone_weight) == 0
        ]
        layout.effort += q
    for width in range(3, max_width + 1):
        start = p - (width - 1) // 2
        spots = [(start + i) % q for i in range(width)]
        pool: dict[int, int] = {}
        for s in spots:
            pool[owners[s]] = pool.get(owners[s], 0) + 1
        for x in sorted(pool):
            by_owner: dict[int, int] = {}
            for s in spots_for.get(x, ()):
                z = owners[s]
                if z != x and (z not in by_owner or (old[s] == x) > (old[by_owner[z]] == x)):
                    by_owner[z] = s
            for z in sorted(by_owner):
                if layout.effort > layout.max_effort:
                    return False
                trade = dict(pool)
                trade[x] -= 1
                trade[z] = trade.get(z, 0) + 1
                fill = _best_order(layout, start, width, zone_weight, old, trade)
                if fill is not None:
                    for i, v in enumerate(fill):
                        owners[spots[i]] = v
                    owners[by_owner[z]] = x
                    return True
    return False


def _best_order(
    layout: Layout,
    start: int,
    width: int,
    zone_weight: int,
    old: Sequence[int],
    pool: dict[int, int] | None = None,
    budget: int = 3000,
) -> list[int] | None:
    """The order of the window's partitions (from ``pool``, default its own owners) with
    no conflict inside or at its edges that moves fewest from ``old``; None if none is
    found within ``budget`` steps."""
    owners, q, window = layout.owners, layout.q, layout.window
    spots = [(start + i) % q for i in range(width)]
    if pool is None:
        pool = {}
        for s in spots:
            pool[owners[s]] = pool.get(owners[s], 0) + 1
    pool = dict(pool)
    kinds = sorted(pool)
    # Compare labels: zones when zones count (a shared node is a shared zone), else nodes.
    label = {x: (layout.zone_of[x] if zone_weight else x) for x in range(layout.n_members)}
    label[-1] = -1 - q
    left = [label[owners[(start - k) % q]] for k in range(window - 1, 0, -1)]
    right = [label[owners[(start + width + k) % q]] for k in range(window - 1)]
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
        layout.effort += 4
        recent = labels[-(window - 1) :] if window > 1 else []
        ahead = right[: max(0, window - 1 - (width - 1 - i))]
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


def _bad_partitions(layout: Layout, zone_weight: int) -> list[int]:
    """Both ends of every conflicting pair, in partition order."""
    q = layout.q
    return sorted({s for p, d in layout.conflicts(zone_weight) for s in (p, (p + d) % q)})


def _swap(owners: list[int], p: int, p2: int) -> None:
    owners[p], owners[p2] = owners[p2], owners[p]
