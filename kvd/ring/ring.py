"""The partitioner and the ring value.

Invariants (every other module relies on them):

Rule 1. ``q`` is a power of two, chosen when the cluster is created and never changed.
        ``partition_of(key, q)`` is therefore a pure, stable function: it may never change,
        or every stored key would be looked up in the wrong partition.
Rule 2. ``owners[p]`` is the node id owning partition ``p``; ``len(owners) == q``.
        Partition ``p`` is followed clockwise by ``p + 1`` (mod ``q``).
Rule 3. ``version`` increases by exactly one with every committed change.  Gossip keeps the
        ring with the highest version; the claimant (DESIGN.md section 5) is the only writer.
Rule 4. A ``Ring`` is an immutable value: a change is a new ``Ring`` (``with_owners``).

Pure: no I/O, no trio, no plyvel.
"""

from __future__ import annotations

import functools
import hashlib
from collections import Counter
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping, Sequence


# Cached: every request routes a key through partition_of, and checking q each time was a
# sixth of its calls (typed: True is refused, not taken for 1).
@functools.lru_cache(maxsize=64, typed=True)
def _log2(q: int) -> int:
    """log2 of ``q``; ValueError unless ``q`` is a power of two between 1 and 2**64."""
    if isinstance(q, bool) or not isinstance(q, int) or q < 1 or q & (q - 1):
        raise ValueError(f"q must be a power of two, got {q!r}")
    bits = q.bit_length() - 1
    if bits > 64:
        raise ValueError(f"q must be at most 2**64, got 2**{bits}")
    return bits


def partition_of(key: bytes, q: int) -> int:
    """The partition of ``key``: the first log2(q) bits of its 64-bit blake2b digest."""
    bits = _log2(q)
    digest = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big")
    return digest >> (64 - bits)


@dataclass(frozen=True)
class Ring:
    """Who owns which of the ``q`` partitions, at one ring version.

    ``zones`` maps node id -> zone (rack, room, availability zone); empty when zones are
    not configured.  It is carried in the ring so that every node runs claim with the same
    zone map.
    """

    q: int
    owners: tuple[str, ...]
    version: int
    zones: Mapping[str, str] = field(default_factory=dict)
    _nodes: tuple[str, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _log2(self.q)
        owners = tuple(self.owners)
        if len(owners) != self.q:
            raise ValueError(f"ring has {len(owners)} owners for q={self.q}")
        for node in set(owners):
            if not isinstance(node, str) or not node:
                raise ValueError(f"owner must be a non-empty str, got {node!r}")
        if isinstance(self.version, bool) or not isinstance(self.version, int) or self.version < 0:
            raise ValueError(f"version must be a non-negative int, got {self.version!r}")
        zones = dict(self.zones)
        for node, zone in zones.items():
            if not isinstance(node, str) or not isinstance(zone, str):
                raise ValueError(f"zones must map str to str, got {node!r}: {zone!r}")
        object.__setattr__(self, "owners", owners)
        object.__setattr__(self, "zones", MappingProxyType(dict(sorted(zones.items()))))
        object.__setattr__(self, "_nodes", tuple(sorted(set(owners))))

    def __hash__(self) -> int:
        return hash((self.q, self.owners, self.version, tuple(self.zones.items())))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Ring):
            return NotImplemented
        return (
            self.q == other.q
            and self.version == other.version
            and self.owners == other.owners
            and dict(self.zones) == dict(other.zones)
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (Ring, (self.q, self.owners, self.version, dict(self.zones)))

    def nodes(self) -> list[str]:
        """The distinct owners, sorted."""
        return list(self._nodes)

    def partitions_of(self, node: str) -> list[int]:
        """The partitions ``node`` owns, ascending."""
        return [p for p, owner in enumerate(self.owners) if owner == node]

    def ownership(self) -> dict[str, float]:
        """node -> fraction of the partitions it owns, in node order."""
        counts = Counter(self.owners)
        return {node: counts[node] / self.q for node in self._nodes}

    def with_owners(self, owners: Sequence[str], zones: Mapping[str, str] | None = None) -> Ring:
        """The next ring version with new owners (and optionally a new zone map)."""
        return Ring(
            self.q, tuple(owners), self.version + 1, dict(self.zones if zones is None else zones)
        )

    def to_dict(self) -> dict[str, Any]:
        """Msgpack-able primitives for gossip and storage (owners as indexes into nodes)."""
        index = {node: i for i, node in enumerate(self._nodes)}
        return {
            "q": self.q,
            "version": self.version,
            "nodes": list(self._nodes),
            "owners": [index[node] for node in self.owners],
            "zones": dict(self.zones),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Ring:
        """Inverse of ``to_dict``; ValueError on anything malformed (it comes off the wire)."""
        try:
            q, version, nodes, owners = d["q"], d["version"], d["nodes"], d["owners"]
            zones = d.get("zones") or {}
        except (KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"malformed ring: {exc!r}") from None
        if not isinstance(nodes, (list, tuple)) or not isinstance(owners, (list, tuple)):
            raise ValueError("malformed ring: nodes and owners must be lists")
        if not isinstance(zones, Mapping):
            raise ValueError("malformed ring: zones must be a map")
        names = []
        for i in owners:
            if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(nodes):
                raise ValueError(f"malformed ring: owner index {i!r} out of range")
            names.append(nodes[i])
        return cls(q, tuple(names), version, dict(zones))


def new_ring(node: str, q: int = 1024, zones: Mapping[str, str] | None = None) -> Ring:
    """The ring of a new one-node cluster: ``node`` owns every partition, version 1."""
    _log2(q)
    return Ring(q, (node,) * q, 1, dict(zones or {}))
