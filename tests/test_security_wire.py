"""Issue 10, "Also": peer frames keep their integrity after the handshake on plain TCP;
client tokens together with TLS; a SIGHUP reload cannot widen permissions or weaken auth.

The record layer (kvd.proto.records) is tested directly; the attacks on real ``kvd`` daemons
(tests/procs.py): an on-path proxy that injects frames into an authenticated peer link,
TLS clients with and without tokens or certificates, and SIGHUP after the operator loosened
a secret file.
"""

from __future__ import annotations

import logging
import os
import signal
import time

import pytest
import trio

from kvd import security
from kvd.client import open_client
from kvd.errors import ConnectFailed, Unauthorized
from kvd.proto.records import MAX_RECORD, IntegrityError, Opener, Sealer
from kvd.proto import codec, handshake
from kvd.proto.messages import MsgType
from kvd.security import Security, load_tokens
from tests.procs import free_port
from tests.test_security import (
    SECRET,
    TOKENS,
    private_file,
    start,
    tls_files,
    tokens_toml,
)

KEY, OTHER = b"k" * 32, b"o" * 32


def open_all(opener: Opener, data: bytes) -> bytes:
    opener.receive_data(data)
    out = b""
    while (payload := opener.next_payload()) is not None:
        out += payload
    return out


# ----------------------------------------------------------------------------- records


def test_records_round_trip_whole_and_byte_at_a_time():
    data = os.urandom(3 * MAX_RECORD + 17)
    sealed = Sealer(KEY).seal(data) + Sealer(KEY).seal(b"")  # an empty send adds nothing
    assert open_all(Opener(KEY), sealed) == data
    opener, out = Opener(KEY), b""
    for i in range(0, len(sealed), 997):
        out += open_all(opener, sealed[i : i + 997])
    assert out == data and opener.pending == 0


@pytest.mark.parametrize("attack", ["flip", "inject", "replay", "reorder", "drop", "reflect",
                                    "other key", "huge length"])
def test_records_refuse_every_change_in_transit(attack):
    sealer = Sealer(KEY)
    first, second, third = (sealer.seal(b"frame %d" % i) for i in range(3))
    stream = {
        "flip": first + second[:6] + bytes([second[6] ^ 1]) + second[7:] + third,
        "inject": first + codec.encode(MsgType.PING, 9, {}) + second,
        "replay": first + second + second,
        "reorder": first + third + second,
        "drop": first + third,
        # Our own record sent back to us: the other direction's key.
        "reflect": first + Sealer(OTHER).seal(b"frame 1"),
        "other key": Sealer(OTHER).seal(b"frame 0"),
        "huge length": (MAX_RECORD + 1).to_bytes(4, "big"),
    }[attack]
    opener = Opener(KEY)
    with pytest.raises(IntegrityError, match="peer connection integrity") as info:
        open_all(opener, stream)
    assert "\n" not in str(info.value)
    with pytest.raises(IntegrityError):  # dead from then on
        opener.next_payload()


def test_session_keys_are_per_connection_and_per_direction():
    keys = handshake.session_keys(b"s" * 16, b"a" * 32, b"b" * 32, "n1", "n2")
    again = handshake.session_keys(b"s" * 16, b"a" * 32, b"c" * 32, "n1", "n2")
    assert len(set(keys + again)) == 4
    assert all(len(k) == 32 for k in keys)
    proofs = {handshake.client_proof(b"s" * 16, b"a" * 32, b"b" * 32, "n1", "n2"),
              handshake.server_proof(b"s" * 16, b"a" * 32, b"b" * 32, "n1", "n2")}
    assert not proofs & set(keys)  # a key never travels: it is no proof


def test_cost_per_record_is_measured():
    """Reported, not asserted on: the cost of tagging and checking one small frame."""
    frame = codec.encode(MsgType.REPLICA_GET, 1, {"op": "get", "key": b"k" * 40})
    sealer, opener, rounds = Sealer(KEY), Opener(KEY), 20000
    started = time.perf_counter()
    for _ in range(rounds):
        opener.receive_data(sealer.seal(frame))
        opener.next_payload()
    per = (time.perf_counter() - started) / rounds * 1e6
    print(f"\nseal + open of a {len(frame)}-byte frame: {per:.2f} us")


# ----------------------------------------------------------------------------- injection


