"""What every kvctl command shares: the global options, the call to a node, and the one way
a command fails (one line on stderr and an exit code, DESIGN section 7).

``call`` gives a command a client: the blocking one (kvd.blocking_client: no event loop
to import, so kvctl starts fast) for a plain function, the trio one (kvd.client, imported
only then) for an ``async def`` that streams or keeps many requests in flight; ``run``
runs any other trio program (bench).
"""

from __future__ import annotations

import inspect
import math
from typing import TYPE_CHECKING, Annotated, NoReturn, Optional

import typer

from kvctl import render
from kvd.client_protocol import DEFAULT_ADDRESS
from kvd.errors import BadRequest, KvdError

if TYPE_CHECKING:
    import ssl

DEFAULT_TIMEOUT = 30.0
CONFLICT_EXIT = 5  # get: several live siblings and no --all (docs/DECISIONS.md)


class Options:
    """The global options of this invocation (set by the root callback)."""

    host: str = DEFAULT_ADDRESS
    json: bool = False
    token: str | None = None
    ssl_context: ssl.SSLContext | None = None  # set by --tls-ca
    tls_ca: str | None = None  # its file (kvctl bench --procs: each process opens it)
    timeout: float = DEFAULT_TIMEOUT


options = Options()


USAGE_EXIT = 2
# As good as forever (31 years), and within what a socket timeout or a sleep accepts.
MAX_SECONDS = 1e9


def seconds(value: float) -> float:
    """The callback of a SECONDS option: a finite number, at most MAX_SECONDS. typer's range
    check lets nan through, and inf overflowed a socket timeout: both were internal errors."""
    if not math.isfinite(value) or value > MAX_SECONDS:
        raise typer.BadParameter(f"{value} is not a number of seconds up to {MAX_SECONDS:g}")
    return value


# --watch, --interval and --count of the commands that can redraw in place (kvctl.live).
WatchFlag = Annotated[bool, typer.Option("--watch", help="Redraw in place until Ctrl-C.")]
WatchInterval = Annotated[float, typer.Option("--interval", min=0.1, metavar="SECONDS",
                                              callback=seconds,
                                              help="Seconds between refreshes.")]
WatchCount = Annotated[Optional[int], typer.Option("--count", min=1, metavar="N",
                                                   help="Stop after this many refreshes.")]


def fail(message: str, code: int, *, usage: bool = True) -> NoReturn:
    """End the command: one line on stderr (a usage error adds the command's usage line;
    ``usage`` False: a node refused the request, which no other usage would fix)."""
    render.error(message)
    if code == USAGE_EXIT and usage:
        from typer._click.globals import get_current_context

        ctx = get_current_context(silent=True)
        if ctx is not None:
            render.note(ctx.get_usage())
    raise typer.Exit(code)


def call(operation):
    """``operation(client)`` against --host; an expected failure becomes one line on stderr
    and its exit code. A plain function gets a blocking client (kvd.blocking_client, fast
    to start); an ``async def`` gets the trio client (kvd.client) for streams and many
    requests in flight."""
    if inspect.iscoroutinefunction(operation):
        return _call_async(operation)
    from kvd.blocking_client import connect

    try:
        with connect(options.host, timeout=options.timeout, token=options.token,
                     ssl_context=options.ssl_context) as client:
            return operation(client)
    except KvdError as exc:
        fail(str(exc), exc.exit_code, usage=False)


def _call_async(operation):
    from kvd.client import open_client

    async def main():
        async with open_client(options.host, token=options.token, connect_timeout=options.timeout,
                               ssl_context=options.ssl_context) as client:
            return await operation(client)

    return run(main)


def run(async_fn):
    """trio.run with expected failures mapped to one line on stderr and an exit code."""
    import trio

    from kvd.errors import unwrap_single_error

    try:
        with unwrap_single_error():
            return trio.run(async_fn)
    except KvdError as exc:
        fail(str(exc), exc.exit_code, usage=False)


def key_arg(key: str) -> bytes:
    """The KEY argument as bytes, checked by the protocol's one key rule (usage error: 2)."""
    from kvd.proto.messages import MAX_KEY_LEN, validate_key

    data = key.encode("utf-8", "surrogateescape")
    try:
        return validate_key(data)
    except BadRequest:
        fail(f"KEY must be 1..{MAX_KEY_LEN} bytes, got {len(data)}", 2)


def context_arg(text: str | None) -> bytes | None:
    if text is None:
        return None
    try:
        return render.decode_context(text)
    except ValueError as exc:
        fail(str(exc), 2)


def check_quorum(n: int | None, **quorums: int | None) -> None:
    """-r/-w must not exceed -n when both are given (each is already >= 1; the node checks
    them against its N)."""
    for name, value in quorums.items():
        if n is not None and value is not None and value > n:
            fail(f"-{name} {value} is more than -n {n}: a quorum is 1..N", 2)
