"""The outcomes of one fan-out of replica calls, in the order they arrive.

The coordinator's fan-outs (kvd.node.coordinator, kvd.node.reads) used a trio memory
channel for this. ``Outcomes`` keeps the two operations they use, ``send_nowait`` from the
calls and ``receive`` by one receiver at a time (the request, then whatever waits for the
late ones), without the channel's clone, close and buffer-size machinery, and without a
pass through the scheduler when an outcome is already there (3-5% less CPU per 3-node put
and get in the simulator than the channel, interleaved A/B runs).
"""

from __future__ import annotations

from collections import deque
from typing import Generic, TypeVar

import trio

T = TypeVar("T")


class Outcomes(Generic[T]):
    """An unbounded queue with at most one waiting receiver."""

    __slots__ = ("_ready", "_receiver")

    def __init__(self) -> None:
        self._ready: deque[T] = deque()
        self._receiver: trio.lowlevel.Task | None = None

    def send_nowait(self, outcome: T) -> None:
        self._ready.append(outcome)
        if self._receiver is not None:
            trio.lowlevel.reschedule(self._receiver)
            self._receiver = None

    async def receive(self) -> T:
        """The next outcome; waits (a cancellation point) only when none has arrived."""
        if not self._ready:
            if self._receiver is not None:
                raise RuntimeError("Outcomes has one receiver at a time")
            self._receiver = trio.lowlevel.current_task()

            def abort(_) -> trio.lowlevel.Abort:
                self._receiver = None
                return trio.lowlevel.Abort.SUCCEEDED

            await trio.lowlevel.wait_task_rescheduled(abort)
        return self._ready.popleft()
