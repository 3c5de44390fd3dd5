"""Phi accrual failure detector (Hayashibara et al., 2004), in the form Akka uses.

Pure: no clock of its own; every call takes ``now`` (seconds, any monotonic origin).

The detector keeps a sliding window of inter-arrival times of a node's heartbeats and
answers, for the time elapsed since the last arrival, phi = -log10(P(a gap this long or
longer)), with the gap distribution approximated by a normal distribution of the window's
mean and standard deviation.  The normal CDF is replaced by Bowling et al.'s logistic
approximation, as Akka does: with y = (elapsed - mean) / std and
x = y * (1.5976 + 0.070566 * y**2), P(longer) ~ 1 / (1 + e**x), so phi = softplus(x) / ln 10.
phi = 8 means "the chance that a live node is this late is 1e-8".

Invariants:

1. ``phi(now)`` is 0.0 until the first heartbeat; afterwards it is non-decreasing in ``now``
   between two heartbeats, and a heartbeat brings it back near 0.
2. The window is bootstrapped with two samples, ``first_interval -/+ first_interval / 4``, so
   after a single heartbeat the node is judged as if it had been beating at
   ``first_interval`` with std ``first_interval / 4``.
3. A heartbeat at a time not later than the previous one refreshes nothing and adds no
   sample (several gossip messages merged at the same instant are one arrival, and a zero
   gap would only shrink the mean).

What an observer hears, and why the defaults are what they are
-------------------------------------------------------------------
kvd does not ping: node X bumps its own heartbeat counter every gossip round (1 s) and the
counter spreads epidemically.  An observer O feeds X's detector whenever X's counter advances
in O's member table, and that happens when O merges a digest that carries a fresher counter
than O already had.  Each round O exchanges digests with one random peer (push-pull: the
target answers with its own digest), and O also receives the pushes of the peers that
picked it.  So X's counter advances at O about once a second but irregularly: after O
hears X directly (age 0), the next peers O meets often know an older counter and several
rounds pass without an advance; counters also jump by 2-3 at once.  In the pure simulation
of tests/test_membership.py (64 nodes, random gossip phases, push-pull, seeded) the gaps
between advances have a mean of about 1.1 s and a standard deviation of about 0.6 s, with
rare gaps of 5-6 s.

A normal distribution has light tails: fed those samples alone, threshold 8 trips at
mean + ~5.6 std, about 4.5 s, and the rare 5-6 s gaps become false positives.  Two knobs
fix that without giving up detection speed:

* ``acceptable_pause = 2.0`` s is added to the mean (Akka's acceptable-heartbeat-pause): a
  gap only starts to count as suspicious two seconds after the usual gap.  It covers the
  epidemic's irregularity, which does not grow with the std the window measures.
* ``min_std = 0.3`` s keeps a perfectly regular history (a 2-node cluster, or the
  bootstrap) from making phi a cliff; with std 0.3 phi climbs from 1 to 8 over ~1.3 s.

With these, a silent node's phi crosses 8 about 4.5-6 s after the last advance an observer
saw (mean ~1.1 + 2.0 + 5.6 * ~0.45), and the last advance itself reaches every observer
within ~2-3 s of the node stopping in a 64-node cluster, so every observer judges it down
within the 10 s the cluster tests demand (the simulation measures the worst case; see the
test).  Window 1000 (about 16 minutes of history at 1 Hz) as in Akka: long enough that a
burst of irregular gossip does not swing the estimate, short enough to follow a cluster
that grows.

``threshold`` 8 is DESIGN section 5's default; operators raise it (10-12) on a lossy network,
trading detection time for fewer false alarms.
"""

from __future__ import annotations

import math
from collections import deque

__all__ = ["PhiAccrualDetector"]

_LN10 = math.log(10.0)


class PhiAccrualDetector:
    """Suspicion level of one node, from the arrival times of its heartbeats."""

    def __init__(
        self,
        threshold: float = 8.0,
        window: int = 1000,
        min_std: float = 0.3,
        acceptable_pause: float = 2.0,
        first_interval: float = 1.0,
    ) -> None:
        if threshold <= 0:
            raise ValueError("threshold must be > 0")
        if window < 2:
            raise ValueError("window must be >= 2")
        if min_std <= 0:
            raise ValueError("min_std must be > 0")
        if acceptable_pause < 0:
            raise ValueError("acceptable_pause must be >= 0")
        if first_interval <= 0:
            raise ValueError("first_interval must be > 0")
        self.threshold = threshold
        self.window = window
        self.min_std = min_std
        self.acceptable_pause = acceptable_pause
        self.first_interval = first_interval
        self._intervals: deque[float] = deque(maxlen=window)
        self._sum = 0.0
        self._sum_sq = 0.0
        self._last: float | None = None

    @property
    def last_heartbeat(self) -> float | None:
        """Time of the last heartbeat, or None before the first."""
        return self._last

    def reset(self) -> None:
        """Forget everything (the node restarted: its old rhythm says nothing)."""
        self._intervals.clear()
        self._sum = 0.0
        self._sum_sq = 0.0
        self._last = None

    def heartbeat(self, now: float, emitted: float | None = None) -> None:
        """Record a heartbeat that arrived at ``now`` and was sent at ``emitted`` (default now).

        The sample is the time from the previous heartbeat's emission to this arrival, and
        the next phi is measured from this heartbeat's emission: with ``emitted`` left out
        this is the classic detector over arrival times.
        """
        sent = now if emitted is None else min(emitted, now)
        last = self._last
        if last is None:
            std = self.first_interval / 4.0
            self._add(self.first_interval - std)
            self._add(self.first_interval + std)
            self._last = sent
        elif sent > last:
            self._add(now - last)
            self._last = sent

    def phi(self, now: float) -> float:
        """Suspicion that the node is down at ``now``: 0.0 before the first heartbeat."""
        if self._last is None:
            return 0.0
        mean, std = self._stats()
        y = (now - self._last - mean - self.acceptable_pause) / std
        x = y * (1.5976 + 0.070566 * y * y)
        # softplus(x) / ln 10, computed without overflow on either side.
        if x > 0:
            return (x + math.log1p(math.exp(-x))) / _LN10
        return math.log1p(math.exp(x)) / _LN10

    def is_available(self, now: float) -> bool:
        """True while phi is below the threshold."""
        return self.phi(now) < self.threshold

    def statistics(self) -> dict[str, float]:
        """Mean and std of the window (after min_std) and its size, for debugging and tests."""
        mean, std = self._stats()
        return {"mean": mean, "std": std, "samples": float(len(self._intervals))}

    def _add(self, interval: float) -> None:
        if len(self._intervals) == self._intervals.maxlen:
            old = self._intervals[0]
            self._sum -= old
            self._sum_sq -= old * old
        self._intervals.append(interval)
        self._sum += interval
        self._sum_sq += interval * interval

    def _stats(self) -> tuple[float, float]:
        n = len(self._intervals)
        mean = self._sum / n
        var = max(self._sum_sq / n - mean * mean, 0.0)
        return mean, max(math.sqrt(var), self.min_std)
