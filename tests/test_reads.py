"""Quorum reads (kvd.node.reads): the object from R replicas, a digest from the others;
a failed data read replaced by another replica's; read repair of a replica that was asked
only for its digest."""

from __future__ import annotations

import pytest
import trio

from kvd import versions
from kvd.errors import QuorumFailed, Unavailable
from kvd.node.coordinator import Coordinator
from kvd.node.replica import Role


class Recorder:
    """A replica holding ``obj`` that records what it was asked."""

    role = Role.PRIMARY
    stands_for: str | None = None

    def __init__(self, node: str, obj: versions.VersionedObject | None,
                 error: Exception | None = None):
        self.node = node
        self.obj = obj
        self.error = error
        self.calls: list[str] = []
        self.merged: list[versions.VersionedObject] = []

    async def get(self, key: bytes) -> versions.VersionedObject | None:
        self.calls.append("get")
        await trio.sleep(0.01)
        if self.error is not None:
            raise self.error
        return self.obj

    async def digest(self, key: bytes) -> bytes | None:
        self.calls.append("digest")
        await trio.sleep(0.01)
        if self.error is not None:
            raise self.error
        return None if self.obj is None else versions.object_digest(self.obj)

    async def merge(self, key: bytes, obj: versions.VersionedObject) -> None:
        self.merged.append(obj)
        self.obj = obj if self.obj is None else versions.sync(self.obj, obj)


def _coordinator(nursery, replicas, read_repair=True) -> Coordinator:
    return Coordinator(lambda key, n: replicas, lambda key, n, failed=(): replicas, nursery,
                       request_timeout=5.0, read_repair=read_repair, replica_timeout=1.0)


def _object(actor: str, value: bytes, base=None) -> versions.VersionedObject:
    obj, _ = versions.update(base or versions.empty(), {}, actor, value=value)
    return obj


async def test_r_replicas_are_asked_for_the_object_and_the_others_for_a_digest(autojump_clock):
    obj = _object("n1:1", b"v")
    replicas = [Recorder(f"n{i}", obj) for i in (1, 2, 3)]
    async with trio.open_nursery() as nursery:
        result = await _coordinator(nursery, replicas).get(b"k", n=3, r=2)
        await trio.sleep(2)  # read repair looked at the late answer: nothing to repair
    assert result.obj == obj and result.replicas == 2
    assert [r.calls for r in replicas] == [["get"], ["get"], ["digest"]]
    assert not any(r.merged for r in replicas)


async def test_a_failed_data_read_is_replaced_by_a_replica_asked_for_its_digest(autojump_clock):
    obj = _object("n1:1", b"v")
    replicas = [Recorder("n1", obj), Recorder("n2", None, Unavailable("shutting down")),
                Recorder("n3", obj)]
    async with trio.open_nursery() as nursery:
        coordinator = _coordinator(nursery, replicas)
        result = await coordinator.get(b"k", n=3, r=2)
        assert result.obj == obj and result.replicas == 2
        assert replicas[2].calls == ["digest", "get"]
        replicas[2].error = Unavailable("gone too")
        with pytest.raises(QuorumFailed, match="n2: shutting down"):
            await coordinator.get(b"k", n=3, r=2)


async def test_a_stale_replica_asked_only_for_its_digest_is_repaired(autojump_clock):
    old = _object("n1:1", b"old")
    new = _object("n1:1", b"new", base=old)
    replicas = [Recorder("n1", new), Recorder("n2", new), Recorder("n3", old),
                Recorder("n4", None)]
    async with trio.open_nursery() as nursery:
        coordinator = _coordinator(nursery, replicas)
        result = await coordinator.get(b"k", n=4, r=2)
        await trio.sleep(2)
    assert result.obj == new
    assert replicas[2].calls == ["digest"] and replicas[3].calls == ["digest"]
    assert replicas[2].merged == [new] and replicas[3].merged == [new]  # stale and missing
    assert not replicas[0].merged and not replicas[1].merged
    assert coordinator.read_repairs == 2
