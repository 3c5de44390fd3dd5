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
) -> BenchResult:
    """Preload ``keys`` keys (unless ``load`` is False), then run ``ops`` operations. A
    request unanswered for ``timeout`` seconds stops the bench (KvdError)."""
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
