"""The chaos checker on hand-made histories: it must be able to fail (no root needed)."""

from tests.chaos.checker import Op, Read, check, hot_value


def put(key, value, outcome="ok", took=0.01):
    return Op("put", key, value, outcome, start=0.0, end=took)


def test_acknowledged_write_present_passes_failed_and_indeterminate_may_be_either():
    history = [put(b"s/u/0/1", b"a"), put(b"s/u/0/2", b"b", "fail"),
               put(b"s/u/0/3", b"c", "info")]
    reads = {b"s/u/0/1": Read([b"a"]), b"s/u/0/2": Read([b"b"]), b"s/u/0/3": Read([])}
    verdict = check(history, reads, writers=4)
    assert verdict.ok, verdict.problems()
    assert (verdict.acknowledged, verdict.failed, verdict.indeterminate) == (1, 1, 1)


def test_lost_phantom_resurrected_and_unreadable_fail():
    history = [put(b"s/u/0/1", b"a"), put(b"s/u/0/2", b"b", "fail"), put(b"s/u/0/3", b"c"),
               Op("delete", b"s/u/0/3", b"", "ok"), put(b"s/u/0/4", b"d")]
    reads = {b"s/u/0/1": Read([]), b"s/u/0/2": Read([b"zzz"]), b"s/u/0/3": Read([b"c"]),
             b"s/u/0/4": Read(error="QuorumFailed")}
    verdict = check(history, reads, writers=4)
    assert not verdict.ok
    assert verdict.lost == ["s/u/0/1"]
    assert verdict.phantom == ["s/u/0/2 = b'zzz'"]
    assert verdict.resurrected == ["s/u/0/3"]
    assert [u.split()[0] for u in verdict.unreadable] == ["s/u/0/4"]


def test_failed_delete_may_or_may_not_apply():
    history = [put(b"s/u/0/1", b"a"), Op("delete", b"s/u/0/1", b"", "fail"),
               put(b"s/u/0/2", b"b"), Op("delete", b"s/u/0/2", b"", "info")]
    assert check(history, writers=4, reads={b"s/u/0/1": Read([]), b"s/u/0/2": Read([b"b"])}).ok


def test_resurrected_deletes_and_writes_applied_twice_fail():
    history = [put(b"s/u/0/1", b"a", took=2.5), Op("delete", b"s/u/0/1", b"", "ok"),
               put(b"s/u/0/2", b"b", took=0.1)]
    reads = {b"s/u/0/1": Read([b"a"], tombstones=1), b"s/u/0/2": Read([b"b", b"b"])}
    verdict = check(history, reads, writers=4)
    assert verdict.resurrected == ["s/u/0/1"]
    assert verdict.duplicated == ["s/u/0/2 (1 extra copies)"]
    assert not verdict.ok


def test_hot_key_tokens_form_a_grow_only_set():
    key = b"s/hot/0"
    history = [Op("rmw", key, b"1.1", "ok"), Op("rmw", key, b"2.1", "ok"),
               Op("rmw", key, b"3.1", "info"), Op("rmw", key, b"4.1", "ok")]
    good = {key: Read([hot_value({b"1.1", b"2.1"}), hot_value({b"1.1", b"3.1", b"4.1"})])}
    assert check(history, good, writers=4).ok
    bad = {key: Read([hot_value({b"1.1", b"4.1", b"9.9"})])}
    verdict = check(history, bad, writers=4)
    assert verdict.lost == ["s/hot/0 token 2.1"]
    assert verdict.phantom == ["s/hot/0 token 9.9"]


def test_a_hot_key_with_more_siblings_than_concurrent_writes_fails():
    """Two clients, one unacknowledged write: at most 2 + 1 + 1 siblings can be concurrent."""
    key = b"s/hot/0"
    history = [Op("rmw", key, b"0.1", "ok"), Op("rmw", key, b"1.1", "ok"),
               Op("rmw", key, b"0.2", "info"), Op("rmw", key, b"1.2", "ok")]
    values = [hot_value({b"0.1"}), hot_value({b"1.1"}), hot_value({b"0.1", b"0.2"}),
              hot_value({b"1.1", b"1.2"})]
    assert check(history, {key: Read(values)}, writers=2).ok
    crowded = check(history, {key: Read(values, tombstones=1)}, writers=2)
    assert crowded.crowded == ["s/hot/0 (5 siblings, at most 4 possible)"]
    assert not crowded.ok
