"""Superseded large values stay while they are being read (kvd.node.local Rule 8).

A GET streams a large value piece by piece, from this node or from a peer that asks for one
piece after another. Deleting the blob as soon as an overwrite superseded it cut those
streams off mid-value (an outside tester saw 14 of 463 reads of 5 MB values dropped while
the key was overwritten). So a superseded blob read in the last ``LINGER`` seconds is held
back, and deleted once nobody has read it for ``LINGER`` seconds. Its ledger entry stays
"garbage" meanwhile, so a crash leaves nothing behind: the start's sweep deletes it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import trio

if TYPE_CHECKING:
    from kvd.node.local import LocalStore

LINGER = 30.0  # seconds without a read before a superseded blob goes
CHECK_EVERY = 5.0  # seconds between looks for held-back blobs now due


class BlobLinger:
    """When each blob was last read, and the superseded ones held back for their readers."""

    def __init__(self, clock: Callable[[], float] = trio.current_time) -> None:
        self.clock = clock
        self._last_read: dict[bytes, float] = {}
        self.held_back: set[bytes] = set()

    def read(self, vid: bytes) -> None:
        self._last_read[vid] = self.clock()

    def hold_back(self, vids: Iterable[bytes]) -> list[bytes]:
        """Of the superseded ``vids``, those to delete now; the ones read lately wait."""
        now = self.clock()
        now_deletable = []
        for vid in vids:
            if now - self._last_read.get(vid, -math.inf) < LINGER:
                self.held_back.add(vid)
            else:
                now_deletable.append(vid)
        return now_deletable

    def due(self) -> list[bytes]:
        """The held-back blobs nobody has read for LINGER seconds (and forget older reads)."""
        now = self.clock()
        self._last_read = {vid: at for vid, at in self._last_read.items() if now - at < LINGER}
        due = [vid for vid in self.held_back if vid not in self._last_read]
        self.held_back.difference_update(due)
        return due


async def delete_when_due(store: LocalStore) -> None:
    """The node's task that deletes held-back blobs once their readers are done."""
    while True:
        await trio.sleep(CHECK_EVERY)
        await store.delete_lingering()