class Proxy:
    """An on-path attacker between a peer and a node: forwards bytes both ways and can
    add its own bytes to either direction between two sends."""

    def __init__(self, upstream_port: int):
        self.upstream_port = upstream_port
        self.port = free_port()
        self.to_node: trio.SocketStream | None = None
        self.to_peer: trio.SocketStream | None = None
        self.node_closed = trio.Event()
        self.locks = {"node": trio.Lock(), "peer": trio.Lock()}

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def serve(self, task_status=trio.TASK_STATUS_IGNORED):
        listeners = await trio.open_tcp_listeners(self.port, host="127.0.0.1")
        task_status.started()
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, peer: trio.SocketStream):
        node = await trio.open_tcp_stream("127.0.0.1", self.upstream_port)
        self.to_node, self.to_peer, self.node_closed = node, peer, trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._pump, peer, node, "node", nursery.cancel_scope)
            nursery.start_soon(self._pump, node, peer, "peer", nursery.cancel_scope)
        await peer.aclose()
        await node.aclose()

    async def _pump(self, source, sink, direction: str, scope: trio.CancelScope):
        try:
            while data := await source.receive_some(65536):
                async with self.locks[direction]:
                    await sink.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        if direction == "peer":
            self.node_closed.set()  # the node hung up on the link
            scope.cancel()
        # The peer hung up (on the node's ERROR, say): keep reading the node, so that its
        # own hang-up is still seen however late a loaded machine lets it come.

    async def inject(self, direction: str, data: bytes) -> None:
        sink = self.to_node if direction == "node" else self.to_peer
        async with self.locks[direction]:
            await sink.send_all(data)


async def link_gone(pool, address: str) -> None:
    """Wait until the pool has dropped its connection to ``address``."""
    with trio.fail_after(5):
        while (client := pool._clients.get(address)) and not client.closed.is_set():
            await trio.sleep(0.01)


PLANT = codec.encode(MsgType.REPLICA_PUT, 77, {
    "op": "coordinate", "key": b"planted", "context": b"",
    "payload": {"deleted": False, "timestamp": 0.0, "value": b"evil"}})


@pytest.mark.slow
async def test_a_frame_injected_into_an_authenticated_peer_link_is_refused(tmp_path, procs,
                                                                             caplog):
    """A real node, our real peer code, and a proxy between them that adds a REPLICA_PUT
    (or a forged reply) to the stream after the handshake: the receiver must close the
    connection with a clear log line and apply nothing."""
    from kvd.net.peer import PeerPool

    secret = private_file(tmp_path / "secret", SECRET)
    n1 = start(tmp_path, procs, "n1", {"cluster_secret_file": str(secret)})
    proxy = Proxy(n1.peer_port)
    caplog.set_level(logging.WARNING, logger="kvd.peer")
    async with trio.open_nursery() as nursery:
        await nursery.start(proxy.serve)
        pool = PeerPool(nursery, {"node": "n2"}, security=Security(SECRET.encode()))
        await pool.call(proxy.address, MsgType.PING, {}, MsgType.PONG)  # handshake done

        # 1. Towards the node: a write the attacker made up.
        await proxy.inject("node", PLANT)
        with trio.move_on_after(15):  # generous: the claim is that it closes, not how fast
            await proxy.node_closed.wait()
        async with open_client(n1.address) as client:
            planted = await client.get(b"planted", r=1)
            assert not planted.found, f"the injected write was applied: {planted}"
            await client.ping()  # and the node serves on
        assert proxy.node_closed.is_set(), "the node kept the link after an injected frame"
        lines = [line for line in n1.log_text().splitlines() if "integrity" in line]
        assert len(lines) == 1 and "closing" in lines[0], n1.log_text()[-2000:]
        assert "Traceback" not in n1.log_text()

        # 2. Towards the peer: a forged reply. The pool reconnects, then drops the link.
        await link_gone(pool, proxy.address)
        await pool.call(proxy.address, MsgType.PING, {}, MsgType.PONG)
        await proxy.inject("peer", codec.encode(MsgType.ERROR, 1, {"code": "protocol",
                                                                   "message": "forged"}))
        with trio.fail_after(5):
            while not [r for r in caplog.records if "integrity" in r.getMessage()]:
                await trio.sleep(0.05)
        warning = [r.getMessage() for r in caplog.records if "integrity" in r.getMessage()]
        assert len(warning) == 1, warning
        assert warning[0].startswith(f"closed the connection to peer {proxy.address}")
        await link_gone(pool, proxy.address)
        await pool.call(proxy.address, MsgType.PING, {}, MsgType.PONG)  # a new link works
        nursery.cancel_scope.cancel()
    assert n1.proc.poll() is None


# ----------------------------------------------------------------------------- TLS + tokens


