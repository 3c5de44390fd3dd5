"""Anti-entropy exchange cost: two replicas of 1,000,000 keys over 1024 partitions.

Builds the TicTac trees of two replicas by incremental updates (each replica in its own write
order), then follows the exchange protocol of ``kvd.aae`` from roots down to key lists, in
process, and counts the bytes each step would put on the wire. Run once in sync and once with
``--differ`` keys differing. Also times ``Tree.update``, which sits on the write path. A
figure, not a test: it never fails on speed.

    .venv/bin/python benchmarks/aae_bench.py [--keys 1000000] [--partitions 1024] [--differ 100]

Bytes counted: payloads only (no frame headers), hashes at 8 bytes, partition numbers at
4 bytes, branch and segment numbers at 2 bytes, key-list entries as key + digest + a 2-byte
key length. The objects of differing keys (step 5) are not counted: their size is the
values'.
"""

from __future__ import annotations

import argparse
import random
import time
from array import array
from collections import defaultdict

from kvd.aae import (
    HASH_BYTES,
    SEGMENTS,
    ExchangeStats,
    Tree,
    diff_keys,
    differing_branches,
    differing_partitions,
    differing_segments,
)
from kvd.ring.ring import partition_of

PARTITION_ID_BYTES = 4
NUMBER_BYTES = 2
KEY_LEN_BYTES = 2


class Replica:
    """One node's stored {key: digest} for many partitions, its trees and a segment index.

    The index stands in for the storage's ``(partition, segment, key) -> digest`` range, so
    listing a segment costs what it would with that index, not a scan of the partition.
    """

    def __init__(self, q: int) -> None:
        self.q = q
        self.store: dict[bytes, bytes] = {}
        self.trees = {p: Tree() for p in range(q)}
        self.index: dict[tuple[int, int], set[bytes]] = defaultdict(set)

    def put(self, key: bytes, digest: bytes | None) -> None:
        p = partition_of(key, self.q)
        s = self.trees[p].update(key, self.store.get(key), digest)
        if digest is None:
            self.store.pop(key, None)
            self.index[p, s].discard(key)
        else:
            self.store[key] = digest
            self.index[p, s].add(key)

    def roots(self) -> bytes:
        return array("Q", [self.trees[p].root() for p in range(self.q)]).tobytes()

    def branches(self, p: int) -> list[int]:
        return self.trees[p].branches()

    def branch_segments(self, p: int, b: int) -> list[int]:
        return self.trees[p].branch_segments(b)

    def segment_keys(self, p: int, s: int) -> dict[bytes, bytes]:
        store = self.store
        return {k: store[k] for k in self.index.get((p, s), ())}


def exchange(a: Replica, b: Replica) -> tuple[ExchangeStats, dict, list[bytes], list[bytes]]:
    """A compares with B following the protocol; returns stats, bytes per step, keys found."""
    stats = ExchangeStats()
    steps = dict.fromkeys(["roots", "branches", "segments", "key lists"], 0)

    # 1. Roots of every partition, one 8-byte hash each, in partition order.
    wire = b.roots()
    steps["roots"] += len(wire)
    theirs = dict(enumerate(array("Q", wire)))
    mine = {p: a.trees[p].root() for p in range(a.q)}
    stats.partitions_compared = len(mine)
    partitions = differing_partitions(mine, theirs)
    stats.partitions_differing = len(partitions)

    i_need: list[bytes] = []
    they_need: list[bytes] = []
    for p in partitions:
        # 2. Branches of a differing partition.
        their_branches = b.branches(p)
        steps["branches"] += PARTITION_ID_BYTES + HASH_BYTES * len(their_branches)
        for br in differing_branches(a.branches(p), their_branches):
            # 3. Segments of a differing branch.
            their_segments = b.branch_segments(p, br)
            steps["segments"] += (
                PARTITION_ID_BYTES + NUMBER_BYTES + HASH_BYTES * len(their_segments)
            )
            for s in differing_segments(br, a.branch_segments(p, br), their_segments):
                stats.segments_differing += 1
                # 4. B's (key, digest) list of a differing segment.
                their_keys = b.segment_keys(p, s)
                steps["key lists"] += PARTITION_ID_BYTES + NUMBER_BYTES + sum(
                    KEY_LEN_BYTES + len(k) + len(d) for k, d in their_keys.items()
                )
                need, give = diff_keys(a.segment_keys(p, s), their_keys)
                i_need += need
                they_need += give
    stats.keys_differing = len(set(i_need) | set(they_need))
    stats.bytes_exchanged = sum(steps.values())
    return stats, steps, i_need, they_need


