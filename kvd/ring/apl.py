"""Preference lists: which nodes hold a partition's replicas, and who stands in for them.

As riak_core's apl: the primaries of a partition are the first ``n`` distinct owners met
walking the ring clockwise from it; the fallbacks are the further distinct owners on the
same walk.  A request sends to the primaries that are up and, for each primary that is down,
to the next unused fallback that is up, annotated with the primary it stands for (the
fallback keeps the write as a hint for that primary: hinted handoff).

Invariants:

Rule 1. A preference list never names a node twice.
Rule 2. Its order is the clockwise order of the walk; every caller sees the same order for
        the same ring (coordinators pick "the first up primary" from it).
Rule 3. ``annotated_preference_list`` keeps the primaries' positions: entry ``i`` is primary
        ``i`` itself when it is up, else the fallback standing for it; entries are dropped
        only when no fallback is left.

Pure: the liveness view is an argument (a predicate or a collection of up nodes).
"""

from __future__ import annotations

from typing import Callable, Collection, Iterator

from kvd.ring.ring import Ring

Up = Callable[[str], bool] | Collection[str]

PRIMARY = "primary"
FALLBACK = "fallback"


def _up_predicate(up: Up) -> Callable[[str], bool]:
    if callable(up):
        return up
    members = frozenset(up)
    return members.__contains__


def _walk(ring: Ring, partition: int) -> Iterator[str]:
    """Distinct owners clockwise from ``partition``, each once, until all are seen."""
    if not 0 <= partition < ring.q:
        raise ValueError(f"partition {partition} out of range for q={ring.q}")
    total = len(ring.nodes())
    seen: set[str] = set()
    owners, q = ring.owners, ring.q
    for i in range(q):
        node = owners[(partition + i) % q]
        if node not in seen:
            seen.add(node)
            yield node
            if len(seen) == total:
                return


def effective_n(ring: Ring, n: int) -> int:
    """The replica count the ring can honour: ``min(n, number of owners)``."""
    return min(n, len(ring.nodes()))


def preference_list(ring: Ring, partition: int, n: int) -> list[str]:
    """The primaries of ``partition``: the first ``n`` distinct owners clockwise from it."""
    if n < 0:
        raise ValueError(f"n must be non-negative, got {n}")
    out: list[str] = []
    for node in _walk(ring, partition):
        if len(out) == n:
            break
        out.append(node)
    return out


def fallbacks(ring: Ring, partition: int, n: int, up: Up) -> list[str]:
    """Up nodes after the ``n`` primaries on the clockwise walk, in walk order."""
    is_up = _up_predicate(up)
    walk = list(_walk(ring, partition))
    return [node for node in walk[max(n, 0) :] if is_up(node)]


def annotated_preference_list(
    ring: Ring, partition: int, n: int, up: Up
) -> list[tuple[str, str, str | None]]:
    """``[(node, "primary" | "fallback", stands_for)]`` for ``partition``.

    Up primaries appear as ``(node, "primary", None)``.  Down primary ``i`` is replaced, in
    order, by the next up fallback ``(fb, "fallback", primary_i)``; when the fallbacks run
    out the remaining down primaries are left out, so the list is shorter than ``n``.
    """
    is_up = _up_predicate(up)
    spare = iter(fallbacks(ring, partition, n, is_up))
    out: list[tuple[str, str, str | None]] = []
    for node in preference_list(ring, partition, n):
        if is_up(node):
            out.append((node, PRIMARY, None))
            continue
        stand_in = next(spare, None)
        if stand_in is not None:
            out.append((stand_in, FALLBACK, node))
    return out
