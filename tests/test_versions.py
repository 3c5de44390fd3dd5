"""Dotted version vectors: the semilattice laws, sibling semantics, limits and encodings.

The property tests build objects the way a cluster does, not from arbitrary field values. A
few replicas (one actor each) apply writes and deletes with contexts that some earlier read
returned, and exchange objects in random order. Every replica state ever seen, old or new,
can meet every other one in a real cluster (late hints, stale handoffs), so the laws are
checked over all of them.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass, field
from functools import reduce
from pathlib import Path

import msgpack
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from kvd.errors import BadRequest, TooManySiblings
from kvd.versions import (
    MAX_COUNTER,
    SIBLING_LIMIT,
    SIBLING_WARN,
    ChunkRef,
    Sibling,
    VersionedObject,
    context_of,
    covers,
    decode_context,
    decode_object,
    descends,
    digest,
    empty,
    encode_context,
    encode_object,
    is_found,
    conflicting_dots,
    live,
    merge_vv,
    needs_warning,
    next_counter,
    open_context,
    seal_context,
    sync,
    sync_with_discarded,
    update,
)

PROPS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
LONG_PROPS = settings(PROPS, max_examples=100)  # each example is a long history; keep the file fast
ACTORS = ("n1:1", "n2:1", "n3:1", "n4:7")


# -- a small cluster, driven by hypothesis ----------------------------------------------------


@dataclass
class World:
    """Replica states over a random history, and every write with the context it carried."""

    replicas: list[VersionedObject]
    snapshots: list[VersionedObject] = field(default_factory=list)
    writes: list[tuple[tuple[str, int], dict[str, int]]] = field(default_factory=list)


@st.composite
def worlds(draw, max_steps: int = 20) -> World:
    n = draw(st.integers(2, len(ACTORS)))
    world = World([empty() for _ in range(n)])
    world.snapshots.append(empty())
    contexts: list[dict[str, int]] = [{}]
    for step in range(draw(st.integers(1, max_steps))):
        op = draw(st.sampled_from(("write", "write", "delete", "sync", "read", "merged_read")))
        i = draw(st.integers(0, n - 1))
        j = draw(st.integers(0, n - 1))
        if op in ("write", "delete"):
            ctx = draw(st.sampled_from(contexts))
            kind = draw(st.sampled_from(("inline", "chunked"))) if op == "write" else "tomb"
            kwargs: dict = {"timestamp": draw(st.floats(0, 2e9))}
            if kind == "inline":
                kwargs["value"] = b"v%d" % step
            elif kind == "chunked":
                kwargs["chunks"] = ChunkRef(step.to_bytes(16, "big"), 5 << 20, 5)
            else:
                kwargs["deleted"] = True
            world.replicas[i], _ = update(world.replicas[i], ctx, ACTORS[i], **kwargs)
            new_dot = (ACTORS[i], world.replicas[i].clock[ACTORS[i]])
            assert new_dot not in {dot for dot, _ in world.writes}, "a dot was minted twice"
            world.writes.append((new_dot, ctx))
        elif op == "sync":
            world.replicas[i] = sync(world.replicas[i], world.replicas[j])
        elif op == "read":
            contexts.append(context_of(world.replicas[i]))
        else:
            contexts.append(context_of(sync(world.replicas[i], world.replicas[j])))
        world.snapshots.append(world.replicas[i])
    return world


def three_states(draw_world: World, data) -> tuple[VersionedObject, ...]:
    pick = st.sampled_from(draw_world.snapshots + draw_world.replicas)
    return tuple(data.draw(pick) for _ in range(3))


def assert_well_formed(obj: VersionedObject) -> None:
    dots = [s.dot for s in obj.siblings]
    assert dots == sorted(dots) and len(set(dots)) == len(dots)
    assert all(covers(obj.clock, dot) for dot in dots)
    assert all(counter >= 1 for counter in obj.clock.values())


# -- semilattice laws ---------------------------------------------------------------------------


@PROPS
@given(worlds(), st.data())
def test_sync_is_commutative_associative_and_idempotent(world, data):
    a, b, c = three_states(world, data)
    ab = sync(a, b)
    assert ab == sync(b, a), "not commutative"
    assert encode_object(ab) == encode_object(sync(b, a)), "not deterministic"
    assert sync(ab, c) == sync(a, sync(b, c)), "not associative"
    assert sync(a, a) == a and sync(ab, ab) == ab, "not idempotent"
    assert sync(ab, a) == ab and sync(ab, b) == ab, "does not absorb what it merged"
    assert sync(a, empty()) == a and sync(empty(), a) == a, "empty is not the identity"
    assert descends(ab.clock, a.clock) and descends(ab.clock, b.clock)
    assert_well_formed(ab)


@PROPS
@given(worlds(), st.data())
def test_sync_with_discarded_reports_exactly_the_dropped_siblings(world, data):
    a, b, _ = three_states(world, data)
    merged, discarded = sync_with_discarded(a, b)
    assert merged == sync(a, b)
    assert set(discarded) == set(a.siblings) - set(merged.siblings)
    # A sibling is only ever dropped because the other side saw it superseded.
    assert all(covers(b.clock, s.dot) for s in discarded)


@PROPS
@given(worlds(max_steps=30))
def test_after_full_sync_exactly_the_unsuperseded_writes_survive(world):
    """No write is lost unless a later write's context covered it; none is resurrected."""
    merged = reduce(sync, world.replicas)
    superseded = {
        dot for dot, _ in world.writes if any(covers(ctx, dot) for _, ctx in world.writes)
    }
    expected = {dot for dot, _ in world.writes} - superseded
    assert {s.dot for s in merged.siblings} == expected
    assert_well_formed(merged)
    for replica in world.replicas:
        assert_well_formed(replica)


