"""Every knob of the kvd daemon, its default and its reason, in one place.

The configuration is one flat, table-less TOML file. Flat keys keep the file, the
environment (``KVD_<KEY>``), the command-line flags (``--key``) and the man page
(kvd.toml(5), generated from the field descriptions below) one-to-one.

Rules this module keeps:

1. Precedence is defaults < TOML file < environment < flags (DESIGN section 7).
2. Types are strict: ``n = "three"`` is an error, never a silent coercion. The only widening
   is an integer where a float is expected (``sync_interval = 2``).
3. Every failure is a :class:`~kvd.errors.ConfigError` whose message is ONE line naming the
   source (file path, ``KVD_*`` variable or ``--flag``), the key and the problem.
4. A node never binds a non-loopback address without a cluster secret (DESIGN section 7).
5. Secret contents are never read here; only their paths are known and shown.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import socket
import sys
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from kvd.address import AddressError, is_loopback_host, parse_address
from kvd.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised only on Python 3.10
    import tomli as tomllib

__all__ = [
    "Config",
    "ENV_PREFIX",
    "format_config",
    "load_config",
    "unknown_env_vars",
]

ENV_PREFIX = "KVD_"
KIB = 1024
MIB = 1024 * KIB

_NODE_ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
# Source label of a value nobody set; such errors are reported without a source prefix.
_DEFAULT = "default"
_SOURCE_RANK = {"default": 0, "file": 1, "env": 2, "flag": 3}


class _KeyedError(ValueError):
    """A cross-field problem; ``keys[0]`` is the key reported, all keys pick the source."""

    def __init__(self, message: str, *keys: str) -> None:
        super().__init__(message)
        self.keys = keys


def _is_wildcard(host: str) -> bool:
    return host in ("0.0.0.0", "::")


class Config(BaseModel):
    """The effective configuration of one kvd node.

    Construct it directly in tests (``Config(data_dir=str(tmp_path))``) or with
    :func:`load_config` from a file, the environment and flags.
    """

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        allow_inf_nan=False,
        validate_assignment=True,
        validate_default=True,
    )

    # Where each value came from ("default", "file:<path>", "env:KVD_X", "flag:--x").
    _sources: dict[str, str] = PrivateAttr(default_factory=dict)

    # --- identity and addresses -------------------------------------------------------------
    node_id: str = Field(
        default_factory=socket.gethostname,
        description=(
            "Name of this node in the cluster, 1..64 characters of [A-Za-z0-9._-]. It must "
            "be unique and stable: it owns partitions and appears in version vectors. "
            "Defaults to the host name."
        ),
    )
    listen: str = Field(
        default="127.0.0.1:7379",
        description=(
            "HOST:PORT where clients (kvctl, the client library) connect; IPv6 as "
            "[::1]:7379. Loopback by default so a fresh install exposes nothing; a "
            "non-loopback address requires cluster_secret_file."
        ),
    )
    peer_listen: str = Field(
        default="127.0.0.1:7380",
        description=(
            "HOST:PORT where other nodes connect for replication, gossip and transfers. "
            "This is the address seeds and `kvctl cluster join` name. A non-loopback "
            "address requires cluster_secret_file so peers must authenticate."
        ),
    )
    metrics_listen: str = Field(
        default="127.0.0.1:7381",
        description=(
            "HOST:PORT of the plain-text metrics endpoint (Prometheus format); empty "
            "disables it. It is a bind like the others, so a non-loopback address requires "
            "cluster_secret_file too."
        ),
    )
    resp_listen: str = Field(
        default="",
        description=(
            "HOST:PORT of the Redis-protocol (RESP2/RESP3) front door, for redis-cli, "
            "redis-benchmark and Redis client libraries; empty (the default) disables it. "
            "7382 sits beside kvd's other ports and clear of a local Redis's 6379. Same "
            "coordinator, tokens (AUTH), TLS, connection caps and timeouts as `listen`; "
            "without client_tokens_file it must be loopback, as Redis's protected mode."
        ),
    )
    data_dir: str = Field(
        default="/var/lib/kvd",
        description=(
            "Directory holding the LevelDB store, hints and the node's identity. One daemon "
            "per directory: a second one refuses to start."
        ),
    )
    seeds: list[str] = Field(
        default_factory=list,
        description=(
            "Peer addresses (HOST:PORT) of existing members, contacted at start-up and "
            "sometimes by gossip so that partitioned groups find each other again. Empty "
            "(or only this node's own peer address) for the first node of a cluster: a new "
            "node with seeds is in no cluster, and serves no data, until `kvctl cluster "
            "join` adds it."
        ),
    )

    # --- security ---------------------------------------------------------------------------
    cluster_secret_file: str | None = Field(
        default=None,
        description=(
            "Path of a file holding the shared cluster secret for the HMAC "
            "challenge-response on peer connections. Required to bind any non-loopback "
            "address. Only the path is ever printed; keep the file mode 0600."
        ),
    )
    client_tokens_file: str | None = Field(
        default=None,
        description=(
            "Path of a TOML file of named client tokens with roles, e.g. "
            "`[tokens]` / `ops = { token = \"...\", role = \"admin\" }` (roles read, "
            "write, admin; tokens of at least 16 characters; file mode 0600). When set, "
            "every client must present a token. Unset: clients are accepted only from "
            "loopback addresses."
        ),
    )
    tls_cert_file: str | None = Field(
        default=None,
        description=(
            "PEM certificate (chain) of this node. With tls_key_file, both the client and "
            "the peer port speak TLS only; plain-TCP connections are refused."
        ),
    )
    tls_key_file: str | None = Field(
        default=None,
        description="PEM private key of tls_cert_file; keep the file mode 0600.",
    )
    tls_ca_file: str | None = Field(
        default=None,
        description=(
            "PEM CA bundle that signed the nodes' certificates. With TLS on, peers verify "
            "each other against it (both ways); unset: the system's CAs, and the peer port "
            "does not ask for client certificates."
        ),
    )

    # --- placement and quorums --------------------------------------------------------------
    ring_size: int = Field(
        default=1024,
        ge=8,
        le=65536,
        description=(
            "Number of partitions Q, a power of two 8..65536. Used only when this node "
            "creates a cluster; it can never change afterwards. Pick about 10..50 "
            "partitions per node at the largest planned cluster size. Each partition a node "
            "replicates costs it 8 KiB of memory (its anti-entropy tree) once written: "
            "with N=3 on three nodes, 8 MiB at 1024 and 512 MiB at 65536."
        ),
    )
    n: int = Field(
        default=3,
        ge=1,
        le=16,
        description=(
            "Default number of replicas of each key (N), 1..16. While the ring has fewer "
            "nodes than N, N, R and W (these defaults and those of a request) are capped at "
            "its number of nodes, so a one-node cluster accepts writes with one replica."
        ),
    )
    r: int = Field(
        default=2,
        ge=1,
        le=16,
        description=(
            "Default read quorum (R), 1..n: replies a GET waits for. R + W > N makes "
            "reads see the latest acknowledged write when no node is down."
        ),
    )
    w: int = Field(
        default=2,
        ge=1,
        le=16,
        description=(
            "Default write quorum (W), 1..n: replicas that must have a PUT on disk before "
            "it is acknowledged."
        ),
    )

    # --- storage ----------------------------------------------------------------------------
    sync: Literal["batch", "periodic", "none"] = Field(
        default="batch",
        description=(
            "When writes reach the disk. batch: concurrent writes are group committed "
            "with one fsync before they are acknowledged (durable). periodic: fsync every "
            "sync_interval seconds (a crash loses up to that much). none: leave it to the "
            "OS (tests only)."
        ),
    )
    sync_interval: float = Field(
        default=1.0,
        gt=0,
        description="Seconds between fsyncs when sync = \"periodic\".",
    )
    cache_mb: int = Field(
        default=64,
        ge=0,
        description=(
            "LevelDB block cache in MiB. Hot keys are served from it; the OS page cache "
            "does the rest, so leave most RAM to the OS."
        ),
    )
    chunk_size: int = Field(
        default=1 * MIB,
        ge=64 * KIB,
        description=(
            "Values larger than this many bytes are stored and streamed as chunks with a "
            "manifest, so memory stays bounded for values up to 1 GiB. 64 KiB..max_frame."
        ),
    )

    # --- network limits and timeouts --------------------------------------------------------
    max_frame: int = Field(
        default=4 * MIB,
        ge=64 * KIB,
        le=64 * MIB,
        description=(
            "Largest frame body in bytes accepted after authentication (before it the "
            "limit is a fixed 16 KiB). Bounds the memory one connection can claim. "
            "64 KiB..64 MiB."
        ),
    )
    max_connections: int = Field(
        default=1024,
        ge=1,
        description=(
            "Most connections open at once on each of the client and peer ports, "
            "authenticated or not. When only authenticated connections fill a port, a new "
            "one is refused (\"too many connections\"). kvd raises its descriptor limit "
            "(RLIMIT_NOFILE) to the hard limit at start and lowers this, with a warning, if "
            "the ports would not leave half the descriptors to LevelDB plus 256 spare."
        ),
    )
    max_pending_connections: int = Field(
        default=128,
        ge=1,
        description=(
            "Most connections per port that have not completed the handshake (HELLO and "
            "authentication) yet. When full, the oldest such connection that has sent "
            "nothing at all is closed to make room for the new one (as HAProxy and nginx "
            "evict the oldest), so idle sockets cannot lock clients or peers out; ones that "
            "have started their handshake are closed only when the port is full."
        ),
    )
    max_pending_per_address: int = Field(
        default=32,
        ge=1,
        description=(
            "Most connections from one source address per port that have not completed the "
            "handshake; a new one from that address closes its oldest silent one."
        ),
    )
    member_reserved_connections: int = Field(
        default=64,
        ge=0,
        description=(
            "Connections of the peer port kept for the addresses of known members (the "
            "member table's peer addresses and the seeds): other addresses can fill only "
            "max_connections minus this, and members' unauthenticated connections have this "
            "many slots of their own. At most half of max_connections (a larger value set "
            "is refused; the default is lowered to half)."
        ),
    )
    handshake_timeout: float = Field(
        default=5.0,
        gt=0,
        description=(
            "Seconds a new connection has to complete the handshake and authenticate "
            "before it is closed, so half-open or idle unauthenticated sockets are not "
            "kept."
        ),
    )
    idle_timeout: float = Field(
        default=300.0,
        gt=0,
        description="Seconds without any frame after which a connection is closed.",
    )
    request_timeout: float = Field(
        default=10.0,
        gt=0,
        description=(
            "Seconds a coordinator waits for R or W replicas before answering that the "
            "quorum was not reached."
        ),
    )
    replica_timeout: float = Field(
        default=1.0,
        gt=0,
        description=(
            "Seconds a coordinator waits for one replica's answer to one request before "
            "counting that replica as failed for the request (Dynamo's local failure "
            "view): it mints on the next primary or keeps a hint at once instead of "
            "waiting for the failure detector. Replicas answer in milliseconds; 1 s leaves "
            "room for a loaded disk's fsync. A replica that has not answered within a hedge "
            "delay (4 typical mint times, at least 50 ms) is asked last, and another is asked "
            "besides, until it answers. At most request_timeout."
        ),
    )

    # --- membership -------------------------------------------------------------------------
    gossip_interval: float = Field(
        default=1.0,
        gt=0,
        description=(
            "Seconds between gossip rounds (and heartbeats). At the default phi_threshold "
            "a stopped node is judged down about 6 s after its last heartbeat at 1 s, and "
            "still about 5 s at 0.2 s: the failure detector allows for a second of jitter "
            "whatever the interval. Lower costs more peer traffic for a little faster "
            "detection; phi_threshold trades detection time against false alarms."
        ),
    )
    phi_threshold: float = Field(
        default=8.0,
        gt=0,
        description=(
            "Phi accrual suspicion level above which a peer is marked down. 8 means about "
            "one false suspicion in 10^8 heartbeats under normal jitter; raise it on noisy "
            "networks."
        ),
    )

    # --- repair -----------------------------------------------------------------------------
    hinted_handoff: bool = Field(
        default=True,
        description=(
            "Let fallback nodes accept writes for down replicas and deliver them later "
            "(sloppy quorum), keeping the store writeable during failures."
        ),
    )
    hint_window: float = Field(
        default=10800.0,
        gt=0,
        description=(
            "Seconds (default 3 h) a hint is kept for a down node. Past it the hint is "
            "dropped and anti-entropy restores the data, so a long outage cannot fill the "
            "disks of the other nodes. Plus request_timeout, it must be shorter than "
            "tombstone_grace, so no hint outlives a tombstone purge it could undo."
        ),
    )
    read_repair: bool = Field(
        default=True,
        description=(
            "After answering a GET, write the merged object back to replicas that "
            "returned stale or missing versions."
        ),
    )
    anti_entropy: bool = Field(
        default=True,
        description=(
            "Continuously compare hash trees with the other replicas and repair "
            "differences in the background. Turning it off also stops tombstone removal."
        ),
    )
    anti_entropy_interval: float = Field(
        default=60.0,
        gt=0,
        description="Seconds between anti-entropy exchanges of one partition with its peers.",
    )
    tombstone_grace: float = Field(
        default=86400.0,
        ge=0,
        description=(
            "Seconds (default 1 day) a tombstone is kept, counted on each node's own clock "
            "from when that node stored it, so clock skew between nodes never shortens it; "
            "it is purged only once every replica holds it, so a delete cannot be undone by "
            "a replica that was away. Must exceed hint_window + request_timeout: no hint or "
            "replica write can arrive later."
        ),
    )

    # --- transfers --------------------------------------------------------------------------
    transfer_limit: int = Field(
        default=2,
        ge=1,
        description=(
            "Most partition transfers (handoffs) this node runs at once, in or out, so "
            "rebalancing does not starve client traffic."
        ),
    )
    transfer_rate_mb: float = Field(
        default=50.0,
        gt=0,
        description=("Throttle, in MiB/s, for the partitions this node fetches: a "
                     "transition's transfers and the refill of a wiped or restored node. Set "
                     "it on the nodes that receive; a sender is not throttled, and neither is "
                     "anti-entropy repair (paced by anti_entropy_interval)."),
    )
    reclaim_rate: int = Field(
        default=5000,
        ge=1,
        description=(
            "Keys per second deleted in the background from partitions this node no longer "
            "replicates (dropped at once when their handoff completes, so this only bounds "
            "the disk work of freeing their space)."
        ),
    )

    # --- logging ----------------------------------------------------------------------------
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        default="info",
        description="Least severe log level written to stderr (journald under systemd).",
    )

    # --- per-field rules --------------------------------------------------------------------

    @field_validator("node_id")
    @classmethod
    def _check_node_id(cls, v: str) -> str:
        if not _NODE_ID_RE.match(v):
            raise ValueError(f"expected 1..64 characters of [A-Za-z0-9._-], got {v!r}")
        return v

    @field_validator("listen", "peer_listen")
    @classmethod
    def _check_address(cls, v: str) -> str:
        parse_address(v)
        return v

    @field_validator("metrics_listen", "resp_listen")
    @classmethod
    def _check_optional_address(cls, v: str) -> str:
        if v:
            parse_address(v)
        return v

    @field_validator("seeds")
    @classmethod
    def _check_seeds(cls, v: list[str]) -> list[str]:
        for i, seed in enumerate(v):
            try:
                parse_address(seed, to_dial=True)
            except AddressError as e:
                raise ValueError(f"seed {i + 1}: {e}") from None
        return v

    @field_validator("data_dir")
    @classmethod
    def _check_data_dir(cls, v: str) -> str:
        if not v:
            raise ValueError("must not be empty")
        return v

    @field_validator("cluster_secret_file", "client_tokens_file", "tls_cert_file",
                     "tls_key_file", "tls_ca_file", mode="before")
    @classmethod
    def _empty_path_is_unset(cls, v: Any) -> Any:
        # "" lets an environment variable or flag unset a path the file sets.
        return None if v == "" else v

    @field_validator("ring_size")
    @classmethod
    def _check_ring_size(cls, v: int) -> int:
        if v & (v - 1):
            raise ValueError(f"must be a power of two, got {v}")
        return v

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower_log_level(cls, v: Any) -> Any:
        return v.lower() if isinstance(v, str) else v

    # --- cross-field rules ------------------------------------------------------------------

    @model_validator(mode="after")
    def _check_cross_fields(self) -> Config:
        if self.r > self.n:
            raise _KeyedError(f"r ({self.r}) must not exceed n ({self.n})", "r", "n")
        if self.w > self.n:
            raise _KeyedError(f"w ({self.w}) must not exceed n ({self.n})", "w", "n")
        if self.replica_timeout > self.request_timeout:
            raise _KeyedError(
                f"replica_timeout ({self.replica_timeout}) must not exceed request_timeout "
                f"({self.request_timeout})",
                "replica_timeout",
                "request_timeout",
            )
        # The default (64) is lowered for a small max_connections, here so that `kvd
        # --check` prints the value in use (set through __dict__: an assignment would
        # validate the model again); a value set is refused instead.
        if "member_reserved_connections" not in self.model_fields_set:
            self.__dict__["member_reserved_connections"] = min(
                self.member_reserved_connections, self.max_connections // 2)
        elif self.member_reserved_connections > self.max_connections // 2:
            raise _KeyedError(
                f"member_reserved_connections ({self.member_reserved_connections}) must be at "
                f"most half of max_connections ({self.max_connections})",
                "member_reserved_connections",
                "max_connections",
            )
        if self.chunk_size > self.max_frame:
            raise _KeyedError(
                f"chunk_size ({self.chunk_size}) must not exceed max_frame ({self.max_frame})",
                "chunk_size",
                "max_frame",
            )
        # A write reaches a replica at most request_timeout after it was sent (kvd.net.peer:
        # TCP_USER_TIMEOUT), a hint at most hint_window after it was stored; one arriving
        # after its key's tombstone was purged would bring the deleted key back.
        late = self.request_timeout + (self.hint_window if self.hinted_handoff else 0.0)
        if late >= self.tombstone_grace:
            named = (["hint_window", "request_timeout"] if self.hinted_handoff
                     else ["request_timeout"])
            raise _KeyedError(
                f"{' + '.join(f'{n} ({getattr(self, n):g} s)' for n in named)} must be "
                f"shorter than tombstone_grace ({self.tombstone_grace:g} s): a write delivered "
                "after its key's tombstone is purged would bring the deleted key back",
                *named,
                "tombstone_grace",
            )
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise _KeyedError(
                "tls_cert_file and tls_key_file must be set together", "tls_cert_file",
                "tls_key_file",
            )
        if self.tls_ca_file is not None and self.tls_cert_file is None:
            raise _KeyedError("tls_ca_file needs tls_cert_file and tls_key_file",
                              "tls_ca_file", "tls_cert_file")
        binds = [("listen", self.listen), ("peer_listen", self.peer_listen)]
        if self.metrics_listen:
            binds.append(("metrics_listen", self.metrics_listen))
        if self.resp_listen:
            binds.append(("resp_listen", self.resp_listen))
            if (self.client_tokens_file is None
                    and not is_loopback_host(parse_address(self.resp_listen)[0])):
                raise _KeyedError(
                    f"resp_listen {self.resp_listen} is not loopback: set client_tokens_file "
                    "so Redis clients must AUTH (as Redis's protected mode)",
                    "resp_listen", "client_tokens_file")
        if self.cluster_secret_file is None:
            for key, addr in binds:
                if not is_loopback_host(parse_address(addr)[0]):
                    raise _KeyedError(
                        f"{key} {addr} is not loopback: set cluster_secret_file so peers "
                        "must authenticate",
                        key,
                        "cluster_secret_file",
                    )
        for i, (key_a, addr_a) in enumerate(binds):
            host_a, port_a = parse_address(addr_a)
            for key_b, addr_b in binds[i + 1 :]:
                host_b, port_b = parse_address(addr_b)
                if port_a == port_b != 0 and (
                    host_a == host_b or _is_wildcard(host_a) or _is_wildcard(host_b)
                ):
                    raise _KeyedError(
                        f"{key_b} {addr_b} collides with {key_a} {addr_a}", key_b, key_a
                    )
        return self

    # --- views ------------------------------------------------------------------------------

    def __eq__(self, other: object) -> bool:
        # Equal settings are equal configs, wherever the values came from.
        if not isinstance(other, Config):
            return NotImplemented
        return self.model_dump() == other.model_dump()

    __hash__ = None  # type: ignore[assignment]  # mutable, like every pydantic model

    def source(self, key: str) -> str:
        """Where the value of ``key`` came from: ``default``, a file path, ``KVD_X`` or
        ``--x``."""
        return _source_label(self._sources.get(key, _DEFAULT))

    def redacted(self) -> dict[str, Any]:
        """The effective configuration as a plain dict, safe to print or log.

        Secret-bearing settings are file paths, and only the paths appear here: this never
        opens them. A future field that holds a secret itself must be masked here.
        """
        return self.model_dump()


def format_config(config: Config) -> str:
    """Render ``config.redacted()`` as TOML ``key = value`` lines (loadable with --config).

    Unset optional keys appear as comments; values not at their default say where they came
    from in a trailing comment.
    """
    lines = []
    for key, value in config.redacted().items():
        source = config.source(key)
        note = "" if source == _DEFAULT else f"  # {source}"
        if value is None:
            lines.append(f"# {key} is not set")
        else:
            lines.append(f"{key} = {_toml_value(value)}{note}")
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # JSON strings are TOML basic strings
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot render {type(value).__name__} as TOML")


# --- loading ---------------------------------------------------------------------------------


def load_config(
    path: str | None,
    env: Mapping[str, str],
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Build the effective Config: defaults < TOML file ``path`` < ``KVD_*`` in ``env`` <
    ``overrides`` (from flags; keys are field names, ``None`` values are ignored, string
    values for non-string fields are converted as environment values are).

    Raises ConfigError with a one-line message naming the source and the key.
    """
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}

    if path is not None:
        for key, value in _read_toml(path).items():
            if key not in Config.model_fields:
                raise ConfigError(f"{path}: unknown key {key!r}{_suggest(key)}")
            values[key] = value
            sources[key] = f"file:{path}"

    for key in Config.model_fields:
        var = ENV_PREFIX + key.upper()
        if var in env:
            values[key] = _from_text(key, env[var], var)
            sources[key] = f"env:{var}"

    for key, value in (overrides or {}).items():
        if value is None:
            continue
        flag = "--" + key.replace("_", "-")
        if key not in Config.model_fields:
            raise ConfigError(f"{flag}: unknown setting {key!r}")
        if isinstance(value, str):
            value = _from_text(key, value, flag)
        values[key] = value
        sources[key] = f"flag:{flag}"

    try:
        config = Config(**values)
    except ValidationError as e:
        raise ConfigError(_one_line(e, sources)) from None
    config._sources = sources
    # Checked here rather than in Config so that tests can build a Config without files;
    # only existence is checked, the contents are the server's business.
    for key in ("cluster_secret_file", "client_tokens_file", "tls_cert_file", "tls_key_file",
                "tls_ca_file"):
        file = getattr(config, key)
        if file is not None and not os.path.isfile(file):
            where = _source_label(sources.get(key, _DEFAULT))
            raise ConfigError(f"{where}: {key}: no such file {file}")
    return config


