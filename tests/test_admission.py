"""Connection budgets (issue 10, holes 1 and 3): idle or unfinished connections cannot lock
anyone out of any port, and no descriptor shortage takes a node down.

The attacks run against real kvd processes over real TCP (descriptors, accept backlogs and
EMFILE exist only there); the admission rules themselves are tested as a pure table.
"""

from __future__ import annotations

import os
import socket
import time
from collections import defaultdict
from functools import partial
from pathlib import Path

import pytest
import trio
import trio.testing

from kvd.errors import KvdError
from kvd.metrics import READ_TIMEOUT
from kvd.net.admission import Admission, descriptor_budget, serve_admitted
from kvd.proto import codec
from kvd.proto.codec import FrameDecoder
from kvd.proto.messages import MsgType
from kvd.server import tcp_listen
from tests.flood import Flood, flood_process, probe_client, probe_peer, probe_resp
from tests.procs import KvdProcess, free_port, rss_kib
from tests.test_security import SECRET, TOKENS, private_file, read_message, start, tokens_toml

CLIENT_HELLO = codec.encode(MsgType.HELLO, 1, {"versions": [1], "role": "client"})
PEER_HELLO = codec.encode(MsgType.HELLO, 1, {"versions": [1], "role": "peer", "node": "n9"})
PING = codec.encode(MsgType.PING, 2, {})


def http_get(port: int, path: str, timeout: float = 10) -> tuple[str, float]:
    """(status line, seconds) of one GET on the metrics port."""
    began = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.settimeout(timeout)
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        data = b""
        while b"\r\n" not in data:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
    return data.split(b"\r\n", 1)[0].decode(), time.monotonic() - began


def new_client(port: int, hello: bytes = CLIENT_HELLO, ping: bool = True) -> float:
    """Seconds for a new connection to be accepted, complete its HELLO and answer a PING."""
    began = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.settimeout(10)
        decoder = FrameDecoder(1 << 20)
        sock.sendall(hello)
        reply = read_message(sock, decoder)
        assert reply is not None and reply.type == MsgType.HELLO_OK, reply
        if ping:
            sock.sendall(PING)
            reply = read_message(sock, decoder)
            assert reply is not None and reply.type == MsgType.PONG, reply
    return time.monotonic() - began


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def listen_overflows() -> int:
    """The kernel's count of connections dropped because an accept queue was full (all
    listeners of the machine: informational)."""
    lines = Path("/proc/net/netstat").read_text().splitlines()
    for names, values in zip(lines[::2], lines[1::2]):
        if names.startswith("TcpExt:"):
            return int(dict(zip(names.split(), values.split()))["ListenOverflows"])
    return 0


# ----------------------------------------------------------------------------- the rules


def test_a_newcomer_evicts_the_oldest_pending_connection_of_its_address_then_of_all():
    port = Admission("client", limit=10, pending=4, pending_per_host=2)
    a1, _ = port.admit("10.0.0.1")
    a2, _ = port.admit("10.0.0.1")
    a3, evicted = port.admit("10.0.0.1")  # its address is full: its own oldest goes
    assert evicted == [a1] and a3 is not None
    b1, evicted = port.admit("10.0.0.2")
    b2, evicted = port.admit("10.0.0.3")
    assert evicted == []
    c1, evicted = port.admit("10.0.0.4")  # all pending full: the oldest of all goes
    assert evicted == [a2]
    assert port.statistics()["pending"] == 4 and port.open == 4
    port.release(a2)  # an evicted ticket's own release later changes nothing
    assert port.open == 4


def test_pending_budgets_evict_silent_connections_only_a_full_port_evicts_the_others():
    """A flood of idle sockets from a client's own address (or beside it) evicts idle
    sockets, never a client in the middle of its handshake; a burst of real clients (50
    redis-benchmark connections from one host) does not evict its own members either."""
    port = Admission("client", limit=6, pending=3, pending_per_host=2)
    client, _ = port.admit("10.0.0.1")
    client.spoke()  # its HELLO arrived; the handshake is under way
    idle, _ = port.admit("10.0.0.1")
    newer, evicted = port.admit("10.0.0.1")
    assert evicted == [idle]  # its address is full: the silent one goes, not the oldest
    port.admit("10.0.0.2")
    third, evicted = port.admit("10.0.0.3")  # all pending full: the oldest silent one goes
    assert evicted == [newer] and client.pending and client.admission is port
    for ticket in port.admit("10.0.0.1")[0], third:
        ticket.spoke()
    for _ in range(3):  # speaking ones over the pending budgets, within the port
        ticket, evicted = port.admit("10.0.0.1")
        ticket.spoke()
        assert evicted == []
    assert port.open == 6
    _, evicted = port.admit("10.0.0.5")  # the port is full: now the oldest pending goes
    assert evicted == [client]


