"""The connection handshake, sans-IO: HELLO, version negotiation, then authentication.

One state machine per side, as h11 does for HTTP: ``ClientHandshake`` for whoever connects
(the client library, kvctl, a node dialling a peer) and ``ServerHandshake`` for the node
that accepts. The caller feeds received bytes with ``receive_data`` (``b""`` is EOF), sends
what ``data_to_send`` returns, and calls ``next_event`` until it returns ``Done``; until then
it returns NEED_DATA. The exchange (docs/protocol.md, section 2)::

    client -> node  HELLO    {versions, role: "client", token?}
    node -> client  HELLO_OK {version, node, max_frame, chunk_size}      or ERROR, closed

    peer  -> node  HELLO    {versions, role: "peer", node: A, nonce: Na}
    node  -> peer  HELLO_OK {version, node: B, max_frame: 16384, nonce: Nb,
                             proof: HMAC(K, "server" | Na | Nb | A | B)}
    peer  -> node  HELLO    {versions, role: "peer", node: A, proof: HMAC(K, "client" | ...)}
    node  -> peer  HELLO_OK {version, node: B, max_frame, chunk_size}    or ERROR, closed
    (from the second HELLO's end on, without TLS: authenticated records both ways)

Invariants:

- Rule 1: no I/O, no clock. Imports neither trio nor plyvel; the caller bounds the whole
  exchange with its ``handshake_timeout``.
- Rule 2: every frame of the handshake is limited to PRE_AUTH_MAX_FRAME (16 KiB), checked
  from the header before the body is buffered (kvd.proto.codec).
- Rule 3: the machine never consumes a byte past the handshake's last frame. The bytes
  that follow are ``trailing_data`` (frames, opened if sealed) and, on a sealed connection,
  what ``Done.opener`` holds; with ``Done.sealer`` the connection carries on: nothing is
  lost, nothing is read twice.
- Rule 4: versions. The client offers ``versions``; the server picks the one it speaks or
  refuses with ProtocolError; the client refuses a HELLO_OK naming a version it did not
  offer.
- Rule 5: peer authentication is mutual and replay-proof. Each side contributes a fresh
  random nonce (16..64 bytes, 32 sent) and proves the cluster secret with an HMAC-SHA256
  over BOTH nonces and both node names, under a label per direction, so a recorded proof
  is useless on any other connection and a proof can never be reflected back as the other
  side's. Proofs are compared in constant time.
- Rule 6: no downgrade. A side that has the secret refuses a peer that skips the proof (a
  HELLO without a nonce, a HELLO_OK without nonce and proof, a request instead of the
  second HELLO); a client without a secret refuses a challenge it cannot answer, with a
  line that says so.
- Rule 7: client tokens (and any other check of a HELLO: loopback-only, the cluster id)
  are the ``authorize`` callback's, called with the first HELLO before anything is
  answered; what it returns is ``Done.grant``, what it raises refuses the connection.
- Rule 8: after a peer handshake with a secret and without TLS, every byte both ways
  travels in authenticated records (kvd.proto.records) under ``session_keys``, starting
  with the final HELLO_OK. The ERROR refusing a wrong client proof goes plain, before the
  switch.
- Rule 9: a refusal raises a KvdError from ``next_event`` (Unauthorized, ProtocolError,
  FrameTooLarge, ConnectFailed for a hang-up) and the machine is dead: it queues nothing
  more, but what it queued before (a challenge answered in the same batch of bytes) is
  still to be sent, first. The server's shell then answers with an ERROR frame; the
  client's closes. Secrets never appear in a message.
- Rule 10: a client whose first bytes back are not kvd's (an HTTP server, a RESP port's
  error, an SSH banner) fails with ConnectFailed naming the port to use (``foreign_answer``), the
  same line from the trio client (this machine) and kvd.blocking_client.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kvd.errors import (
    ConnectFailed,
    KvdError,
    ProtocolError,
    Unauthorized,
    error_from_code,
)
from kvd.proto import codec
from kvd.proto.codec import NEED_DATA, FrameDecoder, Message, NeedData
from kvd.proto.messages import PRE_AUTH_MAX_FRAME, PROTOCOL_VERSION, MsgType
from kvd.proto.records import Opener, Sealer

__all__ = [
    "ClientHandshake",
    "Done",
    "foreign_answer",
    "NEED_DATA",
    "NONCE_SIZE",
    "ServerHandshake",
    "client_proof",
    "new_nonce",
    "server_proof",
    "session_keys",
    "valid_nonce",
    "verify_proof",
]

NONCE_SIZE = 32
MIN_NONCE, MAX_NONCE = 16, 64
VERSIONS = (PROTOCOL_VERSION,)  # what this release speaks, offered by every client


# --------------------------------------------------------------------------- proofs


def new_nonce() -> bytes:
    return os.urandom(NONCE_SIZE)


def valid_nonce(nonce: object) -> bool:
    return isinstance(nonce, bytes) and MIN_NONCE <= len(nonce) <= MAX_NONCE


def _proof(label: bytes, secret: bytes, client_nonce: bytes, server_nonce: bytes,
           client_node: str, server_node: str) -> bytes:
    mac = hmac.new(secret, b"kvd-peer-v1 " + label, hashlib.sha256)
    for part in (client_nonce, server_nonce, client_node.encode(), server_node.encode()):
        mac.update(len(part).to_bytes(4, "big"))  # length-prefixed: no ambiguous splits
        mac.update(part)
    return mac.digest()


def server_proof(secret: bytes, client_nonce: bytes, server_nonce: bytes,
                 client_node: str, server_node: str) -> bytes:
    """What the accepting node sends to prove the secret."""
    return _proof(b"server", secret, client_nonce, server_nonce, client_node, server_node)


def client_proof(secret: bytes, client_nonce: bytes, server_nonce: bytes,
                 client_node: str, server_node: str) -> bytes:
    """What the connecting node sends to prove the secret."""
    return _proof(b"client", secret, client_nonce, server_nonce, client_node, server_node)


def session_keys(secret: bytes, client_nonce: bytes, server_nonce: bytes,
                 client_node: str, server_node: str) -> tuple[bytes, bytes]:
    """(connecting -> accepting, accepting -> connecting) record keys of one connection
    (rule 8): fresh per connection because both nonces are, one per direction."""
    parts = (secret, client_nonce, server_nonce, client_node, server_node)
    return _proof(b"records client", *parts), _proof(b"records server", *parts)


def verify_proof(expected: bytes, got: object) -> bool:
    return isinstance(got, bytes) and hmac.compare_digest(expected, got)


# --------------------------------------------------------------------------- wrong ports

_USE_INSTEAD = {  # by the HELLO's role: the port that would have answered it
    "client": "kvctl talks to the client port (listen, default 7379)",
    "peer": "nodes talk to the peer port (peer_listen, default 7380)",
}


def closed_during_handshake(address: str, plain: bool) -> str:
    """What a client says when the node closed the connection before answering its HELLO:
    on a plain connection, most likely a port with TLS on (outside tester: no hint)."""
    message = f"{address} closed the connection during the handshake"
    if plain:
        message += ("; a node with TLS on closes plain connections so: connect with TLS "
                    "(kvctl --tls-ca FILE)")
    return message


def tls_refused(address: str, reason: str) -> str:
    """What a TLS client says when its TLS handshake failed; WRONG_VERSION_NUMBER is a port
    that answered in plain bytes."""
    if "WRONG_VERSION_NUMBER" in reason:
        return (f"cannot connect to {address}: it answered without TLS (TLS off on this "
                "port): connect without --tls-ca")
    return f"cannot connect to {address}: TLS: {reason}"


def foreign_answer(address: str, first: bytes, role: str = "client") -> str | None:
    """Rule 10: when ``first``, the first bytes ``address`` answered a HELLO with, are not
    kvd's, the one line saying so and naming the port to use; None when they may be."""
    use = _USE_INSTEAD.get(role, _USE_INSTEAD["client"])
    if first.startswith(b"HTTP/"):
        # A kvd metrics port says which client port to use in its answer's body.
        said = first.partition(b"\r\n\r\n")[2].decode("utf-8", "replace").strip()
        return f"{address} answers HTTP: " + (
            said if "client port" in said and role == "client"
            else f"that is a metrics port (metrics_listen); {use}")
    if codec.MAGIC.startswith(first[:len(codec.MAGIC)]):
        return None
    if first.startswith(b"-"):  # a RESP error: kvd's RESP port refuses a frame at once
        return f"{address} is a Redis-protocol port (resp_listen); {use}"
    return f"{address} does not speak kvd's protocol (it sent {first[:16]!r}); {use}"


