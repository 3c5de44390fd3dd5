"""The RESP front door in a 3-node simulated cluster (in-process, on the autojump clock):
SETs through different nodes at once become siblings and GET says CONFLICT; KV.GET and
KV.PUT, or a SET, resolve them; pipelined commands are answered in order; SCAN walks every
key once. Real redis clients are in tests/test_resp.py."""

from __future__ import annotations

import trio
import trio.testing

from kvd.proto import codec
from kvd.proto.messages import PROTOCOL_VERSION, MsgType

RESP_PORT = "7382"


class Conn:
    """A minimal RESP client over the simulator's network: send commands, read replies."""

    def __init__(self, stream):
        self.stream = stream
        self.buf = bytearray()

    async def send(self, *commands: list) -> None:
        data = b""
        for args in commands:
            args = [a if isinstance(a, bytes) else str(a).encode() for a in args]
            data += b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)
        await self.stream.send_all(data)

    async def call(self, *args):
        await self.send(list(args))
        return await self.reply()

    async def _more(self) -> None:
        data = await self.stream.receive_some(65536)
        if not data:
            raise ConnectionError("the node closed the connection")
        self.buf += data

    async def _line(self) -> bytes:
        while b"\r\n" not in self.buf:
            await self._more()
        line, _, rest = bytes(self.buf).partition(b"\r\n")
        self.buf = bytearray(rest)
        return line

    async def reply(self):
        line = await self._line()
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            return RuntimeError(rest.decode())
        if kind == b":":
            return int(rest)
        if kind == b"$":
            if int(rest) < 0:
                return None
            while len(self.buf) < int(rest) + 2:
                await self._more()
            value = bytes(self.buf[:int(rest)])
            del self.buf[:int(rest) + 2]
            return value
        if kind == b"*":
            return [await self.reply() for _ in range(int(rest))]
        raise AssertionError(f"unexpected reply {line!r}")


async def _cluster(sim) -> None:
    plain = sim.config_of

    def with_resp(sn, seeds):
        host = sn.address.rpartition(":")[0]
        return plain(sn, seeds).model_copy(update={"resp_listen": f"{host}:{RESP_PORT}"})

    sim.config_of = with_resp
    await sim.form(["n1", "n2", "n3"])


async def _connect(sim, name: str) -> Conn:
    host = sim.nodes[name].address.rpartition(":")[0]
    return Conn(await sim.net.connector(sim.client_address())(f"{host}:{RESP_PORT}"))


async def test_concurrent_sets_on_two_nodes_conflict_and_kv_put_resolves(sim, autojump_clock):
    await _cluster(sim)
    one, two, three = [await _connect(sim, name) for name in ("n1", "n2", "n3")]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(one.call, "SET", "k", "from n1")
        nursery.start_soon(two.call, "SET", "k", "from n2")
    got = await three.call("GET", "k")
    assert isinstance(got, RuntimeError) and str(got).startswith("CONFLICT")
    assert "2 siblings" in str(got)
    context, *values = await three.call("KV.GET", "k")
    assert sorted(values) == [b"from n1", b"from n2"]
    assert await one.call("KV.PUT", "k", "merged", context) == 1
    assert await two.call("GET", "k") == b"merged"
    # The same again, resolved by a SET that supersedes every sibling its node reads.
    async with trio.open_nursery() as nursery:
        nursery.start_soon(one.call, "SET", "j", "a")
        nursery.start_soon(three.call, "SET", "j", "b")
    assert await two.call("SET", "j", "x", "NX") is None  # it exists, as two siblings
    assert str(await two.call("SET", "j", "x", "GET")).startswith("CONFLICT")
    assert str(await two.call("STRLEN", "j")).startswith("CONFLICT")
    assert await two.call("SET", "j", "c") == "OK"
    assert await one.call("GET", "j") == b"c"
    assert await one.call("DEL", "j", "absent") == 1
    assert await three.call("GET", "j") is None
    assert not sim.crashes, sim.crashes


async def test_pipelines_are_answered_in_order_and_scan_lists_each_key_once(sim, autojump_clock):
    await _cluster(sim)
    conn = await _connect(sim, "n2")
    await conn.send(*[["SET", f"key:{i}", f"v{i}"] for i in range(300)],
                    *[["GET", f"key:{i}"] for i in range(300)], ["INCR", "x"])
    replies = [await conn.reply() for _ in range(601)]
    assert replies[:300] == ["OK"] * 300
    assert replies[300:600] == [b"v%d" % i for i in range(300)]
    assert str(replies[600]).startswith("ERR unknown command 'INCR'")
    other = await _connect(sim, "n2")  # a pool may send the next SCAN on another connection
    seen, cursor = [], b"0"
    while True:
        conn, other = other, conn
        cursor, keys = await conn.call("SCAN", cursor, "MATCH", "key:*", "COUNT", 40)
        seen += keys
        if cursor == b"0":
            break
    assert sorted(seen) == sorted(b"key:%d" % i for i in range(300))
    assert await conn.call("DBSIZE") == 300
    assert not sim.crashes, sim.crashes


