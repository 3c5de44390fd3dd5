"""Cluster administration requests from kvctl (ADMIN frames on the client port).

Staged changes are cluster-wide (DESIGN section 7): they live in the gossiped cluster state,
so any node can stage, plan, commit, clear or abort. ``join`` is the exception: it is sent
to the new node, which asks the cluster at SEED to stage it. A replace target must have
contacted the cluster first (a node the cluster has never heard of is refused), and a
committed change whose data cannot finish moving is undone with ``abort``.
"""

from __future__ import annotations

import logging
from collections import Counter

import trio

from kvd.errors import BadRequest, KvdError
from kvd.node import coverage
from kvd.node.remote import RemoteNode
from kvd.membership import cluster_state as cs

log = logging.getLogger("kvd.aae")

# The cluster-wide changes (a join is asked of the new node itself).
CLUSTER_CHANGES = frozenset({"leave", "force-remove", "replace", "plan", "commit", "abort", "clear"})


def _ownership(owners) -> dict[str, int]:
    return dict(sorted(Counter(owners).items()))


def _moves(moves) -> list[dict]:
    return [{"partition": m.partition, "from": m.source, "to": m.target} for m in moves]


async def handle(node, fields: dict) -> dict:
    cluster = node.cluster
    op = fields.get("op")
    named = fields.get("node")
    if op in CLUSTER_CHANGES and cluster.has_left():
        # It exits soon, or gossips to nobody any more: what it staged or committed might
        # reach no member.
        raise BadRequest(f"this node has left cluster {cluster.state.cluster_id}: it takes no "
                         "cluster changes; send them to a member (kvctl --host MEMBER ...)")
    if op == "join":
        return await cluster.staging.join_at(_text(fields, "seed"))
    if op in ("leave", "force-remove"):
        # Only an absent node means "this node": an empty one is a mistake (an empty
        # shell variable), not a request to leave the node --host names.
        target = named if "node" in fields or op != "leave" else cluster.me
        if not target or not isinstance(target, str):
            raise BadRequest(f"{op} needs a NODE")
        _member(cluster, target)
        await cluster.staging.stage(cs.Change(op, target))
        return {"staged": f"{op} {target}"}
    if op == "replace":
        old, new = _text(fields, "node"), _text(fields, "target")
        _member(cluster, old)
        _contacted(cluster, new)
        await cluster.staging.stage(cs.Change("replace", old, new))
        return {"staged": f"replace {old} with {new}"}
    if op == "plan":
        state, ring, moves = await cluster.staging.plan()
        return {"staged": [c.describe() for c in state.staged],
                "moves": _moves(moves),
                "before": _ownership(state.ring.owners),
                "after": _ownership(ring.owners)}
    if op == "commit":
        base, state = await cluster.staging.commit()
        return {"ring_version": state.ring.version, "moves": _moves(state.pending),
                "committed": [c.describe() for c in base.staged],
                # A force-remove moves nothing, yet these refill the replicas they now hold.
                "fetching": sorted(state.fetching)}
    if op == "abort":
        before = cluster.state
        state = await cluster.staging.abort()
        return {"aborted": True, "ring_version": state.ring.version,
                "dropped": sorted(set(before.ring.nodes()) - set(state.ring.nodes())),
                "moves_abandoned": len(before.pending)}
    if op == "clear":
        dropped = [c.describe() for c in cluster.state.staged]
        await cluster.staging.clear()
        return {"cleared": dropped}
    if op == "keys":
        found, position = await coverage.page(
            node, fields.get("partition") or 0, fields.get("after") or b"",
            fields.get("prefix") or b"", fields.get("limit") or coverage.PAGE_LIMIT)
        return {"keys": found, "next": None if position is None else list(position)}
    if op == "ring":
        state = cluster.state
        return {"q": state.ring.q, "version": state.ring.version,
                "ownership": _ownership(state.ring.owners), "owners": list(state.ring.owners),
                "pending": _moves(state.pending),
                # Nodes still fetching partitions they newly replicate: the transition
                # (cluster_state Rule 3) lasts until this and "pending" are both empty.
                "fetching": list(state.fetching),
                "staged": [c.describe() for c in state.staged]}
    if op == "repair":
        partition = fields.get("partition")
        if partition is not None and not 0 <= partition < cluster.state.ring.q:
            raise BadRequest(f"partition {partition} is not in 0..{cluster.state.ring.q - 1}")
        if partition is not None and partition not in node.aae.my_partitions():
            raise BadRequest(f"this node holds no replica of partition {partition}")
        parts = None if partition is None else [partition]
        reread = _rereader(node) if fields.get("verify") else None
        if fields.get("wait"):
            return {"repair": (await node.aae.repair(parts, reread)).to_dict()}
        node.cluster.nursery.start_soon(node.aae.repair, parts, reread)
        return {"started": True, "partitions": len(parts or node.aae.my_partitions())}
    if op == "transfers":
        return {"transfers": await _all_transfers(cluster)}
    raise BadRequest(f"unknown admin operation {op!r}")


def _rereader(node):
    """kvctl repair --verify: a read of a key this node found damaged here, coordinated by
    this node (which asks itself first), so that read repair rewrites its copy."""
    async def reread(key: bytes) -> None:
        try:
            await node.coordinator.get(key, min(node.config.n, node.member_count()), 1)
        except (KvdError, trio.TooSlowError) as exc:
            log.warning("verify: no other replica of key %r answered: %s", key[:64], exc)
    return reread


def _text(fields: dict, name: str) -> str:
    value = fields.get(name)
    if not isinstance(value, str) or not value:
        raise BadRequest(f"missing {name}")
    return value


def _member(cluster, node: str) -> None:
    if cluster.state.status(node) is None:
        raise BadRequest(f"{node} is not a member of this cluster")


def _contacted(cluster, node: str) -> None:
    """A replace target must be a running node that has reached the cluster (its staged
    join): a typo would otherwise become a member nobody can stream to, and wedge it."""
    if cs.Change("join", node) in cluster.state.staged:
        return
    if cluster.members.get(node) is None or not cluster.is_up(node):
        raise BadRequest(f"{node} has not contacted this cluster: start it, run "
                         f"`kvctl --host NEW cluster join SEED` on it, then stage the replace")


async def _all_transfers(cluster) -> list[dict]:
    """Pending moves and partitions fetched by new replicas, with progress as reported by
    each fetching node (targets pull, so each knows its own)."""
    rows = {(r["partition"], r["to"]): r for r in cluster.transfers.rows()}
    targets = {r["to"] for r in rows.values()} | set(cluster.state.fetching)
    for target in sorted(targets - {cluster.me}):
        if not cluster.is_up(target):
            continue
        address = cluster.addresses.get(target, ("", ""))[1]
        try:
            with trio.fail_after(2):
                theirs = await RemoteNode(address, cluster.peers).transfers()
        except (KvdError, trio.TooSlowError, OSError):
            continue
        for row in theirs:
            if row["to"] == target:
                rows[(row["partition"], target)] = row
    return sorted(rows.values(), key=lambda row: (row["partition"], row["to"]))