def test_established_connections_are_never_evicted_and_fill_the_port_before_refusal():
    port = Admission("client", limit=3, pending=3, pending_per_host=3)
    tickets = [port.admit("10.0.0.1")[0] for _ in range(3)]
    tickets[0].established()
    tickets[1].established()
    newcomer, evicted = port.admit("10.0.0.2")  # full: the pending one makes room
    assert evicted == [tickets[2]] and newcomer is not None
    newcomer.established()
    assert port.admit("10.0.0.3") == (None, [])  # only established ones: refused
    assert port.refused == 1
    port.release(tickets[0])
    assert port.admit("10.0.0.3")[0] is not None


def test_members_keep_reserved_slots_on_the_peer_port():
    members = {"10.0.0.9"}
    port = Admission("peer", limit=6, pending=4, pending_per_host=4, reserved=2,
                     is_member=members.__contains__)
    strangers = [port.admit(f"192.0.2.{i}")[0] for i in range(4)]
    for ticket in strangers:
        ticket.established()
    assert port.admit("192.0.2.99") == (None, [])  # limit - reserved reached for strangers
    m1, evicted = port.admit("10.0.0.9")
    m2, _ = port.admit("10.0.0.9")
    assert m1 and m2 and evicted == []
    flood = [port.admit(f"198.51.100.{i}") for i in range(50)]  # pending strangers: refused
    assert all(ticket is None for ticket, _ in flood) and m1.pending and m2.pending


async def test_refusals_being_answered_are_bounded_and_accept_errors_never_end_the_loop():
    import trio

    from kvd.net import admission as adm

    port = Admission("client", limit=1, pending=1, pending_per_host=1)
    told = []

    async def handler(stream, ticket):
        if ticket is None:
            told.append(stream)
            await trio.sleep_forever()  # a refused client that never reads its ERROR
        ticket.established()
        await trio.sleep_forever()

    class FlakyListener(trio.abc.Listener):
        """Fails accept with EMFILE twice, then hands out one side of socket pairs."""

        def __init__(self):
            self.calls = 0

        async def accept(self):
            if self.calls == 2 + 1 + 50:
                await trio.sleep_forever()
            self.calls += 1
            if self.calls <= 2:
                raise OSError(24, "Too many open files")
            await trio.sleep(0.005)  # the handlers of earlier ones run first
            ours, theirs = trio.socket.socketpair()
            keep.append(theirs)
            await theirs.send(b"x")  # the first bytes: the handler may start
            return trio.SocketStream(ours)

        async def aclose(self):
            pass

    keep = []
    async with trio.open_nursery() as nursery:
        listener = FlakyListener()
        await nursery.start(adm.serve_admitted, handler, [listener], port)
        # Until the listener has handed out its last connection and every one was admitted
        # or refused: the back-offs (0.3 s) and 51 accepts took most of a fixed 1 s window on
        # an idle machine, so a loaded one ran out of it. A loop the back-off ended never
        # gets there (fail_after); then every handler started has run to its first wait.
        with trio.fail_after(30):
            while listener.calls < 2 + 1 + 50 or port.refused < 50:
                await trio.sleep(0.01)
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    assert listener.calls == 2 + 1 + 50  # the back-off did not end the loop
    assert port.refused == 50 and len(told) == adm.MAX_REFUSING
    for sock in keep:
        sock.close()


class AdmissionWork(trio.abc.Instrument):
    """Counts the tasks kvd.net.admission spawns and the steps they run: the event loop's
    cost of accepted connections, without timing anything."""

    def __init__(self):
        self.spawned = self.steps = 0

    def task_spawned(self, task):
        self.spawned += task.name.startswith("kvd.net.admission")

    def before_task_step(self, task):
        self.steps += task.name.startswith("kvd.net.admission")


def hold_connections(port: int, count: int, first: bytes = b"") -> list[socket.socket]:
    """``count`` connections to ``port`` (blocking, from a worker thread), each having sent
    ``first``."""
    socks = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        if first:
            sock.sendall(first)
        socks.append(sock)
    return socks


