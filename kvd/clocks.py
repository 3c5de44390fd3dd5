"""The two clocks a node reads, injected so a whole cluster can run on trio's MockClock.

- ``monotonic``: trio's clock. Timeouts, sleeps, phi-accrual intervals and throttles agree
  with it (``trio.sleep`` and cancel scopes run on the same clock), so under
  ``trio.testing.MockClock`` simulated seconds pass in microseconds.
- ``wall``: seconds since the epoch. Only what must mean the same on every node or across a
  restart reads it: hint ages, tombstone grace, member generations, identity creation.
  Nothing decides between two writes by it (DESIGN section 2).

The daemon uses ``REAL`` (as ``real_in_this_run``). The simulator gives every node
``Clocks(trio.current_time, lambda: epoch + skew + trio.current_time())``, so nodes can
disagree about wall time.
No other module reads ``time.time()`` or ``trio.current_time()`` directly (tests/test_clocks.py,
whose ALLOWED names the exceptions and why).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import NamedTuple

import trio


class Clocks(NamedTuple):
    monotonic: Callable[[], float]
    wall: Callable[[], float]


REAL = Clocks(trio.current_time, time.time)


def real_in_this_run() -> Clocks:
    """REAL, with trio's clock read through this run's clock object: one call per read
    instead of trio.current_time's three (14 calls of a one-node SET's 440). This run's only:
    another run has another clock."""
    return Clocks(trio.lowlevel.current_clock().current_time, time.time)


def skewed(epoch: float, skew: float = 0.0) -> Clocks:
    """Clocks over trio's (mock) clock whose wall time starts at ``epoch + skew``."""
    return Clocks(trio.current_time, lambda: epoch + skew + trio.current_time())
