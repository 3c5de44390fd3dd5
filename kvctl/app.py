"""kvctl: the operator's command line for kvd.

Every command is a thin shell over kvd.client: parse options, call, render. Exit codes
(DESIGN section 7): 0 ok, 1 not found or failed, 2 usage, 3 quorum not reached, 4 cannot
connect or not authorised, 130 interrupted. Expected failures print one line on stderr.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, NoReturn, Optional

import trio
import typer

from kvctl import render
from kvd._version import version
from kvd.client import DEFAULT_ADDRESS, open_client
from kvd.errors import BadRequest, ConnectFailed, KvdError, NotFound, unwrap_single_error
from kvd.proto.messages import MAX_KEY_LEN, validate_key

app = typer.Typer(
    add_completion=True,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Operate a kvd cluster: read and write keys, watch nodes, change the topology.",
)


class Options:
    host: str = DEFAULT_ADDRESS
    json: bool = False
    token: str | None = None
    ssl_context = None  # set by --tls-ca


options = Options()


def _version(value: bool) -> None:
    if value:
        print(f"kvctl {version(fallback='(development)')}")
        raise typer.Exit()


@app.callback()
def main_options(
    host: Annotated[
        str, typer.Option("--host", envvar="KVCTL_HOST", help="Node to talk to, HOST:PORT.")
    ] = DEFAULT_ADDRESS,
    json: Annotated[bool, typer.Option("--json", help="Machine-readable output on stdout.")] = False,
    token_file: Annotated[
        Optional[Path], typer.Option("--token-file", help="File holding a client token.")
    ] = None,
    tls_ca: Annotated[
        Optional[Path], typer.Option("--tls-ca", envvar="KVCTL_TLS_CA",
                                     help="Connect with TLS, trusting this CA file.")
    ] = None,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    options.host = host
    options.json = json
    if tls_ca is not None:
        from kvd.security import client_context

        try:
            options.ssl_context = client_context(str(tls_ca))
        except (KvdError, OSError, ValueError) as exc:
            _fail(f"--tls-ca: {exc}", 2)
    if token_file is not None:
        try:
            options.token = token_file.read_text().strip()
        except OSError as exc:
            _fail(f"--token-file {token_file}: {exc.strerror}", 2)


def _fail(message: str, code: int) -> NoReturn:
    render.error(message)
    raise typer.Exit(code)


def run(async_fn):
    """trio.run with expected failures mapped to one line on stderr and an exit code."""
    try:
        with unwrap_single_error():
            return trio.run(async_fn)
    except KvdError as exc:
        _fail(str(exc), exc.exit_code)


def call(operation):
    """Run ``operation(client)`` against --host."""

    async def main():
        async with open_client(options.host, token=options.token,
                               ssl_context=options.ssl_context) as client:
            return await operation(client)

    return run(main)


def _key(key: str) -> bytes:
    """The KEY argument as bytes, checked by the protocol's one key rule (usage error: 2)."""
    data = key.encode()
    try:
        return validate_key(data)
    except BadRequest:
        _fail(f"KEY must be 1..{MAX_KEY_LEN} bytes, got {len(data)}", 2)


def _context(text: str | None) -> bytes | None:
    if text is None:
        return None
    try:
        return render.decode_context(text)
    except ValueError as exc:
        _fail(str(exc), 2)


@contextmanager
def _value_source(value: str | None, file: Path | None):
    """Yield (bytes, None) for a literal value or (None, binary file) for --file / stdin."""
    if (value is None) == (file is None):
        _fail("give a VALUE, '-' for stdin, or --file F (exactly one)", 2)
    if file is not None:
        try:
            handle = open(file, "rb")
        except OSError as exc:
            _fail(f"--file {file}: {exc.strerror}", 1)
        with handle:
            yield None, handle
    elif value == "-":
        stdin = sys.stdin.buffer
        try:
            regular = os.path.isfile(f"/proc/self/fd/{stdin.fileno()}") or False
        except (OSError, ValueError):
            regular = False
        if regular:
            yield None, stdin
        else:
            # A pipe has no length: spool it (to disk past 8 MiB) so the size is known.
            with tempfile.SpooledTemporaryFile(max_size=8 << 20) as spool:
                shutil.copyfileobj(stdin, spool, 1 << 20)
                size = spool.tell()
                spool.seek(0)
                if size <= 8 << 20:
                    yield spool.read(), None
                else:
                    yield None, spool
    else:
        yield value.encode(), None


