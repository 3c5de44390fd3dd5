"""One simulated run from one seed: cluster, fault schedule, workload, heal, check.

``simulate(seed)`` forms a cluster of whole kvd nodes (tests/sim/harness.py), runs the
workload (tests/sim/workload.py) while a nemesis injects faults drawn from the seed, then
heals every fault, restarts crashed nodes, repairs until every replica of every partition
has the same hash-tree root, lets the tombstone grace pass so GC purges during a last
repair, reads every key at R=N and checks the history (``check``).

The checker's rules (a run passes only if all hold):
1. No acknowledged write is lost: every acknowledged unique key reads its value; every
   acknowledged element of a hot key is in the union of its live siblings.
2. No deleted key comes back: a key whose delete was acknowledged reads as not found,
   also after its tombstone was purged.
3. Nothing appears that was never written: unique keys hold only their own value; hot keys
   hold only elements some client tried to add.
4. Replicas converge: every replica of every partition has the same hash-tree root within
   ``CONVERGE_LIMIT`` simulated seconds after the heal.
5. Siblings stay bounded: a hot key never shows more siblings than its most concurrent
   writers plus one; a blind-written key no more than the blind writes made to it.
6. No node task crashed and no node logged a traceback.
7. A write is applied at most once (bug 15): no key holds two live siblings with the same
   value. Every write's value is its own (a unique key's one put, a hot key's set with the
   writer's new element, a blind write's element), so two equal siblings are one write
   minted twice.

Rule 2 is checked after real purges: ``deletes_purged`` counts the acknowledged deletes whose
tombstone is gone at the end (the read finds no sibling at all), ``purged_in_faults`` the
tombstones the running nodes purged before the heal; make test requires some of each.
``late`` counts the connections whose bytes, queued in a partition, the network delivered
after the heal, ``user_timeouts`` those it reset instead (kvd/net/memory.py rules 2 and 3).

Faults (the nemesis): partitions (one node, majority/minority, a bridge, a non-transitive
ring), message delay and connection resets (loss, and a reset of one link mid-request),
crash with restart (unsynced writes lost), pauses longer than the failure detector's
threshold, and a join or leave while data moves. Tombstone grace is short, so GC runs
while faults come and go.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import trio
import trio.testing

from kvd.errors import KvdError
from kvd.node.cluster import LEAVE_LINGER_ROUNDS
from kvd.ring import preference_list

from .harness import SimCluster, seeded
from .workload import BIG, HOT_KEYS, Workload, decode_set, unique_value

CONVERGE_LIMIT = 900.0  # simulated seconds from heal until every replica agrees
TOMBSTONE_GRACE = 40.0  # short, so GC runs while faults come and go
HINT_WINDOW = 30.0  # below the grace (a hint older than it could bring back a purged key)


@dataclass
class Report:
    seed: int
    profile: str
    nodes: int
    problems: list[str] = field(default_factory=list)
    faults: list[str] = field(default_factory=list)
    counts: dict = field(default_factory=dict)
    converge_seconds: float | None = None
    simulated_seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        verdict = "ok" if self.ok else f"FAILED ({len(self.problems)} problems)"
        counts = " ".join(f"{k}={v}" for k, v in self.counts.items())
        converge = "never" if self.converge_seconds is None else f"{self.converge_seconds:.0f}s"
        return (f"seed {self.seed} ({self.profile}): {verdict}; {self.nodes} nodes, "
                f"{len(self.faults)} faults, {counts}, converged {converge} after heal, "
                f"{self.simulated_seconds:.0f}s simulated")


def replay_command(report: Report) -> str:
    short = " SHORT=1" if report.profile == "short" else ""
    return f"make sim SEED={report.seed}{short}"


@dataclass(frozen=True)
class Profile:
    """How big one run is: ``SHORT`` for make test's many seeds, ``FULL`` for make sim."""

    name: str
    sizes: tuple[int, ...]
    duration: tuple[float, float]  # simulated seconds of workload and faults
    clients: int
    think: tuple[float, float]  # seconds a client waits between operations


SHORT = Profile("short", sizes=(3, 4, 5), duration=(30.0, 45.0), clients=3, think=(0.2, 1.2))
FULL = Profile("full", sizes=(3, 4, 5, 6, 7), duration=(60.0, 150.0), clients=4, think=(0.05, 0.6))


def run(seed: int, *, profile: Profile = FULL, lose_one_ack: bool = False,
        apply_one_twice: bool = False) -> Report:
    """Run seed ``seed`` to the end (deterministic: rule 1 of tests/sim/harness.py)."""
    with seeded(seed):
        return trio.run(simulate, seed, profile, lose_one_ack, apply_one_twice,
                        clock=trio.testing.MockClock(autojump_threshold=0))


