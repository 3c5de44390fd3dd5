"""Real kvd processes in network namespaces, a Jepsen-style workload, and the scenarios.

Used by tests/chaos/test_chaos.py (a short run in `make test`, every scenario at full length
in `make chaos`). Each scenario runs on the same 5-node cluster with its own keys:

    workload starts -> `pre` s -> fault for `fault` s -> heal -> `post` s -> workload stops
    -> every node seen UN -> `kvctl repair --wait` on every node -> replicas agree (inspect)
    -> every key read at R=N -> checker (tests/chaos/checker.py)

and after the last scenario every scenario's keys are read and checked again (tombstones,
with a 12 s grace, are purged meanwhile).

Figures per scenario: writes acknowledged / failed / indeterminate / lost, phantoms,
resurrected deletes, duplicated siblings, crowded hot keys, tombstones purged, time from heal until every replica agrees, and
client latency (p50/p99, all outcomes) of the writes started during the fault; beside it the
p99 of the writes whose quorum stayed reachable (issue 14: those coordinated by a node that
is neither cut off in the minority, killed, paused nor behind the lossy link), the p99 of
the others, the p99 before the fault (the machine's load alone), and the target
(P99_TARGET_MS). Speed is only ever printed; correctness (and
daemons that died by themselves) fails the run.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import trio

from kvd.client import open_client
from kvd.errors import KvdError
from tests.chaos import netns
from tests.chaos.checker import Op, Read, Verdict, check, hot_tokens, hot_value, percentile

ROOT = Path(__file__).resolve().parents[2]
CLIENT_PORT = 7379
PEER_PORT = 7380
TOKEN = "kvdchaos-admin-token-0123456789"
DEFINITE = {"quorum", "unavailable", "too_many_siblings", "bad_request"}
NODE_CONFIG = {
    "ring_size": 64,
    "n": 3, "r": 2, "w": 2,
    "gossip_interval": 0.2,
    "request_timeout": 2.0,
    "anti_entropy_interval": 10.0,
    # Tombstones are purged within the run (the simulator's "short grace"), so a deleted key
    # that comes back after its purge is caught; hints must expire before a purge.
    "tombstone_grace": 12.0,
    "hint_window": 8.0,
}
# Issue 14: p99 of the requests whose quorum is reachable, during a fault. Printed, never
# asserted (the machine is shared: latencies are inflated by others' load).
P99_TARGET_MS = 100


def log(message: str) -> None:
    print(f"[chaos {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- cluster


class Node:
    def __init__(self, index: int, workdir: Path, seeds: list[str]):
        self.index = index
        self.node_id = f"n{index}"
        self.ns = netns.node_ns(index)
        self.ip = netns.node_ip(index)
        self.workdir = workdir
        self.data_dir = workdir / self.node_id / "data"
        self.log_path = workdir / f"{self.node_id}.log"
        self.config_path = workdir / f"{self.node_id}.toml"
        self.seeds = seeds
        self.proc: subprocess.Popen | None = None
        self.expected_dead = False

    @property
    def address(self) -> str:
        return f"{self.ip}:{CLIENT_PORT}"

    @property
    def peer_address(self) -> str:
        return f"{self.ip}:{PEER_PORT}"

    def write_config(self) -> None:
        lines = [
            f'node_id = "{self.node_id}"',
            f'listen = "{self.address}"',
            f'peer_listen = "{self.peer_address}"',
            'metrics_listen = ""',
            f'data_dir = "{self.data_dir}"',
            f'cluster_secret_file = "{self.workdir / "cluster.secret"}"',
            f'client_tokens_file = "{self.workdir / "tokens.toml"}"',
        ]
        if self.seeds:
            lines.append("seeds = [" + ", ".join(f'"{s}"' for s in self.seeds) + "]")
        for key, value in NODE_CONFIG.items():
            lines.append(f"{key} = {json.dumps(value)}")
        self.config_path.write_text("\n".join(lines) + "\n")

    def start(self) -> None:
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        self.write_config()
        with open(self.log_path, "ab") as out:
            # `ip netns exec` execs the command: the pid is kvd's own, signals reach it.
            self.proc = subprocess.Popen(
                ["ip", "netns", "exec", self.ns, sys.executable, "-m", "kvd.main",
                 "--config", str(self.config_path)],
                stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.expected_dead = False

    def wait_listening(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.node_id} exited with {self.proc.returncode}:\n"
                                   + self.log_tail())
            try:
                with socket.create_connection((self.ip, CLIENT_PORT), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.1)
        raise TimeoutError(f"{self.node_id} not listening after {timeout} s\n" + self.log_tail())

    def signal(self, sig: int) -> None:
        os.kill(self.proc.pid, sig)

    def kill9(self) -> None:
        self.expected_dead = True
        self.signal(signal.SIGKILL)
        self.proc.wait(10)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return f"--- {self.node_id} ---\n" + "\n".join(text.splitlines()[-lines:])

    def tracebacks(self) -> int:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return text.count("Traceback")


class Cluster:
    def __init__(self, workdir: Path, count: int = 5):
        self.workdir = workdir
        self.count = count
        workdir.mkdir(parents=True, exist_ok=True)
        secret = workdir / "cluster.secret"
        secret.write_text(os.urandom(32).hex() + "\n")
        secret.chmod(0o600)
        tokens = workdir / "tokens.toml"
        tokens.write_text(f'[tokens]\nchaos = {{ token = "{TOKEN}", role = "admin" }}\n')
        tokens.chmod(0o600)
        self.token_file = workdir / "kvctl.token"
        self.token_file.write_text(TOKEN + "\n")
        self.token_file.chmod(0o600)
        first = netns.node_ip(1) + f":{PEER_PORT}"
        self.nodes = [Node(i, workdir, [] if i == 1 else [first])
                      for i in range(1, count + 1)]

    def node(self, index: int) -> Node:
        return self.nodes[index - 1]

    def kvctl(self, node: Node, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "kvctl.app", "--host", node.address, "--token-file",
             str(self.token_file), "--json", *args],
            capture_output=True, timeout=timeout, cwd=ROOT,
            env={**os.environ, "NO_COLOR": "1"})

    def kvctl_json(self, node: Node, *args: str, timeout: float = 120) -> dict:
        out = self.kvctl(node, *args, timeout=timeout)
        if out.returncode != 0:
            raise RuntimeError(f"kvctl {' '.join(args)} on {node.node_id}: exit "
                               f"{out.returncode}: {out.stderr.decode(errors='replace').strip()}")
        return json.loads(out.stdout)

    async def form(self) -> None:
        """n1 alone, the others seeded with it, `kvctl cluster join` + `commit`, all UN."""
        for node in self.nodes:
            node.start()
        for node in self.nodes:
            await trio.to_thread.run_sync(node.wait_listening)
        first = self.nodes[0]

        async def join(node: Node) -> None:
            doc = await trio.to_thread.run_sync(
                lambda: self.kvctl_json(node, "cluster", "join", first.peer_address))
            assert doc["staged"] == f"join {node.node_id}", doc

        async with trio.open_nursery() as nursery:
            for node in self.nodes[1:]:
                nursery.start_soon(join, node)
        doc = await trio.to_thread.run_sync(lambda: self.kvctl_json(first, "cluster", "commit"))
        assert len(doc["committed"]) == self.count - 1, doc
        if not await self.wait_all_up(120, transfers=True):
            raise RuntimeError("the 5-node cluster did not form within 120 s:\n"
                               + "\n".join(n.log_tail() for n in self.nodes))

    async def states(self, node: Node) -> dict[str, str]:
        async with open_client(node.address, token=TOKEN, connect_timeout=1.0) as client:
            with trio.fail_after(3):
                status = await client.status()
        return {row["node"]: row["state"] for row in status["nodes"]}

    async def wait_all_up(self, timeout: float, transfers: bool = False) -> bool:
        """Until every node sees every node UN (and, optionally, no transfer runs)."""
        expected = {n.node_id: "UN" for n in self.nodes}
        deadline = trio.current_time() + timeout
        while trio.current_time() < deadline:
            try:
                seen = [await self.states(node) for node in self.nodes]
                done = all(s == expected for s in seen)
                if done and transfers:
                    async with open_client(self.nodes[0].address, token=TOKEN) as client:
                        done = (await client.admin({"op": "transfers"}))["transfers"] == []
                if done:
                    return True
            except (KvdError, OSError, trio.TooSlowError):
                pass
            await trio.sleep(0.3)
        return False

    def crashed(self) -> list[str]:
        return [f"{n.node_id} exited with {n.proc.returncode}" for n in self.nodes
                if not n.expected_dead and not n.alive()]

    def stop(self) -> None:
        for node in self.nodes:
            if node.alive():
                try:
                    node.signal(signal.SIGCONT)
                    node.signal(signal.SIGKILL)
                    node.proc.wait(10)
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    pass


# ----------------------------------------------------------------------------- workload


class Workload:
    """``workers`` clients, worker w pinned to node (w mod count) + 1, until stopped."""

    def __init__(self, cluster: Cluster, scenario: str, workers: int, seed: int,
                 op_timeout: float = 4.0, pace: float = 0.02, hot_keys: int = 3):
        self.cluster = cluster
        self.scenario = scenario
        self.workers = workers
        self.seed = seed
        self.op_timeout = op_timeout
        self.pace = pace
        self.hot = [f"{scenario}/hot/{i}".encode() for i in range(hot_keys)]
        self.history: list[Op] = []
        self.reads: list[tuple[int, float, float]] = []  # (node, start, end) of each read
        self.stop = trio.Event()

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            for w in range(self.workers):
                nursery.start_soon(self.worker, w)

    async def worker(self, w: int) -> None:
        node = self.cluster.node(w % self.cluster.count + 1)
        rng = random.Random(self.seed * 1000 + w)
        seq = 0
        while not self.stop.is_set():
            try:
                async with open_client(node.address, token=TOKEN, connect_timeout=1.0) as client:
                    while not self.stop.is_set():
                        seq += 1
                        if not await self.one(client, node.index, w, seq, rng):
                            break  # indeterminate: start over on a fresh connection
                        await trio.sleep(self.pace)
            except (KvdError, OSError, trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            if not self.stop.is_set():
                await trio.sleep(0.2)

    async def attempt(self, op: Op, call) -> object:
        """Run one write; record its outcome. Returns the reply (None unless acknowledged)."""
        op.start = trio.current_time()
        self.history.append(op)
        reply = None
        with trio.move_on_after(self.op_timeout) as scope:
            try:
                reply = await call()
                op.outcome = "ok"
            except KvdError as exc:
                op.outcome = "fail" if exc.code in DEFINITE else "info"
                op.error = f"{type(exc).__name__}: {exc}"
            except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                op.outcome, op.error = "info", f"{type(exc).__name__}: {exc}"
        if scope.cancelled_caught:
            op.outcome, op.error = "info", f"no reply within {self.op_timeout} s"
        op.end = trio.current_time()
        return reply

    async def one(self, client, node: int, w: int, seq: int, rng: random.Random) -> bool:
        if rng.random() < 0.25:
            key = rng.choice(self.hot)
            token = f"{w}.{seq}".encode()
            current = None
            began = trio.current_time()
            try:
                with trio.move_on_after(self.op_timeout):
                    try:
                        current = await client.get(key)
                    except KvdError as exc:
                        return exc.code in DEFINITE
                    except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
                        return False
            finally:
                self.reads.append((node, began, trio.current_time()))
            if current is None:
                return False
            union = {token}
            for sibling in current.siblings:
                if not sibling.deleted:
                    union |= hot_tokens(sibling.value)
            op = Op("rmw", key, token, node=node)
            context = current.context or None
            await self.attempt(op, lambda: client.put(key, hot_value(union), context=context))
            return op.outcome != "info"
        key = f"{self.scenario}/u/{w}/{seq}".encode()
        value = f"{self.scenario}:{w}:{seq}:{rng.getrandbits(32):08x}".encode()
        op = Op("put", key, value, node=node)
        reply = await self.attempt(op, lambda: client.put(key, value))
        if op.outcome == "ok" and rng.random() < 0.25:
            delete = Op("delete", key, b"", node=node)
            await self.attempt(delete, lambda: client.delete(key, context=reply.context))
            return delete.outcome != "info"
        return op.outcome != "info"


# ----------------------------------------------------------------------------- checking


async def read_all(cluster: Cluster, keys: list[bytes], patience: float = 30
                   ) -> dict[bytes, Read]:
    """Every key at R=N (3), spread over the nodes. A key that fails is retried; it is given
    up (reported unreadable) only after failing for ``patience`` seconds in a row, so a slow
    machine makes the read-back slower, never a failure."""
    reads: dict[bytes, Read] = {}

    async def reader(offset: int, stride: int) -> None:
        node = cluster.nodes[offset % cluster.count]
        todo = keys[offset::stride]
        failing_since: float | None = None
        while todo:
            try:
                async with open_client(node.address, token=TOKEN, connect_timeout=2) as client:
                    while todo:
                        with trio.fail_after(10):
                            got = await client.get(todo[0], r=3)
                        reads[todo.pop(0)] = Read(
                            live=[s.value for s in got.siblings if not s.deleted],
                            tombstones=sum(s.deleted for s in got.siblings))
                        failing_since = None
            except (KvdError, OSError, trio.TooSlowError, trio.BrokenResourceError,
                    trio.ClosedResourceError) as exc:
                reads[todo[0]] = Read(error=f"{type(exc).__name__}: {exc}")
                now = trio.current_time()
                failing_since = now if failing_since is None else failing_since
                if now - failing_since >= patience:
                    todo.pop(0)
                    failing_since = None
                else:
                    await trio.sleep(0.3)

    async with trio.open_nursery() as nursery:
        stride = 2 * cluster.count
        for offset in range(stride):
            nursery.start_soon(reader, offset, stride)
    return reads


async def disagreeing(cluster: Cluster, keys: list[bytes]) -> int:
    """How many keys' primary replicas do not all hold the same object (inspect)."""
    bad = 0

    async def part(offset: int, stride: int) -> None:
        nonlocal bad
        node = cluster.nodes[offset % cluster.count]
        mine = keys[offset::stride]
        done = 0
        try:
            async with open_client(node.address, token=TOKEN, connect_timeout=2) as client:
                for key in mine:
                    with trio.fail_after(5):
                        doc = await client.inspect(key)
                    done += 1
                    primaries = [r for r in doc["replicas"]
                                 if r.get("role", "primary") == "primary"]
                    states = {(r["present"], r["digest"]) for r in primaries}
                    if len(states) != 1 or len(primaries) != 3:
                        bad += 1
        except (KvdError, OSError, trio.TooSlowError, trio.BrokenResourceError,
                trio.ClosedResourceError):
            bad += len(mine) - done  # not known to agree: look again later

    async with trio.open_nursery() as nursery:
        for offset in range(cluster.count):
            nursery.start_soon(part, offset, cluster.count)
    return bad