# -- sibling semantics --------------------------------------------------------------------------


def test_two_blind_writes_become_two_siblings_after_sync():
    a, _ = update(empty(), {}, "n1:1", value=b"left")
    b, _ = update(empty(), {}, "n2:1", value=b"right")
    merged = sync(a, b)
    assert sorted(s.value for s in merged.siblings) == [b"left", b"right"]
    assert merged.clock == {"n1:1": 1, "n2:1": 1}


def test_two_writes_with_the_same_read_context_become_siblings_even_via_one_coordinator():
    base, _ = update(empty(), {}, "n1:1", value=b"v0")
    ctx = context_of(base)
    one, _ = update(base, ctx, "n1:1", value=b"a")
    two, _ = update(one, ctx, "n1:1", value=b"b")  # same coordinator, same stale context
    assert [s.value for s in two.siblings] == [b"a", b"b"]
    assert [s.dot for s in two.siblings] == [("n1:1", 2), ("n1:1", 3)]
    # The same pair written through two coordinators, then synced, gives the same siblings.
    left, _ = update(base, ctx, "n1:1", value=b"a")
    right, _ = update(sync(empty(), base), ctx, "n2:1", value=b"b")
    merged = sync(left, right)
    assert sorted(s.value for s in merged.siblings) == [b"a", b"b"]


def test_write_with_the_merged_context_replaces_both_siblings():
    a, _ = update(empty(), {}, "n1:1", value=b"left")
    b, _ = update(empty(), {}, "n2:1", value=b"right")
    merged = sync(a, b)
    resolved, discarded = update(merged, context_of(merged), "n1:1", value=b"both")
    assert [s.value for s in resolved.siblings] == [b"both"]
    assert resolved.siblings[0].dot == ("n1:1", 2)
    assert sorted(s.value for s in discarded) == [b"left", b"right"]
    # The other replica, which still holds the old sibling, drops it on sync.
    assert sync(b, resolved) == resolved
    kept, dropped = sync_with_discarded(b, resolved)
    assert kept == resolved and [s.value for s in dropped] == [b"right"]


