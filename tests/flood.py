"""Idle-socket flood for the connection-budget tests (issue 10, holes 1 and 3).

``Flood(port, count)`` holds ``count`` silent TCP connections to a port from a background
thread and reopens every one the node closed, every ``interval`` seconds: the attack of
issue 10 (idle sockets reopened every 5 s). Connects are non-blocking, so a full accept
backlog delays the flood, never the test. ``python -m tests.flood PORT COUNT SECONDS`` runs
one from its own process (its own descriptor limit), for the 10,000-socket soak.
"""

from __future__ import annotations

import errno
import socket
import sys
import threading
import time


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


if __name__ == "__main__":
    port, count, seconds = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
    interval = float(sys.argv[4]) if len(sys.argv) > 4 else 5.0
    with Flood(port, count, interval) as flood:
        time.sleep(seconds)
        print(f"port {port}: opened {flood.opened}, closed by the node {flood.closed_by_node}, "
              f"held at the end {flood.held()}", flush=True)
