"""The client side of the native protocol without I/O: request bodies and result types.

kvd.client (trio, many requests on one connection) and kvd.blocking_client (plain sockets,
for kvctl's fast start) build the same request bodies and return the same results from
here, so the two cannot drift apart. Standard library only.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import IO, Any

__all__ = ["DEFAULT_ADDRESS", "GetResult", "PutResult", "Sibling", "get_fields", "put_fields",
           "put_result", "write_fields"]

DEFAULT_ADDRESS = "127.0.0.1:7379"  # a node's default client port (kvd.config's listen)


@dataclass
class Sibling:
    value: bytes
    deleted: bool
    length: int


@dataclass
class GetResult:
    key: bytes
    found: bool
    context: bytes
    siblings: list[Sibling] = field(default_factory=list)
    replicas: int = 0


@dataclass
class PutResult:
    context: bytes
    siblings: int
    replicas: int


def _options(fields: dict[str, Any], **given: Any) -> dict[str, Any]:
    """Add the optional fields that were given (None: let the node use its default)."""
    fields.update((name, value) for name, value in given.items() if value is not None)
    return fields


def get_fields(key: bytes, *, r: int | None = None, n: int | None = None) -> dict[str, Any]:
    return _options({"key": key}, r=r, n=n)


def write_fields(key: bytes, *, context: bytes | None, blind: bool, n: int | None,
                 w: int | None) -> dict[str, Any]:
    """The body of a DELETE, and of a PUT before its value fields. Without a context the
    node reads the key and supersedes it; ``blind`` adds a sibling instead."""
    if context and blind:
        raise ValueError("a write has a context or is blind, not both")
    fields = _options({"key": key}, context=context or None, n=n, w=w)
    if blind:
        fields["blind"] = True
    return fields


def put_length(value: bytes | None, source: IO[bytes] | None, length: int | None) -> int:
    """The bytes a PUT carries: ``value``'s, or ``length`` (default: the size of the file
    ``source``). ValueError unless exactly one of value and source is given."""
    if (value is None) == (source is None):
        raise ValueError("give exactly one of value and source")
    if value is not None:
        return len(value)
    assert source is not None
    return os.fstat(source.fileno()).st_size if length is None else length


def put_fields(key: bytes, length: int, **write: Any) -> dict[str, Any]:
    """A PUT's body without its value: the caller adds ``value`` or streams CHUNK frames."""
    return {**write_fields(key, **write), "length": length}


def put_result(fields: dict) -> PutResult:
    """A PUT_REPLY (also the answer to DELETE) as a result."""
    return PutResult(fields["context"], fields["siblings"], fields["replicas"])
