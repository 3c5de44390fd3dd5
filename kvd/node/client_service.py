"""What a node answers on its client port: GET, PUT, DELETE, STATUS, INSPECT, ADMIN, PING.

Every handler takes (node, conn, message, chunks) like the peer handlers in
kvd.node.peer_service, and replies on the same request id; kvd.server looks the handler up
in ``CLIENT_HANDLERS`` and turns a raised KvdError into an ERROR frame. ``chunks`` carries a
streamed PUT's CHUNK frames (None otherwise); ``node`` is the kvd.server.Node (untyped
here: kvd.node never imports the server). Quorum work is the coordinator's; these handlers
validate the request, open and seal contexts, and shape the reply.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

import trio

from kvd import versions
from kvd._version import version
from kvd.errors import BadRequest, Damaged, KvdError, Unavailable
from kvd.node import admin
from kvd.node.backup import send_backup
from kvd.node.coordinator import MAX_VALUE
from kvd.node.large_values import blob_file_store, send_file_value, send_value
from kvd.node.local import new_vid
from kvd.proto import codec
from kvd.proto.messages import PROTOCOL_VERSION, MsgType, validate_key


def require_settled(node) -> None:
    """Unavailable while a wiped node asks its seeds whether it lost its data, and while a
    new node started with seeds waits to be joined (kvd.node.restore Rule 5)."""
    if not node.cluster.restore.settled.is_set():
        raise Unavailable("this node has a new data directory and is asking its seeds whether "
                          "it lost its data; try another node or retry shortly")
    require_a_cluster(node)


def require_a_cluster(node) -> None:
    """Unavailable while a new node started with seeds waits to be joined: it shows no
    one-node cluster of its own (outside tester), and only a join helps."""
    if node.cluster.restore.awaiting_join:
        raise Unavailable(f"{node.node_id} is in no cluster yet: run `kvctl --host "
                          f"{node.config.listen} cluster join SEED` to add it to its seeds' "
                          "cluster (or start it without seeds to found a new one)")


def _key(fields) -> bytes:
    return validate_key(fields["key"])


def quorum_params(node, fields, name: str) -> tuple[int, int]:
    """(n, r or w) for a request: its own values or the config's, validated, then capped by
    the number of nodes in the ring (docs/DECISIONS.md: a cluster smaller than N)."""
    n = fields["n"] if fields.get("n") is not None else node.config.n
    quorum = fields.get(name)
    if quorum is None:
        quorum = min(getattr(node.config, name), n)
    if not 1 <= n <= 16:
        raise BadRequest(f"n={n} must be between 1 and 16")
    if not 1 <= quorum <= n:
        raise BadRequest(f"{name}={quorum} must be between 1 and n={n}")
    members = node.member_count()
    return min(n, members), min(quorum, members)


async def _get(node, conn, message, _chunks) -> None:
    key, n, r = _read_request(node, message.fields)
    result = await node.coordinator.get(key, n, r)
    reply, streamed = _get_reply(node, message.request_id, key, result)
    await conn.send(reply)
    for sibling in streamed:
        await _send_value(node, conn, message.request_id, key, sibling, result.source)


def get_now(node, conn, message) -> tuple[bytes, Callable[[], Awaitable[None]] | None] | None:
    """A GET this node answers alone (one node serving, so its store is the only replica),
    read at once: (its GET_REPLY frame, None or an async function that streams the values
    too large for the frame after it). The server then answers with no task and no
    schedule point (docs/DECISIONS.md, issue 14). None when the read must ask other
    replicas: ``_get`` then runs in a task. Raises KvdError like ``_get``."""
    if node.member_count() != 1:
        return None
    key, n, r = _read_request(node, message.fields)
    result = node.coordinator.get_here(key, n, r)
    if result is None:
        return None
    rid = message.request_id
    reply, streamed = _get_reply(node, rid, key, result)
    if not streamed:
        return reply, None

    async def send_rest() -> None:
        for sibling in streamed:
            await _send_value(node, conn, rid, key, sibling, result.source)

    return reply, send_rest


def _read_request(node, fields) -> tuple[bytes, int, int]:
    """(key, n, r) of a GET, each checked."""
    require_settled(node)
    key = _key(fields)
    n, r = quorum_params(node, fields, "r")
    return key, n, r


def _get_reply(node, rid: int, key: bytes, result) -> tuple[bytes, list[versions.Sibling]]:
    """The GET_REPLY frame of a read, and the siblings whose values follow it as CHUNK
    frames: what fits in one frame is inline, the rest is streamed."""
    obj = result.obj
    if obj is None or not versions.is_found(obj):
        context = _context(node, key, obj or versions.empty())
        reply = {"key": key, "found": False, "context": context, "siblings": [],
                 "replicas": result.replicas}
        return codec.encode(MsgType.GET_REPLY, rid, reply), []
    budget = node.config.max_frame // 2
    described, streamed = [], []
    for sibling in obj.siblings:
        inline = sibling.chunks is None and sibling.length <= budget
        if inline:
            budget -= sibling.length
            described.append({"value": sibling.value, "length": sibling.length,
                              "deleted": sibling.deleted})
        else:
            described.append({"value": None, "length": sibling.length, "deleted": False})
            streamed.append(sibling)
    reply = {"key": key, "found": True,
             "context": _context(node, key, obj),
             "siblings": described, "replicas": result.replicas}
    return codec.encode(MsgType.GET_REPLY, rid, reply), streamed


async def _send_value(node, conn, rid, key, sibling, source) -> None:
    """Stream one sibling's value as CHUNK frames ending with FLAG_END."""
    if sibling.chunks is None:
        size = node.config.chunk_size
        value = sibling.value
        pieces = [value[i : i + size] for i in range(0, len(value), size)] or [b""]
        for i, piece in enumerate(pieces):
            await conn.send(codec.encode_chunk(rid, piece, end=i == len(pieces) - 1))
        return
    if source is None:
        raise Unavailable(f"no replica answering holds the chunks of key {key[:64]!r}")
    ref, sent = sibling.chunks, 0
    blobs = blob_file_store(source.replicas[0])
    if blobs is not None and ref.length and conn.can_send_file():
        sent = await send_file_value(conn, rid, ref, blobs)
        if sent == ref.length:
            return
        source.drop_first(Damaged(f"value bytes {ref.vid.hex()} on {node.node_id} are damaged"))

    async def send(data: bytes, end: bool) -> None:
        await conn.send(codec.encode_chunk(rid, data, end=end))

    await send_value(source, key, ref, send, start=sent)