# ----------------------------------------------------------------------------- scenarios


@dataclass
class Scenario:
    name: str
    describe: str
    pre: float
    fault: float
    post: float
    # Coordinators whose requests cannot all reach a quorum during the fault (minority side,
    # killed, paused) or that sit behind the lossy link; every other coordinator's requests
    # have a reachable quorum, and are held to P99_TARGET_MS.
    impaired: frozenset[int] = frozenset()


@dataclass
class Result:
    scenario: str
    verdict: Verdict
    fault_seconds: float
    converge_seconds: float | None
    p50_ms: float | None
    p99_ms: float | None
    ops_during_fault: int
    repair_ok: bool
    wall_seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    history: list[Op] = field(default_factory=list)
    p99_reachable_ms: float | None = None  # coordinators outside scenario.impaired
    p99_impaired_ms: float | None = None   # coordinators in scenario.impaired
    p99_calm_ms: float | None = None  # outside scenario.impaired, before the fault
    p99_read_reachable_ms: float | None = None  # reads, as p99_reachable_ms for writes
    writers: int = 0     # clients writing concurrently (checker rule 6)
    purged: int = 0      # tombstones the repairs after this scenario purged


def scenarios(full: bool) -> list[Scenario]:
    fault = 30.0 if full else 6.0
    pre, post = (3.0, 5.0) if full else (1.0, 1.5)
    return [
        Scenario("majority", "partition {n1,n2,n3} | {n4,n5}", pre, fault, post,
                 frozenset({4, 5})),
        # Each node reaches itself and 2 neighbours: 3 of 5, a (sloppy) quorum of any key.
        Scenario("ring", "non-transitive ring: each node reaches only its 2 neighbours",
                 pre, fault, post),
        Scenario("kill9", "kill -9 n2, restart it after the fault", pre, fault, post,
                 frozenset({2})),
        Scenario("sigstop", "SIGSTOP n3, SIGCONT after the fault", pre, fault, post,
                 frozenset({3})),
        Scenario("lossy", "20% loss + 50 ms delay on n4's link (NFQUEUE or netem)",
                 pre, fault, post, frozenset({4})),
    ]


