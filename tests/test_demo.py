"""`make demo` works from a clean state: 3 nodes form a cluster, survive a kill, recover."""

import os
import random
import re
import shutil
import socket
import subprocess
import sys

import pytest

from tests.procs import ROOT

pytestmark = pytest.mark.slow


def free_port_block(span: int = 30) -> int:
    """A base port whose next ``span`` ports are all free, below the ephemeral range (the
    demo uses base + 10 * node + offset, so one free port is not enough)."""
    for _ in range(200):
        base = random.randrange(20000, 30000 - span)
        try:
            for port in range(base, base + span):
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", port))
        except OSError:
            continue
        return base
    raise RuntimeError("no block of free ports")


def test_demo_script_runs_and_leaves_a_working_node(tmp_path):
    env = {**os.environ, "KVD_DEMO_DIR": str(tmp_path / "demo"),
           "KVD_DEMO_PORT": str(free_port_block()), "NO_COLOR": "1"}
    try:
        run = subprocess.run([sys.executable, "scripts/demo.py"], cwd=ROOT, env=env,
                             capture_output=True, timeout=120)
        out = run.stdout.decode() + run.stderr.decode()
        assert run.returncode == 0, out
        assert out.count("hello from kvd") >= 3     # written, read, read again with n3 down
        # kvctl status in a pipe: plain columns, STATE then NODE.
        assert re.search(r"^DN\s+n3\s", out, re.M)        # the killed node is seen down
        assert len(re.findall(r"^UN\s+n3\s", out, re.M)) >= 2  # up after forming and restart
        assert "replicas agree" in out
        if shutil.which("redis-cli"):  # installed by make ops-tools
            assert out.count("hello from redis-cli") == 2  # the SET shown, then its GET
            assert "user:1" in out.split("--scan")[-1]
    finally:
        subprocess.run([sys.executable, "scripts/demo.py", "--stop"], cwd=ROOT, env=env,
                       timeout=60)
