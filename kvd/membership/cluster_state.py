"""Changing the cluster state: staging, planning, committing and ending transitions, pure.

The value itself (statuses, routing during a transition, merge: rules 1, 3 and 4) is
kvd.membership.cluster_value's, re-exported here so that callers have one module to import
(``from kvd.membership import cluster_state as cs``).  Every function here takes a state and
returns a new one (riak_core's claimant); the gossip, admin and transfer tasks (kvd/node/)
only call them.

Lifecycle of a change (DESIGN section 5):

    stage(join|leave|replace|force-remove)  ->  plan()  ->  commit()  ->  node_done()...
                      clear() discards everything staged; abort() undoes a commit whose
                      data cannot finish moving

Rule 2 (one change at a time).  Nothing can be staged while a committed change is still
  moving data (``in_transition``), except force-remove: a dead node that is the source or target of a pending
  move would otherwise block the cluster forever.  Each node appears in at most one staged
  change.  A leave or force-remove must not leave fewer than ``n_val`` valid nodes when the
  cluster had at least that many (staged joins count, so "join the new node, force-remove
  the dead one" works on a cluster of exactly N).  Refusals raise BadRequest with one line.

Commits and aborts make and end the transitions of cluster_value's rule 3.

Pure: no I/O, no trio, no plyvel.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from kvd.errors import BadRequest
from kvd.membership.cluster_value import (
    CHANGE_KINDS,
    Change,
    ClusterState,
    bump,
    claimant,
    committed_statuses,
    joiner,
    merge,
    moving,
    new_cluster,
    owners_for_writes,
    replicated_by,
    replication,
    serving_owner,
    serving_ring,
)
from kvd.ring import Move, Ring, claim, preference_list

__all__ = [
    "CHANGE_KINDS",
    "abort",
    "Change",
    "ClusterState",
    "claimant",
    "clear",
    "commit",
    "fetchers",
    "merge",
    "moving",
    "new_cluster",
    "node_done",
    "owners_for_writes",
    "plan",
    "replicated_by",
    "replication",
    "serving_owner",
    "serving_ring",
    "stage",
    "transfer_done",
]


def _check(state: ClusterState, staged: tuple[Change, ...], n_val: int, culprit: Change | None = None) -> None:
    """Rule 2 for a whole staged set; raises BadRequest naming the first problem.

    ``culprit`` is the change being staged, named when the set as a whole is refused.
    """
    if state.in_transition and any(c.kind != "force-remove" for c in staged):
        raise BadRequest(
            f"a committed change is still moving data: {len(state.pending)} partitions pending,"
            f" {len(state.fetching)} nodes fetching (wait, or `kvctl cluster abort`)"
        )
    base = committed_statuses(state.members)
    seen: dict[str, Change] = {}
    for c in staged:
        for n in c.nodes():
            if n in seen:
                raise BadRequest(
                    f"{n} is in two staged changes ({seen[n].describe()}; {c.describe()});"
                    " run `kvctl cluster clear` and stage again"
                )
            seen[n] = c
        status = base.get(c.node)
        if c.kind == "join":
            if status in ("valid", "leaving") and state.members[c.node] != "exiting":
                raise BadRequest(f"{c.node} is already a member ({state.members[c.node]})")
        elif c.kind in ("leave", "replace"):
            if status is None or state.members[c.node] == "exiting":
                raise BadRequest(f"{c.node} is not a member")
            if status != "valid":
                raise BadRequest(f"{c.node} is already {status}")
            if c.kind == "replace" and base.get(c.replacement) in ("valid", "leaving") and (
                state.members[c.replacement] != "exiting"
            ):
                raise BadRequest(f"{c.target} is already a member ({state.members[c.replacement]})")
        elif status is None:  # force-remove
            raise BadRequest(f"{c.node} is not a member")
    valid_now = len(state.valid_nodes())
    valid_after = len(_valid_after(state, staged))
    if not valid_after or valid_after < n_val <= valid_now:
        if culprit is None:
            culprit = next((c for c in staged if c.kind in ("leave", "force-remove")), staged[-1])
        if not valid_after:
            raise BadRequest(f"{culprit.describe()} would leave no valid node")
        raise BadRequest(
            f"{culprit.describe()} would leave {valid_after} valid nodes, fewer than"
            f" n_val={n_val}; stage a join first"
        )


def _valid_after(state: ClusterState, staged: Iterable[Change]) -> set[str]:
    valid = {n for n, s in state.members.items() if s == "valid"}
    for c in staged:
        if c.kind in ("leave", "force-remove", "replace"):
            valid.discard(c.node)
        j = joiner(c)
        if j is not None:
            valid.add(j)
    return valid


def stage(state: ClusterState, change: Change, n_val: int) -> ClusterState:
    """Add ``change`` to the staged set (Rule 2); BadRequest when it is not allowed.

    Replacing with a node whose join is staged turns that join into the replace.
    """
    staged = list(state.staged)
    if change in staged:
        raise BadRequest(f"{change.describe()} is already staged")
    if change.kind == "replace":
        staged = [c for c in staged if c != Change("join", change.replacement)]
    staged.append(change)
    _check(state, tuple(staged), n_val, change)
    return bump(state, staged=tuple(staged))


def clear(state: ClusterState) -> ClusterState:
    """Discard every staged change (nothing staged: the state itself)."""
    if not state.staged:
        return state
    return bump(state, staged=())


def fetchers(before: Ring, after: Ring, n_val: int) -> set[str]:
    """Nodes that replicate some partition on ``after`` and did not on ``before``."""
    n_before, n_after = replication(before, n_val), replication(after, n_val)
    out: set[str] = set()
    for p in range(after.q):
        out.update(set(preference_list(after, p, n_after)) - set(preference_list(before, p, n_before)))
    return out


def plan(state: ClusterState, n_val: int, zones: Mapping[str, str] | None = None) -> tuple[Ring, list[Move]]:
    """The ring the staged changes would produce, and every move (partition, from, to).

    Each move's source is whoever serves the partition now (Rule 3), so moves out of a
    force-removed node are listed too, although commit will not wait for them.
    """
    if not state.staged:
        raise BadRequest("nothing staged")
    _check(state, state.staged, n_val)
    owners = list(state.ring.owners)
    for c in state.staged:
        if c.kind == "replace":
            owners = [c.replacement if o == c.node else o for o in owners]
    members = sorted(_valid_after(state, state.staged))
    start = Ring(state.ring.q, tuple(owners), state.ring.version, dict(state.ring.zones if zones is None else zones))
    new_owners = claim(start, members, n_val, zones)
    ring = state.ring.with_owners(new_owners, zones)
    moves = []
    for p, owner in enumerate(new_owners):
        source = serving_owner(state, p)
        if source != owner:
            moves.append(Move(p, source, owner))
    return ring, moves


def commit(state: ClusterState, n_val: int, zones: Mapping[str, str] | None = None) -> ClusterState:
    """Apply the staged changes: the new ring (version + 1) and its moves become pending.

    Joining nodes become valid (they get their data through the pending moves), leaving
    and replaced nodes become leaving (exiting once their moves drain), force-removed nodes
    disappear; nodes already exiting are dropped unless they are joining again.
    """
    ring, moves = plan(state, n_val, zones)
    rejoining = {joiner(c) for c in state.staged}
    base = {n: s for n, s in committed_statuses(state.members).items() if state.members[n] != "exiting" or n in rejoining}
    removed = set()
    for c in state.staged:
        if c.kind == "join":
            base[c.node] = "valid"
        elif c.kind == "leave":
            base[c.node] = "leaving"
        elif c.kind == "replace":
            base[c.node] = "leaving"
            base[c.replacement] = "valid"
        else:
            base.pop(c.node, None)
            removed.add(c.node)
    pending = tuple(m for m in moves if m.source not in removed)
    prior = serving_ring(state)
    fetching = {n for n in state.fetching if n in base} | fetchers(prior, ring, n_val)
    return bump(state, ring=ring, members=base, staged=(), pending=pending, prior=prior,
                 fetching=tuple(fetching))


def transfer_done(state: ClusterState, move: Move) -> ClusterState:
    """``move`` finished (unknown move: unchanged)."""
    if move not in state.pending:
        return state
    return bump(state, pending=tuple(m for m in state.pending if m != move))


def node_done(state: ClusterState, node: str) -> ClusterState:
    """``node`` holds every partition it newly replicates: its moves and its fetching end
    (when it was the last, the transition ends and the new ring serves)."""
    pending = tuple(m for m in state.pending if m.target != node)
    if pending == state.pending and node not in state.fetching:
        return state
    return bump(state, pending=pending, fetching=tuple(n for n in state.fetching if n != node))


def abort(state: ClusterState) -> ClusterState:
    """End a transition that cannot finish (Rule 3): the prior ring's owners come back.

    Partitions whose prior owner is no longer a member (force-removed) keep their new
    owner; members that own nothing afterwards drop out unless leaving (they go exiting).
    """
    if not state.in_transition:
        raise BadRequest("nothing to abort: no committed change is moving data")
    base = committed_statuses(state.members)
    prior = serving_ring(state)
    owners = tuple(o if o in base else state.ring.owners[p] for p, o in enumerate(prior.owners))
    ring = Ring(state.ring.q, owners, state.ring.version + 1, dict(state.ring.zones))
    owning = set(owners)
    members = {n: ("valid" if n in owning else s) for n, s in base.items()
               if n in owning or s == "leaving"}
    return bump(state, ring=ring, members=members, pending=(), fetching=(), prior=None)
