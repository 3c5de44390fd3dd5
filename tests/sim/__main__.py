"""make sim: run many seeds of the whole-cluster simulation and report what they found.

    python -m tests.sim --seeds 1000 [--first 1] [--jobs 2] [--short]
    python -m tests.sim --seed 42 [--short]      # replay one seed exactly, with its fault log

Every seed, in a bulk run, in make test and in a replay, runs in a fresh process started
the same way (``python -m tests.sim.seed N``, tests/sim/seed.py), so a seed that fails
anywhere replays exactly: trio keeps tasks in sets ordered by object address, which only a
process built the same way reproduces. PYTHONHASHSEED must be fixed too (make sim and make
test set it), and the sources compiled to bytecode before the run (importing this module
does it, once, in the process that starts the seeds).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor


def _compile_sources() -> None:
    """Bytecode first, in another process: a run that compiles a module allocates
    differently from one that loads it cached, and allocation order is what a seed's
    schedule depends on."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    subprocess.run([sys.executable, "-m", "compileall", "-q", os.path.join(root, "kvd"),
                    os.path.join(root, "tests", "sim")], check=False, capture_output=True)


_compile_sources()  # before the simulation's modules are imported below

from .simulation import Report, replay_command  # noqa: E402


def run_seed_process(seed: int, short: bool, log=None) -> Report:
    """Run one seed in a fresh interpreter (tests/sim/seed.py); ``log`` gets its stderr."""
    command = [sys.executable, "-m", "tests.sim.seed", str(seed)]
    if short:
        command.append("--short")
    env = dict(os.environ, PYTHONHASHSEED=os.environ.get("PYTHONHASHSEED", "0"))
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=root)
    if log is not None:
        log(done.stderr)
    try:
        return Report(**json.loads(done.stdout.strip().splitlines()[-1]))
    except (IndexError, ValueError, TypeError):
        tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
        return Report(seed, "short" if short else "full", 0,
                      problems=["the simulation process failed: " + " | ".join(tail)])


def run_seeds(seeds, short: bool, jobs: int, progress=None) -> list[Report]:
    with ThreadPoolExecutor(jobs) as pool:
        reports = []
        for report in pool.map(lambda s: run_seed_process(s, short), seeds):
            if progress is not None:
                progress(report)
            reports.append(report)
    return reports


def _print(report: Report) -> None:
    print(report.summary(), flush=True)
    if not report.ok:
        for problem in report.problems[:5]:
            print("  " + problem)
        print("  replay: " + replay_command(report), flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(prog="make sim", description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=200, help="how many seeds to run")
    parser.add_argument("--first", type=int, default=1, help="the first seed")
    parser.add_argument("--seed", type=int, help="replay this one seed, printing its faults")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--short", action="store_true", help="the short runs of make test")
    opts = parser.parse_args()
    if opts.seed is not None:
        report = run_seed_process(opts.seed, opts.short,
                                  log=lambda text: print(text, end="", file=sys.stderr))
        print("faults:", ", ".join(report.faults))
        _print(report)
        return 0 if report.ok else 1
    started = time.monotonic()
    seeds = range(opts.first, opts.first + opts.seeds)
    reports = run_seeds(seeds, opts.short, opts.jobs, _print)
    failed = [r for r in reports if not r.ok]
    converge = sorted(r.converge_seconds for r in reports if r.converge_seconds is not None)
    if converge:
        print(f"convergence after heal (simulated): median {converge[len(converge) // 2]:.0f} s, "
              f"max {converge[-1]:.0f} s")
    print(f"{len(reports) - len(failed)} passed, {len(failed)} failed "
          f"in {time.monotonic() - started:.0f} s")
    if failed:
        print("failing seeds: " + " ".join(str(r.seed) for r in failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
