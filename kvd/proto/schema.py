"""The body checks of the wire protocol: kvd.proto.messages' schemas compiled into checkers.

The codec (kvd.proto.codec) checks every body it encodes or decodes with ``ENCODE_CHECKS``
or ``DECODE_CHECKS``, indexed by message type. Each check returns None when the body fits,
or a short description of what is wrong.

Rules:

- Rule 1: compiled once, at import: checking a body walks closures, never the schema.
- Rule 2: decoding checks exact types (msgpack produces nothing else, and bool must not pass
  for int); encoding also accepts what msgpack packs the same way (bytearray/memoryview as
  bin, tuple as array, int/str subclasses).
- Rule 3: a type with operations is checked against its fields, then its operation's
  (kvd.proto.messages rule 5); an operation the table does not know passes, for its
  handler to refuse.
- Rule 4: every type but the raw-bodied ones has a schema; an import fails otherwise.

Like the codec, this module imports neither trio nor plyvel.
"""

from __future__ import annotations

from kvd.proto.messages import OPS, RAW_BODY, SCHEMA, ListOf, MsgType, Tuple

__all__ = ["DECODE_CHECKS", "ENCODE_CHECKS", "type_name"]

_MISSING = object()
_TYPE_NAMES = {
    bytes: "bytes",
    bytearray: "bytes",
    memoryview: "bytes",
    str: "str",
    int: "int",
    bool: "bool",
    float: "float",
    dict: "map",
    list: "list",
    tuple: "list",
    type(None): "nil",
}
_WIDER = {bytes: (bytearray, memoryview), list: (tuple,)}


def type_name(value: object) -> str:
    """How a value's type is called in the protocol's words (bytes, str, map, list, nil)."""
    return _TYPE_NAMES.get(type(value), type(value).__name__)


def _compile(spec, widen: bool):
    """Return a checker for one schema type: value -> None, or what is wrong."""
    if isinstance(spec, ListOf):
        return _compile_list(spec, widen)
    if isinstance(spec, Tuple):
        return _compile_tuple(spec, widen)
    if isinstance(spec, dict):
        return _compile_map(spec, widen)
    allowed = set(spec)
    if widen:
        for t in spec:
            allowed.update(_WIDER.get(t, ()))
    exact = frozenset(allowed)
    expected = "expected " + " or ".join(_TYPE_NAMES[t] for t in spec)
    subclass_ok = tuple(exact) if widen else ()
    allow_bool = bool in exact

    def check_types(value):
        if type(value) in exact:
            return None
        if (
            subclass_ok
            and isinstance(value, subclass_ok)
            and (allow_bool or not isinstance(value, bool))
        ):
            return None
        return f"{expected}, got {type_name(value)}"

    return check_types


def _compile_list(spec: ListOf, widen: bool):
    check_item = _compile(spec.item, widen)
    containers = (list, tuple) if widen else (list,)

    def check_list(value):
        if type(value) not in containers and not (widen and isinstance(value, containers)):
            return f"expected list, got {type_name(value)}"
        for i, item in enumerate(value):
            problem = check_item(item)
            if problem is not None:
                return f"item {i}: {problem}"
        return None

    return check_list


def _compile_tuple(spec: Tuple, widen: bool):
    checks = tuple(_compile(item, widen) for item in spec.items)
    containers = (list, tuple) if widen else (list,)

    def check_tuple(value):
        if type(value) not in containers and not (widen and isinstance(value, containers)):
            return f"expected list, got {type_name(value)}"
        if len(value) != len(checks):
            return f"expected a list of {len(checks)} items, got {len(value)}"
        for i, (check, item) in enumerate(zip(checks, value)):
            problem = check(item)
            if problem is not None:
                return f"item {i}: {problem}"
        return None

    return check_tuple


def _compile_map(schema: dict, widen: bool):
    check_fields = _compile_fields(schema, widen)

    def check_map(value):
        if type(value) is not dict and not (widen and isinstance(value, dict)):
            return f"expected map, got {type_name(value)}"
        return check_fields(value)

    return check_map


def _compile_fields(schema: dict, widen: bool):
    compiled = tuple(
        (name, required, _compile(spec, widen)) for name, (spec, required) in schema.items()
    )

    def check_fields(fields: dict):
        for name, required, check in compiled:
            value = fields.get(name, _MISSING)
            if value is _MISSING:
                if required:
                    return f"missing required field {name!r}"
                continue
            problem = check(value)
            if problem is not None:
                return f"field {name!r}: {problem}"
        return None

    return check_fields


def _compile_body(type: MsgType, widen: bool):
    """The check of a whole body: its type's fields, then its operation's (Rule 5 of
    kvd.proto.messages) when the type has operations."""
    check_fields = _compile_fields(SCHEMA[type], widen)
    if type not in OPS:
        return check_fields
    by_op = {op: _compile_fields(schema, widen) for op, schema in OPS[type].items()}

    def check_op(fields: dict):
        problem = check_fields(fields)
        if problem is not None:
            return problem
        op = fields["op"]
        check = by_op.get(op)
        if check is None:
            return None  # the handler refuses an operation it does not know
        problem = check(fields)
        return None if problem is None else f"{op[:32]!r} {problem}"

    return check_op


DECODE_CHECKS = {t: _compile_body(t, widen=False) for t in SCHEMA}
ENCODE_CHECKS = {t: _compile_body(t, widen=True) for t in SCHEMA}
assert set(SCHEMA) | RAW_BODY == set(MsgType) and not set(SCHEMA) & RAW_BODY