async def serve_in_process(nursery, port: Admission, handler):
    listeners = await tcp_listen("listen", "127.0.0.1:0", port.silence)
    await nursery.start(serve_admitted, handler, listeners, port)
    return listeners[0].socket


def first_bytes_recorder():
    """(served, handler): a connection handler that records each connection's first bytes,
    establishes it and keeps it open."""
    served: list[bytes] = []

    async def handler(stream, ticket):
        served.append(await stream.receive_some(100))
        ticket.established()
        await trio.sleep_forever()

    return served, handler


async def test_idle_sockets_within_the_backlog_never_reach_the_node():
    """TCP_DEFER_ACCEPT: the kernel hands over a connection only once it has sent bytes, so
    idle sockets cost the node no descriptor and no work (as nginx's `deferred`)."""
    port = Admission("client", limit=64, pending=16, pending_per_host=8, silence=30)
    served, handler = first_bytes_recorder()
    async with trio.open_nursery() as nursery:
        listening = await serve_in_process(nursery, port, handler)
        number = listening.getsockname()[1]
        idle = await trio.to_thread.run_sync(hold_connections, number, 200)
        speaking = await trio.to_thread.run_sync(hold_connections, number, 3, b"HELLO")
        # Until the speaking ones are served (a fixed 0.5 s was short for a loaded machine).
        # The idle ones connected first: a kernel that handed them over would have done so
        # before these, so waiting for these does not let idle ones in unseen.
        with trio.move_on_after(30):
            while len(served) < 3:
                await trio.sleep(0.01)
        assert served == [b"HELLO"] * 3
        assert port.statistics()["evicted"] == 0 and port.peak == 3, port
        nursery.cancel_scope.cancel()
    for sock in idle + speaking:
        sock.close()


async def test_connections_made_before_the_port_is_served_also_wait_for_their_bytes():
    """A daemon opens its ports a moment before it serves them, and clients that see the port
    open connect at once. The kernel must hold their connections from the port's opening,
    or they reach the node silent and a burst evicts its own first members (200 clients
    lost their first ones so, against a node under load that had just started)."""
    port = Admission("client", limit=64, pending=16, pending_per_host=8, silence=30)
    served, handler = first_bytes_recorder()
    listeners = await tcp_listen("listen", "127.0.0.1:0", silence=30)
    socks = hold_connections(listeners[0].socket.getsockname()[1], 40)  # before serving
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_admitted, handler, listeners, port)
        await trio.sleep(0.2)  # the node accepts whatever the kernel hands over
        for sock in socks:
            sock.sendall(b"HELLO")
        with trio.move_on_after(30):  # generous: a loaded machine is slow to serve 40
            while len(served) < len(socks):
                await trio.sleep(0.01)
        assert len(served) == len(socks) and port.evicted == 0, port
        nursery.cancel_scope.cancel()
    for sock in socks:
        sock.close()


async def test_idle_connections_wait_in_one_epoll_set_not_a_task_each():
    """Idle connections that do reach the node (the kernel's defer is off here, as it is for
    connections SYN cookies let in past a full backlog) are accepted in batches and parked
    together: no task, cancel scope or timer each. The one that speaks gets its handler;
    the silent ones are evicted, then closed when their silence runs out.

    Silence is 3 s, not less: on a loaded machine opening the 400 took long enough that the
    first ones' silence ran out before the last arrived (fewer evicted, fewer left open),
    and the one that speaks could be closed as silent before its HELLO came."""
    port = Admission("client", limit=1024, pending=1024, pending_per_host=100, silence=3.0)
    served = []

    async def handler(stream, ticket):
        served.append(await stream.receive_some(100))
        ticket.established()
        await stream.send_all(b"OK")
        await trio.sleep_forever()

    work = AdmissionWork()
    async with trio.open_nursery() as nursery:
        listening = await serve_in_process(nursery, port, handler)
        listening.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, 0)
        number = listening.getsockname()[1]
        trio.lowlevel.add_instrument(work)
        idle = await trio.to_thread.run_sync(hold_connections, number, 400)
        with trio.move_on_after(30):
            while port.evicted < 300:
                await trio.sleep(0.01)
        trio.lowlevel.remove_instrument(work)
        assert port.evicted == 300 and port.open == 100, port
        speaking = (await trio.to_thread.run_sync(hold_connections, number, 1))[0]
        await trio.sleep(0.1)
        speaking.sendall(b"HELLO")
        speaking.settimeout(10)
        assert await trio.to_thread.run_sync(speaking.recv, 10) == b"OK"
        assert served == [b"HELLO"]
        # Silent: closed once their 3 s run out (waited for, with room for a slow machine;
        # a node that never closed them fails here).
        with trio.move_on_after(30):
            while port.open > 1 or port.statistics()["pending"]:
                await trio.sleep(0.05)
        assert port.open == 1 and port.statistics()["pending"] == 0, port
        nursery.cancel_scope.cancel()
    # Before: a task per connection (400) and over 3 steps each; now a few batches. How
    # many batches depends on how the kernel's accepts interleave with the loop (114 steps
    # seen under make test's load), so the bound is fewer steps than connections.
    assert work.spawned <= 2 and work.steps < 400, vars(work)
    for sock in idle:
        sock.settimeout(0.01)
    assert all(sock.recv(1) == b"" for sock in idle)  # every one closed by the node
    for sock in idle + [speaking]:
        sock.close()