class Faults:
    def __init__(self, cluster: Cluster):
        self.cluster = cluster
        self.lossy: netns.LossyLink | None = None
        self.notes: list[str] = []

    async def inject(self, name: str) -> None:
        count = self.cluster.count
        if name == "majority":
            netns.partition([[1, 2, 3], [4, 5]], count)
            await self.expect_links({(1, 2): True, (1, 4): False, (5, 4): True, (5, 3): False})
        elif name == "ring":
            netns.ring(count)
            await self.expect_links({(1, 2): True, (1, 5): True, (1, 3): False,
                                     (1, 4): False, (3, 5): False, (3, 4): True})
        elif name == "kill9":
            node = self.cluster.node(2)
            node.kill9()
            assert node.proc.returncode == -signal.SIGKILL, node.proc.returncode
            self.notes.append(f"n2 SIGKILLed: exit {node.proc.returncode}")
        elif name == "sigstop":
            node = self.cluster.node(3)
            node.signal(signal.SIGSTOP)
            await trio.sleep(0.2)
            state = Path(f"/proc/{node.proc.pid}/stat").read_text().split()[2]
            assert state == "T", f"n3 not stopped after SIGSTOP: state {state}"
            self.notes.append(f"n3 SIGSTOPped: state {state}")
        elif name == "lossy":
            self.lossy = netns.LossyLink(4)
            await trio.to_thread.run_sync(self.lossy.start)
        else:
            raise ValueError(name)

    async def expect_links(self, expected: dict[tuple[int, int], bool]) -> None:
        """The partition is real: probe peer ports from inside the namespaces (TCP)."""
        seen = {}

        async def probe(src: int, dst: int, want: bool) -> None:
            seen[(src, dst)] = await trio.to_thread.run_sync(
                netns.can_connect, src, netns.node_ip(dst), PEER_PORT, 5.0 if want else 1.0)

        async with trio.open_nursery() as nursery:
            for (src, dst), want in expected.items():
                nursery.start_soon(probe, src, dst, want)
        seen = {link: seen[link] for link in expected}
        wrong = {f"n{s}->n{d}": ("open" if ok else "blocked") for (s, d), ok in seen.items()
                 if ok != expected[(s, d)]}
        assert not wrong, f"the partition is not in effect: {wrong}"
        self.notes.append("verified by TCP probes: " + ", ".join(
            f"n{s}->n{d} {'open' if ok else 'blocked'}" for (s, d), ok in seen.items()))

    async def heal(self, name: str) -> None:
        if name in ("majority", "ring"):
            netns.heal(self.cluster.count)
        elif name == "kill9":
            node = self.cluster.node(2)
            node.start()
            await trio.to_thread.run_sync(node.wait_listening)
        elif name == "sigstop":
            self.cluster.node(3).signal(signal.SIGCONT)
        elif name == "lossy" and self.lossy is not None:
            await trio.to_thread.run_sync(self.lossy.stop)
            self.notes.append(f"nfqueue: {self.lossy.summary}")
            if not self.lossy.netem:  # the link really was lossy: packets seen and dropped
                counts = dict(part.split("=") for part in self.lossy.summary.split())
                assert int(counts.get("dropped", 0)) > 0, f"nfqueue dropped nothing: {counts}"


