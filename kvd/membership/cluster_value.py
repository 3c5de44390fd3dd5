"""The cluster state value: who is in the cluster and who owns what, and how two copies merge.

One versioned value, gossiped between nodes: the ring, each member's status, the staged
(uncommitted) topology changes, and the pending moves of the last commit. This module holds
the value, what it means (rules 1 and 3) and how gossip merges it (rule 4); the functions
that change it (stage, plan, commit, ..., rule 2) are kvd.membership.cluster_state's.

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
from kvd.ring import Move, Ring, new_ring, preference_list

__all__ = [
    "bump",
    "Change",
    "CHANGE_KINDS",
    "claimant",
    "ClusterState",
    "committed_statuses",
    "joiner",
    "merge",
    "moving",
    "new_cluster",
    "owners_for_writes",
    "replicated_by",
    "replication",
    "serving_owner",
    "serving_ring",
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


def joiner(c: Change) -> str | None:
    """The node a change brings in, if any."""
    if c.kind == "join":
        return c.node
    if c.kind == "replace":
        return c.target
    return None


def committed_statuses(members: Mapping[str, str]) -> dict[str, str]:
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
        j = joiner(c)
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
        members = _derive(committed_statuses(self.members), staged, pending, fetching)
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


def bump(state: ClusterState, **changes: Any) -> ClusterState:
    """``state`` with ``changes`` applied and its version one higher (a new fact to gossip)."""
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


def moving(state: ClusterState, partition: int) -> Move | None:
    """The pending move of ``partition``, if any."""
    return state._moving.get(partition)


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
    base = committed_statuses(a.members)
    for n, s in committed_statuses(b.members).items():
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
