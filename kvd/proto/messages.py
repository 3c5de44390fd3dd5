"""Wire protocol vocabulary: constants, message types and the body schema of each type.

This module is data, not behaviour; ``kvd.proto.codec`` enforces it and docs/protocol.md
describes it for client authors. Keep the three in agreement.

Invariants:

- Rule 1: ``MsgType`` is append-only. A number, once released, keeps its meaning forever;
  never renumber, never reuse a retired number. New types go at the end.
- Rule 2: every body except CHUNK's is a msgpack map with short string keys. CHUNK's body
  is raw bytes.
- Rule 3: fields may be added to a type, never removed or retyped. A receiver ignores fields
  it does not know (forward compatibility), so a new optional field needs no version bump.
- Rule 4: the codec checks types only. Value checks (key length, R <= N, role names) belong
  to whoever acts on the request; ``validate_key`` is the shared helper for keys.
- Rule 5: the body of a type with operations (REPLICA_GET, REPLICA_PUT, ADMIN) is checked
  against ``OPS[type][op]`` too, so a handler never sees a field of the wrong type (issue
  10, hole 4). An operation not in the table passes the codec; its handler refuses it with
  ``bad_request`` naming it, so a newer sender's new operation closes nothing.

Like the codec, this module imports neither trio nor plyvel.
"""

from __future__ import annotations

import enum
from typing import NamedTuple

from kvd.errors import BadRequest

PROTOCOL_VERSION = 1
HEADER_SIZE = 13
PRE_AUTH_MAX_FRAME = 16 * 1024
DEFAULT_MAX_FRAME = 4 * 1024 * 1024
MAX_REQUEST_ID = 0xFFFFFFFF
MAX_KEY_LEN = 1024

FLAG_END = 0x01
"""Set on the last CHUNK frame of a streamed value."""


class MsgType(enum.IntEnum):
    """The message type byte of the frame header.

    APPEND-ONLY: never renumber or reuse a value; add new types at the end.
    """

    HELLO = 1
    HELLO_OK = 2
    ERROR = 3
    GET = 4
    GET_REPLY = 5
    PUT = 6
    PUT_REPLY = 7
    DELETE = 8
    CHUNK = 9
    STATUS = 10
    STATUS_REPLY = 11
    INSPECT = 12
    INSPECT_REPLY = 13
    PING = 14
    PONG = 15
    # peer messages (used by the cluster layer)
    REPLICA_GET = 16
    REPLICA_GET_REPLY = 17
    REPLICA_PUT = 18
    REPLICA_PUT_REPLY = 19
    GOSSIP = 20
    GOSSIP_REPLY = 21
    ADMIN = 22
    ADMIN_REPLY = 23


class Tuple(NamedTuple):
    """Schema type of a msgpack array of exactly ``len(items)`` items, each of its type."""

    items: tuple


class ListOf(NamedTuple):
    """Schema type of a msgpack array whose every item matches ``item``.

    ``item`` is a tuple of Python types, a nested ``ListOf``, or a field schema dict (the
    item is then a map checked against it).
    """

    item: object


# Schema types. A field's type is a tuple of Python types (as msgpack decodes them with
# raw=False: bin -> bytes, str -> str, nil -> None, array -> list, map -> dict), a ListOf,
# or a field schema dict for a nested map. bool is never accepted where int is asked for.
BYTES = (bytes,)
STR = (str,)
INT = (int,)
BOOL = (bool,)
MAP = (dict,)
LIST = (list,)
OPTIONAL_BYTES = (bytes, type(None))
NUMBER = (float, int)
OPTIONAL_INT = (int, type(None))

REQUIRED = True
OPTIONAL = False

Schema = dict[str, tuple[object, bool]]  # field -> (the types it may have, required)

SIBLING = {
    "value": (OPTIONAL_BYTES, REQUIRED),  # None: the value follows as CHUNK frames
    "length": (INT, REQUIRED),
    "deleted": (BOOL, REQUIRED),
}

FREE_FORM: dict = {}
"""Schema of bodies that are only checked to be maps (the cluster layer defines them)."""

