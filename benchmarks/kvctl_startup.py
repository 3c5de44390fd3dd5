"""kvctl's start-up cost: CPU seconds (user + system) of whole kvctl processes, the best of
several runs, against a real node. Target (issue 12): under 0.15 s for `kvctl --version`
and `kvctl get`. Prints figures; never fails on speed (tests/test_kvctl.py checks instead
that the heavy modules stay unimported on these paths).

    .venv/bin/python benchmarks/kvctl_startup.py [--runs 10]
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.procs import KvdProcess  # noqa: E402

TARGET = 0.15
COMMANDS = (["--version"], ["get", "bench:startup"], ["put", "bench:startup", "v"],
            ["status"], ["-h"])


def cpu_seconds(command: list[str], env: dict) -> float:
    """CPU time (user + system) of one child process run to completion."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   check=False)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    kvctl = [sys.executable, "-m", "kvctl.app"]
    baseline = [sys.executable, "-c", "pass"]
    with tempfile.TemporaryDirectory(prefix="kvctl-startup-") as root:
        node = KvdProcess(Path(root) / "n1" / "data").start()
        try:
            env = {**os.environ, "KVCTL_HOST": node.address, "NO_COLOR": "1"}
            subprocess.run([*kvctl, "put", "bench:startup", "v"], env=env, check=True,
                           capture_output=True)
            rows = [("python -c pass", baseline)] + [
                ("kvctl " + " ".join(c), [*kvctl, *c]) for c in COMMANDS]
            print(f"{'command':32} {'best':>7} {'median':>7}   (CPU s, {args.runs} runs; "
                  f"target < {TARGET})")
            for name, command in rows:
                times = sorted(cpu_seconds(command, env) for _ in range(args.runs))
                mark = "" if name.startswith("python") or times[0] < TARGET else "  over"
                print(f"{name:32} {times[0]:7.3f} {times[len(times) // 2]:7.3f}{mark}")
        finally:
            node.kill()


if __name__ == "__main__":
    main()