@app.command()
def put(
    key: Annotated[str, typer.Argument(help="The key (1..1024 bytes of UTF-8).")],
    value: Annotated[Optional[str], typer.Argument(help="The value, or '-' to read stdin.")] = None,
    file: Annotated[Optional[Path], typer.Option("--file", "-f", help="Read the value from a file.")] = None,
    context: Annotated[Optional[str], typer.Option("--context", "-c", help="Context from a previous get.")] = None,
    n: Annotated[Optional[int], typer.Option("-n", help="Replicas (N) for this request.")] = None,
    w: Annotated[Optional[int], typer.Option("-w", help="Write quorum (W) for this request.")] = None,
) -> None:
    """Write a value. Without --context it becomes a sibling of what is there."""
    data_key = _key(key)
    ctx = _context(context)
    with _value_source(value, file) as (data, handle):
        result = call(lambda c: c.put(data_key, data, source=handle, context=ctx, n=n, w=w))
    doc = {
        "key": key,
        "context": render.encode_context(result.context),
        "siblings": result.siblings,
        "replicas": result.replicas,
    }
    if options.json:
        render.emit_json(doc)
    else:
        render.note(f"ok: {result.replicas} replicas, {result.siblings} sibling(s)")
        render.note(f"context: {doc['context']}")


@app.command()
def get(
    key: Annotated[str, typer.Argument(help="The key.")],
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Write the value to a file (streamed).")] = None,
    r: Annotated[Optional[int], typer.Option("-r", help="Read quorum (R) for this request.")] = None,
    n: Annotated[Optional[int], typer.Option("-n", help="Replicas (N) for this request.")] = None,
) -> None:
    """Read a key: every sibling, and the context to write back with."""
    data_key = _key(key)
    streamed: dict[str, object] = {}  # path -> open file, for values that arrive as chunks

    def sink(index: int, count: int):
        path = _output_path(output, index, count)
        streamed[path] = handle = open(path, "wb")
        return handle

    try:
        result = call(lambda c: c.get(data_key, r=r, n=n, sink=sink if output else None))
    finally:
        for handle in streamed.values():
            handle.close()
    live = [s for s in result.siblings if not s.deleted]
    written = list(streamed)
    if output is not None and result.found:
        for index, sibling in enumerate(result.siblings):
            path = _output_path(output, index, len(result.siblings))
            if path not in streamed and not sibling.deleted:
                Path(path).write_bytes(sibling.value)
                written.append(path)
    if options.json:
        siblings = []
        for sibling in result.siblings:
            text, encoding = render.value_field(sibling.value)
            entry = {"value": text, "encoding": encoding, "deleted": sibling.deleted,
                     "length": sibling.length}
            siblings.append(entry)
        render.emit_json({"key": key, "found": result.found, "siblings": siblings,
                          "context": render.encode_context(result.context),
                          "replicas": result.replicas})
        if not result.found:
            raise typer.Exit(NotFound.exit_code)
        return
    if not result.found:
        _fail(f"key {key!r} not found", NotFound.exit_code)
    if output is not None:
        render.note(f"wrote {', '.join(written)}")
    else:
        out = sys.stdout.buffer
        for index, sibling in enumerate(live):
            if len(live) > 1:
                out.write(f"--- sibling {index + 1} of {len(live)}\n".encode())
            out.write(sibling.value)
            if sys.stdout.isatty() and not sibling.value.endswith(b"\n"):
                out.write(b"\n")
        out.flush()
    if len(live) > 1:
        render.note(f"{len(live)} siblings: write back with --context to resolve them")
    render.note(f"context: {render.encode_context(result.context)}")


def _output_path(output: Path, index: int, count: int) -> str:
    """One sibling goes to --output itself; several go to OUTPUT.0, OUTPUT.1, ..."""
    return str(output) if count == 1 else f"{output}.{index}"


