"""Claim's rules as predicates: when Rule 2 (N-distinct windows) is achievable, and how
far a layout is from it.  kvd/ring/claim.py states the rules; this module decides them, for
claim's steps and for callers that check a ring (``violations``).

Pure: no I/O, no trio, no plyvel.
"""

from __future__ import annotations

from typing import Mapping, Sequence

__all__ = [
    "distinct_feasible",
    "enforced",
    "n_distinct_feasible",
    "violations",
    "zones_enforced",
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



def zones_enforced(zone_sizes: Sequence[int], n_val: int) -> bool:
    """Whether claim enforces distinct zones for zones of these member counts: each zone
    must hold fewer than 1/N of the members (which implies at least N + 1 zones).  A zone
    with exactly 1/N of them would need a perfectly periodic layout, which Q, a power of
    two, rarely allows; such layouts are best effort, like fewer zones."""
    n = sum(zone_sizes)
    return n > 0 and all(n_val * size < n for size in zone_sizes)


def enforced(
    q: int, n_val: int, targets: Sequence[int], zone_of: Sequence[int], zoned: bool
) -> tuple[bool, bool]:
    """Whether Rule 2 is enforced (partitions moved for it) for nodes, and for zones, for
    members with these ``targets`` and zone indexes ``zone_of``."""
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
