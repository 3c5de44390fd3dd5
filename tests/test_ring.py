"""The pure ring package: partitioner, ring value, claim and plan, preference lists.

The claim grid is the issue's acceptance test: for every cluster size n in 1..64 and Q in
{64, 256, 1024, 4096}, each cluster grown one node at a time from a one-node ring (the way
real clusters grow), check balance, the N-distinct property and the partitions moved by
each join.  It is built once per module (about two seconds on a laptop).
"""

from __future__ import annotations

import math
import os
import pickle
import subprocess
import sys
import textwrap
import time
from collections import Counter

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvd.ring import (
    FALLBACK,
    PRIMARY,
    Move,
    Ring,
    annotated_preference_list,
    claim,
    distinct_feasible,
    effective_n,
    fallbacks,
    n_distinct_feasible,
    new_ring,
    partition_of,
    plan,
    preference_list,
    violations,
    zones_enforced,
)

N = 3
QS = (64, 256, 1024, 4096)
MAX_NODES = 64


def names(n: int) -> list[str]:
    return [f"n{i:02d}" for i in range(n)]


def join_budget(q: int, n_after: int) -> int:
    """Partitions a join to ``n_after`` nodes may move: 1.1 * q / n_after, rounded UP.

    A partition is indivisible, so the 10% allowance is rounded up to a whole partition:
    when q / n_after < 10 the allowance is less than one partition and this tolerates one
    partition above the ideal, never more (e.g. q=64, 33 nodes: ideal 1.94, budget 3).
    """
    return math.ceil(1.1 * q / n_after)


def assert_balanced(owners, members) -> None:
    q, n = len(owners), len(members)
    counts = Counter(owners)
    assert set(counts) <= set(members)
    low, high = q // n, -(-q // n)
    assert all(low <= counts[m] <= high for m in members), sorted(counts.values())


_GRID_SECONDS: list[float] = []


@pytest.fixture(scope="module")
def grid() -> dict[int, list[Ring]]:
    """q -> rings[n - 1] for n = 1..64 nodes, grown one join at a time."""
    started = time.perf_counter()
    out = {}
    for q in QS:
        rings = [new_ring("n00", q)]
        for n in range(2, MAX_NODES + 1):
            rings.append(rings[-1].with_owners(claim(rings[-1], names(n), N)))
        out[q] = rings
    _GRID_SECONDS.append(time.perf_counter() - started)
    return out


# -- claim: the grid ---------------------------------------------------------------------


def test_claim_grid_is_fast(grid) -> None:
    # The acceptance bound is 60 s on a slow 2-core machine; it takes ~2 s on a laptop.
    print(f"claim grid: {_GRID_SECONDS[0]:.2f}s for {len(QS) * (MAX_NODES - 1)} claims")
    assert _GRID_SECONDS[0] < 60


@pytest.mark.parametrize("q", QS)
def test_grid_balance(grid, q) -> None:
    for n, ring in enumerate(grid[q], start=1):
        assert_balanced(ring.owners, names(n))
        assert ring.nodes() == names(n)


@pytest.mark.parametrize("q", QS)
def test_grid_n_distinct(grid, q) -> None:
    for n, ring in enumerate(grid[q], start=1):
        # With Q a power of two, 3 nodes can never be 3-distinct (the layout would need
        # period 3); from 4 nodes on it is achievable, and claim achieves it.
        assert n_distinct_feasible(q, n, N) == (n >= N + 1)
        if n >= N + 1:
            assert violations(ring.owners, N) == 0, n
        elif n == N:
            # The 3-stripe: its one seam spoils N - 1 windows.
            assert violations(ring.owners, N) <= N - 1


@pytest.mark.parametrize("q", QS)
def test_grid_join_moves(grid, q) -> None:
    rings = grid[q]
    worst = 0.0
    for n in range(1, MAX_NODES):
        before, after = rings[n - 1], rings[n]
        joiner = names(n + 1)[-1]
        moves = plan(before, after.owners)
        ideal = q / (n + 1)
        assert len(moves) <= join_budget(q, n + 1), (n, len(moves), ideal)
        # Nothing moves between the old nodes: every partition moved goes to the joiner.
        assert {m.target for m in moves} == {joiner}
        worst = max(worst, len(moves) / ideal)
    print(f"q={q}: worst moved/ideal over joins 1->64 = {worst:.3f}")


