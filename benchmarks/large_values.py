"""Large values through three nodes (issue 14, "large values").

A local 3-node cluster (N=3, W=2, R=2, sync=batch), all data directories on one disk. One
value of ``--size`` bytes (1 GiB by default) is put with ``kvctl put KEY --file F`` and read
back with ``kvctl get KEY --output /dev/null``. Printed: MB/s of each, each node's CPU
seconds during each (utime + stime from /proc/PID/stat), each node's peak RSS (VmHWM) after
both, and the disk's own fdatasync throughput under the data directories (a write of the
same size in 1 MiB blocks, then fdatasync), measured in the same run as the physical
reference: the put writes the value three times to that one disk. ``--profile DIR`` records
the coordinator (the node kvctl talks to) and one replica with py-spy during each. Prints
figures, never fails on speed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.one_node import Profiler, cpu_seconds  # noqa: E402
from benchmarks.cluster import start_cluster  # noqa: E402
from tests.procs import KvdProcess, kvctl, rss_kib  # noqa: E402

MiB = 1024 * 1024


def parse_size(text: str) -> int:
    units = {"k": 1024, "m": MiB, "g": 1024 * MiB}
    if text[-1:].lower() in units:
        return int(float(text[:-1]) * units[text[-1].lower()])
    return int(text)


def write_file(path: Path, size: int, sync: bool) -> float:
    """Write ``size`` pseudo-random bytes to ``path`` in 1 MiB blocks; seconds taken (with a
    final fdatasync when ``sync``: the disk reference)."""
    block = os.urandom(MiB)
    started = time.monotonic()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        written = 0
        while written < size:
            n = min(MiB, size - written)
            os.write(fd, memoryview(block)[:n])
            written += n
        if sync:
            os.fdatasync(fd)
    finally:
        os.close(fd)
    return time.monotonic() - started


def timed(nodes: list[KvdProcess], name: str, profile: Path | None, *args: str) -> tuple:
    """Run kvctl ``args`` against the first node; (seconds, CPU seconds per node)."""
    spies = [Profiler(profile, nodes[0].proc.pid, f"{name}-coordinator"),
             Profiler(profile, nodes[1].proc.pid, f"{name}-replica")] if profile else []
    before = [cpu_seconds(n.proc.pid) for n in nodes]
    started = time.monotonic()
    try:
        out = kvctl(*args, host=nodes[0].address, timeout=3600)
        elapsed = time.monotonic() - started
    finally:
        cpu = [cpu_seconds(n.proc.pid) - b for n, b in zip(nodes, before)]
        for spy in spies:
            spy.stop()
    if out.returncode != 0:
        raise SystemExit(f"kvctl {args[0]} failed: {out.stderr.decode(errors='replace')}")
    return elapsed, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=parse_size, default=1024 * MiB,
                        help="value size, e.g. 256M (default 1G)")
    parser.add_argument("--profile", type=Path, help="record two nodes with py-spy here")
    args = parser.parse_args()
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="kvd-large-"))
    source = root / "value.bin"
    write_file(source, args.size, sync=False)
    disk_seconds = write_file(root / "disk-reference.bin", args.size, sync=True)
    (root / "disk-reference.bin").unlink()
    nodes = start_cluster(root)
    try:
        put_s, put_cpu = timed(nodes, "put", args.profile, "put", "big", "--file", str(source))
        put_peaks = [rss_kib(n.proc.pid, "VmHWM") / 1024 for n in nodes]
        get_s, get_cpu = timed(nodes, "get", args.profile, "get", "big", "--output", "/dev/null")
        peaks = [rss_kib(n.proc.pid, "VmHWM") / 1024 for n in nodes]
    finally:
        for node in nodes:
            node.kill()
    source.unlink()
    mb = args.size / 1e6
    print(f"value {args.size / MiB:.0f} MiB, 3 nodes N3 W2 R2 sync=batch, load average "
          f"{os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    print(f"disk fdatasync write reference: {mb / disk_seconds:7.1f} MB/s "
          f"(a put writes it 3x: limit about {mb / disk_seconds / 3:.0f} MB/s)")
    print(f"put: {mb / put_s:7.1f} MB/s  get: {mb / get_s:7.1f} MB/s")
    print(f"{'node':12} {'put CPU s':>10} {'get CPU s':>10} {'peak RSS MiB':>13} "
          f"{'(after put)':>12}")
    for i, node in enumerate(nodes):
        role = "coordinator" if i == 0 else node.node_id
        print(f"{role:12} {put_cpu[i]:10.2f} {get_cpu[i]:10.2f} {peaks[i]:13.1f} "
              f"{put_peaks[i]:12.1f}")
    for node in nodes:  # a replica dropped from the upload, say: the figures need it
        for line in node.log_text().splitlines():
            if "dropped from upload" in line or " ERROR " in line or (
                    " WARNING " in line and "no cluster yet" not in line):
                print(f"{node.node_id} log: {line[:200]}")
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
