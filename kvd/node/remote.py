"""Replicas on other nodes, reached over the peer connection (REPLICA_* messages).

``RemoteReplica`` is the network twin of ``LocalReplica``. ``HintedReplica`` is a fallback
standing in for a down primary: what it is given to merge it keeps as a durable hint for that
primary (DESIGN section 4), delivered by the handoff task once the primary is back.

Objects larger than a frame (DESIGN section 6: a frame over ``max_frame`` closes the peer
connection and every request on it). An object is up to 100 siblings of up to ``chunk_size``
inline bytes each, so its encoding can exceed any frame. Every object that travels goes
through ``object_fields``/``object_of``: up to ``PeerPool.frame_budget`` bytes it travels inline
(``"object"``); above, it is *staged*: written as a temporary upload with the ``chunk``
operation large values use (pieces of at most the budget, into the receiver's blob store,
where the ledger sweeps it after a crash), then named (``"staged": [vid, length]``) and
discarded by the receiver once read. Replies work the same way in reverse: the replica
stages the object on its side and the requester reads it with ``blob`` and discards it.
"""

from __future__ import annotations

import math
import os
from collections.abc import AsyncIterator
from typing import Any

import trio

from kvd import versions
from kvd.errors import BadRequest, KvdError, RemoteProtocolError, Unavailable
from kvd.net.peer import PeerPool
from kvd.node.coordinator import MAX_VALUE
from kvd.node.replica import Role
from kvd.proto.messages import MsgType

def encode_payload(payload: dict) -> dict:
    out: dict[str, Any] = {"deleted": payload.get("deleted", False),
                           "timestamp": payload.get("timestamp", 0.0)}
    if payload.get("value") is not None:
        out["value"] = payload["value"]
    chunks = payload.get("chunks")
    if chunks is not None:
        out["chunks"] = [chunks.vid, chunks.length, chunks.count]
    if payload.get("wid"):
        out["wid"] = payload["wid"]
    return out


def decode_payload(fields: dict) -> dict:
    """The keyword arguments of a write from its wire form (types checked by the codec
    against ``messages.PAYLOAD``); BadRequest for values no sender of ours produces."""
    payload: dict[str, Any] = {"deleted": bool(fields.get("deleted")),
                               "timestamp": float(fields.get("timestamp", 0.0))}
    if "value" in fields:
        payload["value"] = fields["value"]
    if "chunks" in fields:
        vid, length, count = fields["chunks"]
        if not 1 <= len(vid) <= 64 or not 0 <= length <= MAX_VALUE or not 0 <= count <= length + 1:
            raise BadRequest("malformed chunk reference")
        if payload.get("value"):
            raise BadRequest("a chunked value has no inline bytes")
        payload["chunks"] = versions.ChunkRef(vid=vid, length=length, count=count)
    if payload["deleted"] and (payload.get("value") or "chunks" in payload):
        raise BadRequest("a tombstone carries no value")
    if not math.isfinite(payload["timestamp"]):
        raise BadRequest("timestamp must be a finite number")
    if "wid" in fields:
        wid = fields["wid"]
        if type(wid) is not bytes or not 0 < len(wid) <= 64:
            raise BadRequest("malformed write id")
        payload["wid"] = wid
    return payload


