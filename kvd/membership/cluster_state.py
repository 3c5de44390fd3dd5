"""The cluster state: staged changes and committed rings (riak_core's claimant), pure.

One versioned value, gossiped between nodes, says who is in the cluster and who owns what:
the ring, each member's status, the staged (uncommitted) topology changes, and the pending
moves of the last commit.  Every function here takes a state and returns a new one; the
gossip and transfer tasks (kvd/node/) only call them.

Lifecycle of a change (DESIGN section 5):

    stage(join|leave|replace|force-remove)  ->  plan()  ->  commit()  ->  node_done()...
                      clear() discards everything staged; abort() undoes a commit whose
                      data cannot finish moving

Rule 1 (status table).  ``members`` maps node -> status, and is a function of the committed
  statuses and the staged changes and pending moves:

      status    | meaning                                       | becomes
      ----------+-----------------------------------------------+-------------------------------
      joining   | target of a staged join/replace, owns nothing | valid at commit; gone on clear
      valid     | claims partitions                             | leaving at commit of its leave
      leaving   | still holds data the transition needs         | exiting when the transition ends
      exiting   | owns and serves nothing; may shut down        | dropped at the next commit
      (absent)  | force-removed, or never a member              |

  A node that is exiting may be joined again: it stays "exiting" until that commit.
  ``__post_init__`` recomputes leaving/exiting and joining from ``pending``, ``fetching``
  and ``staged``, so no state can say otherwise.

Rule 2 (one change at a time).  Nothing can be staged while a committed change is still
  moving data (``in_transition``), except force-remove: a dead node that is the source or target of a pending
  move would otherwise block the cluster forever.  Each node appears in at most one staged
  change.  A leave or force-remove must not leave fewer than ``n_val`` valid nodes when the
  cluster had at least that many (staged joins count, so "join the new node, force-remove
  the dead one" works on a cluster of exactly N).  Refusals raise BadRequest with one line.

Rule 3 (routing during a transition).  After commit, ``ring`` is the NEW ring and
  ``prior`` the ring that served before it; ``fetching`` names every node that newly
  replicates some partition (it must fetch it), ``pending`` the ownership moves (what
  `kvctl transfers` shows).  While either is non-empty (``in_transition``) reads are served
  by the prior ring (``serving_ring``): its replicas hold every key, while a new replica
  may not have fetched it yet (riak_core keeps the old owner serving until handoff
  completes).  Writes go to the replicas of both rings, so nothing written during the
  transfers is missing when the new ring takes over.  A node calls ``node_done`` once it
  holds every partition it newly replicates; when the last one has, ``prior`` is dropped
  and the new ring serves, all partitions at once (a mixed ring could name, for a
  partition, a node that neither held nor fetched it).  Moves out of a force-removed node
  are never pending (nobody can stream from it); its partitions are fetched from the
  other prior replicas.  A commit made during a transition (force-remove) keeps ``prior``
  (still the ring whose replicas hold the data) and adds the newer ring's fetchers.
  ``abort`` ends a transition that cannot finish (a dead or phantom target): the prior
  ring's owners come back in a new ring version, nodes that own nothing in it drop out.

Rule 4 (merge: how two states converge).  ``merge`` is a join-semilattice (commutative,
  associative, idempotent), so gossip in any order converges:
  * Different rings: the higher ``(ring.version, ring digest)`` wins outright.  A commit
    therefore beats anything staged or done on the older ring, however many times that
    was bumped (the refinement of "higher version wins": ``version`` alone would let a
    node that staged twice undo a commit).  Two claimants committing different plans in a
    partition end with the same ring everywhere (the digest breaks the tie); the transfer
    task reconciles against whatever ring is current.
  * Same ring: componentwise.  ``pending`` and ``fetching`` are intersections (a finished
    move is a monotone fact, so two nodes finishing transfers at once both count);
    ``prior`` is the same commit's (kept while either side still needs it); ``version`` is the
    maximum and ``staged`` comes from the higher version, or is the union of both when the
    versions are equal (two nodes staging at once both count; a clear wins over what was
    staged before it).  plan/commit re-validate the staged set, since a union of two valid
    sets may conflict (two leaves below N): the operator then clears and stages again.
    Committed statuses (split-brain only) join per node, leaving over valid.
  Different ``cluster_id``s never merge (BadRequest): the gossip task refuses the peer.

Pure: no I/O, no trio, no plyvel.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from kvd.errors import BadRequest
from kvd.membership.members import STATUSES
from kvd.ring import Move, Ring, claim, new_ring, preference_list

__all__ = [
    "CHANGE_KINDS",
    "abort",
    "Change",
    "ClusterState",
    "claimant",
    "clear",
    "commit",
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

CHANGE_KINDS = ("join", "leave", "force-remove", "replace")

# Committed statuses, in the order in which split-brain disagreements are resolved.
_BASE_RANK = {"valid": 0, "leaving": 1}


@dataclass(frozen=True, order=True)
class Change:
    """One staged topology change.  ``target`` is the new node of a replace."""

    kind: str
    node: str
    target: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in CHANGE_KINDS:
            raise BadRequest(f"unknown change {self.kind!r} (expected one of {', '.join(CHANGE_KINDS)})")
        if not isinstance(self.node, str) or not self.node:
            raise BadRequest("a change needs a node id")
        if self.kind == "replace":
            if not isinstance(self.target, str) or not self.target:
                raise BadRequest(f"replace {self.node} needs the new node")
            if self.target == self.node:
                raise BadRequest(f"cannot replace {self.node} with itself")
        elif self.target is not None:
            raise BadRequest(f"{self.kind} takes no target")

    @property
    def replacement(self) -> str:
        """The new node of a replace (``__post_init__`` refuses a replace without one)."""
        assert self.target is not None, self
        return self.target

    def nodes(self) -> tuple[str, ...]:
        """Every node this change concerns."""
        return (self.node,) if self.target is None else (self.node, self.target)

    def describe(self) -> str:
        """Human wording, for messages and `kvctl cluster plan`."""
        if self.kind == "replace":
            return f"replace {self.node} with {self.target}"
        return f"{self.kind} {self.node}"

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for the wire."""
        return {"kind": self.kind, "node": self.node, "target": self.target}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Change:
        """Inverse of to_dict."""
        return cls(str(d["kind"]), str(d["node"]), None if d.get("target") is None else str(d["target"]))


