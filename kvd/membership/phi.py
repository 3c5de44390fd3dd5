"""Phi accrual failure detector (Hayashibara et al., 2004), in the form Akka uses.

Pure: no clock of its own; every call takes ``now`` (seconds, any monotonic origin).

The detector keeps a sliding window of samples of "how long after the last heartbeat did
the next one arrive" and answers, for the time elapsed since the last heartbeat,
phi = -log10(P(the next heartbeat is still to come)), the samples being approximated by a
normal distribution of their mean and standard deviation.  The normal CDF is replaced by
the logistic approximation Akka uses (Bowling et al. 2009): with
y = (elapsed - mean - acceptable_pause) / std and x = y * (1.5976 + 0.070566 * y**2),
P ~ 1 / (1 + e**x), so phi = softplus(x) / ln 10.  phi = 8 means "the chance that a live
node is this late is 1e-8"; it is reached at about mean + acceptable_pause + 5.2 * std.

Invariants:

1. ``phi(now)`` is 0.0 until the first heartbeat; afterwards it is non-decreasing in ``now``
   between two heartbeats, and a heartbeat brings it back down.
2. The window is bootstrapped with two samples, ``first_interval -/+ first_interval / 4``, so
   that after a single heartbeat the node is judged as if it had been beating at
   ``first_interval``.
3. ``heartbeat(now, emitted)``: the sample is ``now - last`` and ``last`` becomes
   ``emitted`` (default ``now``: the classic detector over arrival times).  A heartbeat whose
   emission is not later than ``last`` refreshes nothing and adds no sample (several
   messages merged at the same instant are one arrival).
4. A sample is capped at the silence that would have convicted the node when it arrived
   (``conviction_interval``), so a pause is learnt as "as late as a live node may be" and
   no more. Learnt whole, one 20 s pause among ~100 one-second samples adds ~4 s to the
   standard deviation and ~20 s to the next detection (measured: 5.6-6.6 s for a first
   pause, 8-13 s after a few); capped, detection after any number of pauses stays within
   ~1 s of the first (tests/test_phi_pauses.py). This is Cassandra's max interval and Akka's
   acceptable pause, relative to what the window has learnt rather than a fixed number, so
   a slow but steady network (a large cluster's staleness) is still learnt, a sample at a
   time.
5. A ``HeartbeatHistory`` may be shared by several detectors (members.py pools one per
   member table); ``reset`` then forgets only this detector's last heartbeat.

What an observer hears, and why the defaults are what they are
-------------------------------------------------------------------
kvd does not ping.  Node X bumps its own heartbeat counter every gossip round (1 s) and the
counter spreads epidemically: each round every node exchanges digests with ONE random peer
(push-pull).  Observer O feeds X's detector whenever X's counter advances in O's table,
whoever brought it.  News about X therefore reaches O irregularly and late: in a 64-node
cluster the freshest counter O holds is on average 2.5 s old and up to ~6 s old (1.9 s at 3
nodes, 5 s at 16, 7 s at 128).  That staleness is what a detector must tolerate, and it is
what a dead node's silence has to exceed.

Classic phi over arrival times measures the silence from the last *arrival*, but after X
stops its last counters keep arriving at O for up to ~4.5 s (the epidemic is still
delivering them).  In the 64-node simulation no setting of min_std/acceptable_pause gave
both zero false positives and conviction within 10 s: zero false positives cost 10-12.5 s.
So members.py sends each record's *age* along with it, and the detector is fed
``heartbeat(now, emitted=now - age)``: the silence is measured from when X last spoke, and
the sample ``arrival - previous emission`` is exactly the staleness an observer sees before
news arrives.  After X stops, every observer's phi rises on the same schedule.

The defaults, chosen with the pure simulation in tests/test_membership.py (64 nodes, random
and synchronised gossip phases, seeded, several seeds; all nodes start at once, which is the
hardest case because the history is still short while staleness builds up):

* ``min_std = 0.7`` s: the samples are at least a second apart and clumpy; with a smaller
  floor the first seconds after a synchronised start (history still short, staleness still
  growing) produced false positives.  At 64 nodes the learnt std is ~0.8 s anyway.
* ``acceptable_pause = 1.0`` s, added to the mean: headroom for what the window has not
  seen yet (a GC pause, a slow round).  Akka's cluster default is 3 s; ours is smaller
  because staleness is already part of the samples.
* ``first_interval = 1.0`` s: the gossip interval.  ``window = 1000`` as in Akka: pooled
  over a 64-node table (~40 samples/s) that is ~25 s of history, at 2 nodes ~16 minutes.

Results (threshold 8, the design default; 64 nodes, 12 seeded runs, half phase-locked):
zero false positives over 120 s (~500 000 arrivals each run); a stopped node is judged
down by every observer 7.6-8.8 s after its last heartbeat with random gossip phases and
7.6-9.5 s phase-locked (5.7-7.9 s at 2-32 nodes); a restarted node is judged up by every
observer within 4.4 s (the time its new generation takes to reach everyone).  Lowering
acceptable_pause to 0 saves ~1 s of detection and brought the first false positives (in
the seconds after a synchronised start).  With plain 1 s heartbeats and no ages, phi
crosses 8 about 5.6 s after the last heartbeat.

Operators raise ``threshold`` (10-12) on a lossy network, trading detection time for fewer
false alarms.
"""

