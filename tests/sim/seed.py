"""One seed in a fresh process: ``python -m tests.sim.seed N [--short]``.

Prints the seed's Report as JSON (the last line of stdout) and logs kvd's warnings to
stderr. make sim and make test start every seed exactly this way, bulk runs and replays
alike, after compiling the sources in another process (tests/sim/__main__.py), so a seed
replays exactly: trio keeps tasks in sets ordered by object address, which only a process
built the same way reproduces (with PYTHONHASHSEED fixed too).

Logging is on at WARNING, as in a replay: at a higher level the ERROR records with a
traceback that rule 6 of tests/sim/simulation.py fails on would never be created.
"""

from __future__ import annotations

import sys

# trio.testing (MockClock) imports pytest only for RaisesGroup's
# ExceptionInfo and falls back without it: a quarter of a second of CPU per seed saved.
sys.modules["pytest"] = None  # type: ignore[assignment]

import dataclasses  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402

from .simulation import FULL, SHORT, run  # noqa: E402


def main() -> int:
    seed = int(sys.argv[1])
    short = "--short" in sys.argv[2:]
    logging.basicConfig(level=logging.WARNING, format="%(name)s %(message)s")
    report = run(seed, profile=SHORT if short else FULL)
    print(json.dumps(dataclasses.asdict(report)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
