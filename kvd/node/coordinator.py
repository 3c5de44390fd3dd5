"""The request coordinator: quorum reads and writes over a key's replicas.

Any node coordinates any request. For a write it (1) streams a large value's chunks to every
target replica, (2) asks one replica (itself when it is one) to mint the new version, so dots
are only ever minted by a replica that holds the key's history, (3) merges that version into
the other replicas, and answers once W replicas hold it durably. For a read it asks every
replica, answers after R replies with their merge, then repairs the replicas that were stale.

Requests keep running on the remaining replicas after the answer (Dynamo's behaviour): the
background work lives in the node's nursery, not the request's.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass

import trio

from kvd import versions
from kvd.errors import BadRequest, KvdError, QuorumFailed, TooManySiblings
from kvd.node.replica import Replica

log = logging.getLogger("kvd.coordinator")

MAX_VALUE = 1 << 30  # 1 GiB, DESIGN section 2


@dataclass
class ReadResult:
    obj: versions.VersionedObject | None
    replicas: int  # how many replicas answered before we replied
    source: Replica | None  # a replica holding every chunk of obj's chunked siblings


@dataclass
class WriteResult:
    obj: versions.VersionedObject
    replicas: int


class Coordinator:
    """Quorum logic over whatever replicas ``replicas_for`` names for a key."""

    def __init__(
        self,
        read_replicas: Callable[[bytes, int], Sequence[Replica]],
        write_replicas: Callable[[bytes, int], Sequence[Replica]],
        background: trio.Nursery,
        request_timeout: float,
        read_repair: bool = True,
    ):
        self.read_replicas = read_replicas
        self.write_replicas = write_replicas
        self.background = background
        self.request_timeout = request_timeout
        self.read_repair = read_repair
        self.read_repairs = 0

    async def _quorum(
        self,
        replicas: Sequence[Replica],
        call: Callable[[Replica], Awaitable],
        needed: int,
    ) -> tuple[list[tuple[Replica, object]], list[tuple[Replica, BaseException]], object]:
        """Run ``call`` on every replica; return once ``needed`` succeeded or all finished.

        Calls still running when we return go on in the background nursery; their outcomes
        arrive later on the returned channel (read repair waits for them).
        """
        send, receive = trio.open_memory_channel(len(replicas))

        async def one(replica: Replica) -> None:
            try:
                with trio.fail_after(self.request_timeout):
                    result = await call(replica)
            except (KvdError, trio.TooSlowError, OSError) as exc:
                send.send_nowait((replica, False, exc))
            except Exception as exc:  # a bug: keep the node up, log it once
                log.exception("replica call to %s failed", replica.node)
                send.send_nowait((replica, False, exc))
            else:
                send.send_nowait((replica, True, result))

        for replica in replicas:
            self.background.start_soon(one, replica)
        ok: list = []
        failed: list = []
        with trio.move_on_after(self.request_timeout + 1):
            while len(ok) < needed and len(ok) + len(failed) < len(replicas):
                replica, success, value = await receive.receive()
                (ok if success else failed).append((replica, value))
        return ok, failed, receive

    async def get(self, key: bytes, n: int, r: int) -> ReadResult:
        replicas = self.read_replicas(key, n)
        if len(replicas) == 1 and r == 1:
            # One replica: no fan-out, no background task (the single-node hot path).
            obj = await replicas[0].get(key)
            return ReadResult(obj, 1, _chunk_source(obj, [(replicas[0], obj)]))
        ok, failed, late = await self._quorum(replicas, lambda rep: rep.get(key), r)
        if len(ok) < r:
            raise QuorumFailed(_quorum_message("read", r, ok, failed))
        merged = None
        for _, obj in ok:
            if obj is not None:
                merged = obj if merged is None else versions.sync(merged, obj)
        source = _chunk_source(merged, ok)
        if self.read_repair and merged is not None:
            outstanding = len(replicas) - len(ok) - len(failed)
            self.background.start_soon(self._repair, key, merged, dict(ok), late, outstanding)
        return ReadResult(merged, len(ok), source)

    async def _repair(self, key, merged, answered, late, outstanding: int) -> None:
        """After answering, wait for the replicas that had not answered yet, merge their
        versions in too, and write the result back to every replica that was stale."""
        with trio.move_on_after(self.request_timeout):
            for _ in range(outstanding):
                replica, success, value = await late.receive()
                if success:
                    answered[replica] = value
                    if value is not None:
                        merged = versions.sync(merged, value)
        if any(s.chunks is not None for s in merged.siblings):
            return  # large values are repaired by anti-entropy, which streams chunks
        for replica, obj in answered.items():
            if obj != merged:
                try:
                    with trio.fail_after(self.request_timeout):
                        await replica.merge(key, merged)
                    self.read_repairs += 1
                except (KvdError, trio.TooSlowError, OSError) as exc:
                    log.info("read repair of %r on %s failed: %s", key[:64], replica.node, exc)

    async def put(
        self,
        key: bytes,
        context: versions.VersionVector,
        n: int,
        w: int,
        *,
        value: bytes = b"",
        deleted: bool = False,
        length: int = 0,
        chunks: AsyncIterator[bytes] | None = None,
        timestamp: float = 0.0,
        vid: bytes = b"",
    ) -> WriteResult:
        """Write a value (inline, or streamed from ``chunks``) or a tombstone at quorum W."""
        replicas = list(self.write_replicas(key, n))
        if length > MAX_VALUE:
            raise BadRequest(f"value of {length} bytes exceeds the 1 GiB limit")
        payload: dict = {"deleted": deleted, "timestamp": timestamp}
        if chunks is None:
            payload["value"] = value
            minted, others = await self._mint(key, context, payload, replicas, w)
        else:
            try:
                targets, count = await self._stream_chunks(key, vid, length, chunks, replicas, w)
                payload["chunks"] = versions.ChunkRef(vid=vid, length=length, count=count)
                minted, others = await self._mint(key, context, payload, targets, w)
            except BaseException:
                # No manifest references this upload anywhere: its chunks are garbage.
                for replica in replicas:
                    self.background.start_soon(self._discard_upload, replica, key, vid)
                raise
        hints = [rep for rep in others if getattr(rep, "role", "") == "hint"]
        others = [rep for rep in others if rep not in hints]
        for hint in hints:  # local and durable before we answer; not counted towards W
            await hint.merge(key, minted)
        ok, failed = [], []
        if others:
            ok, failed, _ = await self._quorum(others, lambda rep: rep.merge(key, minted), w - 1)
        acks = 1 + len(ok)
        if acks < w:
            raise QuorumFailed(_quorum_message("write", w, [None] * acks, failed))
        return WriteResult(minted, acks)

    async def _mint(self, key, context, payload, replicas, w):
        """Have the first replica that can mint the new version; return it and the others."""
        errors: list[tuple[Replica, BaseException]] = []
        for index, replica in enumerate(replicas):
            if getattr(replica, "role", "primary") != "primary":
                continue  # fallbacks hold hints; only a replica with the key's history mints
            try:
                with trio.fail_after(self.request_timeout):
                    minted = await replica.coordinate(key, context, payload)
            except (TooManySiblings, BadRequest):
                raise  # no other replica would accept it either
            except (KvdError, trio.TooSlowError, OSError) as exc:
                errors.append((replica, exc))
                continue
            return minted, replicas[:index] + replicas[index + 1 :]
        raise QuorumFailed(_quorum_message("write", w, [], errors))

    async def _discard_upload(self, replica, key, vid) -> None:
        try:
            with trio.fail_after(self.request_timeout):
                await replica.discard_upload(key, vid)
        except (KvdError, trio.TooSlowError, OSError) as exc:
            log.info("could not discard failed upload on %s: %s", replica.node, exc)

    async def _stream_chunks(self, key, vid, length, chunks, replicas, w):
        """Send each chunk to every replica in order; keep those that stored them all."""
        alive = list(replicas)
        count = 0
        received = 0
        async for data in chunks:
            offset = received
            received += len(data)
            if received > length:
                raise BadRequest(f"value is longer than the declared {length} bytes")
            ok, failed, _ = await self._quorum(
                alive, lambda rep: rep.write_chunk(key, vid, offset, data), len(alive)
            )
            for replica, exc in failed:
                log.info("replica %s dropped from upload of %r: %s", replica.node, key[:64], exc)
            alive = [rep for rep, _ in ok]
            if len(alive) < w:
                raise QuorumFailed(_quorum_message("write", w, ok, failed))
            count += 1
        if received != length:
            raise BadRequest(f"value ended after {received} of {length} declared bytes")
        return alive, count


def _chunk_source(merged, ok) -> Replica | None:
    """A replica whose object includes every chunked sibling of the merged object."""
    if merged is None:
        return None
    wanted = {s.dot for s in merged.siblings if s.chunks is not None}
    if not wanted:
        return None
    for replica, obj in ok:
        if obj is not None and wanted <= {s.dot for s in obj.siblings}:
            return replica
    return None


def _quorum_message(kind: str, needed: int, ok: Sequence, failed: Sequence) -> str:
    reasons = "; ".join(f"{rep.node}: {exc}" for rep, exc in failed if rep is not None)
    text = f"{kind} quorum not reached: {len(ok)} of {needed} required replicas answered"
    return f"{text} ({reasons})" if reasons else text


