"""The checksums of blob files (kvd.storage.blobs): the ``.sum`` file beside each blob holds,
for every BLOCK of it, the block's crc32 and length (8 bytes, little-endian; length 0: not
recorded yet). Standard library only: kvd.backup checks blobs with it as it copies them."""

from __future__ import annotations

import struct
import zlib

BLOCK = 64 * 1024  # bytes per checksummed block: 8 bytes of .sum per 64 KiB of blob
SUM = struct.Struct("<II")  # a block's crc32 and length; length 0: not recorded yet


def block_sums(data) -> bytes:
    """The .sum entries of the whole blocks of ``data`` (which starts at a block boundary)."""
    view = memoryview(data)
    return b"".join(SUM.pack(zlib.crc32(view[at : at + BLOCK]), BLOCK)
                    for at in range(0, len(view) - BLOCK + 1, BLOCK))


def first_mismatch(sums: bytes, start: int, data) -> int | None:
    """The offset of the first block of ``data`` (read from ``start``, a block boundary)
    that differs from its entry in ``sums`` (the entries from that block on); None when
    every recorded block matches. A block shorter than recorded (a file cut) differs."""
    view = memoryview(data)
    for i, (crc, length) in enumerate(SUM.iter_unpack(sums[: len(sums) - len(sums) % SUM.size])):
        block = view[i * BLOCK : i * BLOCK + length]
        if length and (len(block) < length or zlib.crc32(block) != crc):
            return start + i * BLOCK
    return None
