"""kvctl's operator views against a real node (issue 12): `kvctl version` shows the
client's and every node's version and protocol; `status --watch` and `transfers --watch`
redraw in place on a terminal (rich Live, checked in a real pseudo-terminal) and print one
snapshot (or JSON line) per refresh in a pipe; the transfers summary adds up its rows."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys
import time

import pytest

from kvctl.transfers import reasons, summarize, summary_line
from kvd._version import version
from kvd.proto.messages import PROTOCOL_VERSION
from tests.procs import ROOT, KvdProcess


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    proc = KvdProcess(tmp_path_factory.mktemp("kvctl-ops") / "data", extra={"ring_size": 64})
    proc.start()
    yield proc
    proc.kill()


def test_version_shows_client_and_each_node(node, kvctl_cli):
    out = kvctl_cli("--json", "version", host=node.address)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["client"] == {"version": version(fallback="(development)"),
                             "protocol": PROTOCOL_VERSION}
    assert [(n["node"], n["version"], n["protocol"]) for n in doc["nodes"]] == [
        ("n1", version(), PROTOCOL_VERSION)]
    human = kvctl_cli("version", host=node.address)
    assert human.returncode == 0
    assert f"protocol {PROTOCOL_VERSION}" in human.stderr.decode()
    assert version() in human.stdout.decode()


def test_watch_in_a_pipe_prints_one_json_line_per_refresh(node, kvctl_cli):
    out = kvctl_cli("--json", "transfers", "--watch", "--interval", "0.1", "--count", "3",
                    host=node.address)
    assert out.returncode == 0, out.stderr
    docs = [json.loads(line) for line in out.stdout.decode().splitlines()]
    assert len(docs) == 3
    assert docs[0] == {"transfers": [], "summary": summarize([])}
    out = kvctl_cli("--json", "status", "--watch", "--interval", "0.1", "--count", "2",
                    host=node.address)
    docs = [json.loads(line) for line in out.stdout.decode().splitlines()]
    assert [[n["state"] for n in d["nodes"]] for d in docs] == [["UN"], ["UN"]]


def run_in_terminal(*args: str, timeout: float = 60) -> bytes:
    """Run kvctl with a pseudo-terminal as stdout; everything it wrote."""
    leader, follower = pty.openpty()
    env = {**os.environ, "NO_COLOR": "1", "TERM": "xterm", "COLUMNS": "100"}
    proc = subprocess.Popen([sys.executable, "-m", "kvctl.app", *args], stdout=follower,
                            stderr=subprocess.PIPE, cwd=ROOT, env=env)
    os.close(follower)
    chunks = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            data = os.read(leader, 65536)
        except OSError:  # the terminal closed: kvctl exited
            break
        if not data:
            break
        chunks.append(data)
    os.close(leader)
    assert proc.wait(timeout) == 0, proc.stderr.read()
    return b"".join(chunks)


def test_status_watch_redraws_in_place_on_a_terminal(node):
    out = run_in_terminal("--host", node.address, "status", "--watch", "--interval", "0.2",
                          "--count", "3")
    assert out.count(b"UN") >= 3, out  # (Live draws the last view once more as it ends)
    # rich Live moves the cursor back up over the previous view before drawing the next.
    assert out.count(b"\x1b[1A") >= 2 or out.count(b"\x1b[A") >= 2, out


def test_summary_counts_rows_rate_and_eta():
    rows = [
        {"state": "done", "bytes_done": 1000, "rate_bps": 500, "keys_done": 10},
        {"state": "done", "bytes_done": 3000, "rate_bps": 500, "keys_done": 30},
        {"state": "running", "bytes_done": 500, "rate_bps": 250, "keys_done": 5},
        {"state": "pending", "bytes_done": 0, "rate_bps": 0, "keys_done": 0},
    ]
    summary = summarize(rows)
    assert summary == {"partitions": 4, "done": 2, "running": 1, "pending": 1, "retrying": 0,
                       "bytes_done": 4500, "rate_bps": 250, "eta_s": 14}  # (2000*2-500)/250
    assert summary_line(summary) == ("4 partitions: 2 done, 1 running, 1 pending; 4.4KiB "
                                     "moved at 250B/s; ETA 0m14s")
    assert summarize(rows[2:])["eta_s"] is None  # nothing done yet: no estimate
    # Between two partitions nothing runs for a moment: the estimate stays, from the rate
    # of those done (an outside tester saw it flip to "unknown" at every boundary).
    between = summarize([rows[0], rows[1], rows[3]])
    assert between["rate_bps"] == 0 and between["eta_s"] == 4  # 2000 bytes at 500/s
    assert summarize(rows[:2])["eta_s"] == 0  # all done


def test_retrying_partitions_say_why_one_line_per_node_and_reason():
    """Outside tester: a partition waiting for a down holder showed "retrying" and no reason."""
    down = "waiting for n4, which holds it, is leaving, and is down: start it again"
    rows = [{"partition": 17, "to": "n5", "state": "retrying", "error": down},
            {"partition": 3, "to": "n5", "state": "retrying", "error": down},
            {"partition": 9, "to": "n6", "state": "retrying", "error": "connection refused"},
            {"partition": 4, "to": "n5", "state": "done", "error": None}]
    assert reasons(rows) == [f"n5 retries partitions 3, 17: {down}",
                             "n6 retries partition 9: connection refused"]


def test_inspect_shows_a_replica_that_did_not_answer_as_unknown_not_absent():
    """Outside tester: with n3 paused, inspect waited, then printed `n3 primary no` and
    "replicas DIFFER", as if n3 lacked the key."""
    from kvctl.data import inspect_table

    held = {"present": True, "siblings": 1, "digest": "ab12"}
    replicas = [{"node": "n1", "role": "primary", **held},
                {"node": "n2", "role": "primary", **held},
                {"node": "n3", "role": "primary", "present": False, "siblings": 0,
                 "digest": None, "error": "timed out"}]
    rows, notes = inspect_table(replicas)
    assert rows[2] == ["n3", "primary", "?", "-", "-"]
    assert notes == ["did not answer: n3 (timed out)", "the replicas that answered agree"]
    replicas[1] = {"node": "n2", "role": "primary", "present": False, "siblings": 0,
                   "digest": None}
    assert inspect_table(replicas)[1][-1] == "replicas DIFFER"
    assert inspect_table(replicas[:1])[1] == ["replicas agree"]
