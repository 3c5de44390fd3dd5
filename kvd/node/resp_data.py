"""The data commands of the RESP front door: GET, SET, DEL, MGET, MSET, SCAN, KV.GET, ...

Each command maps onto the coordinator exactly as the native client port does
(kvd.node.client_service: the same key, quorum and context checks, the node's N/R/W):

- Rule 1: SET and DEL without options supersede what the coordinator reads in the same
  request (``coordinator.put`` with no context), as kvctl put/delete without --context do;
  writes made concurrently on other coordinators still become siblings.
- Rule 2: a key with several live siblings is never answered with one of them: GET and the
  other readers reply ``-CONFLICT``, naming the count and the way out (KV.GET, then KV.PUT
  with the context, or a SET that supersedes them all).
- Rule 3: SET NX/XX/GET and GETDEL read first and write with the context they read: best
  effort, not atomic across the cluster (a concurrent write elsewhere becomes a sibling).
  MSET is a sequence of SETs, not atomic either.
- Rule 4: values above ``chunk_size`` arrive streamed (kvd.proto.resp) and go through the
  coordinator's chunked path as they arrive (``write_stream``: SET only); GET streams them
  back from a replica in pieces. GETDEL and SET ... GET read such an old value whole
  before they write (their write frees its blob), up to ``OLD_VALUE_MAX``; a larger one
  is refused before anything is written.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass

from kvd import versions
from kvd.node import coverage
from kvd.node.client_service import quorum_params, require_settled
from kvd.node.large_values import Holders, send_value
from kvd.node.local import new_vid
from kvd.proto.messages import validate_key
from kvd.proto.glob import glob_match, literal_prefix
from kvd.proto.resp import Error, Simple

SCAN_COUNT_MAX = coverage.PAGE_LIMIT
OLD_VALUE_MAX = 16 << 20  # bytes of an old value GETDEL or SET ... GET hold in memory (Rule 4)
SCAN_CURSORS = 4096  # resume keys kept for SCAN cursors, the oldest forgotten first
# token -> the key a SCAN resumes after. Process-wide, so a client's pool may send the next
# SCAN on another connection; a (partition, key) position means the same on every node.
_resume: OrderedDict[int, bytes] = OrderedDict()


@dataclass
class Streamed:
    """A reply whose value is read from a replica in pieces (Rule 4)."""

    key: bytes
    sibling: versions.Sibling
    source: Holders | None  # the replicas holding every chunk (the coordinator's ReadResult)

    def unavailable(self) -> Error:
        """The reply when no replica that answered holds every chunk (``source`` None)."""
        return Error(f"UNAVAILABLE no replica answering holds the chunks of key "
                     f"{shown(self.key)}")


def shown(key: bytes) -> str:
    """A key in an error message: quoted, at most 64 bytes, non-UTF-8 bytes escaped."""
    return "'" + key[:64].decode(errors="backslashreplace") + "'"


def conflict(key: bytes, count: int) -> Error:
    return Error(f"CONFLICT key {shown(key)} has {count} siblings: read them all with "
                 "KV.GET key, then write the merged value with KV.PUT key value context "
                 "(or SET the key, which supersedes every sibling)")


async def _read(node, key: bytes):
    require_settled(node)
    n, r = quorum_params(node, {}, "r")
    return await node.coordinator.get(validate_key(key), n, r)


def _found(result) -> bool:
    return result.obj is not None and versions.is_found(result.obj)


def _value(key: bytes, result):
    """The one live value (bytes or Streamed), None when absent, or a CONFLICT error."""
    obj = result.obj
    found = versions.live(obj) if obj is not None else ()
    if not found:
        return None
    if len(found) > 1:
        return conflict(key, len(found))
    sibling = found[0]
    return sibling.value if sibling.chunks is None else Streamed(key, sibling, result.source)


async def _write(node, key: bytes, context, *, value: bytes = b"", deleted: bool = False):
    """One write at the node's N/W; ``context`` None supersedes what the coordinator reads
    (Rule 1). ``value`` is at most chunk_size: the parser streams larger ones (Rule 4)."""
    require_settled(node)
    n, w = quorum_params(node, {}, "w")
    return await node.coordinator.put(validate_key(key), context, n, w, value=value,
                                      deleted=deleted, timestamp=node.clocks.wall())


async def write_stream(node, key: bytes, length: int, chunks):
    """SET of a value streamed from the connection (kvd.proto.resp's StreamStart)."""
    require_settled(node)
    n, w = quorum_params(node, {}, "w")
    return await node.coordinator.put(validate_key(key), None, n, w, length=length,
                                      chunks=chunks, timestamp=node.clocks.wall(),
                                      vid=new_vid())


def _context_of(result):
    return versions.context_of(result.obj or versions.empty())


async def _whole(old, command: str):
    """``old`` (a ``_value``) with a streamed value read into memory (Rule 4): ``command``
    is about to replace it, which frees the blob a later stream would read."""
    if not isinstance(old, Streamed):
        return old
    chunks = old.sibling.chunks
    assert chunks is not None
    if chunks.length > OLD_VALUE_MAX:
        return Error(f"ERR {command} of a value over {OLD_VALUE_MAX >> 20} MiB is not "
                     f"supported ({shown(old.key)} holds {chunks.length} bytes): GET it, "
                     "then write")
    if old.source is None:
        return old.unavailable()
    pieces: list[bytes] = []

    async def keep(data: bytes, _end: bool) -> None:
        pieces.append(data)

    await send_value(old.source, old.key, chunks, keep)
    return b"".join(pieces)


async def get(session, args):
    key = args[1]
    return _value(key, await _read(session.node, key))


async def set_(session, args):
    key, value = args[1], args[2]
    options = [a.upper() for a in args[3:]]
    unknown = set(options) - {b"NX", b"XX", b"GET"}
    if unknown & {b"EX", b"PX", b"EXAT", b"PXAT", b"KEEPTTL"}:
        return Error("ERR kvd keys do not expire (no TTL yet)")
    if unknown or (b"NX" in options and b"XX" in options):
        return Error("ERR syntax error")
    if not options:
        await _write(session.node, key, None, value=value)
        return Simple("OK")
    result = await _read(session.node, key)
    old = _value(key, result)
    answer_old = b"GET" in options
    exists = _found(result)
    if (b"NX" in options and exists) or (b"XX" in options and not exists):
        return old if answer_old else None  # nothing written (Redis 7: NX GET answers old)
    if answer_old:
        old = await _whole(old, "SET ... GET")
        if isinstance(old, Error):
            return old  # several siblings, or a value too large to hold: nothing written
    await _write(session.node, key, _context_of(result), value=value)
    return old if answer_old else Simple("OK")


async def del_(session, args):
    deleted = 0
    for key in args[1:]:
        result = await _read(session.node, key)
        if _found(result):
            await _write(session.node, key, None, deleted=True)
            deleted += 1
    return deleted


async def getdel(session, args):
    key = args[1]
    result = await _read(session.node, key)
    old = await _whole(_value(key, result), "GETDEL")
    if old is not None and not isinstance(old, Error):
        await _write(session.node, key, _context_of(result), deleted=True)
    return old


async def exists(session, args):
    count = 0
    for key in args[1:]:
        result = await _read(session.node, key)
        count += _found(result)
    return count


async def mget(session, args):
    return [_value(key, await _read(session.node, key)) for key in args[1:]]


async def mset(session, args):
    if len(args) % 2 != 1:
        return Error("ERR wrong number of arguments for 'mset' command")
    for i in range(1, len(args), 2):
        await _write(session.node, args[i], None, value=args[i + 1])
    return Simple("OK")


async def strlen(session, args):
    value = _value(args[1], await _read(session.node, args[1]))
    if value is None or isinstance(value, Error):
        return value or 0
    return value.sibling.length if isinstance(value, Streamed) else len(value)


async def type_(session, args):
    return Simple("string" if _found(await _read(session.node, args[1])) else "none")


async def ttl(session, args):
    """No expiry exists yet: -1 for a key that exists, -2 for one that does not."""
    return -1 if _found(await _read(session.node, args[1])) else -2


async def kv_get(session, args):
    """[context, value or nil for a concurrent delete, ...]: every sibling, for resolving."""
    key = args[1]
    result = await _read(session.node, key)
    if not _found(result):
        return None
    obj = result.obj
    context = versions.seal_context(session.node.context_key, key, versions.context_of(obj))
    values = [None if s.deleted else s.value if s.chunks is None
              else Streamed(key, s, result.source) for s in obj.siblings]
    return [versions.context_to_text(context).encode(), *values]


async def kv_put(session, args):
    """Write with a context from KV.GET; replies the key's live siblings after it."""
    key, value, text = args[1], args[2], args[3]
    try:
        sealed = versions.context_from_text(text)  # strictly: "!!!" is no empty context
    except ValueError:
        return Error("ERR the context is not one KV.GET returned")
    context = versions.open_context(session.node.context_key, validate_key(key), sealed)
    result = await _write(session.node, key, context, value=value)
    return len(versions.live(result.obj))


async def scan(session, args):
    """SCAN cursor [MATCH pattern] [COUNT n]: a page of the coverage query. The cursor is
    ``partition << 32 | token``; a token names a resume key this node keeps (``_resume``)."""
    try:
        cursor = int(args[1])
    except ValueError:
        return Error("ERR invalid cursor")
    pattern, count = b"*", 10
    options = args[2:]
    if len(options) % 2:
        return Error("ERR syntax error")
    for name, value in zip(options[::2], options[1::2]):
        name = name.upper()
        if name == b"MATCH":
            pattern = value
        elif name == b"COUNT" and value.isdigit() and int(value) >= 1:
            count = min(int(value), SCAN_COUNT_MAX)
        elif name == b"TYPE":
            if value.lower() != b"string":
                return [b"0", []]
        else:
            return Error("ERR syntax error")
    partition, token = cursor >> 32, cursor & 0xFFFFFFFF
    if not 0 <= partition < session.node.store.ring_size or (token and token not in _resume):
        return Error("ERR invalid cursor (or one this node has forgotten: SCAN from 0 again)")
    after = b""
    if token:
        after = _resume[token]
        _resume.move_to_end(token)
    found, position = await coverage.page(session.node, partition, after,
                                          literal_prefix(pattern), count)
    found = [key for key in found if glob_match(pattern, key)]
    if position is None:
        return [b"0", found]
    partition, after = position
    token = 0
    if after:
        token = int.from_bytes(os.urandom(4), "big") or 1
        _resume[token] = after
        while len(_resume) > SCAN_CURSORS:
            _resume.popitem(last=False)
    return [str(partition << 32 | token).encode(), found]


async def dbsize(session, args):
    """Exact, by a full coverage walk (as costly as listing every key)."""
    return await coverage.count(session.node)


# name -> (handler, arity as Redis counts it: n exact, -n at least n, role needed)
COMMANDS = {
    b"GET": (get, 2, "read"),
    b"SET": (set_, -3, "write"),
    b"DEL": (del_, -2, "write"),
    b"UNLINK": (del_, -2, "write"),
    b"GETDEL": (getdel, 2, "write"),
    b"EXISTS": (exists, -2, "read"),
    b"MGET": (mget, -2, "read"),
    b"MSET": (mset, -3, "write"),
    b"STRLEN": (strlen, 2, "read"),
    b"TYPE": (type_, 2, "read"),
    b"TTL": (ttl, 2, "read"),
    b"PTTL": (ttl, 2, "read"),
    b"SCAN": (scan, -2, "read"),
    b"DBSIZE": (dbsize, 1, "read"),
    b"KV.GET": (kv_get, 2, "read"),
    b"KV.PUT": (kv_put, 4, "write"),
}

# Where a command's keys are (first, last, step), as COMMAND INFO reports them for clients
# and proxies that route by key; -1: up to the last argument. Not listed: the key alone, first.
KEY_POSITIONS = {
    b"DEL": (1, -1, 1), b"UNLINK": (1, -1, 1), b"EXISTS": (1, -1, 1), b"MGET": (1, -1, 1),
    b"MSET": (1, -1, 2), b"SCAN": (0, 0, 0), b"DBSIZE": (0, 0, 0),
}