async def simulate(seed: int, profile: Profile = FULL, lose_one_ack: bool = False,
                   apply_one_twice: bool = False) -> Report:
    rng = random.Random(f"schedule/{seed}")
    size = rng.choice(profile.sizes)
    report = Report(seed, profile.name, size)
    async with trio.open_nursery() as nursery:
        sim = SimCluster(nursery, seed, tombstone_grace=TOMBSTONE_GRACE,
                         hint_window=HINT_WINDOW)
        try:
            await sim.form([f"n{i}" for i in range(1, size + 1)], settle=0.0)
            workload = Workload(sim, seed, profile.clients, profile.think)
            duration = rng.uniform(*profile.duration)
            async with trio.open_nursery() as faults:
                faults.start_soon(_nemesis, sim, rng, workload, report)
                await workload.run(duration)
            # GC during the faults: tombstones purged before the heal (running nodes' count).
            report.counts["purged_in_faults"] = sum(
                sn.node.aae.totals.tombstones_purged for sn in sim.running())
            if lose_one_ack:
                await _lose_one_acknowledged_write(sim, workload)
            if apply_one_twice:
                await _apply_one_write_twice(sim, workload)
            await _heal(sim, report)
            await _converge(sim, report)
            await _check(sim, workload, report)
            net = sim.net.statistics()  # kvd/net/memory.py rules 2 and 3 at work
            report.counts["late"] = net["late_deliveries"]
            report.counts["user_timeouts"] = net["user_timeouts"]
        finally:
            sim.close()
            report.simulated_seconds = trio.current_time()
            nursery.cancel_scope.cancel()
    return report


# --- forming and healing ----------------------------------------------------------------------


async def _wait_settled(sim: SimCluster, limit: float) -> bool:
    """Until no partition is moving on any running node (False after ``limit`` seconds)."""
    with trio.move_on_after(limit):
        while any(sn.node.cluster.state.in_transition for sn in sim.running()):
            await trio.sleep(1.0)
        return True
    return False


async def _heal(sim: SimCluster, report: Report) -> None:
    sim.net.heal()
    sim.net.set_loss(0.0)
    sim.net.set_delay(0.0)
    for sn in list(sim.nodes.values()):
        if not sn.running and not sn.removed:
            await sim.start(sn.name)
    for sn in sim.running():
        # Its join was refused: it never was part of the cluster. (A leaving node may be no
        # member either, when a commit dropped it: it exits below, once members know.)
        if sn not in sim.members() and not sn.leaving:
            sim.crash(sn.name)
            sn.removed = True
    # Every member sees every other member up (gossip and phi after the heal).
    with trio.move_on_after(120.0):
        while not all(a.node.cluster.is_up(b.name) for a in sim.members() for b in sim.members()):
            await trio.sleep(1.0)
    if not await _wait_settled(sim, 600.0):
        report.problems.append("partitions still moving 600 s after the heal")
    # A node that has left exits, as the daemon does, once every member has heard so
    # (kvd/node/cluster.py Rule 4: at most LEAVE_LINGER_ROUNDS gossip rounds).
    with trio.move_on_after(LEAVE_LINGER_ROUNDS * sim.config["gossip_interval"] + 10.0):
        while any(sn.node.cluster.has_left() and not sn.node.cluster.left.is_set()
                  for sn in sim.running()):
            await trio.sleep(1.0)
    for sn in sim.running():
        if sn.node.cluster.left.is_set():
            sim.crash(sn.name)
            sn.removed = True


def _replicas_of(sim: SimCluster, partition: int) -> list[str]:
    cluster = sim.running()[0].node.cluster
    ring = cluster.routing.serving_ring()
    return preference_list(ring, partition, min(cluster.config.n, len(ring.nodes())))


def _divergent(sim: SimCluster) -> list[int]:
    nodes = {sn.name: sn.node for sn in sim.running()}
    q = sim.running()[0].node.cluster.state.ring.q
    out = []
    for partition in range(q):
        roots = {nodes[name].store.tree(partition).root()
                 for name in _replicas_of(sim, partition) if name in nodes}
        if len(roots) > 1:
            out.append(partition)
    return out


async def _converge(sim: SimCluster, report: Report) -> None:
    """Rule 4 by the background work alone (anti-entropy, hints, read repair): no repair is
    asked for until every replica agrees. Then, after the grace, repairs let GC purge."""
    start = trio.current_time()
    with trio.move_on_after(CONVERGE_LIMIT):
        while _divergent(sim):
            await trio.sleep(1.0)
        report.converge_seconds = trio.current_time() - start
    if report.converge_seconds is None:
        report.problems.append(
            f"replicas of partitions {_divergent(sim)[:10]} still differ "
            f"{CONVERGE_LIMIT:.0f} s after the heal")
    await trio.sleep(TOMBSTONE_GRACE + 1.0)
    for _ in range(2):
        for sn in sim.running():
            await sim.admin(sn.name, {"op": "repair", "wait": True})