def timed_exchange(a: Replica, b: Replica, label: str, repeat: int) -> tuple[list, list]:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        stats, steps, i_need, they_need = exchange(a, b)
        best = min(best, time.perf_counter() - t0)
    print(f"{label}:")
    sent = stats.bytes_exchanged
    print(f"  compare wall time     {best * 1000:10.2f} ms  "
          f"(best of {repeat}, in process, no network)")
    print(f"  bytes exchanged       {sent:10,d} B  ({sent / 1024:.1f} KiB)")
    for step, n in steps.items():
        print(f"    {step:<19} {n:10,d} B")
    print(f"  partitions compared   {stats.partitions_compared:10,d}")
    print(f"  partitions differing  {stats.partitions_differing:10,d}")
    print(f"  segments differing    {stats.segments_differing:10,d}")
    print(f"  keys differing        {stats.keys_differing:10,d}  "
          f"(A needs {len(i_need)}, B needs {len(they_need)})")
    return i_need, they_need


def bench_update(n: int, rnd: random.Random) -> None:
    keys = [rnd.randbytes(16) for _ in range(n)]
    old = [rnd.randbytes(8) for _ in range(n)]
    new = [rnd.randbytes(8) for _ in range(n)]
    rows = []
    for label, pairs in [
        ("insert (old None)", [(k, None, d) for k, d in zip(keys, old)]),
        ("replace", list(zip(keys, old, new))),
        ("delete (new None)", [(k, d, None) for k, d in zip(keys, new)]),
    ]:
        tree = Tree()
        update = tree.update
        t0 = time.perf_counter()
        for k, o, d in pairs:
            update(k, o, d)
        rows.append((label, (time.perf_counter() - t0) / n * 1e6))
    tree = Tree.from_entries(zip(keys, old))
    t0 = time.perf_counter()
    for _ in range(1000):
        data = tree.to_bytes()
    to_us = (time.perf_counter() - t0) / 1000 * 1e6
    t0 = time.perf_counter()
    for _ in range(1000):
        Tree.from_bytes(data)
    from_us = (time.perf_counter() - t0) / 1000 * 1e6
    print(f"Tree.update ({n:,d} updates of 16-byte keys, 8-byte digests):")
    for label, us in rows:
        print(f"  {label:<19} {us:8.2f} µs per update")
    print(f"  to_bytes            {to_us:8.2f} µs per tree ({len(data)} B)")
    print(f"  from_bytes          {from_us:8.2f} µs per tree")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, default=1_000_000)
    parser.add_argument("--partitions", type=int, default=1024)
    parser.add_argument("--differ", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    rnd = random.Random(args.seed)

    entries = [(rnd.randbytes(16), rnd.randbytes(8)) for _ in range(args.keys)]
    a, b = Replica(args.partitions), Replica(args.partitions)
    t0 = time.perf_counter()
    for key, digest in entries:
        a.put(key, digest)
    build_a = time.perf_counter() - t0
    rnd.shuffle(entries)  # B saw the same writes in another order
    for key, digest in entries:
        b.put(key, digest)
    assert all(a.trees[p] == b.trees[p] for p in range(args.partitions))

    print(f"keys {args.keys:,d}, partitions {args.partitions}, segments/partition {SEGMENTS}, "
          f"keys/segment {args.keys / args.partitions / SEGMENTS:.2f}")
    per_put = build_a / args.keys * 1e6
    tree_mib = args.partitions * SEGMENTS * HASH_BYTES / 2**20
    print(f"  build one replica     {build_a:10.2f} s  ({per_put:.2f} µs per put: "
          "partition, tree update, index)")
    print(f"  tree memory           {tree_mib:10.1f} MiB per replica")
    timed_exchange(a, b, "in sync", args.repeat)

    # Make --differ keys differ: a third changed on B, a third missing on B, a third only on B.
    victims = rnd.sample([k for k, _ in entries], args.differ)
    for i, key in enumerate(victims):
        if i % 3 == 0:
            b.put(key, rnd.randbytes(8))
        elif i % 3 == 1:
            b.put(key, None)
        else:
            a.put(key, None)
    i_need, they_need = timed_exchange(a, b, f"{args.differ} keys differ", args.repeat)
    assert set(i_need) | set(they_need) == set(victims)

    # Repair: apply what each side needs; then the roots agree again.
    for key in i_need:
        a.put(key, b.store.get(key))
    for key in they_need:
        b.put(key, a.store.get(key))
    timed_exchange(a, b, "after repair", 1)

    bench_update(200_000, rnd)


if __name__ == "__main__":
    main()
