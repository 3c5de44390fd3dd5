"""The Replica protocol (kvd/node/replica.py) guards what issue 11 names: a local hint store
that implemented two of the replica calls, whose missing ones failed at run time and were
taken for a down replica. mypy (`make typecheck`) now rejects such a stand-in, and a call
that fails with anything but KvdError or OSError is a bug the coordinator does not swallow.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from kvd import versions
from kvd.errors import QuorumFailed, RemoteProtocolError, Unavailable
from kvd.node.coordinator import Coordinator
from kvd.node.remote import RemoteReplica
from kvd.node.replica import Role

ROOT = Path(__file__).resolve().parent.parent

STAND_INS = '''
from kvd import versions
from kvd.node.replica import LocalReplica, Replica, Role


class HalfHintStore:
    """Keeps hints, but answers only two of the calls a coordinator makes."""

    node = "n1"
    role = Role.FALLBACK
    stands_for: str | None = "n2"

    async def get(self, key: bytes) -> versions.VersionedObject | None:
        return None

    async def merge(self, key: bytes, obj: versions.VersionedObject) -> None:
        return None


class WholeHintStore(LocalReplica):
    """A stand-in with every call (LocalReplica's), as kvd.node.routing's is."""

    role = Role.FALLBACK


def write_replicas(whole: WholeHintStore) -> list[Replica]:
    return [whole, HalfHintStore()]
'''


def test_the_type_check_rejects_a_stand_in_that_lacks_replica_calls(tmp_path):
    api = pytest.importorskip("mypy.api")
    module = tmp_path / "stand_ins.py"
    module.write_text(STAND_INS)
    out, err, status = api.run([str(module), "--config-file", str(ROOT / "pyproject.toml"),
                                "--cache-dir", str(ROOT / ".mypy_cache")])
    assert status == 1, (out, err)
    errors = [line for line in out.splitlines() if ": error:" in line]
    assert len(errors) == 1, out  # the whole one passes
    assert 'incompatible type "HalfHintStore"; expected "Replica"' in errors[0], out


class _Holder:
    """A replica that holds ``obj`` and answers reads."""

    role = Role.PRIMARY
    stands_for: str | None = None

    def __init__(self, node: str, obj: versions.VersionedObject | None = None,
                 error: Exception | None = None):
        self.node = node
        self.obj = obj
        self.error = error

    async def get(self, key: bytes) -> versions.VersionedObject | None:
        if self.error is not None:
            raise self.error
        return self.obj

    async def digest(self, key: bytes) -> bytes | None:
        if self.error is not None:
            raise self.error
        return None if self.obj is None else versions.object_digest(self.obj)


def _coordinator(nursery: trio.Nursery, replicas: list) -> Coordinator:
    return Coordinator(lambda key, n: replicas, lambda key, n, failed=(): replicas, nursery,
                       request_timeout=5.0, read_repair=False)


async def test_a_replica_that_fails_a_call_counts_as_failed_for_the_quorum():
    obj, _ = versions.update(versions.empty(), {}, "n1:1", value=b"v")
    async with trio.open_nursery() as nursery:
        coordinator = _coordinator(nursery, [_Holder("n1", obj),
                                             _Holder("n2", error=Unavailable("shutting down"))])
        assert (await coordinator.get(b"k", n=2, r=1)).obj == obj
        with pytest.raises(QuorumFailed, match="n2: shutting down"):
            await coordinator.get(b"k", n=2, r=2)


class _HalfHintStore:
    """Keeps hints, but lacks ``get``, which the coordinator calls on each replica it reads."""

    node = "n2"
    role = Role.FALLBACK
    stands_for = "n3"

    async def merge(self, key: bytes, obj: versions.VersionedObject) -> None:
        return None


async def test_a_bug_in_a_replica_call_is_raised_not_taken_for_a_failed_replica():
    obj, _ = versions.update(versions.empty(), {}, "n1:1", value=b"v")
    with pytest.raises(BaseExceptionGroup) as raised:
        async with trio.open_nursery() as nursery:
            coordinator = _coordinator(nursery, [_Holder("n1", obj), _HalfHintStore()])
            await coordinator.get(b"k", n=2, r=2)
    assert raised.group_contains(AttributeError, match="'_HalfHintStore' object has no attribute")


class _Answering:
    """A peer pool whose every call is answered with ``reply``."""

    frame_budget = 32 << 10

    def __init__(self, reply: dict):
        self.reply = reply

    async def call(self, address: str, kind, fields: dict, expect) -> dict:
        return self.reply


async def test_an_object_a_peer_could_not_have_encoded_is_its_protocol_error():
    # A KvdError, so the coordinator, anti-entropy and handoff take that peer as failed
    # for this call (before, decode_object's ValueError escaped them as a bug).
    peer = RemoteReplica("n2", "127.0.0.1:1", _Answering({"object": b"not an object"}))
    with pytest.raises(RemoteProtocolError, match="n2 sent b'k' as malformed object"):
        await peer.get(b"k")
