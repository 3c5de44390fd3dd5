"""Failure detection stays as fast after pauses as before them (issue 9, bug 16).

A paused node (SIGSTOP, a long GC, a partition that heals) leaves one long interval in the
observers' heartbeat history when it comes back. Learnt as it is, each such interval raises
the mean and, squared, the variance of the window, so every later failure takes longer to
detect: 5.6-6.6 s for a first pause became 8-13 s for later ones. The detector caps what it
learns (Cassandra's max interval, Akka's acceptable pause), so the bound holds after any
number of pauses. Pure: member tables gossiping on a simulated clock, as in
test_membership.py.
"""

from __future__ import annotations

import heapq
import random

import pytest

from kvd.membership.members import MemberInfo, MemberTable
from kvd.membership.phi import PhiAccrualDetector


def _pauses_simulation(n: int, seed: int, pauses: int, pause=20.0, between=60.0, sync=False):
    """``n`` nodes gossip push-pull once a second; the last one pauses ``pauses`` times for
    ``pause`` seconds, ``between`` seconds apart (its generation stays: it resumes, it does
    not restart). Returns, per pause, the seconds from the victim's last heartbeat until the
    slowest observer judged it down, and the false positives about the other nodes."""
    rng = random.Random(seed)
    names = [f"n{i:02d}" for i in range(n)]
    index = {f"{name}:7380": i for i, name in enumerate(names)}
    seeds = [f"{name}:7380" for name in names[:3]]
    tables = [MemberTable(MemberInfo(name, f"{name}:7379", f"{name}:7380", 1000, 0))
              for name in names]
    victim = n - 1
    windows = [(between * (k + 1), between * (k + 1) + pause) for k in range(pauses)]
    detections: list[dict[int, float]] = [{} for _ in windows]
    false_positives = []
    last_beat = 0.0

    def paused(now):
        return next((k for k, (a, b) in enumerate(windows) if a <= now < b), None)

    events = [(0.0 if sync else rng.random(), i) for i in range(n)]
    heapq.heapify(events)
    next_probe, end = 0.0, windows[-1][1] + 10.0
    while events[0][0] < end:
        now, i = heapq.heappop(events)
        heapq.heappush(events, (now + 1.0, i))
        while next_probe <= now:
            k = paused(next_probe)
            for o in range(n - 1):
                if not tables[o].is_up(names[victim], next_probe) and k is not None:
                    detections[k].setdefault(o, next_probe - last_beat)
                # False positives about the live nodes, paused victim or not: each round
                # gossips with a live peer whatever else it tries (choose_gossip_targets), so
                # a down node never starves the live of news.
                for x in range(n - 1):
                    if x == o or next_probe < 10:
                        continue
                    if not tables[o].is_up(names[x], next_probe):
                        false_positives.append((round(next_probe, 2), names[o], names[x]))
            next_probe += 0.05
        if i == victim and paused(now) is not None:
            continue
        tables[i].tick(now)
        if i == victim:
            last_beat = now
        for target in tables[i].choose_gossip_targets(now, rng, seeds):
            j = index[target]
            if j == victim and paused(now) is not None:
                continue
            tables[j].merge(tables[i].digest(now), now)
            tables[i].merge(tables[j].digest(now), now)
    return [max(d.values()) if len(d) == n - 1 else None for d in detections], false_positives


@pytest.mark.parametrize(
    "n, seed, sync",
    [(3, 1, True), (3, 2, False), (5, 3, True), (8, 4, False), (16, 5, True)],
)
def test_detection_time_stays_bounded_after_earlier_pauses(n, seed, sync):
    times, false_positives = _pauses_simulation(n, seed, pauses=5, sync=sync)
    assert false_positives == []
    assert None not in times, f"a pause was never detected by everyone: {times}"
    first, later = times[0], times[1:]
    assert max(later) <= first + 1.0, f"detection slowed after earlier pauses: {times}"
    assert max(times) <= 10.0, times


@pytest.mark.parametrize(
    "history, gap",
    [
        ([1.0] * 50, 20.0),  # steady beats, then one long pause
        ([1.0, 1.5, 0.5] * 20, 60.0),  # jittery beats, then a very long pause
        ([2.5, 3.0, 2.0] * 20, 30.0),  # a large cluster's staleness, then a pause
    ],
)
def test_a_long_gap_barely_moves_the_conviction_time(history, gap):
    """Table-driven, one detector: the silence that convicts after a long gap is within
    10 % of the one before it."""
    det = PhiAccrualDetector()
    now = 0.0
    det.heartbeat(now)
    for interval in history:
        now += interval
        det.heartbeat(now)
    before = _conviction(det, now)
    now += gap
    det.heartbeat(now)
    after = _conviction(det, now)
    assert after <= before * 1.1, (before, after)


def _conviction(det: PhiAccrualDetector, last: float) -> float:
    """Seconds of silence after ``last`` until the detector judges the node down."""
    silence = 0.0
    while det.is_available(last + silence):
        silence += 0.01
    return silence
