"""The whole-cluster simulation in make test: many seeds, the regression seeds, and the
negative control that proves the checker can fail. ``make sim SEEDS=N`` runs thousands."""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor

from .simulation import FULL, SHORT, replay_command, run

SEEDS = int(os.environ.get("KVD_SIM_SEEDS", "50"))

# Seeds that once failed, with what they found; each must pass for good.
REGRESSIONS = [
    (2, FULL, "a coordinator's local hint store lacked write_chunk/discard_upload: a large "
              "write with a down primary crashed the node"),
    (8, FULL, "a tombstone-purge RPC lost to a connection reset crashed the node"),
    (2, SHORT, "a PUT applied twice (re-minted after a timeout): 7 siblings from 6 writes"),
    (7, SHORT, "a deleted key came back"),
]


def _short(seed: int):
    return run(seed, profile=SHORT)


def _failures(reports) -> list[str]:
    out = []
    for report in reports:
        if not report.ok:
            out.append(report.summary() + "\n    " + "\n    ".join(report.problems[:5])
                       + f"\n    replay: {replay_command(report)}")
    return out


def test_simulated_seeds():
    """Rules 1-6 of tests/sim/simulation.py hold for every seed."""
    with ProcessPoolExecutor(min(2, os.cpu_count() or 1)) as pool:
        reports = list(pool.map(_short, range(1, SEEDS + 1)))
    failures = _failures(reports)
    assert not failures, "\n".join(failures)


def test_regression_seeds():
    reports = [run(seed, profile=profile) for seed, profile, _found in REGRESSIONS]
    failures = _failures(reports)
    assert not failures, "\n".join(failures)


def test_checker_reports_a_dropped_acknowledged_write():
    """The negative control: a run that loses one acknowledged write must fail."""
    report = run(3, profile=SHORT, lose_one_ack=True)
    assert report.counts["lost"] == 1
    assert any("acknowledged write" in p and "lost" in p for p in report.problems)