def _write_request(node, fields) -> tuple[bytes, int, int, versions.VersionVector | None]:
    """(key, n, w, context) of a PUT or DELETE, each checked: the node has its data, the
    key's size, the quorum, the context's seal. The context is None for a write that
    supersedes what the coordinator reads, and empty for a blind one (protocol.md)."""
    require_settled(node)
    key = _key(fields)
    n, w = quorum_params(node, fields, "w")
    sealed = fields.get("context") or b""
    if fields.get("blind"):
        if sealed:
            raise BadRequest("a write has a context or is blind, not both")
        return key, n, w, {}
    if not sealed:
        return key, n, w, None
    return key, n, w, versions.open_context(node.context_key, key, sealed)


async def _put(node, conn, message, chunks) -> None:
    fields = message.fields
    key, n, w, context = _write_request(node, fields)
    length = fields["length"]
    if not 0 <= length <= MAX_VALUE:
        raise BadRequest(f"value of {length} bytes exceeds the 1 GiB limit")
    now = node.clocks.wall()
    if chunks is None:
        value = fields["value"]
        if len(value) != length:
            raise BadRequest(f"inline value is {len(value)} bytes but length says {length}")
        result = await node.coordinator.put(key, context, n, w, value=value, timestamp=now)
    else:
        vid = new_vid()

        async def chunk_data():
            async for chunk in chunks:
                yield chunk.fields["data"]

        result = await node.coordinator.put(
            key, context, n, w, length=length, chunks=chunk_data(), timestamp=now, vid=vid
        )
    await _reply_written(node, conn, message.request_id, key, result)


def _context(node, key: bytes, obj: versions.VersionedObject) -> bytes:
    """The sealed context a client gets for ``obj``: its clock and its siblings' write ids."""
    return versions.seal_context(node.context_key, key, versions.context_of(obj))


async def _reply_written(node, conn, rid, key, result) -> None:
    reply = {"context": _context(node, key, result.obj),
             "siblings": len(versions.live(result.obj)), "replicas": result.replicas}
    await conn.send(codec.encode(MsgType.PUT_REPLY, rid, reply))


async def _delete(node, conn, message, _chunks) -> None:
    key, n, w, context = _write_request(node, message.fields)
    result = await node.coordinator.put(key, context, n, w, deleted=True,
                                        timestamp=node.clocks.wall())
    await _reply_written(node, conn, message.request_id, key, result)