# --- the nemesis ------------------------------------------------------------------------------

FAULTS = ("isolate", "majority", "bridge", "ring", "crash", "pause", "delay", "loss", "reset",
          "topology")


async def _nemesis(sim: SimCluster, rng: random.Random, workload: Workload, report) -> None:
    """One fault at a time: apply, hold, undo; until the workload stops."""
    while not workload.stop.is_set():
        await trio.sleep(rng.uniform(1.0, 6.0))
        running = sorted(sn.name for sn in sim.members())
        if len(running) < 2:
            continue
        fault = rng.choice(FAULTS)
        hold = rng.uniform(3.0, 25.0)
        peers = {name: sim.nodes[name].peer_address for name in running}
        report.faults.append(f"{trio.current_time():.0f}s {fault}")
        if fault == "isolate" or fault == "pause":
            victim = rng.choice(running)
            if fault == "pause":
                hold = rng.uniform(15.0, 35.0)  # beyond the failure detector's threshold
            sim.net.partition(peers[victim], [a for n, a in peers.items() if n != victim]
                              + sim.client_sources)
        elif fault == "majority":
            shuffled = rng.sample(running, len(running))
            cut = len(running) // 2
            sim.net.partition([peers[n] for n in shuffled[:cut]],
                              [peers[n] for n in shuffled[cut:]])
        elif fault == "bridge" and len(running) >= 3:
            bridge, *rest = rng.sample(running, len(running))
            half = len(rest) // 2
            sim.net.partition([peers[n] for n in rest[:half]], [peers[n] for n in rest[half:]])
        elif fault == "ring" and len(running) >= 4:
            # Each node reaches only its two neighbours: the detector sees everyone up.
            order = rng.sample(running, len(running))
            for i, a in enumerate(order):
                for j, b in enumerate(order):
                    if i < j and (j - i) % len(order) not in (1, len(order) - 1):
                        sim.net.partition(peers[a], peers[b])
        elif fault == "crash":
            victim = rng.choice(running)
            sim.crash(victim)
            await trio.sleep(hold)
            if not sim.nodes[victim].removed:
                await sim.start(victim)
            continue
        elif fault == "delay":
            sim.net.set_delay(rng.uniform(0.01, 0.3), [peers[rng.choice(running)]])
        elif fault == "loss":
            sim.net.set_loss(rng.uniform(0.005, 0.03))
        elif fault == "reset":
            a, b = rng.sample(running, 2)
            sim.net.reset(peers[a], peers[b])
            continue
        elif fault == "topology":
            await _topology_change(sim, rng, running, report)
            continue
        await trio.sleep(hold)
        sim.net.heal()
        sim.net.set_loss(0.0)
        sim.net.set_delay(0.0)


async def _topology_change(sim: SimCluster, rng: random.Random, running: list[str], report) -> None:
    """Join, leave, replace or force-remove a node while data moves (a refusal is fine)."""
    members = [sn.name for sn in sim.nodes.values() if not sn.removed and not sn.leaving]
    kind = "join" if len(members) <= 3 else rng.choice(("join", "leave", "replace", "force-remove"))
    victim = rng.choice([n for n in running if n in members] or running)
    coordinator = rng.choice(running)
    name = f"n{len(sim.nodes) + 1}"  # the new node of a join or replace
    try:
        with trio.fail_after(30):
            if kind in ("join", "replace"):
                seed_node = sim.nodes[coordinator]
                await sim.start(name, seeds=[seed_node.peer_address])
                await sim.admin(name, {"op": "join", "seed": seed_node.peer_address})
                if kind == "replace":
                    await sim.admin(coordinator, {"op": "replace", "node": victim, "target": name})
                    sim.nodes[victim].leaving = True
                replaced = f" for {victim}" if kind == "replace" else ""
                report.faults[-1] += f" {kind} {name}{replaced}"
            elif kind == "leave":
                await sim.admin(coordinator, {"op": "leave", "node": victim})
                sim.nodes[victim].leaving = True
                report.faults[-1] += f" leave {victim}"
            else:  # a dead node the operator gives up on: its replicas are rebuilt elsewhere
                sim.crash(victim)
                sim.nodes[victim].removed = True
                coordinator = rng.choice([n for n in running if n != victim])
                await sim.admin(coordinator, {"op": "force-remove", "node": victim})
                report.faults[-1] += f" force-remove {victim}"
            await sim.admin(coordinator, {"op": "commit"})
    except (trio.TooSlowError, KvdError, OSError) as exc:  # refused or unreachable: no change
        report.faults[-1] += f" refused ({type(exc).__name__}: {str(exc)[:60]})"
        if kind in ("join", "replace") and name in sim.nodes:
            if sim.nodes[name] not in sim.members():
                sim.crash(name)  # a one-node cluster of its own: no client talks to it
        sim.nodes[victim].leaving = sim.nodes[victim].removed = False
        with trio.move_on_after(30):
            try:
                await sim.admin(coordinator, {"op": "clear"})
            except (KvdError, OSError):
                pass  # unreachable now: what it staged may be committed later, as in life