async def test_a_parked_connection_whose_bytes_arrived_is_not_evicted_as_silent():
    """Past a full backlog, SYN cookies hand over a client before its HELLO arrives, so it
    is parked as silent; its bytes may arrive before the parking task runs. A newcomer
    from its address (a flood) must find it speaking, not evict it (a soak probe was
    closed mid-handshake so, 1 in 2,490)."""
    from kvd.net.admission import _Parking

    port = Admission("client", limit=8, pending=8, pending_per_host=1, silence=30)
    served = []

    async def handler(stream, ticket):
        served.append(await stream.receive_some(100))
        ticket.established()

    async with trio.open_nursery() as nursery:
        parking = _Parking(port, handler, None, nursery)
        nursery.start_soon(parking.run)
        client, ours = socket.socketpair()
        parking.arrived(ours, "10.0.0.1")  # nothing sent yet: parked
        client.sendall(b"HELLO")
        flood, theirs = socket.socketpair()
        parking.arrived(theirs, "10.0.0.1")  # at once: the parking task has not run
        # Until it is served (a fixed 0.1 s could end, on a host that stalled the process,
        # in the same loop iteration that saw its bytes, before its handler ran); one that
        # was evicted never is.
        with trio.move_on_after(10):
            while not served:
                await trio.sleep(0.01)
        assert served == [b"HELLO"] and port.evicted == 0, port
        nursery.cancel_scope.cancel()
    for sock in client, flood:
        sock.close()


@pytest.mark.parametrize("nofile, wanted, got", [
    (20000, {"client": 1024, "peer": 1024, "metrics": 64}, {"client": 1024, "peer": 1024,
                                                             "metrics": 64}),
    (1024, {"client": 1024, "peer": 1024}, {"client": 128, "peer": 128}),
    (256, {"client": 1024, "peer": 1024}, {"client": 12, "peer": 12}),
])
def test_descriptor_budget_leaves_half_to_storage_and_256_spare(nofile, wanted, got):
    assert descriptor_budget(nofile, wanted) == got


# ----------------------------------------------------------------------------- real attacks


@pytest.mark.slow
def test_a_burst_of_clients_from_one_address_all_complete_their_handshakes(tmp_path, procs):
    """200 clients connecting at once from one host, over max_pending_per_address (32):
    none is evicted by the others (accepted in one batch, 168 were; the 32 newest got in)."""
    node = start(tmp_path, procs, "n1", {})
    for _ in range(2):
        socks = [socket.create_connection(("127.0.0.1", node.port), timeout=10)
                 for _ in range(200)]
        for sock in socks:
            sock.sendall(CLIENT_HELLO)
        replies = [read_message(sock, FrameDecoder(1 << 20)) for sock in socks]
        assert [reply.type if reply else None for reply in replies] == [MsgType.HELLO_OK] * 200
        for sock in socks:
            sock.close()


@pytest.mark.slow
@pytest.mark.alone
def test_silent_connections_on_the_metrics_port_do_not_block_health(tmp_path, procs):
    metrics = free_port()
    node = start(tmp_path, procs, "n1", {"metrics_listen": f"127.0.0.1:{metrics}"})
    with Flood(metrics, 300, interval=0.2) as flood:
        deadline = time.monotonic() + 10
        while flood.opened < 300 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
        took = [http_get(metrics, "/health") for _ in range(5)]
    assert all(status == "HTTP/1.1 200 OK" for status, _ in took), took
    # Answered without waiting for a silent connection to reach its read deadline and
    # free room (what blocked it before the connection budget), however slow the machine.
    assert max(seconds for _, seconds in took) < READ_TIMEOUT, took
    assert node.proc.poll() is None