def _sort_key(c: Change) -> tuple[str, str, str]:
    return (c.node, c.kind, c.target or "")


def _joiner(c: Change) -> str | None:
    """The node a change brings in, if any."""
    if c.kind == "join":
        return c.node
    if c.kind == "replace":
        return c.target
    return None


def _base(members: Mapping[str, str]) -> dict[str, str]:
    """Committed statuses: joining is derived from staged, exiting from pending."""
    return {n: ("leaving" if s == "exiting" else s) for n, s in members.items() if s != "joining"}


def _derive(base: Mapping[str, str], staged: Iterable[Change], pending: Iterable[Move],
            fetching: Collection[str] = ()) -> dict[str, str]:
    """Rule 1: the full status map from committed statuses, staged changes, pending moves
    and fetching nodes (a leaving node is a prior replica: fetchers and reads need it)."""
    sources = {m.source for m in pending}
    out = {n: ("exiting" if s == "leaving" and n not in sources and not fetching else s)
           for n, s in base.items()}
    for c in staged:
        j = _joiner(c)
        if j is not None and j not in out:
            out[j] = "joining"
    return dict(sorted(out.items()))


@dataclass(frozen=True)
class ClusterState:
    """Ring, member statuses, staged changes and pending moves, at one version."""

    cluster_id: str
    ring: Ring
    members: Mapping[str, str]
    staged: tuple[Change, ...] = ()
    pending: tuple[Move, ...] = ()
    version: int = 1
    prior: Ring | None = None  # the ring serving reads while data moves (Rule 3)
    fetching: tuple[str, ...] = ()  # nodes still fetching partitions they newly replicate
    _digest: str = field(init=False, repr=False, compare=False)
    _moving: Mapping[int, Move] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for node, status in self.members.items():
            if status not in STATUSES:
                raise ValueError(f"member {node!r} has unknown status {status!r}")
        staged = tuple(sorted(set(self.staged), key=_sort_key))
        pending = tuple(sorted(set(self.pending), key=lambda m: (m.partition, m.source, m.target)))
        moving = {}
        for m in pending:
            if not 0 <= m.partition < self.ring.q or m.partition in moving:
                raise ValueError(f"pending move of partition {m.partition} is out of range or repeated")
            if m.target != self.ring.owners[m.partition] or m.source == m.target:
                raise ValueError(f"pending move {m} does not end at the ring's owner")
            moving[m.partition] = m
        fetching = tuple(sorted(set(self.fetching)))
        prior = self.prior
        if not pending and not fetching:
            prior = None
        elif prior is None:  # a state saved before ``prior`` existed: moves revert to sources
            owners = list(self.ring.owners)
            for m in pending:
                owners[m.partition] = m.source
            prior = Ring(self.ring.q, tuple(owners), self.ring.version, dict(self.ring.zones))
        elif prior.q != self.ring.q:
            raise ValueError("the prior ring has a different number of partitions")
        members = _derive(_base(self.members), staged, pending, fetching)
        object.__setattr__(self, "fetching", fetching)
        object.__setattr__(self, "prior", prior)
        object.__setattr__(self, "staged", staged)
        object.__setattr__(self, "pending", pending)
        object.__setattr__(self, "members", MappingProxyType(members))
        object.__setattr__(self, "_moving", MappingProxyType(moving))
        object.__setattr__(self, "_digest", _hash(self._content()))

    def __hash__(self) -> int:
        return hash(self._digest)

    def _content(self) -> dict[str, Any]:
        return {
            "cluster_id": self.cluster_id,
            "ring": self.ring.to_dict(),
            "members": dict(self.members),
            "staged": [c.to_dict() for c in self.staged],
            "pending": [[m.partition, m.source, m.target] for m in self.pending],
            "version": self.version,
            "prior": None if self.prior is None else self.prior.to_dict(),
            "fetching": list(self.fetching),
        }

    @property
    def in_transition(self) -> bool:
        """Whether a committed change is still moving data (Rule 3)."""
        return bool(self.pending or self.fetching)

    def digest(self) -> str:
        """Content hash: equal digests, equal states (gossip compares these first)."""
        return self._digest

    def status(self, node: str) -> str | None:
        """The node's status, or None when it is not a member."""
        return self.members.get(node)

    def valid_nodes(self) -> list[str]:
        """Members that claim partitions, sorted."""
        return [n for n, s in self.members.items() if s == "valid"]

    def to_dict(self) -> dict[str, Any]:
        """Msgpack/JSON-able primitives."""
        return self._content()

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ClusterState:
        """Inverse of to_dict; ValueError on anything malformed (it comes off the wire)."""
        try:
            members = d["members"]
            if not isinstance(members, Mapping):
                raise ValueError("members must be a map")
            return cls(
                cluster_id=str(d["cluster_id"]),
                ring=Ring.from_dict(d["ring"]),
                members={str(n): str(s) for n, s in members.items()},
                staged=tuple(Change.from_dict(c) for c in d.get("staged") or ()),
                pending=tuple(Move(int(p), str(s), str(t)) for p, s, t in d.get("pending") or ()),
                version=int(d["version"]),
                prior=None if d.get("prior") is None else Ring.from_dict(d["prior"]),
                fetching=tuple(str(n) for n in d.get("fetching") or ()),
            )
        except (KeyError, TypeError, AttributeError, BadRequest) as exc:
            raise ValueError(f"malformed cluster state: {exc}") from None


