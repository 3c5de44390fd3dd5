"""make demo: start local kvd nodes on loopback, show them working, leave them running.

Nodes live under .demo/ (config, data, logs); `make demo-stop` stops them.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEMO = Path(os.environ.get("KVD_DEMO_DIR", ROOT / ".demo"))
BIN = Path(sys.executable).parent
BASE_PORT = int(os.environ.get("KVD_DEMO_PORT", "7379"))
NODES = [(f"n{i + 1}", BASE_PORT + 10 * i, BASE_PORT + 10 * i + 1) for i in range(3)]
RESP_OFFSET = 3  # each node's Redis-protocol port: its client port + 3 (7382 for n1)
HOST = f"127.0.0.1:{BASE_PORT}"


def kvctl(*args: str, host: str = HOST, check: bool = True) -> int:
    command = [str(BIN / "kvctl"), "--host", host, *args]
    print(f"\n$ kvctl --host {host} {' '.join(args)}", flush=True)
    code = subprocess.run(command).returncode
    if check and code != 0:
        sys.exit(f"demo: kvctl {' '.join(args)} failed with exit code {code}")
    return code


def redis_cli(port: int, *args: str) -> None:
    """Show one redis-cli command against a node's RESP port (skipped without redis-cli)."""
    command = ["redis-cli", "-p", str(port + RESP_OFFSET), *args]
    print(f"\n$ {' '.join(command)}", flush=True)
    if shutil.which("redis-cli") is None:
        print("(redis-cli is not installed: apt-get install redis-tools, or make ops-tools)")
        return
    subprocess.run(command, check=False)


def wait_port(port: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    sys.exit(f"demo: node on port {port} did not start; see {DEMO}/*.log")


def wait_for(what: str, check, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.3)
    sys.exit(f"demo: gave up waiting for {what}; see {DEMO}/*.log")


def status_states(host: str = HOST) -> dict[str, str]:
    out = subprocess.run([str(BIN / "kvctl"), "--host", host, "--json", "status"],
                         capture_output=True)
    if out.returncode != 0:
        return {}
    return {n["node"]: n["state"] for n in json.loads(out.stdout)["nodes"]}


def transfers_pending() -> int:
    out = subprocess.run([str(BIN / "kvctl"), "--host", HOST, "--json", "transfers"],
                         capture_output=True)
    return len(json.loads(out.stdout)["transfers"]) if out.returncode == 0 else -1


def stop_all() -> None:
    for pid_file in DEMO.glob("*.pid"):
        try:
            os.kill(int(pid_file.read_text()), signal.SIGTERM)
        except (ProcessLookupError, ValueError):
            pass
        pid_file.unlink()


def start(node: str, port: int, peer_port: int, seeds: list[str]) -> None:
    config = DEMO / f"{node}.toml"
    if not config.exists():
        config.write_text(
            f'node_id = "{node}"\nlisten = "127.0.0.1:{port}"\npeer_listen = "127.0.0.1:{peer_port}"\n'
            f'metrics_listen = ""\ndata_dir = "{DEMO / node}"\ngossip_interval = 0.5\n'
            f'resp_listen = "127.0.0.1:{port + RESP_OFFSET}"\n'
            + (f"seeds = [{', '.join(repr(s) for s in seeds)}]\n".replace("'", '"') if seeds else "")
        )
    log = open(DEMO / f"{node}.log", "ab")
    proc = subprocess.Popen([str(BIN / "kvd"), "--config", str(config)], stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    (DEMO / f"{node}.pid").write_text(str(proc.pid))
    wait_port(port)
    print(f"started {node}: clients 127.0.0.1:{port}, peers 127.0.0.1:{peer_port}, "
          f"redis-cli -p {port + RESP_OFFSET}", flush=True)


def main() -> None:
    if "--stop" in sys.argv:
        stop_all()
        return
    if DEMO.exists():
        stop_all()
        time.sleep(0.5)
        shutil.rmtree(DEMO)
    DEMO.mkdir()
    seed = f"127.0.0.1:{NODES[0][2]}"
    for node, port, peer_port in NODES:
        start(node, port, peer_port, [] if node == "n1" else [seed])

    print("\n== Form a 3-node cluster: stage two joins, review the plan, commit ==")
    for node, port, _ in NODES[1:]:
        kvctl("cluster", "join", seed, host=f"127.0.0.1:{port}")
    kvctl("cluster", "plan")
    kvctl("cluster", "commit")
    wait_for("the transfers to finish", lambda: transfers_pending() == 0)
    wait_for("every node to be up", lambda: set(status_states().values()) == {"UN"})
    kvctl("status")

    print("\n== Write and read (N=3, R=2, W=2) ==")
    kvctl("put", "greeting", "hello from kvd")
    kvctl("get", "greeting", host=f"127.0.0.1:{NODES[2][1]}")
    kvctl("inspect", "greeting")

    print("\n== The same cluster through the Redis protocol (redis-cli, any node) ==")
    redis_cli(NODES[1][1], "SET", "motd", "hello from redis-cli")
    redis_cli(NODES[2][1], "GET", "motd")
    redis_cli(NODES[0][1], "MSET", "user:1", "ada", "user:2", "grace")
    redis_cli(NODES[1][1], "--scan", "--pattern", "user:*")

    print("\n== Kill n3 (SIGKILL): reads still succeed, status shows it DN ==")
    pid_file = DEMO / "n3.pid"
    os.kill(int(pid_file.read_text()), signal.SIGKILL)
    pid_file.unlink()
    wait_for("n3 to be seen down", lambda: status_states().get("n3") == "DN")
    kvctl("get", "greeting")
    kvctl("status")

    print("\n== Restart n3: it comes back UN ==")
    node, port, peer_port = NODES[2]
    start(node, port, peer_port, [seed])
    wait_for("n3 to be seen up", lambda: status_states().get("n3") == "UN")
    kvctl("status")
    print(f"\nThe nodes keep running (logs in {DEMO}); stop them with `make demo-stop`.")


if __name__ == "__main__":
    main()
