"""What a node answers on its peer port: replica operations, gossip, cluster staging.

Every handler takes (node, conn, message, chunks) like the client handlers in
kvd.node.client_service, and replies on the same request id.

Bodies arrive type-checked against ``kvd.proto.messages.OPS`` (the codec closes the
connection otherwise); ``_check_values`` then checks the ranges a type cannot express,
before any handler runs, so a wrong value is ``bad_request`` and never a traceback (issue 10,
hole 4).
"""

from __future__ import annotations

from kvd import aae, versions
from kvd.errors import BadRequest, Unavailable
from kvd.membership import cluster_state as cs
from kvd.node import coverage
from kvd.node.transfers import scan_budget
from kvd.node.local import new_vid
from kvd.node.remote import decode_payload
from kvd.node.replica import incomplete_copy
from kvd.proto import codec
from kvd.proto.messages import MAX_KEY_LEN, MsgType

# Largest offset into an upload or staged object: a value is at most 1 GiB, a staged object
# (up to 100 siblings' inline values) stays far below this.
MAX_BLOB_OFFSET = 1 << 40
MAX_VID = 64


def _check_values(node, fields: dict) -> None:
    """BadRequest unless every field a peer operation may carry is in range."""
    q = node.store.ring_size
    bounds = {
        "partition": (0, q - 1),
        "offset": (0, MAX_BLOB_OFFSET),
        "size": (0, node.config.max_frame),
        "limit": (1, 1 << 31),
        "branch": (0, aae.BRANCHES - 1),
        "segment": (0, aae.SEGMENTS - 1),
    }
    for name, (low, high) in bounds.items():
        value = fields.get(name)
        if value is not None and not low <= value <= high:
            raise BadRequest(f"{name} {value} is not in {low}..{high}")
    if fields.get("max_bytes") is not None and fields["max_bytes"] < 1:
        raise BadRequest("max_bytes must be at least 1")
    for name in ("key", "within"):
        key = fields.get(name)
        if key is not None and not 1 <= len(key) <= MAX_KEY_LEN:
            raise BadRequest(f"{name} must be 1..{MAX_KEY_LEN} bytes, got {len(key)}")
    vids = [fields.get("vid"), (fields.get("staged") or [None])[0]]
    if any(vid is not None and not 1 <= len(vid) <= MAX_VID for vid in vids):
        raise BadRequest(f"an upload id must be 1..{MAX_VID} bytes")


async def _reply(conn, message, kind: MsgType, fields: dict) -> None:
    await conn.send(codec.encode(kind, message.request_id, fields))


async def replica_get(node, conn, message, _chunks) -> None:
    fields = message.fields
    store = node.store
    _check_values(node, fields)
    if fields.get("op") == "scan":
        if not node.cluster.restore.has_its_data:
            raise Unavailable(f"{node.node_id} is restoring its replicas after losing its data")
        # Replies stay below our frame limit however large the objects (and below the
        # fetcher's, which it sends; older fetchers send none).
        budget = min(fields.get("max_bytes") or scan_budget(node.config.max_frame),
                     scan_budget(node.config.max_frame))
        if fields.get("within") is not None:
            if fields.get("offset") is None:
                raise BadRequest("a scan within a key needs an offset")
            reply = node.cluster.transfers.scan_piece(fields["partition"], fields["within"],
                                                      fields["offset"], budget)
        else:
            if fields.get("after") is None or fields.get("limit") is None:
                raise BadRequest("a scan needs after and limit (or within and offset)")
            reply = node.cluster.transfers.scan_partition(fields["partition"], fields["after"],
                                                          min(fields["limit"], 1024), budget)
        await _reply(conn, message, MsgType.REPLICA_GET_REPLY, reply)
        return
    if fields["op"] == "keys":
        reply = coverage.local_keys(node, fields["partition"], fields["after"],
                                    fields["prefix"], fields["limit"])
        await _reply(conn, message, MsgType.REPLICA_GET_REPLY, reply)
        return
    if fields.get("op") == "blob":  # a piece of a value a peer streams to its client
        store.linger.read(fields["vid"])  # kvd.node.local Rule 8
        data = await store.blobs.read(fields["vid"], fields["offset"], fields["size"])
        await _reply(conn, message, MsgType.REPLICA_GET_REPLY, {"data": data})
        return
    if fields["op"] not in ("get", "digest"):
        raise BadRequest(f"unknown replica read operation {fields['op'][:32]!r}")
    reply = _read_now(node, message)
    if reply is None:  # an object too large to go inline: staged for the requester
        reply = await _object_fields(node, fields["key"], store.read(fields["key"]))
    await _reply(conn, message, MsgType.REPLICA_GET_REPLY, reply)


def replica_read_now(node, conn, message) -> tuple[bytes, None] | None:
    """A replica read (``get``, ``digest``, or an anti-entropy exchange's question) answered
    by the connection's reader itself, as kvd.node.client_service.get_now answers a one-node
    GET: (its REPLICA_GET_REPLY frame, None). None when it needs ``replica_get`` in a task
    (another op, an object to stage)."""
    op = message.fields.get("op")
    if op in _AAE_OPS:  # a hash tree in memory, or one bounded page of the key index
        _check_values(node, message.fields)
        reply = node.aae.answer(message.fields)
        return codec.encode(MsgType.REPLICA_GET_REPLY, message.request_id, reply), None
    if op not in ("get", "digest"):
        return None
    _check_values(node, message.fields)
    reply = _read_now(node, message)
    if reply is None:
        return None
    return codec.encode(MsgType.REPLICA_GET_REPLY, message.request_id, reply), None


