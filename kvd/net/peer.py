"""Connections to other nodes: one multiplexed connection per peer address.

A connection is opened on first use and kept; when it breaks, the next request opens a new
one. Requests never wait longer than ``connect_timeout`` for a connection, so a down node
costs a caller one bounded wait, and the coordinator avoids down nodes anyway (the failure
detector tells it which).

Every connection authenticates with the cluster secret and speaks TLS when ``security``
(set by ``serve``) says so; a peer that refuses us, or fails to prove the secret itself, is
logged once per address and reported to callers as Unauthorized.

Bytes a peer has not acknowledged within ``unacknowledged_limit`` seconds end the connection
(TCP_USER_TIMEOUT): the kernel drops them instead of delivering them after a partition
heals. A write its coordinator gave up on therefore reaches a replica within that limit or
never, which is what lets a tombstone be purged safely after ``tombstone_grace`` (kvd/config.py
requires the grace to exceed it). Without it, a replica PUT sent into a partition arrived
after the heal, when its key's tombstone was already purged, and brought the key back.
"""

from __future__ import annotations

import logging
import socket

import trio

from kvd.client import Client, Dial, open_client, tcp_dial
from kvd.errors import ConnectFailed, KvdError, ProtocolError, Unauthorized
from kvd.proto.messages import MsgType
from kvd.security import Security

log = logging.getLogger("kvd.peer")


class PeerPool:
    """Multiplexed connections to peers, keyed by peer address (HOST:PORT)."""

    def __init__(self, nursery: trio.Nursery, hello_fields: dict, connect_timeout: float = 2.0,
                 security: Security | None = None, dial: Dial | None = None,
                 unacknowledged_limit: float = 10.0):
        self._nursery = nursery
        self._dial = dial or tcp_dial  # the simulator gives its in-memory network's
        self.unacknowledged_limit = unacknowledged_limit
        self._hello = {"role": "peer", **hello_fields}
        self._connect_timeout = connect_timeout
        # Object bytes one request carries inline (kvd.node.remote; a Cluster sets half of
        # max_frame, which every node of a cluster is expected to share; the least is 64 KiB).
        self.frame_budget = 32 << 10
        # The cluster secret and peer TLS context; serve() sets it before any peer is called.
        self.security = security or Security()
        # address -> why its last handshake was refused (cleared once one succeeds).
        self._refused: dict[str, str] = {}
        self._clients: dict[str, Client] = {}
        self._connecting: dict[str, trio.Event] = {}

    async def _client(self, address: str) -> Client:
        client = self._clients.get(address)
        if client is not None and not client.closed.is_set():
            if not client._conn.broken:
                return client
            # A send cancelled mid-frame (a caller's timeout) broke it: replace it.
            client._fail(ConnectFailed(f"connection to peer {address} broken"))
            self._clients.pop(address, None)
        ready = self._connecting.get(address)
        if ready is None:
            ready = self._connecting[address] = trio.Event()
            self._nursery.start_soon(self._hold, address, ready)
        with trio.move_on_after(self._connect_timeout):
            await ready.wait()
        client = self._clients.get(address)
        if client is None or client.closed.is_set():
            refused = self._refused.get(address)
            if refused is not None:
                raise Unauthorized(refused)
            raise ConnectFailed(f"cannot reach peer {address}")
        return client

    async def _hold(self, address: str, ready: trio.Event) -> None:
        """Open a connection and keep it until it breaks."""
        client = None
        try:
            security = self.security
            async with open_client(address, connect_timeout=self._connect_timeout,
                                   hello_fields=self._hello, secret=security.secret,
                                   ssl_context=security.peer_client_tls,
                                   dial=self._dial_peer) as client:
                self._clients[address] = client
                self._refused.pop(address, None)
                self._connecting.pop(address, None)
                ready.set()
                await client.closed.wait()
                if isinstance(client._failure, ProtocolError):  # e.g. a record that failed
                    log.warning("closed the connection to peer %s: %s", address, client._failure)
        except Unauthorized as exc:
            # Once per address: a peer with another secret would otherwise log every round.
            if address not in self._refused and len(self._refused) < 1024:
                reason = str(exc) if address in str(exc) else f"peer {address}: {exc}"
                log.warning("%s (logged once per address)", reason)
                self._refused[address] = reason
        except KvdError as exc:
            log.debug("peer %s: %s", address, exc)
        finally:
            if client is not None and self._clients.get(address) is client:
                del self._clients[address]  # not a newer connection that replaced it
            if self._connecting.get(address) is ready:
                del self._connecting[address]
            ready.set()

    async def _dial_peer(self, address: str) -> trio.abc.Stream:
        stream = await self._dial(address)
        stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT,  # type: ignore[attr-defined]
                          max(1, round(self.unacknowledged_limit * 1000)))
        return stream

    async def call(self, address: str, kind: MsgType, fields: dict, expect: MsgType) -> dict:
        """One request/reply to the peer at ``address``."""
        client = await self._client(address)
        return await client.call(kind, fields, expect)

    def drop(self, address: str) -> None:
        """Forget a connection (the peer restarted or left)."""
        client = self._clients.pop(address, None)
        if client is not None:
            client._fail(ConnectFailed("dropped"))
