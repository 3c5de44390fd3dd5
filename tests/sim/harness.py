"""Whole kvd nodes in one trio run: the simulator's cluster (DESIGN section 8, ring 2).

Each node is the real ``kvd.server.serve`` (server, coordinator, gossip, hints, read repair,
anti-entropy, transfers, tombstone GC), given an in-memory network (kvd.net.memory), trio's
MockClock through ``kvd.clocks`` (with a per-node wall-clock skew) and a ``MemoryDisk``
that survives a simulated crash as far as it was synced.

Rules:
1. Everything random comes from the run's seed: the fault schedule, the workload, trio's
   scheduler (its batch shuffling), the network's loss, every node's rng and ``os.urandom``
   (node incarnations, value ids, cluster ids). With PYTHONHASHSEED fixed (make sim and
   make test fix it), one seed replays one run exactly.
2. A crash cancels the node and drops its connections at once; writes its storage had not
   synced are lost (``MemoryDisk.crash``). A restart serves the same disk again.
3. A pause is the node cut off from everyone (what it sends and what is sent to it is queued
   as in any partition, kvd/net/memory.py rule 2; nothing reaches it) for longer than the
   failure detector's threshold: what a SIGSTOPped process looks like from outside.
4. A node task that raises, and every ERROR log record with a traceback (an "internal
   error"), is recorded in ``SimCluster.crashes``: the checker fails the run on any. Also in
   quiet runs (``--json`` sets the root logger to CRITICAL): the ``kvd`` logger is kept at
   ERROR at least while the cluster exists.
"""

from __future__ import annotations

import logging
import os
import random
from contextlib import contextmanager
from dataclasses import dataclass, field

import trio

from kvd.client import open_client
from kvd.clocks import skewed
from kvd.config import Config
from kvd.net.memory import MemoryNetwork
from kvd.node.staging import run_inline
from kvd.server import serve
from kvd.storage.memory import MemoryDisk

EPOCH = 1_780_000_000.0  # the simulated wall clock starts here (plus each node's skew)


@dataclass
class SimNode:
    name: str
    address: str  # client port
    peer_address: str
    disk: MemoryDisk = field(default_factory=MemoryDisk)
    skew: float = 0.0
    scope: trio.CancelScope | None = None
    node: object = None  # kvd.server.Node while running
    starts: int = 0
    leaving: bool = False  # a leave was committed for it
    removed: bool = False  # it left the cluster and stopped, as the daemon does

    @property
    def running(self) -> bool:
        return self.node is not None


class _CrashLog(logging.Handler):
    """Rule 4: tracebacks logged by a node are bugs."""

    def __init__(self, crashes: list[str]) -> None:
        super().__init__(logging.ERROR)
        self.crashes = crashes

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info:
            self.crashes.append(f"{record.name}: {record.getMessage()}: {record.exc_info[1]!r}")


@contextmanager
def seeded(seed: int):
    """Rule 1: seed trio's scheduler and os.urandom for the duration of one run."""
    import trio._core._run as trio_run

    rng = random.Random(f"urandom/{seed}")
    real_urandom = os.urandom
    trio_run._r.seed(f"trio/{seed}")
    os.urandom = lambda n: rng.randbytes(n)  # type: ignore[assignment]
    try:
        yield
    finally:
        os.urandom = real_urandom


