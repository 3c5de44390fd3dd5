"""A trio stream whose bytes travel as authenticated records (kvd.proto.records).

After a peer handshake on plain TCP (kvd.proto.handshake), the connection's stream is
wrapped in a ``SealedStream`` that continues with the handshake's own ``Sealer`` and
``Opener``: the record rules (tags checked before any byte is used, a sequence per
direction, lengths checked before buffering) are kvd.proto.records'; this module only moves
the bytes.
"""

from __future__ import annotations

import trio

from kvd.proto.records import Opener, Sealer

__all__ = ["SealedStream"]


class SealedStream(trio.abc.Stream):
    """A trio stream whose bytes travel as authenticated records.

    ``sealer`` and ``opener`` carry on where the handshake left them: their sequence
    numbers, and the record bytes the opener already holds."""

    def __init__(self, transport_stream: trio.abc.Stream, sealer: Sealer, opener: Opener):
        self.transport_stream = transport_stream
        self._sealer = sealer
        self._opener = opener
        self._plain = b""

    async def send_all(self, data) -> None:
        await self.transport_stream.send_all(self._sealer.seal(data))

    async def wait_send_all_might_not_block(self) -> None:
        await self.transport_stream.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        while not self._plain:
            payload = self._opener.next_payload()
            if payload is not None:
                self._plain = payload
                continue
            data = await self.transport_stream.receive_some()
            if not data:
                if self._opener.pending:
                    self._opener.fail("closed mid-record")
                return b""
            self._opener.receive_data(data)
        size = len(self._plain) if max_bytes is None else max_bytes
        out, self._plain = self._plain[:size], self._plain[size:]
        return out

    async def aclose(self) -> None:
        await self.transport_stream.aclose()
