"""The chaos suite's history and checker (pure: no trio, no network).

A workload records every write it attempts as an :class:`Op` with one outcome:

- ``ok``: acknowledged (a PUT_REPLY: on disk on W replicas);
- ``fail``: a definite error reply (quorum not reached, unavailable, too many siblings).
  kvd, like Dynamo, does not roll back the replicas a failed write did reach, so a failed
  write MAY still appear later; it must not be counted lost, and seeing it is no phantom;
- ``info``: indeterminate (client timeout, connection lost mid-request): may or may not be
  applied.

Two kinds of keys:

- unique keys, written once with a value nobody else writes; some are then deleted with the
  context of their acknowledged write (so the tombstone supersedes exactly that value);
- hot keys, updated by read-modify-write from every client: each update reads the siblings,
  takes the union of the token sets they hold, adds its own token and writes the union back
  with the read's context. Under dotted version vectors a write supersedes only what its
  context has seen, and it carried everything it saw, so every acknowledged token stays in
  the union of the final siblings (a grow-only set).

Rules, checked on a read of every key at R=N after the cluster healed and was repaired:

1. lost: an acknowledged unique write whose value is not a live sibling and which nobody tried
   to delete (a delete that failed or is indeterminate may have been applied: either state
   is fine then), or an acknowledged token missing from its hot key's union — FAILURE;
2. phantom: a live value (or token) that no client ever attempted on that key — FAILURE;
3. resurrected: a key whose delete was acknowledged still has a live sibling — FAILURE
   (this is how a write applied twice used to show: the coordinator retried a slow mint on
   another replica, the delete's context covered one copy and the other came back);
4. unreadable: a key that could not be read at R=N once everything was healed — FAILURE
   (the checker cannot vouch for it);
5. duplicated: the same value present as more than one sibling — FAILURE (DESIGN: each
   client write is applied at most once, even when the coordinator retries elsewhere);
6. crowded: a hot key holding more siblings than the writes that could have been concurrent
   — every client (``writers``) with one write in flight, plus each of the key's writes that
   was not acknowledged (it may land late, beside the writer's next one), plus one — FAILURE
   (sibling explosion; the simulator's rule 5).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Op:
    kind: str            # "put" | "delete" | "rmw"
    key: bytes
    value: bytes         # put: the value; rmw: the token added; delete: b""
    outcome: str = "info"  # "ok" | "fail" | "info"
    start: float = 0.0
    end: float = 0.0
    node: int = 0
    error: str = ""


@dataclass
class Read:
    """What the final read at R=N returned: live sibling values (tombstones left out)."""
    live: list[bytes] = field(default_factory=list)
    tombstones: int = 0  # deleted siblings beside the live ones
    error: str = ""      # set when the key could not be read


@dataclass
class Verdict:
    acknowledged: int = 0
    failed: int = 0
    indeterminate: int = 0
    lost: list[str] = field(default_factory=list)
    phantom: list[str] = field(default_factory=list)
    resurrected: list[str] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)
    duplicated: list[str] = field(default_factory=list)
    crowded: list[str] = field(default_factory=list)
    keys: int = 0

    @property
    def ok(self) -> bool:
        return not (self.lost or self.phantom or self.resurrected or self.unreadable
                    or self.duplicated or self.crowded)

    def problems(self) -> str:
        parts = []
        for name in ("lost", "phantom", "resurrected", "unreadable", "duplicated",
                     "crowded"):
            items = getattr(self, name)
            if items:
                parts.append(f"{len(items)} {name}: {', '.join(items[:5])}"
                             + (" ..." if len(items) > 5 else ""))
        return "; ".join(parts)


def hot_value(tokens: set[bytes]) -> bytes:
    return b",".join(sorted(tokens))


def hot_tokens(value: bytes) -> set[bytes]:
    return set(value.split(b",")) if value else set()


def is_hot(key: bytes) -> bool:
    return b"/hot/" in key


def check(history: list[Op], reads: dict[bytes, Read], writers: int) -> Verdict:
    """Apply the rules above; ``reads`` must hold every key of ``history``; ``writers`` is
    the number of clients that wrote concurrently."""
    verdict = Verdict()
    by_key: dict[bytes, list[Op]] = {}
    for op in history:
        by_key.setdefault(op.key, []).append(op)
        if op.kind in ("put", "rmw"):
            if op.outcome == "ok":
                verdict.acknowledged += 1
            elif op.outcome == "fail":
                verdict.failed += 1
            else:
                verdict.indeterminate += 1
    verdict.keys = len(by_key)
    for key, ops in sorted(by_key.items()):
        name = key.decode(errors="replace")
        read = reads.get(key)
        if read is None or read.error:
            verdict.unreadable.append(f"{name} ({read.error if read else 'not read'})")
            continue
        live = read.live
        if len(live) != len(set(live)):
            verdict.duplicated.append(f"{name} ({len(live) - len(set(live))} extra copies)")
        if is_hot(key):
            attempted = {op.value for op in ops if op.kind == "rmw"}
            acked = {op.value for op in ops if op.kind == "rmw" and op.outcome == "ok"}
            union: set[bytes] = set()
            for value in live:
                union |= hot_tokens(value)
            for token in sorted(acked - union):
                verdict.lost.append(f"{name} token {token.decode(errors='replace')}")
            for token in sorted(union - attempted):
                verdict.phantom.append(f"{name} token {token.decode(errors='replace')}")
            unacknowledged = sum(op.kind == "rmw" and op.outcome != "ok" for op in ops)
            bound = writers + unacknowledged + 1
            if len(live) + read.tombstones > bound:
                verdict.crowded.append(f"{name} ({len(live) + read.tombstones} siblings, "
                                       f"at most {bound} possible)")
            continue
        puts = [op for op in ops if op.kind == "put"]
        attempted = {op.value for op in puts}
        acked_put = any(op.outcome == "ok" for op in puts)
        acked_delete = any(op.kind == "delete" and op.outcome == "ok" for op in ops)
        # A delete that failed or is indeterminate may still have been applied (no rollback).
        tried_delete = any(op.kind == "delete" for op in ops)
        for value in sorted(set(live) - attempted):
            verdict.phantom.append(f"{name} = {value[:40]!r}")
        if acked_delete:
            if live:
                verdict.resurrected.append(name)
        elif acked_put and not tried_delete and not (set(live) & attempted):
            verdict.lost.append(name)
    return verdict


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]
