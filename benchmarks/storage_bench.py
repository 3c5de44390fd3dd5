"""Group commit throughput: concurrent writers of 1 KiB values on LevelDB with sync="batch".

Prints synced writes/s, batches (fsyncs)/s, the mean batch size and write latency. A figure,
not a test: it never fails on speed.

    .venv/bin/python benchmarks/storage_bench.py [--writers 64] [--seconds 3] [--sync batch]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile

import trio

from kvd.storage import keys, open_storage


async def bench(path: str, writers: int, seconds: float, sync: str, value_size: int) -> None:
    latencies: list[float] = []
    value = os.urandom(value_size)

    async with open_storage(path, sync=sync) as storage:
        deadline = trio.current_time() + seconds

        async def writer(w: int) -> None:
            i = 0
            while trio.current_time() < deadline:
                key = keys.object_key(w, b"key-%d" % i)
                t0 = trio.current_time()
                await storage.write([(key, value)])
                latencies.append(trio.current_time() - t0)
                i += 1

        start = trio.current_time()
        async with trio.open_nursery() as nursery:
            for w in range(writers):
                nursery.start_soon(writer, w)
        elapsed = trio.current_time() - start
        stats = storage.statistics()

    latencies.sort()

    def pct(p: float) -> float:
        return latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1000

    print(f"writers {writers}, value {value_size} B, sync={sync}, {elapsed:.2f} s, dir {path}")
    print(f"  writes/s        {stats.writes_committed / elapsed:10.0f}")
    print(f"  batches/s       {stats.batches_committed / elapsed:10.1f}  (syncs {stats.syncs})")
    print(f"  mean batch size {stats.ops_committed / max(1, stats.batches_committed):10.1f} ops")
    print(f"  largest batch   {stats.largest_batch:10d} ops")
    print(f"  latency ms      p50 {pct(0.5):.2f}  p99 {pct(0.99):.2f}  max {pct(1.0):.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--writers", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--sync", default="batch", choices=["batch", "periodic", "none"])
    parser.add_argument("--value-size", type=int, default=1024)
    parser.add_argument("--dir", default="/tmp", help="parent of the scratch LevelDB dir")
    args = parser.parse_args()
    path = tempfile.mkdtemp(prefix="kvd-storage-bench-", dir=args.dir)
    try:
        trio.run(bench, path, args.writers, args.seconds, args.sync, args.value_size)
    finally:
        shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__":
    main()
