"""Tests of the sans-IO handshake (kvd.proto.handshake), without sockets.

Like the codec's tests: every handshake is run with the bytes fed whole, one byte at a
time, and with the other side's first frame right behind the handshake's last bytes (which
must come out untouched, rule 3). Then every refusal an operator relies on: wrong version,
wrong secret, wrong token, an oversized frame before authentication, a replayed or
reflected challenge, and each way to skip the proof (downgrade). Last, a property: whatever
bytes a stranger sends, the server's machine gives an event or a KvdError, never a crash.
"""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvd.errors import ConnectFailed, FrameTooLarge, KvdError, ProtocolError, Unauthorized
from kvd.proto import codec
from kvd.proto.codec import NEED_DATA, FrameDecoder
from kvd.proto.handshake import (
    ClientHandshake,
    Done,
    ServerHandshake,
    client_proof,
    server_proof,
    session_keys,
)
from kvd.proto.messages import PRE_AUTH_MAX_FRAME, PROTOCOL_VERSION, MsgType
from kvd.proto.records import IntegrityError, Opener, Sealer
from kvd.security import Grant, Security, TokenTable

SECRET = b"cluster-secret-5f0c2b7e9a41d3c8"
TOKEN = "write-token-3e7a9b1c5d2f"
NC, NS = b"c" * 32, b"s" * 32  # fixed nonces, so the tests know the session keys
MAX_FRAME, CHUNK = 4 << 20, 1 << 20
PING = codec.encode(MsgType.PING, 7, {})
PONG = codec.encode(MsgType.PONG, 7, {})
TOKENS = Security(tokens=TokenTable({TOKEN: Grant("app", "write")}))


def peer_client(secret: bytes | None = SECRET, seal: bool = True, **kw) -> ClientHandshake:
    return ClientHandshake("n1:7380", {"role": "peer", "node": "n2"}, secret=secret,
                           seal=seal, nonce=NC, **kw)


def peer_server(secret: bytes | None = SECRET, seal: bool = True, **kw) -> ServerHandshake:
    return ServerHandshake("peer", "n1", max_frame=MAX_FRAME, chunk_size=CHUNK,
                           secret=secret, seal=seal, nonce=NS,
                           authorize=lambda hello: Security().authorize("peer", "", hello),
                           **kw)


def client_server(host: str = "127.0.0.1", security: Security = TOKENS) -> ServerHandshake:
    return ServerHandshake("client", "n1", max_frame=MAX_FRAME, chunk_size=CHUNK,
                           authorize=lambda hello: security.authorize("client", host, hello))


# name: (client, server, sealed, grant the server gives)
CASES = {
    "client, loopback without tokens": (
        lambda: ClientHandshake("n1:7379"),
        lambda: client_server(security=Security()), False, Grant("loopback client", "admin")),
    "client with a token": (
        lambda: ClientHandshake("n1:7379", token=TOKEN),
        lambda: client_server("10.1.2.3"), False, Grant("app", "write")),
    "peer without a secret": (
        lambda: peer_client(None), lambda: peer_server(None), False, Grant("peer n2", "peer")),
    "peer with a secret": (
        peer_client, peer_server, True, Grant("peer n2", "peer")),
    "peer with a secret over TLS": (
        lambda: peer_client(seal=False), lambda: peer_server(seal=False), False,
        Grant("peer n2", "peer")),
}
SPLITS = ("whole", "one byte at a time", "with trailing bytes")


def deliver(machine, data: bytes, split: str) -> None:
    """Feed ``data`` as ``split`` says, asking for the next event after each piece as a
    shell does, and no more once the machine is done (the connection takes over)."""
    pieces = [data[i : i + 1] for i in range(len(data))] if split == SPLITS[1] else [data]
    for piece in pieces:
        machine.receive_data(piece)
        machine.next_event()  # once done, it only says so again and reads nothing more


def converse(client: ClientHandshake, server: ServerHandshake, split: str, sealed: bool):
    """Run both machines against each other; with trailing bytes, each side's first
    post-handshake frame rides right behind its last handshake bytes."""
    keys = session_keys(SECRET, NC, NS, "n2", "n1")
    last_flight = 1 if client.secret is None else 2  # HELLO, or HELLO then the answer
    for flight in range(1, 5):
        if client.next_event() is NEED_DATA:
            out = client.data_to_send()
            if split == SPLITS[2] and flight == last_flight:
                out += Sealer(keys[0]).seal(PING) if sealed else PING
            deliver(server, out, split)
        done = server.next_event()
        out = server.data_to_send()
        if isinstance(done, Done) and split == SPLITS[2]:
            out += done.sealer.seal(PONG) if done.sealer else PONG
        deliver(client, out, split)
        if isinstance(client.next_event(), Done) and isinstance(server.next_event(), Done):
            return client.next_event(), server.next_event()
    raise AssertionError("the handshake did not finish in 4 exchanges")


