"""What a node checks about its data directory before it serves from it: that only kvd can
read it, that no `kvd restore` into it was left unfinished, and that it was created for
this node (its identity).

They run once at start-up, before anything else touches the data: a data directory others
may enter is refused, and so is one created for another node, so a misconfigured node never
serves another's replicas. `kvd --check` runs the ones that need no open store (``check``),
with the same lines and exit codes, and creates or changes nothing.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import msgpack

from kvd.errors import ConfigError, KvdError
from kvd.node.dot_leases import first_lease, lease_key
from kvd.storage import keys
from kvd.storage.base import DamagedData

log = logging.getLogger("kvd.server")


def make_private(data_dir: str) -> None:
    """Make kvd's files its own, whatever umask it was started with (issue 10, hole 5): the
    process umask becomes 077, so LevelDB and blob files are created 0600 and directories
    0700, and a new data_dir is created 0700. An existing one that others may enter, or
    its group may write, is refused (``check_private``)."""
    os.umask(0o077)  # process-wide on purpose: LevelDB creates files as it compacts
    check_private(data_dir)
    try:
        os.makedirs(data_dir, mode=0o700, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"data_dir {data_dir}: {exc.strerror}") from None


def check_private(data_dir: str) -> None:
    """ConfigError (one line, exit 2) when ``data_dir`` exists and is not a directory only
    kvd may enter, as PostgreSQL refuses its data directory; 0750 is accepted (the package's
    StateDirectoryMode, for a backup group). A data_dir not there yet passes: start-up
    creates it 0700. Creates and changes nothing. docs/DECISIONS.md, "The data directory
    is private"."""
    try:
        info = os.stat(data_dir)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise ConfigError(f"data_dir {data_dir}: {exc.strerror}") from None
    if not stat.S_ISDIR(info.st_mode):
        raise ConfigError(f"data_dir {data_dir} is not a directory")
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o027:
        raise ConfigError(
            f"data_dir {data_dir} is accessible by {'others' if mode & 0o007 else 'its group'}"
            f" (mode {mode:04o}): run chmod -R go-rwx {data_dir}")


def check(data_dir: str) -> None:
    """Every refusal of ``data_dir`` start-up makes before it opens the store, made without
    creating or changing anything (`kvd --check`): ConfigError (exit 2) or KvdError (1)."""
    check_private(data_dir)
    refuse_unfinished_restore(data_dir)


# Written by `kvd restore` before its first record, removed after its last (kvd.backup
# Rule 2): a directory holding it is a partial copy that would serve damaged data.
RESTORE_MARKER = "RESTORE-INCOMPLETE"


def refuse_unfinished_restore(data_dir: str) -> None:
    """KvdError (exit 1) when a `kvd restore` into ``data_dir`` failed or was killed."""
    if os.path.exists(os.path.join(data_dir, RESTORE_MARKER)):
        raise KvdError(f"data_dir {data_dir} holds an unfinished kvd restore "
                       f"({RESTORE_MARKER}): wipe it and run kvd restore again")


@dataclass
class Identity:
    """Who this data directory belongs to. ``actor`` names the dots this node mints; its
    incarnation part changes when the data directory is recreated, so a wiped node never
    mints a dot it already minted before the wipe."""

    node: str
    incarnation: str
    created: float

    @property
    def actor(self) -> str:
        return f"{self.node}:{self.incarnation}"


async def load_identity(storage, node_id: str, wall: float) -> Identity:
    """This data directory's identity, created on first use; ConfigError when it was
    created for another node. A new incarnation when the durable high-water mark of the
    node's dot counters may be lost (kvd.node.local Rule 6): LevelDB dropped part of its log
    at open, or the mark's record is gone (one is written with every identity). The old
    actor could otherwise mint a dot it minted before."""
    raw = storage.get(keys.meta_key("identity"))
    if raw is not None:
        with damaged_record("identity"):
            identity = Identity(**msgpack.unpackb(raw, raw=False))
        if identity.node != node_id:
            raise ConfigError(
                f"data_dir belongs to node {identity.node!r}, not {node_id!r}: "
                "use that node_id or a fresh data_dir"
            )
        lost = ("the write-ahead log was damaged" if storage.lost_log_records
                else "the record of its dot counters is missing"
                if storage.get(lease_key(identity.actor)) is None else None)
        if lost is None:
            return identity
        log.warning("%s: node %s mints under a new incarnation, so no version it made "
                    "before is made again", lost, node_id)
    identity = Identity(node_id, os.urandom(4).hex(), wall)
    await storage.write([
        (keys.meta_key("identity"), msgpack.packb(identity.__dict__, use_bin_type=True)),
        first_lease(identity.actor),
    ])
    return identity


@contextmanager
def damaged_record(name: str) -> Iterator[None]:
    """Decoding one of the node's own records: what garbage raises (msgpack's errors are
    ValueErrors) becomes one line naming the record, not a traceback at start."""
    try:
        yield
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise DamagedData(
            f"this node's {name} record in its data_dir is damaged ({exc!r:.100}): empty the "
            "data_dir to start the node afresh; it then fetches its data from the other "
            "replicas") from None
