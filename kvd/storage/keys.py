"""The layout of every key kvd stores in its one ordered keyspace (pure: no trio, no plyvel).

Invariants:

1. One type byte starts every key, so the kinds never interleave:
   ``h`` hints, ``m`` node metadata, ``o`` objects, ``t`` anti-entropy tree segments,
   ``x`` the anti-entropy index (each object's digest, by partition and segment),
   ``d`` the tombstone index (each key whose object is only tombstones, by partition). (Large values' bytes are not keys: they
   live in blob files beside LevelDB, see kvd/storage/blobs.py.)
2. Integers are fixed-width big-endian, so byte order equals numeric order.
3. All object keys of one partition form one contiguous range, ``object_range(p)``; the same
   holds for the hints of one target node (``hint_range(node)``). Transfers and anti-entropy therefore scan a partition with one
   range iteration and never touch another partition's keys.
4. The node id in a hint key carries a u16 length prefix, so one node's hints never
   interleave with another node's; within a node, hint keys sort by seq.
5. Object, segment and index keys are built on a partition's *slot*, not the partition:
   ``slot(p, generation, q) = generation * q + p``. Dropping a partition (this node stopped
   replicating it) bumps its generation, so its old keys become invisible at once (O(1):
   no range delete in LevelDB) and are deleted in the background; generation 0 is the
   partition itself, the layout from before generations.

Layouts::

    object  b"o" + slot u32 + key          (slot: rule 5; "partition" below means slot)
    hint    b"h" + len(node) u16 + node (utf-8) + seq u64
    meta    b"m" + name (utf-8)
    segment b"t" + partition u32 + segment u16              -> segment hash (8 bytes)
    index   b"x" + partition u32 + segment u16 + key         -> object digest (8 bytes)
    dead    b"d" + slot u32 + key                            -> when this node stored it (wall)
                                                                (f64), written in the same
                                                                batch as the object
    hintref b"m" "hint-blob:" + len(vid) u16 + vid + hint key -> b"" (a hint needs blob vid)
    todo    b"m" "fetch-todo:" + partition u32     -> b"" (the fetch plan has yet to fetch it)
"""

from __future__ import annotations

import struct

from kvd.ring.ring import partition_of  # noqa: F401

PARTITION_BITS_MAX = 32

_OBJECT = b"o"
_HINT = b"h"
_META = b"m"
_SEGMENT = b"t"
_INDEX = b"x"
_DEAD = b"d"

_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_F64 = struct.Struct(">d")


def _successor(prefix: bytes) -> bytes:
    """The smallest byte string greater than every string that starts with ``prefix``."""
    stripped = prefix.rstrip(b"\xff")
    if not stripped:
        raise ValueError("a prefix of only 0xff bytes has no successor")
    return stripped[:-1] + bytes([stripped[-1] + 1])


def _partition(partition: int) -> bytes:
    if not 0 <= partition < 1 << PARTITION_BITS_MAX:
        raise ValueError(f"partition {partition} is out of range 0..2**{PARTITION_BITS_MAX}-1")
    return _U32.pack(partition)


def slot(partition: int, generation: int, q: int) -> int:
    """Where generation ``generation`` of ``partition`` (of ``q``) keeps its keys (rule 5)."""
    if not 0 <= partition < q or generation < 0:
        raise ValueError(f"partition {partition} generation {generation} is out of range")
    found = generation * q + partition
    _partition(found)  # raises when it no longer fits the u32
    return found


def slot_prefixes(slot_: int) -> list[tuple[bytes, bytes]]:
    """Every ``[start, stop)`` range holding keys of ``slot_``: objects, tree segments, index,
    tombstone index."""
    ranges = [object_range(slot_), segment_range(slot_), tombstone_range(slot_)]
    start = _INDEX + _partition(slot_)
    return ranges + [(start, _successor(start))]


def object_key(partition: int, key: bytes) -> bytes:
    """The storage key of ``key``'s object (its siblings and causal context)."""
    return _OBJECT + _partition(partition) + key


def object_range(partition: int) -> tuple[bytes, bytes]:
    """``[start, stop)`` covering every object key of ``partition`` and nothing else."""
    start = _OBJECT + _partition(partition)
    return start, _successor(start)


def object_space() -> tuple[bytes, bytes]:
    """``[start, stop)`` covering every object key of every partition."""
    return _OBJECT, _successor(_OBJECT)


def user_key_of(object_key: bytes) -> tuple[int, bytes]:
    """``(partition, key)`` of a key built by ``object_key``."""
    if len(object_key) < 5 or object_key[:1] != _OBJECT:
        raise ValueError(f"not an object key: {object_key[:16]!r}")
    return _U32.unpack_from(object_key, 1)[0], object_key[5:]






def _hint_prefix(target_node: str) -> bytes:
    node = target_node.encode("utf-8")
    if len(node) > 0xFFFF:
        raise ValueError("node id is longer than 65535 bytes")
    return _HINT + _U16.pack(len(node)) + node