SCHEMA: dict[MsgType, Schema] = {
    MsgType.HELLO: {
        "versions": (ListOf(INT), REQUIRED),
        "role": (STR, REQUIRED),  # "client" | "peer"
        "token": (STR, OPTIONAL),
        "node": (STR, OPTIONAL),
        "nonce": (BYTES, OPTIONAL),
        "cluster": (STR, OPTIONAL),
        "proof": (BYTES, OPTIONAL),  # peer's answer to HELLO_OK's challenge (second HELLO)
    },
    MsgType.HELLO_OK: {
        "version": (INT, REQUIRED),
        "node": (STR, REQUIRED),
        "max_frame": (INT, REQUIRED),
        "nonce": (BYTES, OPTIONAL),
        "proof": (BYTES, OPTIONAL),
    },
    MsgType.ERROR: {
        "code": (STR, REQUIRED),
        "message": (STR, REQUIRED),
    },
    MsgType.GET: {
        "key": (BYTES, REQUIRED),
        "r": (INT, OPTIONAL),
        "n": (INT, OPTIONAL),
    },
    MsgType.GET_REPLY: {
        "key": (BYTES, REQUIRED),
        "found": (BOOL, REQUIRED),
        "context": (BYTES, REQUIRED),
        "siblings": (ListOf(SIBLING), REQUIRED),
        "replicas": (INT, OPTIONAL),
    },
    MsgType.PUT: {
        "key": (BYTES, REQUIRED),
        "context": (BYTES, OPTIONAL),  # absent: supersede what the coordinator reads
        "blind": (BOOL, OPTIONAL),  # true: add a sibling, supersede nothing
        "length": (INT, REQUIRED),
        "value": (BYTES, OPTIONAL),  # absent: CHUNK frames follow, the last with FLAG_END
        "n": (INT, OPTIONAL),
        "w": (INT, OPTIONAL),
    },
    MsgType.PUT_REPLY: {
        "context": (BYTES, REQUIRED),
        "siblings": (INT, REQUIRED),
        "replicas": (INT, REQUIRED),
    },
    MsgType.DELETE: {  # answered by PUT_REPLY
        "key": (BYTES, REQUIRED),
        "context": (BYTES, OPTIONAL),
        "blind": (BOOL, OPTIONAL),
        "n": (INT, OPTIONAL),
        "w": (INT, OPTIONAL),
    },
    MsgType.STATUS: {},
    MsgType.STATUS_REPLY: {
        "node": (STR, REQUIRED),
        "nodes": (ListOf(MAP), REQUIRED),
    },
    MsgType.INSPECT: {
        "key": (BYTES, REQUIRED),
    },
    MsgType.INSPECT_REPLY: {
        "key": (BYTES, REQUIRED),
        "partition": (INT, REQUIRED),
        "replicas": (ListOf(MAP), REQUIRED),
    },
    MsgType.PING: {},
    MsgType.PONG: {},
    MsgType.REPLICA_GET: {"op": (STR, REQUIRED)},  # and OPS below
    MsgType.REPLICA_GET_REPLY: FREE_FORM,
    MsgType.REPLICA_PUT: {"op": (STR, REQUIRED)},
    MsgType.REPLICA_PUT_REPLY: FREE_FORM,
    MsgType.GOSSIP: FREE_FORM,  # kvd.node.gossip checks it (BadRequest on anything wrong)
    MsgType.GOSSIP_REPLY: FREE_FORM,
    MsgType.ADMIN: {"op": (STR, REQUIRED)},
    MsgType.ADMIN_REPLY: FREE_FORM,
}
"""Body schema of every map-bodied type: field -> (type, required)."""

_KEY: Schema = {"key": (BYTES, REQUIRED)}
_OBJECT = {  # an object inline, or staged on the receiver by earlier chunk requests
    "object": (OPTIONAL_BYTES, OPTIONAL),
    "staged": (Tuple((BYTES, INT)), OPTIONAL),  # [vid, length]
}
PAYLOAD = {  # what a coordinating replica writes (kvd.node.remote.encode_payload)
    "deleted": (BOOL, REQUIRED),
    "timestamp": (NUMBER, REQUIRED),
    "value": (BYTES, OPTIONAL),
    "chunks": (Tuple((BYTES, INT, INT)), OPTIONAL),  # [vid, length, count]
    "wid": (BYTES, OPTIONAL),
}
_NOTHING: dict = {}