def frames_after(machine, done: Done) -> list[codec.Message]:
    """What the connection reads after the handshake: trailing frames, then records."""
    decoder = FrameDecoder(MAX_FRAME)
    trailing = machine.trailing_data
    if trailing:  # b"" would be EOF
        decoder.receive_data(trailing)
    messages = []
    while True:
        message = decoder.next_message()
        if message is NEED_DATA and done.opener is not None:
            payload = done.opener.next_payload()
            if payload is not None:
                decoder.receive_data(payload)
                continue
        if message is NEED_DATA:
            return messages
        messages.append(message)


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("case", CASES)
def test_handshake(case: str, split: str) -> None:
    make_client, make_server, sealed, grant = CASES[case]
    client, server = make_client(), make_server()
    client_done, server_done = converse(client, server, split, sealed)

    assert client_done.version == server_done.version == PROTOCOL_VERSION
    assert client_done.hello == {"version": PROTOCOL_VERSION, "node": "n1",
                                 "max_frame": MAX_FRAME, "chunk_size": CHUNK}
    assert server_done.grant == grant
    assert (client_done.sealer is not None) == (server_done.sealer is not None) == sealed
    trailing = split == SPLITS[2]
    assert [m.type for m in frames_after(server, server_done)] == [MsgType.PING] * trailing
    assert [m.type for m in frames_after(client, client_done)] == [MsgType.PONG] * trailing
    if sealed and not trailing:  # the records carry on where the handshake left them
        server_done.opener.receive_data(client_done.sealer.seal(PING))
        assert server_done.opener.next_payload() == PING
        client_done.opener.receive_data(server_done.sealer.seal(PONG))
        assert client_done.opener.next_payload() == PONG


def test_the_peer_exchange_is_the_documented_one() -> None:
    """docs/protocol.md section 2, field by field: HELLO{nonce}, HELLO_OK{nonce, proof},
    HELLO{proof}, then the final HELLO_OK as the first record."""
    client, server = peer_client(), peer_server()
    client.next_event()
    hello = _messages(client.data_to_send())
    assert [m.fields for m in hello] == [{"versions": [PROTOCOL_VERSION], "role": "peer",
                                          "node": "n2", "nonce": NC}]
    server.receive_data(codec.encode(MsgType.HELLO, 0, hello[0].fields))
    assert server.next_event() is NEED_DATA
    (challenge,) = _messages(server.data_to_send())
    assert challenge.fields == {"version": PROTOCOL_VERSION, "node": "n1",
                                "max_frame": PRE_AUTH_MAX_FRAME, "nonce": NS,
                                "proof": server_proof(SECRET, NC, NS, "n2", "n1")}
    client.receive_data(codec.encode(MsgType.HELLO_OK, 0, challenge.fields))
    assert client.next_event() is NEED_DATA
    (answer,) = _messages(client.data_to_send())
    assert answer.fields == {"versions": [PROTOCOL_VERSION], "role": "peer", "node": "n2",
                             "proof": client_proof(SECRET, NC, NS, "n2", "n1")}
    server.receive_data(codec.encode(MsgType.HELLO, 0, answer.fields))
    assert isinstance(server.next_event(), Done)
    to_server, to_client = session_keys(SECRET, NC, NS, "n2", "n1")
    opener = Opener(to_client)
    opener.receive_data(server.data_to_send())
    final = _messages(opener.next_payload())
    assert final[0].type == MsgType.HELLO_OK and final[0].fields["max_frame"] == MAX_FRAME


def _messages(data: bytes) -> list[codec.Message]:
    decoder = FrameDecoder(MAX_FRAME)
    decoder.receive_data(data)
    out = []
    while (message := decoder.next_message()) is not NEED_DATA:
        out.append(message)
    return out


# --------------------------------------------------------------------------- refusals


def refusal(machine, *frames: bytes) -> Exception:
    """Feed ``frames`` (after the machine's own first flight) until it refuses; the error.
    Nothing may be queued after the refusal: the server's shell sends only its ERROR."""
    machine.next_event()
    machine.data_to_send()
    with pytest.raises((ProtocolError, Unauthorized, ConnectFailed)) as info:
        for frame in frames:
            machine.receive_data(frame)
            machine.next_event()
            machine.data_to_send()
    assert machine.data_to_send() == b""
    with pytest.raises(type(info.value)):  # and it stays refused
        machine.next_event()
    return info.value


