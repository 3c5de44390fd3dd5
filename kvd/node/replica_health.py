"""How the replicas answer this coordinator: its local failure view (Dynamo's), which the
failure detector cannot give (coordinator rules 1, 5 and 8).

1. Every call to a replica has ``replica_timeout`` to answer (``call``; a large value's
   calls get their own ``patience``). One that does not raises ReplicaTimedOut.
2. A replica is *suspected* while its oldest call not answered yet is a hedge delay old,
   and for ``SUSPECT_FOR`` seconds after a call to it timed out or until it next answers,
   whichever is first. So a replica that falls silent costs the requests in flight then a
   hedge delay each, and the ones after them none, whereas waiting for a timeout cost
   every request in the first ``replica_timeout`` one (docs/DECISIONS.md). Calls that move
   a large value's bytes (``bulk``, and those with a ``patience``: seals) take time in
   proportion to their size, so they never make a replica late, nor count towards its
   typical answer time (rule 4); nor do this node's own calls make it late (a local call
   waits for its group commit, and has no stand-in).
3. Only a timeout says that a replica cannot answer (``timed_out``): coordinator rule 10
   fails a read on that, never on a replica that is merely late.
4. A replica is *slow* (a lossy or slow link) while its typical answer time, a moving
   average over its calls, is over ``HEDGE_FACTOR`` times the median replica's and over
   ``HEDGE_FLOOR``.
5. The hedge delay is ``HEDGE_FACTOR`` typical mint times, at least ``HEDGE_FLOOR``, at
   most ``replica_timeout``; a slow replica's mints do not count (they would lengthen
   every write's hedge).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

import trio

from kvd.errors import KvdError
from kvd.node.replica import LocalReplica, Replica

SUSPECT_FOR = 10.0  # seconds a replica that timed out stays suspected (rule 2)
HEDGE_FLOOR = 0.05  # seconds: the shortest hedge delay (rule 5)
HEDGE_FACTOR = 4.0  # the hedge delay in typical mint times (rule 5)

T = TypeVar("T")


class ReplicaTimedOut(KvdError):
    """A replica did not answer one call within its deadline (rule 1)."""

    code = "unavailable"


class ReplicaHealth:
    """One coordinator's view of its replicas (the rules above), by node name."""

    def __init__(self, clock: Callable[[], float], replica_timeout: float):
        self.clock = clock
        self.replica_timeout = replica_timeout
        self._timed_out: dict[str, float] = {}  # node -> until when it is suspected (rule 2)
        # node -> {call: when it began}, oldest first: the calls not answered yet (rule 2)
        self._waiting: dict[str, dict[object, float]] = {}
        self._answers: dict[str, float] = {}  # node -> its typical answer time, s (rule 4)
        self._typical_mint = HEDGE_FLOOR / HEDGE_FACTOR  # moving average, seconds (rule 5)

    async def call(self, replica: Replica, call: Callable[[Replica], Awaitable[T]],
                   deadline: float, patience: float | None = None, bulk: bool = False) -> T:
        """``call(replica)`` within the replica's deadline (rule 1), noting how it went."""
        node, began = replica.node, self.clock()
        timeout = max(0.0, min(patience or self.replica_timeout, deadline - began))
        telling = patience is None and not bulk  # of how the replica answers (rule 2)
        late_counts = telling and not isinstance(replica, LocalReplica)
        # A call that cannot make the replica late waits in a dict nobody looks at.
        waiting = self._waiting.setdefault(node, {}) if late_counts else {}
        token = object()
        waiting[token] = began
        try:
            # A bare cancel scope, not trio.fail_after (a generator context manager around
            # one): fail_after was 7.7% of a 3-node coordinator's event loop under bench.
            with trio.CancelScope(deadline=began + timeout) as scope:
                result = await call(replica)
        finally:
            del waiting[token]
        if scope.cancelled_caught:
            self._timed_out[node] = self.clock() + SUSPECT_FOR
            raise ReplicaTimedOut(f"timed out after {timeout:.1f} s")
        self._timed_out.pop(node, None)
        if telling:
            took, typical = self.clock() - began, self._answers.get(node)
            self._answers[node] = took if typical is None else typical + (took - typical) / 8
        return result

    def suspected(self, node: str) -> bool:
        """Rule 2: a call to ``node`` is a hedge delay late, or one timed out recently."""
        if self.timed_out(node):
            return True
        waiting = self._waiting.get(node)
        if not waiting:
            return False
        return next(iter(waiting.values())) <= self.clock() - self.hedge_delay()

    def timed_out(self, node: str) -> bool:
        until = self._timed_out.get(node)
        return until is not None and until > self.clock()

    def slow(self, node: str) -> bool:
        """Rule 4: ``node`` typically answers over HEDGE_FACTOR times slower than the
        median replica, and slower than HEDGE_FLOOR."""
        times = sorted(self._answers.values())
        return (self._answers.get(node, 0.0)
                > max(HEDGE_FLOOR, HEDGE_FACTOR * times[len(times) // 2] if times else 0.0))

    def minted(self, node: str, seconds: float) -> None:
        """A mint on ``node`` took ``seconds`` (rule 5)."""
        if not self.slow(node):
            self._typical_mint += (seconds - self._typical_mint) / 8

    def hedge_delay(self) -> float:
        """Rule 5: how long a call may take before another replica is asked as well."""
        return min(self.replica_timeout, max(HEDGE_FLOOR, HEDGE_FACTOR * self._typical_mint))