def test_partial_context_replaces_only_what_it_saw():
    a, _ = update(empty(), {}, "n1:1", value=b"seen")
    ctx = context_of(a)
    b, _ = update(a, {}, "n1:1", value=b"unseen")
    c, discarded = update(b, ctx, "n2:1", value=b"new")
    assert sorted(s.value for s in c.siblings) == [b"new", b"unseen"]
    assert [s.value for s in discarded] == [b"seen"]


def test_delete_with_context_leaves_a_single_tombstone():
    a, _ = update(empty(), {}, "n1:1", value=b"x")
    b, _ = update(a, {}, "n2:1", value=b"y")
    gone, discarded = update(b, context_of(b), "n1:1", deleted=True)
    assert len(gone.siblings) == 1 and gone.siblings[0].deleted
    assert gone.siblings[0].value == b"" and gone.siblings[0].length == 0
    assert not is_found(gone) and live(gone) == ()
    assert len(discarded) == 2


def test_delete_without_context_sits_beside_the_live_value():
    a, _ = update(empty(), {}, "n1:1", value=b"x")
    b, discarded = update(a, {}, "n2:1", deleted=True)
    assert discarded == []
    assert [s.deleted for s in b.siblings] == [False, True]
    assert is_found(b) and [s.value for s in live(b)] == [b"x"]


def test_timestamps_never_resolve_conflicts():
    late, _ = update(empty(), {}, "n1:1", value=b"late clock", timestamp=2_000_000_000.0)
    early, _ = update(empty(), {}, "n2:1", value=b"early clock", timestamp=1.0)
    merged = sync(late, early)
    assert len(merged.siblings) == 2
    # A write that saw the future-stamped sibling replaces it despite its older stamp.
    after, _ = update(merged, context_of(merged), "n2:1", value=b"resolved", timestamp=0.5)
    assert [s.value for s in after.siblings] == [b"resolved"]


def test_update_counter_and_clock():
    obj, _ = update(empty(), {"n2:1": 4}, "n1:1", value=b"a")
    assert obj.clock == {"n1:1": 1, "n2:1": 4}
    # A context that has seen more of this actor than its stored copy must not reuse a dot.
    obj2, _ = update(obj, {"n1:1": 6}, "n1:1", value=b"b")
    assert obj2.siblings[-1].dot == ("n1:1", 7) and obj2.clock["n1:1"] == 7


def test_update_rejects_inconsistent_payloads():
    ref = ChunkRef(bytes(16), 10, 1)
    with pytest.raises(ValueError):
        update(empty(), {}, "n1:1", value=b"x", deleted=True)
    with pytest.raises(ValueError):
        update(empty(), {}, "n1:1", chunks=ref, deleted=True)
    with pytest.raises(ValueError):
        update(empty(), {}, "n1:1", value=b"x", chunks=ref)


def test_chunked_sibling_length_and_discard():
    ref = ChunkRef(b"\x01" * 16, 3 << 20, 3)
    big, _ = update(empty(), {}, "n1:1", chunks=ref)
    assert big.siblings[0].length == 3 << 20 and big.siblings[0].value == b""
    small, discarded = update(big, context_of(big), "n1:1", value=b"tiny")
    assert discarded[0].chunks == ref and small.siblings[0].length == 4


def test_conflicting_payloads_for_one_dot_still_converge():
    """A broken invariant (dot reused) must still give every replica the same answer."""
    one = VersionedObject({"n1:1": 1}, (Sibling(("n1:1", 1), b"a"),))
    two = VersionedObject({"n1:1": 1}, (Sibling(("n1:1", 1), b"b"),))
    assert sync(one, two) == sync(two, one)
    assert len(sync(one, two).siblings) == 1


def test_vector_helpers():
    assert merge_vv({"a": 1, "b": 5}, {"b": 2, "c": 3}) == {"a": 1, "b": 5, "c": 3}
    assert descends({"a": 2, "b": 1}, {"a": 2}) and not descends({"a": 2}, {"a": 2, "b": 1})
    assert descends({}, {}) and descends({"a": 1}, {})
    assert covers({"a": 3}, ("a", 3)) and not covers({"a": 3}, ("a", 4))
    assert not covers({}, ("a", 1))