def hello(**fields) -> bytes:
    return codec.encode(MsgType.HELLO, 1, {"versions": [PROTOCOL_VERSION], **fields})


def welcome(**fields) -> bytes:
    return codec.encode(MsgType.HELLO_OK, 0, {"version": PROTOCOL_VERSION, "node": "n1",
                                              "max_frame": PRE_AUTH_MAX_FRAME, **fields})


def test_no_common_version_is_refused_both_ways() -> None:
    error = refusal(client_server(), codec.encode(MsgType.HELLO, 1, {"versions": [2, 3],
                                                                     "role": "client"}))
    assert type(error) is ProtocolError and "no common protocol version" in str(error)
    error = refusal(ClientHandshake("n1:7379"), welcome(version=2))
    assert "chose protocol version 2, which we did not offer" in str(error)


def test_a_client_on_the_peer_port_is_refused() -> None:
    error = refusal(peer_server(), hello(role="client"))
    assert str(error) == "this is the peer port; a 'client' connected to it"


def test_wrong_or_missing_token_is_refused_before_anything_is_answered() -> None:
    for fields, reason in (({"token": "x" * 24}, "the client token is not valid"),
                           ({}, "requires a client token")):
        error = refusal(client_server("10.1.2.3"), hello(role="client", **fields))
        assert isinstance(error, Unauthorized) and reason in str(error)
        assert "x" * 24 not in str(error)
    error = refusal(client_server("10.1.2.3", Security()), hello(role="client"))
    assert "non-loopback addresses need a token" in str(error)


def test_a_server_error_reaches_the_client_as_its_error() -> None:
    error = refusal(ClientHandshake("n1:7379"), codec.encode(
        MsgType.ERROR, 0, {"code": "unauthorized", "message": "the client token is not valid"}))
    assert isinstance(error, Unauthorized) and str(error) == "the client token is not valid"


def test_wrong_secret_is_refused_by_either_side() -> None:
    wrong = b"another-secret-9d8e7f6a5b4c3d2e"
    # The server holds another secret: its proof does not verify, the client hangs up.
    server = peer_server(wrong)
    server.receive_data(hello(role="peer", node="n2", nonce=NC))
    server.next_event()
    error = refusal(peer_client(), server.data_to_send())
    assert "did not prove the cluster secret" in str(error)
    # ... and the server reads that hang-up as a refusal with the reason.
    server.receive_data(b"")
    with pytest.raises(Unauthorized, match="hung up after the challenge"):
        server.next_event()
    # The client holds another secret: its answer does not verify.
    proof = client_proof(wrong, NC, NS, "n2", "n1")
    error = refusal(peer_server(), hello(role="peer", node="n2", nonce=NC),
                    hello(role="peer", node="n2", proof=proof))
    assert "wrong cluster secret" in str(error)
    assert wrong.decode() not in str(error) and SECRET.decode() not in str(error)


def test_oversized_frame_before_authentication_is_refused_from_its_header() -> None:
    big = codec.encode(MsgType.HELLO, 1, {"versions": [1], "role": "client",
                                          "token": "t" * PRE_AUTH_MAX_FRAME})
    for machine in (client_server(), peer_server(), ClientHandshake("n1:7379")):
        error = refusal(machine, big[:codec.HEADER_SIZE])  # the header alone is enough
        assert isinstance(error, FrameTooLarge)
    # Still 16 KiB while a peer proves the secret: the challenge does not raise the limit.
    error = refusal(peer_server(), hello(role="peer", node="n2", nonce=NC),
                    big[:codec.HEADER_SIZE])
    assert isinstance(error, FrameTooLarge)


def test_replayed_challenge_and_replayed_answer_are_refused() -> None:
    # A challenge recorded on another connection (the server's nonce and proof for the
    # client nonce of then) does not verify against this connection's fresh client nonce.
    recorded = welcome(nonce=NS, proof=server_proof(SECRET, b"old" * 8, NS, "n2", "n1"))
    error = refusal(peer_client(), recorded)
    assert "did not prove the cluster secret" in str(error)
    # An answer recorded on another connection (for another server nonce) is refused.
    old_answer = client_proof(SECRET, NC, b"old" * 8, "n2", "n1")
    error = refusal(peer_server(), hello(role="peer", node="n2", nonce=NC),
                    hello(role="peer", node="n2", proof=old_answer))
    assert "replayed handshake" in str(error)