@app.command()
def delete(
    key: Annotated[str, typer.Argument(help="The key.")],
    context: Annotated[Optional[str], typer.Option("--context", "-c", help="Context from a previous get.")] = None,
    n: Annotated[Optional[int], typer.Option("-n", help="Replicas (N) for this request.")] = None,
    w: Annotated[Optional[int], typer.Option("-w", help="Write quorum (W) for this request.")] = None,
) -> None:
    """Delete a key (writes a tombstone; with --context it supersedes what that get saw)."""
    data_key = _key(key)
    ctx = _context(context)
    result = call(lambda c: c.delete(data_key, context=ctx, n=n, w=w))
    if options.json:
        render.emit_json({"key": key, "context": render.encode_context(result.context),
                          "replicas": result.replicas})
    else:
        render.note(f"deleted: {result.replicas} replicas")


@app.command()
def inspect(key: Annotated[str, typer.Argument(help="The key.")]) -> None:
    """Show each replica of a key: node, role, siblings, digest — do they agree?"""
    data_key = _key(key)
    doc = call(lambda c: c.inspect(data_key))
    replicas = []
    for replica in doc["replicas"]:
        entry = dict(replica)
        if isinstance(entry.get("version"), bytes):
            entry["version"] = render.encode_context(entry["version"])
        replicas.append(entry)
    out = {"key": key, "partition": doc["partition"], "replicas": replicas}
    digests = {r["digest"] for r in replicas if r.get("present")}
    out["agree"] = len(digests) <= 1 and all(r.get("present") for r in replicas)
    if options.json:
        render.emit_json(out)
        return
    rows = [[r["node"], r["role"], "yes" if r["present"] else "no", r["siblings"],
             r.get("digest") or "-"] for r in replicas]
    render.table(f"key {key!r} — partition {doc['partition']}",
                 ["node", "role", "present", "siblings", "digest"], rows)
    render.note("replicas agree" if out["agree"] else "replicas DIFFER")


def _status_doc() -> dict:
    doc = call(lambda c: c.status())
    nodes = [
        {
            "node": n["node"], "state": n["state"], "address": n["address"],
            "peer_address": n["peer_address"], "load_bytes": n["load_bytes"],
            "partitions": n["partitions"], "ownership": n["ownership"],
            **{k: v for k, v in n.items() if k not in {
                "node", "state", "address", "peer_address", "load_bytes", "partitions",
                "ownership"}},
        }
        for n in doc["nodes"]
    ]
    return {"nodes": nodes, "awaiting_join": doc.get("awaiting_join", False)}


def _status_rows(doc: dict) -> list[list]:
    return [[n["state"], n["node"], n["address"], render.human_bytes(n["load_bytes"]),
             n["partitions"], f"{n['ownership'] * 100:.1f}%"] for n in doc["nodes"]]


_STATUS_COLUMNS = ["state", "node", "address", "load", "partitions", "owns"]
_AWAITING = ("this node is in no cluster yet (started with seeds): it serves no data until "
             "`kvctl --host HOST:PORT cluster join SEED` adds it")


def _status_view(doc: dict):
    from rich.console import Group
    from rich.text import Text

    grid = render.grid(None, _STATUS_COLUMNS, _status_rows(doc))
    return Group(grid, Text(_AWAITING)) if doc["awaiting_join"] else grid


@app.command()
def status(
    watch: Annotated[bool, typer.Option("--watch", help="Refresh in place until Ctrl-C.")] = False,
    interval: Annotated[float, typer.Option("--interval", min=0.1,
                                            help="Seconds between refreshes.")] = 2.0,
    count: Annotated[Optional[int], typer.Option("--count", min=1,
                                                 help="Stop after this many refreshes.")] = None,
) -> None:
    """One row per node, like nodetool status: state, address, load, partitions, ownership."""
    if watch:
        from kvctl.live import watch as live_watch

        live_watch(_status_doc, _status_view, interval=interval, count=count,
                   as_json=options.json)
        return
    doc = _status_doc()
    if options.json:
        render.emit_json(doc)
        return
    render.note("Status: U=up D=down / State: N=normal J=joining L=leaving")
    render.table(None, _STATUS_COLUMNS, _status_rows(doc))
    if doc["awaiting_join"]:
        render.note(_AWAITING)