@pytest.mark.slow
@pytest.mark.alone
def test_idle_sockets_do_not_lock_out_clients_or_peers(tmp_path, procs):
    node = start(tmp_path, procs, "n1", {"max_connections": 256})
    with Flood(node.port, 600, interval=0.2), Flood(node.peer_port, 600, interval=0.2):
        time.sleep(1.5)
        clients = [new_client(node.port) for _ in range(10)]
        peers = [new_client(node.peer_port, PEER_HELLO, ping=False) for _ in range(10)]
    assert max(clients) < 1.0 and max(peers) < 1.0, (clients, peers)
    assert node.proc.poll() is None


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


PORTS = ("client", "resp", "peer")


def flood_attack(tmp_path, procs, count: int, rounds: int, quiet_s: float,
                 attack_s: float) -> dict:
    """``count`` idle sockets churned on each of the client, RESP, peer and metrics ports
    (one niced flooding process per port), in ``rounds`` pairs of a quiet phase and an
    attack phase back to back (the machine is shared: a pair sees the same background
    load). New authenticated clients are timed on each port (tests.flood's probes) and
    /health throughout; the node must stay up. Returns the figures."""
    metrics, resp = free_port(), free_port()
    token = TOKENS["viewer"][0]
    secret = private_file(tmp_path / "secret", SECRET)
    node = start(tmp_path, procs, "n1", {
        "metrics_listen": f"127.0.0.1:{metrics}", "resp_listen": f"127.0.0.1:{resp}",
        "client_tokens_file": str(private_file(tmp_path / "tokens", tokens_toml(TOKENS))),
        "cluster_secret_file": str(secret)})
    pid = node.proc.pid
    probes = {"client": partial(probe_client, node.port, token),
              "resp": partial(probe_resp, resp, token),
              "peer": partial(probe_peer, node.peer_port, SECRET.encode())}

    def probe_for(seconds: float, into: dict[str, list[float]], fds: list[int]) -> None:
        end = time.monotonic() + seconds
        health_at = time.monotonic() + 0.25
        while time.monotonic() < end:
            for name, probe in probes.items():
                began = time.monotonic()
                try:
                    into[name].append(probe())
                except (OSError, KvdError) as exc:  # counted as over 1 s, and reported
                    into[name].append(max(1.0, time.monotonic() - began))
                    failures.append(f"{name}: {exc}")
            if time.monotonic() >= health_at:  # /health and descriptors, 4 times a second
                health_at += 0.25
                status, took = http_get(metrics, "/health")
                assert status == "HTTP/1.1 200 OK", status
                into["health"].append(took)
                fds.append(open_fds(pid))
            assert node.proc.poll() is None, node.log_text()[-2000:]

    failures: list[str] = []
    probe_for(0.5, defaultdict(list), [])  # warm up: imports, first connections
    fds_quiet, rss_quiet, overflows = open_fds(pid), rss_kib(pid), listen_overflows()
    pairs, fds, reports = [], [], []
    total: dict[str, dict[str, list[float]]] = {"quiet": defaultdict(list),
                                                "attack": defaultdict(list)}
    ramp = min(3.0, attack_s / 3)  # the floods reach their count (4 ports x count sockets)
    for _ in range(rounds):
        quiet: dict[str, list[float]] = defaultdict(list)
        attack: dict[str, list[float]] = defaultdict(list)
        load = os.getloadavg()[0]
        probe_for(quiet_s, quiet, [])
        floods = [flood_process(port, count, ramp + attack_s)
                  for port in (node.port, resp, node.peer_port, metrics)]
        try:
            time.sleep(ramp)
            probe_for(attack_s, attack, fds)
            reports += [flood.communicate(timeout=30)[0].strip() for flood in floods]
        finally:
            for flood in floods:
                flood.kill()
        pair = {"load": round((load + os.getloadavg()[0]) / 2, 1)}
        for name in PORTS:
            q, a = percentile(quiet[name], 0.99), percentile(attack[name], 0.99)
            pair[name] = (round(q * 1000, 1), round(a * 1000, 1), round(a / q, 2))
            total["quiet"][name] += quiet[name]
            total["attack"][name] += attack[name]
        total["attack"]["health"] += attack["health"]
        pairs.append(pair)
        ports = ", ".join(f"{name} {pair[name][0]}/{pair[name][1]} ({pair[name][2]}x)"
                          for name in PORTS)
        print(f"round {len(pairs)}: load {pair['load']}; p99 quiet/attack ms (ratio): {ports}",
              flush=True)
    figures: dict = {"count": count, "rounds": pairs}
    for name in PORTS:
        q, a = total["quiet"][name], total["attack"][name]
        figures[name] = {"samples": len(a), "p99_quiet_ms": round(percentile(q, 0.99) * 1000, 1),
                         "p99_attack_ms": round(percentile(a, 0.99) * 1000, 1),
                         "max_attack_ms": round(max(a) * 1000, 1),
                         "over_1s": sum(1 for took in a if took >= 1)}
        figures[name]["ratio"] = round(figures[name]["p99_attack_ms"]
                                       / figures[name]["p99_quiet_ms"], 2)
    figures.update({
        "listen_overflows": listen_overflows() - overflows,
        "health_max_ms": round(max(total["attack"]["health"]) * 1000, 1),
        "fds_quiet": fds_quiet, "fds_peak": max(fds),
        "rss_growth_kib": rss_kib(pid) - rss_quiet,
        "failures": failures,
        "floods": reports,
    })
    for name in PORTS:
        print(f"{name}: {figures[name]}")
    print({key: value for key, value in figures.items() if key not in PORTS + ("rounds",)})
    assert node.proc.poll() is None
    return figures


