"""redis-benchmark against kvd's RESP port and against Redis 7, side by side (issue 13).

`redis-benchmark -t set,get -d 1024 -c 32 -n N` against one kvd node (sync=batch: every
acknowledged SET is fsynced, group-committed) and against a local redis-server with
`appendonly yes`, `appendfsync always` (every write fsynced too), in one run: requests/s,
p50 and p99 for each, and kvd's share of Redis's throughput. N is KVD_RESP_BENCH_OPS
(default 100,000). Needs redis-tools (make ops-tools) and redis-server (Debian
redis-server) for the comparison; prints what it could not run. Figures, never pass/fail.
"""

from __future__ import annotations

import csv
import io
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.procs import KvdProcess, free_port, wait_port  # noqa: E402

OPS = int(os.environ.get("KVD_RESP_BENCH_OPS", "100000"))


def redis_benchmark(port: int) -> dict[str, dict[str, float]]:
    out = subprocess.run(["redis-benchmark", "-p", str(port), "-t", "set,get", "-d", "1024",
                          "-c", "32", "-n", str(OPS), "--csv"],
                         capture_output=True, check=True, timeout=3600).stdout.decode()
    return {row["test"]: {k: float(v) for k, v in row.items() if k != "test"}
            for row in csv.DictReader(io.StringIO(out))}


def main() -> None:
    if not shutil.which("redis-benchmark"):
        print("redis-benchmark is not installed (make ops-tools): skipped")
        return
    root = Path(tempfile.mkdtemp(prefix="kvd-resp-bench-"))
    results = {}
    port = free_port()
    node = KvdProcess(root / "kvd" / "data", "r1", extra={"resp_listen": f"127.0.0.1:{port}",
                                                        "sync": "batch"}).start()
    try:
        results["kvd (1 node, sync=batch)"] = redis_benchmark(port)
    finally:
        node.kill()
    if shutil.which("redis-server"):
        port = free_port()
        (root / "redis").mkdir()
        server = subprocess.Popen(
            ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir",
             str(root / "redis"), "--appendonly", "yes", "--appendfsync", "always",
             "--save", ""], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_port(port, proc=server)
            time.sleep(0.2)
            results["redis 7 (appendfsync always)"] = redis_benchmark(port)
        finally:
            server.kill()
            server.wait()
    else:
        print("redis-server is not installed (apt-get install redis-server): no comparison")
    print(f"redis-benchmark -t set,get -d 1024 -c 32 -n {OPS}")
    print(f"{'server':32} {'test':4} {'req/s':>10} {'p50 ms':>8} {'p99 ms':>8}")
    for server, tests in results.items():
        for test, row in tests.items():
            print(f"{server:32} {test:4} {row['rps']:10.0f} {row['p50_latency_ms']:8.3f} "
                  f"{row['p99_latency_ms']:8.3f}")
    if len(results) == 2:
        kvd, redis = results.values()
        for test in kvd:
            print(f"kvd/redis {test}: {kvd[test]['rps'] / redis[test]['rps']:.2f}x throughput")
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
