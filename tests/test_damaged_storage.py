"""A replica whose disk rots (outside tester, damaged storage): the bytes LevelDB keeps are
checked against its block checksums when read, so a damaged copy is never served nor
merged into the healthy ones; it answers as a failed replica would, the others answer,
and a write or a read repair replaces it. Real LevelDB files, bits flipped in them."""

from __future__ import annotations

import os
from pathlib import Path

import plyvel
import pytest
import trio

from kvd.client import open_client
from kvd.errors import KvdError
from kvd.storage import open_storage
from kvd.storage.base import DamagedData
from tests.realcluster import SMALL_RING, form_cluster, key_of, wait_states


def flip_a_bit_in(directory: Path, needles: list[bytes]) -> list[bytes]:
    """Flip one bit inside each of ``needles`` where a table (.ldb) of the LevelDB in
    ``directory`` holds it; returns those found. Opening the store first turns its log into
    a table, as LevelDB does at every start."""
    plyvel.DB(str(directory)).close()
    found = []
    for table in sorted(directory.glob("*.ldb")):
        data = bytearray(table.read_bytes())
        for needle in needles:
            at = data.find(needle)
            if at >= 0:
                data[at + len(needle) // 2] ^= 0x10
                found.append(needle)
        table.write_bytes(bytes(data))
    return found


async def test_a_damaged_copy_is_refused_naming_its_key_and_can_be_replaced(tmp_path):
    values = {b"key-%03d" % i: os.urandom(48) for i in range(200)}  # incompressible
    async with open_storage(str(tmp_path / "db")) as storage:
        await storage.write(list(values.items()))
    damaged = flip_a_bit_in(tmp_path / "db", [values[b"key-071"]])
    assert damaged, "the value's bytes were not found in a table"
    async with open_storage(str(tmp_path / "db")) as storage:
        with pytest.raises(DamagedData, match="damaged.*checksum"):
            storage.get(b"key-071", checked=True)
        assert storage.get(b"key-150", checked=True) == values[b"key-150"]  # another block
        await storage.write([(b"key-071", b"a good copy")])  # a repair replaces it
        assert storage.get(b"key-071", checked=True) == b"a good copy"


@pytest.mark.slow
async def test_a_replica_with_rotted_bytes_never_spreads_them(tmp_path, procs):
    """Before: read through the rotted node, the damaged copy met a healthy one with the
    same dot, and 'keeping one by a fixed order' kept the damaged bytes about half the time
    and wrote them onto the healthy replicas (all three then agreed on the wrong value)."""
    n1, n2, n3 = await form_cluster(tmp_path, procs, SMALL_RING)
    nodes = [n1, n2, n3]
    values = {key_of(i, "rot"): os.urandom(64) for i in range(40)}
    async with open_client(n1.address) as client:
        for key, value in values.items():
            await client.put(key, value, w=3)
    assert n3.stop() == 0
    damaged_values = flip_a_bit_in(n3.data_dir, list(values.values())[:12])
    damaged = [key for key, value in values.items() if value in damaged_values]
    assert len(damaged) >= 8, "too few values found in n3's tables to damage"
    n3.start()
    await wait_states(nodes, {"n1": "UN", "n2": "UN", "n3": "UN"}, nodes)

    async def read_all(node, r):
        wrong = {}
        async with open_client(node.address) as client:
            for key in damaged:
                got = [s.value for s in (await client.get(key, r=r)).siblings]
                if got != [values[key]]:
                    wrong[key] = got
        return wrong

    assert await read_all(n3, 2) == {}, "a damaged copy was served"
    with trio.fail_after(30):  # read repair rewrites n3's copies: then every replica answers
        while True:
            try:
                if await read_all(n1, 3) == {}:
                    break
            except KvdError:  # n3 answered with its damaged copy, not yet replaced
                pass
            await trio.sleep(0.5)
    assert await read_all(n3, 3) == {}
    assert "Traceback" not in n3.log_text()
    assert "damaged" in n3.log_text()
