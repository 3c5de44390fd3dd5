"""The kvd daemon's I/O shell: listeners, lifecycle.

``serve(config, task_status=...)`` opens storage, starts every task in one nursery and reports
the bound client port through ``task_status`` once it accepts connections. ``run(config)``
adds signal handling: SIGTERM/SIGINT stop accepting, let in-flight requests finish, flush
storage and return (exit 0).

Each port admits connections through its budget (kvd.net.admission): a connection is
pending until its handshake succeeds, and the oldest pending one makes room for a newcomer.
An admitted connection of the native protocol is served by kvd.node.connections (handshake,
frames, a task per request that may wait), one of the Redis protocol by
kvd.node.resp_service.
"""

from __future__ import annotations

import functools
import logging
import os
import random
import signal
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import trio

from kvd import systemd
from kvd.client import Dial
from kvd.clocks import REAL, Clocks, real_in_this_run
from kvd.address import parse_address
from kvd.config import Config
from kvd.errors import KvdError, Unavailable
from kvd.metrics import MAX_CONNECTIONS as METRICS_MAX_CONNECTIONS
from kvd.metrics import READ_TIMEOUT, NodeMetrics
from kvd.net.admission import (
    Admission,
    current_nofile,
    defer_accept,
    descriptor_budget,
    serve_admitted,
)
from kvd.node.antientropy import AntiEntropy
from kvd.node.cluster import Cluster
from kvd.node.staging import Offload
from kvd.node import resp_service
from kvd.node.connections import handle_connection
from kvd.node.coordinator import Coordinator
from kvd.node.data_dir import (
    Identity,
    load_identity,
    make_private,
    refuse_unfinished_restore,
)
from kvd.node.local import LocalStore
from kvd.node.replica import LocalReplica
from kvd.security import Security, context_key
from kvd.storage import open_storage
from kvd.storage.blobs import BlobStore, MemoryBlobStore
from kvd.storage.memory import MemoryDisk

log = logging.getLogger("kvd.server")



@dataclass
class Counters:
    """Plain counters the status command and metrics report."""

    connections: int = 0
    requests: int = 0
    errors: int = 0
    rejected_connections: int = 0
    protocol_errors: int = 0