from __future__ import annotations

import math
from collections import deque

__all__ = ["HeartbeatHistory", "PhiAccrualDetector"]

_LN10 = math.log(10.0)


def _y_at(threshold: float) -> float:
    """The y at which phi equals ``threshold`` (phi is increasing in y): solved once, so that
    ``is_available`` is a comparison (the coordinator asks it on every request)."""
    target = threshold * _LN10  # softplus(x) = target
    x = target + math.log1p(-math.exp(-target))  # inverse softplus, overflow-free
    lo, hi = -1e3, 1e3
    for _ in range(200):
        mid = (lo + hi) / 2
        if mid * (1.5976 + 0.070566 * mid * mid) < x:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


class HeartbeatHistory:
    """Sliding window of inter-arrival samples with running mean and variance."""

    def __init__(self, window: int = 1000) -> None:
        if window < 2:
            raise ValueError("window must be >= 2")
        self._samples: deque[float] = deque(maxlen=window)
        self._sum = 0.0
        self._sum_sq = 0.0
        self._stats: tuple[float, float] | None = None
        self.version = 0  # bumped by every change, so detectors can cache what they derive
        # Conviction intervals of this version, by detector parameters: the detectors that
        # share a history (a member table's) compute each once, not once per member.
        self.intervals: dict[tuple[float, ...], float] = {}

    def __len__(self) -> int:
        return len(self._samples)

    def add(self, sample: float) -> None:
        """Append one sample, evicting the oldest when the window is full."""
        if len(self._samples) == self._samples.maxlen:
            old = self._samples[0]
            self._sum -= old
            self._sum_sq -= old * old
        self._samples.append(sample)
        self._sum += sample
        self._sum_sq += sample * sample
        self._stats = None
        self.version += 1
        if self.intervals:
            self.intervals.clear()

    def clear(self) -> None:
        """Forget every sample."""
        self._samples.clear()
        self._sum = 0.0
        self._sum_sq = 0.0
        self._stats = None
        self.version += 1
        self.intervals.clear()

    def mean_std(self) -> tuple[float, float]:
        """Mean and (population) standard deviation; the window must not be empty."""
        if self._stats is None:
            n = len(self._samples)
            mean = self._sum / n
            self._stats = (mean, math.sqrt(max(self._sum_sq / n - mean * mean, 0.0)))
        return self._stats


class PhiAccrualDetector:
    """Suspicion level of one node, from the arrival times of its heartbeats."""

    def __init__(
        self,
        threshold: float = 8.0,
        window: int = 1000,
        min_std: float = 0.7,
        acceptable_pause: float = 1.0,
        first_interval: float = 1.0,
        history: HeartbeatHistory | None = None,
    ) -> None:
        if threshold <= 0:
            raise ValueError("threshold must be > 0")
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
        self._y_threshold = _y_at(threshold)
        # What the conviction interval depends on, besides the history.
        self._params = (threshold, min_std, acceptable_pause, first_interval)
        self._shared = history is not None
        self._history = history if history is not None else HeartbeatHistory(window)
        self._last: float | None = None
        # conviction_interval() and the history version it was computed at: is_available is
        # asked for every member on every gossip round, far more often than samples arrive.
        self._interval = 0.0
        self._interval_at = -1

    @property
    def last_heartbeat(self) -> float | None:
        """Time of the last heartbeat, or None before the first."""
        return self._last

    def reset(self) -> None:
        """Forget the node's last heartbeat and its own history (a shared one is kept)."""
        if not self._shared:
            self._history.clear()
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
            if not len(self._history):
                std = self.first_interval / 4.0
                self._history.add(self.first_interval - std)
                self._history.add(self.first_interval + std)
            self._last = sent
        elif sent > last:
            self._history.add(min(now - last, self.conviction_interval()))  # invariant 4
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
        """True while phi is below the threshold (computed without evaluating phi)."""
        last = self._last
        if last is None:
            return True
        return now - last < self.conviction_interval()

    def heard_and_available(self, now: float) -> bool:
        """Heard from at least once and phi below the threshold: a member table's "up".
        One call with the cached interval inline: a 64-node table asks it of every member
        twice per gossip exchange."""
        last = self._last
        if last is None:
            return False
        if self._interval_at == self._history.version:
            return now - last < self._interval
        return now - last < self.conviction_interval()

    def conviction_interval(self) -> float:
        """Seconds of silence after the last heartbeat at which phi reaches the threshold."""
        history = self._history
        if self._interval_at != history.version:
            interval = history.intervals.get(self._params)
            if interval is None:
                mean, std = self._stats()
                interval = mean + self.acceptable_pause + self._y_threshold * std
                history.intervals[self._params] = interval
            self._interval, self._interval_at = interval, history.version
        return self._interval

    def statistics(self) -> dict[str, float]:
        """Mean and std of the window (after min_std) and its size, for debugging and tests."""
        mean, std = self._stats()
        return {"mean": mean, "std": std, "samples": float(len(self._history))}

    def _stats(self) -> tuple[float, float]:
        if not len(self._history):  # only before the first heartbeat
            return self.first_interval, max(self.first_interval / 4.0, self.min_std)
        mean, std = self._history.mean_std()
        return mean, max(std, self.min_std)