def unknown_env_vars(env: Mapping[str, str]) -> list[str]:
    """``KVD_*`` variables in ``env`` that match no key (likely typos), sorted."""
    known = {ENV_PREFIX + key.upper() for key in Config.model_fields}
    return sorted(k for k in env if k.startswith(ENV_PREFIX) and k not in known)


def _read_toml(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"missing config file {path}") from None
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not valid UTF-8 at byte {e.start}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from None


def _from_text(key: str, text: str, source: str) -> Any:
    """Convert an environment or flag string by the type of field ``key``."""
    annotation = Config.model_fields[key].annotation
    stripped = text.strip()
    if annotation is bool:
        lowered = stripped.lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{source}: {key}: expected true or false, got {text!r}")
    if annotation is int:
        try:
            return int(stripped)
        except ValueError:
            raise ConfigError(f"{source}: {key}: expected an integer, got {text!r}") from None
    if annotation is float:
        try:
            return float(stripped)
        except ValueError:
            raise ConfigError(f"{source}: {key}: expected a number, got {text!r}") from None
    if annotation == list[str]:
        return [item.strip() for item in text.split(",") if item.strip()]
    return text


def _source_label(source: str) -> str:
    return source.partition(":")[2] or source


def _source_rank(source: str) -> int:
    return _SOURCE_RANK[source.partition(":")[0]]