async def test_an_idle_connection_is_closed_after_idle_timeout(sim, autojump_clock):
    await _cluster(sim)
    conn = await _connect(sim, "n1")
    assert await conn.call("PING") == "PONG"
    began = trio.current_time()
    assert await conn.stream.receive_some(100) == b""  # closed by the node, not by us
    idle = sim.nodes["n1"].node.config.idle_timeout
    assert idle <= trio.current_time() - began < idle + 1
    silent = await _connect(sim, "n1")  # never sends a byte: pending, handshake_timeout
    began = trio.current_time()
    assert await silent.stream.receive_some(100) == b""
    assert trio.current_time() - began < idle


async def test_the_idle_watchdog_closes_a_waiting_connection_never_a_running_command(
        autojump_clock):
    """Rule 2 of kvd.node.resp_service: silence is counted only while the session waits for
    the client's bytes; a command that runs past idle_timeout is not cut off."""
    from types import SimpleNamespace

    from kvd.clocks import REAL
    from kvd.node.resp_session import Session

    node = SimpleNamespace(config=SimpleNamespace(handshake_timeout=1.0, idle_timeout=5.0),
                           clocks=REAL)
    ticket = SimpleNamespace(pending=False)
    session = Session(node, trio.testing.memory_stream_pair()[0], ticket)
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(session.watch, scope)
            await trio.sleep(20)  # a command runs for four idle timeouts
            assert not scope.cancel_called
            session.waiting_since, session.reading = trio.current_time(), True
            began = trio.current_time()
            await trio.sleep_forever()
    assert scope.cancelled_caught
    assert trio.current_time() - began == 5.0  # idle_timeout after the wait began
    ticket.pending = True  # before AUTH: handshake_timeout
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:
            session.waiting_since, began = trio.current_time(), trio.current_time()
            nursery.start_soon(session.watch, scope)
            await trio.sleep_forever()
    assert trio.current_time() - began == 1.0


async def test_getdel_and_set_get_return_a_large_old_value_before_they_replace_it(sim, autojump_clock):
    """A value above chunk_size (64 KiB here) lives in a blob the delete or overwrite frees:
    GETDEL and SET ... GET used to write first, then stream the old value from a blob that
    was gone, and close the connection mid-reply: the value was lost. They now read it
    whole first; redis-server returns it too."""
    await _cluster(sim)
    one = await _connect(sim, "n1")
    big, other = bytes(range(256)) * 800, b"\x07" * 300_000  # 200 KiB, 293 KiB
    assert await one.call("SET", "g", big) == "OK"
    assert await one.call("GETDEL", "g") == big
    assert await one.call("EXISTS", "g") == 0
    assert await one.call("SET", "h", other) == "OK"
    assert await one.call("SET", "h", "small", "GET") == other
    assert await one.call("GET", "h") == b"small"
    assert await one.call("SET", "h", other) == "OK"
    assert await one.call("SET", "h", "again", "XX", "GET") == other
    assert await one.call("GET", "h") == b"again"
    assert not sim.crashes


async def test_set_nx_get_returns_the_value_it_did_not_replace(sim, autojump_clock):
    """As in Redis 7: NX with GET answers the existing value (and writes nothing), or nil
    when the key was absent (and writes it)."""
    await _cluster(sim)
    one = await _connect(sim, "n1")
    assert await one.call("SET", "k", "v1") == "OK"
    assert await one.call("SET", "k", "v2", "NX", "GET") == b"v1"
    assert await one.call("GET", "k") == b"v1"
    assert await one.call("SET", "new", "v", "NX", "GET") is None
    assert await one.call("GET", "new") == b"v"
    assert await one.call("SET", "absent", "v", "XX", "GET") is None
    assert await one.call("EXISTS", "absent") == 0


async def test_auth_as_the_default_user_without_tokens_is_accepted_as_by_redis(sim, autojump_clock):
    """redis://default:pw@host (redis-py's username=, HELLO 3 AUTH default pw): Redis's
    passwordless default user takes any password; with no tokens configured, so does kvd.
    Another user is refused; AUTH with the password alone says no password is set."""
    await _cluster(sim)
    one = await _connect(sim, "n1")
    assert await one.call("AUTH", "default", "anything") == "OK"
    hello = await one.call("HELLO", "2", "AUTH", "default", "pw")
    assert isinstance(hello, list) and b"server" in hello, hello
    assert str(await one.call("AUTH", "alice", "pw")).startswith("WRONGPASS")
    assert "without any password" in str(await one.call("AUTH", "pw"))
    assert await one.call("PING") == "PONG"