# -- read-modify-write does not grow siblings ---------------------------------------------------


@LONG_PROPS
@given(st.data())
def test_read_modify_write_loops_stay_within_the_number_of_writers(data):
    replicas = [empty() for _ in range(3)]
    held: list[dict | None] = [None, None, None]  # context each client read, between steps
    home: list[int | None] = [None, None, None]  # replica each client last wrote through
    for step in range(data.draw(st.integers(10, 40), label="steps")):
        k = data.draw(st.integers(0, 3), label="client or anti-entropy")
        if k == 3:
            i, j = data.draw(st.integers(0, 2)), data.draw(st.integers(0, 2))
            replicas[i] = sync(replicas[i], replicas[j])
        elif held[k] is None:
            # Read from a quorum that includes the replica that took this client's last write.
            picked = data.draw(st.sets(st.integers(0, 2), min_size=1))
            if home[k] is not None:
                picked.add(home[k])
            held[k] = context_of(reduce(sync, (replicas[i] for i in sorted(picked))))
        else:
            r = data.draw(st.integers(0, 2), label="coordinator")
            replicas[r], _ = update(replicas[r], held[k], ACTORS[r], value=b"%d" % step)
            for other in data.draw(st.sets(st.integers(0, 2)), label="replicated to"):
                replicas[other] = sync(replicas[other], replicas[r])
            held[k], home[k] = None, r
        for replica in replicas:
            assert len(replica.siblings) <= 3
        assert len(reduce(sync, replicas).siblings) <= 3


def test_read_modify_write_through_one_coordinator_stays_at_three_siblings():
    obj = empty()
    for round_ in range(50):
        contexts = [context_of(obj) for _ in range(3)]  # all three read ...
        for k, ctx in enumerate(contexts):  # ... then all three write back
            obj, _ = update(obj, ctx, "n1:1", value=b"%d/%d" % (round_, k))
        assert len(obj.siblings) == 3
    assert obj.clock == {"n1:1": 150}


# -- sibling limit ------------------------------------------------------------------------------


def test_sibling_warning_and_limit_name_the_key():
    obj = empty()
    for n in range(1, SIBLING_LIMIT + 1):
        obj, _ = update(obj, {}, "n1:1", value=b"%d" % n)
        assert needs_warning(obj) == (n > SIBLING_WARN)
    assert len(obj.siblings) == SIBLING_LIMIT
    with pytest.raises(TooManySiblings) as info:
        update(obj, {}, "n2:1", value=b"one too many", key=b"foo")
    message = str(info.value)
    assert "key 'foo'" in message and "101 siblings" in message and "limit 100" in message
    assert "context" in message
    # The remedy the message gives works: write back with the context of a read.
    fixed, discarded = update(obj, context_of(obj), "n2:1", value=b"merged", key=b"foo")
    assert len(fixed.siblings) == 1 and len(discarded) == SIBLING_LIMIT


def test_sync_never_refuses_past_the_limit():
    """Replication cannot refuse what another replica acknowledged; only writes are refused."""
    a, b = empty(), empty()
    for n in range(60):
        a, _ = update(a, {}, "n1:1", value=b"a%d" % n)
        b, _ = update(b, {}, "n2:1", value=b"b%d" % n)
    assert len(sync(a, b).siblings) == 120


# -- encodings ----------------------------------------------------------------------------------

actor_names = st.text(min_size=1, max_size=24)
counters = st.integers(1, MAX_COUNTER)  # the bound every decoder enforces (issue 10)
vectors = st.dictionaries(actor_names, counters, max_size=6)


