"""Storage: both backends behave the same; group commit groups; failures reach every caller.

Most tests run against both backends through the ``open_store`` fixture (LevelDB in
tmp_path). Tests of LevelDB-only behaviour (reopen, locking, the worker thread) say so.
"""

from __future__ import annotations

import os
import random
import re
import subprocess
import sys
import threading
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st
from trio.testing import wait_all_tasks_blocked

from kvd.errors import ConfigError
from kvd.storage import StorageError, keys, open_storage

ROOT = Path(__file__).resolve().parent.parent
MIB = 1024 * 1024


@pytest.fixture(params=["memory", "leveldb"])
def backend(request):
    return request.param


@pytest.fixture
def open_store(backend, tmp_path):
    """``open_store(**options)``: open_storage on this test's backend."""
    path = None if backend == "memory" else str(tmp_path / "db")

    @asynccontextmanager
    async def opener(**options):
        async with open_storage(path, **options) as storage:
            yield storage

    return opener


async def concurrently(*thunks):
    async with trio.open_nursery() as nursery:
        for thunk in thunks:
            nursery.start_soon(thunk)


# --- reads and writes -------------------------------------------------------------------------


async def test_put_get_delete(open_store):
    async with open_store() as storage:
        assert storage.get(b"a") is None
        await storage.write([(b"a", b"1"), (b"b", b"")])
        assert storage.get(b"a") == b"1"
        assert storage.get(b"b") == b""  # an empty value is not a missing one
        await storage.write([(b"a", None)])
        assert storage.get(b"a") is None
        await storage.write([(b"never-there", None)])  # deleting a missing key is fine
        await storage.write([])  # nothing to do


async def test_ops_of_one_write_apply_in_order(open_store):
    async with open_store() as storage:
        await storage.write([(b"k", b"1"), (b"k", b"2"), (b"gone", b"x"), (b"gone", None)])
        assert storage.get(b"k") == b"2"
        assert storage.get(b"gone") is None


async def test_iterate_ranges(open_store):
    async with open_store() as storage:
        await storage.write([(bytes([i]), b"v%d" % i) for i in range(0, 200, 2)])
        pairs = list(storage.iterate(bytes([10]), bytes([20])))
        assert pairs == [(bytes([i]), b"v%d" % i) for i in range(10, 20, 2)]  # stop excluded
        assert list(storage.iterate_keys(bytes([11]), bytes([21]))) == [
            bytes([i]) for i in range(12, 21, 2)
        ]
        assert list(storage.iterate(b"\xff", b"\xff\xff")) == []
        assert list(storage.iterate(bytes([20]), bytes([10]))) == []
        assert len(list(storage.iterate(b"", b"\xff"))) == 100


async def test_matches_a_dict_model(open_store):
    rng = random.Random(7)
    model: dict[bytes, bytes] = {}
    async with open_store() as storage:
        for _ in range(40):
            ops = []
            for _ in range(rng.randrange(1, 30)):
                key = bytes(rng.randrange(4) for _ in range(rng.randrange(1, 4)))
                value = None if rng.random() < 0.3 else os.urandom(rng.randrange(8))
                ops.append((key, value))
                if value is None:
                    model.pop(key, None)
                else:
                    model[key] = value
            await storage.write(ops)
        for _ in range(50):
            start, stop = sorted(bytes(rng.randrange(4) for _ in range(2)) for _ in range(2))
            expected = sorted((k, v) for k, v in model.items() if start <= k < stop)
            assert list(storage.iterate(start, stop)) == expected
            assert list(storage.iterate_keys(start, stop)) == [k for k, _ in expected]
        for key, value in model.items():
            assert storage.get(key) == value


async def test_iteration_reads_a_snapshot(open_store):
    async with open_store() as storage:
        await storage.write([(b"k%d" % i, b"old") for i in range(5)])
        pairs = storage.iterate(b"k", b"l")
        names = storage.iterate_keys(b"k", b"l")
        first = next(pairs)
        await storage.write([(b"k1", b"new"), (b"k3", None), (b"k22", b"inserted")])
        assert [first, *pairs] == [(b"k%d" % i, b"old") for i in range(5)]
        assert list(names) == [b"k%d" % i for i in range(5)]
        assert storage.get(b"k1") == b"new"