async def run_scenario(cluster: Cluster, scenario: Scenario, seed: int, workers: int,
                       converge_timeout: float, pace: float = 0.02) -> Result:
    began = trio.current_time()
    workload = Workload(cluster, scenario.name, workers, seed, pace=pace)
    faults = Faults(cluster)
    notes: list[str] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(workload.run)
        await trio.sleep(scenario.pre)
        fault_start = trio.current_time()
        notes.append(f"load average at the fault: {_loadavg()}")
        try:
            await faults.inject(scenario.name)
            await trio.sleep(scenario.fault)
        finally:
            with trio.CancelScope(shield=True):
                await faults.heal(scenario.name)
        healed = trio.current_time()
        await trio.sleep(scenario.post)
        workload.stop.set()
    notes += faults.notes
    ops = [op for op in workload.history if fault_start <= op.start < healed and op.end]
    during = [op.end - op.start for op in ops]
    reachable = [op.end - op.start for op in ops if op.node not in scenario.impaired]
    impaired = [op.end - op.start for op in ops if op.node in scenario.impaired]
    calm = [op.end - op.start for op in workload.history
            if op.start < fault_start and op.end and op.node not in scenario.impaired]
    reads_reachable = [end - start for node, start, end in workload.reads
                       if fault_start <= start < healed and node not in scenario.impaired]
    if not await cluster.wait_all_up(30):
        notes.append("not every node saw every node UN within 30 s of the heal")
    repair_ok = True
    purged = 0

    async def repair(node: Node) -> None:
        nonlocal repair_ok, purged
        try:
            out = await trio.to_thread.run_sync(
                lambda: cluster.kvctl(node, "repair", "--wait", timeout=300))
        except subprocess.TimeoutExpired:
            repair_ok = False
            notes.append(f"kvctl repair --wait on {node.node_id}: no answer within 300 s")
            return
        if out.returncode != 0:
            repair_ok = False
            notes.append(f"kvctl repair --wait on {node.node_id}: exit {out.returncode}: "
                         f"{out.stderr.decode(errors='replace').strip()[:200]}")
            return
        purged += json.loads(out.stdout)["repair"]["tombstones_purged"]

    async with trio.open_nursery() as nursery:
        for node in cluster.nodes:
            nursery.start_soon(repair, node)
    keys = sorted({op.key for op in workload.history})
    converged = None
    deadline = trio.current_time() + converge_timeout
    while trio.current_time() < deadline:
        try:
            if await disagreeing(cluster, keys) == 0:
                converged = trio.current_time() - healed
                break
        except (KvdError, OSError, trio.TooSlowError, trio.BrokenResourceError):
            pass
        await trio.sleep(0.5)
    reads = await read_all(cluster, keys)
    verdict = check(workload.history, reads, writers=workers)
    dump_history(cluster.workdir / f"{scenario.name}.history.json", workload.history, reads)
    return Result(scenario.name, verdict, healed - fault_start, converged,
                  _ms(percentile(during, 50)), _ms(percentile(during, 99)), len(during),
                  repair_ok, trio.current_time() - began, notes, workload.history,
                  p99_reachable_ms=_ms(percentile(reachable, 99)),
                  p99_impaired_ms=_ms(percentile(impaired, 99)),
                  p99_calm_ms=_ms(percentile(calm, 99)), writers=workers, purged=purged,
                  p99_read_reachable_ms=_ms(percentile(reads_reachable, 99)))


