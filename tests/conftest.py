"""Fixtures shared by the test modules. Real-process helpers are in tests/procs.py (one
daemon) and tests/realcluster.py (a cluster of them); the simulator is tests/sim/."""

from __future__ import annotations

import pytest

from tests.procs import KvdProcess


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
