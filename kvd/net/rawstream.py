"""A byte stream over a plain TCP socket by direct non-blocking syscalls: the serving hot
path's ``receive_some``/``send_all`` without trio's socket layer.

trio's SocketStream pays, per request, a recv that fails with EAGAIN before it waits, and a
scheduler pass after every successful recv and send (its checkpoints). ``RawStream`` calls
recv/send on the socket itself and waits only when the kernel says it must.

Rules:

1. ``receive_some`` waits for readability first when the previous read was short (the peer
   had sent all it had, so a recv now would fail); otherwise it tries at once. Either way
   it passes through the scheduler at least once per call (a wait, or a checkpoint), so a
   connection whose peer always has more to send never starves the other tasks.
2. ``send_all`` sends at once and waits for writability only when the socket buffer is full.
   It is a cancellation point only when it must wait.
3. A reset or closed peer raises trio.BrokenResourceError, as trio's streams do. The
   socket belongs to the trio stream it came from: closing is the caller's (``detach``
   releases this object's hold on the descriptor without closing it).
4. ``wrap`` returns a RawStream only for a plain trio SocketStream; TLS and the simulator's
   streams are returned unchanged.
"""

from __future__ import annotations

import socket

import trio

__all__ = ["RawStream", "wrap"]


class RawStream:
    """``receive_some`` and ``send_all`` of a connected SocketStream, without its layer."""

    def __init__(self, stream: trio.SocketStream):
        self.stream = stream
        self.socket = stream.socket  # for remote_host() and the like
        self._fd = stream.socket.fileno()
        # The same descriptor, as a stdlib socket for the syscalls (no dup: Rule 3).
        self._sock = socket.socket(fileno=self._fd)
        self._short = True  # the last read was short: wait before the next recv (Rule 1)

    async def receive_some(self, max_bytes: int = 65536) -> bytes:
        if self._short:
            await trio.lowlevel.wait_readable(self._fd)
        else:
            await trio.lowlevel.checkpoint()
        while True:
            try:
                data = self._sock.recv(max_bytes)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(self._fd)
                continue
            except OSError as exc:
                raise trio.BrokenResourceError(str(exc)) from exc
            self._short = len(data) < max_bytes
            return data

    async def send_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                sent = self._sock.send(view)
            except BlockingIOError:
                await trio.lowlevel.wait_writable(self._fd)
                continue
            except OSError as exc:
                raise trio.BrokenResourceError(str(exc)) from exc
            view = view[sent:]

    def detach(self) -> None:
        """Give the descriptor back to the trio socket alone (it closes it)."""
        self._sock.detach()

    async def aclose(self) -> None:
        self.detach()
        await self.stream.aclose()


def wrap(stream):
    """A RawStream over ``stream`` when it is a plain SocketStream, else ``stream``."""
    if type(stream) is trio.SocketStream and stream.socket.type == socket.SOCK_STREAM:
        return RawStream(stream)
    return stream