class RemoteReplica:
    """A replica on another node (a kvd.node.replica.Replica)."""

    role = Role.PRIMARY
    stands_for: str | None = None

    def __init__(self, node: str, address: str, peers: PeerPool):
        self.node = node
        self.address = address
        self.peers = peers

    async def _put(self, fields: dict) -> dict:
        return await self.peers.call(self.address, MsgType.REPLICA_PUT, fields,
                                     MsgType.REPLICA_PUT_REPLY)

    async def get(self, key: bytes) -> versions.VersionedObject | None:
        reply = await self.peers.call(self.address, MsgType.REPLICA_GET, {"op": "get", "key": key},
                                      MsgType.REPLICA_GET_REPLY)
        return await self.object_of(key, reply)

    async def digest(self, key: bytes) -> bytes | None:
        reply = await self.peers.call(self.address, MsgType.REPLICA_GET,
                                      {"op": "digest", "key": key}, MsgType.REPLICA_GET_REPLY)
        digest = reply.get("digest")
        if digest is not None and type(digest) is not bytes:
            raise RemoteProtocolError(f"{self.node} sent a digest of {key[:64]!r} that is no bytes")
        return digest

    async def coordinate(self, key: bytes, context: versions.VersionVector,
                         payload: dict) -> versions.VersionedObject:
        reply = await self._put({"op": "coordinate", "key": key,
                                 "context": versions.encode_context(context),
                                 "payload": encode_payload(payload)})
        obj = await self.object_of(key, reply)
        if obj is None:
            raise BadRequest(f"{self.node} answered a write of {key[:64]!r} without the object")
        return obj

    async def merge(self, key: bytes, obj: versions.VersionedObject) -> None:
        await self._put({"op": "merge", "key": key, **await self.object_fields(key, obj)})

    async def object_fields(self, key: bytes, obj: versions.VersionedObject) -> dict:
        """The fields that carry ``obj`` in a request: inline, or staged on the peer first."""
        raw = versions.encode_object(obj)
        budget = self.peers.frame_budget
        if len(raw) <= budget:
            return {"object": raw}
        vid = os.urandom(16)
        try:
            for offset in range(0, len(raw), budget):
                await self.write_chunk(key, vid, offset, raw[offset : offset + budget])
        except BaseException:
            await self._discard_quietly(key, vid)
            raise
        return {"staged": [vid, len(raw)]}

    async def object_of(self, key: bytes, reply: dict) -> versions.VersionedObject | None:
        """The object a reply carries (None for none): inline, or staged on the peer."""
        if reply.get("staged") is None:
            raw = reply.get("object")
            return None if raw is None else self._decode(key, raw)
        vid, length = reply["staged"]
        budget = self.peers.frame_budget
        parts = []
        try:
            for offset in range(0, length, budget):
                answer = await self.peers.call(
                    self.address, MsgType.REPLICA_GET,
                    {"op": "blob", "key": key, "vid": vid, "offset": offset,
                     "size": min(budget, length - offset)}, MsgType.REPLICA_GET_REPLY)
                parts.append(answer["data"])
        finally:
            await self._discard_quietly(key, vid)
        raw = b"".join(parts)
        if len(raw) != length:
            raise BadRequest(f"{self.node} staged {length} bytes of {key[:64]!r}, sent {len(raw)}")
        return self._decode(key, raw)

    def _decode(self, key: bytes, raw: bytes) -> versions.VersionedObject:
        """An object the peer sent; one it could not have encoded is its protocol error."""
        try:
            return versions.decode_object(raw)
        except ValueError as exc:
            raise RemoteProtocolError(f"{self.node} sent {key[:64]!r} as {exc}") from None

    async def _discard_quietly(self, key: bytes, vid: bytes) -> None:
        """Best effort (its ledger entry sweeps it at the peer's next start otherwise)."""
        with trio.CancelScope(shield=True), trio.move_on_after(5):
            try:
                await self.discard_upload(key, vid)
            except (KvdError, OSError):
                pass

    async def write_chunk(self, key: bytes, vid: bytes, offset: int, data: bytes) -> None:
        await self._put({"op": "chunk", "key": key, "vid": vid, "offset": offset, "data": data})

    async def discard_upload(self, key: bytes, vid: bytes) -> None:
        await self._put({"op": "discard", "key": key, "vid": vid})

    async def has_blob(self, key: bytes, ref: versions.ChunkRef) -> bool:
        """Whether the replica holds every byte of value ``ref`` (a read of its last byte:
        a short blob left by a failed upload answers none). Senders ask before streaming a
        value: re-sending bytes a replica already has marks them as an unfinished upload
        there, which its next start would sweep."""
        last = max(ref.length - 1, 0)
        try:
            reply = await self.peers.call(
                self.address, MsgType.REPLICA_GET,
                {"op": "blob", "key": key, "vid": ref.vid, "offset": last,
                 "size": min(ref.length, 1)},
                MsgType.REPLICA_GET_REPLY)
        except Unavailable:
            return False
        return len(reply["data"]) == min(ref.length, 1)

    async def read_chunks(self, key: bytes, ref: versions.ChunkRef,
                          piece: int = 1 << 20) -> AsyncIterator[bytes]:
        for offset in range(0, ref.length, piece):
            yield await self.read_piece(key, ref, offset, min(piece, ref.length - offset))

    async def read_piece(self, key: bytes, ref: versions.ChunkRef, offset: int,
                         size: int) -> bytes:
        reply = await self.peers.call(
            self.address, MsgType.REPLICA_GET,
            {"op": "blob", "key": key, "vid": ref.vid, "offset": offset, "size": size},
            MsgType.REPLICA_GET_REPLY)
        return reply["data"]

    # --- whole partitions: anti-entropy, transfers, key listings (answered by
    # kvd.node.peer_service; anti-entropy's side in kvd.node.antientropy) --------------------

    async def _read(self, fields: dict) -> dict:
        return await self.peers.call(self.address, MsgType.REPLICA_GET, fields,
                                     MsgType.REPLICA_GET_REPLY)

    async def tree_root(self, partition: int) -> int:
        """The root of the replica's hash tree of ``partition``."""
        return (await self._read({"op": "aae-root", "partition": partition}))["root"]

    async def tree_branches(self, partition: int) -> list[int]:
        return (await self._read({"op": "aae-branches", "partition": partition}))["branches"]

    async def tree_segments(self, partition: int, branch: int) -> list[int]:
        return (await self._read({"op": "aae-segments", "partition": partition,
                                  "branch": branch}))["segments"]

    async def segment_keys(self, partition: int, segment: int,
                           after: bytes | None = None) -> dict:
        """One page of a segment's (key, digest) list after ``after``: ``{entries, more}``."""
        fields: dict[str, Any] = {"op": "aae-keys", "partition": partition, "segment": segment}
        if after is not None:
            fields["after"] = after
        return await self._read(fields)

    async def purge_tombstones(self, partition: int, tombstones: list) -> int:
        """Purge (key, digest) tombstones the replica holds as they are; how many it purged."""
        reply = await self._put({"op": "aae-purge", "partition": partition,
                                 "tombstones": tombstones})
        return reply.get("purged", 0)

    async def scan(self, partition: int, after: bytes, limit: int, max_bytes: int) -> dict:
        """Stored objects of ``partition`` after ``after``, for a fetch:
        ``{objects, done}`` and ``large``, a key too large for one reply."""
        return await self._read({"op": "scan", "partition": partition, "after": after,
                                 "limit": limit, "max_bytes": max_bytes})

    async def scan_piece(self, partition: int, key: bytes, offset: int, max_bytes: int) -> dict:
        """Bytes of one stored object from ``offset``: ``{piece, total, done}``."""
        return await self._read({"op": "scan", "partition": partition, "within": key,
                                 "offset": offset, "max_bytes": max_bytes})

    async def live_keys(self, partition: int, after: bytes, prefix: bytes, limit: int) -> dict:
        """The replica's live keys of ``partition`` (kvd.node.coverage): ``{keys, after, done}``."""
        return await self._read({"op": "keys", "partition": partition, "after": after,
                                 "prefix": prefix, "limit": limit})