# --------------------------------------------------------------------------- the machines


@dataclass
class Done:
    """The handshake succeeded. ``hello``: the other side's last HELLO (server) or final
    HELLO_OK (client), as fields. ``grant``: what the server's ``authorize`` returned.
    ``sealer``/``opener``: the record layer to continue with (None without one)."""

    version: int
    hello: dict[str, Any]
    grant: Any = None
    sealer: Sealer | None = None
    opener: Opener | None = None


@dataclass
class _Wire:
    """Bytes in and out of one side: frames, then records once sealed (rule 8)."""

    decoder: FrameDecoder = field(default_factory=lambda: FrameDecoder(PRE_AUTH_MAX_FRAME))
    outgoing: bytearray = field(default_factory=bytearray)
    sealer: Sealer | None = None
    opener: Opener | None = None
    eof: bool = False

    def receive_data(self, data: bytes | bytearray) -> None:
        if self.eof:
            if data:
                raise RuntimeError("receive_data called with data after EOF")
            return
        self.eof = not data
        if self.opener is None:
            self.decoder.receive_data(data)
        elif data:
            self.opener.receive_data(data)

    def next_message(self) -> Message | NeedData | None:
        """The next whole frame (Rule 2's limit), NEED_DATA, or None at a clean EOF."""
        while True:
            message = self.decoder.next_message()
            if message is not NEED_DATA or self.opener is None:
                return message
            payload = self.opener.next_payload()
            if payload is not None:
                self.decoder.receive_data(payload)
            elif self.eof:
                if self.opener.pending:
                    self.opener.fail("closed mid-record")
                self.decoder.receive_data(b"")
            else:
                return NEED_DATA

    def send(self, kind: MsgType, request_id: int, fields: dict[str, Any]) -> None:
        data = codec.encode(kind, request_id, fields)
        self.outgoing += self.sealer.seal(data) if self.sealer is not None else data

    def seal(self, send_key: bytes, receive_key: bytes) -> None:
        """Records from here on, both ways; bytes already received past the last frame
        are the first records'."""
        self.sealer, self.opener = Sealer(send_key), Opener(receive_key)
        self.opener.receive_data(self.decoder.detach())

    def done(self, version: int, hello: dict[str, Any], grant: Any = None) -> Done:
        return Done(version, hello, grant, self.sealer, self.opener)


