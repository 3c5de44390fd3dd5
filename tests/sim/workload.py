"""The simulator's workload and the history it records (Jepsen style).

Clients pick a random coordinator for every operation and record each outcome as
``ok`` (acknowledged), ``fail`` (a definite error: nothing was acknowledged, though the write
may still have landed somewhere) or ``unknown`` (timed out or connection lost).

Kinds of key:
- ``u/…`` unique keys, each written once with a value derived from its name; some values are
  larger than ``chunk_size`` so they take the chunked path.
- ``h/…`` a few hot keys under read-modify-write: read (value and context), add one element
  to the set the value holds, write with the context. Concurrent writers make siblings; the
  next reader merges them (set union), so siblings stay bounded by the writers.
- ``d/…`` keys written, then deleted with the context of that write.
- ``s/…`` blind writes (no context) from every client: an object with many siblings.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import trio

from kvd.errors import ConnectFailed, KvdError

HOT_KEYS = 3
BIG = 150_000  # bytes: above the simulator's 64 KiB chunk_size


def unique_value(key: bytes) -> bytes:
    """The only value ever written to unique key ``key`` (big ones repeat a pattern)."""
    size = BIG if key.endswith(b"/big") else 32
    return (key + b"|") * (size // (len(key) + 1) + 1)


def decode_set(value: bytes) -> set[bytes]:
    return {e for e in value.split(b",") if e}


def encode_set(elements: set[bytes]) -> bytes:
    return b",".join(sorted(elements))


@dataclass
class History:
    """What clients did and what they were told."""

    unique: dict[bytes, str] = field(default_factory=dict)  # key -> ok | fail | unknown
    # hot key -> element -> outcome
    elements: dict[bytes, dict[bytes, str]] = field(default_factory=dict)
    deletes: dict[bytes, str] = field(default_factory=dict)  # key -> outcome of its delete
    blind: dict[bytes, int] = field(default_factory=dict)  # sibling key -> writes attempted
    blind_elements: dict[bytes, set[bytes]] = field(default_factory=dict)  # key -> values tried
    max_writers: dict[bytes, int] = field(default_factory=dict)  # hot key -> most writers at once
    latencies: list[float] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=lambda: {"ok": 0, "fail": 0, "unknown": 0})

    def record(self, outcome: str, seconds: float) -> None:
        self.counts[outcome] += 1
        self.latencies.append(seconds)


class Workload:
    def __init__(self, sim, seed: int, clients: int = 4, think: tuple[float, float] = (0.05, 0.6),
                 op_timeout: float = 15.0) -> None:
        self.sim = sim
        self.rng = random.Random(f"workload/{seed}")
        self.clients = clients
        self.think = think
        self.op_timeout = op_timeout
        self.history = History()
        self._writing: dict[bytes, int] = {}
        self.stop = trio.Event()

    async def run(self, duration: float) -> None:
        """Run every client until ``duration`` simulated seconds have passed."""
        with trio.move_on_after(duration):
            async with trio.open_nursery() as nursery:
                for c in range(self.clients):
                    nursery.start_soon(self._client, c, random.Random(self.rng.random()))
        self.stop.set()

    async def _client(self, c: int, rng: random.Random) -> None:
        source = self.sim.client_address()
        for i in range(10**9):
            await trio.sleep(rng.uniform(*self.think))
            running = self.sim.members()
            if not running:
                continue
            coordinator = rng.choice(sorted(n.name for n in running))
            roll = rng.random()
            if roll < 0.45:
                big = rng.random() < 0.08
                key = f"u/{c}/{i}".encode() + (b"/big" if big else b"")
                await self._op(source, coordinator, self._put_unique, key)
            elif roll < 0.8:
                key = f"h/{rng.randrange(HOT_KEYS)}".encode()
                await self._op(source, coordinator, self._add_element, key, f"{c}.{i}".encode())
            elif roll < 0.92:
                await self._op(source, coordinator, self._write_then_delete, f"d/{c}/{i}".encode())
            else:
                key = f"s/{rng.randrange(2)}".encode()
                self.history.blind[key] = self.history.blind.get(key, 0) + 1
                self.history.blind_elements.setdefault(key, set()).add(f"{c}.{i}".encode())
                await self._op(source, coordinator, self._blind, key, f"{c}.{i}".encode())

    async def _op(self, source: str, coordinator: str, fn, *args) -> None:
        """Run one client operation; its own function records what it was told."""
        start = trio.current_time()
        outcome = "unknown"
        try:
            with trio.fail_after(self.op_timeout):
                async with self.sim.open_client(coordinator, source) as client:
                    outcome = await fn(client, *args)
        except (trio.TooSlowError, _Unknown):
            outcome = "unknown"  # the write was sent: it may have landed
        except KvdError:
            outcome = "fail"  # refused, or failed before anything was written
        self.history.record(outcome, trio.current_time() - start)

    async def _put_unique(self, client, key: bytes) -> str:
        self.history.unique[key] = "unknown"  # from here on it may land
        outcome = await _write(client.put(key, unique_value(key)))
        self.history.unique[key] = outcome
        return outcome

    async def _add_element(self, client, key: bytes, element: bytes) -> str:
        result = await client.get(key)
        seen: set[bytes] = set()
        for sibling in result.siblings:
            if not sibling.deleted:
                seen |= decode_set(sibling.value)
        elements = self.history.elements.setdefault(key, {})
        elements[element] = "unknown"
        writers = self._writing[key] = self._writing.get(key, 0) + 1
        self.history.max_writers[key] = max(self.history.max_writers.get(key, 0), writers)
        try:
            outcome = await _write(client.put(key, encode_set(seen | {element}),
                                              context=result.context or None))
        finally:
            self._writing[key] -= 1
        elements[element] = outcome
        return outcome

    async def _write_then_delete(self, client, key: bytes) -> str:
        put = await client.put(key, b"doomed")
        self.history.deletes[key] = "unknown"
        outcome = await _write(client.delete(key, context=put.context))
        self.history.deletes[key] = outcome
        return outcome

    async def _blind(self, client, key: bytes, element: bytes) -> str:
        return await _write(client.put(key, element, blind=True))


async def _write(call) -> str:
    """``ok``, or ``fail`` on a definite error; timeouts and lost connections propagate to
    ``Workload._op``, which records them as ``unknown``."""
    try:
        await call
    except ConnectFailed:
        raise _Unknown() from None
    except KvdError:
        return "fail"
    return "ok"


class _Unknown(ConnectFailed):
    """A write whose connection broke after it was sent: it may or may not have landed."""
