"""kvctl keys: list every key of the cluster through the coverage query (kvd.node.coverage).

Keys stream out page by page as the cluster walks its partitions, each partition read from
one live replica, as Riak's list-keys does. It is a full scan of the cluster: a warning on
stderr says so. One key per line (exact bytes in a pipe, escaped on a terminal as
redis-cli does), or ``--json``: one ``{"key", "encoding"}`` object per line. The walk is an
``async def``, so it gets the trio client (kvctl.common.call): a full scan is no place to
save start-up time.
"""

from __future__ import annotations

import json
import sys
from typing import Annotated, Optional

import typer

from kvctl import render
from kvctl.common import call, fail, options

PAGE = 1000


def keys(
    prefix: Annotated[Optional[str], typer.Option("--prefix", metavar="P",
                                                  help="Only keys starting with P.")] = None,
    limit: Annotated[Optional[int], typer.Option("--limit", min=1, metavar="N",
                                                 help="Stop after N keys.")] = None,
) -> None:
    """List keys (a full scan of the cluster: every partition is read)."""
    from kvd.proto.messages import MAX_KEY_LEN  # here: kvctl's other commands start faster

    # Bytes as KEY takes them: a shell's $'\xff' arrives as a surrogate escape.
    wanted = (prefix or "").encode("utf-8", "surrogateescape")
    if len(wanted) > MAX_KEY_LEN:
        fail(f"--prefix must be at most {MAX_KEY_LEN} bytes", 2)
    call(walk(wanted, limit, options.json))


def walk(wanted: bytes, limit: int | None, as_json: bool):
    """The listing as an ``async def`` of a client: page after page of ADMIN ``keys``."""
    render.note("kvctl: warning: listing keys reads every partition of the cluster "
                "(a full scan); avoid it on a busy production cluster")
    terminal = render.stdout_is_terminal()

    async def walk_with(client) -> int:
        listed = 0
        position: list | None = [0, b""]
        while position is not None and (limit is None or listed < limit):
            page = min(PAGE, limit - listed) if limit is not None else PAGE
            reply = await client.admin({"op": "keys", "partition": position[0],
                                        "after": position[1], "prefix": wanted,
                                        "limit": page})
            _print(reply["keys"], as_json, terminal)  # at most ``page`` keys
            listed += len(reply["keys"])
            position = reply["next"]
        return listed

    return walk_with


def _print(found: list[bytes], as_json: bool, terminal: bool) -> None:
    if as_json:
        lines = []
        for key in found:
            text, encoding = render.value_field(key)
            lines.append(json.dumps({"key": text, "encoding": encoding}) + "\n")
        sys.stdout.write("".join(lines))
        sys.stdout.flush()
        return
    if terminal:
        found = [render.escape_for_terminal(key) for key in found]
    sys.stdout.flush()
    sys.stdout.buffer.write(b"".join(key + b"\n" for key in found))
    sys.stdout.buffer.flush()