def dump_history(path: Path, history: list[Op], reads: dict[bytes, Read]) -> None:
    """The scenario's history and final reads, for a human reading a failure."""
    doc = {"ops": [{"kind": op.kind, "key": op.key.decode(), "value": op.value.decode(),
                    "outcome": op.outcome, "start": op.start, "end": op.end,
                    "node": op.node, "error": op.error} for op in history],
           "reads": {k.decode(): {"live": [v.decode(errors="replace") for v in r.live],
                                  "tombstones": r.tombstones, "error": r.error}
                     for k, r in reads.items()}}
    path.write_text(json.dumps(doc, indent=1))


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


async def tamper_and_recheck(cluster: Cluster, result: Result) -> Verdict:
    """Negative control: behind the checker's back, through the normal API, delete one
    acknowledged key, overwrite another (with its context, so the old value is superseded)
    and rewrite a hot key without one acknowledged token. The re-check must name all three."""
    acked = [op for op in result.history if op.kind == "put" and op.outcome == "ok"
             and not any(o.kind == "delete" and o.key == op.key for o in result.history)]
    victim, overwritten = acked[0].key, acked[1].key
    tokens = {(op.key, op.value) for op in result.history if op.kind == "rmw"
              and op.outcome == "ok"}
    async with open_client(cluster.nodes[0].address, token=TOKEN) as client:
        got = await client.get(victim, r=3)
        await client.delete(victim, context=got.context)
        got = await client.get(overwritten, r=3)
        await client.put(overwritten, b"never-written-by-the-workload", context=got.context)
        hot_key, dropped = sorted(tokens)[0]
        got = await client.get(hot_key, r=3)
        union: set[bytes] = set()
        for sibling in got.siblings:
            if not sibling.deleted:
                union |= hot_tokens(sibling.value)
        await client.put(hot_key, hot_value(union - {dropped}), context=got.context)
    keys = sorted({op.key for op in result.history})
    verdict = check(result.history, await read_all(cluster, keys), writers=result.writers)
    verdict.tampered = (  # type: ignore[attr-defined]
        victim.decode(), overwritten.decode(),
        f"{hot_key.decode()} token {dropped.decode()}")
    return verdict