class _Handshake:
    """What both sides share: the wire, the one-way state, the refusal rule (rule 9)."""

    def __init__(self) -> None:
        self._wire = _Wire()
        self._done: Done | None = None
        self._error: KvdError | None = None

    def receive_data(self, data: bytes | bytearray) -> None:
        """Add bytes read from the connection; ``b""`` means the other side closed it."""
        self._wire.receive_data(data)

    def data_to_send(self) -> bytes:
        """The bytes to write to the connection now, in order (call after ``next_event``)."""
        out = bytes(self._wire.outgoing)
        self._wire.outgoing.clear()
        return out

    @property
    def trailing_data(self) -> bytes:
        """Once done: the frame bytes received past the handshake (rule 3), taken away."""
        assert self._done is not None, "the handshake is not done"
        return self._wire.decoder.detach()

    def next_event(self) -> Done | NeedData:
        """``Done`` once the handshake succeeded, NEED_DATA until then; raises the refusal."""
        if self._error is not None:
            raise self._error
        if self._done is not None:
            return self._done
        try:
            while self._done is None:
                message = self._wire.next_message()
                if message is NEED_DATA:
                    return NEED_DATA
                self._step(message)
        except KvdError as exc:
            self._error = exc  # bytes queued before it (a challenge) still go out: rule 9
            raise
        return self._done

    def _step(self, message: Message | None) -> None:
        raise NotImplementedError