@pytest.mark.slow
async def test_tokens_and_client_certificates_over_tls(tmp_path, procs):
    """Tokens keep their roles inside TLS; the peer port asks for a certificate from the
    cluster's CA and still wants the secret; the client port wants a token, not a cert."""
    from tests.procs import kvctl

    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    secret = private_file(tmp_path / "secret", SECRET)
    tokens = private_file(tmp_path / "tokens", tokens_toml(TOKENS))
    files = tls_files(tmp_path, ca, "n1")
    n1 = start(tmp_path, procs, "n1", {**files, "cluster_secret_file": str(secret),
                                       "client_tokens_file": str(tokens),
                                       "handshake_timeout": 2.0})
    tls = security.client_context(files["tls_ca_file"])
    (write, _), (read, _) = TOKENS["app"], TOKENS["viewer"]

    async with open_client(n1.address, ssl_context=tls, token=write) as client:
        await client.put(b"k", b"v")
    async with open_client(n1.address, ssl_context=tls, token=read) as client:
        assert (await client.get(b"k")).siblings[0].value == b"v"
        with pytest.raises(Unauthorized, match="viewer has role read; PUT needs write"):
            await client.put(b"k", b"w")
    for token, reason in ((None, "requires a client token"), ("x" * 24, "not valid")):
        with pytest.raises(Unauthorized, match=reason):
            async with open_client(n1.address, ssl_context=tls, token=token) as client:
                await client.ping()
    token_file = private_file(tmp_path / "app.token", write)
    out = kvctl("--tls-ca", files["tls_ca_file"], "--token-file", str(token_file), "get", "k",
                host=n1.address)
    assert out.returncode == 0 and b"v" in out.stdout, out
    out = kvctl("--tls-ca", files["tls_ca_file"], "get", "k", host=n1.address)
    assert out.returncode == 4 and len(out.stderr.decode().strip().splitlines()) == 1, out

    peer = {"role": "peer", "node": "n9"}
    signed = tls_files(tmp_path / "n9", ca, "n9")
    with_cert = security.client_context(files["tls_ca_file"], signed["tls_cert_file"],
                                        signed["tls_key_file"])
    async with open_client(n1.peer_address, ssl_context=with_cert, secret=SECRET.encode(),
                           hello_fields=peer) as client:
        await client.call(MsgType.PING, {}, MsgType.PONG)  # CA cert + secret: a peer
    # A certificate from the cluster's CA is not enough without the secret...
    with pytest.raises(Unauthorized, match="did not prove the cluster secret"):
        async with open_client(n1.peer_address, ssl_context=with_cert, hello_fields=peer,
                               secret=b"not-the-cluster-secret-0000") as client:
            await client.call(MsgType.PING, {}, MsgType.PONG)
    # ... and the secret is not enough without a certificate: refused in the TLS handshake,
    # with a reason (a TLS alert, or a reset when the node's refusal overtakes it).
    with pytest.raises(ConnectFailed, match=r"connection lost: (TLS: |socket connection broken)"
                       ) as info:
        async with open_client(n1.peer_address, ssl_context=tls, secret=SECRET.encode(),
                               hello_fields=peer, connect_timeout=3) as client:
            await client.call(MsgType.PING, {}, MsgType.PONG)
    print("\nmissing peer certificate:", info.value)
    assert "Traceback" not in n1.log_text() and n1.proc.poll() is None


# ----------------------------------------------------------------------------- SIGHUP


def hup_and_wait(node, marker: str) -> str:
    """SIGHUP, then the log lines the reload wrote once one contains ``marker``."""
    before = len(node.log_text())
    node.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while marker not in node.log_text()[before:]:
        assert time.monotonic() < deadline, node.log_text()[before:]
        time.sleep(0.05)
    time.sleep(0.1)  # the rest of this reload's lines
    return node.log_text()[before:]


@pytest.mark.slow
def test_a_sighup_as_soon_as_the_node_listens_reloads_it(tmp_path, procs):
    """A reload asked for the moment the client port opens (before the reload task was
    listening for it) killed the node with SIGHUP's default action, 1 start in 6; once
    ignored instead, it was lost. It must neither kill the node nor be lost."""
    for attempt in range(10):
        node = start(tmp_path / str(attempt), procs, "n1", {})
        deadline = time.monotonic() + 30
        while "serving clients" not in node.log_text():  # this node's port, no other's
            assert time.monotonic() < deadline and node.proc.poll() is None, node.log_text()
            time.sleep(0.01)
        assert "reload" in hup_and_wait(node, "reload"), attempt
        assert node.proc.poll() is None, (attempt, node.proc.returncode, node.log_text())
        assert node.stop() == 0