async def test_large_values(open_store):
    values = [os.urandom(MIB) for _ in range(8)]
    async with open_store() as storage:
        await storage.write([(b"chunk%d" % i, v) for i, v in enumerate(values)])
        await concurrently(
            *[lambda i=i: storage.write([(b"solo%d" % i, values[i])]) for i in range(8)]
        )
        for i, value in enumerate(values):
            assert storage.get(b"chunk%d" % i) == value
            assert storage.get(b"solo%d" % i) == value


async def test_rejects_non_bytes_before_queueing(open_store):
    async with open_store() as storage:
        with pytest.raises(TypeError):
            await storage.write([("text", b"v")])
        with pytest.raises(TypeError):
            await storage.write([(b"k", "text")])
        assert storage.statistics().batches_failed == 0


async def test_approximate_size_grows(open_store, backend, monkeypatch):
    if backend == "leveldb":
        monkeypatch.setattr("kvd.storage.leveldb.SIZE_REFRESH_SECONDS", 0.0)
    async with open_store() as storage:
        before = storage.approximate_size()
        await storage.write([(b"big", os.urandom(MIB))])
        with trio.fail_after(10):  # LevelDB refreshes its figure in the background
            while storage.approximate_size() < before + MIB:
                await trio.sleep(0.01)


# --- group commit -----------------------------------------------------------------------------


async def test_group_commit_groups_concurrent_writes(open_store):
    async with open_store() as storage:
        await concurrently(
            *[lambda i=i: storage.write([(b"w%03d" % i, b"v%d" % i)]) for i in range(200)]
        )
        stats = storage.statistics()
        assert stats.ops_committed == stats.writes_committed == 200
        assert stats.batches_committed < 50
        assert stats.syncs == stats.batches_committed  # sync="batch": one fsync per batch
        assert stats.largest_batch > 1
        for i in range(200):
            assert storage.get(b"w%03d" % i) == b"v%d" % i


async def test_pending_batch_is_bounded(open_store):
    async with open_store(max_batch_bytes=16 * 1024) as storage:
        await concurrently(
            *[lambda i=i: storage.write([(b"w%03d" % i, bytes(1024))]) for i in range(100)]
        )
        stats = storage.statistics()
        assert stats.ops_committed == 100
        assert stats.largest_batch <= 16  # 16 KiB / (1 KiB + key + overhead)
        # One write above the bound is still accepted, alone, and atomically.
        await storage.write([(b"huge%d" % i, bytes(8 * 1024)) for i in range(4)])
        assert storage.get(b"huge3") == bytes(8 * 1024)
        for i in range(100):
            assert storage.get(b"w%03d" % i) is not None


@pytest.mark.parametrize("room", ["fits", "waits for room"])
async def test_a_write_that_lands_returns_only_once_landed_even_cancelled(open_store,
                                                                          monkeypatch, room):
    """``write(ops, lands=True)``: its caller, cancelled meanwhile, still waits until its
    batch has committed, then sees the cancellation (kvd.node.local Rule 4 relies on it)."""
    async with open_store(max_batch_bytes=1024) as storage:
        real_commit = storage._commit
        gate = trio.Event()

        async def commit(ops, sync):
            await gate.wait()
            await real_commit(ops, sync)

        monkeypatch.setattr(storage, "_commit", commit)
        events: list[str] = []

        async def writer(key, lands, task_status=trio.TASK_STATUS_IGNORED):
            with trio.CancelScope() as scope:
                task_status.started(scope)
                try:
                    await storage.write([(key, bytes(600))], lands=lands)
                    events.append(f"{key.decode()} returned, landed={storage.get(key) is not None}")
                    await trio.lowlevel.checkpoint()
                except trio.Cancelled:
                    events.append(f"{key.decode()} cancelled")
                    raise

        async with trio.open_nursery() as nursery:
            if room == "waits for room":  # batch 1 in flight, batch 2 full: "late" waits
                nursery.start_soon(writer, b"first", False)
                await wait_all_tasks_blocked()
                nursery.start_soon(writer, b"second", False)
                await wait_all_tasks_blocked()
            scope = await nursery.start(writer, b"late", True)
            await wait_all_tasks_blocked()
            scope.cancel()
            await wait_all_tasks_blocked()
            assert not [e for e in events if e.startswith("late")]  # still waiting
            gate.set()
        assert [e for e in events if e.startswith("late")] == [
            "late returned, landed=True", "late cancelled"]
        assert storage.get(b"late") is not None


