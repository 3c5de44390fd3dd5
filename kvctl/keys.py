"""kvctl keys: list every key of the cluster through the coverage query (kvd.node.coverage).

Keys stream out page by page as the cluster walks its partitions, each partition read from
one live replica, as Riak's list-keys does. It is a full scan of the cluster: a warning on
stderr says so. One key per line (exact bytes in a pipe, control bytes escaped on a
terminal), or ``--json``: one ``{"key", "encoding"}`` object per line.
"""

from __future__ import annotations

import json
import sys
from typing import Annotated, Optional

import typer

from kvctl import render
from kvd.proto.messages import MAX_KEY_LEN

PAGE = 1000


def register(app: typer.Typer, call, options, fail) -> None:
    """Add ``kvctl keys`` to ``app``; ``call``, ``options`` and ``fail`` are kvctl.app's."""

    @app.command("keys")
    def keys(
        prefix: Annotated[Optional[str], typer.Option("--prefix", help="Only keys starting with P.")] = None,
        limit: Annotated[Optional[int], typer.Option("--limit", min=1, help="Stop after N keys.")] = None,
    ) -> None:
        """List keys (a full scan of the cluster: every partition is read)."""
        wanted = (prefix or "").encode()
        if len(wanted) > MAX_KEY_LEN:
            fail(f"--prefix must be at most {MAX_KEY_LEN} bytes", 2)
        call(_walk(wanted, limit, options.json))


def _walk(wanted: bytes, limit: int | None, as_json: bool):
    render.note("kvctl: warning: listing keys reads every partition of the cluster "
                "(a full scan); avoid it on a busy production cluster")
    terminal = sys.stdout.isatty()

    async def walk(client) -> int:
        listed = 0
        position: list | None = [0, b""]
        while position is not None and (limit is None or listed < limit):
            page = min(PAGE, limit - listed) if limit is not None else PAGE
            reply = await client.admin({"op": "keys", "partition": position[0],
                                        "after": position[1], "prefix": wanted,
                                        "limit": page})
            found = reply["keys"]  # at most ``page``
            _print(found, as_json, terminal)
            listed += len(found)
            position = reply["next"]
        return listed

    return walk


def _print(found: list[bytes], as_json: bool, terminal: bool) -> None:
    out = sys.stdout
    if as_json:
        for key in found:
            text, encoding = render.value_field(key)
            out.write(json.dumps({"key": text, "encoding": encoding}) + "\n")
    elif terminal:
        for key in found:
            out.write(_escaped(key) + "\n")
    else:
        out.flush()
        out.buffer.write(b"".join(key + b"\n" for key in found))
        out.buffer.flush()
    out.flush()


def _escaped(key: bytes) -> str:
    """A key for a terminal: control and non-ASCII bytes as escapes, as redis-cli shows them."""
    text = key.decode("latin-1")
    return text if text.isascii() and text.isprintable() else repr(key)[2:-1]
