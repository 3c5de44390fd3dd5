"""kvctl's topology commands: the ``cluster`` group (join, leave, replace, force-remove,
plan, commit, abort, clear), ``ring`` and ``repair``."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from kvctl import render
from kvctl.common import call, fail, options
from kvd.errors import KvdError

cluster_app = typer.Typer(no_args_is_help=True,
                          help="Stage, plan and commit topology changes (cluster-wide).")


def admin_call(fields: dict) -> dict:
    return call(lambda c: c.admin(fields))


def _moves_table(title: str, moves: list[dict]) -> None:
    # A terminal shows the first 50; a pipe gets every row (kvctl(1): never truncated).
    shown = moves[:50] if render.stdout_is_terminal() else moves
    render.table(title, ["partition", "from", "to"],
                 [[m["partition"], m["from"], m["to"]] for m in shown])
    if len(moves) > len(shown):
        render.note(f"... and {len(moves) - len(shown)} more (--json lists all)")


@cluster_app.command("join")
def cluster_join(seed: Annotated[str, typer.Argument(metavar="SEED", help="Peer address HOST:PORT of any member.")]) -> None:
    """Stage this node's (--host's) join to the cluster that SEED belongs to."""
    from kvd.blocking_client import TimedOut

    def join(client):
        try:
            return client.admin({"op": "join", "seed": seed})
        except TimedOut:
            raise KvdError(
                f"{options.host} did not finish joining within {options.timeout:g} s "
                f"(--timeout); is {seed} the peer address (peer_listen) of a cluster "
                "member?") from None

    _show_staged(call(join))


@cluster_app.command("leave")
def cluster_leave(node: Annotated[Optional[str], typer.Argument(metavar="[NODE]", help="Node id (default: --host's node).")] = None) -> None:
    """Stage a node's departure; its partitions move to the others at commit."""
    _show_staged(admin_call({"op": "leave"} if node is None else {"op": "leave", "node": node}))


@cluster_app.command("replace")
def cluster_replace(old: Annotated[str, typer.Argument(metavar="OLD", help="Node to replace.")],
                    new: Annotated[str, typer.Argument(metavar="NEW", help="Node that takes over its partitions.")]) -> None:
    """Stage moving every partition of OLD to NEW."""
    _show_staged(admin_call({"op": "replace", "node": old, "target": new}))


@cluster_app.command("force-remove")
def cluster_force_remove(node: Annotated[str, typer.Argument(metavar="NODE", help="A dead node to drop.")]) -> None:
    """Stage removing a node that cannot hand off its data (repair refills the replicas)."""
    _show_staged(admin_call({"op": "force-remove", "node": node}))


def _show_staged(doc: dict) -> None:
    if options.json:
        render.emit_json(doc)
    else:
        render.note(f"staged: {doc['staged']} (run `kvctl cluster plan`, then `commit`)")


@cluster_app.command("plan")
def cluster_plan() -> None:
    """Show the staged changes, every partition that would move, and ownership before/after."""
    doc = admin_call({"op": "plan"})
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
    doc = admin_call({"op": "commit"})
    if options.json:
        render.emit_json(doc)
    else:
        fetching = doc.get("fetching") or []  # absent from an older node's reply
        refill = (f"; {', '.join(fetching)} fetch the partitions they newly replicate"
                  if fetching else "")
        render.note(f"committed {', '.join(doc['committed'])}: ring version {doc['ring_version']}, "
                    f"{len(doc['moves'])} partitions to transfer{refill} (see `kvctl transfers`)")


@cluster_app.command("abort")
def cluster_abort() -> None:
    """Undo a committed change whose data cannot finish moving (a target died for good):
    the previous ring comes back and nodes it does not include leave the cluster."""
    doc = admin_call({"op": "abort"})
    if options.json:
        render.emit_json(doc)
    else:
        dropped = ", ".join(doc["dropped"]) or "no node"
        render.note(f"aborted: ring version {doc['ring_version']} restores the previous "
                    f"ownership; {doc['moves_abandoned']} moves abandoned, {dropped} dropped")


@cluster_app.command("clear")
def cluster_clear() -> None:
    """Discard every staged change."""
    doc = admin_call({"op": "clear"})
    if options.json:
        render.emit_json(doc)
    else:
        render.note("cleared: " + (", ".join(doc["cleared"]) or "nothing was staged"))


def ring() -> None:
    """Partition ownership per node, pending moves and staged changes."""
    doc = admin_call({"op": "ring"})
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


def _damaged_found(count: int) -> str:
    return (f"{count} damaged {'copy' if count == 1 else 'copies'} found on {options.host}: "
            "read repair rewrites each from the key's other replicas, where one answers; "
            "the node's log names the keys (kvd(8) DAMAGED DATA)")


def repair(
    partition: Annotated[Optional[int], typer.Option("--partition", metavar="P", help="Only this partition.")] = None,
    wait: Annotated[bool, typer.Option("--wait", help="Wait for the repair and print what it found.")] = False,
    verify: Annotated[bool, typer.Option(
        "--verify", help="First read every copy this node holds whole and check it against "
                         "its checksums; read repair rewrites the damaged ones.")] = False,
) -> None:
    """Compare this node's replicas with the other replicas (hash trees) and repair differences."""
    fields: dict = {"op": "repair", "wait": wait}
    if verify:
        fields["verify"] = True
    # The largest ring kvd.config allows (ring_size 65536); the node checks its own ring's
    # size. A number past it would not even encode in the request.
    if partition is not None and not 0 <= partition < 65536:
        fail(f"--partition {partition} is not in 0..65535 (`kvctl ring` shows this ring's "
             "partitions)", 2)
    if partition is not None:
        fields["partition"] = partition
    if wait and not options.json:
        render.note(f"repairing: comparing hash trees with the other replicas (up to "
                    f"{options.timeout:g} s, --timeout)")
    doc = admin_call(fields)
    damaged = doc["repair"].get("copies_damaged", 0) if wait else 0
    if options.json:
        render.emit_json(doc)
        if damaged:
            fail(_damaged_found(damaged), 1)
        if wait and doc["repair"]["errors"]:
            raise typer.Exit(1)
        return
    if not wait:
        render.note(f"repair of {doc['partitions']} partitions started on {options.host}; it "
                    "logs its result there (\"repair: ...\") and counts it in the "
                    "kvd_anti_entropy_* metrics; `kvctl repair --wait` waits and prints it")
        return
    stats = doc["repair"]
    columns = ["partitions", "differ", "segments", "keys", "tombstones", "exchanged", "errors"]
    row = [stats["partitions"], stats["partitions_differing"], stats["segments_differing"],
           stats["keys_repaired"], stats["tombstones_purged"],
           render.human_bytes(stats["bytes_exchanged"]), stats["errors"]]
    if verify:
        columns += ["checked", "damaged"]
        row += [stats["copies_checked"], damaged]
    render.table("repair", columns, [row])
    if damaged:
        fail(_damaged_found(damaged), 1)
    unreachable = stats.get("unreachable") or []
    if unreachable:
        fail(f"could not reach {', '.join(unreachable)}: their replicas were not compared; "
             "repair again once they are up (kvctl status)", 1)
    if stats["errors"]:
        what = "exchanges or verify scans" if verify else "exchanges"
        fail(f"{stats['errors']} {what} failed; the node's log says why", 1)
