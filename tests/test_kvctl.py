"""kvctl's everyday behaviour (issue 12): writes that mean what they say, output that
scripts can trust, errors that tell the fix, a fast start.

Most cases run kvctl in this process through typer's CliRunner (the ``kvctl_cli``
fixture) against one real node; the few that need a real process (Ctrl-C, a real
terminal, what a fresh interpreter imports, the awk script) say why.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

import pytest

from kvctl import render
from kvd.errors import BadRequest
from tests.procs import ROOT, KvdProcess, free_port

pytestmark = pytest.mark.slow

LONG_ID = "kvd-prod-eu-west-1a-rack07-node-0042-with-a-long-name"


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    base = tmp_path_factory.mktemp("kvctl")
    proc = KvdProcess(base / "n1" / "data", node_id=LONG_ID,
                      extra={"metrics_listen": f"127.0.0.1:{free_port()}"}).start()
    yield proc
    proc.kill()


@pytest.fixture
def kv(node, kvctl_cli):
    """kvctl against the node, in process: kv("get", "k") -> CompletedProcess."""
    return lambda *args, **kw: kvctl_cli(*args, host=node.address, **kw)


@pytest.fixture
def terminal(monkeypatch):
    """Make kvctl believe stdout is a terminal."""
    monkeypatch.setattr(render, "stdout_is_terminal", lambda: True)


def err(result) -> str:
    return result.stderr.decode()


def siblings(kv, key: str) -> list[str]:
    result = kv("--json", "get", key)
    return sorted(s["value"] for s in json.loads(result.stdout)["siblings"] if not s["deleted"])


# ----------------------------------------------------------------------- writes


def test_put_without_context_supersedes_and_blind_adds_a_sibling(kv):
    assert kv("put", "w1", "v1").returncode == 0
    assert kv("put", "w1", "v2").returncode == 0
    assert siblings(kv, "w1") == ["v2"]
    assert kv("put", "w1", "v3", "--blind").returncode == 0
    assert siblings(kv, "w1") == ["v2", "v3"]
    assert kv("put", "w1", "v4").returncode == 0  # supersedes both
    assert siblings(kv, "w1") == ["v4"]
    both = kv("put", "w1", "v5", "--blind", "--context", "AA")
    assert both.returncode == 2 and "exclude each other" in err(both)


@pytest.mark.parametrize("made_up", ["!!!", "é", " ", "...", "", "AAAAA", "AA=", "AAA==",
                                     "AA+/"])
def test_a_context_kvctl_never_printed_is_refused(kv, made_up):
    """A lenient base64 decoder dropped the characters outside its alphabet: '!!!' became
    the empty context, "no context", and replaced every sibling."""
    kv("put", "ctxk", "orig")
    kv("put", "ctxk", "conc", "--blind")
    for command in (["put", "ctxk", "new"], ["delete", "ctxk"]):
        refused = kv(*command, "--context", made_up)
        assert refused.returncode == 2, err(refused)
        assert err(refused).startswith("kvctl: error: --context ")
        assert "not a context" in err(refused) and "Traceback" not in err(refused)
    assert siblings(kv, "ctxk") == ["conc", "orig"]


def test_context_text_is_decoded_strictly():
    from kvd.versions import context_from_text

    sealed = bytes(range(40))
    text = render.encode_context(sealed)
    assert context_from_text(text) == context_from_text(text.encode()) == sealed
    assert context_from_text(text + "=" * (-len(text) % 4)) == sealed  # padded correctly
    for bad in ("!!!", "é", " ", "...", "", "AAAAA", "AA=", "AA===", text + "\n", "AA+/"):
        with pytest.raises(ValueError):
            context_from_text(bad)


def test_an_empty_file_or_stdin_stores_an_empty_value(kv, node, tmp_path):
    """A file's bytes were always streamed, and a stream of zero bytes is refused by the
    node ("a streamed PUT must declare a length above zero"): zero bytes now go inline."""
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    kv("put", "ev", "x")
    stored = kv("put", "ev", "-f", str(empty))
    assert stored.returncode == 0, err(stored)
    got = kv("get", "ev")
    assert (got.returncode, got.stdout) == (0, b"")
    # A real process whose stdin is the empty file (a regular file: read as one, not spooled).
    with open(empty, "rb") as stdin:
        piped = subprocess.run([sys.executable, "-m", "kvctl.app", "--host", node.address,
                                "put", "sk", "-"], stdin=stdin, capture_output=True, cwd=ROOT,
                               timeout=60, env={**os.environ, "NO_COLOR": "1"})
    assert piped.returncode == 0, piped.stderr.decode()
    got = kv("--json", "get", "sk")
    assert json.loads(got.stdout)["siblings"] == [
        {"value": "", "encoding": "utf-8", "deleted": False, "length": 0}]
    assert kv("put", "sk2", "-", input=b"").returncode == 0  # a pipe: spooled, always was


def test_delete_without_context_deletes(kv):
    assert kv("put", "d1", "v").returncode == 0
    assert kv("delete", "d1").returncode == 0
    missing = kv("get", "d1")
    assert missing.returncode == 1 and "not found" in err(missing)
    assert kv("put", "d2", "v").returncode == 0
    assert kv("delete", "d2", "--blind").returncode == 0  # a tombstone beside the value
    assert kv("get", "d2").stdout == b"v"


@pytest.mark.parametrize("args, says", [
    (["put", "q", "v", "-w", "0"], "-w"),
    (["get", "q", "-r", "0"], "-r"),
    (["delete", "q", "-n", "0"], "-n"),
    (["put", "q", "v", "-n", "2", "-w", "3"], "-w 3 is more than -n 2"),
    (["get", "q", "-n", "1", "-r", "2"], "-r 2 is more than -n 1"),
])
def test_quorum_out_of_range_is_a_usage_error(kv, args, says):
    result = kv(*args)
    assert result.returncode == 2
    error, usage = err(result).splitlines()
    assert error.startswith("kvctl: error: ") and says in error
    assert usage.startswith("Usage: kvctl ")


def test_quorum_above_the_nodes_n_is_refused_by_the_node_in_one_line(kv):
    result = kv("put", "q", "v", "-w", "5")  # kvctl cannot know the node's N; the node does
    assert result.returncode == 2
    assert err(result).startswith("kvctl: error: w=5 must be between 1 and n=")
    assert err(result).count("\n") == 1


def test_node_refuses_a_zero_quorum(node):
    """The node itself refuses w=0 and r=0 (it used to read them as 'use the default')."""
    from kvd.blocking_client import connect

    with connect(node.address, timeout=30) as client:
        with pytest.raises(BadRequest, match="w=0"):
            client.put(b"q0", b"v", w=0)
        with pytest.raises(BadRequest, match="r=0"):
            client.get(b"q0", r=0)


# ----------------------------------------------------------------------- output


def test_siblings_never_reach_stdout_mixed_with_headers(kv, tmp_path):
    kv("put", "sib", "one")
    kv("put", "sib", "two", "--blind")
    conflict = kv("get", "sib")
    assert (conflict.returncode, conflict.stdout) == (5, b"")
    assert "2 conflicting siblings" in err(conflict)
    assert "sibling 1: 3 bytes: one" in err(conflict) and "context: " in err(conflict)
    every = kv("get", "sib", "--all")
    assert every.returncode == 0
    assert every.stdout in (b"--- sibling 1 of 2: 3 bytes\none\n--- sibling 2 of 2: 3 bytes\ntwo\n",
                            b"--- sibling 1 of 2: 3 bytes\ntwo\n--- sibling 2 of 2: 3 bytes\none\n")
    assert kv("--json", "get", "sib").returncode == 0
    # -o: nothing written on a conflict; with --all FILE.1 and FILE.2.
    target = tmp_path / "out.bin"
    assert kv("get", "sib", "-o", str(target)).returncode == 5
    assert list(tmp_path.iterdir()) == []
    assert kv("get", "sib", "-o", str(target), "--all").returncode == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin.1", "out.bin.2"]
    assert {(tmp_path / n).read_bytes() for n in ("out.bin.1", "out.bin.2")} == {b"one", b"two"}


def test_value_in_a_pipe_is_exact_and_on_a_terminal_escaped_with_a_newline(kv, terminal):
    kv("put", "ctl", "-", input=b"\x1b[2Jclear\r\x00")
    shown = kv("get", "ctl")
    assert shown.stdout == b"\\x1b[2Jclear\\x0d\\x00\n"
    assert "context: " in err(shown)  # the context line is on stderr
    assert kv("get", "ctl", "--raw").stdout == b"\x1b[2Jclear\r\x00\n"


def test_on_a_real_terminal_the_value_is_escaped_and_ends_with_a_newline(kv, node):
    """A real process writing to a pseudo-terminal: what an operator sees."""
    import pty

    kv("put", "tty", "-", input=b"\x1b[2Jtop")
    master, slave = pty.openpty()
    try:
        got = subprocess.run([sys.executable, "-m", "kvctl.app", "--host", node.address,
                              "get", "tty"], stdout=slave, stderr=subprocess.PIPE, cwd=ROOT,
                             timeout=60, env={**os.environ, "NO_COLOR": "1"})
    finally:
        os.close(slave)
    shown = b""
    while True:
        try:
            data = os.read(master, 4096)
        except OSError:  # EIO: the terminal's other side is closed and drained
            break
        if not data:
            break
        shown += data
    os.close(master)
    assert got.returncode == 0, got.stderr
    assert shown == b"\\x1b[2Jtop\r\n"  # the terminal turns the newline into CR LF
    assert b"context: " in got.stderr


def test_value_in_a_pipe_is_exact(kv):
    kv("put", "ctl2", "-", input=b"\x1b[2J\xff\x00")
    assert kv("get", "ctl2").stdout == b"\x1b[2J\xff\x00"


def test_tables_in_a_pipe_are_plain_whitespace_columns(kv):
    out = kv("status").stdout.decode()
    header, row = out.splitlines()
    assert header.split() == ["STATE", "NODE", "ADDRESS", "LOAD", "PARTITIONS", "OWNS"]
    assert row.split()[:2] == ["UN", LONG_ID]  # not truncated to 80 columns
    assert not set(out) & set("│┃━╇─")


def test_global_options_after_the_command_and_dash_h(kv, node, kvctl_cli):
    assert json.loads(kv("status", "--json").stdout)["nodes"][0]["node"] == LONG_ID
    kv("put", "g", "v")
    assert kvctl_cli("get", "g", "--host", node.address).stdout == b"v"
    assert kvctl_cli("get", "g", f"--host={node.address}").stdout == b"v"
    assert kvctl_cli("-h").returncode == 0
    helped = kvctl_cli("get", "-h")
    assert helped.returncode == 0 and b"--output" in helped.stdout
    # After "--" nothing is an option: the value "--json" is stored as it is.
    assert kv("put", "g2", "--", "--json").returncode == 0
    assert kv("get", "g2").stdout == b"--json"


def test_hoisting_moves_only_global_options():
    from kvctl.app import hoist_global_options

    assert hoist_global_options(["get", "k", "--json", "-r", "2", "--host", "h:1"]) == \
        ["--json", "--host", "h:1", "get", "k", "-r", "2"]
    assert hoist_global_options(["put", "k", "--", "--json"]) == ["put", "k", "--", "--json"]


def test_usage_error_is_one_line_plus_the_usage_line(kv, kvctl_cli):
    result = kv("get", "k", "--jsonn")
    assert result.returncode == 2
    lines = err(result).splitlines()
    assert len(lines) == 2, lines
    assert lines[0].startswith("kvctl: error: No such option: --jsonn")
    assert lines[1].startswith("Usage: kvctl get [OPTIONS]")
    for command in (["put", "-h"], ["-h"], ["get", "-h"]):
        assert b"<bool>" not in kvctl_cli(*command).stdout
    for bare in ([], ["cluster"]):  # no command: the help, not an error line
        shown = kvctl_cli(*bare)
        assert b"Commands:" in shown.stdout + shown.stderr
        assert b"kvctl: error" not in shown.stderr


def test_inspect_of_a_key_never_written_says_the_replicas_agree(kv):
    doc = json.loads(kv("--json", "inspect", "never-written").stdout)
    assert doc["agree"] is True
    assert not any(r["present"] for r in doc["replicas"])
    assert "replicas agree" in err(kv("inspect", "never-written"))


def test_json_names_a_key_that_is_not_utf8_in_base64_as_keys_and_export_do(kv):
    """Outside tester: get/put/delete/inspect --json gave such a key as lone surrogates
    ("bk\\udcff"), which jq turns into U+FFFD: a script could not use it again."""
    key = "bk\udcff"  # the bytes b"bk\xff", as a shell passes them to kvctl
    for args in (("put", key, "v"), ("get", key), ("inspect", key), ("delete", key)):
        doc = json.loads(kv("--json", *args).stdout)
        assert (doc["key"], doc["key_encoding"]) == ("Ymv/", "base64"), (args, doc)
    doc = json.loads(kv("--json", "put", "plain", "v").stdout)
    assert (doc["key"], doc["key_encoding"]) == ("plain", "utf-8")


# ----------------------------------------------------------------------- errors


def test_output_file_problems_are_one_line(kv, tmp_path):
    kv("put", "o", "v")
    missing = kv("get", "o", "-o", str(tmp_path / "nonexistent" / "out.bin"))
    assert missing.returncode == 1
    assert err(missing).count("\n") == 1 and "does not exist" in err(missing)
    directory = kv("get", "o", "-o", str(tmp_path))
    assert directory.returncode == 2 and "is a directory" in err(directory)
    assert "Traceback" not in err(missing) + err(directory)


@pytest.mark.parametrize("host, says", [
    ("127.0.0.1", "--host 127.0.0.1: expected HOST:PORT"),
    ("localhost:99999", "port must be 1..65535, got 99999"),
    ("127.0.0.1:0", "port must be 1..65535, got 0"),
])
def test_bad_host_is_a_usage_error(kvctl_cli, host, says):
    result = kvctl_cli("get", "k", host=host)
    assert result.returncode == 2
    error, usage = err(result).splitlines()
    assert says in error and usage.startswith("Usage: kvctl ")


def test_wrong_port_is_named_with_the_port_to_use(node, kvctl_cli):
    peer = kvctl_cli("get", "k", host=node.peer_address)
    assert peer.returncode == 4
    assert "peer port" in err(peer) and node.address in err(peer)
    metrics = kvctl_cli("get", "k", host=node.extra["metrics_listen"])
    assert metrics.returncode == 4
    assert "metrics port" in err(metrics) and node.address in err(metrics)


@pytest.fixture
def silent_port():
    """A port that accepts connections and never says a word."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    accepted = []
    stop = threading.Event()

    def accept():
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(listener.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield listener.getsockname()[1], accepted
    stop.set()
    thread.join()
    for sock in accepted:
        sock.close()
    listener.close()


def test_timeout_bounds_a_silent_node(kvctl_cli, silent_port, monkeypatch):
    port, _ = silent_port
    result = kvctl_cli("--timeout", "0.5", "get", "k", host=f"127.0.0.1:{port}")
    assert result.returncode == 4
    assert "did not answer the handshake within 0.5 s" in err(result)
    monkeypatch.setenv("KVCTL_TIMEOUT", "0.5")
    assert kvctl_cli("status", host=f"127.0.0.1:{port}").returncode == 4
    bench = kvctl_cli("bench", "--ops", "1", host=f"127.0.0.1:{port}")  # the trio client
    assert bench.returncode == 4
    errors = [line for line in err(bench).splitlines() if line.startswith("kvctl: error:")]
    assert errors == err(result).splitlines(), "both clients say the same line"


@contextmanager
def _port_answering(answer: bytes):
    """A port that answers every connection with ``answer``, then closes it."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    stop = threading.Event()

    def serve():
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                conn = listener.accept()[0]
            except OSError:
                continue
            conn.sendall(answer)
            time.sleep(0.2)
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield listener.getsockname()[1]
    stop.set()
    thread.join()
    listener.close()


@pytest.fixture
def banner_port():
    """A port that greets every connection with an SSH banner, then closes it."""
    with _port_answering(b"SSH-2.0-OpenSSH_9.2\r\n") as port:
        yield port


def test_a_port_that_is_not_kvd_is_a_connect_error_naming_the_client_port(banner_port,
                                                                          kvctl_cli):
    """An SSH port's banner gave "bad magic b'SS', expected b'KV'" with exit 1, where other
    wrong ports (closed, silent, HTTP) give exit 4 and say which port to use."""
    result = kvctl_cli("get", "k", host=f"127.0.0.1:{banner_port}")
    assert result.returncode == 4, err(result)
    assert "does not speak kvd's protocol" in err(result)
    assert "client port" in err(result) and len(err(result).splitlines()) == 1, err(result)


@pytest.mark.parametrize("answer, says", [
    (b"SSH-2.0-OpenSSH_9.2\r\n", "does not speak kvd's protocol"),
    (b"HTTP/1.0 404 Not Found\r\nContent-Length: 0\r\n\r\n", "answers HTTP"),
    # What kvd's RESP port now answers a HELLO (tests/test_resp_sim.py).
    (b"-ERR this is kvd's RESP port; kvd clients (kvctl) use the client port (listen)\r\n",
     "is a Redis-protocol port (resp_listen)"),
], ids=["ssh", "http", "resp"])
@pytest.mark.parametrize("command", [["keys"], ["bench", "--ops", "1"], ["version"]],
                         ids=" ".join)
def test_the_trio_client_names_the_client_port_as_the_blocking_one_does(answer, says, command,
                                                                         kvctl_cli):
    """Commands on the trio client (streams, many requests in flight) said "bad magic
    b'SS', expected b'KV'" with exit 1, where one-request commands say which port to use
    and exit 4."""
    with _port_answering(answer) as port:
        blocking = kvctl_cli("get", "k", host=f"127.0.0.1:{port}")
        result = kvctl_cli(*command, host=f"127.0.0.1:{port}")
    assert result.returncode == 4, err(result)
    assert says in err(result) and "client port" in err(result), err(result)
    errors = [line for line in err(result).splitlines() if line.startswith("kvctl: error:")]
    assert errors == err(blocking).splitlines(), err(result)  # one line, the same one


def test_join_with_a_wrong_seed_ends(tmp_path, silent_port, kvctl_cli):
    """The seed accepts and never answers: the join ends with an error naming the seed."""
    port, _ = silent_port
    fresh = KvdProcess(tmp_path / "fresh" / "data", node_id="fresh").start()
    try:
        result = kvctl_cli("--timeout", "3", "cluster", "join", f"127.0.0.1:{port}",
                           host=fresh.address)
        assert result.returncode != 0
        assert f"127.0.0.1:{port}" in err(result) and err(result).count("\n") == 1
    finally:
        fresh.kill()


def test_repair_tells_where_to_see_progress(kv):
    started = kv("repair")
    assert started.returncode == 0 and "--wait" in err(started) and "log" in err(started)
    waited = kv("repair", "--wait")
    assert waited.returncode == 0, err(waited)
    assert waited.stdout.decode().split()[:2] == ["PARTITIONS", "DIFFER"]


def test_token_file_from_the_environment(kvctl_cli, node, tmp_path, monkeypatch):
    monkeypatch.setenv("KVCTL_TOKEN_FILE", str(tmp_path / "no-such-token"))
    result = kvctl_cli("status", host=node.address)
    assert result.returncode == 2 and "no-such-token" in err(result)


def one_usage_error(result, says: str) -> None:
    """Exit 2, and the error is one line (a usage line may follow), no internal error."""
    assert result.returncode == 2, err(result)
    error = err(result).splitlines()[0]
    assert error.startswith("kvctl: error: ") and says in error, error
    assert "internal error" not in err(result) and "Traceback" not in err(result)
    assert len(err(result).splitlines()) <= 2


@pytest.mark.parametrize("args, says", [
    (["--timeout", "nan", "status"], "--timeout"),
    (["--timeout", "inf", "status"], "--timeout"),
    (["--timeout", "1e300", "status"], "--timeout"),
    (["status", "--watch", "--interval", "nan", "--count", "2"], "--interval"),
    (["transfers", "--watch", "--interval", "inf", "--count", "2"], "--interval"),
    (["repair", "--partition", "99999999999999999999"], "--partition"),
    (["repair", "--partition", "-1"], "--partition"),
])
def test_bad_option_values_are_usage_errors(kv, args, says):
    one_usage_error(kv(*args), says)


def test_bad_timeout_from_the_environment_is_a_usage_error(kv, monkeypatch):
    monkeypatch.setenv("KVCTL_TIMEOUT", "nan")
    one_usage_error(kv("status"), "--timeout")


def test_a_binary_token_file_is_a_usage_error(kv, tmp_path):
    token = tmp_path / "token"
    token.write_bytes(b"\xce\xff\x00binary")
    one_usage_error(kv("--token-file", str(token), "status"), f"--token-file {token}: ")


def test_keys_prefix_is_bytes_as_a_key_is(kv):
    """A prefix that is not UTF-8 (a shell's $'\\xff') lists the keys that start with those
    bytes, as KEY takes them (surrogateescape), instead of failing to encode."""
    assert kv("put", "\udcffpre-k", "v").returncode == 0
    listed = kv("keys", "--prefix", "\udcffpre")
    assert listed.returncode == 0, err(listed)
    assert listed.stdout == b"\xffpre-k\n"


@pytest.mark.parametrize("line, says", [
    (b'{"key": 5, "siblings": []}', "key"),
    (b'{"key": "k", "siblings": [{"value": 5, "encoding": "utf-8", "deleted": false}]}',
     "value"),
    (b'{"key": "k", "siblings": [{"value": "v", "encoding": "rot13", "deleted": false}]}',
     "encoding"),
    (b'{"key": "k", "key_encoding": "rot13", "siblings": []}', "key_encoding"),
    (b'{"key": "k", "siblings": [{"value": "v", "encoding": "utf-8", "deleted": "yes"}]}',
     "deleted"),
    (b'{"key": "k", "siblings": [{"value": "!!!", "encoding": "base64", "deleted": false}]}',
     "base64"),
    (b'{"key": "k", "siblings": {"value": "v"}}', "siblings"),
    (b'["k"]', "object"),
    (b'{"key": "k", "siblings": [{"value": "v", "encoding": "utf-8", "deleted": false}]',
     "JSON"),
    (b'{"key": "k\xff", "siblings": []}', "UTF-8"),
])
def test_import_refuses_a_bad_line_before_writing_it(kv, tmp_path, line, says):
    """Lines before the bad one are written; the bad one stops the import, named by its
    number, and nothing of it is written (kvctl(1), import)."""
    kv("delete", "imp-good")
    kv("delete", "k")
    good = b'{"key": "imp-good", "siblings": [{"value": "g", "encoding": "utf-8", ' \
           b'"deleted": false}]}'
    source = tmp_path / "export.jsonl"
    source.write_bytes(good + b"\n" + line + b"\n")
    refused = kv("import", str(source))
    one_usage_error(refused, f"{source}:2: ")
    assert says in err(refused)
    assert kv("get", "imp-good").stdout == b"g"
    assert kv("get", "k").returncode == 1  # nothing of line 2 was written


def test_import_of_a_binary_file_names_it(kv, tmp_path):
    source = tmp_path / "binary"
    source.write_bytes(b"\xce\xff" * 40)
    one_usage_error(kv("import", str(source)), f"{source}:1: ")


def test_ctrl_c_prints_interrupted_and_exits_130(silent_port):
    """A real process: SIGINT while kvctl waits for a node that never answers. kvctl gets
    SIGINT at its default, as a shell's foreground job does: a test run started in the
    background (``make test &``) passes SIGINT ignored to its children, and Python keeps it
    ignored, as a background job should."""
    port, accepted = silent_port
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvctl.app", "--host", f"127.0.0.1:{port}", "--timeout", "120",
         "status"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env={**os.environ, "NO_COLOR": "1"},
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 60
        while not accepted and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert accepted, "kvctl never connected"
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130
    assert stderr.decode().strip() == "kvctl: interrupted"


# ----------------------------------------------------------------------- start-up

HEAVY = ("trio", "rich", "pydantic")

_IMPORTS_PROBE = """
import sys
sys.argv = ["kvctl", *sys.argv[1:]]
from kvctl.app import main
try:
    main()
except SystemExit:
    pass
heavy = sorted({m.split(".")[0] for m in sys.modules} & set(%r))
print("HEAVY:" + ",".join(heavy), file=sys.stderr)
""" % (HEAVY,)


@pytest.mark.parametrize("args", [["--version"], ["get", "k"], ["put", "k", "v"],
                                  ["status"]])
def test_fast_paths_import_no_heavy_module(node, args):
    """A fresh interpreter (a real process: the test runner has them all loaded already)."""
    probe = subprocess.run(
        [sys.executable, "-c", _IMPORTS_PROBE, "--host", node.address, *args], cwd=ROOT,
        capture_output=True, timeout=60, env={**os.environ, "NO_COLOR": "1"})
    last = probe.stderr.decode().strip().splitlines()[-1]
    assert last == "HEAVY:", probe.stderr.decode()


# ----------------------------------------------------------------------- the awk script


def test_everyday_commands_in_a_pipe_parse_with_awk(node):
    script = ROOT / "tests" / "kvctl_everyday.sh"
    run = subprocess.run(["sh", str(script)], cwd=ROOT, capture_output=True, timeout=300,
                         env={**os.environ, "KVCTL_HOST": node.address, "NO_COLOR": "1",
                              "KVCTL": f"{sys.executable} -m kvctl.app"})
    assert run.returncode == 0, run.stdout.decode() + run.stderr.decode()
    assert run.stdout.decode().splitlines()[-1] == "everyday: ok"


def test_json_document_lists_every_command():
    """docs/kvctl-json.md has a shape for every command (render.py's contract points there)."""
    import typer

    from kvctl.app import app

    doc = (ROOT / "docs" / "kvctl-json.md").read_text()
    names = []

    def walk(command, path):
        for name, sub in getattr(command, "commands", {}).items():
            walk(sub, [*path, name])
        if not getattr(command, "commands", None):
            names.append(path[-1])

    walk(typer.main.get_command(app), [])
    assert len(names) > 10
    assert [n for n in names if f"`{n}" not in doc] == []


def test_call_gives_an_async_operation_the_trio_client(node, monkeypatch):
    """Commands that stream (kvctl keys) pass an async function: it gets kvd.client's."""
    from kvctl.common import call, options
    from kvd.blocking_client import BlockingClient
    from kvd.client import Client

    monkeypatch.setattr(options, "host", node.address)

    async def trio_side(client):
        assert isinstance(client, Client)
        return (await client.status())["nodes"][0]["node"]

    def blocking_side(client):
        assert isinstance(client, BlockingClient)
        return client.status()["nodes"][0]["node"]

    assert call(trio_side) == call(blocking_side) == LONG_ID


def test_bench_from_several_processes_reports_the_nodes_cpu(node):
    """kvctl bench --procs: the run split over processes, every operation counted once, and
    the node's CPU per request (STATUS cpu_seconds) beside the figures. A real kvctl
    process: the bench processes are spawned from it."""
    from tests.procs import kvctl

    out = kvctl("--json", "bench", "--procs", "3", "--ops", "301", "--keys", "50",
                "--concurrency", "6", host=node.address, timeout=120)
    assert out.returncode == 0, out.stderr.decode()
    summary = json.loads(out.stdout)
    assert summary["ops"] + summary["errors"] == 301
    assert summary["procs"] == 3
    assert summary["cpu_us_per_op"] > 0


def test_moves_in_a_pipe_are_never_truncated(capsys):
    """kvctl(1): output that is not a terminal is never truncated. cluster plan cut its
    rows at 50 ("... and 462 more") in a pipe too, as on a terminal."""
    from kvctl.cluster import _moves_table

    moves = [{"partition": p, "from": "n1", "to": "n2"} for p in range(120)]
    _moves_table("120 partitions will move", moves)
    out = capsys.readouterr()
    assert len(out.out.splitlines()) == 1 + 120, out.out[-200:]
    assert "more" not in out.err