class SimCluster:
    """Nodes on one MemoryNetwork, started, crashed, paused and partitioned by the schedule."""

    def __init__(self, nursery: trio.Nursery, seed: int, **config) -> None:
        self.nursery = nursery
        self.seed = seed
        self.rng = random.Random(f"cluster/{seed}")
        self.net = MemoryNetwork()
        self.net.set_loss(0.0, random.Random(f"loss/{seed}"))
        self.nodes: dict[str, SimNode] = {}
        self.crashes: list[str] = []
        self.config = dict(
            ring_size=32, n=3, r=2, w=2, metrics_listen="", gossip_interval=1.0,
            request_timeout=5.0, tombstone_grace=7200.0, hint_window=3600.0,
            anti_entropy_interval=10.0, chunk_size=65536, max_frame=1 << 20,
            handshake_timeout=5.0, idle_timeout=120.0, transfer_rate_mb=50.0,
        )
        self.config.update(config)
        self.client_sources: list[str] = []
        self.cluster_id = ""  # set by form()
        self._log = _CrashLog(self.crashes)
        kvd_log = logging.getLogger("kvd")
        self._kvd_level = kvd_log.level
        if not kvd_log.isEnabledFor(logging.ERROR):  # a quiet run (--json) still sees rule 4
            kvd_log.setLevel(logging.ERROR)
        kvd_log.addHandler(self._log)

    def close(self) -> None:
        kvd_log = logging.getLogger("kvd")
        kvd_log.removeHandler(self._log)
        kvd_log.setLevel(self._kvd_level)

    # --- nodes --------------------------------------------------------------------------------

    def add(self, name: str) -> SimNode:
        i = len(self.nodes) + 1
        node = SimNode(name, f"127.0.1.{i}:7379", f"127.0.1.{i}:7380",
                       skew=self.rng.uniform(-30.0, 30.0))
        self.net.host(node.peer_address, node.address)
        self.nodes[name] = node
        return node

    def config_of(self, sn: SimNode, seeds: list[str]) -> Config:
        return Config(node_id=sn.name, listen=sn.address, peer_listen=sn.peer_address,
                      data_dir=":memory:", seeds=seeds, **self.config)

    async def start(self, name: str, seeds: list[str] | None = None) -> SimNode:
        """Start (or restart) node ``name``; returns once it accepts connections."""
        sn = self.nodes[name] if name in self.nodes else self.add(name)
        if seeds is None:
            seeds = [n.peer_address for n in self.nodes.values() if n is not sn]
        config = self.config_of(sn, seeds)
        sn.starts += 1
        await self.nursery.start(self._run, sn, config)
        return sn

    async def _run(self, sn: SimNode, config: Config, task_status=trio.TASK_STATUS_IGNORED):
        scope = sn.scope = trio.CancelScope()

        async def listen(_key: str, address: str, _silence: float) -> list:
            return [self.net.listen(address)]

        started = False
        node = None
        with scope:
            try:
                async with trio.open_nursery() as inner:
                    _, node = await inner.start(
                        lambda task_status: serve(
                            config, listen=listen, dial=self.net.connector(sn.peer_address),
                            clocks=skewed(EPOCH, sn.skew), disk=sn.disk,
                            rng=random.Random(f"node/{self.seed}/{sn.name}/{sn.starts}"),
                            offload=run_inline,  # a worker thread would break exact replay
                            task_status=task_status))
                    sn.node = node
                    started = True
                    task_status.started()
            except Exception as exc:
                self.crashes.append(f"{sn.name}: node task raised {exc!r}")
                logging.getLogger("sim").debug("%s crashed", sn.name, exc_info=True)
                if not started:
                    task_status.started()
            finally:
                if sn.node is node:  # not the node of a restart that came meanwhile
                    sn.node = None

    async def admin(self, name: str, fields: dict) -> dict:
        """One ADMIN request to node ``name`` (join, commit, ring, repair, ...)."""
        async with self.open_client(name, self.client_address()) as client:
            return await client.admin(fields)

    async def form(self, names, settle: float = 5.0, limit: float = 600.0) -> None:
        """Start ``names`` as one committed cluster (the first is the seed); returns once no
        partition moves or is being fetched, plus ``settle`` seconds of gossip."""
        first = await self.start(names[0], seeds=[])
        self.cluster_id = first.node.cluster.state.cluster_id
        for name in names[1:]:
            await self.start(name, seeds=[first.peer_address])
            await self.admin(name, {"op": "join", "seed": first.peer_address})
        if len(names) > 1:
            await self.admin(names[0], {"op": "commit"})
        await self.wait_settled(names[0], limit)
        await trio.sleep(settle)

    async def wait_settled(self, name: str, limit: float = 600.0) -> float:
        """Until node ``name`` sees no move pending and no node fetching; the seconds taken."""
        began = trio.current_time()
        with trio.fail_after(limit):
            while True:
                ring = await self.admin(name, {"op": "ring"})
                if not ring["pending"] and not ring.get("fetching"):
                    return trio.current_time() - began
                await trio.sleep(1.0)

    def isolate(self, name: str) -> None:
        """Cut node ``name`` off from every other node (heal with ``net.heal()``)."""
        others = [sn.peer_address for sn in self.nodes.values() if sn.name != name]
        self.net.partition(self.nodes[name].peer_address, others)

    def crash(self, name: str) -> None:
        """Rule 2."""
        sn = self.nodes[name]
        sn.disk.crash()
        self.net.stop(sn.peer_address)
        self.net.stop(sn.address)
        if sn.scope is not None:
            sn.scope.cancel()
        sn.node = None

    def running(self) -> list[SimNode]:
        return [sn for sn in self.nodes.values() if sn.running]

    def members(self) -> list[SimNode]:
        """Running nodes that belong to the cluster ``form`` made: a node started for a join
        that was refused serves a one-node cluster of its own, and no client of the cluster
        talks to it (that would be an operator's mistake, not kvd's)."""
        return [sn for sn in self.running()
                if sn.node.cluster.state.cluster_id == self.cluster_id
                and sn.name in sn.node.cluster.state.members]

    # --- clients ------------------------------------------------------------------------------

    def client_address(self) -> str:
        """A fresh source address for a client (the network only lets serving hosts dial)."""
        count = len(self.client_sources)
        address = f"127.0.9.{count // 250}:{count % 250 + 1}"
        self.net.listen(address)
        self.client_sources.append(address)
        return address

    def open_client(self, name: str, source: str):
        return open_client(self.nodes[name].address, dial=self.net.connector(source),
                           connect_timeout=2.0)