@app.command()
def bench(
    workload: Annotated[str, typer.Option("--workload", help="YCSB workload: A, B or C.")] = "A",
    ops: Annotated[int, typer.Option("--ops", help="Operations to run after the load phase.")] = 20000,
    concurrency: Annotated[int, typer.Option("--concurrency", help="Requests in flight.")] = 32,
    value_size: Annotated[int, typer.Option("--value-size", help="Value size in bytes.")] = 1024,
    keys: Annotated[int, typer.Option("--keys", help="Distinct keys (preloaded).")] = 10000,
    connections: Annotated[int, typer.Option("--connections", help="Client connections.")] = 4,
    no_load: Annotated[bool, typer.Option("--no-load", help="Skip the load phase.")] = False,
) -> None:
    """Run a YCSB-style workload and print throughput and latency percentiles."""
    from kvctl.bench import WORKLOADS, run_bench

    workload = workload.upper()
    if workload not in WORKLOADS:
        _fail(f"--workload must be one of {', '.join(WORKLOADS)}", 2)
    if min(ops, concurrency, keys, connections) < 1 or value_size < 0:
        _fail("--ops, --concurrency, --keys and --connections must be positive", 2)
    if not options.json:
        render.note(f"bench: workload {workload}, {ops} ops, {concurrency} concurrent, "
                    f"{value_size} B values, {keys} keys")
    result = run(lambda: run_bench(
        options.host, workload=workload, ops=ops, concurrency=concurrency,
        value_size=value_size, keys=keys, connections=min(connections, concurrency),
        token=options.token, ssl_context=options.ssl_context, load=not no_load))
    summary = result.summary()
    if options.json:
        render.emit_json(summary)
        return
    render.table(f"workload {workload}", ["ops", "errors", "ops/s", "p50 ms", "p95 ms", "p99 ms", "max ms"],
                 [[summary["ops"], summary["errors"], summary["ops_per_sec"], summary["p50_ms"],
                   summary["p95_ms"], summary["p99_ms"], summary["max_ms"]]])


cluster_app = typer.Typer(no_args_is_help=True,
                          help="Stage, plan and commit topology changes (cluster-wide).")
app.add_typer(cluster_app, name="cluster")


def _admin(fields: dict) -> dict:
    return call(lambda c: c.admin(fields))


def _moves_table(title: str, moves: list[dict]) -> None:
    shown = moves[:50]
    render.table(title, ["partition", "from", "to"],
                 [[m["partition"], m["from"], m["to"]] for m in shown])
    if len(moves) > len(shown):
        render.note(f"... and {len(moves) - len(shown)} more (--json lists all)")


JOIN_TIMEOUT = 60.0  # seconds; the node gives up on a silent seed after request_timeout


@cluster_app.command("join")
def cluster_join(seed: Annotated[str, typer.Argument(help="Peer address HOST:PORT of any member.")]) -> None:
    """Stage this node's (--host's) join to the cluster that SEED belongs to."""

    async def join(client):
        try:
            with trio.fail_after(JOIN_TIMEOUT):
                return await client.admin({"op": "join", "seed": seed})
        except trio.TooSlowError:
            raise ConnectFailed(
                f"{options.host} did not finish joining within {JOIN_TIMEOUT:.0f} s; is {seed} "
                "the peer address (peer_listen) of a cluster member?") from None

    _show_staged(call(join))


@cluster_app.command("leave")
def cluster_leave(node: Annotated[Optional[str], typer.Argument(help="Node id (default: --host's node).")] = None) -> None:
    """Stage a node's departure; its partitions move to the others at commit."""
    _stage({"op": "leave", "node": node} if node else {"op": "leave"})


@cluster_app.command("replace")
def cluster_replace(old: Annotated[str, typer.Argument(help="Node to replace.")],
                    new: Annotated[str, typer.Argument(help="Node that takes over its partitions.")]) -> None:
    """Stage moving every partition of OLD to NEW."""
    _stage({"op": "replace", "node": old, "target": new})


@cluster_app.command("force-remove")
def cluster_force_remove(node: Annotated[str, typer.Argument(help="A dead node to drop.")]) -> None:
    """Stage removing a node that cannot hand off its data (repair refills the replicas)."""
    _stage({"op": "force-remove", "node": node})


def _stage(fields: dict) -> None:
    _show_staged(_admin(fields))


def _show_staged(doc: dict) -> None:
    if options.json:
        render.emit_json(doc)
    else:
        render.note(f"staged: {doc['staged']} (run `kvctl cluster plan`, then `commit`)")


