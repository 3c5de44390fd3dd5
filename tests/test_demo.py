"""`make demo` works from a clean state: 3 nodes form a cluster, survive a kill, recover."""

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
        assert out.count("hello from kvd") >= 3     # written, read, read again with n3 down
        assert "DN    │ n3" in out               # the killed node is seen down
        assert out.rstrip().count("UN    │ n3") >= 2  # up after forming, up again after restart
        assert "replicas agree" in out
    finally:
        subprocess.run([sys.executable, "scripts/demo.py", "--stop"], cwd=ROOT, env=env,
                       timeout=60)