def _one_line(error: ValidationError, sources: Mapping[str, str]) -> str:
    """Turn the first pydantic error into ``<source>: <key>: <problem>``."""
    err = error.errors()[0]
    loc = err["loc"]
    exc = err.get("ctx", {}).get("error")
    if isinstance(exc, _KeyedError):
        source = max((sources.get(k, _DEFAULT) for k in exc.keys), key=_source_rank)
        message = str(exc)
    else:
        key = str(loc[0]) if loc else "config"
        source = sources.get(key, _DEFAULT)
        where = key + "".join(f"[{part}]" for part in loc[1:])
        message = f"{where}: {_problem(err)}"
    if source != _DEFAULT:
        message = f"{_source_label(source)}: {message}"
    return " ".join(message.split("\n"))


_EXPECTED = {
    "int_type": "an integer",
    "float_type": "a number",
    "bool_type": "true or false",
    "string_type": "a string",
    "list_type": "an array of strings",
}


def _problem(err: Mapping[str, Any]) -> str:
    kind = err["type"]
    ctx = err.get("ctx", {})
    got = _describe(err.get("input"))
    if kind in _EXPECTED:
        return f"expected {_EXPECTED[kind]}, got {got}"
    if kind == "literal_error":
        return f"expected one of {ctx.get('expected')}, got {got}"
    if kind == "greater_than_equal":
        return f"must be at least {ctx['ge']}, got {got}"
    if kind == "greater_than":
        return f"must be greater than {ctx['gt']}, got {got}"
    if kind == "less_than_equal":
        return f"must be at most {ctx['le']}, got {got}"
    if kind == "finite_number":
        return f"must be a finite number, got {got}"
    if kind == "value_error" and "error" in ctx:
        return str(ctx["error"])
    return str(err["msg"])


def _describe(value: Any) -> str:
    """Name a TOML value the way an operator wrote it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    if value is None:
        return "nothing"
    return f"a {type(value).__name__}"


def _suggest(key: str) -> str:
    close = difflib.get_close_matches(key, Config.model_fields, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""
