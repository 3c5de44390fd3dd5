"""Active anti-entropy: TicTac hash trees, one per partition per replica, and their diff.

The model is Riak's kv_tictacaae (leveled_tictac): a tree's leaves are *segments*, and a
segment's hash is the XOR of the ``entry_hash`` of every object whose key falls in it. XOR
makes a change O(1) and order free: adding an entry XORs its hash in, removing it XORs the
same hash out, replacing is both. So the tree is maintained on the write path, never rebuilt
by scanning. Branches and the root are XORs of what lies under them, kept incrementally too.
Pure: no trio, no plyvel, no I/O, no clock.

Shape: ``SEGMENTS`` leaves per tree, grouped under ``BRANCHES`` level-1 nodes, each covering
``SEGMENTS // BRANCHES`` consecutive segments, under one root.

Invariants:

1. A replica's tree for partition P equals, at all times, the XOR of
   ``entry_hash(key, digest)`` over the objects of P that the replica stores (tombstones
   included: they are objects until GC purges them, and a purge is
   ``update(key, digest, None)``). Segment ``i`` covers exactly the keys with
   ``segment_of(key) == i``; branch ``b`` is the XOR of its segments; the root is the XOR of
   all segments. The caller keeps this by calling ``update(key, old, new)`` for every change
   to a stored object, with the digest it replaced (None when absent) and the digest it
   wrote (None when removed), and only for changes that become durable. An update that did
   not become durable is undone by ``update(key, new, old)`` (XOR is its own inverse).
2. ``digest`` is a deterministic function of the stored object (blake2b of its canonical
   encoding, ``kvd.versions.encode_object``), so replicas holding equal objects hash equal.
3. In-sync replicas have equal trees, hence equal roots: the converse of 1, since the tree
   is a function of the stored set alone, whatever order the writes arrived in.
4. Unequal contents give unequal roots except with probability 2**-64 per compared node.
   The XOR difference of two trees is the XOR of ``entry_hash`` over the symmetric
   difference of their (key, digest) sets. That set is non-empty when contents differ and
   its members are distinct inputs to a 64-bit hash, so (modelling blake2b as a random
   function) their XOR is uniform and is zero with probability 2**-64. Over 1024 partitions
   compared every few minutes for years, the expected number of missed differences stays
   far below one, and a miss lasts only until the next change to that segment.
5. ``segment_of`` is independent of the partitioner (a personalised blake2b), so the keys of
   one partition spread evenly over its segments. ``segment_of``, ``entry_hash`` and the
   ``to_bytes`` layout are a storage and wire format: changing any of them requires bumping
   ``HASH_VERSION`` and rebuilding every tree.

Exchange protocol (node A compares with replica B; every hash is 8 bytes; A compares, so only
B's answers carry hashes):

1. Roots: A asks B for the roots of all partitions they both replicate (8 bytes each: 8 KiB
   for 1024 partitions). ``differing_partitions`` names those to descend into. In sync,
   the exchange ends here.
2. Branches: for each differing partition, B sends ``branches()`` (32 x 8 bytes).
   ``differing_branches`` names the differing ones.
3. Segments: for each differing branch, B sends ``branch_segments(b)`` (32 x 8 bytes).
   ``differing_segments`` names the differing segments, as absolute numbers.
4. Keys: for each differing segment, each side lists its (key, digest) pairs in that segment
   and B sends its list to A. ``diff_keys`` splits the keys into those A needs from B and
   those B needs from A.
5. Objects: the objects of those keys only are fetched and sent, and merged with
   ``kvd.versions.sync`` on the receiving side, which updates its tree through invariant 1.
   A key present on both sides with different digests is in both lists: each side needs the
   other's siblings, and the merge of both is what both must end up with.

Listing one segment's keys (step 4) is the storage's job. Keeping an index
``(partition, segment, key) -> digest`` written in the same batch as the object makes it a
range read and gives ``update`` its old digest for free; a fold over the partition filtered
by ``segment_of`` works but reads the whole partition. Persisting the touched segments in
that same batch keeps invariant 1 across crashes (``update`` returns the segment it touched);
a tree that may be stale after an unclean stop must be rebuilt by a fold
(``Tree.from_entries``) before it is compared, off the write path.
"""

from __future__ import annotations

import sys
from array import array
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from hashlib import blake2b

