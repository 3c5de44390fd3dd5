"""Versions rule 7: one client write is one sibling, even when minted twice (issue 9, bug 15)."""

from __future__ import annotations

import itertools

from kvd.versions import (
    conflicting_dots,
    context_of,
    decode_context,
    decode_object,
    empty,
    encode_context,
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


# Seen by the simulator (seeds 11 and 26 of the short runs) and by the chaos suite: a put
# acknowledged through its twin on b, then deleted with the context of that acknowledgement,
# came back through the twin minted late on a.


def _deleted_with_the_acknowledged_context(holder):
    """Delete, minted on ``holder`` (an object of replica a), with the context b's ack gave."""
    ack_context = {"b:1": 1}
    deleted, _ = update(holder, ack_context, "a:1", deleted=True, wid=b"d" * 8)
    return deleted


def test_a_delete_whose_context_saw_one_twin_replaces_both():
    """(a) The deleting replica holds both twins, kept at a's dot with b's as an alias."""
    at_a, at_b = _twins()
    deleted = _deleted_with_the_acknowledged_context(sync(at_a, at_b))
    assert [s.deleted for s in deleted.siblings] == [True]
    for other in (at_a, at_b):
        assert [s.deleted for s in sync(deleted, other).siblings] == [True]
        assert [s.deleted for s in sync(other, deleted).siblings] == [True]


def test_a_delete_minted_beside_only_the_late_twin_still_wins_at_merge():
    """(b) The deleting replica got the late twin only; merging b's copy must not revive it."""
    at_a, at_b = _twins()
    deleted_on_b, _ = update(at_b, {"b:1": 1}, "b:1", deleted=True, wid=b"d" * 8)
    for merged in (sync(deleted_on_b, at_a), sync(at_a, deleted_on_b)):
        assert [s.deleted for s in merged.siblings] == [True], merged


def test_a_twin_minted_after_the_delete_landed_is_not_applied():
    """(c) The paused replica resumes and applies the write after the delete reached it."""
    _, at_b = _twins()
    deleted_on_b, _ = update(at_b, {"b:1": 1}, "b:1", deleted=True, wid=b"d" * 8)
    late, _ = update(deleted_on_b, {}, "a:1", value=b"v", wid=WID)
    assert late == deleted_on_b
    assert decode_object(encode_object(deleted_on_b)) == deleted_on_b


def test_a_delete_minted_beside_only_the_late_twin_replaces_it_through_the_context():
    """(d) Seen by the simulator after contexts carried only a clock (short seed 8): the
    deleting replica a holds the late twin only, and the acknowledged context names b's dot.
    The context also names the write ids it saw, so the twin goes too."""
    at_a, at_b = _twins()
    ack_context = context_of(at_b)  # what the client got back from the put acknowledged by b
    deleted, _ = update(at_a, ack_context, "a:1", deleted=True, wid=b"d" * 8)
    assert [s.deleted for s in deleted.siblings] == [True]
    for merged in (sync(deleted, at_b), sync(at_b, deleted)):
        assert [s.deleted for s in merged.siblings] == [True], merged
    assert decode_context(encode_context(ack_context)).wids == {WID}


def test_replicas_that_know_different_twins_of_one_write_agree_without_a_dot_collision():
    """Hedged mints (coordinator rule 8) can mint one write three times (a, b, c). A replica
    that joined a with b and one that joined a with c hold the same dot with different
    aliases: that is not a reused dot (the chaos suite logged it as one, on every run), and
    their merge must know every dot of the write, whatever the order."""
    at_a, at_b = _twins()
    at_c, _ = update(empty(), {}, "c:1", value=b"v", wid=WID)
    with_b, with_c = sync(at_a, at_b), sync(at_a, at_c)
    assert conflicting_dots(at_a, with_b) == [] and conflicting_dots(with_b, with_c) == []
    for merged in (sync(with_b, with_c), sync(with_c, with_b)):
        (sibling,) = merged.siblings
        assert sibling.aliases == (("b:1", 1), ("c:1", 1)), sibling
    assert conflicting_dots(at_a, update(empty(), {}, "a:1", value=b"other")[0]) != []
