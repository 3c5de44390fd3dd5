"""A framed connection: a trio stream plus the sans-IO codec and handshake.

``run_handshake`` drives a kvd.proto.handshake machine over a stream; the connection then
carries on where the handshake stopped (``finish_handshake``). One send lock per
connection; a failed or cancelled send marks the connection broken, so no half-written
frame is ever followed by another (the peer would misparse the stream).
Callers bound waits with cancel scopes; this module takes no timeout parameters.
"""

from __future__ import annotations

import os
import select

import trio

from kvd.errors import ConnectFailed, KvdError
from kvd.net.rawstream import RawStream
from kvd.net.sealed import SealedStream
from kvd.proto.codec import NEED_DATA, FrameDecoder, Message
from kvd.proto.handshake import ClientHandshake, Done, ServerHandshake, tls_refused
from kvd.proto.messages import PRE_AUTH_MAX_FRAME

RECEIVE_SIZE = 256 * 1024
HIGH_WATER = 1 << 20
SEND_FILE_STALL = 30.0  # seconds a reader may leave a send_file without room before it fails


class FrameConnection:
    """Send encoded frames and receive decoded messages over one stream."""

    def __init__(self, stream: trio.abc.Stream, max_frame: int = PRE_AUTH_MAX_FRAME):
        self.stream = stream
        self.decoder = FrameDecoder(max_frame)
        self._send_lock = trio.Lock()
        self._queue: list[bytes] = []
        self._queued = 0
        self.broken = False

    @property
    def max_frame(self) -> int:
        return self.decoder.max_frame

    @max_frame.setter
    def max_frame(self, value: int) -> None:
        self.decoder.max_frame = value

    async def finish_handshake(self, machine: ClientHandshake | ServerHandshake,
                               done: Done) -> None:
        """Send the handshake's last bytes (a server's final HELLO_OK), then carry on where
        it stopped: in its records when it sealed the connection, with the bytes it read
        past its last frame."""
        last = machine.data_to_send()
        if last:
            await self.send(last)  # already sealed by the handshake when it seals
        if done.sealer is not None and done.opener is not None:
            self.stream = SealedStream(self.stream, done.sealer, done.opener)
        trailing = machine.trailing_data
        if trailing:  # b"" would be read as EOF
            self.decoder.receive_data(trailing)

    async def receive(self) -> Message | None:
        """The next message, or None when the peer closed cleanly between frames.

        Raises RemoteProtocolError for malformed input and ConnectFailed for a broken stream.
        """
        while True:
            message = self.decoder.next_message()
            if message is not NEED_DATA:
                return message
            if self._queue and not self._send_lock.locked():
                await self._send_now()  # what ``send_soon`` queued, before we wait
            try:
                data = await self.stream.receive_some(RECEIVE_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                raise ConnectFailed(f"connection lost: {_reason(exc)}") from None
            self.decoder.receive_data(data)

    async def send(self, data: bytes) -> None:
        """Send whole encoded frames, in order.

        Frames queued while another task holds the send lock go out with its next
        send_all: under load many replies share one syscall (on loopback a send costs more
        than building the frame). Past HIGH_WATER queued bytes a sender waits its turn.
        """
        if self.broken:
            raise ConnectFailed("connection is broken")
        self._queue.append(data)
        self._queued += len(data)
        if self._send_lock.locked() and self._queued <= HIGH_WATER:
            return  # the task holding the lock sends it
        await self._send_now(checkpoint=True)

    async def send_soon(self, data: bytes) -> None:
        """Queue whole encoded frames to go out with the next ``send``, or before this
        connection's ``receive`` next waits for bytes: the replies its reader answers
        itself, one per request of a read, leave in one syscall. Past HIGH_WATER queued
        bytes they go now, so a client that does not read its replies stops the reader."""
        if self.broken:
            raise ConnectFailed("connection is broken")
        self._queue.append(data)
        self._queued += len(data)
        if self._queued > HIGH_WATER:
            await self._send_now()

    async def _send_now(self, checkpoint: bool = False) -> None:
        """Send everything queued, under the send lock (``checkpoint``: let the tasks that
        are ready now queue their frames behind ours first)."""
        async with self._send_lock:
            if checkpoint:
                await trio.lowlevel.cancel_shielded_checkpoint()
            try:
                await self._send_queued()
            except BaseException as exc:
                self._break(exc)
                raise
        if self.broken:
            raise ConnectFailed("connection is broken")

    def can_send_file(self) -> bool:
        """Whether ``send_file`` works here: a plain TCP socket (not TLS, not sealed)."""
        return isinstance(self.stream, (trio.SocketStream, RawStream))

    async def send_file(self, frames: list[tuple[bytes, int, int]], fd: int) -> None:
        """Send frames whose bodies are in the open file ``fd``: each (header, offset,
        count) is ``header`` then ``count`` bytes of the file from ``offset``, moved by
        os.sendfile in a worker thread (page cache to socket, no copy through Python).
        Only when ``can_send_file()``. Holds the send lock for all of them; a cancel waits
        for the thread, which gives up after SEND_FILE_STALL seconds without room. Frames
        queued before go out first, those queued meanwhile (``send`` left them to the lock's
        holder) right after."""
        assert isinstance(self.stream, (trio.SocketStream, RawStream))
        if self.broken:
            raise ConnectFailed("connection is broken")
        async with self._send_lock:
            try:
                await self._send_queued()
                await trio.to_thread.run_sync(_send_file_frames, self.stream.socket.fileno(),
                                              fd, frames)
                await self._send_queued()
            except BaseException as exc:
                self._break(exc)
                raise

    def _break(self, exc: BaseException) -> None:
        """A send failed or was cancelled part-way: no frame may follow on this stream. A
        broken stream raises ConnectFailed; anything else (a cancel) is the caller's to
        re-raise."""
        self.broken = True
        if isinstance(exc, (trio.BrokenResourceError, trio.ClosedResourceError, OSError)):
            raise ConnectFailed(f"connection lost: {_reason(exc)}") from None

    async def _send_queued(self) -> None:
        while self._queue:
            batch = b"".join(self._queue) if len(self._queue) > 1 else self._queue[0]
            self._queue.clear()
            self._queued = 0
            await self.stream.send_all(batch)

    async def aclose(self) -> None:
        self.broken = True
        with trio.move_on_after(1) as scope:
            scope.shield = True
            try:
                await self.stream.aclose()
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass


async def run_handshake(stream: trio.abc.Stream,
                        machine: ClientHandshake | ServerHandshake) -> Done:
    """Move bytes between ``stream`` and a handshake machine until it is done (its refusal
    raised); the machine's last bytes are left for ``finish_handshake``. The caller bounds
    the wait."""
    while True:
        try:
            event = machine.next_event()
        except KvdError:
            try:  # what it queued before refusing (a challenge) goes out before the ERROR
                await _send_handshake(stream, machine)
            except ConnectFailed:
                pass
            raise
        if isinstance(event, Done):
            return event
        await _send_handshake(stream, machine)
        try:
            received = await stream.receive_some(RECEIVE_SIZE)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise _lost(machine, exc) from None
        machine.receive_data(received)


async def _send_handshake(stream: trio.abc.Stream,
                          machine: ClientHandshake | ServerHandshake) -> None:
    data = machine.data_to_send()
    try:
        if data:
            await stream.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
        raise _lost(machine, exc) from None


def _lost(machine: ClientHandshake | ServerHandshake, exc: BaseException) -> ConnectFailed:
    reason = _reason(exc)
    if isinstance(machine, ClientHandshake) and "WRONG_VERSION_NUMBER" in reason:
        return ConnectFailed(tls_refused(machine.address, reason))  # a plain port
    return ConnectFailed(f"connection lost: {reason}")


def _reason(exc: BaseException) -> str:
    """Why a stream broke; trio's TLS errors keep the reason in their cause (e.g.
    ``UNEXPECTED_EOF_WHILE_READING`` when the node refused our certificate)."""
    cause = exc.__cause__
    if not str(exc) and cause is not None:
        reason = getattr(cause, "reason", None)
        return f"TLS: {reason}" if reason else str(cause) or type(cause).__name__
    return str(exc) or type(exc).__name__


def _send_file_frames(out: int, fd: int, frames: list[tuple[bytes, int, int]]) -> None:
    """FrameConnection.send_file's worker thread. The socket is trio's, non-blocking: wait
    for room with poll."""
    poller = select.poll()
    poller.register(out, select.POLLOUT)

    def wait() -> None:
        if not poller.poll(SEND_FILE_STALL * 1000):
            raise TimeoutError(f"no room to send for {SEND_FILE_STALL:g} s")

    for header, offset, count in frames:
        view = memoryview(header)
        while view:
            try:
                view = view[os.write(out, view):]
            except BlockingIOError:
                wait()
        end = offset + count
        while offset < end:
            try:
                sent = os.sendfile(out, fd, offset, end - offset)
            except BlockingIOError:
                wait()
                continue
            if sent == 0:
                raise OSError(f"file ended {end - offset} bytes early")
            offset += sent