OPS: dict[MsgType, dict[str, Schema]] = {
    MsgType.REPLICA_GET: {
        "get": _KEY,
        "digest": _KEY,  # 8 bytes that tell whether the replica holds the object a read saw
        "blob": {**_KEY, "vid": (BYTES, REQUIRED), "offset": (INT, REQUIRED),
                 "size": (INT, REQUIRED)},
        # Either after + limit (a page of keys) or within + offset (a piece of one object).
        "scan": {"partition": (INT, REQUIRED), "after": (BYTES, OPTIONAL),
                 "limit": (INT, OPTIONAL), "within": (OPTIONAL_BYTES, OPTIONAL),
                 "offset": (INT, OPTIONAL), "max_bytes": (OPTIONAL_INT, OPTIONAL)},
        "aae-root": {"partition": (INT, REQUIRED)},
        "aae-branches": {"partition": (INT, REQUIRED)},
        "aae-segments": {"partition": (INT, REQUIRED), "branch": (INT, REQUIRED)},
        "aae-keys": {"partition": (INT, REQUIRED), "segment": (INT, REQUIRED),
                     "after": (OPTIONAL_BYTES, OPTIONAL)},
        # One replica's live keys of a partition, for a coverage query (kvd.node.coverage).
        "keys": {"partition": (INT, REQUIRED), "after": (BYTES, REQUIRED),
                 "prefix": (BYTES, REQUIRED), "limit": (INT, REQUIRED)},
    },
    MsgType.REPLICA_PUT: {
        "coordinate": {**_KEY, "context": (BYTES, REQUIRED), "payload": (PAYLOAD, REQUIRED)},
        "merge": {**_KEY, **_OBJECT},
        "hint": {**_KEY, **_OBJECT, "for": (STR, REQUIRED)},
        "chunk": {**_KEY, "vid": (BYTES, REQUIRED), "offset": (INT, REQUIRED),
                  "data": (BYTES, REQUIRED)},
        "discard": {**_KEY, "vid": (BYTES, REQUIRED)},
        "aae-purge": {"partition": (INT, REQUIRED),
                      "tombstones": (ListOf(Tuple((BYTES, BYTES))), REQUIRED)},
    },
    MsgType.ADMIN: {
        # client port (kvctl cluster ...)
        "join": {"seed": (STR, REQUIRED)},
        "leave": {"node": (STR, OPTIONAL)},
        "force-remove": {"node": (STR, OPTIONAL)},
        "replace": {"node": (STR, REQUIRED), "target": (STR, REQUIRED)},
        "plan": _NOTHING, "commit": _NOTHING, "abort": _NOTHING, "clear": _NOTHING,
        "ring": _NOTHING,
        "repair": {"partition": (OPTIONAL_INT, OPTIONAL), "wait": (BOOL, OPTIONAL),
                   "verify": (BOOL, OPTIONAL)},
        # A page of the coverage query (kvctl keys): from (partition, after) on.
        "keys": {"partition": (INT, OPTIONAL), "after": (BYTES, OPTIONAL),
                 "prefix": (BYTES, OPTIONAL), "limit": (INT, OPTIONAL)},
        "backup": _NOTHING,  # answered by ADMIN_REPLY, then CHUNK frames (kvd/node/backup.py)
        # both ports
        "transfers": _NOTHING,
        # peer port
        "stage-join": {"node": (STR, REQUIRED), "address": (STR, REQUIRED),
                       "peer_address": (STR, REQUIRED)},
        "state": _NOTHING,
    },
}
"""Body schema of each operation of the types that have them: type -> op -> fields."""

RAW_BODY: frozenset[MsgType] = frozenset({MsgType.CHUNK})
"""Types whose body is raw bytes rather than a msgpack map."""

ALLOWED_FLAGS: dict[MsgType, int] = {MsgType.CHUNK: FLAG_END}
"""Flag bits each type may carry; a type not listed carries none."""


def validate_key(key: object) -> bytes:
    """Return ``key`` if it is 1..1024 bytes, else raise BadRequest (an answerable error)."""
    if not isinstance(key, bytes):
        raise BadRequest(f"key must be bytes, got {type(key).__name__}")
    if not 1 <= len(key) <= MAX_KEY_LEN:
        raise BadRequest(f"key must be 1..{MAX_KEY_LEN} bytes, got {len(key)}")
    return key