__all__ = [
    "BRANCHES",
    "HASH_BYTES",
    "HASH_VERSION",
    "SEGMENTS",
    "SEGMENTS_PER_BRANCH",
    "ExchangeStats",
    "Tree",
    "diff_keys",
    "differing_branches",
    "differing_partitions",
    "differing_segments",
    "entry_hash",
    "segment_of",
]

SEGMENTS = 1024
BRANCHES = 32
SEGMENTS_PER_BRANCH = SEGMENTS // BRANCHES
HASH_BYTES = 8
# Bump when segment_of, entry_hash or the to_bytes layout change: stored trees become invalid.
HASH_VERSION = 1

_SEGMENT_PERSON = b"kvd-aae"
_ENTRY_PERSON = b"kvd-aae-entry"
_MASK = SEGMENTS - 1
# to_bytes is little-endian on every host; array('Q') is native, so big-endian hosts swap.
_SWAP = sys.byteorder != "little"

assert SEGMENTS & _MASK == 0 and SEGMENTS % BRANCHES == 0


def segment_of(key: bytes) -> int:
    """The segment of ``key``: a personalised 64-bit blake2b of the key, modulo SEGMENTS."""
    h = blake2b(key, digest_size=8, person=_SEGMENT_PERSON).digest()
    return int.from_bytes(h, "big") & _MASK


def entry_hash(key: bytes, digest: bytes) -> int:
    """The 64-bit hash of one stored object, XORed into its segment.

    The key is length-prefixed so (key, digest) pairs cannot alias, and included so that two
    keys holding equal objects do not cancel each other.
    """
    data = len(key).to_bytes(4, "big") + key + digest
    return int.from_bytes(blake2b(data, digest_size=8, person=_ENTRY_PERSON).digest(), "big")


class Tree:
    """The TicTac tree of one partition on one replica: SEGMENTS XOR-hashes, branches, root.

    Branches and root are derived from the segments and kept up to date on every update, so
    reading them is O(1) and ``to_bytes`` holds the segments alone.
    """

    __slots__ = ("_segments", "_branches", "_root")

    def __init__(self, segments: Sequence[int] | None = None) -> None:
        if segments is None:
            self._segments = array("Q", bytes(HASH_BYTES * SEGMENTS))
        else:
            if len(segments) != SEGMENTS:
                raise ValueError(f"a tree has {SEGMENTS} segments, got {len(segments)}")
            try:
                self._segments = array("Q", segments)
            except (OverflowError, TypeError) as exc:
                raise ValueError(f"segment hashes must be 64-bit unsigned ints: {exc}") from None
        self._rederive()

    def _rederive(self) -> None:
        seg = self._segments
        self._branches = array("Q", bytes(HASH_BYTES * BRANCHES))
        for b in range(BRANCHES):
            h = 0
            for x in seg[b * SEGMENTS_PER_BRANCH:(b + 1) * SEGMENTS_PER_BRANCH]:
                h ^= x
            self._branches[b] = h
        root = 0
        for h in self._branches:
            root ^= h
        self._root = root

    @classmethod
    def from_entries(cls, entries: Iterable[tuple[bytes, bytes]]) -> Tree:
        """A tree built from (key, digest) pairs, e.g. by a rebuild fold over a partition."""
        tree = cls()
        for key, digest in entries:
            tree.update(key, None, digest)
        return tree

    def update(self, key: bytes, old_digest: bytes | None, new_digest: bytes | None) -> int:
        """Record that ``key``'s object went from ``old_digest`` to ``new_digest`` (None: absent).

        XORs the old entry out and the new one in, in O(1). Returns the segment touched.
        """
        i = segment_of(key)
        if old_digest == new_digest:
            return i
        delta = 0
        if old_digest is not None:
            delta = entry_hash(key, old_digest)
        if new_digest is not None:
            delta ^= entry_hash(key, new_digest)
        self._segments[i] ^= delta
        self._branches[i // SEGMENTS_PER_BRANCH] ^= delta
        self._root ^= delta
        return i

    def segment(self, i: int) -> int:
        """The hash of segment ``i``."""
        return self._segments[i]

    def root(self) -> int:
        """The XOR of all segments: equal on in-sync replicas."""
        return self._root

    def branches(self) -> list[int]:
        """The BRANCHES level-1 hashes, each the XOR of its SEGMENTS_PER_BRANCH segments."""
        return self._branches.tolist()

    def branch_segments(self, b: int) -> list[int]:
        """The segment hashes under branch ``b``, in segment order."""
        if not 0 <= b < BRANCHES:
            raise IndexError(f"branch {b} out of range 0..{BRANCHES - 1}")
        return self._segments[b * SEGMENTS_PER_BRANCH:(b + 1) * SEGMENTS_PER_BRANCH].tolist()

    def to_bytes(self) -> bytes:
        """The segments as HASH_BYTES * SEGMENTS little-endian bytes, for storage and the wire."""
        if _SWAP:
            seg = array("Q", self._segments)
            seg.byteswap()
            return seg.tobytes()
        return self._segments.tobytes()

    @classmethod
    def from_bytes(cls, data: bytes) -> Tree:
        """The tree ``to_bytes`` wrote; ValueError unless ``data`` has exactly that length."""
        if len(data) != HASH_BYTES * SEGMENTS:
            raise ValueError(f"a tree is {HASH_BYTES * SEGMENTS} bytes, got {len(data)}")
        tree = cls.__new__(cls)
        tree._segments = array("Q")
        tree._segments.frombytes(data)
        if _SWAP:
            tree._segments.byteswap()
        tree._rederive()
        return tree

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Tree):
            return NotImplemented
        return self._segments == other._segments

    __hash__ = None  # type: ignore[assignment]  # mutable: unhashable, as list and dict are

    def __repr__(self) -> str:
        nonzero = sum(1 for x in self._segments if x)
        return f"<Tree root={self._root:016x} nonzero_segments={nonzero}>"


