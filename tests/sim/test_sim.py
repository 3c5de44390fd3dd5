"""The whole-cluster simulation in make test: many seeds, the regression seeds, and the
negative control that proves the checker can fail. ``make sim SEEDS=N`` runs thousands.

A seed replays exactly (tests/sim/__main__.py): the regression test runs only the short
regression seeds the many-seed test does not (with 12 seeds, 25, 39, 92, 10376, 70089 and
140160),
as running one of those again gives the very same report; run on its own (``-k
regression``), it runs every short one, and with KVD_SIM_FULL_REGRESSIONS=1 (``make sim``)
the full-profile ones too."""

from __future__ import annotations

import os


from .__main__ import run_seeds
from .simulation import SHORT, Report, replay_command, run

# 12 short seeds (about 40 CPU-s with the regression seeds): the exploration that needs
# hundreds of seeds is `make sim`'s; make test's 10-minute budget on 2 cores could not carry
# 50 (165 CPU-s) beside the real-process tests.
SEEDS = int(os.environ.get("KVD_SIM_SEEDS", "12"))

# Seeds that once failed, with what they found; each must pass for good.
REGRESSIONS = [
    (1, "short", "a failed tombstone-purge RPC (connection closed) crashed the node"),
    (25, "short", "the coordinator's local hint store lacked discard_upload/write_chunk: a "
                  "large write with a down primary crashed the node"),
    (7, "short", "replicas of one partition never converged after the heal"),
    (11, "short", "a deleted key came back"),
    (39, "short", "a deleted key came back; a purge RPC lost to a reset crashed the node"),
    (92, "short", "a PUT applied twice: more siblings than writes"),
    (8, "short", "a delete minted beside the late twin alone: contexts name write ids too"),
    (10376, "short", "a force-remove committed on a node that had left reached no member: "
                     "reads at R=N failed for good"),
    (70089, "short", "a leaving node that waited for the members to hear it had handed off "
                     "took a force-remove; the change never spread: reads at R=N failed"),
    (112, "full", "two force-removes committed through two members 2 s apart: merge kept "
                  "the second ring, the first acknowledged commit was undone"),
    (498, "full", "a tombstone purged 0.8 s after its delete by a node whose clock ran 41 s "
                  "ahead of the deleting coordinator's; a late twin of the put brought the "
                  "key back"),
    (603, "full", "a write acknowledged during a replace by the leaving replica and the new "
                  "one alone; once the transition ended the new one was its only copy, and "
                  "it was lost with it"),
    (140160, "short", "rounds spent gossiping with a member that had left starved the live: "
                      "one went unheard for 6 s, was judged down, and a read at R=N failed"),
]


def _failures(reports) -> list[str]:
    out = []
    for report in reports:
        if not report.ok:
            out.append(report.summary() + "\n    " + "\n    ".join(report.problems[:5])
                       + f"\n    replay: {replay_command(report)}")
    return out


def _reports(seeds, short: bool) -> list[Report]:
    return run_seeds(seeds, short=short, jobs=min(2, os.cpu_count() or 1))


def test_simulated_seeds():
    """Rules 1-7 of tests/sim/simulation.py hold for every seed, and rule 2 was put to the
    test: some acknowledged deletes had their tombstones purged before the final reads, and
    tombstone GC ran while faults came and went (before the heal)."""
    reports = _reports(range(1, SEEDS + 1), short=True)
    failures = _failures(reports)
    assert not failures, "\n".join(failures)
    assert sum(r.counts.get("deletes_purged", 0) for r in reports) > 0, "no tombstone was purged"
    assert sum(r.counts.get("purged_in_faults", 0) for r in reports) > 0, "GC never ran in faults"


def test_regression_seeds(request):
    """Every short regression seed. The full-profile ones (45 s of CPU, which make test's
    10-minute budget on 2 cores could no longer afford) run in `make sim`
    (KVD_SIM_FULL_REGRESSIONS=1); make test keeps a targeted test of each one's bug:
    seed 112 test_topology_sim.py::test_a_commit_acknowledged_is_never_undone_by_one_made_
    elsewhere, 498 test_cluster_sim.py (the deleting coordinator's clock behind), 603
    test_topology_sim.py::test_a_write_during_a_transition_is_acknowledged_only_when_both_
    rings_hold_it."""
    # Seeds test_simulated_seeds runs in this session (on this worker or another one).
    many = any(item.name == "test_simulated_seeds" for item in request.session.items)
    covered = set(range(1, SEEDS + 1)) if many else set()
    reports = []
    full = os.environ.get("KVD_SIM_FULL_REGRESSIONS") == "1"
    for short in (True, False) if full else (True,):
        reports += _reports([seed for seed, profile, _ in REGRESSIONS
                             if (profile == "short") == short
                             and not (short and seed in covered)], short=short)
    failures = _failures(reports)
    assert not failures, "\n".join(failures)


def test_checker_reports_a_dropped_acknowledged_write():
    """The negative controls: a run that loses one acknowledged write, and applies another
    twice, must fail with both."""
    report = run(3, profile=SHORT, lose_one_ack=True, apply_one_twice=True)
    assert report.counts["lost"] == 1
    assert any("acknowledged write" in p and "lost" in p for p in report.problems)
    assert sum("applied twice" in p for p in report.problems) == 1, report.problems