async def _lose_one_acknowledged_write(sim: SimCluster, workload: Workload) -> None:
    """The negative control: delete one acknowledged unique key behind the checker's back,
    as a build that dropped an acknowledged write would. The checker must report it."""
    acked = sorted(k for k, outcome in workload.history.unique.items() if outcome == "ok")
    if not acked:
        return
    source = sim.client_address()
    async with sim.open_client(sim.members()[0].name, source) as client:
        current = await client.get(acked[0], r=1)
        await client.delete(acked[0], context=current.context or None, w=1)


async def _apply_one_write_twice(sim: SimCluster, workload: Workload) -> None:
    """The negative control of rule 7: mint one acknowledged unique write a second time, as
    a coordinator whose retry also landed would. The checker must report it."""
    acked = sorted(k for k, outcome in workload.history.unique.items() if outcome == "ok")
    if len(acked) < 2:
        return
    async with sim.open_client(sim.members()[0].name, sim.client_address()) as client:
        await client.put(acked[-1], unique_value(acked[-1]), blind=True, w=1)


# --- the check --------------------------------------------------------------------------------


async def _read_all(sim: SimCluster, keys: list[bytes]) -> dict:
    source = sim.client_address()
    names = [sn.name for sn in sim.members()]
    out = {}
    for i, key in enumerate(keys):
        async with sim.open_client(names[i % len(names)], source) as client:
            n = min(3, len(names))
            out[key] = await client.get(key, r=n)
    return out


async def _check(sim: SimCluster, workload: Workload, report: Report) -> None:
    history = workload.history
    report.counts = dict(history.counts, **report.counts)
    keys = (sorted(history.unique) + [f"h/{i}".encode() for i in range(HOT_KEYS)]
            + sorted(history.deletes) + sorted(history.blind))
    try:
        reads = await _read_all(sim, keys)
    except (KvdError, trio.TooSlowError) as exc:
        report.problems.append(f"final read at R=N failed: {exc!r}")
        return
    problems = report.problems
    lost = 0
    for key, outcome in history.unique.items():
        live = [s.value for s in reads[key].siblings if not s.deleted]
        if any(v != unique_value(key) for v in live):
            problems.append(f"{key!r} holds a value never written to it")
        if outcome == "ok" and not live:
            lost += 1
            problems.append(f"acknowledged write of {key!r} lost")
    for key, elements in history.elements.items():
        result = reads[key]
        present: set[bytes] = set()
        for sibling in result.siblings:
            if not sibling.deleted:
                present |= decode_set(sibling.value)
        for element, outcome in elements.items():
            if outcome == "ok" and element not in present:
                lost += 1
                problems.append(f"acknowledged element {element!r} of {key!r} lost")
        phantoms = sorted(present - set(elements))
        if phantoms:
            problems.append(f"{key!r} holds elements never written: {phantoms[:5]}")
        bound = history.max_writers.get(key, 0) + 1
        if len(result.siblings) > bound:
            problems.append(f"{key!r} has {len(result.siblings)} siblings, more than its "
                            f"{bound - 1} concurrent writers plus one")
    purged = 0
    for key, outcome in history.deletes.items():
        if outcome == "ok" and any(not s.deleted for s in reads[key].siblings):
            problems.append(f"deleted key {key!r} came back")
        purged += outcome == "ok" and not reads[key].siblings
    for key, writes in history.blind.items():
        if len(reads[key].siblings) > writes:
            problems.append(f"{key!r} has {len(reads[key].siblings)} siblings from {writes} writes")
        phantoms = sorted({s.value for s in reads[key].siblings if not s.deleted}
                          - history.blind_elements.get(key, set()))
        if phantoms:
            problems.append(f"{key!r} holds values never written: {phantoms[:5]}")
    for key, result in reads.items():
        values = [s.value for s in result.siblings if not s.deleted]
        twice = len(values) - len(set(values))
        if twice:
            problems.append(f"{key!r}: {twice} write(s) applied twice (equal live siblings)")
    report.counts["lost"] = lost
    report.counts["deletes_purged"] = purged
    problems.extend(f"node crash: {c}" for c in sim.crashes)


__all__ = ["BIG", "FULL", "SHORT", "Profile", "Report", "replay_command", "run", "simulate"]
