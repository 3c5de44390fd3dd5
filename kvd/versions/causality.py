"""Dotted version vectors: the causal history of one key, its siblings, and how replicas merge.

This is the model of Riak 2.x and of the DVV papers (Preguiça, Baquero et al., "Dotted Version
Vectors: Logical Clocks for Optimistic Replication"). Pure: no trio, no plyvel, no clock reads.

An object is a ``clock`` (a version vector: actor -> highest counter seen) and a set of
``siblings``, each tagged with the ``dot`` (actor, counter) of the write that created it. A
dot is *covered* by a vector when ``vv[actor] >= counter``. Invariants, kept by every function
here and checked by ``decode_object``:

1. Every sibling's dot is covered by the clock of the object that holds it.
2. Dots are unique within an object, and siblings are sorted by dot (so equal objects encode
   to equal bytes and ``digest`` can compare replicas).
3. Covered but not held means superseded. A clock covers exactly the writes its object has
   seen; a seen write that is no longer a sibling was replaced by a write whose context
   covered it. So a sibling that has not been superseded is never covered by the clock of an
   object that does not hold it. That is why ``sync`` can drop a sibling the other side
   covers but lacks, and must keep one it does not cover.
4. A sibling disappears only when a write's context covers its dot (``update``) or when
   another replica shows it was superseded that way (``sync``). Nothing else discards data.
5. An actor never mints the same dot twice, for any key. ``update`` takes the next counter
   after everything the actor's stored copy and the context have seen, and at least
   ``min_counter``: the caller passes a per-actor counter that only grows (across keys,
   purges and restarts), because a purged key's stored copy no longer remembers what the
   actor minted for it. Counters of one actor within one key may therefore jump; a clock
   entry covering the gap claims only dots that never existed for that key. The caller must
   also serialise writes per key and update the actor's latest copy. Actor ids include the
   node's incarnation, so a node whose data was wiped starts a new actor instead of reusing
   old counters. Should a broken caller still produce two siblings with one dot,
   ``conflicting_dots`` names them and ``sync`` keeps one by a total order.
6. ``sync`` is the join of a semilattice (commutative, associative, idempotent). Replicas
   converge whatever order replication, read repair, handoff and anti-entropy deliver
   objects in.
7. One client write is one sibling (DESIGN section 2: applied at most once). A coordinator
   that gives up on a slow replica mints the same write again elsewhere, with the same
   write id (``wid``), so the write may exist under two dots ("twins"), and the late twin
   may land after a later write already replaced the first. So:
   - ``sync`` keeps one sibling per write id (the smallest dot) and records the others'
     dots as its ``aliases``; a context or clock that covers any dot of a write has seen
     that write (rule 3 applies to the write, not to one of its dots);
   - two replicas may hold one write at one dot having joined different twins of it (a
     hedged mint can mint it three times): that is not a reused dot (rule 5); ``sync``
     unions their aliases and superseded write ids;
   - a write records in ``supersedes`` the write ids of the siblings its context replaced,
     and a sibling whose write id some sibling supersedes is dropped (``sync``) or never
     minted (``update``): a twin landing late cannot bring back what was replaced;
   - ``update`` applies nothing when the object already holds or supersedes its write id.

Timestamps never resolve conflicts. Wall clocks on different machines drift, step and
disagree. Last-writer-wins by timestamp would silently drop an acknowledged concurrent write,
and DESIGN section 2 forbids that. Causality comes from dots and contexts only. ``timestamp``
is informational (shown to operators, usable as a tombstone's age).

A context is trusted: a write supersedes whatever its context covers, even writes this
replica has not seen yet. That is what lets a client replace siblings read from other
replicas, and why contexts are opaque bytes that are validated strictly.
"""


from __future__ import annotations

from dataclasses import dataclass, replace
from operator import attrgetter

from kvd.errors import BadRequest, TooManySiblings

