"""The replica interface the coordinator talks to, and its local implementation.

A coordinator reaches every replica of a key through the same four calls, whether the
replica is this node (``LocalReplica``) or another one over the peer connection. That keeps
quorum logic in one place (kvd.node.coordinator) and out of the transport.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

from kvd import versions
from kvd.node.local import LocalStore


class Replica(Protocol):
    """One replica of a key, as seen by a coordinator."""

    node: str

    async def get(self, key: bytes) -> versions.VersionedObject | None:
        """The replica's object for ``key`` (None when it holds nothing)."""

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

    async def discard_upload(self, key: bytes, vid: bytes) -> None:
        """Drop the chunks of an upload that failed before its manifest was written."""


class LocalReplica:
    """This node's own replica."""

    def __init__(self, node: str, actor: str, store: LocalStore):
        self.node = node
        self.actor = actor
        self.store = store

    async def get(self, key):
        return self.store.read(key)

    async def coordinate(self, key, context, payload):
        return await self.store.coordinate(key, context, self.actor, **payload)

    async def merge(self, key, obj):
        await self.store.merge(key, obj)

    async def write_chunk(self, key, vid, offset, data):
        await self.store.write_chunk(key, vid, offset, data)

    def read_chunks(self, key, ref):
        return self.store.read_chunks(key, ref)

    async def discard_upload(self, key, vid):
        await self.store.discard_upload(key, vid)