@dataclass
class Node:
    config: Config
    storage: object
    identity: Identity
    store: LocalStore
    coordinator: Coordinator
    cluster: Cluster
    aae: AntiEntropy
    clocks: Clocks = REAL
    started: float = 0.0  # clocks.monotonic() when the node began serving
    counters: Counters = field(default_factory=Counters)
    in_flight: int = 0
    draining: bool = False
    admissions: dict[str, Admission] = field(default_factory=dict)  # "client", "peer"
    idle: trio.Event = field(default_factory=trio.Event)
    security: Security | None = None  # what serve() enforces; SIGHUP re-reads its tokens
    resp_observer: object = None  # kvd.metrics, told of each RESP command
    # Seals the contexts clients carry (kvd.versions); serve sets the cluster's.
    context_key: bytes = field(default_factory=lambda: context_key(None))

    @property
    def node_id(self) -> str:
        return self.identity.node

    def member_count(self) -> int:
        return self.cluster.routing.member_count()

    def request_started(self) -> None:
        if self.draining:
            raise Unavailable("node is shutting down")
        self.in_flight += 1
        self.idle = trio.Event() if self.idle.is_set() else self.idle

    def request_finished(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self.idle.set()

    async def wait_idle(self) -> None:
        if self.in_flight:
            await self.idle.wait()


Listen = Callable[[str, str, float], Awaitable[list]]


async def tcp_listen(key: str, address: str, silence: float) -> list:
    """The daemon's listeners: TCP on ``address`` (config key ``key`` names it in errors).
    A port that cannot be bound is a startup failure (exit 1, kvd(8)), not a config error:
    the same file works once the port is free. From the moment the port opens, the kernel
    holds connections that have sent nothing for up to ``silence`` seconds (admission rule 6):
    clients that connect before the node serves the port are not handed over silent."""
    host, port = parse_address(address)
    try:
        listeners = await trio.open_tcp_listeners(port, host=host)
    except OSError as exc:
        raise KvdError(f"{key} {address}: {exc.strerror}") from None
    for listener in listeners:
        defer_accept(listener.socket, silence)
    return listeners


@asynccontextmanager
async def _open_store(config: Config, disk: MemoryDisk | None):
    """Storage and blob store: LevelDB and blob files in data_dir, or memory (``disk``:
    the simulator's, which survives a simulated crash as far as it was synced)."""
    data_dir = None if config.data_dir == ":memory:" or disk is not None else config.data_dir
    if data_dir is not None:
        make_private(data_dir)
        refuse_unfinished_restore(data_dir)
    async with open_storage(data_dir, sync=config.sync, sync_interval=config.sync_interval,
                            cache_mb=config.cache_mb, disk=disk) as storage:
        blobs: BlobStore | MemoryBlobStore
        if data_dir is None:
            blobs = MemoryBlobStore(disk)
        else:
            blobs = BlobStore(os.path.join(data_dir, "blobs"), sync=config.sync != "none")
        yield storage, blobs


async def serve(config: Config, *, listen: Listen = tcp_listen, dial: Dial | None = None,
                clocks: Clocks = REAL, disk: MemoryDisk | None = None,
                rng: random.Random | None = None, offload: Offload = trio.to_thread.run_sync,
                task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Run a node until cancelled. Reports (client_port, node) when the port accepts.

    The world is injected (DESIGN section 1, STYLE 15): ``listen(config_key, address,
    silence)`` opens listeners, ``dial(address)`` opens peer streams, ``clocks`` tells time, ``disk``
    holds the data, ``offload`` runs CPU-heavy pure work (claim) off the event loop. The
    daemon passes TCP, the real clocks, LevelDB and a worker thread; the simulator
    (tests/sim) passes kvd.net.memory, trio's MockClock, a MemoryDisk and inline offload
    (a thread would break exact replay), and runs the same code."""
    async with _open_store(config, disk) as (storage, blobs):
        identity = await load_identity(storage, config.node_id, clocks.wall())
        store = LocalStore(storage, blobs, config.ring_size, wall=clocks.wall)
        await store.sweep()
        async with trio.open_nursery() as nursery:
            metrics = NodeMetrics(config)  # /health and /ready answer while the ring loads
            if config.metrics_listen:
                await nursery.start(metrics.serve,
                                    await listen("metrics_listen", config.metrics_listen,
                                                 READ_TIMEOUT))
            local = LocalReplica(identity.node, identity.actor, store)
            cluster = Cluster(config, identity, storage, store, local, nursery,
                              clocks=clocks, dial=dial, rng=rng, offload=offload)
            await cluster.load()
            coordinator = Coordinator(
                cluster.routing.replicas_for_read,
                cluster.routing.replicas_for_write,
                nursery,
                config.request_timeout,
                read_repair=config.read_repair,
                replica_timeout=config.replica_timeout,
                keep_hint=cluster.handoff.keep_for_failed_leg if config.hinted_handoff else None,
                clock=clocks.monotonic,
                write_quorum=cluster.routing.write_quorum,
            )
            node = Node(config, storage, identity, store, coordinator, cluster,
                        AntiEntropy(cluster, store, config), clocks, clocks.monotonic())
            node.idle.set()
            metrics.attach(node)
            security = Security.from_config(config)  # secret, tokens, TLS: checked here
            node.security = security
            node.context_key = security.context_key
            cluster.peers.security = security
            metrics.security = security
            node.admissions.update(_admissions(config, cluster))
            listeners = []
            # The Redis-protocol front door first: whoever sees the client port open (tests,
            # scripts) finds it open too (a test once dialled it in the gap and was refused).
            if config.resp_listen:
                resp = await listen("resp_listen", config.resp_listen, config.handshake_timeout)
                listeners += resp
                nursery.start_soon(resp_service.serve, node, resp, security.client_tls)
            for key, role in (("peer_listen", "peer"), ("listen", "client")):
                bound = await listen(key, getattr(config, key), config.handshake_timeout)
                listeners += bound
                tls = security.peer_tls if role == "peer" else security.client_tls
                # With TLS, the TLS handshake runs inside the HELLO's handshake timeout.
                nursery.start_soon(
                    serve_admitted,
                    lambda stream, ticket, role=role: handle_connection(
                        node, stream, ticket, role, security),
                    bound,
                    node.admissions[role],
                    tls,
                )
            nursery.start_soon(security.refusals.run)
            socket = getattr(listeners[-1], "socket", None)
            port = socket.getsockname()[1] if socket is not None else 0
            nursery.start_soon(cluster.run)
            nursery.start_soon(node.aae.run)
            notifier = systemd.notifier()
            nursery.start_soon(notifier.run_watchdog)
            nursery.start_soon(notifier.run_status, metrics.describe)
            log.info("node %s serving clients on %s, peers on %s", identity.node, config.listen,
                     config.peer_listen)
            notifier.ready(metrics.describe())  # listeners accept and the ring is loaded
            task_status.started((port, node))
            try:
                await trio.sleep_forever()
            finally:
                node.draining = True
                for listener in listeners:
                    await listener.aclose()


def _admissions(config: Config, cluster: Cluster) -> dict[str, Admission]:
    """The budgets of the client and peer ports (kvd.net.admission), within the process's
    descriptor limit; the peer port keeps slots for the hosts of known members."""
    nofile = current_nofile()
    wanted = {"client": config.max_connections, "peer": config.max_connections,
              "metrics": METRICS_MAX_CONNECTIONS if config.metrics_listen else 0,
              "resp": config.max_connections if config.resp_listen else 0}
    limits = descriptor_budget(nofile, wanted)
    if limits != wanted:
        log.warning("max_connections %d per port does not fit the descriptor limit %d "
                    "(RLIMIT_NOFILE): using %d; raise LimitNOFILE", config.max_connections,
                    nofile, limits["client"])

    def is_member(host: str) -> bool:
        peers = [peer for _, peer in cluster.addresses.values()] + list(config.seeds)
        return any(address.rpartition(":")[0].strip("[]") == host for address in peers)

    def budget(role: str, reserved: int = 0) -> Admission:
        return Admission(role, limits[role], config.max_pending_connections,
                         config.max_pending_per_address, reserved, is_member,
                         silence=config.handshake_timeout)

    return {"client": budget("client"), "resp": budget("resp"),
            "peer": budget("peer", config.member_reserved_connections)}


async def run(config: Config) -> None:
    """Serve until SIGTERM/SIGINT (or until this node has left the cluster and handed off
    its data), then drain in-flight requests and flush storage."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals, \
            trio.open_signal_receiver(signal.SIGHUP) as reloads:
        async with trio.open_nursery() as nursery:
            _, node = await nursery.start(
                functools.partial(serve, config, clocks=real_in_this_run()))
            stop = trio.Event()

            async def on_signal():
                async for signum in signals:
                    log.info("received %s: draining", signal.Signals(signum).name)
                    stop.set()
                    return

            async def on_left():
                await node.cluster.left.wait()
                log.info("exiting: this node has left the cluster")
                stop.set()

            nursery.start_soon(on_signal)
            nursery.start_soon(on_left)
            nursery.start_soon(systemd.reload_on_sighup, node, reloads)
            await stop.wait()
            systemd.notifier().stopping()
            node.draining = True
            with trio.move_on_after(config.request_timeout + 5):
                await node.wait_idle()
            nursery.cancel_scope.cancel()
    log.info("stopped cleanly")
