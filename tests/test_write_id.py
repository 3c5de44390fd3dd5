"""Versions rule 7: one client write is one sibling, even when minted twice (issue 9, bug 15)."""

from __future__ import annotations

import itertools

from kvd.versions import (
    decode_object,
    empty,
    encode_object,
    sync,
    sync_with_discarded,
    update,
)

WID = b"w" * 8


def _twins():
    """The same client write minted by two replicas (the coordinator retried on b)."""
    at_a, _ = update(empty(), {}, "a:1", value=b"v", wid=WID)
    at_b, _ = update(empty(), {}, "b:1", value=b"v", wid=WID)
    return at_a, at_b


def test_merge_keeps_one_sibling_of_a_write_minted_twice_and_sees_both_dots():
    at_a, at_b = _twins()
    merged = sync(at_a, at_b)
    assert [s.dot for s in merged.siblings] == [("a:1", 1)]
    assert merged.clock == {"a:1": 1, "b:1": 1}
    assert sync(at_b, at_a) == merged
    assert sync(merged, at_b) == merged and sync(at_a, merged) == merged
    assert decode_object(encode_object(merged)) == merged


def test_merge_of_twins_is_order_independent_with_a_concurrent_write():
    at_a, at_b = _twins()
    other, _ = update(empty(), {}, "c:1", value=b"other")
    objects = [at_a, at_b, other]
    results = set()
    for order in itertools.permutations(objects):
        left = sync(sync(order[0], order[1]), order[2])
        right = sync(order[0], sync(order[1], order[2]))
        results.update({left, right})
    assert len(results) == 1
    (result,) = results
    assert sorted(s.value for s in result.siblings) == [b"other", b"v"]


def test_a_write_already_held_is_not_minted_again():
    at_a, at_b = _twins()
    merged = sync(at_a, at_b)  # b received a's copy by replication, then the late mint came
    again, discarded = update(merged, {}, "b:1", value=b"v", wid=WID)
    assert again == merged and discarded == []


def test_dropping_a_twin_frees_no_chunks_the_kept_one_uses():
    from kvd.versions import ChunkRef

    ref = ChunkRef(b"u" * 16, 10, 1)
    at_a, _ = update(empty(), {}, "a:1", chunks=ref, wid=WID)
    at_b, _ = update(empty(), {}, "b:1", chunks=ref, wid=WID)
    merged, discarded = sync_with_discarded(at_b, at_a)
    assert [s.dot for s in merged.siblings] == [("a:1", 1)]
    assert {s.chunks.vid for s in discarded} <= {s.chunks.vid for s in merged.siblings}


def test_a_superseded_write_stays_superseded_when_its_twin_arrives_later():
    at_a, at_b = _twins()
    merged = sync(at_a, at_b)
    replaced, _ = update(merged, merged.clock, "a:1", value=b"new")
    assert [s.value for s in sync(replaced, at_b).siblings] == [b"new"]
    assert [s.value for s in sync(replaced, at_a).siblings] == [b"new"]