@pytest.mark.parametrize("q", QS)
def test_grid_preference_lists_are_consecutive_owners(grid, q) -> None:
    # Once the ring is N-distinct, a key's replicas are simply the next N partitions' owners.
    for ring in grid[q][N:]:
        for p in range(0, q, max(1, q // 64)):
            expect = [ring.owners[(p + i) % q] for i in range(N)]
            assert preference_list(ring, p, N) == expect


# -- claim: leaving nodes ----------------------------------------------------------------


@pytest.mark.parametrize("q", QS)
def test_remove_one_node(grid, q) -> None:
    sizes = range(2, MAX_NODES + 1) if q <= 1024 else [*range(2, 17), 24, 32, 48, 64]
    for n in sizes:
        ring = grid[q][n - 1]
        members = names(n)
        for victim in sorted({members[0], members[n // 2], members[-1]}):
            rest = [m for m in members if m != victim]
            owners = claim(ring, rest, N)
            moves = plan(ring, owners)
            own = ring.owners.count(victim)
            fixups = [m for m in moves if m.source != victim]
            assert {m.partition for m in moves} >= set(ring.partitions_of(victim))
            assert_balanced(owners, rest)
            if n - 1 <= N:
                # N-distinct is out of reach: nothing but the victim's partitions moves.
                assert not fixups
            else:
                assert violations(owners, N) == 0, (n, victim)
            if n - 1 >= N + 2:
                assert len(fixups) <= 4, (n, victim, len(fixups))
            elif n - 1 == N + 1:
                # Four nodes, N = 3: every window holds 3 of the 4 nodes, so the layout is
                # rigid and a leaving node's share cannot simply be handed out; the repair
                # moves some more (measured: 34% to 51% of the victim's share).
                assert len(fixups) <= 3 * own // 5, (n, victim, len(fixups), own)


def test_replace_moves_only_the_leavers_partitions() -> None:
    ring = new_ring("n00", 1024)
    for n in range(2, 9):
        ring = ring.with_owners(claim(ring, names(n), N))
    members = [*names(8)[:3], *names(8)[4:], "fresh"]
    owners = claim(ring, members, N)
    moves = plan(ring, owners)
    assert {(m.source, m.target) for m in moves} == {("n03", "fresh")}
    assert len(moves) == ring.owners.count("n03")
    assert violations(owners, N) == 0


def test_bootstrap_keeps_the_first_nodes_share_in_place() -> None:
    for q in (64, 1024):
        ring = new_ring("n00", q)
        owners = claim(ring, names(10), N)
        assert_balanced(owners, names(10))
        assert violations(owners, N) == 0
        assert len(plan(ring, owners)) == q - owners.count("n00")


def test_several_joins_at_once() -> None:
    q = 1024
    ring = new_ring("n00", q)
    for n in range(2, 6):
        ring = ring.with_owners(claim(ring, names(n), N))
    owners = claim(ring, names(8), N)
    assert_balanced(owners, names(8))
    assert violations(owners, N) == 0
    moves = plan(ring, owners)
    assert {m.target for m in moves} <= {"n05", "n06", "n07"}
    assert len(moves) <= math.ceil(1.1 * q * 3 / 8)


def test_more_members_than_partitions() -> None:
    ring = new_ring("a", 8)
    members = [f"m{i:02d}" for i in range(12)]
    owners = claim(ring, members, N)
    assert_balanced(owners, members)
    assert violations(owners, N) == 0


@given(
    q=st.sampled_from([8, 16, 32, 64]),
    n_val=st.integers(1, 4),
    steps=st.lists(st.sets(st.sampled_from([f"h{i}" for i in range(12)]), min_size=1), max_size=5),
)
@settings(max_examples=40, deadline=None)
def test_claim_properties_on_random_histories(q, n_val, steps) -> None:
    ring = new_ring("h0", q)
    for members in steps:
        owners = claim(ring, sorted(members), n_val)
        assert owners == claim(ring, sorted(members, reverse=True), n_val)
        assert_balanced(owners, sorted(members))
        if n_distinct_feasible(q, len(members), n_val):
            assert violations(owners, n_val) == 0
        ring = ring.with_owners(owners)


def test_claim_rejects_bad_arguments() -> None:
    ring = new_ring("a", 64)
    with pytest.raises(ValueError):
        claim(ring, [], N)
    with pytest.raises(ValueError):
        claim(ring, ["a"], 0)
    with pytest.raises(ValueError):
        claim(ring, ["a", ""], N)


# -- feasibility: the exact condition of Rule 2 -------------------------------------------


@pytest.mark.parametrize(
    "q, counts, n_val, expected",
    [
        (64, [22, 21, 21], 3, False),  # 3 owners need period 3; 64 % 3 != 0
        (63, [21, 21, 21], 3, True),
        (64, [16, 16, 16, 16], 3, True),
        (5, [2, 1, 1, 1], 3, False),  # the twice-owned node needs 2 * 3 <= 5
        (7, [2, 2, 2, 1], 3, True),  # a b c a b c d
        (64, [32, 32], 2, True),
        (64, [64], 1, True),
        (64, [40, 8, 8, 8], 3, False),
    ],
)
def test_distinct_feasible_table(q, counts, n_val, expected) -> None:
    assert distinct_feasible(q, counts, n_val) is expected


# -- zones ----------------------------------------------------------------------------------


def zone_map(n: int, zones: int) -> dict[str, str]:
    return {m: f"z{i % zones}" for i, m in enumerate(names(n))}


@pytest.mark.parametrize("q", QS)
@pytest.mark.parametrize("n", range(6, 13))
def test_three_zones_cannot_span_every_window(q, n) -> None:
    """The issue asked for: 3 zones, 6-12 nodes, every 3 consecutive partitions in 3 zones.

    That is impossible for every power-of-two Q: if every window of 3 holds all 3 zones,
    zone(p + 3) == zone(p) for all p, so the zone sequence has period 3 and 3 divides Q.
    claim therefore treats it as best effort (``zones_enforced`` is False) and still keeps
    balance and distinct nodes; 4 or more zones are needed (next test).
    """
    zones = zone_map(n, 3)
    assert not zones_enforced(list(Counter(zones.values()).values()), N)
    owners = claim(new_ring("n00", q, zones), names(n), N)
    assert_balanced(owners, names(n))
    assert violations(owners, N) == 0
    totals = Counter(zones[x] for x in owners)
    assert not distinct_feasible(q, list(totals.values()), N)


@pytest.mark.parametrize("q", QS)
def test_four_zones_span_every_window(q) -> None:
    """4 zones (nodes assigned round-robin): whenever each zone holds fewer than 1/3 of the
    nodes (4, 7, 8, 10, 11, 12 nodes) every 3 consecutive partitions are in 3 distinct zones;
    both for a cluster created at that size and one grown a node at a time."""
    zones = zone_map(16, 4)
    ring = new_ring("n00", q, zones)
    for n in range(2, 13):
        members = names(n)
        enforced = zones_enforced(list(Counter(zones[m] for m in members).values()), N)
        assert enforced == (n in (4, 7, 8, 10, 11, 12))
        ring = ring.with_owners(claim(ring, members, N))
        fresh = claim(new_ring("n00", q, zones), members, N)
        for owners in (ring.owners, fresh):
            assert_balanced(owners, members)
            if n >= N + 1:
                assert violations(owners, N) == 0
            if enforced:
                assert violations(owners, N, zones) == 0, n


def test_zone_argument_overrides_the_rings_zones() -> None:
    zones = zone_map(8, 4)
    with_arg = claim(new_ring("n00", 256), names(8), N, zones=zones)
    from_ring = claim(new_ring("n00", 256, zones), names(8), N)
    assert with_arg == from_ring
    assert violations(with_arg, N, zones) == 0


# -- determinism ------------------------------------------------------------------------------


def _claims_digest() -> str:
    import hashlib

    ring = new_ring("n00", 256)
    out = []
    for n in range(2, 10):
        ring = ring.with_owners(claim(ring, names(n), N))
        out.append(ring.owners)
    out.append(claim(ring, names(9)[1:], N))
    out.append(claim(new_ring("n00", 256, zone_map(10, 4)), names(10), N))
    return hashlib.sha256(repr(out).encode()).hexdigest()


def test_claim_is_deterministic_across_processes() -> None:
    code = textwrap.dedent(
        """
        import sys
        sys.path.insert(0, {tests!r})
        from test_ring import _claims_digest
        print(_claims_digest())
        """
    ).format(tests=os.path.dirname(__file__))
    digests = set()
    for seed in ("0", "1", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        done = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
        )
        digests.add(done.stdout.strip())
    assert digests == {_claims_digest()}


def test_claim_ignores_member_order_and_duplicates() -> None:
    ring = new_ring("n00", 256)
    for n in range(2, 7):
        ring = ring.with_owners(claim(ring, names(n), N))
    members = names(8)
    assert claim(ring, members, N) == claim(ring, [*reversed(members), members[3]], N)


# -- plan ---------------------------------------------------------------------------------


def test_plan_lists_exactly_the_changed_partitions(grid) -> None:
    before, after = grid[256][6], grid[256][7]
    moves = plan(before, after.owners)
    changed = [p for p in range(256) if before.owners[p] != after.owners[p]]
    assert [m.partition for m in moves] == changed
    for m in moves:
        assert m == Move(m.partition, before.owners[m.partition], after.owners[m.partition])
    assert plan(before, before.owners) == []


@pytest.mark.parametrize(
    "old, new, expected",
    [
        ("aaaa", "aaaa", []),
        ("aaaa", "abab", [Move(1, "a", "b"), Move(3, "a", "b")]),
        ("abcd", "dbca", [Move(0, "a", "d"), Move(3, "d", "a")]),
    ],
)
def test_plan_table(old, new, expected) -> None:
    assert plan(Ring(4, tuple(old), 3), tuple(new)) == expected


def test_plan_rejects_wrong_length() -> None:
    with pytest.raises(ValueError):
        plan(new_ring("a", 4), ("a", "a"))


# -- preference lists -----------------------------------------------------------------------

# partition:   0    1    2    3    4    5    6    7
SMALL = Ring(8, ("a", "b", "c", "a", "d", "b", "c", "d"), 1)


@pytest.mark.parametrize(
    "partition, n, expected",
    [
        (0, 3, ["a", "b", "c"]),
        (2, 3, ["c", "a", "d"]),
        (3, 2, ["a", "d"]),
        (7, 3, ["d", "a", "b"]),  # wraps around
        (5, 4, ["b", "c", "d", "a"]),
        (0, 9, ["a", "b", "c", "d"]),  # never more than the distinct owners
        (4, 1, ["d"]),
        (4, 0, []),
    ],
)
def test_preference_list_table(partition, n, expected) -> None:
    assert preference_list(SMALL, partition, n) == expected


@pytest.mark.parametrize(
    "partition, n, up, expected",
    [
        (0, 3, "abcd", [("a", PRIMARY, None), ("b", PRIMARY, None), ("c", PRIMARY, None)]),
        (0, 3, "acd", [("a", PRIMARY, None), ("d", FALLBACK, "b"), ("c", PRIMARY, None)]),
        (0, 3, "cd", [("d", FALLBACK, "a"), ("c", PRIMARY, None)]),  # one fallback for two
        (0, 3, "abc", [("a", PRIMARY, None), ("b", PRIMARY, None), ("c", PRIMARY, None)]),
        (2, 3, "ab", [("b", FALLBACK, "c"), ("a", PRIMARY, None)]),
        (7, 2, "bc", [("b", FALLBACK, "d"), ("c", FALLBACK, "a")]),
        (7, 3, "", []),
    ],
)
def test_annotated_preference_list_table(partition, n, up, expected) -> None:
    assert annotated_preference_list(SMALL, partition, n, set(up)) == expected
    # A predicate is accepted as well as a collection.
    assert annotated_preference_list(SMALL, partition, n, lambda x: x in up) == expected


@pytest.mark.parametrize(
    "partition, n, up, expected",
    [
        (0, 3, "abcd", ["d"]),
        (0, 3, "abc", []),
        (0, 2, "abcd", ["c", "d"]),
        (2, 2, "abcd", ["d", "b"]),
    ],
)
def test_fallbacks_table(partition, n, up, expected) -> None:
    assert fallbacks(SMALL, partition, n, set(up)) == expected


def test_effective_n() -> None:
    assert effective_n(SMALL, 3) == 3
    assert effective_n(SMALL, 5) == 4
    assert effective_n(new_ring("a", 8), 3) == 1


rings_strategy = st.integers(1, 5).flatmap(
    lambda bits: st.lists(
        st.sampled_from("abcdefg"), min_size=2**bits, max_size=2**bits
    ).map(lambda owners: Ring(len(owners), tuple(owners), 1))
)


@given(
    ring=rings_strategy,
    data=st.data(),
    n=st.integers(0, 5),
    up=st.sets(st.sampled_from("abcdefg")),
)
def test_annotated_preference_list_invariants(ring, data, n, up) -> None:
    partition = data.draw(st.integers(0, ring.q - 1))
    primaries = preference_list(ring, partition, n)
    assert len(primaries) == len(set(primaries)) == min(n, len(ring.nodes()))
    # Clockwise: primaries appear in the order of their first partition after `partition`.
    firsts = [
        next(i for i in range(ring.q) if ring.owners[(partition + i) % ring.q] == node)
        for node in primaries
    ]
    assert firsts == sorted(firsts) and (not firsts or firsts[0] == 0)
    apl = annotated_preference_list(ring, partition, n, up)
    nodes = [node for node, _, _ in apl]
    assert len(nodes) == len(set(nodes)) <= len(primaries)
    assert all(node in up for node in nodes)
    for node, kind, stands_for in apl:
        if kind == PRIMARY:
            assert node in primaries and stands_for is None
        else:
            assert kind == FALLBACK and node not in primaries
            assert stands_for in primaries and stands_for not in up
    down = [p for p in primaries if p not in up]
    spare = fallbacks(ring, partition, n, up)
    assert len(apl) == len(primaries) - len(down) + min(len(down), len(spare))


# -- partitioner -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key, partition",
    [
        (b"", 914),
        (b"a", 259),
        (b"hello", 670),  # blake2b-64("hello") = a7b6eda801e5347d; top 10 bits = 670
        (b"kvd", 187),
        (b"user:42", 868),
        (bytes(range(16)), 978),
    ],
)
def test_partition_of_is_pinned(key, partition) -> None:
    # These values may never change: every stored key would be looked up elsewhere.
    assert partition_of(key, 1024) == partition
    assert partition_of(key, 64) == partition >> 4
    assert partition_of(key, 1) == 0


@given(key=st.binary(max_size=1024), bits=st.integers(0, 20))
def test_partition_of_in_range_and_prefix_stable(key, bits) -> None:
    q = 2**bits
    p = partition_of(key, q)
    assert 0 <= p < q
    # Doubling q splits each partition in two: the old partition is the new one's prefix.
    assert partition_of(key, 2 * q) >> 1 == p


@pytest.mark.parametrize("q", [0, -4, 3, 6, 1000, 2**65, True, 2.0])
def test_partition_of_rejects_q_not_power_of_two(q) -> None:
    with pytest.raises(ValueError):
        partition_of(b"k", q)


# -- the ring value --------------------------------------------------------------------------


def test_ring_accessors() -> None:
    assert SMALL.nodes() == ["a", "b", "c", "d"]
    assert SMALL.partitions_of("a") == [0, 3]
    assert SMALL.partitions_of("zz") == []
    assert SMALL.ownership() == {"a": 0.25, "b": 0.25, "c": 0.25, "d": 0.25}
    ring = new_ring("solo", 16)
    assert ring.version == 1 and ring.owners == ("solo",) * 16 and ring.nodes() == ["solo"]
    nxt = ring.with_owners(("solo", "other") * 8, {"solo": "z1"})
    assert nxt.version == 2 and dict(nxt.zones) == {"solo": "z1"}


def test_ring_roundtrips_through_msgpack_and_pickle() -> None:
    ring = Ring(8, SMALL.owners, 7, {"a": "z1", "b": "z2"})
    wire = msgpack.packb(ring.to_dict())
    again = Ring.from_dict(msgpack.unpackb(wire))
    assert again == ring and hash(again) == hash(ring)
    assert pickle.loads(pickle.dumps(ring)) == ring
    assert len({ring, again}) == 1


@pytest.mark.parametrize(
    "mangle",
    [
        lambda d: d.pop("owners"),
        lambda d: d.update(owners=[0, 1, 9, 0, 0, 0, 0, 0]),
        lambda d: d.update(owners=[0] * 7),
        lambda d: d.update(q=6),
        lambda d: d.update(version=-1),
        lambda d: d.update(nodes="abcd"),
        lambda d: d.update(zones=["a"]),
        lambda d: d.update(owners=[True] * 8),
    ],
)
def test_ring_from_dict_rejects_malformed_input(mangle) -> None:
    d = SMALL.to_dict()
    mangle(d)
    with pytest.raises(ValueError):
        Ring.from_dict(d)


def test_ring_validates() -> None:
    with pytest.raises(ValueError):
        Ring(8, ("a",) * 7, 1)
    with pytest.raises(ValueError):
        Ring(6, ("a",) * 6, 1)
    with pytest.raises(ValueError):
        Ring(2, ("a", ""), 1)
    with pytest.raises(ValueError):
        new_ring("a", 100)


# -- purity ----------------------------------------------------------------------------------


def test_importing_kvd_ring_imports_neither_trio_nor_plyvel() -> None:
    code = (
        "import sys, kvd.ring, kvd.ring.claim, kvd.ring.apl, kvd.ring.ring\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('trio', 'plyvel'))\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
