"""The replica interface the coordinator talks to, the role a replica plays, and the local one.

A coordinator reaches every replica of a key through the same calls, whether the replica is
this node (``LocalReplica``) or another one over the peer connection
(kvd.node.remote ``RemoteReplica``), or a node standing in for a down one (``HintedReplica``
there, ``LocalHintStore`` in kvd.node.routing). That keeps quorum logic in one place
(kvd.node.coordinator) and out of the transport. ``Replica`` names every call the
coordinator, handoff, anti-entropy and transfers make on a replica; mypy (``make
typecheck``) checks each implementation against it wherever one is used as a ``Replica``, so
a stand-in that lacks a call fails the type check instead of failing a request at run time.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import AsyncIterator
from typing import Protocol

from kvd import versions
from kvd.errors import Damaged
from kvd.node.local import LocalStore

log = logging.getLogger("kvd.coordinator")


class Role(enum.StrEnum):
    """The part a replica plays in one write or read (riak_core's apl annotates the same)."""

    PRIMARY = "primary"
    """On the key's preference list (or a new owner during a transition): the only role that
    mints versions, since it holds the key's history; counts towards R and W."""
    FALLBACK = "fallback"
    """Stands in for a down primary (sloppy quorum): keeps what it is given as a durable hint
    for that primary, never mints, holds nothing to read; counts towards W."""
    HINT = "hint"
    """The coordinator's own hint for a down primary no fallback covers: like a fallback, but
    it never counts towards W."""


class Replica(Protocol):
    """One replica of a key, as seen by a coordinator (and by handoff, anti-entropy and
    transfers, which reach other nodes' replicas the same way)."""

    @property
    def node(self) -> str:
        """The node that holds this replica."""

    @property
    def role(self) -> Role:
        """What it is for this request."""

    @property
    def stands_for(self) -> str | None:
        """The down primary a FALLBACK or HINT keeps writes for (None for a PRIMARY)."""

    async def get(self, key: bytes) -> versions.VersionedObject | None:
        """The replica's object for ``key`` (None when it holds nothing)."""

    async def digest(self, key: bytes) -> bytes | None:
        """The digest of the replica's object for ``key`` (blake2b of its encoding, 8 bytes;
        None when it holds nothing): what a read asks of the replicas it does not need the
        object of (kvd.node.reads)."""

    async def coordinate(
        self, key: bytes, context: versions.VersionVector, payload: dict
    ) -> versions.VersionedObject:
        """Apply a client write, minting the new dot with this replica's actor id."""

    async def merge(self, key: bytes, obj: versions.VersionedObject) -> None:
        """Merge an object produced elsewhere into this replica."""

    async def write_chunk(self, key: bytes, vid: bytes, offset: int, data: bytes) -> None:
        """Store bytes of a large value at ``offset``; they are sealed before the manifest."""

    def read_chunks(self, key: bytes, ref: versions.ChunkRef) -> AsyncIterator[bytes]:
        """The chunks of a stored value, in order."""

    async def read_piece(self, key: bytes, ref: versions.ChunkRef, offset: int,
                         size: int) -> bytes:
        """``size`` bytes of a stored value from ``offset`` (pieces can be read in parallel)."""

    async def discard_upload(self, key: bytes, vid: bytes) -> None:
        """Drop the chunks of an upload that failed before its manifest was written."""

    async def has_blob(self, key: bytes, ref: versions.ChunkRef) -> bool:
        """Whether every byte of the large value ``ref`` is held here (senders ask before
        streaming a value)."""


def incomplete_copy(store: LocalStore, node: str, key: bytes,
                    obj: versions.VersionedObject | None) -> tuple[bytes, Damaged] | None:
    """(vid, the error) when a large value ``obj`` names lacks bytes in ``store`` (its blob
    missing, cut short, or found rotted): that copy must not count as a replica's."""
    for ref in [] if obj is None else [s.chunks for s in obj.siblings if s.chunks]:
        if not store.has_value_bytes(ref):
            return ref.vid, Damaged(f"{node}'s copy of the value of key {key[:64]!r} is "
                                    f"incomplete (bytes {ref.vid.hex()} missing, short or "
                                    "damaged)")
    return None


class LocalReplica:
    """This node's own replica."""

    role = Role.PRIMARY
    stands_for: str | None = None

    def __init__(self, node: str, actor: str, store: LocalStore):
        self.node = node
        self.actor = actor
        self.store = store
        self._incomplete_logged: set[bytes] = set()  # values read_now found short here

    async def get(self, key: bytes) -> versions.VersionedObject | None:
        return self.store.read(key)

    async def digest(self, key: bytes) -> bytes | None:
        return self.store.read_digest(key)

    async def coordinate(self, key: bytes, context: versions.VersionVector,
                         payload: dict) -> versions.VersionedObject:
        return await self.store.coordinate(key, context, self.actor, **payload)

    async def supersede_latest(self, key: bytes, payload: dict) -> versions.VersionedObject:
        """A write without a context when this node is the key's only replica: it supersedes
        the latest object here, read by the mint itself (kvd.node.coordinator rule 7)."""
        return await self.store.coordinate(key, None, self.actor, **payload)

    def read_now(self, key: bytes) -> versions.VersionedObject | None:
        """``get`` without a schedule point: a local read never blocks. Damaged when the
        bytes of a large value it names are missing or short here (a file deleted or cut on
        disk): the coordinator then reads a replica that has them."""
        obj = self.store.read(key)
        incomplete = incomplete_copy(self.store, self.node, key, obj)
        if incomplete is not None:
            vid, error = incomplete
            if len(self._incomplete_logged) < 10_000 and vid not in self._incomplete_logged:
                self._incomplete_logged.add(vid)  # once a value
                log.warning("%s: it is read from another replica", error)
            raise error
        return obj

    async def merge(self, key: bytes, obj: versions.VersionedObject) -> None:
        await self.store.merge(key, obj)

    async def write_chunk(self, key: bytes, vid: bytes, offset: int, data: bytes) -> None:
        await self.store.write_chunk(key, vid, offset, data)

    def read_chunks(self, key: bytes, ref: versions.ChunkRef) -> AsyncIterator[bytes]:
        return self.store.read_chunks(key, ref)

    async def read_piece(self, key: bytes, ref: versions.ChunkRef, offset: int,
                         size: int) -> bytes:
        return await self.store.read_piece(key, ref, offset, size)

    async def discard_upload(self, key: bytes, vid: bytes) -> None:
        await self.store.discard_upload(key, vid)

    async def has_blob(self, key: bytes, ref: versions.ChunkRef) -> bool:
        return self.store.has_value_bytes(ref)
