"""Replicas on other nodes, reached over the peer connection (REPLICA_* messages).

``RemoteReplica`` is the network twin of ``LocalReplica``. ``HintedReplica`` is a fallback
standing in for a down primary: what it is given to merge it keeps as a durable hint for that
primary (DESIGN section 4), delivered by the handoff task once the primary is back.
"""

from __future__ import annotations

from kvd import versions
from kvd.errors import BadRequest
from kvd.net.peer import PeerPool
from kvd.proto.messages import MsgType


def encode_payload(payload: dict) -> dict:
    out = {"deleted": payload.get("deleted", False), "timestamp": payload.get("timestamp", 0.0)}
    if payload.get("value") is not None:
        out["value"] = payload["value"]
    chunks = payload.get("chunks")
    if chunks is not None:
        out["chunks"] = [chunks.vid, chunks.length, chunks.count]
    if payload.get("wid"):
        out["wid"] = payload["wid"]
    return out


def decode_payload(fields: dict) -> dict:
    payload = {"deleted": bool(fields.get("deleted")), "timestamp": float(fields.get("timestamp", 0.0))}
    if "value" in fields:
        payload["value"] = fields["value"]
    if "chunks" in fields:
        vid, length, count = fields["chunks"]
        payload["chunks"] = versions.ChunkRef(vid=vid, length=length, count=count)
    if "wid" in fields:
        wid = fields["wid"]
        if type(wid) is not bytes or not 0 < len(wid) <= 64:
            raise BadRequest("malformed write id")
        payload["wid"] = wid
    return payload


class RemoteReplica:
    """A replica on another node."""

    role = "primary"
    stands_for = None

    def __init__(self, node: str, address: str, peers: PeerPool):
        self.node = node
        self.address = address
        self.peers = peers

    async def _put(self, fields: dict) -> dict:
        return await self.peers.call(self.address, MsgType.REPLICA_PUT, fields,
                                     MsgType.REPLICA_PUT_REPLY)

    async def get(self, key):
        reply = await self.peers.call(self.address, MsgType.REPLICA_GET, {"op": "get", "key": key},
                                      MsgType.REPLICA_GET_REPLY)
        raw = reply.get("object")
        return None if raw is None else versions.decode_object(raw)

    async def coordinate(self, key, context, payload):
        reply = await self._put({"op": "coordinate", "key": key,
                                 "context": versions.encode_context(context),
                                 "payload": encode_payload(payload)})
        return versions.decode_object(reply["object"])

    async def merge(self, key, obj):
        await self._put({"op": "merge", "key": key, "object": versions.encode_object(obj)})

    async def write_chunk(self, key, vid, offset, data):
        await self._put({"op": "chunk", "key": key, "vid": vid, "offset": offset, "data": data})

    async def discard_upload(self, key, vid):
        await self._put({"op": "discard", "key": key, "vid": vid})

    async def read_chunks(self, key, ref, piece: int = 1 << 20):
        for offset in range(0, ref.length, piece):
            reply = await self.peers.call(
                self.address, MsgType.REPLICA_GET,
                {"op": "blob", "key": key, "vid": ref.vid, "offset": offset,
                 "size": min(piece, ref.length - offset)},
                MsgType.REPLICA_GET_REPLY)
            yield reply["data"]


class HintedReplica(RemoteReplica):
    """A fallback node holding writes for the down primary ``stands_for``."""

    role = "fallback"

    def __init__(self, node, address, peers, stands_for: str):
        super().__init__(node, address, peers)
        self.stands_for = stands_for

    async def get(self, key):
        return None  # a fallback holds hints, not the partition: it has nothing to read

    async def coordinate(self, key, context, payload):
        raise NotImplementedError  # fallbacks never mint (the coordinator skips them)

    async def merge(self, key, obj):
        await self._put({"op": "hint", "key": key, "object": versions.encode_object(obj),
                         "for": self.stands_for})
