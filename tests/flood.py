"""Idle-socket flood for the connection-budget tests (issue 10, holes 1 and 3).

``Flood(port, count)`` holds ``count`` silent TCP connections to a port from a background
thread and reopens every one the node closed, every ``interval`` seconds: the attack of
issue 10 (idle sockets reopened every 5 s). Connects are non-blocking, so a full accept
backlog delays the flood, never the test. ``python -m tests.flood PORT COUNT SECONDS`` runs
one from its own process (its own descriptor limit), for the 10,000-socket soak;
``flood_process`` starts one niced, so the attacker does not outrank the node for the CPU.

The probes time what the bound of issue 10 is about: a *new authenticated* client, from
connect to the answer of its first request, on the native port (token HELLO + GET), the RESP
port (AUTH + GET) and the peer port (the secret's challenge-response, then a sealed PING).
"""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from kvd import blocking_client
from kvd.proto import codec
from kvd.proto.codec import NEED_DATA, FrameDecoder
from kvd.proto.handshake import ClientHandshake
from kvd.proto.messages import MsgType

ROOT = Path(__file__).resolve().parent.parent


class Flood:
    def __init__(self, port: int, count: int, interval: float = 0.5, host: str = "127.0.0.1"):
        self.port = port
        self.count = count
        self.interval = interval
        self.host = host
        self.socks: list[socket.socket | None] = [None] * count
        self.opened = 0  # connections opened in all
        self.closed_by_node = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "Flood":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(10)
        for sock in self.socks:
            if sock is not None:
                sock.close()

    def held(self) -> int:
        return sum(1 for sock in self.socks if sock is not None)

    def _open(self) -> socket.socket | None:
        sock = socket.socket()
        sock.setblocking(False)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")  # RST: no TIME_WAIT
        err = sock.connect_ex((self.host, self.port))
        if err not in (0, errno.EINPROGRESS):
            sock.close()
            return None
        self.opened += 1
        return sock

    def _alive(self, sock: socket.socket) -> bool:
        try:
            data = sock.recv(65536)
        except BlockingIOError:
            return True
        except OSError:
            return False
        return bool(data)  # an ERROR frame or EOF: the node is done with it

    def _run(self) -> None:
        while not self._stop.is_set():
            for i, sock in enumerate(self.socks):
                if self._stop.is_set():
                    return
                if sock is not None and self._alive(sock):
                    continue
                if sock is not None:
                    sock.close()
                    self.closed_by_node += 1
                self.socks[i] = self._open()
            self._stop.wait(self.interval)


def flood_process(port: int, count: int, seconds: float, interval: float = 5.0,
                  niceness: int = 10) -> subprocess.Popen:
    """A Flood in its own process, niced: the node's CPU is not the attacker's."""
    return subprocess.Popen(
        [sys.executable, "-m", "tests.flood", str(port), str(count), str(seconds), str(interval)],
        cwd=ROOT, stdout=subprocess.PIPE, text=True, preexec_fn=lambda: os.nice(niceness))


def probe_client(port: int, token: str | None, timeout: float = 10) -> float:
    """Seconds for a new client to connect, authenticate (HELLO with ``token``) and GET."""
    began = time.monotonic()
    with blocking_client.connect(f"127.0.0.1:{port}", timeout=timeout, token=token) as client:
        client.get(b"probe")
    return time.monotonic() - began


def probe_resp(port: int, token: str | None, timeout: float = 10) -> float:
    """Seconds for a new RESP client to connect, AUTH and GET (two replies)."""
    began = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.settimeout(timeout)
        auth = f"AUTH {token}\r\n".encode() if token else b""
        sock.sendall(auth + b"GET probe\r\n")
        want, data = (2 if token else 1), b""
        while data.count(b"\r\n") < want:
            chunk = sock.recv(4096)
            if not chunk:
                raise ConnectionError(f"RESP port closed the connection after {data!r}")
            data += chunk
        if token and not data.startswith(b"+OK"):
            raise ConnectionError(f"RESP AUTH refused: {data!r}")
    return time.monotonic() - began


def probe_peer(port: int, secret: bytes | None, timeout: float = 10) -> float:
    """Seconds for a new peer to connect, prove the cluster secret and get a PONG."""
    began = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.settimeout(timeout)
        machine = ClientHandshake(f"127.0.0.1:{port}", {"role": "peer", "node": "probe"},
                                  secret=secret)
        while True:
            done = machine.next_event()
            sock.sendall(machine.data_to_send())
            if done is not NEED_DATA:
                break
            machine.receive_data(sock.recv(65536))
        ping = codec.encode(MsgType.PING, 1, {})
        sock.sendall(done.sealer.seal(ping) if done.sealer is not None else ping)
        decoder, opener = FrameDecoder(1 << 20), done.opener
        if trailing := machine.trailing_data:  # already opened (handshake rule 3)
            decoder.receive_data(trailing)
        while True:
            while opener is not None and (payload := opener.next_payload()) is not None:
                decoder.receive_data(payload)
            if (reply := decoder.next_message()) is not NEED_DATA:
                break
            data = sock.recv(65536)
            if not data:
                raise ConnectionError("peer port closed the connection before PONG")
            (opener.receive_data if opener is not None else decoder.receive_data)(data)
        if reply is None or reply.type != MsgType.PONG:
            raise ConnectionError(f"peer port answered {reply}")
    return time.monotonic() - began


if __name__ == "__main__":
    port, count, seconds = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
    interval = float(sys.argv[4]) if len(sys.argv) > 4 else 5.0
    with Flood(port, count, interval) as flood:
        time.sleep(seconds)
        print(f"port {port}: opened {flood.opened}, closed by the node {flood.closed_by_node}, "
              f"held at the end {flood.held()}", flush=True)
