"""The error a request that missed its quorum answers with (kvd.node.coordinator rule 4):
every replica that failed, with its reasons in order, never an empty one."""

from __future__ import annotations

from collections.abc import Sequence

from kvd.node.replica import Replica


def quorum_message(kind: str, needed: int, ok: Sequence, failed: Sequence, also: str = "") -> str:
    """``kind`` ("read" or "write") quorum of ``needed`` missed: ``ok`` answered, and each
    of ``failed`` (replica, error) is named with why; ``also``, what else fell short."""
    reasons: dict[str, list[str]] = {}
    for replica, exc in failed:
        if replica is not None:
            said = reasons.setdefault(_name(replica), [])
            if _reason(exc) not in said:
                said.append(_reason(exc))
    text = f"{kind} quorum not reached: {len(ok)} of {needed} required replicas answered"
    if also:
        text += f" ({also})"
    if not reasons:
        return f"{text} (no other replica of the key is up)"
    listed = "; ".join(f"{name}: " + ", then ".join(why) for name, why in reasons.items())
    return f"{text} ({listed})"


def _name(replica: Replica) -> str:
    return f"{replica.node} (for {replica.stands_for})" if replica.stands_for else replica.node


def _reason(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__