async def test_commit_failure_reaches_every_caller_of_the_batch(open_store, monkeypatch):
    async with open_store() as storage:
        real_commit = storage._commit
        gate = trio.Event()
        commits: list[int] = []

        async def commit(ops, sync):
            commits.append(len(ops))
            if len(commits) == 1:
                await gate.wait()  # hold batch 1 in flight while batch 2 forms
            elif len(commits) == 2:
                raise OSError("injected: disk on fire")
            await real_commit(ops, sync)

        monkeypatch.setattr(storage, "_commit", commit)
        outcomes: dict[bytes, object] = {}

        async def writer(key):
            try:
                await storage.write([(key, b"v"), (key + b"/2", b"v")])
            except StorageError as exc:
                outcomes[key] = exc
            else:
                outcomes[key] = "ok"

        second = [b"second%02d" % i for i in range(20)]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer, b"first")
            await wait_all_tasks_blocked()
            for key in second:
                nursery.start_soon(writer, key)
            await wait_all_tasks_blocked()
            gate.set()

        assert commits == [2, 40]
        assert outcomes[b"first"] == "ok"
        for key in second:
            assert isinstance(outcomes[key], StorageError)
            assert "disk on fire" in str(outcomes[key])
            assert storage.get(key) is None and storage.get(key + b"/2") is None
        await storage.write([(b"third", b"v")])  # the store keeps working
        assert storage.get(b"first") == storage.get(b"third") == b"v"
        stats = storage.statistics()
        assert (stats.batches_committed, stats.batches_failed) == (2, 1)
        assert stats.ops_committed == 3


async def test_leveldb_commit_failure_when_db_closed_under_it(tmp_path):
    async with open_storage(str(tmp_path / "db")) as storage:
        storage._db.close()
        results = []

        async def writer(i):
            try:
                await storage.write([(b"k%d" % i, b"v")])
            except StorageError as exc:
                results.append(exc)

        await concurrently(*[lambda i=i: writer(i) for i in range(10)])
        assert len(results) == 10
        assert storage.statistics().batches_committed == 0


async def test_write_after_close_raises(open_store):
    async with open_store() as storage:
        await storage.write([(b"k", b"v")])
        await storage.aclose()
        with pytest.raises(StorageError, match="closed"):
            await storage.write([(b"k", b"v2")])
    await storage.aclose()  # idempotent


async def test_exit_commits_writes_already_queued(open_store, backend, tmp_path):
    with trio.CancelScope() as cancel_scope:
        async with open_store() as storage:
            async with trio.open_nursery() as nursery:
                for i in range(50):
                    nursery.start_soon(storage.write, [(b"k%02d" % i, b"v")])
                await wait_all_tasks_blocked()
                cancel_scope.cancel()
    assert cancel_scope.cancelled_caught
    assert storage.statistics().ops_committed == 50
    if backend == "leveldb":
        async with open_storage(str(tmp_path / "db")) as reopened:
            assert len(list(reopened.iterate_keys(b"k", b"l"))) == 50


# --- sync modes -------------------------------------------------------------------------------


async def test_periodic_sync_only_when_dirty(autojump_clock):
    async with open_storage(None, sync="periodic", sync_interval=1.0) as storage:
        await trio.sleep(5)
        assert storage.statistics().syncs == 0  # nothing written, nothing to sync
        await storage.write([(b"k", b"v")])
        assert storage.statistics().syncs == 0  # acknowledged before the sync
        await trio.sleep(1.5)
        assert storage.statistics().syncs == 1
        await trio.sleep(10)
        assert storage.statistics().syncs == 1
        await storage.write([(b"k", b"v2")])
    assert storage.statistics().syncs == 2  # closing syncs what is left