@pytest.mark.slow
async def test_sighup_cannot_widen_file_permissions_or_weaken_auth(tmp_path, procs):
    secret = private_file(tmp_path / "secret", SECRET)
    tokens = private_file(tmp_path / "tokens", tokens_toml(TOKENS))
    node = start(tmp_path, procs, "n1", {"cluster_secret_file": str(secret),
                                         "client_tokens_file": str(tokens)})
    (write, _), (admin, _) = TOKENS["app"], TOKENS["ops"]

    async def refused_without_token() -> None:
        with pytest.raises(Unauthorized, match="requires a client token"):
            async with open_client(node.address) as client:
                await client.ping()

    # 1. A secret-bearing file the operator (or a package upgrade) made group-readable is
    #    refused on reload as it is at start: one line naming the file and the fix.
    for path, key in ((tokens, "client_tokens_file"), (secret, "cluster_secret_file")):
        path.chmod(0o640)
        log = hup_and_wait(node, "reload")
        assert (f"ERROR kvd.systemd: reload failed, nothing changed: {key} {path} is "
                f"accessible by group or others (mode 0640): run chmod 600 {path}") in log, log
        path.chmod(0o600)
        await refused_without_token()
        async with open_client(node.address, token=write) as client:
            await client.put(b"k", b"v")

    # 2. A config that drops the tokens and the secret does not drop them from a running
    #    node: named as needing a restart, and both stay enforced.
    del node.extra["cluster_secret_file"], node.extra["client_tokens_file"]
    node.write_config()
    log = hup_and_wait(node, "reload: not applied")  # the reload's last line
    assert ("reload: not applied, restart kvd to change: client_tokens_file, "
            "cluster_secret_file") in log, log
    await refused_without_token()
    with pytest.raises(Unauthorized, match="requires peer authentication"):
        async with open_client(node.peer_address, hello_fields={"role": "peer", "node": "x"}):
            pass

    # 3. The same tokens file re-read: a revoked token stops working without a restart.
    node.extra.update(cluster_secret_file=str(secret), client_tokens_file=str(tokens))
    node.write_config()
    private_file(tokens, tokens_toml({"ops": TOKENS["ops"]}))
    log = hup_and_wait(node, "reload")
    assert "client tokens re-read: 1 token" in log, log
    with pytest.raises(Unauthorized, match="not valid"):
        async with open_client(node.address, token=write) as client:
            await client.ping()
    async with open_client(node.address, token=admin) as client:
        await client.ping()
    text = node.log_text()
    assert "Traceback" not in text and SECRET not in text and write not in text
    assert node.proc.poll() is None


def test_a_reload_with_a_broken_tls_file_changes_nothing(tmp_path, caplog):
    """Re-reading TLS material on SIGHUP must not let an ssl error out of the reload task
    (it would take the daemon down): one line, nothing changed."""
    from types import SimpleNamespace

    from kvd import systemd
    from kvd.config import Config

    trustme = pytest.importorskip("trustme")
    files = tls_files(tmp_path, trustme.CA(), "n1")
    tokens = private_file(tmp_path / "tokens", tokens_toml(TOKENS))
    config = tmp_path / "kvd.toml"
    config.write_text("".join(f'{k} = "{v}"\n' for k, v in {
        **files, "data_dir": str(tmp_path / "data"),
        "client_tokens_file": str(tokens)}.items()))
    running = Security.from_config(Config(**files, client_tokens_file=str(tokens),
                                          data_dir=":memory:"))
    node = SimpleNamespace(config=Config(**files, client_tokens_file=str(tokens),
                                         data_dir=str(tmp_path / "data")),
                           coordinator=SimpleNamespace(read_repair=True), security=running)
    systemd.set_reload_source(str(config), {})
    try:
        (tmp_path / "ca.pem").write_text("not a certificate\n")
        with caplog.at_level(logging.INFO, logger="kvd.systemd"):
            assert systemd.reload(node, systemd.Notifier({})) == ({}, [])
        lines = [r.getMessage() for r in caplog.records]
        assert len(lines) == 1 and lines[0].startswith(
            f"reload failed, nothing changed: tls_ca_file {tmp_path / 'ca.pem'}: cannot load"), lines
        assert node.security is running and running.tokens == load_tokens(str(tokens))
    finally:
        systemd.set_reload_source(None, {})
        systemd._reload_source = None
