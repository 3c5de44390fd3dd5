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
   It is a cancellation point only when it must wait. ``send_now`` never waits: it sends
   what the buffer takes and says how much.
3. A reset or closed peer raises trio.BrokenResourceError, as trio's streams do. The
   descriptor stays the trio stream's (read(2) and write(2) on it, no second socket
   object): ``aclose`` closes that stream, and so does whoever would have closed it.
4. ``wrap`` returns a RawStream only for a plain trio SocketStream; TLS and the simulator's
   streams are returned unchanged.
"""

from __future__ import annotations

import os
import socket

import trio

__all__ = ["RawStream", "wrap"]


class RawStream:
    """``receive_some`` and ``send_all`` of a connected SocketStream, without its layer."""

    def __init__(self, stream: trio.SocketStream):
        self.stream = stream
        self.socket = stream.socket  # for remote_host() and the like
        self._fd = stream.socket.fileno()
        self._short = True  # the last read was short: wait before the next recv (Rule 1)

    def _check_open(self) -> None:
        # Closed, its number may be another socket's by now: never touch it (a close while
        # we wait wakes the wait with ClosedResourceError, trio's notify_closing).
        if self.socket.fileno() < 0:
            raise trio.ClosedResourceError("the connection's socket was closed")

    async def receive_some(self, max_bytes: int = 65536) -> bytes:
        self._check_open()
        if self._short:
            await trio.lowlevel.wait_readable(self._fd)
        else:
            await trio.lowlevel.checkpoint()
        while True:
            try:
                data = os.read(self._fd, max_bytes)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(self._fd)
                continue
            except OSError as exc:
                raise trio.BrokenResourceError(str(exc)) from exc
            self._short = len(data) < max_bytes
            return data

    async def send_all(self, data: bytes) -> None:
        self._check_open()
        view = memoryview(data)
        while view:
            try:
                sent = os.write(self._fd, view)
            except BlockingIOError:
                await trio.lowlevel.wait_writable(self._fd)
                continue
            except OSError as exc:
                raise trio.BrokenResourceError(str(exc)) from exc
            view = view[sent:]

    def send_now(self, data) -> int:
        """Send what the socket buffer takes at once, never waiting: how many bytes."""
        self._check_open()
        try:
            return os.write(self._fd, data)
        except BlockingIOError:
            return 0
        except OSError as exc:
            raise trio.BrokenResourceError(str(exc)) from exc

    async def wait_send_all_might_not_block(self) -> None:
        self._check_open()
        await trio.lowlevel.wait_writable(self._fd)

    async def aclose(self) -> None:
        await self.stream.aclose()


def wrap(stream):
    """A RawStream over ``stream`` when it is a plain SocketStream, else ``stream``."""
    if type(stream) is trio.SocketStream and stream.socket.type == socket.SOCK_STREAM:
        return RawStream(stream)
    return stream