@st.composite
def arbitrary_objects(draw) -> VersionedObject:
    """Well-formed objects with every payload shape, including extreme counters and names."""
    clock = draw(vectors)
    siblings = []
    for actor, top in clock.items():
        for counter in draw(st.sets(st.integers(1, min(top, 50)) | st.just(top), max_size=3)):
            shape = draw(st.sampled_from(("inline", "tomb", "chunked")))
            stamp = draw(st.floats(allow_nan=False, allow_infinity=False))
            if shape == "inline":
                sib = Sibling((actor, counter), draw(st.binary(max_size=40)), timestamp=stamp)
            elif shape == "tomb":
                sib = Sibling((actor, counter), deleted=True, timestamp=stamp)
            else:
                ref = ChunkRef(
                    draw(st.binary(min_size=16, max_size=16)),
                    draw(st.integers(0, 2**40)),
                    draw(st.integers(0, 2**20)),
                )
                sib = Sibling((actor, counter), chunks=ref, timestamp=stamp)
            siblings.append(sib)
    siblings.sort(key=lambda s: s.dot)
    return VersionedObject(clock, tuple(siblings))


@PROPS
@given(arbitrary_objects() | worlds().map(lambda w: reduce(sync, w.replicas)))
def test_object_round_trip(obj):
    data = encode_object(obj)
    back = decode_object(data)
    assert back == obj
    assert encode_object(back) == data  # deterministic
    assert digest(back) == digest(obj) and len(digest(obj)) == 16
    assert hash(back) == hash(obj)


@PROPS
@given(vectors)
def test_context_round_trip(vv):
    data = encode_context(vv)
    assert decode_context(data) == vv
    assert encode_context(decode_context(data)) == data
    assert (data == b"") == (not vv)


def test_encoding_is_compact():
    obj, _ = update(empty(), {}, "node-17:1733000000", value=b"x" * 10, timestamp=1.5)
    for n in range(2, 5):
        obj, _ = update(obj, {}, "node-17:1733000000", value=b"x" * 10, timestamp=1.5)
    # The actor id (19 bytes) is stored once; each sibling costs its value plus ~14 bytes.
    assert len(encode_object(obj)) < 4 * (10 + 16) + 30
    assert len(encode_context(obj.clock)) < 25


def test_digest_tells_replicas_apart():
    a, _ = update(empty(), {}, "n1:1", value=b"x")
    b, _ = update(empty(), {}, "n1:1", value=b"y")
    assert digest(a) != digest(b)
    assert digest(a) == digest(decode_object(encode_object(a)))


@PROPS
@given(st.binary(max_size=64))
def test_decode_context_of_random_bytes_raises_only_bad_request(data):
    try:
        vv = decode_context(data)
    except BadRequest as e:
        assert str(e).startswith("malformed context")
    else:
        assert encode_context(vv) == data or not vv


