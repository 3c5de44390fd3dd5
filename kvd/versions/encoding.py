"""The bytes of version vectors: stored objects, contexts, and the sealed contexts clients carry.

The causal rules (what a write supersedes, how replicas merge) are kvd.versions.causality's;
this module only turns its values into bytes and back, and refuses bytes that are not one.
Pure: no trio, no plyvel, no clock reads.

Rules:

- Rule 1: encodings are deterministic, so equal objects encode to equal bytes and
  ``digest`` compares replicas.
- Rule 2: decoding checks sizes before unpacking and every invariant of causality after it;
  anything malformed raises (``BadRequest`` for what a client sent, ``ValueError`` for a
  stored or replicated object), nothing else.
- Rule 3: a client's context is accepted only sealed under the cluster's key and for its
  key (``open_context``); the plain forms travel between nodes only.

Encodings (msgpack). The object is ``[1, [actor, counter, ...], [sibling, ...]]``
with the clock as a flat list sorted by actor. A sibling is ``[actor_index, counter, value,
deleted, timestamp]``, plus ``vid, length, count`` when chunked, plus ``[wid, aliases,
supersedes]`` last when any is set (aliases as a flat ``[actor_index, counter, ...]``);
``actor_index`` points into the clock's actor list, so long actor ids are stored once. A context is the flat sorted clock
list alone, and b"" for the empty vector.

Contexts that clients carry are sealed (issue 10, hole 2). Because a context is trusted (a
write supersedes whatever it covers), a hand-built one could replace values its writer never
read, or push a counter to the edge of the integer range and make a key unwritable. So the
context a client sees is ``seal_context``: a format byte, the encoded clock and a 16-byte
keyed BLAKE2b tag over the format, the object's key and the clock, under a key every node
of the cluster derives from the cluster secret (``kvd.security.context_key``).
``open_context`` refuses anything whose tag does not verify: forged, altered, or minted for
another key. Nodes exchange the plain ``encode_context`` form, over authenticated peer
connections. Every counter, here and in objects, is at most ``MAX_COUNTER`` (2**53, far
below 2**63 and exact in a double), and ``update`` refuses to mint past it, so no clock can
overflow anything.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import math
import re
import threading

import msgpack

from kvd.errors import BadRequest
from kvd.versions.causality import (
    MAX_COUNTER,
    SIBLING_LIMIT,
    ChunkRef,
    Context,
    Dot,
    Sibling,
    VersionedObject,
    VersionVector,
)

__all__ = [
    "decode_context",
    "decode_object",
    "digest",
    "encode_context",
    "encode_object",
    "encode_sibling_alone",
    "context_from_text",
    "context_to_text",
    "open_context",
    "seal_context",
]

_FORMAT = 1  # first element of an encoded object; bump for an incompatible layout
_MAX_ACTOR_LEN = 1024  # an actor id is "<node_id>:<incarnation>"; far below this
_MAX_CONTEXT_BYTES = 256 * 1024  # a client-supplied context is checked before unpacking
_MAX_CONTEXT_ACTORS = 16384
_SEAL_FORMAT = b"\x01"  # first byte of a sealed context; bump for an incompatible change
_TAG_SIZE = 16


# -- encoding ---------------------------------------------------------------------------------

# One Packer per thread: creating one per call costs about as much as the packing itself, and
# a Packer is not safe to share between threads (storage may run in worker threads).
_local = threading.local()


def _packer() -> msgpack.Packer:
    try:
        return _local.packer
    except AttributeError:
        packer = _local.packer = msgpack.Packer(use_bin_type=True)
        return packer


def _flat_clock(vv: VersionVector) -> list:
    flat: list = []
    for actor in sorted(vv):
        flat.append(actor)
        flat.append(vv[actor])
    return flat


def encode_context(vv: VersionVector) -> bytes:
    """The opaque context clients carry: compact, deterministic; b"" for the empty vector.
    A ``Context`` that names write ids packs as ``[flat clock, sorted write ids]``."""
    if not vv:
        return b""
    wids = sorted(getattr(vv, "wids", ()))
    return _packer().pack([_flat_clock(vv), wids] if wids else _flat_clock(vv))


def decode_context(data: bytes) -> VersionVector:
    """Inverse of ``encode_context``. Anything malformed raises ``BadRequest``, nothing else."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise BadRequest("malformed context: expected bytes")
    if len(data) == 0:
        return {}
    if len(data) > _MAX_CONTEXT_BYTES:
        raise BadRequest(f"malformed context: {len(data)} bytes (limit {_MAX_CONTEXT_BYTES})")
    try:
        flat = msgpack.unpackb(
            data,
            raw=False,
            max_str_len=_MAX_ACTOR_LEN,
            max_bin_len=_MAX_WID,
            max_array_len=2 * _MAX_CONTEXT_ACTORS,
            max_map_len=0,
            max_ext_len=0,
        )
    except Exception:
        raise BadRequest("malformed context: not a context this cluster issued") from None
    wids: list = []
    if type(flat) is list and len(flat) == 2 and type(flat[0]) is list:
        flat, wids = flat  # a clock with the write ids it saw (rule 7)
        if (type(wids) is not list or len(wids) > SIBLING_LIMIT
                or any(type(w) is not bytes or not w for w in wids)):
            raise BadRequest("malformed context: bad write ids")
    try:
        return Context(_parse_clock(flat), wids)
    except ValueError as e:
        raise BadRequest(f"malformed context: {e}") from None


