"""Three nodes on this machine (issue 14's cluster figures): N=3, R=2, W=2, sync=batch.

Starts a local 3-node cluster (each node with a RESP port), then, back to back:

- ``kvctl bench --procs P`` workload A (50/50 read/update), 1 KiB values, 10,000 keys,
  all processes through the first node, then with ``--spread`` (process i through node
  i mod 3, as a cluster's clients use every node);
- ``redis-benchmark -t set`` and ``-t get`` against the first node's RESP port, 1 KiB,
  32 clients, ``-r 100000`` (random keys).

For each: requests/s, p50, p99, and the nodes' CPU per request summed over the three
(utime + stime from /proc/PID/stat over the run), then each node's user and system time
per request. ``--profile DIR`` records each node with py-spy during each run. Prints
figures and the machine's cores; never fails on speed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.one_node import Profiler, cpu_split, redis_benchmark  # noqa: E402
from tests.procs import KvdProcess, free_port, kvctl  # noqa: E402


def wait_cluster(host: str, count: int) -> None:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        status = kvctl("--json", "status", host=host)
        transfers = kvctl("--json", "transfers", host=host)
        if status.returncode == 0 and transfers.returncode == 0:
            nodes = json.loads(status.stdout)["nodes"]
            if len(nodes) == count and all(n["state"] == "UN" for n in nodes) \
                    and not json.loads(transfers.stdout)["transfers"]:
                return
        time.sleep(0.5)
    raise SystemExit("cluster did not form")


def start_node(root: Path, node_id: str, seeds: list[str]) -> KvdProcess:
    """One node, tried again on fresh ports when one was taken meanwhile (the machine is
    shared: a test elsewhere may bind the port free_port found)."""
    for attempt in range(5):
        shutil.rmtree(root / node_id, ignore_errors=True)
        node = KvdProcess(root / node_id / "data", node_id, seeds=seeds,
                          extra={"resp_listen": f"127.0.0.1:{free_port()}", "sync": "batch"})
        try:
            return node.start()
        except RuntimeError:
            if attempt == 4:
                raise
    raise AssertionError("unreachable")


def start_cluster(root: Path) -> list[KvdProcess]:
    """Three nodes joined to the first, the plan committed, transfers drained."""
    first = start_node(root, "c1", [])
    nodes = [first] + [start_node(root, f"c{i}", [first.peer_address]) for i in (2, 3)]
    for other in nodes[1:]:
        kvctl("cluster", "join", first.peer_address, host=other.address)
    time.sleep(2)
    kvctl("cluster", "commit", host=first.address)
    wait_cluster(first.address, 3)
    return nodes


def measured(nodes: list[KvdProcess], run, profile: Path | None = None,
             name: str = "") -> dict:
    """``run()`` (returning {"ops", "rps", "p50", "p99"}) with the nodes' summed CPU noted."""
    spies = [Profiler(profile, n.proc.pid, f"{name}-{n.node_id}") for n in nodes]
    before = [cpu_split(n.proc.pid) for n in nodes]
    try:
        row = run()
    finally:
        after = [cpu_split(n.proc.pid) for n in nodes]
        for spy in spies:
            spy.stop()
    per_op = 1e6 / row["ops"]
    row["cpu_us"] = sum(sum(a) - sum(b) for a, b in zip(after, before)) * per_op
    # Where it went: the coordinator (the first node, unless --spread) and each replica,
    # user and system time apart (the system share is fsync and the sockets).
    row["per_node"] = "  ".join(
        f"{n.node_id} user {(a[0] - b[0]) * per_op:.0f} system {(a[1] - b[1]) * per_op:.0f}"
        for n, a, b in zip(nodes, after, before))
    return row


def kvctl_bench(address: str, ops: int, procs: int, concurrency: int, spread: bool) -> dict:
    out = kvctl("--json", "bench", "--workload", "A", "--ops", str(ops), "--concurrency",
                str(concurrency), "--value-size", "1024", "--keys", "10000", "--connections",
                str(2 * procs), "--procs", str(procs), "--no-load",
                *(["--spread"] if spread else []), host=address, timeout=1800)
    if out.returncode != 0:
        raise SystemExit(f"kvctl bench failed: {out.stderr.decode(errors='replace')}")
    result = json.loads(out.stdout)
    return {"ops": result["ops"], "rps": result["ops_per_sec"], "p50": result["p50_ms"],
            "p99": result["p99_ms"], "errors": result["errors"],
            "kvctl_cpu_us": result.get("cpu_us_per_op")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", type=int, default=20000, help="requests per run")
    parser.add_argument("--procs", type=int, default=3, help="kvctl bench processes")
    parser.add_argument("--concurrency", type=int, default=64, help="kvctl bench requests in flight")
    parser.add_argument("--profile", type=Path, help="record each node with py-spy here")
    parser.add_argument("--no-redis-benchmark", action="store_true")
    args = parser.parse_args()
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="kvd-cluster-bench-"))
    rows = []
    nodes = start_cluster(root)
    try:
        first = nodes[0]
        kvctl("bench", "--ops", "1", "--keys", "10000", host=first.address, timeout=900)  # load
        for spread in (False, True):
            name = f"kvctl bench A --procs {args.procs}" + (" --spread" if spread else "")
            rows.append((name, measured(
                nodes, lambda: kvctl_bench(first.address, args.ops, args.procs,
                                           args.concurrency, spread),
                args.profile, "spread" if spread else "kvctl")))
        port = int(first.extra["resp_listen"].rsplit(":", 1)[1])
        if not args.no_redis_benchmark and shutil.which("redis-benchmark"):
            for test in ("set", "get"):
                rows.append((f"redis-benchmark {test.upper()} -r 100000", measured(
                    nodes, lambda: redis_benchmark(port, test, args.ops, True),
                    args.profile, test)))
        elif not args.no_redis_benchmark:
            print("redis-benchmark is not installed (make ops-tools installs redis-tools)")
    finally:
        for node in nodes:
            node.kill()
    print(f"load average {os.getloadavg()[0]:.2f}, {os.cpu_count()} cores, 3 nodes N3 R2 W2, "
          f"{args.ops} requests per run")
    print(f"{'run':32} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'CPU us/req (3 nodes)':>21}")
    for name, row in rows:
        print(f"{name:32} {row['rps']:9.0f} {row['p50']:8.3f} {row['p99']:8.3f} "
              f"{row['cpu_us']:21.1f}")
        print(f"    us/req per node: {row['per_node']}")
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