def _hash(content: Mapping[str, Any]) -> str:
    blob = json.dumps(content, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.blake2b(blob, digest_size=16).hexdigest()


def _bump(state: ClusterState, **changes: Any) -> ClusterState:
    fields: dict[str, Any] = {
        "cluster_id": state.cluster_id,
        "ring": state.ring,
        "members": state.members,
        "staged": state.staged,
        "pending": state.pending,
        "version": state.version + 1,
        "prior": state.prior,
        "fetching": state.fetching,
    }
    fields.update(changes)
    return ClusterState(**fields)


def new_cluster(node: str, q: int, cluster_id: str) -> ClusterState:
    """A one-node cluster: ``node`` is valid and owns every partition."""
    return ClusterState(cluster_id, new_ring(node, q), {node: "valid"}, (), (), 1)


def _check(state: ClusterState, staged: tuple[Change, ...], n_val: int, culprit: Change | None = None) -> None:
    """Rule 2 for a whole staged set; raises BadRequest naming the first problem.

    ``culprit`` is the change being staged, named when the set as a whole is refused.
    """
    if state.in_transition and any(c.kind != "force-remove" for c in staged):
        raise BadRequest(
            f"a committed change is still moving data: {len(state.pending)} partitions pending,"
            f" {len(state.fetching)} nodes fetching (wait, or `kvctl cluster abort`)"
        )
    base = _base(state.members)
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
        j = _joiner(c)
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
    return _bump(state, staged=tuple(staged))


def clear(state: ClusterState) -> ClusterState:
    """Discard every staged change (nothing staged: the state itself)."""
    if not state.staged:
        return state
    return _bump(state, staged=())


def serving_ring(state: ClusterState) -> Ring:
    """The ring whose replicas serve reads now (Rule 3): the prior one during a transition."""
    return state.prior if state.prior is not None else state.ring


def serving_owner(state: ClusterState, partition: int) -> str:
    """Who serves reads of ``partition`` now: its owner on the serving ring."""
    return serving_ring(state).owners[partition]


def owners_for_writes(state: ClusterState, partition: int) -> list[str]:
    """Who must receive writes to ``partition``: its serving owner and its new owner."""
    serving, owner = serving_owner(state, partition), state.ring.owners[partition]
    return [owner] if serving == owner else [serving, owner]


def replication(ring: Ring, n_val: int) -> int:
    """Replicas of each partition on ``ring``: ``n_val``, capped by its node count."""
    return min(n_val, max(1, len(ring.nodes())))


def replicated_by(ring: Ring, node: str, n_val: int) -> set[int]:
    """The partitions whose preference list on ``ring`` includes ``node``: what it stores."""
    n = replication(ring, n_val)
    return {p for p in range(ring.q) if node in preference_list(ring, p, n)}


def fetchers(before: Ring, after: Ring, n_val: int) -> set[str]:
    """Nodes that replicate some partition on ``after`` and did not on ``before``."""
    n_before, n_after = replication(before, n_val), replication(after, n_val)
    out: set[str] = set()
    for p in range(after.q):
        out.update(set(preference_list(after, p, n_after)) - set(preference_list(before, p, n_before)))
    return out


def moving(state: ClusterState, partition: int) -> Move | None:
    """The pending move of ``partition``, if any."""
    return state._moving.get(partition)


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
    rejoining = {_joiner(c) for c in state.staged}
    base = {n: s for n, s in _base(state.members).items() if state.members[n] != "exiting" or n in rejoining}
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
    return _bump(state, ring=ring, members=base, staged=(), pending=pending, prior=prior,
                 fetching=tuple(fetching))


def transfer_done(state: ClusterState, move: Move) -> ClusterState:
    """``move`` finished (unknown move: unchanged)."""
    if move not in state.pending:
        return state
    return _bump(state, pending=tuple(m for m in state.pending if m != move))


def node_done(state: ClusterState, node: str) -> ClusterState:
    """``node`` holds every partition it newly replicates: its moves and its fetching end
    (when it was the last, the transition ends and the new ring serves)."""
    pending = tuple(m for m in state.pending if m.target != node)
    if pending == state.pending and node not in state.fetching:
        return state
    return _bump(state, pending=pending, fetching=tuple(n for n in state.fetching if n != node))


def abort(state: ClusterState) -> ClusterState:
    """End a transition that cannot finish (Rule 3): the prior ring's owners come back.

    Partitions whose prior owner is no longer a member (force-removed) keep their new
    owner; members that own nothing afterwards drop out unless leaving (they go exiting).
    """
    if not state.in_transition:
        raise BadRequest("nothing to abort: no committed change is moving data")
    base = _base(state.members)
    prior = serving_ring(state)
    owners = tuple(o if o in base else state.ring.owners[p] for p, o in enumerate(prior.owners))
    ring = Ring(state.ring.q, owners, state.ring.version + 1, dict(state.ring.zones))
    owning = set(owners)
    members = {n: ("valid" if n in owning else s) for n, s in base.items()
               if n in owning or s == "leaving"}
    return _bump(state, ring=ring, members=members, pending=(), fetching=(), prior=None)


def claimant(state: ClusterState, up: Collection[str]) -> str | None:
    """The node that computes and commits rings: the lowest-id valid node that is up."""
    candidates = [n for n, s in state.members.items() if s == "valid" and n in up]
    return min(candidates) if candidates else None


def _ring_key(state: ClusterState) -> tuple[int, str]:
    return (state.ring.version, _hash(state.ring.to_dict()))


def merge(a: ClusterState, b: ClusterState) -> ClusterState:
    """Gossip merge (Rule 4): commutative, associative, idempotent."""
    if a.cluster_id != b.cluster_id:
        raise BadRequest(f"cluster id mismatch: {a.cluster_id} != {b.cluster_id}")
    ka, kb = _ring_key(a), _ring_key(b)
    if ka != kb:
        return a if ka > kb else b
    if a.digest() == b.digest():
        return a
    base = _base(a.members)
    for n, s in _base(b.members).items():
        if _BASE_RANK[s] >= _BASE_RANK.get(base.get(n, ""), -1):
            base[n] = s
    if a.version != b.version:
        staged = (a if a.version > b.version else b).staged
    else:
        staged = tuple(set(a.staged) | set(b.staged))
    pending = tuple(set(a.pending) & set(b.pending))
    fetching = tuple(set(a.fetching) & set(b.fetching))
    priors = [r for r in (a.prior, b.prior) if r is not None]
    prior = max(priors, key=lambda r: _hash(r.to_dict())) if priors else None
    return ClusterState(a.cluster_id, a.ring, base, staged, pending, max(a.version, b.version),
                        prior, fetching)