__all__ = [
    "MAX_COUNTER",
    "SIBLING_LIMIT",
    "SIBLING_WARN",
    "ChunkRef",
    "Dot",
    "Sibling",
    "VersionVector",
    "VersionedObject",
    "conflicting_dots",
    "Context",
    "context_of",
    "covers",
    "descends",
    "empty",
    "is_found",
    "live",
    "merge_vv",
    "needs_warning",
    "next_counter",
    "sync",
    "sync_with_discarded",
    "update",
]

VersionVector = dict[str, int]  # actor -> highest counter seen; plain dict, never mutated
Dot = tuple[str, int]

SIBLING_WARN = 25  # log a warning past this many siblings
SIBLING_LIMIT = 100  # refuse a write that would leave more siblings than this

# Counters grow by one per write of an actor (kvd.node.local leases them), so 2**53 writes
# (285 years at a million writes a second) is out of reach honestly; a clock at the bound was
# forged. Well below 2**63: lease arithmetic and any client language stay exact.
MAX_COUNTER = 2**53

_dot_of = attrgetter("dot")


@dataclass(frozen=True)
class ChunkRef:
    """Where a large value's chunks live; the storage layer owns the chunks themselves."""

    vid: bytes  # 16 random bytes naming this upload
    length: int  # total value length in bytes
    count: int  # number of chunks


@dataclass(frozen=True)
class Sibling:
    """One concurrent version of a key: a value or a tombstone, tagged with its write's dot."""

    dot: Dot
    value: bytes = b""  # inline value; b"" for tombstones and chunked values
    deleted: bool = False  # a tombstone
    chunks: ChunkRef | None = None  # set when the value is stored in chunks
    timestamp: float = 0.0  # wall clock at write; informational only, never resolves
    wid: bytes = b""  # the client write's id (rule 7); b"" for writes made without one
    aliases: tuple[Dot, ...] = ()  # the other dots this same write got (rule 7), sorted
    supersedes: tuple[bytes, ...] = ()  # write ids this write's context replaced, sorted

    @property
    def length(self) -> int:
        """Length of the value in bytes, whether inline or chunked."""
        return len(self.value) if self.chunks is None else self.chunks.length


@dataclass(frozen=True)
class VersionedObject:
    """A key's causal history (``clock``) and its current siblings, sorted by dot."""

    clock: VersionVector
    siblings: tuple[Sibling, ...]

    def __hash__(self) -> int:
        # The clock is a dict, so the generated hash would fail; hash its sorted items.
        return hash((tuple(sorted(self.clock.items())), self.siblings))


def empty() -> VersionedObject:
    """The object of a key nobody has written: nothing seen, no siblings."""
    return VersionedObject({}, ())


def merge_vv(a: VersionVector, b: VersionVector) -> VersionVector:
    """Pointwise maximum of two vectors (may return one of the arguments unchanged)."""
    if not b or a is b:
        return a
    if not a:
        return b
    merged = dict(a)
    for actor, counter in b.items():
        if counter > merged.get(actor, 0):
            merged[actor] = counter
    return merged


def descends(a: VersionVector, b: VersionVector) -> bool:
    """True when ``a`` has seen everything ``b`` has (``a >= b`` pointwise)."""
    return all(a.get(actor, 0) >= counter for actor, counter in b.items())


def covers(vv: VersionVector, dot: Dot) -> bool:
    """True when the write named by ``dot`` is in the history summarised by ``vv``."""
    return vv.get(dot[0], 0) >= dot[1]


class Context(dict):
    """What a client read: the clock, and the write ids of the siblings it saw (rule 7). A
    write made with it supersedes those writes under every dot they got, including a twin
    the replica that applies the write has not met yet."""

    __slots__ = ("wids",)

    def __init__(self, clock: VersionVector | None = None, wids=()) -> None:
        super().__init__(clock or {})
        self.wids = frozenset(wids)


def context_of(obj: VersionedObject) -> Context:
    """The causal context a reader gets: a write carrying it supersedes every sibling read."""
    return Context(obj.clock, (s.wid for s in obj.siblings if s.wid))