_STATE_LETTER = {"valid": "N", "joining": "J", "leaving": "L", "exiting": "L"}


async def _status(node, conn, message, _chunks) -> None:
    cluster = node.cluster
    state = cluster.state
    counts = {n: len(state.ring.partitions_of(n)) for n in state.ring.nodes()}
    hints = cluster.handoff.pending()
    rows = []
    # This node too when it is no member (force-removed while running): its own row holds
    # its counters, and status "none" says it is not in the cluster.
    for member in sorted(set(state.members) | set(counts) | {node.node_id}):
        record = cluster.members.get(member)
        address, peer_address = cluster.addresses.get(member, ("", ""))
        if member == node.node_id:
            load = node.storage.approximate_size() + node.store.blobs.approximate_size()
        else:
            load = record.load_bytes if record else 0
        status = state.members.get(member)
        letter = _STATE_LETTER.get(status or "", "L")  # no member: removed, or left
        restoring = (cluster.restore.restoring if member == node.node_id
                     else record is not None and record.restoring)
        if status == "valid" and (member in state.fetching or restoring):
            letter = "J"  # still fetching its partitions: after its join, a wipe or a restore
        partitions = counts.get(member, 0)
        if member == node.node_id and cluster.restore.awaiting_join:
            # In no cluster yet: not a member owning its own one-node ring.
            letter, status, partitions = "J", None, 0
        rows.append({
            "node": member,
            "state": ("U" if cluster.is_up(member) else "D") + letter,
            "address": address,
            "peer_address": peer_address,
            "load_bytes": load,
            "partitions": partitions,
            "ownership": round(partitions / state.ring.q, 4),
            "status": status or "none",
            "hints_pending": hints.get(member, 0),
        })
    mine = next(r for r in rows if r["node"] == node.node_id)
    mine.update({"uptime_s": round(node.clocks.monotonic() - node.started, 1),
                 "cpu_seconds": time.process_time(),  # kvctl bench: CPU per request
                 "requests": node.counters.requests, "connections": node.counters.connections,
                 "read_repairs": node.coordinator.read_repairs,
                 "hints_held": sum(hints.values()), "hints_delivered": cluster.handoff.delivered,
                 "anti_entropy": node.aae.totals.to_dict(),
                 "server_version": version(), "protocol": PROTOCOL_VERSION})
    reply = {"node": node.node_id, "nodes": rows, "ring_version": state.ring.version,
             "cluster": state.cluster_id, "awaiting_join": cluster.restore.awaiting_join}
    await conn.send(codec.encode(MsgType.STATUS_REPLY, message.request_id, reply))


async def _inspect(node, conn, message, _chunks) -> None:
    require_a_cluster(node)
    key = _key(message.fields)
    cluster = node.cluster
    n = min(node.config.n, node.member_count())
    replicas = []
    for member, role in cluster.routing.replica_roles(key, n):
        entry = {"node": member, "role": role.value, "present": False, "siblings": 0, "digest": "",
                 "version": b"", "deleted": False}
        try:
            with trio.fail_after(node.config.request_timeout):
                obj = await cluster.replica(member).get(key)
        except (KvdError, trio.TooSlowError, OSError) as exc:
            entry["error"] = str(exc) or "timed out"
            obj = None
        if obj is not None:
            entry.update(present=True, siblings=len(obj.siblings), digest=versions.digest(obj),
                         version=versions.encode_context(obj.clock),
                         deleted=not versions.is_found(obj))
        replicas.append(entry)
    reply = {"key": key, "partition": node.store.partition(key), "replicas": replicas}
    await conn.send(codec.encode(MsgType.INSPECT_REPLY, message.request_id, reply))


async def _admin(node, conn, message, _chunks) -> None:
    if message.fields["op"] == "backup":  # a stream of CHUNK frames, not one reply
        await send_backup(node, conn, message.request_id)
        return
    if message.fields["op"] != "join":
        require_a_cluster(node)
    reply = await admin.handle(node, message.fields)
    await conn.send(codec.encode(MsgType.ADMIN_REPLY, message.request_id, reply))


async def _ping(node, conn, message, _chunks) -> None:
    await conn.send(codec.encode(MsgType.PONG, message.request_id, {}))


CLIENT_HANDLERS = {
    MsgType.GET: _get,
    MsgType.PUT: _put,
    MsgType.DELETE: _delete,
    MsgType.STATUS: _status,
    MsgType.INSPECT: _inspect,
    MsgType.PING: _ping,
    MsgType.ADMIN: _admin,
}