_AAE_OPS = ("aae-root", "aae-branches", "aae-segments", "aae-keys")


def _read_now(node, message) -> dict | None:
    """The reply fields of a get or digest, or None for an object past the inline limit."""
    fields = message.fields
    if not node.cluster.restore.has_its_data:
        raise Unavailable(f"{node.node_id} is restoring its replicas after losing its data")
    if fields["op"] == "digest":
        return {"digest": node.store.read_digest(fields["key"])}
    raw = node.store.read_encoded(fields["key"])  # sent as stored: no decode, no re-encode
    if raw is None:
        return {"object": None}
    if node.store.blobs.damaged_found:  # then this copy may lack a value's bytes
        incomplete = incomplete_copy(node.store, node.node_id, fields["key"],
                                     versions.decode_object(raw))
        if incomplete is not None:
            raise incomplete[1]
    return {"object": raw} if len(raw) <= node.config.max_frame // 2 else None


async def replica_put(node, conn, message, _chunks) -> None:
    fields = message.fields
    op = fields.get("op")
    store = node.store
    _check_values(node, fields)
    reply: dict = {}
    if op == "coordinate":
        context = versions.decode_context(fields.get("context") or b"")
        obj = await store.coordinate(fields["key"], context, node.identity.actor,
                                     **decode_payload(fields["payload"]))
        reply.update(await _object_fields(node, fields["key"], obj))
    elif op == "merge":
        await store.merge(fields["key"], await _incoming_object(node, fields))
    elif op == "hint":
        await node.cluster.handoff.store(fields["for"], fields["key"],
                                        await _incoming_object(node, fields))
    elif op == "chunk":
        await store.write_chunk(fields["key"], fields["vid"], fields["offset"], fields["data"])
    elif op == "aae-purge":
        reply["purged"] = await node.aae.purge_confirmed(fields["partition"], fields["tombstones"])
    elif op == "discard":
        await store.discard_upload(fields["key"], fields["vid"])
    else:
        raise BadRequest(f"unknown replica operation {op!r}")
    await _reply(conn, message, MsgType.REPLICA_PUT_REPLY, reply)


async def _incoming_object(node, fields: dict) -> versions.VersionedObject:
    """The object of a merge or hint: inline, or staged by the sender (kvd.node.remote)."""
    if fields.get("staged") is None:
        if fields.get("object") is None:
            raise BadRequest("no object: neither inline nor staged")
        return _object(fields["object"])
    vid, length = fields["staged"]
    store = node.store
    try:
        if not store.blobs.exists(vid):
            raise BadRequest("the staged object is not here (staged on another connection?)")
        raw = await store.blobs.read(vid, 0, length)
    finally:
        await store.discard_upload(fields["key"], vid)
    if len(raw) != length:
        raise BadRequest(f"staged object has {len(raw)} of {length} bytes")
    return _object(raw)


async def _object_fields(node, key: bytes, obj) -> dict:
    """A reply's fields carrying ``obj``: inline up to half of max_frame, else staged here
    for the requester to read (``blob``) and discard (kvd.node.remote)."""
    raw = versions.encode_object(obj)
    if len(raw) <= node.config.max_frame // 2:
        return {"object": raw}
    vid = new_vid()
    await node.store.write_chunk(key, vid, 0, raw)
    return {"object": None, "staged": [vid, len(raw)]}


def _object(raw: bytes) -> versions.VersionedObject:
    try:
        return versions.decode_object(raw)
    except ValueError as exc:
        raise BadRequest(f"malformed object: {exc}") from None


async def gossip(node, conn, message, _chunks) -> None:
    await node.cluster.restore.maybe_restore(message.fields)
    await _reply(conn, message, MsgType.GOSSIP_REPLY, node.cluster.gossip_reply(message.fields))


async def peer_admin(node, conn, message, _chunks) -> None:
    fields = message.fields
    cluster = node.cluster
    if fields.get("op") == "state":
        await _reply(conn, message, MsgType.ADMIN_REPLY, cluster.full_gossip())
        return
    if fields.get("op") == "transfers":
        await _reply(conn, message, MsgType.ADMIN_REPLY, {"transfers": cluster.transfers.rows()})
        return
    if fields.get("op") != "stage-join":
        raise BadRequest(f"unknown peer admin operation {fields.get('op')!r}")
    joiner = fields["node"]
    cluster.add_member(joiner, fields["address"], fields["peer_address"])
    await cluster.staging.stage(cs.Change("join", joiner))
    await _reply(conn, message, MsgType.ADMIN_REPLY, cluster.full_gossip())


PEER_HANDLERS = {
    MsgType.REPLICA_GET: replica_get,
    MsgType.REPLICA_PUT: replica_put,
    MsgType.GOSSIP: gossip,
    MsgType.ADMIN: peer_admin,
    MsgType.PING: lambda node, conn, message, _c: _reply(conn, message, MsgType.PONG, {}),
}
