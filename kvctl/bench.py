"""kvctl bench: YCSB-style workloads against a live cluster. Prints figures; never fails on speed.

Workloads (YCSB core): A = 50% read / 50% update, B = 95/5, C = 100% read. Keys are chosen
with YCSB's zipfian distribution (constant 0.99) over ``keys`` preloaded keys, so a few keys
are hot, as in real traffic. An update writes back with the context of the last version the
bench saw of that key (as a read-modify-write client does), so siblings stay bounded by the
number of concurrent writers instead of growing with every blind write.
"""

from __future__ import annotations

import bisect
import itertools
import os
import random
import time
from contextlib import contextmanager
from collections.abc import Callable
from dataclasses import dataclass

import trio

from kvd.client import open_client
from kvd.errors import KvdError

class NoAnswer(KvdError):
    """A request went unanswered for the whole timeout: the node is stuck, stop the bench."""


WORKLOADS = {"A": 0.50, "B": 0.95, "C": 1.00}  # fraction of reads
ZIPF_CONSTANT = 0.99


class Zipfian:
    """Draws ranks 0..n-1 with P(rank i) proportional to 1/(i+1)^theta, scattered over keys."""

    def __init__(self, n: int, rng: random.Random, theta: float = ZIPF_CONSTANT):
        total = 0.0
        self.cdf = []
        for i in range(n):
            total += 1.0 / (i + 1) ** theta
            self.cdf.append(total)
        self.total = total
        self.rng = rng
        # Scatter popular ranks across the key space, as YCSB's scrambled zipfian does.
        self.slots = list(range(n))
        rng.shuffle(self.slots)

    def next(self) -> int:
        rank = bisect.bisect_left(self.cdf, self.rng.random() * self.total)
        return self.slots[min(rank, len(self.slots) - 1)]


@dataclass
class BenchResult:
    workload: str
    ops: int
    errors: int
    seconds: float
    latencies_ms: list[float]

    def summary(self) -> dict:
        lat = sorted(self.latencies_ms) or [0.0]

        def pct(p: float) -> float:
            return round(lat[min(len(lat) - 1, int(p * len(lat)))], 3)

        return {
            "workload": self.workload,
            "ops": self.ops,
            "errors": self.errors,
            "ops_per_sec": round(self.ops / self.seconds, 1) if self.seconds else 0.0,
            "p50_ms": pct(0.50),
            "p95_ms": pct(0.95),
            "p99_ms": pct(0.99),
            "max_ms": round(lat[-1], 3),
            "seconds": round(self.seconds, 3),
        }


def bench_key(i: int) -> bytes:
    return b"bench:%08d" % i


async def run_bench(
    address: str,
    *,
    workload: str,
    ops: int,
    concurrency: int,
    value_size: int,
    keys: int,
    connections: int,
    token: str | None = None,
    ssl_context=None,
    load: bool = True,
    seed: int = 1,
    timeout: float = 30.0,
    ready: Callable[[], None] | None = None,
) -> BenchResult:
    """Preload ``keys`` keys (unless ``load`` is False), then run ``ops`` operations. A
    request unanswered for ``timeout`` seconds stops the bench (KvdError). ``ready()`` is
    called (blocking) once the connections are open and the keys loaded, before the run."""
    rng = random.Random(seed)
    zipf = Zipfian(keys, rng)
    read_fraction = WORKLOADS[workload]
    value = os.urandom(value_size)
    counter = itertools.count()
    latencies: list[float] = []
    errors = 0
    contexts: dict[bytes, bytes] = {}

    @contextmanager
    def answered():
        try:
            with trio.fail_after(timeout):
                yield
        except trio.TooSlowError:
            raise NoAnswer(f"no answer from {address} within {timeout:g} s (--timeout); "
                           "bench stopped") from None

    async with _pool(address, connections, token, ssl_context, timeout) as clients:
        if load:
            loaded = itertools.count()

            async def loader(client):
                while (i := next(loaded)) < keys:
                    key = bench_key(i)
                    with answered():
                        contexts[key] = (await client.put(key, value)).context

            async with trio.open_nursery() as nursery:
                for index in range(concurrency):
                    nursery.start_soon(loader, clients[index % len(clients)])

        async def worker(client):
            nonlocal errors
            while next(counter) < ops:
                key = bench_key(zipf.next())
                started = time.perf_counter()
                try:
                    with answered():
                        if rng.random() < read_fraction:
                            contexts[key] = (await client.get(key)).context
                        else:
                            reply = await client.put(key, value, context=contexts.get(key))
                            contexts[key] = reply.context
                except NoAnswer:
                    raise
                except KvdError:
                    errors += 1
                    continue
                latencies.append((time.perf_counter() - started) * 1000)

        if ready is not None:
            ready()
        started = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for index in range(concurrency):
                nursery.start_soon(worker, clients[index % len(clients)])
        elapsed = time.perf_counter() - started
    return BenchResult(workload, len(latencies), errors, elapsed, latencies)


class _pool:
    """Open ``count`` client connections for the bench workers to share."""

    def __init__(self, address: str, count: int, token: str | None, ssl_context=None,
                 timeout: float = 5.0):
        self.address, self.count, self.token = address, count, token
        self.ssl_context, self.timeout = ssl_context, timeout

    async def __aenter__(self):
        from contextlib import AsyncExitStack

        self._stack = AsyncExitStack()
        await self._stack.__aenter__()
        clients = []
        for _ in range(self.count):
            clients.append(
                await self._stack.enter_async_context(
                    open_client(self.address, token=self.token, ssl_context=self.ssl_context,
                                connect_timeout=self.timeout))
            )
        return clients

    async def __aexit__(self, *exc):
        return await self._stack.__aexit__(*exc)