def _pack(obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


@pytest.mark.parametrize(
    "data",
    [
        _pack({"a": 1}),  # a map
        _pack(["a"]),  # odd length
        _pack(["b", 1, "a", 2]),  # not sorted
        _pack(["a", 1, "a", 2]),  # duplicate actor
        _pack(["a", 0]),  # counters start at 1
        _pack(["a", -3]),
        _pack(["a", True]),  # a bool is not a counter
        _pack(["a", 1.0]),
        _pack(["", 1]),  # empty actor
        _pack([b"a", 1]),  # actor must be a string
        _pack(["a", 1]) + b"\x00",  # trailing bytes
        _pack(["a", 1])[:-1],  # truncated
        _pack(["x" * 5000, 1]),  # oversized actor
        _pack([[[[]]]]),
        b"\xc1",  # never-used msgpack byte
        b"\xdd\xff\xff\xff\xff",  # array claiming 4 billion entries
        b"\x91" * 100_000,  # deep nesting, and over the size cap
        b"\x91" * 5_000,  # deep nesting under the size cap
        "a string",
        None,
    ],
)
def test_decode_context_rejects_malformed_input(data):
    with pytest.raises(BadRequest, match="^malformed context"):
        decode_context(data)


@PROPS
@given(st.binary(max_size=64))
def test_decode_object_of_random_bytes_raises_only_value_error(data):
    try:
        obj = decode_object(data)
    except ValueError:
        return
    assert_well_formed(obj)


@LONG_PROPS
@given(arbitrary_objects(), st.data())
def test_decode_object_of_damaged_encodings_raises_only_value_error(obj, data):
    good = encode_object(obj)
    assume(len(good) > 1)
    cut = data.draw(st.integers(0, len(good) - 1))
    damaged = data.draw(
        st.sampled_from(
            (
                good[:cut],
                good[:cut] + bytes([good[cut] ^ data.draw(st.integers(1, 255))]) + good[cut + 1 :],
                good + b"\x00",
            )
        )
    )
    try:
        back = decode_object(damaged)
    except ValueError:
        return
    assert_well_formed(back)


@pytest.mark.parametrize(
    "raw",
    [
        [2, [], []],  # unknown format
        [True, [], []],  # a bool is not the format number
        [1, ["a", 1], [[0, 2, b"", False, 0.0]]],  # dot not covered by the clock
        [1, ["a", 1], [[1, 1, b"", False, 0.0]]],  # actor index out of range
        [1, ["a", 2], [[0, 2, b"", False, 0.0], [0, 1, b"", False, 0.0]]],  # unsorted
        [1, ["a", 2], [[0, 1, b"", False, 0.0], [0, 1, b"", False, 0.0]]],  # duplicate dot
        [1, ["a", 1], [[0, 1, "str", False, 0.0]]],  # value must be bytes
        [1, ["a", 1], [[0, 1, b"x", True, 0.0]]],  # tombstone with a value
        [1, ["a", 1], [[0, 1, b"", 0, 0.0]]],  # deleted must be a bool
        [1, ["a", 1], [[0, 1, b"", False, 0]]],  # timestamp must be a float
        [1, ["a", 1], [[0, 1, b"x", False, 0.0, b"v" * 16, 1, 1]]],  # chunked and inline
        [1, ["a", 1], [[0, 1, b"", False, 0.0, b"v" * 16, -1, 1]]],
        [1, ["a", 1], [[0, 1, b"", False, 0.0, b"v" * 16, 1]]],  # wrong length
        [1, ["a", 1], [[0, 1, b"", False, 0.0, 7]]],  # a write id must be bytes
        [1, ["a", 1], [[0, 1, b"", False, 0.0, b""]]],  # and not empty
        [1, ["b", 1, "a", 1], []],  # clock not sorted
        [1, {"a": 1}, []],
    ],
)
def test_decode_object_rejects_invalid_structures(raw):
    with pytest.raises(ValueError):
        decode_object(_pack(raw))


def test_decode_object_rejects_non_bytes():
    with pytest.raises(ValueError):
        decode_object(None)  # type: ignore[arg-type]


# -- purity -------------------------------------------------------------------------------------


def test_importing_versions_does_not_import_trio_or_plyvel():
    code = (
        "import kvd.versions, sys; "
        "assert 'trio' not in sys.modules and 'plyvel' not in sys.modules"
    )
    root = Path(__file__).resolve().parent.parent
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr


# -- dots from a per-actor sequence (kv679) -----------------------------------------------------


@PROPS
@given(st.integers(min_value=0, max_value=2**40), st.integers(min_value=0, max_value=50))
def test_update_takes_a_counter_at_least_min_counter_and_above_the_history(floor, seen):
    obj = VersionedObject({"n1:1": seen}, ()) if seen else empty()
    new, _ = update(obj, {}, "n1:1", value=b"v", min_counter=floor)
    dot = new.siblings[0].dot
    assert dot[1] == next_counter(obj, {}, "n1:1", floor)
    assert dot[1] >= floor and dot[1] > seen
    assert covers(new.clock, dot)


def test_a_jump_in_counters_discards_nothing_concurrent():
    """A clock entry covering the gap of a jumped counter claims only dots that never existed
    for that key, so a concurrent write from another actor still survives the merge."""
    base, _ = update(empty(), {}, "n1:1", value=b"v1")
    jumped, _ = update(base, base.clock, "n1:1", value=b"v2", min_counter=1000)
    concurrent, _ = update(base, base.clock, "n2:1", value=b"w")
    merged = sync(jumped, concurrent)
    assert sorted(s.value for s in merged.siblings) == [b"v2", b"w"]


def test_conflicting_dots_names_a_reused_dot():
    one, _ = update(empty(), {}, "n1:1", value=b"one")
    two, _ = update(empty(), {}, "n1:1", value=b"two")
    assert conflicting_dots(one, two) == [("n1:1", 1)]
    assert conflicting_dots(one, one) == []
    assert sync(one, two) == sync(two, one)  # still one winner, the same everywhere


# -- sealed contexts (issue 10, hole 2) -------------------------------------------------------

SEAL_KEY = b"k" * 32


@PROPS
@given(vectors, st.binary(min_size=1, max_size=64))
def test_sealed_context_round_trip_and_any_change_is_refused(vv, key):
    sealed = seal_context(SEAL_KEY, key, vv)
    assert open_context(SEAL_KEY, key, sealed) == vv
    assert sealed  # even the empty vector (a reader of an absent key): b"" means no context
    for i in range(len(sealed)):  # any flipped bit anywhere: refused, never misread
        altered = bytearray(sealed)
        altered[i] ^= 0x01
        with pytest.raises(BadRequest, match="context"):
            open_context(SEAL_KEY, key, bytes(altered))
    with pytest.raises(BadRequest, match="forged or altered"):
        open_context(SEAL_KEY, key + b"x", sealed)  # another key's context
    with pytest.raises(BadRequest, match="forged or altered"):
        open_context(b"o" * 32, key, sealed)  # another cluster's
    if vv:
        with pytest.raises(BadRequest, match="context"):
            open_context(SEAL_KEY, key, encode_context(vv))  # the unsealed form


@PROPS
@given(st.binary(max_size=96))
def test_open_context_of_random_bytes_raises_only_bad_request(data):
    try:
        vv = open_context(SEAL_KEY, b"k", data)
    except BadRequest as e:
        assert "context" in str(e)
    else:
        assert vv == {} and data == b""


@pytest.mark.parametrize("counter", [MAX_COUNTER + 1, 2**63, 2**64 - 2, 2**64 - 1])
def test_counters_past_the_bound_are_refused_even_when_sealed(counter):
    """A context sealed with the right key (as one is without a cluster secret) still cannot
    carry a counter that overflows a clock."""
    body = b"\x01" + _pack(["a", counter])
    from kvd.versions.encoding import _tag
    with pytest.raises(BadRequest, match="bad counter"):
        open_context(SEAL_KEY, b"k", body + _tag(SEAL_KEY, b"k", body))
    with pytest.raises(ValueError, match="clock"):
        decode_object(_pack([1, ["a", counter], []]))


def test_minting_past_the_bound_is_a_clean_refusal():
    at_bound = {"n1:1": MAX_COUNTER}
    with pytest.raises(BadRequest, match="exhausted"):
        update(empty(), at_bound, "n1:1", value=b"x")
    obj, _ = update(empty(), at_bound, "n2:1", value=b"x")  # another actor still writes
    assert decode_object(encode_object(obj)) == obj


@PROPS
@given(arbitrary_objects(), st.data())
def test_decode_object_of_mutated_objects_raises_only_value_error(obj, data):
    raw = bytearray(encode_object(obj))
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] = data.draw(st.integers(0, 255))
    try:
        back = decode_object(bytes(raw))
    except ValueError:
        return
    assert decode_object(encode_object(back)) == back


@pytest.mark.parametrize("stamp", [float("nan"), float("inf"), float("-inf")])
def test_objects_with_a_timestamp_that_is_not_finite_are_refused(stamp):
    with pytest.raises(ValueError, match="timestamp"):
        decode_object(_pack([1, ["a", 1], [[0, 1, b"v", False, stamp]]]))
