"""Hinted handoff: writes held for a down replica, kept durably, delivered when it is back.

A fallback (or the coordinator itself) that accepts a write for a down primary stores it as a
hint (``store``); ``run`` hands hints to their node once the failure detector sees it up.

Invariants:

1. Hints expire. A hint older than ``hint_window`` (by this node's wall clock,
   ``clocks.wall()``) is dropped, whether its node is up, down or removed from the cluster:
   anti-entropy restores what it held, and config validation keeps ``hint_window`` below
   ``tombstone_grace``, so an expired-or-not hint never predates a purge it could undo.
2. No scans on the hot path. The count of hints per node lives in memory, rebuilt by one key
   scan at start and kept by every store and removal; ``pending()`` reads nothing.
   Hint keys sort by seq, which starts at the wall clock in microseconds at each start, so
   within a node's range the oldest hints come first: expiry reads only the expired hints
   and the first live one.
3. Bounded memory. Delivery reads at most ``HINT_BATCH`` hints or ``HINT_BATCH_BYTES`` bytes
   at a time (always at least one hint), delivers them, removes them in one write, and
   yields before the next batch.
4. Chunked values travel whole. The bytes of a chunked sibling reach the fallback before its
   manifest (the coordinator streams them to every target); ``store`` seals them and takes
   them out of the blob ledger in the same batch as the hint, and records one reference per
   hint (``keys.hint_blob_key``). Delivery streams those bytes to the node before the
   manifest. When the last reference goes and no local object names the blob, it is marked
   garbage in the same batch and deleted (LocalStore's ledger rules).
5. One bad hint blocks nothing. A hint the node refuses is kept (retried next round until it
   expires) and delivery goes on with the next; only a failure to reach the node stops the
   round. A hint whose bytes this node no longer has is dropped with a warning.
"""

from __future__ import annotations

import logging

import msgpack
import trio

from kvd import versions
from kvd.errors import ConnectFailed, KvdError, ProtocolError, Unavailable
from kvd.node.local import _GARBAGE, _ledger_key
from kvd.node.remote import RemoteReplica
from kvd.storage import keys
from kvd.storage.base import Op, StorageError

log = logging.getLogger("kvd.handoff")

HINT_BATCH = 128  # hints read and delivered at a time
HINT_BATCH_BYTES = 8 << 20  # stored bytes of the hints of one batch (at least one hint)
SCAN_YIELD = 1024  # keys scanned between checkpoints when counting hints at start

# Failures that mean "the node is not reachable now": stop this round, keep every hint.
_UNREACHABLE = (ConnectFailed, ProtocolError, trio.TooSlowError, OSError)