def test_reflected_challenge_and_reflected_proof_are_refused() -> None:
    # Our own nonce sent back as the server's: refused whatever proof comes with it.
    error = refusal(peer_client(), welcome(nonce=NC,
                                           proof=server_proof(SECRET, NC, NC, "n2", "n1")))
    assert "did not prove the cluster secret" in str(error)
    # The server's own proof sent back as the client's answer: the labels differ.
    server = peer_server()
    server.receive_data(hello(role="peer", node="n2", nonce=NC))
    server.next_event()
    (challenge,) = _messages(server.data_to_send())
    server.receive_data(hello(role="peer", node="n2", proof=challenge.fields["proof"]))
    with pytest.raises(Unauthorized, match="wrong cluster secret"):
        server.next_event()


def test_downgrades_are_refused() -> None:
    # A peer that offers no nonce to a node with a secret.
    error = refusal(peer_server(), hello(role="peer", node="n2"))
    assert "requires peer authentication" in str(error)
    # A request instead of the answer to the challenge.
    error = refusal(peer_server(), hello(role="peer", node="n2", nonce=NC),
                    codec.encode(MsgType.GOSSIP, 2, {"node": "n2"}))
    assert str(error) == "peer sent GOSSIP before proving the cluster secret"
    # A new name in the answer.
    error = refusal(peer_server(), hello(role="peer", node="n2", nonce=NC),
                    hello(role="peer", node="n3",
                          proof=client_proof(SECRET, NC, NS, "n3", "n1")))
    assert "changed its node name" in str(error)
    # A server (or someone in the middle) that answers a secret-holding peer as a node
    # without a secret: no nonce, no proof.
    error = refusal(peer_client(), welcome(max_frame=MAX_FRAME))
    assert "did not prove the cluster secret" in str(error)
    # A node without the secret meeting a challenge says why it cannot go on.
    error = refusal(peer_client(None), welcome(nonce=NS, proof=b"p" * 32))
    assert "requires the cluster secret, and this node has no cluster_secret_file" in str(error)


def test_a_forged_final_welcome_is_refused_as_a_failed_record() -> None:
    # After the answer the client reads records only: a plain HELLO_OK (an attacker's)
    # fails its integrity check, so the connection never starts on unauthenticated bytes.
    client = peer_client()
    client.next_event()
    client.data_to_send()
    client.receive_data(welcome(nonce=NS, proof=server_proof(SECRET, NC, NS, "n2", "n1")))
    client.next_event()
    client.data_to_send()
    client.receive_data(welcome(max_frame=MAX_FRAME))
    with pytest.raises(IntegrityError):
        client.next_event()


def test_hang_ups_are_told_apart() -> None:
    assert str(refusal(client_server(), b"")) == "closed before HELLO"
    error = refusal(ClientHandshake("n1:7379"), b"")
    assert str(error).startswith("n1:7379 closed the connection during the handshake; a "
                                 "node with TLS on")  # plain: it may be a TLS port
    error = refusal(ClientHandshake("n1:7379", seal=False), b"")  # over TLS: no such hint
    assert str(error) == "n1:7379 closed the connection during the handshake"
    error = refusal(client_server(), hello(role="client")[:20], b"")
    assert "closed mid-frame" in str(error)


def raw_hello(fields: dict, role: str) -> bytes:
    """A HELLO frame with any fields at all: what no encoder of ours would send."""
    body = msgpack.packb({"versions": [PROTOCOL_VERSION], "role": role, **fields},
                         use_bin_type=True)
    return codec.HEADER.pack(codec.MAGIC, PROTOCOL_VERSION, MsgType.HELLO, 0, 1, len(body)) + body


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(
    st.binary(max_size=64),
    st.builds(raw_hello, st.dictionaries(
        st.sampled_from(["node", "nonce", "proof", "token", "versions", "cluster"]),
        st.one_of(st.text(max_size=8), st.binary(max_size=40), st.integers(-2**63, 2**64 - 1),
                  st.lists(st.integers(0, 3), max_size=3)), max_size=4),
        st.sampled_from(["client", "peer"])),
), max_size=4), st.sampled_from(["client", "peer"]))
def test_any_bytes_end_in_done_need_data_or_a_kvd_error(pieces: list[bytes], role: str) -> None:
    """Whatever a stranger sends, the server's machine answers with an event or a KvdError
    (an ERROR frame and a closed connection), never another exception (a crash)."""
    server = peer_server() if role == "peer" else client_server("10.1.2.3")
    try:
        for piece in pieces:
            server.receive_data(piece)
            server.next_event()
            server.data_to_send()
    except KvdError:
        pass