def differing_partitions(my_roots: Mapping[int, int], their_roots: Mapping[int, int]) -> list[int]:
    """The partitions, sorted, whose roots differ; step 1 of the exchange.

    Only partitions present in both maps are compared: a partition one side does not report
    (not a replica of it, or its tree is not built yet) cannot be judged from its root.
    """
    return sorted(p for p, root in my_roots.items() if p in their_roots and their_roots[p] != root)


def differing_branches(a: Sequence[int], b: Sequence[int]) -> list[int]:
    """The branch numbers where two trees' ``branches()`` differ; step 2 of the exchange."""
    if len(a) != BRANCHES or len(b) != BRANCHES:
        raise ValueError(f"expected {BRANCHES} branch hashes each, got {len(a)} and {len(b)}")
    return [i for i in range(BRANCHES) if a[i] != b[i]]


def differing_segments(
    branch: int, a_segments: Sequence[int], b_segments: Sequence[int]
) -> list[int]:
    """The absolute segment numbers where two ``branch_segments(branch)`` differ; step 3."""
    if not 0 <= branch < BRANCHES:
        raise ValueError(f"branch {branch} out of range 0..{BRANCHES - 1}")
    if len(a_segments) != SEGMENTS_PER_BRANCH or len(b_segments) != SEGMENTS_PER_BRANCH:
        raise ValueError(
            f"expected {SEGMENTS_PER_BRANCH} segment hashes each, "
            f"got {len(a_segments)} and {len(b_segments)}"
        )
    base = branch * SEGMENTS_PER_BRANCH
    return [base + i for i in range(SEGMENTS_PER_BRANCH) if a_segments[i] != b_segments[i]]


def diff_keys(
    mine: Mapping[bytes, bytes], theirs: Mapping[bytes, bytes]
) -> tuple[list[bytes], list[bytes]]:
    """Given each side's {key: digest} for one segment: (keys I need, keys they need), sorted.

    I need a key they hold that I lack or hold with another digest; they need a key I hold
    that they lack or hold with another digest. A key held by both with different digests is
    in both lists, because each side may hold siblings the other has not seen.
    """
    i_need = sorted(k for k, d in theirs.items() if mine.get(k) != d)
    they_need = sorted(k for k, d in mine.items() if theirs.get(k) != d)
    return i_need, they_need


@dataclass
class ExchangeStats:
    """What one exchange (or a sum of them) compared, found and sent."""

    partitions_compared: int = 0
    partitions_differing: int = 0
    segments_differing: int = 0
    keys_differing: int = 0
    bytes_exchanged: int = 0

    def __add__(self, other: ExchangeStats) -> ExchangeStats:
        if not isinstance(other, ExchangeStats):
            return NotImplemented
        return ExchangeStats(
            self.partitions_compared + other.partitions_compared,
            self.partitions_differing + other.partitions_differing,
            self.segments_differing + other.segments_differing,
            self.keys_differing + other.keys_differing,
            self.bytes_exchanged + other.bytes_exchanged,
        )
