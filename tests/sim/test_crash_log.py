"""Rule 4 of tests/sim/harness.py holds however quiet the run's logging is: ``make sim`` and
make test once ran every seed with ``--json``, which set the root logger to CRITICAL, and a
traceback a node logs must still fail the seed."""

from __future__ import annotations

import logging

from .harness import SimCluster


def test_a_logged_traceback_is_a_crash_even_when_logging_is_quiet():
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.CRITICAL)  # what `python -m tests.sim --seed N --json` does
    sim = SimCluster(None, seed=1)
    try:
        try:
            raise ValueError("a bug in a handler")
        except ValueError:
            logging.getLogger("kvd.node.test").exception("internal error")
        logging.getLogger("kvd.node.test").error("an error without a traceback is no crash")
    finally:
        sim.close()
        root.setLevel(level)
    assert len(sim.crashes) == 1 and "a bug in a handler" in sim.crashes[0], sim.crashes
    assert logging.getLogger("kvd").level == logging.NOTSET, "close() restores the level"