def next_counter(
    obj: VersionedObject, context: VersionVector, actor: str, min_counter: int = 0
) -> int:
    """The counter of ``actor``'s next dot on ``obj`` (see invariant 5)."""
    return max(obj.clock.get(actor, 0) + 1, context.get(actor, 0) + 1, min_counter)


def update(
    obj: VersionedObject,
    context: VersionVector,
    actor: str,
    *,
    value: bytes = b"",
    deleted: bool = False,
    chunks: ChunkRef | None = None,
    timestamp: float = 0.0,
    key: bytes = b"",
    wid: bytes = b"",
    min_counter: int = 0,
) -> tuple[VersionedObject, list[Sibling]]:
    """Apply a client write at its coordinating replica ``actor``, whose stored copy is ``obj``.

    The new sibling gets the next dot of ``actor`` (its counter at least ``min_counter``). It
    replaces the siblings whose dots ``context`` covers and sits beside the others. Returns
    the new object and the siblings it discarded (the caller garbage-collects their chunks).
    Raises ``TooManySiblings`` when the result would hold more than ``SIBLING_LIMIT``
    siblings. A write whose ``wid`` the object already holds was applied before (rule 7):
    ``obj`` is returned unchanged.
    """
    if wid and (any(s.wid == wid for s in obj.siblings) or wid in _superseded(obj.siblings)):
        return obj, []
    if deleted and (value or chunks is not None):
        raise ValueError("a tombstone carries no value")
    if chunks is not None and value:
        raise ValueError("a chunked value has no inline bytes")
    if type(value) is not bytes:
        value = bytes(value)
    counter = next_counter(obj, context, actor, min_counter)
    if counter > MAX_COUNTER:
        raise BadRequest(f"key {_show_key(key)}: the clock of {actor} is exhausted "
                         f"(counter {counter} above {MAX_COUNTER}); its context was forged")
    kept: list[Sibling] = []
    discarded: list[Sibling] = []
    seen_writes: frozenset[bytes] = getattr(context, "wids", frozenset())
    for sibling in obj.siblings:
        seen = _seen(context, sibling) or sibling.wid in seen_writes
        (discarded if seen else kept).append(sibling)
    replaced = {s.wid for s in discarded if s.wid} | seen_writes
    discarded += [s for s in kept if s.wid in replaced]  # twins of what the context saw
    kept = [s for s in kept if s.wid not in replaced]
    if len(kept) + 1 > SIBLING_LIMIT:
        raise TooManySiblings(
            f"key {_show_key(key)} would have {len(kept) + 1} siblings"
            f" (limit {SIBLING_LIMIT}); read it and write back with its context"
        )
    kept.append(Sibling((actor, counter), value, deleted, chunks, timestamp, wid,
                        supersedes=tuple(sorted(replaced))))
    kept.sort(key=_dot_of)
    clock = dict(obj.clock)
    for other, their_counter in context.items():
        if their_counter > clock.get(other, 0):
            clock[other] = their_counter
    clock[actor] = counter
    return VersionedObject(clock, tuple(kept)), discarded


def sync(a: VersionedObject, b: VersionedObject) -> VersionedObject:
    """Merge two replicas' objects of one key (commutative, associative, idempotent)."""
    return _sync(a, b)[0]


def sync_with_discarded(
    a: VersionedObject, b: VersionedObject
) -> tuple[VersionedObject, list[Sibling]]:
    """``sync(a, b)`` plus the siblings of ``a`` the result no longer holds (for chunk GC)."""
    merged, held = _sync(a, b)
    return merged, [s for s in a.siblings if held.get(s.dot) != s]