async def test_flush_syncs_now_in_periodic_mode(open_store, autojump_clock):
    async with open_store(sync="periodic", sync_interval=1000.0) as storage:
        await storage.write([(b"lease", b"1")])
        assert storage.statistics().syncs == 0
        await storage.flush()  # durable now, not at the next tick
        assert storage.statistics().syncs == 1
        await storage.flush()
        assert storage.statistics().syncs == 2


async def test_periodic_sync_leveldb(tmp_path):
    path = str(tmp_path / "db")
    async with open_storage(path, sync="periodic", sync_interval=0.05) as storage:
        await storage.write([(b"k", b"v")])
        with trio.fail_after(10):
            while storage.statistics().syncs < 1:
                await trio.sleep(0.01)
        assert storage.statistics().batches_committed == 1
    async with open_storage(path) as storage:
        assert storage.get(b"k") == b"v"


async def test_sync_none_never_syncs(open_store):
    async with open_store(sync="none") as storage:
        for i in range(10):
            await storage.write([(b"k%d" % i, b"v")])
    assert storage.statistics().syncs == 0
    assert storage.statistics().batches_committed == 10


@pytest.mark.parametrize(
    "options",
    [{"sync": "sometimes"}, {"sync_interval": 0}, {"max_batch_bytes": 0}],
)
async def test_bad_options_are_config_errors(options):
    with pytest.raises(ConfigError):
        async with open_storage(None, **options):
            pass


# --- LevelDB on disk --------------------------------------------------------------------------


@pytest.mark.parametrize("sync", ["batch", "periodic", "none"])
async def test_leveldb_data_survives_reopen(tmp_path, sync):
    path = str(tmp_path / "db")
    value = os.urandom(MIB)
    async with open_storage(path, sync=sync) as storage:
        await storage.write([(b"a", b"1"), (b"big", value), (b"gone", b"x")])
        await storage.write([(b"gone", None)])
    async with open_storage(path, sync=sync) as storage:
        assert storage.get(b"a") == b"1"
        assert storage.get(b"big") == value
        assert storage.get(b"gone") is None


async def test_leveldb_second_open_is_refused(tmp_path):
    path = str(tmp_path / "db")
    async with open_storage(path):
        with pytest.raises(ConfigError) as info:
            async with open_storage(path):
                pass
    assert str(info.value) == f"data dir {path} is in use by another kvd process"
    async with open_storage(path):  # the lock went with the first store
        pass


async def test_leveldb_dir_locked_by_another_process(tmp_path):
    path = str(tmp_path / "db")
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, plyvel; db = plyvel.DB(sys.argv[1], create_if_missing=True); "
            "print('ready', flush=True); sys.stdin.read()",
            path,
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "ready"
        with pytest.raises(ConfigError, match="is in use by another kvd process"):
            async with open_storage(path):
                pass
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)


async def test_leveldb_data_dir_that_is_a_file(tmp_path):
    path = tmp_path / "not-a-dir"
    path.write_text("")
    with pytest.raises(ConfigError, match=f"data dir {path}"):
        async with open_storage(str(path)):
            pass


async def test_leveldb_synced_commit_does_not_block_the_loop(tmp_path, monkeypatch):
    # The commit thread waits until the trio loop has ticked three times before it writes. If
    # the commit ran on the loop's thread, the loop could not tick and the wait would time out.
    async with open_storage(str(tmp_path / "db"), sync="batch") as storage:
        real_write_batch = storage._write_batch
        in_commit = threading.Event()
        loop_ticked = threading.Event()
        waits: list[bool] = []

        def write_batch(ops, sync):
            in_commit.set()
            waits.append(loop_ticked.wait(timeout=20))
            real_write_batch(ops, sync)

        monkeypatch.setattr(storage, "_write_batch", write_batch)

        async def heartbeat():
            while not in_commit.is_set():
                await trio.sleep(0.001)
            for _ in range(3):
                await trio.sleep(0.001)
            loop_ticked.set()

        value = os.urandom(MIB)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(heartbeat)
            await storage.write([(b"big%02d" % i, value) for i in range(16)])
        assert waits == [True]
        assert storage.statistics().syncs == 1
        assert storage.get(b"big15") == value


# --- key layout -------------------------------------------------------------------------------

partitions = st.integers(min_value=0, max_value=(1 << keys.PARTITION_BITS_MAX) - 1)
user_keys = st.binary(min_size=1, max_size=1024)


