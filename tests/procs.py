"""Real kvd processes on loopback for the integration tests (ring 3 of DESIGN section 8)."""

from __future__ import annotations

import itertools
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


# Ports for test nodes: below the kernel's ephemeral range (outgoing connections take
# theirs there, so a port found free there can be gone a moment later) and a block of
# 1000 per pytest-xdist worker, so two workers never pick the same one.
_WORKER = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)
_PORTS = itertools.cycle(range(10000 + 1000 * (_WORKER % 10), 11000 + 1000 * (_WORKER % 10)))


def free_port() -> int:
    """A loopback port nothing listens on, not handed out before by this process lately."""
    for _ in range(1000):
        port = next(_PORTS)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in this worker's block")


def wait_port(port: int, timeout: float = 20.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"kvd exited with {proc.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"port {port} not open after {timeout}s")


def rss_kib(pid: int, field: str = "VmRSS") -> int:
    """Resident (VmRSS) or peak resident (VmHWM) memory of a process, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


class KvdProcess:
    """One kvd daemon: start, stop (SIGTERM), kill (SIGKILL), restart with the same data."""

    def __init__(self, data_dir: Path, node_id: str = "n1", extra: dict | None = None,
                 seeds: list[str] | None = None, prefix: list[str] | None = None):
        self.data_dir = Path(data_dir)
        self.prefix = list(prefix or [])  # e.g. ["prlimit", "--nofile=64"]
        self.node_id = node_id
        self.port = free_port()
        self.peer_port = free_port()
        self.extra = dict(extra or {})
        self.seeds = seeds or []
        self.proc: subprocess.Popen | None = None
        self.log_path = self.data_dir.parent / f"{node_id}.log"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def peer_address(self) -> str:
        return f"127.0.0.1:{self.peer_port}"

    def write_config(self) -> Path:
        lines = [
            f'node_id = "{self.node_id}"',
            f'listen = "127.0.0.1:{self.port}"',
            f'peer_listen = "127.0.0.1:{self.peer_port}"',
            f'data_dir = "{self.data_dir}"',
        ]
        if "metrics_listen" not in self.extra:
            lines.append('metrics_listen = ""')
        if self.seeds:
            lines.append("seeds = [" + ", ".join(f'"{s}"' for s in self.seeds) + "]")
        for key, value in self.extra.items():
            if isinstance(value, bool):
                lines.append(f"{key} = {'true' if value else 'false'}")
            elif isinstance(value, str):
                lines.append(f'{key} = "{value}"')
            else:
                lines.append(f"{key} = {value}")
        path = self.data_dir.parent / f"{self.node_id}.toml"
        path.write_text("\n".join(lines) + "\n")
        return path

    def start(self, wait: bool = True) -> "KvdProcess":
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        config = self.write_config()
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [*self.prefix, sys.executable, "-m", "kvd.main", "--config", str(config)],
            stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        log.close()
        if wait:
            wait_port(self.port, proc=self.proc)
        return self

    def kill(self) -> None:
        """SIGKILL: no chance to flush anything."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM and wait; returns the exit code."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def kvctl(*args: str, host: str | None = None, input: bytes | None = None,
          timeout: float = 60, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the real kvctl CLI in a subprocess."""
    command = [sys.executable, "-m", "kvctl.app"]
    if host:
        command += ["--host", host]
    command += list(args)
    return subprocess.run(
        command, input=input, capture_output=True, timeout=timeout, cwd=ROOT,
        env={**os.environ, **(env or {}), "NO_COLOR": "1"},
    )
