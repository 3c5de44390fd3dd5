"""Join a 4th node to a loaded 3-node cluster: keys moved vs ideal, transfer rate, and the
bench p99 during the transfer vs without it. Prints figures; never fails on speed.

    .venv/bin/python benchmarks/join_bench.py --keys 50000 --value-size 1024
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kvctl.bench import run_bench  # noqa: E402
from kvd.client import open_client  # noqa: E402
from tests.procs import KvdProcess, kvctl  # noqa: E402


def wait_for(check, timeout=600, step=0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(step)
    return False


def transfers_empty(host):
    out = kvctl("--json", "transfers", host=host)
    return out.returncode == 0 and json.loads(out.stdout)["transfers"] == []


def all_up(host, count):
    out = kvctl("--json", "status", host=host)
    if out.returncode != 0:
        return False
    nodes = json.loads(out.stdout)["nodes"]
    return len(nodes) == count and all(n["state"] == "UN" for n in nodes)


async def load(address, keys, value_size, concurrency=64):
    value = os.urandom(value_size)
    counter = iter(range(keys))
    async with open_client(address) as client:
        async def worker():
            for i in counter:
                await client.put(b"load:%08d" % i, value)

        async with trio.open_nursery() as nursery:
            for _ in range(concurrency):
                nursery.start_soon(worker)


def bench(address, ops):
    result = trio.run(lambda: run_bench(address, workload="A", ops=ops, concurrency=32,
                                        value_size=1024, keys=1000, connections=4, load=False))
    return result.summary()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--keys", type=int, default=50000)
    parser.add_argument("--value-size", type=int, default=1024)
    parser.add_argument("--bench-ops", type=int, default=3000)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="kvd-join-"))
    extra = {"gossip_interval": 0.5}
    n1 = KvdProcess(root / "n1" / "data", "n1", extra=extra).start()
    others = [KvdProcess(root / f"n{i}" / "data", f"n{i}", extra=extra, seeds=[n1.peer_address]).start()
              for i in (2, 3)]
    procs = [n1, *others]
    try:
        for node in others:
            assert kvctl("cluster", "join", n1.peer_address, host=node.address).returncode == 0
        time.sleep(2)
        assert kvctl("cluster", "commit", host=n1.address).returncode == 0
        wait_for(lambda: transfers_empty(n1.address) and all_up(n1.address, 3))
        started = time.monotonic()
        trio.run(load, n1.address, args.keys, args.value_size)
        load_s = time.monotonic() - started
        print(f"loaded {args.keys} keys of {args.value_size} B in {load_s:.1f} s "
              f"({args.keys / load_s:.0f} writes/s at N=3, W=2)")
        quiet = bench(n1.address, args.bench_ops)
        n4 = KvdProcess(root / "n4" / "data", "n4", extra=extra, seeds=[n1.peer_address]).start()
        procs.append(n4)
        assert kvctl("cluster", "join", n1.peer_address, host=n4.address).returncode == 0
        time.sleep(2)
        plan = json.loads(kvctl("--json", "cluster", "plan", host=n1.address).stdout)
        moved_partitions = len(plan["moves"])
        assert kvctl("cluster", "commit", host=n1.address).returncode == 0
        started = time.monotonic()
        during = bench(n1.address, args.bench_ops)
        wait_for(lambda: transfers_empty(n1.address), step=0.2)
        transfer_s = time.monotonic() - started
        log = n4.log_text()
        fetched = [line for line in log.splitlines() if "fetched every partition" in line]
        keys_moved = int(fetched[-1].split(":")[-1].split()[0]) if fetched else -1
        ideal = args.keys * 3 / 4 * 1  # n4 holds N/4 of all replicas: 3 replicas x 1/4
        data_mb = keys_moved * (args.value_size + 60) / 1e6
        print(json.dumps({
            "keys": args.keys, "partitions_moved": moved_partitions, "ideal_partitions": 1024 // 4,
            "keys_fetched_by_new_node": keys_moved, "ideal_keys": round(ideal),
            "transfer_seconds": round(transfer_s, 1),
            "transfer_rate_MBps": round(data_mb / transfer_s, 2) if transfer_s else None,
            "p99_ms_quiet": quiet["p99_ms"], "p99_ms_during_transfer": during["p99_ms"],
            "ops_per_sec_quiet": quiet["ops_per_sec"],
            "ops_per_sec_during_transfer": during["ops_per_sec"],
        }, indent=2))
    finally:
        for proc in procs:
            proc.kill()
        subprocess.run(["rm", "-rf", str(root)])


if __name__ == "__main__":
    main()
