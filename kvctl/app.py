"""kvctl: the operator's command line for kvd. This module is the root: global options,
how arguments are read, how a command ends, and the registration of every command.

Every command is a thin shell over a client: parse options, call, render. Exit codes
(DESIGN section 7): 0 ok, 1 not found or failed, 2 usage, 3 quorum not reached, 4 cannot
connect or not authorised, 5 conflict (get: several siblings), 130 interrupted. Every
failure prints one line on stderr (a usage error adds the usage line), never a traceback.
Nothing heavy is imported before a command needs it: kvctl must start fast
(benchmarks/kvctl_startup.py).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer
from typer._click import exceptions as click_exceptions  # typer's own click (pinned)
from typer.core import TyperGroup

from kvctl import backup, cluster, data, render, transfers, version_report
from kvctl.keys import keys as list_keys
from kvctl.cluster import admin_call
from kvctl.common import (  # noqa: F401
    DEFAULT_ADDRESS, DEFAULT_TIMEOUT, WatchCount, WatchFlag, WatchInterval, call, fail, options,
    run, seconds,
)
from kvd.errors import KvdError

# Global options, accepted after the command too (`kvctl status --json`): hoisted in front
# of it before parsing. Those that take a value, then the flags.
GLOBAL_WITH_VALUE = ("--host", "--token-file", "--tls-ca", "--timeout")
GLOBAL_FLAGS = ("--json",)


def hoist_global_options(args: list[str]) -> list[str]:
    """Move global options that follow the command in front of it (not past ``--``)."""
    front: list[str] = []
    rest: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            rest.extend(args[i:])
            break
        name = arg.split("=", 1)[0]
        if arg in GLOBAL_FLAGS:
            front.append(arg)
        elif name in GLOBAL_WITH_VALUE and "=" in arg:
            front.append(arg)
        elif arg in GLOBAL_WITH_VALUE and i + 1 < len(args):
            front += args[i : i + 2]
            i += 1
        else:
            rest.append(arg)
        i += 1
    return front + rest


class _Root(TyperGroup):
    """The root group: hoists global options; a usage error is one line plus the usage
    line; Ctrl-C is "interrupted", exit 130; a local OS error is one line, exit 1; so is
    a bug (KVCTL_DEBUG=1 shows its traceback)."""

    def parse_args(self, ctx, args):
        return super().parse_args(ctx, hoist_global_options(args))

    def make_context(self, info_name, args, parent=None, **extra):
        with _one_line_errors():
            return super().make_context(info_name, args, parent=parent, **extra)

    def invoke(self, ctx):
        with _one_line_errors():
            return super().invoke(ctx)


@contextmanager
def _one_line_errors():
    try:
        yield
    except click_exceptions.NoArgsIsHelpError:
        raise  # `kvctl`, `kvctl cluster`: the help, as typer shows it
    except click_exceptions.UsageError as exc:
        render.error(exc.format_message())
        if exc.ctx is not None:
            render.note(exc.ctx.get_usage())
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        render.note("kvctl: interrupted")
        raise typer.Exit(130) from None
    except BrokenPipeError:
        raise  # typer's own handling: a quiet exit 1
    except (OSError, KvdError) as exc:
        render.error(str(exc))
        raise typer.Exit(getattr(exc, "exit_code", 1)) from None
    except (click_exceptions.ClickException, typer.Exit, typer.Abort):
        raise
    except Exception as exc:
        if os.environ.get("KVCTL_DEBUG"):
            raise
        # A bug: still one line, with the way to see where it happened.
        render.error(f"internal error (a bug in kvctl): {type(exc).__name__}: {exc}; "
                     "run again with KVCTL_DEBUG=1 for the traceback")
        raise typer.Exit(1) from None


app = typer.Typer(
    cls=_Root,
    add_completion=True,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
    help="Operate a kvd cluster: read and write keys, watch nodes, change the topology.",
)


def _version(value: bool) -> None:
    if value:
        from kvd._version import version

        print(f"kvctl {version(fallback='(development)')}")
        raise typer.Exit()


@app.callback()
def main_options(
    host: Annotated[str, typer.Option(
        "--host", envvar="KVCTL_HOST", metavar="HOST:PORT",
        help="Node to talk to: its client port, HOST:PORT.")] = DEFAULT_ADDRESS,
    json: Annotated[bool, typer.Option(
        "--json", help="Machine-readable output on stdout.")] = False,
    token_file: Annotated[Optional[Path], typer.Option(
        "--token-file", envvar="KVCTL_TOKEN_FILE", metavar="FILE",
        help="File holding a client token.")] = None,
    tls_ca: Annotated[Optional[Path], typer.Option(
        "--tls-ca", envvar="KVCTL_TLS_CA", metavar="FILE",
        help="Connect with TLS, trusting this CA file.")] = None,
    timeout: Annotated[float, typer.Option(
        "--timeout", envvar="KVCTL_TIMEOUT", min=0.001, metavar="SECONDS", callback=seconds,
        help="Seconds to wait for the node at each step before giving up.")] = DEFAULT_TIMEOUT,
    version: Annotated[bool, typer.Option(
        "--version", callback=_version, is_eager=True, help="Print the version.")] = False,
) -> None:
    from kvd.address import parse_address

    try:
        parse_address(host, to_dial=True)
    except ValueError as exc:
        fail(f"--host {host}: {exc}", 2)
    options.host = host
    options.json = json
    options.timeout = timeout
    if tls_ca is not None:
        from kvd.security import client_context

        try:
            options.ssl_context = client_context(str(tls_ca))
            options.tls_ca = str(tls_ca)
        except (KvdError, OSError, ValueError) as exc:
            fail(f"--tls-ca: {exc}", 2)
    if token_file is not None:
        try:
            options.token = token_file.read_text().strip()
        except OSError as exc:
            fail(f"--token-file {token_file}: {exc.strerror}", 2)
        except UnicodeDecodeError:
            fail(f"--token-file {token_file}: not UTF-8 text (a token file holds the token "
                 "as text)", 2)


_admin = admin_call  # the name kvctl modules written before the split import

# -- commands: keys (kvctl/data.py), topology (kvctl/cluster.py), transfers, version,
# backup/export/import (their own modules), then status and bench here.
app.command()(data.put)
app.command()(data.get)
app.command()(data.delete)
app.command()(data.inspect)
app.command("keys")(list_keys)  # kvctl/keys.py: the coverage query
app.add_typer(cluster.cluster_app, name="cluster")
app.command()(cluster.ring)
app.command()(cluster.repair)
app.command()(transfers.transfers)
app.command("version")(version_report.version_command)
app.command()(backup.backup)
app.command()(backup.export)
app.command("import")(backup.import_)


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
    watch: WatchFlag = False,
    interval: WatchInterval = 2.0,
    count: WatchCount = None,
) -> None:
    """One row per node, like nodetool status: state, address, load, partitions, ownership."""
    if watch:
        from kvctl.live import watch as live_watch

        live_watch(_status_doc, _status_view, _print_status, interval=interval, count=count,
                   as_json=options.json)
        return
    doc = _status_doc()
    if options.json:
        render.emit_json(doc)
        return
    _print_status(doc)


def _print_status(doc: dict) -> None:
    render.note("Status: U=up D=down / State: N=normal J=joining L=leaving")
    render.table(None, _STATUS_COLUMNS, _status_rows(doc))
    if doc["awaiting_join"]:
        render.note(_AWAITING)


@app.command()
def bench(
    workload: Annotated[str, typer.Option("--workload", metavar="A|B|C", help="YCSB workload: A, B or C.")] = "A",
    ops: Annotated[int, typer.Option("--ops", metavar="N", help="Operations to run after the load phase.")] = 20000,
    concurrency: Annotated[int, typer.Option("--concurrency", metavar="N", help="Requests in flight.")] = 32,
    value_size: Annotated[int, typer.Option("--value-size", metavar="BYTES", help="Value size in bytes.")] = 1024,
    keys: Annotated[int, typer.Option("--keys", metavar="N", help="Distinct keys (preloaded).")] = 10000,
    connections: Annotated[int, typer.Option("--connections", metavar="N", help="Client connections.")] = 4,
    no_load: Annotated[bool, typer.Option("--no-load", help="Skip the load phase.")] = False,
    procs: Annotated[int, typer.Option("--procs", metavar="P", help="Client processes (the load is split between them).")] = 1,
    spread: Annotated[bool, typer.Option("--spread", help="Each process drives another node of the cluster (round robin), not only --host.")] = False,
) -> None:
    """Run a YCSB-style workload and print throughput, latency percentiles and the cluster's
    CPU per request."""
    from kvctl.bench import WORKLOADS, cluster_addresses, cluster_cpu, run_procs

    workload = workload.upper()
    if workload not in WORKLOADS:
        fail(f"--workload must be one of {', '.join(WORKLOADS)}", 2)
    if min(ops, concurrency, keys, connections, procs) < 1 or value_size < 0:
        fail("--ops, --concurrency, --keys, --connections and --procs must be positive", 2)
    if not options.json:
        render.note(f"bench: workload {workload}, {ops} ops, {concurrency} concurrent, "
                    f"{value_size} B values, {keys} keys")
    def cpu():
        return run(lambda: cluster_cpu(options.host, options.token, options.ssl_context,
                                       options.timeout))

    from kvd.errors import unwrap_single_error

    targets = None
    if spread:
        targets = run(lambda: cluster_addresses(options.host, options.token,
                                                options.ssl_context, options.timeout))
    try:
        with unwrap_single_error():
            result, cpu_per_op = run_procs(
                options.host, procs, workload=workload, ops=ops, concurrency=concurrency,
                value_size=value_size, keys=keys, connections=min(connections, concurrency),
                token=options.token, tls_ca=options.tls_ca, load=not no_load,
                timeout=options.timeout, cpu=cpu, spread=targets)
    except KvdError as exc:
        fail(str(exc), exc.exit_code, usage=False)
    summary = result.summary()
    summary["procs"] = procs
    summary["nodes_driven"] = min(procs, len(targets)) if targets else 1  # one node per process
    summary["cpu_us_per_op"] = None if cpu_per_op is None else round(cpu_per_op * 1e6, 1)
    if options.json:
        render.emit_json(summary)
        return
    render.table(f"workload {workload}", ["ops", "errors", "ops/s", "p50 ms", "p95 ms", "p99 ms", "max ms",
                                          "kvd CPU us/op"],  # upper-cased, µ became Μ
                 [[summary["ops"], summary["errors"], summary["ops_per_sec"], summary["p50_ms"],
                   summary["p95_ms"], summary["p99_ms"], summary["max_ms"],
                   "?" if cpu_per_op is None else summary["cpu_us_per_op"]]])


def main() -> None:
    app()


if __name__ == "__main__":
    main()
