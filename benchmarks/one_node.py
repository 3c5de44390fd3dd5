"""One node's hot path, with kvd's CPU per request (issue 14's first slice).

Against one kvd node (sync=batch, RESP port on) and a local redis-server (appendfsync
always), back to back in one run:

- ``kvctl bench`` workload A, 1 KiB values, 32 concurrent (native protocol);
- ``redis-benchmark -t set`` and ``-t get``, 1 KiB, 32 clients, on one key and with
  ``-r 100000`` (random keys).

For each: requests/s, p50, p99, and the server's CPU per request (utime + stime from
/proc/PID/stat over the run, divided by the requests). ``--profile DIR`` also records each
kvd run with py-spy (``py-spy record --format raw``) into DIR. Prints figures, never fails
on speed.
"""

from __future__ import annotations

import argparse
import csv
import io
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

from tests.procs import KvdProcess, free_port, kvctl, wait_port  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def cpu_split(pid: int) -> tuple[float, float]:
    """(utime, stime) of ``pid`` so far, seconds (fields 14 and 15 of /proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / TICK, int(fields[12]) / TICK


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` so far."""
    return sum(cpu_split(pid))


class Profiler:
    """py-spy attached to the server for one run, when asked."""

    def __init__(self, directory: Path | None, pid: int, name: str):
        self.proc = None
        spy = shutil.which("py-spy") or shutil.which("py-spy", path=str(ROOT / ".venv/bin"))
        if directory is not None and spy:
            self.proc = subprocess.Popen(
                [spy, "record", "-p", str(pid), "-f", "raw", "-r", "200", "-o",
                 str(directory / f"{name}.txt")],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1.0)  # attached before the load starts

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(2)  # SIGINT: py-spy writes its file and exits
            self.proc.wait(timeout=60)


def measured(pid: int, name: str, profile: Path | None, run) -> dict:
    """Run ``run()`` (returning {"ops", "rps", "p50", "p99"}) with the server's CPU noted."""
    spy = Profiler(profile, pid, name)
    before = cpu_seconds(pid)
    try:
        row = run()
    finally:
        spent = cpu_seconds(pid) - before
        spy.stop()
    row["cpu_us"] = spent / row["ops"] * 1e6
    return row


def redis_benchmark(port: int, test: str, ops: int, random_keys: bool) -> dict:
    command = ["redis-benchmark", "-p", str(port), "-t", test, "-d", "1024", "-c", "32",
               "-n", str(ops), "--csv"] + (["-r", "100000"] if random_keys else [])
    out = subprocess.run(command, capture_output=True, check=True, timeout=3600).stdout
    row = next(csv.DictReader(io.StringIO(out.decode())))
    return {"ops": ops, "rps": float(row["rps"]), "p50": float(row["p50_latency_ms"]),
            "p99": float(row["p99_latency_ms"])}


def kvctl_bench(address: str, ops: int) -> dict:
    out = kvctl("--json", "bench", "--workload", "A", "--ops", str(ops), "--concurrency", "32",
                "--value-size", "1024", "--keys", "10000", "--connections", "4", "--no-load",
                host=address, timeout=900)
    result = json.loads(out.stdout)
    return {"ops": ops, "rps": result["ops_per_sec"], "p50": result["p50_ms"],
            "p99": result["p99_ms"]}


def resp_runs(port: int, pid: int, ops: int, label: str, profile: Path | None) -> list:
    rows = []
    for random_keys in (False, True):
        for test in ("set", "get"):
            name = f"{label}-{test}{'-r' if random_keys else ''}"
            row = measured(pid, name, profile,
                           lambda: redis_benchmark(port, test, ops, random_keys))
            rows.append((f"{label} {test.upper()}{' -r 100000' if random_keys else ''}", row))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", type=int, default=20000, help="requests per run")
    parser.add_argument("--profile", type=Path, help="record each kvd run with py-spy here")
    parser.add_argument("--no-redis", action="store_true", help="skip the redis-server runs")
    args = parser.parse_args()
    if not shutil.which("redis-benchmark"):
        sys.exit("redis-benchmark is not installed (make ops-tools installs redis-tools)")
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="kvd-one-node-"))
    rows = []
    port = free_port()
    node = KvdProcess(root / "kvd" / "data", "p1", extra={"resp_listen": f"127.0.0.1:{port}",
                                                        "sync": "batch"}).start()
    try:
        pid = node.proc.pid
        kvctl("bench", "--ops", "1", "--keys", "10000", host=node.address, timeout=900)  # load
        rows.append(("kvd kvctl bench A", measured(
            pid, "kvd-native", args.profile, lambda: kvctl_bench(node.address, args.ops))))
        rows += resp_runs(port, pid, args.ops, "kvd", args.profile)
    finally:
        node.kill()
    if not args.no_redis and shutil.which("redis-server"):
        port = free_port()
        (root / "redis").mkdir()
        server = subprocess.Popen(
            ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir",
             str(root / "redis"), "--appendonly", "yes", "--appendfsync", "always",
             "--save", ""], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_port(port, proc=server)
            rows += resp_runs(port, server.pid, args.ops, "redis", None)
        finally:
            server.kill()
            server.wait()
    elif not args.no_redis:
        print("redis-server is not installed (make bench installs it as root): no comparison")
    print(f"load average {os.getloadavg()[0]:.2f}, {os.cpu_count()} cores, {args.ops} requests"
          " per run")
    print(f"{'run':28} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'CPU us/req':>11}")
    for name, row in rows:
        print(f"{name:28} {row['rps']:9.0f} {row['p50']:8.3f} {row['p99']:8.3f} "
              f"{row['cpu_us']:11.1f}")
    by_name = dict(rows)
    for name, row in rows:  # kvd's share of Redis's throughput, run for run
        if name.startswith("redis ") and "kvd " + name[6:] in by_name:
            share = by_name["kvd " + name[6:]]["rps"] / row["rps"]
            print(f"kvd/redis {name[6:]}: {share:.2f}x throughput")
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