class ClientHandshake(_Handshake):
    """The connecting side. ``hello``: the fields of HELLO beyond ``versions`` (``role``,
    peers' ``node``); ``token``: the client token; ``secret``: the cluster secret (peers);
    ``seal``: switch to records after a peer handshake (False over TLS, which protects its
    own); ``address``: names the other side in refusals. The HELLO is queued at once."""

    def __init__(self, address: str, hello: dict[str, Any] | None = None, *,
                 token: str | None = None, secret: bytes | None = None, seal: bool = True,
                 versions: tuple[int, ...] = VERSIONS, nonce: bytes | None = None) -> None:
        super().__init__()
        self.address = address
        self.secret = secret
        self._seal = seal
        self._hello: dict[str, Any] = {"versions": list(versions), "role": "client",
                                       **(hello or {})}
        if token:
            self._hello["token"] = token
        self._nonce = None
        if secret is not None:
            self._nonce = self._hello["nonce"] = nonce or new_nonce()
        self._challenged = False
        self._answered = False  # any byte back yet (Rule 10 judges the first ones)
        self._wire.send(MsgType.HELLO, 0, self._hello)

    def receive_data(self, data: bytes | bytearray) -> None:
        if data and not self._answered and self._error is None:
            self._answered = True
            foreign = foreign_answer(self.address, bytes(data), self._hello["role"])
            if foreign is not None:
                self._error = ConnectFailed(foreign)  # raised by next_event (Rule 9)
        super().receive_data(data)

    def _step(self, message: Message | None) -> None:
        if message is None:
            raise ConnectFailed(closed_during_handshake(self.address, plain=self._seal))
        if message.type == MsgType.ERROR:
            raise error_from_code(message.fields["code"], message.fields["message"])
        if message.type != MsgType.HELLO_OK:
            raise ProtocolError(f"expected HELLO_OK, got {message.type.name}")
        reply = message.fields
        if reply["version"] not in self._hello["versions"]:
            raise ProtocolError(f"{self.address} chose protocol version {reply['version']}, "
                                f"which we did not offer (we speak {self._hello['versions']})")
        if self.secret is not None and not self._challenged:
            self._answer(reply)
            return
        if self.secret is None and "nonce" in reply:  # a challenge we cannot answer
            raise Unauthorized(f"peer {self.address} requires the cluster secret, and "
                               "this node has no cluster_secret_file")
        self._done = self._wire.done(reply["version"], reply)

    def _answer(self, challenge: dict[str, Any]) -> None:
        assert self.secret is not None and self._nonce is not None
        theirs = challenge.get("nonce") or b""  # empty: not a valid nonce, refused below
        me, them = self._hello.get("node", ""), challenge["node"]
        expected = server_proof(self.secret, self._nonce, theirs, me, them)
        if (not valid_nonce(theirs) or theirs == self._nonce
                or not verify_proof(expected, challenge.get("proof"))):
            raise Unauthorized(f"peer {self.address} did not prove the cluster secret (is its "
                               "cluster_secret_file the same as ours?)")
        answer: dict[str, Any] = {key: self._hello[key] for key in ("versions", "role", "node")
                                  if key in self._hello}
        answer["proof"] = client_proof(self.secret, self._nonce, theirs, me, them)
        self._wire.send(MsgType.HELLO, 0, answer)
        self._challenged = True
        if self._seal:  # the final HELLO_OK is the first record (rule 8)
            self._wire.seal(*session_keys(self.secret, self._nonce, theirs, me, them))


