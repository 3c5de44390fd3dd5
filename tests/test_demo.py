"""`make demo` works from a clean state: it starts a node, writes, reads and shows status."""

import os
import subprocess
import sys

import pytest

from tests.procs import ROOT, free_port

pytestmark = pytest.mark.slow


def test_demo_script_runs_and_leaves_a_working_node(tmp_path):
    env = {**os.environ, "KVD_DEMO_DIR": str(tmp_path / "demo"),
           "KVD_DEMO_PORT": str(free_port()), "NO_COLOR": "1"}
    try:
        run = subprocess.run([sys.executable, "scripts/demo.py"], cwd=ROOT, env=env,
                             capture_output=True, timeout=120)
        out = run.stdout.decode() + run.stderr.decode()
        assert run.returncode == 0, out
        assert "hello from kvd" in out      # the read
        assert "UN" in out and "n1" in out   # kvctl status
    finally:
        subprocess.run([sys.executable, "scripts/demo.py", "--stop"], cwd=ROOT, env=env,
                       timeout=60)