def _split(total: int, parts: int, index: int) -> int:
    return total // parts + (1 if index < total % parts else 0)


def _ssl(tls_ca: str | None):
    if tls_ca is None:
        return None
    from kvd.security import client_context

    return client_context(tls_ca)


def _child(barrier, results, index: int, address: str, tls_ca: str | None,
           kwargs: dict) -> None:
    """One bench process (``run_procs``): its share of the run, its latencies sent back."""
    try:
        result = trio.run(lambda: run_bench(address, load=False, seed=index + 1,
                                            ssl_context=_ssl(tls_ca), ready=barrier.wait,
                                            **kwargs))
        results.put((result.latencies_ms, result.errors, None))
    except BaseException as exc:  # the parent reports it; a child prints no traceback
        barrier.abort()
        results.put(([], 0, str(exc) or type(exc).__name__))


def run_procs(address: str, procs: int, *, ops: int, concurrency: int, connections: int,
              load: bool, tls_ca: str | None, cpu: Callable[[], float | None],
              spread: list[str] | None = None,
              **kwargs) -> tuple[BenchResult, float | None]:
    """The bench from ``procs`` processes, so one client process never caps the figure.

    The keys are loaded once, here; then each process opens its share of the connections and
    waits for the others, and all run their share of ``ops`` at once. ``cpu()`` is the
    servers' CPU seconds so far (None: unknown), taken around the run; returns the merged
    result and the servers' CPU seconds per operation. ``spread``: process i drives node
    ``spread[i % len(spread)]`` instead of ``address`` (clients of a cluster use every node)."""
    import multiprocessing
    import threading

    if load:
        trio.run(lambda: run_bench(address, ops=0, concurrency=concurrency,
                                   connections=connections, load=True,
                                   ssl_context=_ssl(tls_ca), **kwargs))
    if procs == 1 and not spread:  # in this process (the connections' set-up counts in the CPU figure)
        before = cpu()
        result = trio.run(lambda: run_bench(
            address, ops=ops, concurrency=concurrency, connections=connections, load=False,
            ssl_context=_ssl(tls_ca), **kwargs))
        return result, _per_op(before, cpu(), result.ops)
    context = multiprocessing.get_context("spawn")  # no trio state crosses into a child
    barrier = context.Barrier(procs + 1)
    results = context.Queue()
    children = []
    for index in range(procs):
        share = {**kwargs, "ops": _split(ops, procs, index),
                 "concurrency": max(1, _split(concurrency, procs, index)),
                 "connections": max(1, _split(connections, procs, index))}
        target = spread[index % len(spread)] if spread else address
        child = context.Process(target=_child,
                                args=(barrier, results, index, target, tls_ca, share))
        child.start()
        children.append(child)
    try:
        barrier.wait(timeout=2 * kwargs.get("timeout", 30.0) + 30)
    except threading.BrokenBarrierError:
        pass  # a child failed before the run: its error is in the results
    before = cpu()
    started = time.perf_counter()
    latencies: list[float] = []
    errors = 0
    failures = []
    for _ in children:
        lat, errs, failure = _next_result(results, children)
        latencies += lat
        errors += errs
        if failure:
            failures.append(failure)
    elapsed = time.perf_counter() - started
    after = cpu()
    for child in children:
        child.join()
    if failures:
        raise KvdError(f"bench process failed: {failures[0]}")
    merged = BenchResult(kwargs["workload"], len(latencies), errors, elapsed, latencies)
    return merged, _per_op(before, after, merged.ops)


def _next_result(results, children) -> tuple:
    """The next child's result; a child that died without one (killed) fails the bench."""
    import queue

    while True:
        try:
            return results.get(timeout=1.0)
        except queue.Empty:
            if not any(child.is_alive() for child in children) and results.empty():
                return [], 0, "a bench process died"


def _per_op(before: float | None, after: float | None, ops: int) -> float | None:
    if before is None or after is None or not ops:
        return None
    return (after - before) / ops


async def cluster_addresses(address: str, token: str | None, ssl_context,
                            timeout: float) -> list[str]:
    """The client addresses of the cluster's up nodes, ``address``'s node first."""
    async with open_client(address, token=token, ssl_context=ssl_context,
                           connect_timeout=timeout) as client:
        status = await client.status()
    others = [row["address"] for row in status["nodes"] if row.get("address")
              and row["state"].startswith("U") and row["node"] != status["node"]]
    return [address] + sorted(others)


async def cluster_cpu(address: str, token: str | None, ssl_context, timeout: float) -> float | None:
    """CPU seconds used so far by every node of the cluster ``address`` is in, summed (each
    node's STATUS ``cpu_seconds``); None when a node does not say (an older kvd)."""
    async with open_client(address, token=token, ssl_context=ssl_context,
                           connect_timeout=timeout) as client:
        rows = (await client.status())["nodes"]
    total = 0.0
    for row in rows:
        if not row.get("address") or not row["state"].startswith("U"):
            continue
        async with open_client(row["address"], token=token, ssl_context=ssl_context,
                               connect_timeout=timeout) as client:
            reply = await client.status()
        seconds = next((r.get("cpu_seconds") for r in reply["nodes"]
                        if r["node"] == reply["node"]), None)
        if seconds is None:
            return None
        total += seconds
    return total