def hint_key(target_node: str, seq: int) -> bytes:
    """The storage key of hint number ``seq`` held for ``target_node``."""
    if not 0 <= seq < 1 << 64:
        raise ValueError(f"hint seq {seq} is out of range")
    return _hint_prefix(target_node) + _U64.pack(seq)


def hint_of(hint_key: bytes) -> tuple[str, int]:
    """``(target_node, seq)`` of a key built by ``hint_key``."""
    if len(hint_key) < 3 or hint_key[:1] != _HINT:
        raise ValueError(f"not a hint key: {hint_key[:16]!r}")
    (length,) = _U16.unpack_from(hint_key, 1)
    if len(hint_key) != 3 + length + 8:
        raise ValueError(f"malformed hint key: {hint_key[:16]!r}")
    return hint_key[3 : 3 + length].decode("utf-8"), _U64.unpack_from(hint_key, 3 + length)[0]


def hint_range(target_node: str) -> tuple[bytes, bytes]:
    """``[start, stop)`` covering every hint held for ``target_node`` and nothing else."""
    start = _hint_prefix(target_node)
    return start, _successor(start)


def meta_key(name: str) -> bytes:
    """The storage key of node metadata ``name`` (identity, ring, ...)."""
    return _META + name.encode("utf-8")


_FETCH_TODO = _META + b"fetch-todo:"


def fetch_todo_key(partition: int) -> bytes:
    """The mark of a partition the fetch plan has yet to fetch (kvd.node.transfers)."""
    return _FETCH_TODO + _partition(partition)


def fetch_todo_range() -> tuple[bytes, bytes]:
    """Every such mark; ``fetch_todo_partition`` reads a mark's partition back."""
    return _FETCH_TODO, _successor(_FETCH_TODO)


def fetch_todo_partition(key: bytes) -> int:
    return _U32.unpack_from(key, len(_FETCH_TODO))[0]


# The partitioner lives with the ring (one definition); re-exported for the key layout.


def segment_key(partition: int, segment: int) -> bytes:
    """Where the anti-entropy hash of one segment of ``partition``'s tree is kept."""
    return _SEGMENT + _partition(partition) + _U16.pack(segment)


def segment_range(partition: int) -> tuple[bytes, bytes]:
    start = _SEGMENT + _partition(partition)
    return start, _successor(start)


def index_key(partition: int, segment: int, key: bytes) -> bytes:
    """Where the digest of ``key``'s object is indexed for anti-entropy."""
    return _INDEX + _partition(partition) + _U16.pack(segment) + key


def index_range(partition: int, segment: int) -> tuple[bytes, bytes]:
    """Every index entry of one segment: listing a segment's keys is one range read."""
    start = _INDEX + _partition(partition) + _U16.pack(segment)
    return start, _successor(start)


def index_space(partition: int) -> tuple[bytes, bytes]:
    """Every index entry of ``partition``, all its segments."""
    start = _INDEX + _partition(partition)
    return start, _successor(start)


def indexed_key(index_key_: bytes) -> bytes:
    """The key an entry built by ``index_key`` indexes."""
    return index_key_[len(_INDEX) + _U32.size + _U16.size:]


def hint_space() -> tuple[bytes, bytes]:
    """``[start, stop)`` covering every hint, for every node."""
    return _HINT, _successor(_HINT)


def _hint_blob_prefix(vid: bytes) -> bytes:
    if len(vid) > 0xFFFF:
        raise ValueError("value id is longer than 65535 bytes")
    return meta_key("hint-blob:") + _U16.pack(len(vid)) + vid


def hint_blob_key(vid: bytes, hint_key: bytes) -> bytes:
    """A reference from the hint ``hint_key`` to the blob ``vid`` it needs delivered with it
    (a meta key, value empty): the blob is kept while any reference remains."""
    return _hint_blob_prefix(vid) + hint_key


def hint_blob_range(vid: bytes) -> tuple[bytes, bytes]:
    """Every reference to blob ``vid``; the suffix after ``start`` is the hint's key."""
    start = _hint_blob_prefix(vid)
    return start, _successor(start)


def tombstone_op(partition: int, key: bytes, deleted_at: float | None) -> tuple[bytes, bytes | None]:
    """The storage op that indexes ``key`` as only tombstones, stored at this node's wall
    time ``deleted_at`` (None: the key is live or gone, so no entry). The tombstone collector
    reads this index, never the objects, so its work follows the tombstones, not the data."""
    value = None if deleted_at is None else _F64.pack(deleted_at)
    return _DEAD + _partition(partition) + key, value


def tombstone_range(partition: int) -> tuple[bytes, bytes]:
    """Every tombstone index entry of ``partition``."""
    start = _DEAD + _partition(partition)
    return start, _successor(start)


def tombstone_entry(partition: int, entry_key: bytes, value: bytes) -> tuple[bytes, float]:
    """``(key, deleted_at)`` of an entry in ``tombstone_range(partition)``."""
    return entry_key[5:], _F64.unpack(value)[0]