@cluster_app.command("plan")
def cluster_plan() -> None:
    """Show the staged changes, every partition that would move, and ownership before/after."""
    doc = _admin({"op": "plan"})
    if options.json:
        render.emit_json(doc)
        return
    render.note("staged: " + ", ".join(doc["staged"]))
    nodes = sorted(set(doc["before"]) | set(doc["after"]))
    render.table("ownership (partitions)", ["node", "before", "after"],
                 [[n, doc["before"].get(n, 0), doc["after"].get(n, 0)] for n in nodes])
    _moves_table(f"{len(doc['moves'])} partitions will move", doc["moves"])


@cluster_app.command("commit")
def cluster_commit() -> None:
    """Apply the staged changes: a new ring; moving partitions stream to their new owners."""
    doc = _admin({"op": "commit"})
    if options.json:
        render.emit_json(doc)
    else:
        render.note(f"committed {', '.join(doc['committed'])}: ring version {doc['ring_version']}, "
                    f"{len(doc['moves'])} partitions to transfer (see `kvctl transfers`)")


@cluster_app.command("abort")
def cluster_abort() -> None:
    """Undo a committed change whose data cannot finish moving (a target died for good):
    the previous ring comes back and nodes it does not include leave the cluster."""
    doc = _admin({"op": "abort"})
    if options.json:
        render.emit_json(doc)
    else:
        dropped = ", ".join(doc["dropped"]) or "no node"
        render.note(f"aborted: ring version {doc['ring_version']} restores the previous "
                    f"ownership; {doc['moves_abandoned']} moves abandoned, {dropped} dropped")


@cluster_app.command("clear")
def cluster_clear() -> None:
    """Discard every staged change."""
    doc = _admin({"op": "clear"})
    if options.json:
        render.emit_json(doc)
    else:
        render.note("cleared: " + (", ".join(doc["cleared"]) or "nothing was staged"))


@app.command()
def ring() -> None:
    """Partition ownership per node, pending moves and staged changes."""
    doc = _admin({"op": "ring"})
    if options.json:
        render.emit_json(doc)
        return
    render.note(f"ring version {doc['version']}, {doc['q']} partitions")
    render.table(None, ["node", "partitions", "owns"],
                 [[n, c, f"{c / doc['q'] * 100:.1f}%"] for n, c in doc["ownership"].items()])
    if doc["pending"]:
        _moves_table(f"{len(doc['pending'])} pending moves", doc["pending"])
    if doc.get("fetching"):
        render.note("still fetching their new partitions: " + ", ".join(doc["fetching"]))
    if doc["staged"]:
        render.note("staged: " + ", ".join(doc["staged"]))


@app.command()
def repair(
    partition: Annotated[Optional[int], typer.Option("--partition", help="Only this partition.")] = None,
    wait: Annotated[bool, typer.Option("--wait", help="Wait for the repair and print what it found.")] = False,
) -> None:
    """Compare this node's replicas with the other replicas (hash trees) and repair differences."""
    fields: dict = {"op": "repair", "wait": wait}
    if partition is not None:
        fields["partition"] = partition
    if wait and not options.json and sys.stderr.isatty():
        with render.stderr.status("repairing: comparing hash trees with the other replicas"):
            doc = _admin(fields)
    else:
        doc = _admin(fields)
    if options.json:
        render.emit_json(doc)
        return
    if not wait:
        render.note(f"repair started for {doc['partitions']} partitions (see `kvctl status`)")
        return
    stats = doc["repair"]
    render.table("repair", ["partitions", "differ", "segments", "keys", "tombstones",
                            "exchanged", "errors"],
                 [[stats["partitions"], stats["partitions_differing"], stats["segments_differing"],
                   stats["keys_repaired"], stats["tombstones_purged"],
                   render.human_bytes(stats["bytes_exchanged"]), stats["errors"]]])
    if stats["errors"]:
        raise typer.Exit(1)


from kvctl import backup as _backup  # noqa: E402 - commands in their own modules
from kvctl import transfers as _transfers  # noqa: E402
from kvctl import version_report as _version_report  # noqa: E402

# Each module is handed this one (which may run as __main__: a fresh import of kvctl.app
# would have its own, unset options).
for _commands in (_backup, _transfers, _version_report):
    _commands.register(app, sys.modules[__name__])


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        render.error("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
