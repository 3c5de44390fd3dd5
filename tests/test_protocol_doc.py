"""docs/protocol.md's message tables against the schemas the codec enforces.

Third-party client authors write against the doc; the codec enforces kvd.proto.messages
(``SCHEMA`` per type, ``OPS`` per operation). These tests parse the doc's tables and
compare field names and which are optional (``?``), so the two cannot drift apart again.
GOSSIP's body is the gossiper's (a free-form map to the codec): it is compared with what a
gossiper really sends.
"""

from __future__ import annotations

import re
from pathlib import Path

import trio

from kvd.membership.cluster_state import new_cluster
from kvd.membership.members import MemberInfo, MemberTable
from kvd.node.gossip import Gossiper
from kvd.proto.messages import FREE_FORM, OPS, RAW_BODY, SCHEMA, MsgType

DOC = (Path(__file__).resolve().parent.parent / "docs" / "protocol.md").read_text()


def table(heading: str) -> list[list[str]]:
    """The cells of the rows of the first table after the line that starts with ``heading``."""
    lines = DOC[DOC.index("\n" + heading) + 1:].splitlines()[1:]
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    rows = []
    for line in lines[start + 2:]:  # past the header and its |---| line
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    assert rows, f"no table after {heading!r}"
    return rows


def documented(cell: str) -> dict[str, bool]:
    """Field name -> required, from a cell like "`key`: bytes; `r`?: int", top level
    only (what is inside {...} is a nested map's, see ``nested``)."""
    flat = re.sub(r"\{[^}]*\}", "", cell)
    return {m[1]: not m[2] for m in re.finditer(r"`([a-z_]+)`(\?)?", flat)}


def nested(cell: str, name: str) -> dict[str, bool]:
    match = re.search(rf"`{name}`\??: \{{([^}}]*)\}}", cell)
    assert match, f"{name} is not described as a map in {cell!r}"
    return documented(match[1])


def schema(fields: dict) -> dict[str, bool]:
    return {name: required for name, (_, required) in fields.items()}


def test_client_messages_table_matches_the_schemas() -> None:
    rows = table("### Client messages")
    assert [int(r[0]) for r in rows] == list(range(1, 16))
    for number, name, _, cell in rows:
        kind = MsgType(int(number))
        assert name == kind.name
        if kind in RAW_BODY:
            continue
        assert documented(cell) == schema(SCHEMA[kind]), f"{name}: docs/protocol.md vs SCHEMA"


def _operations() -> dict[tuple[MsgType, str], list[str]]:
    """(type, op) -> the Fields cells of its rows, from the peer table and the client
    port's ADMIN table (an operation may have several rows: scan's two modes)."""
    found: dict[tuple[MsgType, str], list[str]] = {}
    for number, name, op, cell, _ in table("### Peer messages"):
        kind = MsgType(int(number))
        assert name.split()[0] == kind.name
        if kind in OPS:
            found.setdefault((kind, op.strip("`")), []).append(cell)
    for op, cell, _ in table("**ADMIN on the client port.**"):
        found.setdefault((MsgType.ADMIN, op.strip("`")), []).append(cell)
    return found


def test_every_operation_is_documented_with_its_fields() -> None:
    found = _operations()
    assert set(found) == {(kind, op) for kind in OPS for op in OPS[kind]}
    for (kind, op), cells in found.items():
        rows = [documented(cell) for cell in cells]
        names = set().union(*rows)
        # Required: named without "?" in every row that describes the operation.
        doc = {n: all(row.get(n, False) for row in rows) for n in names}
        assert doc == schema(OPS[kind][op]), f"{kind.name} {op}: docs/protocol.md vs OPS"
        for name, (spec, _) in OPS[kind][op].items():
            if isinstance(spec, dict):
                assert nested(cells[0], name) == schema(spec), f"{kind.name} {op} {name}"


def test_gossip_row_names_what_a_gossiper_sends() -> None:
    sent: list[dict] = []

    async def request(address, kind, fields, expect):
        sent.append(fields)
        return {"node": "b", "members": []}

    me = MemberInfo("a", "a:1", "a:2", 1, 0)
    gossiper = Gossiper(MemberTable(me), request, state=new_cluster("a", 8, "c"),
                        clock=lambda: 0.0)
    trio.run(gossiper.exchange, "b:2")  # a first exchange carries the whole state
    (row,) = [r for r in table("### Peer messages") if r[1] == "GOSSIP"]
    doc = documented(row[3])
    assert set(sent[0]) == set(doc)
    assert {n for n, required in doc.items() if required} == {"node", "members"}
    assert SCHEMA[MsgType.GOSSIP] is FREE_FORM  # the gossiper checks it, not the codec