def _tag(secret_key: bytes, key: bytes, body: bytes) -> bytes:
    mac = hashlib.blake2b(key=secret_key, digest_size=_TAG_SIZE, person=b"kvd-context")
    mac.update(len(key).to_bytes(4, "big"))  # length-prefixed: no ambiguous splits
    mac.update(key)
    mac.update(body)
    return mac.digest()


def seal_context(secret_key: bytes, key: bytes, vv: VersionVector) -> bytes:
    """The context a client gets for ``key``: unforgeable without ``secret_key`` (at most
    64 bytes, ``kvd.security.context_key``). The empty vector seals too: it is what a reader
    of an absent key saw (nothing), unlike no context at all
    (kvd.node.coordinator rule 7: supersede what a read finds)."""
    body = _SEAL_FORMAT + encode_context(vv)
    return body + _tag(secret_key, key, body)


def open_context(secret_key: bytes, key: bytes, data: object) -> VersionVector:
    """The vector of a context a client sent with a write of ``key``. Raises ``BadRequest``
    (and nothing else) unless ``seal_context`` made it, with this key, for this key."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise BadRequest("malformed context: expected bytes")
    data = bytes(data)
    if not data:
        return {}
    if len(data) < 1 + _TAG_SIZE or data[:1] != _SEAL_FORMAT:
        raise BadRequest("malformed context: not a context this cluster issued "
                         "(use the context of a GET or PUT reply, unchanged)")
    body, tag = data[:-_TAG_SIZE], data[-_TAG_SIZE:]
    if not hmac.compare_digest(tag, _tag(secret_key, key, body)):
        raise BadRequest("forged or altered context: it was not issued for this key by this "
                         "cluster (use the context of a GET or PUT reply of the same key)")
    return decode_context(body[1:])


_CONTEXT_TEXT = re.compile(rb"[A-Za-z0-9_-]+")


def context_to_text(context: bytes) -> str:
    """A sealed context as clients see it (kvctl, KV.GET): unpadded base64url."""
    return base64.urlsafe_b64encode(context).decode().rstrip("=")


def context_from_text(text: str | bytes) -> bytes:
    """The sealed context a client typed, from the unpadded base64url that kvctl and KV.GET
    print (correct ``=`` padding is accepted too). Anything else raises ValueError: a
    lenient decoder drops characters outside the alphabet, so ``!!!`` became the empty
    context, "no context", and a write with it replaced every sibling. A sealed context
    is never empty, so neither is its text."""
    try:
        data = text.encode("ascii") if isinstance(text, str) else bytes(text)
    except UnicodeEncodeError:
        raise ValueError("a context is base64url text") from None
    body = data.rstrip(b"=")
    padding = len(data) - len(body)
    if (not _CONTEXT_TEXT.fullmatch(body) or len(body) % 4 == 1
            or padding not in (0, -len(body) % 4)):
        raise ValueError("a context is base64url text")
    return base64.urlsafe_b64decode(body + b"=" * (-len(body) % 4))


def _parse_clock(flat: object) -> VersionVector:
    """A validated vector from its flat sorted form; ValueError when malformed."""
    if type(flat) is not list or len(flat) % 2:
        raise ValueError("expected a flat list of actor, counter pairs")
    if len(flat) > 2 * _MAX_CONTEXT_ACTORS:
        raise ValueError(f"more than {_MAX_CONTEXT_ACTORS} actors")
    vv: VersionVector = {}
    previous = None
    for i in range(0, len(flat), 2):
        actor = flat[i]
        counter = flat[i + 1]
        if type(actor) is not str or not actor:
            raise ValueError("actor is not a non-empty string")
        if previous is not None and actor <= previous:
            raise ValueError("actors not strictly sorted")
        if type(counter) is not int or not 1 <= counter <= MAX_COUNTER:
            raise ValueError(f"bad counter for actor {actor!r}")
        vv[actor] = counter
        previous = actor
    return vv


def _encode_sibling(s: Sibling, index: dict[str, int]) -> list:
    actor, counter = s.dot
    try:
        i = index[actor]
    except KeyError:
        raise ValueError(f"sibling dot {s.dot!r} is not covered by the object's clock") from None
    # float(...) + 0.0 turns ints into floats and -0.0 into 0.0, so equal objects pack equal.
    timestamp = float(s.timestamp) + 0.0
    ref = s.chunks
    out = [i, counter, s.value, s.deleted, timestamp]
    if ref is not None:
        out += [ref.vid, ref.length, ref.count]
    if s.wid or s.aliases or s.supersedes:
        aliases: list = []
        for actor_, counter_ in s.aliases:
            aliases += [index[actor_], counter_]
        out.append([s.wid, aliases, list(s.supersedes)])
    return out


def encode_sibling_alone(s: Sibling) -> bytes:
    actors = sorted({s.dot[0], *(actor for actor, _ in s.aliases)})
    index = {actor: i for i, actor in enumerate(actors)}
    return _packer().pack([actors, _encode_sibling(s, index)])


def encode_object(obj: VersionedObject) -> bytes:
    """The object as stored and sent between nodes: compact msgpack, same object same bytes."""
    clock = obj.clock
    actors = sorted(clock)
    flat: list = []
    index: dict[str, int] = {}
    for i, actor in enumerate(actors):
        flat.append(actor)
        flat.append(clock[actor])
        index[actor] = i
    siblings = [_encode_sibling(s, index) for s in obj.siblings]
    return _packer().pack([_FORMAT, flat, siblings])


def decode_object(data: bytes) -> VersionedObject:
    """Inverse of ``encode_object``; raises ValueError on anything it did not produce."""
    try:
        top = msgpack.unpackb(
            data,
            raw=False,
            max_str_len=_MAX_ACTOR_LEN,
            max_map_len=0,
            max_ext_len=0,
        )
    except Exception as e:
        raise ValueError(f"malformed object: {e}") from None
    if type(top) is not list or len(top) != 3 or type(top[0]) is not int:
        raise ValueError("malformed object: not an encoded VersionedObject")
    if top[0] != _FORMAT:
        raise ValueError(f"malformed object: unknown format {top[0]}")
    flat, raw_siblings = top[1], top[2]
    try:
        clock = _parse_clock(flat)
    except ValueError as e:
        raise ValueError(f"malformed object clock: {e}") from None
    if type(raw_siblings) is not list:
        raise ValueError("malformed object: siblings are not a list")
    actors = flat[0::2]
    siblings = []
    previous: Dot | None = None
    for raw in raw_siblings:
        sibling = _decode_sibling(raw, actors, clock)
        if previous is not None and sibling.dot <= previous:
            raise ValueError("malformed object: siblings not strictly sorted by dot")
        previous = sibling.dot
        siblings.append(sibling)
    return VersionedObject(clock, tuple(siblings))


def _decode_sibling(raw: object, actors: list, clock: VersionVector) -> Sibling:
    if type(raw) is not list or len(raw) not in (5, 6, 8, 9):
        raise ValueError("malformed sibling: not a 5, 6, 8 or 9 element list")
    wid, aliases, supersedes = b"", (), ()
    if len(raw) in (6, 9):  # write id, aliases and superseded write ids come last (rule 7)
        wid, aliases, supersedes = _decode_write(raw[-1], actors, clock)
        raw = raw[:-1]
    i, counter, value, deleted, timestamp = raw[:5]
    if type(i) is not int or not 0 <= i < len(actors):
        raise ValueError("malformed sibling: actor index out of range")
    actor = actors[i]
    if type(counter) is not int or not 1 <= counter <= clock[actor]:
        raise ValueError("malformed sibling: dot not covered by the clock")
    if (type(value) is not bytes or type(deleted) is not bool or type(timestamp) is not float
            or not math.isfinite(timestamp)):  # NaN is unequal to itself: no stable object
        raise ValueError("malformed sibling: bad value, deleted flag or timestamp")
    chunks = None
    if len(raw) == 8:
        vid, length, count = raw[5:]
        if type(vid) is not bytes or not vid:
            raise ValueError("malformed sibling: bad chunk upload id")
        if (type(length) is not int or type(count) is not int
                or not 0 <= length <= MAX_COUNTER or not 0 <= count <= MAX_COUNTER):
            raise ValueError("malformed sibling: bad chunk length or count")
        if value:
            raise ValueError("malformed sibling: chunked value with inline bytes")
        chunks = ChunkRef(vid, length, count)
    if deleted and (value or chunks is not None):
        raise ValueError("malformed sibling: tombstone with a value")
    return Sibling((actor, counter), value, deleted, chunks, timestamp, wid, aliases, supersedes)


_MAX_WID = 64


def _decode_write(raw: object, actors: list, clock: VersionVector):
    if type(raw) is not list or len(raw) != 3:
        raise ValueError("malformed sibling: bad write id record")
    wid, flat, supersedes = raw
    if type(wid) is not bytes or len(wid) > _MAX_WID:
        raise ValueError("malformed sibling: bad write id")
    if type(flat) is not list or len(flat) % 2 or len(flat) > 2 * SIBLING_LIMIT:
        raise ValueError("malformed sibling: bad aliases")
    aliases = []
    for i, counter in zip(flat[0::2], flat[1::2]):
        if type(i) is not int or not 0 <= i < len(actors):
            raise ValueError("malformed sibling: alias actor index out of range")
        if type(counter) is not int or not 1 <= counter <= clock[actors[i]]:
            raise ValueError("malformed sibling: alias not covered by the clock")
        aliases.append((actors[i], counter))
    if (type(supersedes) is not list or len(supersedes) > SIBLING_LIMIT
            or any(type(w) is not bytes or not w or len(w) > _MAX_WID for w in supersedes)):
        raise ValueError("malformed sibling: bad superseded write ids")
    if aliases != sorted(set(aliases)) or supersedes != sorted(set(supersedes)):
        raise ValueError("malformed sibling: aliases or superseded ids not sorted")
    return wid, tuple(aliases), tuple(supersedes)


def object_digest(obj: VersionedObject) -> bytes:
    """The digest a replica answers a digest read with: blake2b of the encoding, as
    anti-entropy's (kvd.node.local), so equal objects have equal digests."""
    return hashlib.blake2b(encode_object(obj), digest_size=8).digest()


def digest(obj: VersionedObject) -> str:
    """A short hex digest of the encoded object, to see at a glance whether replicas agree."""
    return hashlib.blake2b(encode_object(obj), digest_size=8).hexdigest()
