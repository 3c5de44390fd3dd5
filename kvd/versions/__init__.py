"""Dotted version vectors, one import for their callers: the rules and their bytes.

``kvd.versions.causality`` holds the causal rules (clocks, siblings, ``update`` for a write,
``sync`` for a merge, write ids); ``kvd.versions.encoding`` the bytes (stored objects,
contexts, sealed contexts). Both are pure; this package re-exports their public names, so
callers write ``versions.update`` and ``versions.encode_object`` alike.
"""

from __future__ import annotations

from kvd.versions.causality import (
    MAX_COUNTER,
    SIBLING_LIMIT,
    SIBLING_WARN,
    ChunkRef,
    Context,
    Dot,
    Sibling,
    VersionedObject,
    VersionVector,
    conflicting_dots,
    context_of,
    covers,
    descends,
    empty,
    is_found,
    live,
    merge_vv,
    needs_warning,
    next_counter,
    sync,
    sync_with_discarded,
    update,
)
from kvd.versions.encoding import (
    context_from_text,
    decode_context,
    decode_object,
    digest,
    encode_context,
    encode_object,
    object_digest,
    open_context,
    seal_context,
)

__all__ = [
    "MAX_COUNTER",
    "SIBLING_LIMIT",
    "SIBLING_WARN",
    "ChunkRef",
    "Context",
    "Dot",
    "Sibling",
    "VersionVector",
    "VersionedObject",
    "conflicting_dots",
    "context_from_text",
    "context_of",
    "covers",
    "decode_context",
    "decode_object",
    "descends",
    "digest",
    "empty",
    "encode_context",
    "encode_object",
    "is_found",
    "live",
    "merge_vv",
    "needs_warning",
    "next_counter",
    "object_digest",
    "open_context",
    "seal_context",
    "sync",
    "sync_with_discarded",
    "update",
]