def _pack(obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def _unpack(data: bytes):
    return msgpack.unpackb(data, raw=False)


def chunked_vids(obj: versions.VersionedObject) -> set[bytes]:
    return {s.chunks.vid for s in obj.siblings if s.chunks is not None}


def _decode(hint_key: bytes, raw: bytes) -> dict:
    """A stored hint; one that cannot be read counts as expired (Rule 5: it must not stop
    the others), and is dropped with a warning."""
    try:
        hint = _unpack(raw)
        versions.decode_object(hint["object"])
        float(hint["at"])
        return hint
    except (ValueError, KeyError, TypeError) as exc:
        return _unreadable(hint_key, exc)


def _unreadable(hint_key: bytes, why) -> dict:
    log.warning("dropping unreadable hint %r: %s", hint_key[:80], why)
    return {"key": b"", "object": versions.encode_object(versions.empty()), "at": 0.0,
            "unreadable": True}


class Handoff:
    """The hints this node holds, by target node."""

    def __init__(self, cluster) -> None:
        self.cluster = cluster
        self.storage = cluster.storage
        self.objects = cluster.store  # the LocalStore: blobs and objects
        self.config = cluster.config
        self.clocks = cluster.clocks
        self._seq = int(self.clocks.wall() * 1e6)
        self._counts: dict[str, int] = {}
        self.delivered = 0
        self.expired = 0
        self._refused: set[bytes] = set()  # hint keys already logged as refused
        self._paused: dict[str, str] = {}  # node -> why delivery to it paused (logged once)
        self._unlisted: set[bytes] = set()  # damaged spans of hints already logged

    def _stepped_over(self, after: bytes, until: bytes) -> None:
        """Hints in a block too damaged to list their keys: never delivered, logged once
        (their writes are on the replicas that acknowledged them: anti-entropy brings
        them to the target)."""
        if after not in self._unlisted:
            self._unlisted.add(after)
            log.error("hints in a block too damaged to list their keys (LevelDB keys %r to "
                      "%r) are stepped over: they are never delivered", after[:80], until[:80])

    async def load(self) -> None:
        """Count the stored hints once (Rule 2); later counts are kept, never scanned."""
        start, stop = keys.hint_space()
        counts: dict[str, int] = {}
        hint_keys = self.storage.iterate_keys_past_damage(start, stop, self._stepped_over)
        for i, hint_key in enumerate(hint_keys):
            target, seq = keys.hint_of(hint_key)
            counts[target] = counts.get(target, 0) + 1
            self._seq = max(self._seq, seq)
            if i % SCAN_YIELD == SCAN_YIELD - 1:
                await trio.lowlevel.checkpoint()
        self._counts = counts

    def pending(self) -> dict[str, int]:
        """{node: hints held for it}, from memory."""
        return dict(self._counts)

    async def keep_for_failed_leg(self, target: str, key: bytes, obj: versions.VersionedObject) -> None:
        """The coordinator's hint for a replica that failed a write (kvd.node.coordinator
        rule 3). Refused when a large value's bytes are not here: delivering its manifest
        alone would fail on the target (anti-entropy repairs that replica instead)."""
        if not all(self.objects.has_value_bytes(s.chunks) for s in obj.siblings if s.chunks is not None):
            raise Unavailable(f"the bytes of a large value of {key[:64]!r} are not on "
                              f"{self.cluster.me}")
        await self.store(target, key, obj)

    async def store(self, target: str, key: bytes, obj: versions.VersionedObject) -> None:
        """Keep ``obj`` durably for ``target`` (Rule 4 for its chunked siblings)."""
        self._seq += 1
        hint_key = keys.hint_key(target, self._seq)
        record = _pack({"key": key, "object": versions.encode_object(obj),
                        "at": self.clocks.wall()})
        ops: list[Op] = [(hint_key, record)]
        for vid in chunked_vids(obj):
            if self.objects.blobs.exists(vid):
                await self.objects.blobs.seal(vid)
                ops += [(_ledger_key(vid), None), (keys.hint_blob_key(vid, hint_key), b"")]
        # Counted before the write: a count too high costs one seek a second, one too low
        # could hide a hint from delivery until the next start.
        self._counts[target] = self._counts.get(target, 0) + 1
        try:
            await self.storage.write(ops)
        except StorageError:  # not applied (a cancelled write may have been)
            self._counts[target] -= 1
            raise

    # ------------------------------------------------------------- delivery

    async def run(self) -> None:
        """Every second: expire old hints of every node, deliver to the nodes that are up."""
        while True:
            await trio.sleep(1.0)
            await self.round()

    async def round(self) -> None:
        for target in sorted(self._counts):
            if not self._counts.get(target):
                self._counts.pop(target, None)
                continue
            await self._expire(target)
            if target != self.cluster.me and self._counts.get(target) and self.cluster.is_up(target):
                try:
                    await self.deliver(target)
                except (KvdError, *_UNREACHABLE) as exc:
                    if self._paused.get(target) != str(exc):  # once, not every second
                        log.info("handoff to %s paused: %s", target, exc)
                    self._paused[target] = str(exc)
                else:
                    self._paused.pop(target, None)

    def _is_expired(self, hint: dict) -> bool:
        return self.clocks.wall() - hint["at"] > self.config.hint_window

    async def _expire(self, target: str) -> None:
        """Drop the expired hints at the head of ``target``'s range (Rule 2: oldest first)."""
        start, stop = keys.hint_range(target)
        while True:
            doomed: list[tuple[bytes, dict]] = []

            def damaged(hint_key: bytes) -> None:
                doomed.append((hint_key, _unreadable(hint_key, "its bytes are damaged")))

            hints = self.storage.iterate_sound(start, stop, damaged, self._stepped_over)
            for hint_key, raw in hints:
                hint = _decode(hint_key, raw)
                if not self._is_expired(hint) or len(doomed) == HINT_BATCH:
                    break
                doomed.append((hint_key, hint))
            if not doomed:
                return
            await self._remove(target, doomed)
            self.expired += len(doomed)
            unreadable = sum(1 for _, hint in doomed if hint.get("unreadable"))
            log.info("dropped %d hints for %s (%d unreadable, %d older than hint_window %.0f s)",
                     len(doomed), target, unreadable, len(doomed) - unreadable,
                     self.config.hint_window)
            if len(doomed) < HINT_BATCH:
                return
            start = doomed[-1][0] + b"\x00"

    def _batch(self, start: bytes, stop: bytes) -> list[tuple[bytes, dict, int]]:
        """Up to HINT_BATCH hints / HINT_BATCH_BYTES bytes from ``start`` (Rule 3)."""
        out: list[tuple[bytes, dict, int]] = []
        size = 0

        def damaged(hint_key: bytes) -> None:  # never delivered: it may carry rotted bytes
            out.append((hint_key, _unreadable(hint_key, "its bytes are damaged"), 0))

        for hint_key, raw in self.storage.iterate_sound(start, stop, damaged,
                                                        self._stepped_over):
            if out and (len(out) == HINT_BATCH or size + len(raw) > HINT_BATCH_BYTES):
                break
            out.append((hint_key, _decode(hint_key, raw), len(raw)))
            size += len(raw)
        return out

    async def deliver(self, target: str) -> None:
        """Hand every hint for ``target`` to it, one bounded batch at a time."""
        replica = RemoteReplica(target, self.cluster.peer_address(target), self.cluster.peers)
        start, stop = keys.hint_range(target)
        delivered = expired = kept = 0
        try:
            while batch := self._batch(start, stop):
                done: list[tuple[bytes, dict]] = []
                old: list[tuple[bytes, dict]] = []
                due: list[tuple[bytes, dict]] = []
                for hint_key, hint, _size in batch:
                    (old if self._is_expired(hint) else due).append((hint_key, hint))
                unreachable: list[BaseException] = []

                async def one(hint_key: bytes, hint: dict) -> None:
                    try:
                        if await self._deliver_one(replica, hint_key, hint):
                            done.append((hint_key, hint))
                    except _UNREACHABLE as exc:
                        unreachable.append(exc)

                # Concurrently, so the node commits the batch in few group commits.
                async with trio.open_nursery() as nursery:
                    for hint_key, hint in due:
                        nursery.start_soon(one, hint_key, hint)
                await self._remove(target, old + done)
                delivered += len(done)
                expired += len(old)
                kept += len(batch) - len(done) - len(old)
                if unreachable:
                    raise unreachable[0]
                start = batch[-1][0] + b"\x00"
                await trio.sleep(0)  # Rule 3: let requests and heartbeats through
        finally:
            self.delivered += delivered
            self.expired += expired
            if delivered or expired:
                log.info("handed off %d hints to %s (%d expired, %d refused and kept)",
                         delivered, target, expired, kept)

    async def _deliver_one(self, replica: RemoteReplica, hint_key: bytes, hint: dict) -> bool:
        """Deliver one hint; False when the node refused it (kept, Rule 5)."""
        key = hint["key"]
        obj = versions.decode_object(hint["object"])
        if await self._merge(replica, hint_key, key, obj, note_refusal=not chunked_vids(obj)):
            return True
        if not chunked_vids(obj):
            return False
        # The node lacks the bytes of a chunked sibling: stream them, then the manifest.
        for ref in (s.chunks for s in obj.siblings if s.chunks is not None):
            with trio.fail_after(self.config.request_timeout):
                if await replica.has_blob(key, ref):
                    continue  # never re-send bytes it has (its sweep would take them)
            if not self.objects.has_value_bytes(ref):
                log.warning("dropping the hint of %r for %s: its value bytes %s are gone",
                            key[:64], replica.node, ref.vid.hex())
                return True
            offset = 0
            async for data in self.objects.read_chunks(key, ref):
                with trio.fail_after(self.config.request_timeout):
                    await replica.write_chunk(key, ref.vid, offset, data)
                offset += len(data)
        return await self._merge(replica, hint_key, key, obj, note_refusal=True)

    async def _merge(self, replica, hint_key: bytes, key: bytes, obj, note_refusal: bool) -> bool:
        """The hint's object merged into its node: True when accepted. Unreachable propagates
        (delivery to that node pauses); a refusal is noted once when ``note_refusal``."""
        try:
            with trio.fail_after(self.config.request_timeout):
                await replica.merge(key, obj)
            return True
        except _UNREACHABLE:
            raise
        except KvdError as exc:
            if note_refusal:
                self._note_refused(hint_key, replica.node, key, exc)
            return False

    def _note_refused(self, hint_key: bytes, node: str, key: bytes, exc: Exception) -> None:
        if hint_key not in self._refused:  # once per hint, not once a second
            self._refused.add(hint_key)
            log.warning("%s refused the hint of %r (kept until it expires): %s", node, key[:64], exc)

    async def _remove(self, target: str, hints: list[tuple[bytes, dict]]) -> None:
        """Remove delivered or expired hints in one write, and the blobs only they named."""
        if not hints:
            return
        ops: list = []
        released: dict[bytes, bytes] = {}  # vid -> key
        for hint_key, hint in hints:
            ops.append((hint_key, None))
            self._refused.discard(hint_key)
            for vid in chunked_vids(versions.decode_object(hint["object"])):
                ops.append((keys.hint_blob_key(vid, hint_key), None))
                released[vid] = hint["key"]
        removed = {k for k, _ in hints}
        garbage = []
        for vid, key in released.items():
            start, stop = keys.hint_blob_range(vid)
            others = {k[len(start):] for k in self.storage.iterate_keys(start, stop)} - removed
            local = self.objects.read(key, damaged_as_missing=True)
            if not others and not (local is not None and vid in chunked_vids(local)):
                garbage.append(vid)
                ops.append((_ledger_key(vid), _GARBAGE))
        await self.storage.write(ops)
        self._counts[target] = max(0, self._counts.get(target, 0) - len(hints))
        if garbage:
            await self.objects._delete_blobs(garbage)

