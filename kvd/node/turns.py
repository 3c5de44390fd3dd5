"""Turns per key: writes of one key that must not overlap take turns, others run freely.

The coordinator's writes without a context read what they supersede, so two of them on
the same key at once would both read the same state and become siblings
(kvd.node.coordinator rule 7). ``KeyTurns.turn(key)`` makes them wait for each other; a key
nobody waits for holds no memory.
"""

from __future__ import annotations

from contextlib import asynccontextmanager

import trio


class KeyTurns:
    """One trio.Lock per key that has a writer, dropped with its last one."""

    def __init__(self) -> None:
        self._locks: dict[bytes, tuple[trio.Lock, list[int]]] = {}  # key -> (lock, [users])

    @asynccontextmanager
    async def turn(self, key: bytes):
        lock, users = self._locks.setdefault(key, (trio.Lock(), [0]))
        users[0] += 1
        try:
            async with lock:
                yield
        finally:
            users[0] -= 1
            if not users[0]:
                del self._locks[key]

    def __len__(self) -> int:
        return len(self._locks)