async def recheck_all(cluster: Cluster, results: list[Result]) -> list[str]:
    """Every scenario's keys read and checked again at the end: tombstones purged during the
    later scenarios' faults must not bring a deleted key back, nor lose anything."""
    problems = []
    for result in results:
        keys = sorted({op.key for op in result.history})
        verdict = check(result.history, await read_all(cluster, keys), writers=result.writers)
        if not verdict.ok:
            problems.append(f"{result.scenario} (re-checked at the end): {verdict.problems()}")
    return problems


def figures(results: list[Result]) -> str:
    """The table: outcomes, convergence and latency per scenario. p99_reach is the p99 of the
    writes whose quorum stayed reachable, held to `target` (printed, never asserted);
    read_p99 that of the same coordinators' reads (the read before each read-modify-write,
    answered or failed: a read whose R replicas are cut off should fail fast); p99_calm that
    of the same coordinators' writes in the seconds before the fault (what the machine's
    load alone costs); p99_impaired that of the impaired coordinators' writes (see
    Scenario.impaired)."""
    head = (f"{'scenario':<9} {'ack':>6} {'failed':>6} {'indet':>6} {'lost':>5} {'phantom':>7} "
            f"{'resurr':>6} {'dup':>4} {'crowd':>5} {'unread':>6} {'purged':>6} "
            f"{'converge_s':>10} "
            f"{'p50_ms':>8} {'p99_ms':>8} {'p99_reach':>9} {'read_p99':>8} {'target':>6} "
            f"{'p99_calm':>8} "
            f"{'p99_impaired':>12} "
            f"{'fault_s':>7} {'wall_s':>6}")
    lines = [f"load average {_loadavg()}", head]
    for r in results:
        v = r.verdict
        conv = f"{r.converge_seconds:.1f}" if r.converge_seconds is not None else "no"
        lines.append(
            f"{r.scenario:<9} {v.acknowledged:>6} {v.failed:>6} {v.indeterminate:>6} "
            f"{len(v.lost):>5} {len(v.phantom):>7} {len(v.resurrected):>6} "
            f"{len(v.duplicated):>4} {len(v.crowded):>5} "
            f"{len(v.unreadable):>6} {r.purged:>6} {conv:>10} {_fmt(r.p50_ms):>8} "
            f"{_fmt(r.p99_ms):>8} "
            f"{_fmt(r.p99_reachable_ms):>9} {_fmt(r.p99_read_reachable_ms):>8} "
            f"{'≤' + str(P99_TARGET_MS):>6} "
            f"{_fmt(r.p99_calm_ms):>8} {_fmt(r.p99_impaired_ms):>12} {r.fault_seconds:>7.1f} {r.wall_seconds:>6.1f}")
        for note in r.notes:
            lines.append(f"    {note}")
    return "\n".join(lines)


def _loadavg() -> str:
    """The machine's load average (1, 5, 15 min): latencies on a shared machine need it."""
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"