async def test_kv_put_refuses_a_context_that_is_not_base64url(sim, autojump_clock):
    """A lenient decoder dropped the stray characters of "!!!", leaving an empty context: a
    blind write that added a sibling. Anything but a KV.GET context is refused."""
    await _cluster(sim)
    one = await _connect(sim, "n1")
    assert await one.call("SET", "k", "v1") == "OK"
    for forged in ("!!!", " ", "...", "é", "a!b=="):
        refused = await one.call("KV.PUT", "k", "forged", forged)
        assert str(refused).startswith("ERR the context is not one KV.GET returned"), forged
    assert await one.call("GET", "k") == b"v1"
    context, value = await one.call("KV.GET", "k")
    assert await one.call("KV.PUT", "k", "v2", context) == 1
    assert await one.call("GET", "k") == b"v2"


async def test_client_names_with_spaces_are_refused_and_unknown_command_errors_are_short(
        sim, autojump_clock):
    """As in Redis: a client name is one word (CLIENT INFO and CLIENT LIST print it on one
    line), and the error for an unknown command quotes a bounded start of its arguments (a
    20,000-argument one made a 2.6 MB error line)."""
    await _cluster(sim)
    one = await _connect(sim, "n1")
    for name in ("a b", "a\nb"):
        refused = await one.call("CLIENT", "SETNAME", name)
        assert str(refused).startswith("ERR Client names cannot contain spaces"), refused
        refused = await one.call("HELLO", "2", "SETNAME", name)
        assert str(refused).startswith("ERR Client names cannot contain spaces"), refused
    assert await one.call("CLIENT", "SETNAME", "worker-1") == "OK"
    assert await one.call("CLIENT", "GETNAME") == b"worker-1"
    error = await one.call("FOO", *["x" * 200] * 20_000)
    assert str(error).startswith("ERR unknown command 'FOO'") and len(str(error)) < 300, len(str(error))
    assert await one.call("PING") == "PONG"


async def test_a_protocol_error_is_answered_before_the_connection_closes(sim, autojump_clock):
    """The error reply goes out after the command loop (and its writer task) has ended, on
    a stream that queues every reply (the simulator's, like TLS, has no inline send)."""
    await _cluster(sim)
    one = await _connect(sim, "n1")
    await one.stream.send_all(b"PING\r\n*1\r\n$-5\r\n")
    assert await one.reply() == "PONG"
    error = await one.reply()
    assert str(error).startswith("ERR Protocol error"), error


async def test_a_kvd_client_on_the_resp_port_is_told_which_port_it_wants(sim, autojump_clock):
    """kvctl given the RESP port sent its HELLO frame and heard nothing until the port
    closed: the frame has no newline, so it waited as an inline command. It is now
    answered at once, naming the client port, and closed; an inline KV.GET still works."""
    await _cluster(sim)
    one = await _connect(sim, "n1")
    await one.stream.send_all(codec.encode(MsgType.HELLO, 0, {"versions": [PROTOCOL_VERSION],
                                                              "role": "client"}))
    began = trio.current_time()
    with trio.fail_after(1):  # at once: not after handshake_timeout
        error = await one.reply()
    assert str(error) == ("ERR this is kvd's RESP port; kvd clients (kvctl) use the client "
                          "port (listen)"), error
    assert trio.current_time() - began < 1
    assert await one.stream.receive_some(100) == b""  # and closed
    two = await _connect(sim, "n1")
    await two.stream.send_all(b"KV.GET absent\r\n")
    assert await two.reply() is None  # nil: the key is absent


async def test_a_set_above_chunk_size_is_counted_in_the_command_metrics(sim, autojump_clock):
    """kvd_resp_command_duration_seconds counts every SET: one whose value streams (above
    chunk_size) went uncounted, so a dashboard of RESP commands missed large writes."""
    await _cluster(sim)
    one = await _connect(sim, "n1")
    counts = sim.nodes["n1"].node.resp_observer.resp_commands

    def sets(outcome: str) -> int:
        return dict((labels, cumulative[-1]) for labels, cumulative, _ in counts.series()
                    ).get(("set", outcome), 0)

    assert await one.call("SET", "small", "v") == "OK"
    assert await one.call("SET", "large", b"x" * 300_000) == "OK"
    assert sets("ok") == 2
    assert not sim.crashes