def check_flood_figures(figures: dict, floor_ms: float) -> None:
    # Bounds of issue 10: new clients and peers connect within 1 s, /health answers, and a
    # new authenticated client's p99 stays within 2x quiet (or ``floor_ms``: a shared 2-core
    # machine). Every probe got in (a probe raises on a refusal). A burst of thousands of
    # reopened sockets can overflow the kernel's accept queue (somaxconn), and a SYN dropped
    # there is resent after 1 s: so the 1 s bound applies to all but 1 % of connections;
    # the max is reported (docs/DECISIONS.md).
    for name in PORTS:
        port = figures[name]
        assert port["over_1s"] <= max(1, port["samples"] // 100), (name, figures)
        assert port["p99_attack_ms"] < max(2 * port["p99_quiet_ms"], floor_ms), (name, figures)
    assert figures["health_max_ms"] < 1000, figures
    # Descriptors stay within the budgets: client, RESP and peer max_connections, metrics,
    # storage.
    assert figures["fds_peak"] < 3 * 1024 + 64 + 200, figures


@pytest.mark.slow
@pytest.mark.alone
def test_2000_idle_sockets_churned_on_every_port(tmp_path, procs):
    check_flood_figures(flood_attack(tmp_path, procs, 2000, rounds=2, quiet_s=1,
                                     attack_s=2.5), floor_ms=50)


@pytest.mark.alone
@pytest.mark.skipif(not os.environ.get("KVD_SOAK"), reason="make soak: 10,000 sockets a port")
def test_10000_idle_sockets_churned_on_every_port(tmp_path, procs):
    rounds = int(os.environ.get("KVD_SOAK_ROUNDS", "3"))
    check_flood_figures(flood_attack(tmp_path, procs, 10000, rounds, quiet_s=8, attack_s=12),
                        floor_ms=0)


@pytest.mark.slow
def test_out_of_descriptors_the_node_backs_off_and_stays_up(tmp_path, procs):
    """RLIMIT_NOFILE so low that the ports' budgets do not fit: accept meets EMFILE, and the
    gossip task's blob directory scan (which took the node down) meets it too."""
    metrics = free_port()
    node = KvdProcess(tmp_path / "n1" / "data", extra={
        "gossip_interval": 0.1, "metrics_listen": f"127.0.0.1:{metrics}"},
        prefix=["prlimit", "--nofile=40:40"])
    procs.append(node)
    node.start()
    with Flood(node.port, 300, interval=0.2), Flood(node.peer_port, 300, interval=0.2), \
            Flood(metrics, 300, interval=0.2):
        time.sleep(4)
        assert node.proc.poll() is None, node.log_text()[-3000:]
    time.sleep(1.5)  # the floods' sockets time out and close
    assert new_client(node.port) < 2
    assert http_get(metrics, "/health")[0] == "HTTP/1.1 200 OK"
    assert node.proc.poll() is None
    log = node.log_text()
    assert "Traceback" not in log, log[-3000:]
    print(log[-1500:])