class RemoteNode:
    """Another node's admin operations over the peer connection (ADMIN): a seed asked for the
    cluster state or to stage a join, a member asked for its transfers."""

    def __init__(self, address: str, peers: PeerPool):
        self.address = address
        self.peers = peers

    async def _admin(self, fields: dict) -> dict:
        return await self.peers.call(self.address, MsgType.ADMIN, fields, MsgType.ADMIN_REPLY)

    async def cluster_state(self) -> dict:
        """The node's cluster state and member table, as its ``state`` operation answers."""
        return await self._admin({"op": "state"})

    async def stage_join(self, node: str, address: str, peer_address: str) -> dict:
        """Ask a member to stage the join of ``node``; its state and member table."""
        return await self._admin({"op": "stage-join", "node": node, "address": address,
                                  "peer_address": peer_address})

    async def transfers(self) -> list[dict]:
        """The node's rows of pending moves, with its own fetches' progress."""
        return (await self._admin({"op": "transfers"}))["transfers"]


class HintedReplica(RemoteReplica):
    """A fallback node holding writes for the down primary ``stands_for``."""

    role = Role.FALLBACK
    stands_for: str

    def __init__(self, node: str, address: str, peers: PeerPool, stands_for: str):
        super().__init__(node, address, peers)
        self.stands_for = stands_for

    async def get(self, key: bytes) -> versions.VersionedObject | None:
        return None  # a fallback holds hints, not the partition: it has nothing to read

    async def digest(self, key: bytes) -> bytes | None:
        return None

    async def coordinate(self, key: bytes, context: versions.VersionVector,
                         payload: dict) -> versions.VersionedObject:
        # The coordinator asks only primaries to mint (kvd.node.routing rule 2).
        raise Unavailable(f"{self.node} only keeps hints for {self.stands_for}: it does not mint")

    async def merge(self, key: bytes, obj: versions.VersionedObject) -> None:
        await self._put({"op": "hint", "key": key, "for": self.stands_for,
                         **await self.object_fields(key, obj)})
