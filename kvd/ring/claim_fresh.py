"""Claim step 5: fresh layouts, built without regard to the old one but as a tie-break.

Used when repairs leave violations that Rule 2 says are avoidable, and for a first claim
from a one-node ring (no prior layout worth keeping).  Three builders, cheapest first:
rounds of all members in a fixed (zone-interleaved) order; a greedy cyclic sequence; and
for tiny rings a budgeted exhaustive search.  Each is repaired (claim_repair.py); the first
with no violations wins, else the one with fewest violations, then fewest moves.

Pure: no I/O, no trio, no plyvel.
"""

from __future__ import annotations

from typing import Iterator, Sequence

from kvd.ring.claim_layout import Layout
from kvd.ring.claim_repair import repair
from kvd.ring.claim_rules import distinct_feasible

__all__ = ["best_fresh", "fresh_layouts"]


def _greedy_sequence(
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
        best: tuple[tuple[int, ...], int] | None = None  # (rank, member): lowest rank wins
        for x in range(n):
            if rem[x] == 0:
                continue
            z = zone_of[x]
            node_ok = p - last[x] >= n_val and (first[x] < 0 or first[x] + q - p >= n_val)
            zone_ok = p - zlast[z] >= n_val and (
                zfirst[z] < 0 or zfirst[z] + q - p >= n_val
            )
            key: tuple[int, ...]
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


def fresh_layouts(
    q: int, n_val: int, targets: Sequence[int], zone_of: Sequence[int], zone_ok: bool,
    old: Sequence[int], zoned: bool,
) -> Iterator[Layout]:
    """Fresh layouts ignoring the old one except as a tie-break, cheapest first: rounds,
    greedy sequence, and for tiny rings a search."""
    n = len(targets)
    yield Layout(q, n_val, _rounds(q, targets, _member_order(old, n, zone_of, zoned, n_val)),
                  n, zone_of, zoned)
    yield Layout(q, n_val, _greedy_sequence(q, n_val, targets, zone_of, zone_ok, old),
                  n, zone_of, zoned)
    if q <= 64:
        found = _search(q, n_val, targets, zone_of, zone_ok)
        if found is not None:
            yield Layout(q, n_val, found, n, zone_of, zoned)


def best_fresh(
    q: int, n_val: int, targets: Sequence[int], zone_of: Sequence[int], zone_ok: bool,
    old: Sequence[int], zoned: bool, zone_weight: int, first: Layout | None = None,
) -> Layout:
    """The first fresh layout that repairs to zero violations, else the least bad."""
    options = [] if first is None else [first]
    for fresh in fresh_layouts(q, n_val, targets, zone_of, zone_ok, old, zoned):
        repair(fresh, zone_weight, old)
        options.append(fresh)
        if fresh.bad_weight(zone_weight) == 0:
            break
    return min(
        options,
        key=lambda lay: (lay.bad_weight(zone_weight), sum(a != b for a, b in zip(lay.owners, old))),
    )
