"""Fixtures shared by the test modules. Real-process helpers are in tests/procs.py (one
daemon) and tests/realcluster.py (a cluster of them); the simulator is tests/sim/."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import trio
from hypothesis import settings

from tests.procs import ROOT, KvdProcess

# pytest caches each test module's assertion-rewritten bytecode only when bytecode may be
# written: under PYTHONDONTWRITEBYTECODE every collection (each xdist worker's, then the
# alone pass's) rewrote all of them again, ~3.5 CPU-s each. The variable still reaches the
# processes tests start; __pycache__ is ignored by git.
sys.dont_write_bytecode = False

# No per-example deadline (hypothesis's default is 200 ms) for every property test: an
# example whose run a loaded host stalls (CPU steal, a busy neighbour) past 250 ms fails as
# "Unreliable test timings" when its replay is fast, whatever the property. The properties
# are what these tests check; time bounds that matter are asserted where they matter.
settings.register_profile("kvd", deadline=None)
settings.load_profile("kvd")

sys.path.insert(0, os.path.dirname(__file__))  # the simulator, as its test modules import it
from sim.harness import SimCluster, seeded  # noqa: E402


def pytest_configure(config):
    """Bytecode for kvd and kvctl before the first test (in the controller, once): every
    daemon and kvctl process a test starts would otherwise compile each module it imports
    when bytecode is not written (PYTHONDONTWRITEBYTECODE), ~0.2 CPU-s a daemon."""
    if not hasattr(config, "workerinput"):
        import compileall

        for package in ("kvd", "kvctl"):
            compileall.compile_dir(ROOT / package, quiet=1)


@pytest.fixture(autouse=True)
def _umask_restored():
    """A node run inside a test sets its process umask to 077 (kvd.node.data_dir, on
    purpose); restored after each test, so later tests and the processes they start (make
    deb) do not inherit it."""
    umask = os.umask(0o022)
    os.umask(umask)
    yield
    os.umask(umask)


@pytest.fixture
def procs():
    """Every kvd process a test starts; all are SIGKILLed at teardown, whatever happened."""
    started: list[KvdProcess] = []
    try:
        yield started
    finally:
        for proc in started:
            try:
                proc.kill()
            except Exception:  # noqa: BLE001 - keep killing the others
                pass


@pytest.fixture
def kvctl_cli():
    """Run kvctl in this process through typer's CliRunner (no interpreter start-up, unlike
    tests/procs.py ``kvctl``); returns a CompletedProcess with bytes stdout and stderr."""
    from typer.testing import CliRunner

    from kvctl.app import app

    runner = CliRunner()

    def run(*args: str, host: str | None = None, input: bytes | None = None):
        command = (["--host", host] if host else []) + list(args)
        result = runner.invoke(app, command, input=input, env={"NO_COLOR": "1"},
                               prog_name="kvctl")
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            raise result.exception
        return subprocess.CompletedProcess(["kvctl", *command], result.exit_code,
                                           result.stdout_bytes, result.stderr_bytes)

    return run


@pytest.fixture
async def sim(autojump_clock):
    """An empty simulated cluster (tests/sim/harness.py) on the autojump clock, seed 1."""
    with seeded(1):
        async with trio.open_nursery() as nursery:
            cluster = SimCluster(nursery, seed=1)
            try:
                yield cluster
            finally:
                cluster.close()
                nursery.cancel_scope.cancel()