def _sync(a: VersionedObject, b: VersionedObject) -> tuple[VersionedObject, dict[Dot, Sibling]]:
    if a is b or a == b:
        return a, {s.dot: s for s in a.siblings}
    in_b = {s.dot: s for s in b.siblings}
    b_clock = b.clock
    a_writes = {s.wid for s in a.siblings if s.wid}
    b_writes = {s.wid for s in b.siblings if s.wid}
    held: dict[Dot, Sibling] = {}
    for sibling in a.siblings:
        dot = sibling.dot
        other = in_b.get(dot)
        if other is None:
            if sibling.wid in b_writes or not _seen(b_clock, sibling):
                held[dot] = sibling  # b holds a twin of it, or has not seen it yet
            # else b saw it and something superseded it
        elif other == sibling:
            held[dot] = sibling
        elif _same_write(sibling, other):  # rule 7: each knows other twins of the write
            held[dot] = replace(sibling, aliases=_union(sibling.aliases, other.aliases),
                                supersedes=_union(sibling.supersedes, other.supersedes))
        else:
            # Same dot, different payload: only a broken invariant 5 gets here. Pick one by
            # a total order so every replica picks the same one and sync stays a join.
            from kvd.versions.encoding import encode_sibling_alone  # only on this rare path

            held[dot] = max(sibling, other, key=encode_sibling_alone)
    a_clock = a.clock
    for dot, sibling in in_b.items():
        if dot not in held and (sibling.wid in a_writes or not _seen(a_clock, sibling)):
            held[dot] = sibling
    _join_twins(held)
    replaced = _superseded(held.values())
    for dot in [d for d, s in held.items() if s.wid in replaced]:
        del held[dot]
    siblings = tuple(sorted(held.values(), key=_dot_of))
    return VersionedObject(merge_vv(a_clock, b_clock), siblings), held


def _seen(vv: VersionVector, sibling: Sibling) -> bool:
    """Whether ``vv`` covers the write of ``sibling``: its dot or one of its aliases."""
    return covers(vv, sibling.dot) or any(covers(vv, d) for d in sibling.aliases)


def _superseded(siblings) -> set[bytes]:
    return {wid for s in siblings for wid in s.supersedes}


def _join_twins(held: dict[Dot, Sibling]) -> None:
    """Rule 7: siblings sharing a write id become one, at the smallest dot, with the other
    dots as aliases and every write id any of them superseded."""
    twins: dict[bytes, list[Sibling]] = {}
    for sibling in held.values():
        if sibling.wid:
            twins.setdefault(sibling.wid, []).append(sibling)
    for group in twins.values():
        if len(group) == 1:
            continue
        group.sort(key=_dot_of)
        first = group[0]
        dots = {d for s in group for d in (s.dot, *s.aliases)} - {first.dot}
        for twin in group[1:]:
            del held[twin.dot]
        held[first.dot] = replace(first, aliases=tuple(sorted(dots)),
                                  supersedes=tuple(sorted(_superseded(group))))


def conflicting_dots(a: VersionedObject, b: VersionedObject) -> list[Dot]:
    """Dots that ``a`` and ``b`` both hold with different payloads (a broken invariant 5)."""
    if a is b:
        return []
    in_b = {s.dot: s for s in b.siblings}
    return [s.dot for s in a.siblings if s.dot in in_b and not _same_write(in_b[s.dot], s)]


def _same_write(a: Sibling, b: Sibling) -> bool:
    """One write at one dot, whatever twins of it (rule 7) each side has joined so far."""
    return replace(a, aliases=(), supersedes=()) == replace(b, aliases=(), supersedes=())


def _union(a: tuple, b: tuple) -> tuple:
    return tuple(sorted(set(a) | set(b)))


def live(obj: VersionedObject) -> tuple[Sibling, ...]:
    """The siblings that are values, not tombstones."""
    return tuple(s for s in obj.siblings if not s.deleted)


def is_found(obj: VersionedObject) -> bool:
    """True when the key has at least one live value."""
    return any(not s.deleted for s in obj.siblings)


def needs_warning(obj: VersionedObject) -> bool:
    """True when the key has more siblings than ``SIBLING_WARN``: clients are not merging."""
    return len(obj.siblings) > SIBLING_WARN


def _show_key(key: bytes) -> str:
    text = key.decode("utf-8", "backslashreplace")
    if len(text) > 100:
        text = text[:100] + "..."
    return repr(text)
