"""Each actor's dot counters: one sequence per actor, leased durably in blocks (kvd.node.local
Rule 6). A block of ``DOT_LEASE`` counters is leased by a durable (flushed) high-water mark
before any of it is used, and after a restart the sequence continues above the mark, so no
dot is ever minted twice: not after a crash, a purge or a cancelled write.
"""

from __future__ import annotations

from collections.abc import Callable

import trio

from kvd.storage import Storage, keys

# Counters leased per durable write of the high-water mark: one flushed write per this many
# client writes, and at most this many counters skipped per restart.
DOT_LEASE = 1 << 14
# Where a store written before Rule 6 (objects but no lease) starts its sequence: above any
# per-key counter one key could have reached.
LEGACY_DOT_FLOOR = 1 << 32

# Present when every object in this store was written under Rule 6 (see LEGACY_DOT_FLOOR).
SEQUENCES = keys.meta_key("dot-sequences")


def lease_key(actor: str) -> bytes:
    return keys.meta_key("dots:" + actor)


def first_lease(actor: str) -> tuple[bytes, bytes]:
    """The record of a new actor, which has leased nothing yet: written with its identity,
    so that a missing record means a lost one (kvd.node.data_dir.load_identity)."""
    return lease_key(actor), (0).to_bytes(8, "big")


class DotLease:
    """One actor's counter sequence: ``next`` is free, everything up to ``limit`` is leased."""

    __slots__ = ("next", "limit", "lock")

    def __init__(self, limit: int):
        self.next = limit + 1  # a restart skips what the last run leased but never used
        self.limit = limit
        self.lock = trio.Lock()


class DotLeases:
    """The leases of every actor that mints on this store."""

    def __init__(self, storage: Storage, has_objects: Callable[[], bool]):
        self.storage = storage
        self._has_objects = has_objects
        self._leases: dict[str, DotLease] = {}

    def lease(self, actor: str) -> DotLease:
        """``actor``'s lease, loaded from its stored high-water mark the first time."""
        lease = self._leases.get(actor)
        if lease is None:
            raw = self.storage.get(lease_key(actor))
            if raw is not None:
                limit = int.from_bytes(raw, "big")
            elif self.storage.get(SEQUENCES) is not None or not self._has_objects():
                limit = 0
            else:  # objects this actor may have minted per key before Rule 6
                limit = LEGACY_DOT_FLOOR
            lease = self._leases[actor] = DotLease(limit)
        return lease

    async def extend(self, actor: str, lease: DotLease, needed: int) -> None:
        """Durably lease counters up to at least ``needed`` before any of them is used."""
        async with lease.lock:
            if lease.limit >= needed:
                return  # another write extended it meanwhile
            limit = max(needed, lease.limit) + DOT_LEASE
            with trio.CancelScope(shield=True):  # never leave a lease half-written
                await self.storage.write([(lease_key(actor), limit.to_bytes(8, "big"))])
                await self.storage.flush()
            lease.limit = limit
