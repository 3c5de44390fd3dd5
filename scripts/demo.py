"""make demo: start local kvd nodes on loopback, show them working, leave them running.

Nodes live under .demo/ (config, data, logs); `make demo-stop` stops them.
"""

from __future__ import annotations

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
NODES = [("n1", BASE_PORT, BASE_PORT + 1)]
HOST = f"127.0.0.1:{BASE_PORT}"


def kvctl(*args: str, host: str = HOST, check: bool = True) -> int:
    command = [str(BIN / "kvctl"), "--host", host, *args]
    print(f"\n$ kvctl --host {host} {' '.join(args)}", flush=True)
    code = subprocess.run(command).returncode
    if check and code != 0:
        sys.exit(f"demo: kvctl {' '.join(args)} failed with exit code {code}")
    return code


def wait_port(port: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    sys.exit(f"demo: node on port {port} did not start; see {DEMO}/*.log")


def stop_all() -> None:
    for pid_file in DEMO.glob("*.pid"):
        try:
            os.kill(int(pid_file.read_text()), signal.SIGTERM)
        except (ProcessLookupError, ValueError):
            pass
        pid_file.unlink()


def start(node: str, port: int, peer_port: int, seeds: list[str]) -> None:
    config = DEMO / f"{node}.toml"
    config.write_text(
        f'node_id = "{node}"\nlisten = "127.0.0.1:{port}"\npeer_listen = "127.0.0.1:{peer_port}"\n'
        f'metrics_listen = ""\ndata_dir = "{DEMO / node}"\n'
        + (f"seeds = [{', '.join(repr(s) for s in seeds)}]\n".replace("'", '"') if seeds else "")
    )
    log = open(DEMO / f"{node}.log", "ab")
    proc = subprocess.Popen([str(BIN / "kvd"), "--config", str(config)], stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    (DEMO / f"{node}.pid").write_text(str(proc.pid))
    wait_port(port)
    print(f"started {node}: clients 127.0.0.1:{port}, peers 127.0.0.1:{peer_port}", flush=True)


def main() -> None:
    if "--stop" in sys.argv:
        stop_all()
        return
    if DEMO.exists():
        stop_all()
        time.sleep(0.5)
        shutil.rmtree(DEMO)
    DEMO.mkdir()
    for node, port, peer_port in NODES:
        start(node, port, peer_port, [])
    kvctl("put", "greeting", "hello from kvd")
    kvctl("get", "greeting")
    kvctl("status")
    print(f"\nThe node keeps running (logs in {DEMO}); stop it with `make demo-stop`.")


if __name__ == "__main__":
    main()