@given(partitions, user_keys, partitions)
def test_object_keys_of_a_partition_are_contiguous(p, key, other):
    start, stop = keys.object_range(p)
    k = keys.object_key(p, key)
    assert start <= k < stop
    assert keys.user_key_of(k) == (p, key)
    other_start, other_stop = keys.object_range(other)
    if other != p:
        assert not other_start <= k < other_stop
    if p + 1 < 1 << keys.PARTITION_BITS_MAX:
        assert stop <= keys.object_range(p + 1)[0]  # partitions sort in order


@given(st.text(min_size=1, max_size=40), st.integers(0, 2**64 - 1), st.text(max_size=40))
def test_hint_keys(node, seq, other):
    k = keys.hint_key(node, seq)
    start, stop = keys.hint_range(node)
    assert start <= k < stop
    assert keys.hint_of(k) == (node, seq)
    if other != node:
        other_start, other_stop = keys.hint_range(other)
        assert not other_start <= k < other_stop
    if seq:
        assert keys.hint_key(node, seq - 1) < k


def test_key_kinds_do_not_overlap():
    last = (1 << 32) - 1
    assert keys.object_range(last) == (b"o\xff\xff\xff\xff", b"p")
    assert keys.hint_range("\U0010ffff" * 10)[1] <= keys.meta_key("")
    assert keys.meta_key("\U0010ffff") < keys.object_range(0)[0]


@given(st.binary(max_size=64), st.integers(0, 32))
def test_partition_of_is_in_range(key, bits):
    q = 1 << bits
    p = keys.partition_of(key, q)
    assert 0 <= p < q
    assert p == keys.partition_of(key, q)
    if bits < 32:
        # A ring twice as large splits each partition in two.
        assert keys.partition_of(key, 2 * q) >> 1 == p


def test_partition_of_pinned_vectors():
    # blake2b(key, digest_size=8) read big-endian, top log2(q) bits. Changing this moves data.
    assert keys.partition_of(b"hello", 1024) == 670
    assert keys.partition_of(b"", 1024) == 914
    assert keys.partition_of(b"kvd", 1 << 32) == 785234409
    assert keys.partition_of(b"hello", 1) == 0


@pytest.mark.parametrize("q", [0, 3, 1000])
def test_partition_of_rejects_bad_ring_sizes(q):
    with pytest.raises(ValueError):
        keys.partition_of(b"k", q)


# --- import hygiene ---------------------------------------------------------------------------


def test_keys_import_neither_trio_nor_plyvel():
    code = (
        "import sys, kvd.storage.keys; "
        "print(sorted(m for m in ('trio', 'plyvel') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"


def test_only_the_leveldb_module_imports_plyvel():
    pattern = re.compile(
        r"^\s*(import\s+plyvel\b|from\s+plyvel\b)|import_module\(\s*['\"]plyvel", re.MULTILINE
    )
    importers = sorted(
        str(path.relative_to(ROOT))
        for path in (ROOT / "kvd").rglob("*.py")
        if pattern.search(path.read_text(encoding="utf-8", errors="replace"))
    )
    assert importers == ["kvd/storage/leveldb.py"]


async def test_a_committer_cancelled_with_its_node_leaves_no_landing_write_waiting():
    """Found by the simulator (test_cluster_sim teardown hung, once kvd.net.memory's streams
    scheduled tasks differently): a node cancelled as a whole cancels the committer, while a
    request handler's write (``lands``, uncancellable) waits for it, and aclose runs only
    once that handler has returned. A write queued before the committer stops lands; one
    after is refused; none is left waiting forever (without the fix, this test hangs)."""
    with trio.CancelScope() as node:
        async with open_storage(None, sync="none") as storage:
            node.cancel()
            # Queued with no checkpoint before (the fast path); the committer is cancelled
            # before it takes the batch.
            await storage.write([(b"queued", b"1")], lands=True)
            assert storage.get(b"queued") == b"1"
            try:  # lands if the committer has not stopped yet, else is refused
                await storage.write([(b"later", b"2")], lands=True)
                assert storage.get(b"later") == b"2"
            except StorageError:
                assert storage._committer_exited.is_set()
    assert node.cancelled_caught