class ServerHandshake(_Handshake):
    """The accepting side of the ``role`` port ("client" or "peer"), for node ``node``.

    ``authorize(hello)`` judges the first HELLO (rule 7); ``secret``: peers must prove it;
    ``seal``: records after a peer handshake (False over TLS); ``max_frame`` and
    ``chunk_size`` go in the final HELLO_OK; ``ports`` (role -> address) lets a refusal on
    the wrong port name the right one."""

    def __init__(self, role: str, node: str, *, max_frame: int,
                 authorize: Callable[[Message], Any] | None = None,
                 secret: bytes | None = None, seal: bool = True,
                 chunk_size: int | None = None, nonce: bytes | None = None,
                 ports: dict[str, str] | None = None) -> None:
        super().__init__()
        self.role = role
        self.node = node
        self._ports = ports or {}
        self.secret = secret if role == "peer" else None
        self._seal = seal
        self._authorize = authorize
        self._welcome: dict[str, Any] = {"version": PROTOCOL_VERSION, "node": node,
                                         "max_frame": max_frame}
        if chunk_size is not None:
            self._welcome["chunk_size"] = chunk_size
        self._nonce = nonce
        self.hello: Message | None = None  # the first HELLO, once read (for refusal logs)
        self._grant: Any = None

    def _wrong_port(self, came: str) -> str:
        """The refusal of a HELLO on the wrong port, naming the port to use instead."""
        right = self._ports.get(came)
        if right is None:
            return f"this is the {self.role} port; a {came[:16]!r} connected to it"
        users = "clients and kvctl use" if came == "client" else "nodes use"
        setting = "listen" if came == "client" else "peer_listen"
        return (f"this is the {self.role} port of node {self.node}; {users} its {came} port "
                f"{right} ({setting})")

    def _step(self, message: Message | None) -> None:
        if self.hello is None:
            self._first(message)
        else:
            self._proved(message)

    def _first(self, hello: Message | None) -> None:
        if hello is None:
            raise ConnectFailed("closed before HELLO")
        if hello.type != MsgType.HELLO:
            raise ProtocolError(f"expected HELLO, got {hello.type.name}")
        self.hello = hello
        role = hello.fields["role"]
        if role != self.role:
            raise ProtocolError(self._wrong_port(role))
        if PROTOCOL_VERSION not in hello.fields["versions"]:
            raise ProtocolError(f"no common protocol version (server speaks {PROTOCOL_VERSION}, "
                                f"client offers {hello.fields['versions'][:8]})")
        self._grant = self._authorize(hello) if self._authorize is not None else None
        if self.secret is None:
            self._finish(hello)
            return
        if not valid_nonce(hello.fields.get("nonce")):
            raise Unauthorized("this node requires peer authentication: give every node the "
                               "same cluster_secret_file")
        self._nonce = self._nonce or new_nonce()
        who = hello.fields.get("node") or ""
        self._wire.send(MsgType.HELLO_OK, hello.request_id, {
            "version": PROTOCOL_VERSION,
            "node": self.node,
            "max_frame": PRE_AUTH_MAX_FRAME,  # a challenge: the pre-auth limit still holds
            "nonce": self._nonce,
            "proof": server_proof(self.secret, hello.fields["nonce"], self._nonce, who,
                                  self.node),
        })

    def _proved(self, answer: Message | None) -> None:
        assert self.hello is not None and self.secret is not None and self._nonce is not None
        if answer is None:
            # A kvd peer hangs up here exactly when our proof did not verify.
            raise Unauthorized("peer hung up after the challenge: it does not have this "
                               "node's cluster secret")
        if answer.type != MsgType.HELLO:
            raise Unauthorized(f"peer sent {answer.type.name} before proving the cluster secret")
        who = self.hello.fields.get("node") or ""
        if (answer.fields.get("node") or "") != who:
            raise Unauthorized("peer changed its node name during the handshake")
        theirs = self.hello.fields["nonce"]
        expected = client_proof(self.secret, theirs, self._nonce, who, self.node)
        if not verify_proof(expected, answer.fields.get("proof")):
            raise Unauthorized("peer authentication failed: wrong cluster secret, or a "
                               "replayed handshake")
        if self._seal:  # the final HELLO_OK is the first record (rule 8)
            to_us, to_them = session_keys(self.secret, theirs, self._nonce, who, self.node)
            self._wire.seal(to_them, to_us)
        self._finish(answer)

    def _finish(self, hello: Message) -> None:
        self._wire.send(MsgType.HELLO_OK, hello.request_id, self._welcome)
        self._done = self._wire.done(PROTOCOL_VERSION, hello.fields, self._grant)
