"""The anti-entropy tree (kvd.aae): XOR laws, the exchange walk, encoding, dirty tracking."""

from __future__ import annotations

import random
import subprocess
import tracemalloc
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvd import aae
from kvd.aae import (
    BRANCHES,
    SEGMENTS,
    SEGMENTS_PER_BRANCH,
    ExchangeStats,
    Tree,
    diff_keys,
    differing_branches,
    differing_partitions,
    differing_segments,
    entry_hash,
    segment_of,
)

keys = st.binary(min_size=1, max_size=64)
digests = st.binary(min_size=8, max_size=8)
stores = st.dictionaries(keys, digests, max_size=60)


def build(items) -> Tree:
    tree = Tree()
    for key, digest in items:
        tree.update(key, None, digest)
    return tree


def xor_of(store: dict[bytes, bytes]) -> list[int]:
    """The tree invariant computed from scratch: per segment, the XOR of entry hashes."""
    segments = [0] * SEGMENTS
    for key, digest in store.items():
        segments[segment_of(key)] ^= entry_hash(key, digest)
    return segments


# --- hashes --------------------------------------------------------------------------------


def test_hashes_are_stable():
    # A storage and wire format: these values may change only together with HASH_VERSION.
    assert aae.HASH_VERSION == 1
    assert (segment_of(b"k"), segment_of(b"hello")) == (976, 295)
    assert entry_hash(b"hello", bytes(8)) == 0x79F44445AB637C49
    assert entry_hash(b"k", b"\x01" * 8) == 0x6AE6A4A1D242C1CD


@given(keys, digests)
def test_hash_ranges(key, digest):
    assert 0 <= segment_of(key) < SEGMENTS
    assert 0 <= entry_hash(key, digest) < 2**64


def test_entry_hash_separates_key_and_digest():
    # Length-prefixed: moving bytes between key and digest changes the hash.
    assert entry_hash(b"ab", b"c") != entry_hash(b"a", b"bc")
    assert entry_hash(b"a", b"d") != entry_hash(b"b", b"d")


def test_segments_spread_evenly():
    counts = [0] * SEGMENTS
    for i in range(64 * SEGMENTS):
        counts[segment_of(b"key-%d" % i)] += 1
    assert min(counts) > 20 and max(counts) < 120


# --- XOR laws -----------------------------------------------------------------------------


@given(stores, st.randoms(use_true_random=False))
def test_tree_is_xor_of_entries_in_any_order(store, rnd):
    items = list(store.items())
    rnd.shuffle(items)
    tree = build(items)
    expected = xor_of(store)
    assert [tree.segment(i) for i in range(SEGMENTS)] == expected
    root = 0
    for h in expected:
        root ^= h
    assert tree.root() == root
    for b, h in enumerate(tree.branches()):
        acc = 0
        for x in tree.branch_segments(b):
            acc ^= x
        assert h == acc
    assert tree == build(sorted(store.items()))


@given(stores, keys, digests)
def test_add_then_remove_is_identity(store, key, digest):
    before = build(store.items())
    tree = build(store.items())
    old = store.get(key)
    tree.update(key, old, digest)
    tree.update(key, digest, old)
    assert tree == before
    empty = build([(key, digest)])
    assert empty.update(key, digest, None) == segment_of(key)
    assert empty == Tree() and empty.root() == 0


@given(stores, st.lists(st.tuples(keys, st.none() | digests), max_size=40))
def test_incremental_updates_track_the_store(store, writes):
    """Any sequence of puts, replaces and deletes leaves the tree equal to a fresh build."""
    tree = build(store.items())
    store = dict(store)
    for key, digest in writes:
        assert tree.update(key, store.get(key), digest) == segment_of(key)
        if digest is None:
            store.pop(key, None)
        else:
            store[key] = digest
    assert tree == build(store.items())
    assert tree == Tree.from_entries(store.items())


def test_update_with_equal_digests_changes_nothing():
    tree = build([(b"a", b"1" * 8)])
    tree.update(b"a", b"1" * 8, b"1" * 8)
    tree.update(b"b", None, None)
    assert tree == build([(b"a", b"1" * 8)])


# --- the exchange walk --------------------------------------------------------------------


def walk(mine: dict, theirs: dict) -> tuple[list[int], list[bytes], list[bytes]]:
    """Follow the protocol from roots to keys, listing each segment's keys only when asked."""
    a, b = build(mine.items()), build(theirs.items())
    found_segments, i_need, they_need = [], [], []
    if not differing_partitions({7: a.root()}, {7: b.root()}):
        return found_segments, i_need, they_need
    for br in differing_branches(a.branches(), b.branches()):
        for seg in differing_segments(br, a.branch_segments(br), b.branch_segments(br)):
            found_segments.append(seg)
            need, give = diff_keys(
                {k: d for k, d in mine.items() if segment_of(k) == seg},
                {k: d for k, d in theirs.items() if segment_of(k) == seg},
            )
            i_need += need
            they_need += give
    return found_segments, i_need, they_need


