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

Where, one module per part (as riak_core splits its claim):
  claim.py          this API: ``claim``, ``plan``, and the order of the steps;
  claim_rules.py    the rules as predicates (Rule 2 feasibility, ``violations``);
  claim_layout.py   the working layout and steps 1 to 3;
  claim_repair.py   step 4;
  claim_fresh.py    step 5.

Cost: a claim in the test grid takes at most a few tens of milliseconds at q = 4096;
repairs of hard layouts are capped (about a second or two).  The claimant should still
call it off the event loop (``trio.to_thread.run_sync``).

Pure: no I/O, no trio, no plyvel.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

from kvd.ring.claim_fresh import best_fresh, fresh_layouts
from kvd.ring.claim_layout import ZONE_WEIGHT, Layout, targets_for
from kvd.ring.claim_repair import repair
from kvd.ring.claim_rules import (
    distinct_feasible,
    enforced,
    n_distinct_feasible,
    violations,
    zones_enforced,
)
from kvd.ring.ring import Ring

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


def _finish(
    layout: Layout | None,
    old: list[int],
    targets: list[int],
    node_ok: bool,
    zone_ok: bool,
) -> list[int]:
    """Steps 4 and 5: repair, and rebuild if repair could not reach an achievable Rule 2."""
    assert layout is not None
    if not node_ok:
        return layout.owners
    zone_weight = ZONE_WEIGHT if zone_ok else 0
    repair(layout, zone_weight, old)
    if layout.bad_weight(zone_weight) == 0:
        return layout.owners
    rebuilt = best_fresh(
        layout.q, layout.n_val, targets, layout.zone_of, zone_ok, old, layout.zoned, zone_weight,
        first=layout,
    )
    return rebuilt.owners


def _rebalance(
    q: int,
    old_owners: Sequence[str],
    names: Sequence[str],
    n_val: int,
    zone_map: Mapping[str, str],
) -> list[str]:
    """Steps 1 to 5 from the old owners to a layout for ``names``."""
    index = {name: i for i, name in enumerate(names)}
    old = [index.get(x, -1) for x in old_owners]
    zone_of, zoned = _zones_for(names, zone_map)
    layout = Layout(q, n_val, list(old), len(names), zone_of, zoned)
    targets = targets_for(layout.owned, q)
    layout.fill_free(targets)
    if len(names) <= n_val:
        targets = layout.take_stripe(targets)
    layout.take_repairs(targets)
    layout.take_spread(targets)
    layout.take_rest(targets)
    node_ok, zone_ok = enforced(q, n_val, targets, zone_of, zoned)
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
    targets = targets_for(count, q)
    node_ok, zone_ok = enforced(q, n_val, targets, zone_of, zoned)
    if not node_ok:
        fresh = next(fresh_layouts(q, n_val, targets, zone_of, zone_ok, old, zoned))
        return [names[x] for x in fresh.owners]
    zone_weight = ZONE_WEIGHT if zone_ok else 0
    best = best_fresh(q, n_val, targets, zone_of, zone_ok, old, zoned, zone_weight)
    return [names[x] for x in best.owners]