def test_single_differing_key_is_found_alone():
    rnd = random.Random(4)
    store = {rnd.randbytes(16): rnd.randbytes(8) for _ in range(5000)}
    target = sorted(store)[1234]
    theirs = dict(store)
    theirs[target] = b"\xff" * 8
    assert walk(store, theirs) == ([segment_of(target)], [target], [target])
    # Missing on one side: only that side needs it.
    del theirs[target]
    assert walk(store, theirs) == ([segment_of(target)], [], [target])
    assert walk(theirs, store) == ([segment_of(target)], [target], [])
    # In sync: the roots match and nothing is descended.
    assert walk(store, dict(store)) == ([], [], [])


@given(stores, stores)
@settings(max_examples=50)
def test_walk_finds_exactly_the_differences(mine, theirs):
    segments, i_need, they_need = walk(mine, theirs)
    assert sorted(i_need) == sorted(k for k, d in theirs.items() if mine.get(k) != d)
    assert sorted(they_need) == sorted(k for k, d in mine.items() if theirs.get(k) != d)
    differing = {segment_of(k) for k in set(i_need) | set(they_need)}
    assert set(segments) == differing


def test_differing_partitions_compares_only_shared_partitions():
    mine = {0: 1, 1: 2, 2: 3, 5: 9}
    theirs = {0: 1, 1: 7, 2: 4, 3: 3}
    assert differing_partitions(mine, theirs) == [1, 2]
    assert differing_partitions({}, theirs) == []


def test_differing_segments_are_absolute():
    a = [0] * SEGMENTS_PER_BRANCH
    b = list(a)
    b[0], b[31] = 1, 2
    assert differing_segments(3, a, b) == [3 * SEGMENTS_PER_BRANCH, 3 * SEGMENTS_PER_BRANCH + 31]
    assert differing_segments(3, a, a) == []


@pytest.mark.parametrize(
    "call",
    [
        lambda: differing_branches([0] * BRANCHES, [0] * (BRANCHES - 1)),
        lambda: differing_segments(BRANCHES, [0] * SEGMENTS_PER_BRANCH, [0] * SEGMENTS_PER_BRANCH),
        lambda: differing_segments(0, [0] * SEGMENTS_PER_BRANCH, [0]),
        lambda: Tree([0] * (SEGMENTS - 1)),
        lambda: Tree([-1] + [0] * (SEGMENTS - 1)),
        lambda: Tree([2**64] + [0] * (SEGMENTS - 1)),
        lambda: Tree.from_bytes(bytes(8 * SEGMENTS - 1)),
    ],
)
def test_malformed_input_is_refused(call):
    with pytest.raises(ValueError):
        call()


def test_branch_segments_out_of_range():
    with pytest.raises(IndexError):
        Tree().branch_segments(BRANCHES)


def test_diff_keys():
    mine = {b"a": b"1", b"b": b"2", b"c": b"3"}
    theirs = {b"b": b"2", b"c": b"x", b"d": b"4"}
    assert diff_keys(mine, theirs) == ([b"c", b"d"], [b"a", b"c"])
    assert diff_keys(mine, mine) == ([], [])


def test_exchange_stats_add():
    total = ExchangeStats(1, 1, 2, 3, 100) + ExchangeStats(partitions_compared=4, bytes_exchanged=8)
    assert total == ExchangeStats(5, 1, 2, 3, 108)


# --- encoding and dirty tracking ----------------------------------------------------------


@given(stores)
def test_bytes_round_trip(store):
    tree = build(store.items())
    data = tree.to_bytes()
    assert len(data) == 8 * SEGMENTS
    back = Tree.from_bytes(data)
    assert back == tree
    assert (back.root(), back.branches()) == (tree.root(), tree.branches())
    assert Tree([tree.segment(i) for i in range(SEGMENTS)]) == tree


def test_bytes_are_little_endian():
    tree = Tree([1] + [0] * (SEGMENTS - 2) + [0x0102030405060708])
    data = tree.to_bytes()
    assert data[:8] == b"\x01" + bytes(7)
    assert data[-8:] == bytes.fromhex("0807060504030201")


def test_storing_the_segments_update_returns_reproduces_the_tree():
    """What the node does (kvd.node.local): each update's segment, stored beside the
    object, is all a stored tree needs to stay equal to the one in memory."""
    tree = build([(b"k%d" % i, b"d" * 8) for i in range(10)])
    stored = [tree.segment(i) for i in range(SEGMENTS)]
    for key, old, new in ((b"new", None, b"n" * 8), (b"k1", b"d" * 8, b"e" * 8),
                          (b"k0", b"d" * 8, None)):
        s = tree.update(key, old, new)
        stored[s] = tree.segment(s)
    assert Tree(stored) == tree


def test_a_tree_holds_its_segments_and_nothing_that_grows_with_its_updates():
    """A tree kept the set of segments updated since its last ``clear_changed``, which the
    node never called (it stores each touched segment from ``update``'s return, in the
    write's own batch): once writes had touched every segment, 54 KiB more per partition,
    about 54 MiB per node at the default 1,024 partitions on three nodes. A tree is its
    8 KiB of segments and 32 branches."""
    tree = Tree()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(20_000):
            tree.update(b"k%d" % i, None, b"d" * 8)
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 4096, grown


def test_imports_neither_trio_nor_plyvel():
    code = "import sys, kvd.aae; print(sorted({'trio', 'plyvel'} & set(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"
