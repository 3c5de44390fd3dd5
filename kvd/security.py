"""Authentication and authorisation: the cluster secret, client tokens, roles, TLS contexts.

The handshake (kvd.proto.handshake) asks this module whom a HELLO is from (``Security.
authorize``); kvd.net.guarded asks it what a connection's role may do. It holds the token
lookup, the role rules, the loading of secret-bearing files, and the refusal log.

Invariants:

- Rule 1: secret material (the cluster secret, tokens, private keys) never appears in a log
  line, an error message or ``repr``. Messages name files and token *names*, never values.
- Rule 2: a secret-bearing file that group or others may read is refused at start-up, with
  one line saying which file and how to fix it (``chmod 600``).
- Rule 3: peer authentication (mutual, replay-proof HMAC challenge-response on the cluster
  secret) and the authenticated records after it (this module's rule 6 before) are
  kvd.proto.handshake's rules 5 to 8.
- Rule 4: comparisons of proofs and tokens are constant-time (``hmac.compare_digest``).
- Rule 5: without a cluster secret, peers are accepted unauthenticated (loopback-only dev
  clusters, DESIGN section 7); without client tokens, clients are accepted only from
  loopback addresses.
- Rule 7: refusals are aggregated, never dropped from view (``Refusals``): every one is
  counted by reason (the ``kvd_refusals_total`` metric and a summary line per
  ``REFUSAL_LOG_INTERVAL``), and an address's first refusal is logged at once, so a flood
  of forged names from a few addresses cannot hide a new node with a wrong secret. Memory
  and log lines per interval are bounded whatever the flood.
- Rule 8: client contexts are sealed with ``context_key``, derived from the cluster secret,
  so every node verifies what any other minted and nobody without the secret can forge one
  (kvd.versions). Without a secret the key is public: contexts are then checked, not
  authenticated, which protects nothing less than the unauthenticated peer port already
  gives away on such a loopback-only cluster (docs/DECISIONS.md).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import ssl
import stat
import sys
from collections import OrderedDict
from dataclasses import dataclass

import trio

from kvd.address import is_loopback_host
from kvd.errors import ConfigError, Unauthorized
from kvd.proto.codec import Message
from kvd.proto.messages import MsgType

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = [
    "Grant",
    "PEER",
    "ROLES",
    "Refusals",
    "Security",
    "TokenTable",
    "allows",
    "check_private_file",
    "context_key",
    "load_secret",
    "load_tokens",
    "required_role",
]

log = logging.getLogger("kvd.security")

MIN_SECRET = 16
MIN_TOKEN = 16
# Client roles, weakest first; "peer" is what an authenticated node gets: everything.
ROLES = ("read", "write", "admin")
PEER = "peer"
_RANK = {"read": 1, "write": 2, "admin": 3, PEER: 4}
# Refusal logging (rule 7): each address's first refusal is logged at once, at most
# NEW_HOSTS_LOGGED new addresses per interval; every refusal is counted by reason, and a
# summary line per interval gives the counts and the first EXAMPLES of each reason.
REFUSAL_LOG_INTERVAL = 60.0
NEW_HOSTS_LOGGED = 10
EXAMPLES = 3
REMEMBERED_HOSTS = 4096  # addresses already logged, least recently seen forgotten first
MAX_REASONS = 32  # distinct reasons counted (metric labels); later ones count as "other"
MAX_WINDOW_HOSTS = 10_000  # distinct addresses counted per reason per interval

# ADMIN operations that only look; every other operation changes the cluster.
_READ_ONLY_ADMIN = frozenset({"ring", "transfers", "plan", "keys"})
_REQUIRED = {
    MsgType.GET: "read",
    MsgType.STATUS: "read",
    MsgType.INSPECT: "read",
    MsgType.PING: "read",
    MsgType.PUT: "write",
    MsgType.DELETE: "write",
}


# --------------------------------------------------------------------------- files


def check_private_file(path: str, key: str) -> None:
    """Refuse (ConfigError, one line) a secret-bearing file that group or others may read
    or write, or that is not a regular file."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise ConfigError(f"{key} {path}: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"{key} {path}: not a regular file")
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        raise ConfigError(
            f"{key} {path} is accessible by group or others (mode {mode:04o}): "
            f"run chmod 600 {path}"
        )


def _read_private(path: str, key: str) -> bytes:
    check_private_file(path, key)
    try:
        with open(path, "rb") as f:
            return f.read(1 << 20)
    except OSError as exc:
        raise ConfigError(f"{key} {path}: {exc.strerror}") from None


def load_secret(path: str) -> bytes:
    """The cluster secret: the file's bytes without surrounding whitespace."""
    secret = _read_private(path, "cluster_secret_file").strip()
    if len(secret) < MIN_SECRET:
        raise ConfigError(
            f"cluster_secret_file {path}: the secret must be at least {MIN_SECRET} bytes "
            f"(e.g. head -c 32 /dev/urandom | base64 > {path})"
        )
    return secret


@dataclass(frozen=True)
class Grant:
    """What a connection was allowed in its handshake: a name for logs and a role."""

    name: str
    role: str

    def allows(self, needed: str) -> bool:
        return allows(self.role, needed)


class TokenTable:
    """Client tokens by SHA-256 digest: token -> Grant. Values are never kept in clear."""

    def __init__(self, entries: dict[str, Grant]):
        self._by_digest = {_digest(token): grant for token, grant in entries.items()}

    def __len__(self) -> int:
        return len(self._by_digest)

    def __repr__(self) -> str:
        return f"TokenTable({len(self)} tokens)"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TokenTable) and other._by_digest == self._by_digest

    def lookup(self, token: object) -> Grant | None:
        if not isinstance(token, str) or not token:
            return None
        wanted = _digest(token)
        found = None
        for digest, grant in self._by_digest.items():  # constant-time over the table
            if hmac.compare_digest(digest, wanted):
                found = grant
        return found


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


def load_tokens(path: str) -> TokenTable:
    """Parse a client tokens file (TOML)::

        [tokens]
        ops     = { token = "...", role = "admin" }
        app     = { token = "...", role = "write" }
        grafana = { token = "...", role = "read" }

    Names are for logs and error messages; tokens must be unique and at least 16
    characters. Errors name the file and the token's name, never its value.
    """
    raw = _read_private(path, "client_tokens_file")
    try:
        doc = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"client_tokens_file {path}: not valid UTF-8") from None
    except tomllib.TOMLDecodeError as exc:
        # The decoder's message gives a position and a kind of problem, not the text.
        raise ConfigError(f"client_tokens_file {path}: invalid TOML: {exc}") from None
    extra = sorted(set(doc) - {"tokens"})
    if extra:
        raise ConfigError(f"client_tokens_file {path}: unknown table {extra[0]!r}, "
                          "expected only [tokens]")
    tokens = doc.get("tokens")
    if not isinstance(tokens, dict) or not tokens:
        raise ConfigError(f"client_tokens_file {path}: no [tokens] entries")
    entries: dict[str, Grant] = {}
    for name, entry in tokens.items():
        where = f"client_tokens_file {path}: token {name!r}"
        if not isinstance(entry, dict) or set(entry) != {"token", "role"}:
            raise ConfigError(
                f"{where}: expected {{ token = \"...\", role = \"read|write|admin\" }}")
        token, role = entry["token"], entry["role"]
        if role not in ROLES:
            raise ConfigError(f"{where}: role must be one of read, write, admin")
        if not isinstance(token, str) or len(token) < MIN_TOKEN:
            raise ConfigError(
                f"{where}: the token must be a string of at least {MIN_TOKEN} characters")
        if token in entries:
            raise ConfigError(f"{where}: same token as {entries[token].name!r}")
        entries[token] = Grant(name, role)
    return TokenTable(entries)


# --------------------------------------------------------------------------- roles


def allows(role: str, needed: str) -> bool:
    """Whether ``role`` may do what needs ``needed`` (read < write < admin < peer)."""
    return _RANK.get(role, 0) >= _RANK[needed]


def required_role(kind: MsgType, fields: dict) -> str:
    """The least role a request of type ``kind`` needs on the client port."""
    needed = _REQUIRED.get(kind)
    if needed is not None:
        return needed
    op = fields.get("op")
    if kind == MsgType.ADMIN and isinstance(op, str) and op in _READ_ONLY_ADMIN:
        return "read"
    return "admin"  # ADMIN, and anything a client port does not expect


# --------------------------------------------------------------------------- contexts


def context_key(secret: bytes | None) -> bytes:
    """The key that seals client contexts (rule 8): HMAC-SHA256 of the secret over a label
    of its own, so it is independent of the handshake proofs; public without a secret."""
    return hmac.new(secret or b"", b"kvd-context-key-v1", hashlib.sha256).digest()


# --------------------------------------------------------------------------- TLS


def _server_context(cert: str, key: str, ca: str | None,
                    require_client_cert: bool) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_chain(context, cert, key)
    if require_client_cert and ca:
        try:
            context.load_verify_locations(cafile=ca)
        except (OSError, ssl.SSLError) as exc:
            reason = getattr(exc, "reason", None) or exc.strerror or "not a PEM CA bundle"
            raise ConfigError(f"tls_ca_file {ca}: cannot load: {reason}") from None
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def _load_chain(context: ssl.SSLContext, cert: str, key: str) -> None:
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        reason = getattr(exc, "reason", None) or exc.strerror or "bad certificate or key"
        raise ConfigError(f"tls_cert_file {cert} / tls_key_file {key}: cannot load: {reason}"
                          ) from None


def client_context(ca: str | None = None, cert: str | None = None,
                   key: str | None = None) -> ssl.SSLContext:
    """A TLS context for connecting: verifies the server against ``ca`` (or the system's
    CAs) and its host name; presents ``cert``/``key`` when given (peers do)."""
    try:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"tls_ca_file {ca}: cannot load: {exc}") from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert and key:
        _load_chain(context, cert, key)
    return context


# --------------------------------------------------------------------------- the daemon's view


class Security:
    """What one node enforces, loaded once at start-up from its config."""

    def __init__(self, secret: bytes | None = None, tokens: TokenTable | None = None,
                 client_tls: ssl.SSLContext | None = None,
                 peer_tls: ssl.SSLContext | None = None,
                 peer_client_tls: ssl.SSLContext | None = None):
        self.secret = secret
        self.tokens = tokens
        self.client_tls = client_tls
        self.peer_tls = peer_tls
        self.peer_client_tls = peer_client_tls
        self.context_key = context_key(secret)
        self.refused = 0
        self.refusals = Refusals()

    def __repr__(self) -> str:
        return (f"Security(secret={'set' if self.secret else 'none'}, tokens={self.tokens!r}, "
                f"tls={'on' if self.client_tls else 'off'})")

    @classmethod
    def from_config(cls, config) -> "Security":
        """Load the secret, tokens and TLS material the config names (ConfigError, one
        line, on any problem: missing, unreadable, too open, malformed)."""
        secret = load_secret(config.cluster_secret_file) if config.cluster_secret_file else None
        tokens = load_tokens(config.client_tokens_file) if config.client_tokens_file else None
        cert = getattr(config, "tls_cert_file", None)
        key = getattr(config, "tls_key_file", None)
        ca = getattr(config, "tls_ca_file", None)
        client_tls = peer_tls = peer_client_tls = None
        if cert and key:
            check_private_file(key, "tls_key_file")
            client_tls = _server_context(cert, key, ca, require_client_cert=False)
            peer_tls = _server_context(cert, key, ca, require_client_cert=True)
            peer_client_tls = client_context(ca, cert, key)
        return cls(secret, tokens, client_tls, peer_tls, peer_client_tls)

    def note_refusal(self, kind: str, host: str, who: str, reason: str) -> None:
        """Count a refused connection (rule 7); log it if its address is new."""
        self.refused += 1
        self.refusals.note(f"refused {kind} connection", host, who, reason)

    def note(self, what: str, host: str, who: str, reason: str) -> None:
        """Count that ``what`` happened on a connection from ``host`` (rule 7)."""
        self.refusals.note(what, host, who, reason)

    def authenticate_client(self, hello, host: str) -> Grant:
        """The Grant of a client HELLO from ``host``, or Unauthorized (rule 5)."""
        if self.tokens is None:
            if not is_loopback_host(host):
                raise Unauthorized("clients from non-loopback addresses need a token, and "
                                   "this node has no client_tokens_file")
            return Grant("loopback client", "admin")
        token = hello.fields.get("token")
        if not token:
            raise Unauthorized("this node requires a client token (kvctl --token-file FILE)")
        grant = self.tokens.lookup(token)
        if grant is None:
            raise Unauthorized("the client token is not valid")
        return grant

    def authorize(self, role: str, host: str, hello: Message) -> Grant:
        """The Grant of the first HELLO on the ``role`` port from ``host``, or Unauthorized;
        a peer's proof of the secret is the handshake's (kvd.proto.handshake)."""
        if role == PEER:
            return Grant(f"peer {hello.fields.get('node') or ''}", PEER)
        return self.authenticate_client(hello, host)


class _Window:
    """One reason's refusals in the current interval."""

    def __init__(self):
        self.count = 0
        self.hosts: set[str] = set()
        self.examples: list[tuple[str, str]] = []


class Refusals:
    """Refusals aggregated by reason (rule 7): totals for the metric, a window for the
    periodic summary line, and the addresses already logged."""

    def __init__(self):
        self.totals: dict[tuple[str, str], int] = {}  # (what, reason) -> count since start
        self._window: dict[tuple[str, str], _Window] = {}
        self._known: OrderedDict[str, None] = OrderedDict()
        self._new_logged = 0

    def note(self, what: str, host: str, who: str, reason: str) -> None:
        key = (what, _reason_label(reason))
        if key not in self.totals and len(self.totals) >= MAX_REASONS:
            key = (what, "other")
        self.totals[key] = self.totals.get(key, 0) + 1
        window = self._window.setdefault(key, _Window())
        window.count += 1
        if len(window.hosts) < MAX_WINDOW_HOSTS:
            window.hosts.add(host)
        if len(window.examples) < EXAMPLES and all(h != host for h, _ in window.examples):
            window.examples.append((host, who))
        if host in self._known:
            self._known.move_to_end(host)
            return
        self._known[host] = None
        if len(self._known) > REMEMBERED_HOSTS:
            self._known.popitem(last=False)
        if self._new_logged < NEW_HOSTS_LOGGED:
            self._new_logged += 1
            log.warning("%s from %s%s: %s (first from this address; more are counted in the "
                        "refusal summary)", what, host or "an unknown address",
                        f" claiming to be {who}" if who else "", reason)

    def summary(self) -> str | None:
        """The summary line of the interval now ending (None if nothing was refused), and
        a new interval."""
        window, self._window, self._new_logged = self._window, {}, 0
        if not window:
            return None
        parts = []
        for (what, reason), seen in sorted(window.items(), key=lambda kv: -kv[1].count):
            hosts = len(seen.hosts)
            more = "+" if hosts >= MAX_WINDOW_HOSTS else ""
            examples = ", ".join(f"{h or '?'}{' as ' + w if w else ''}" for h, w in seen.examples)
            parts.append(f"{seen.count} {what} ({reason}) from {hosts}{more} "
                         f"address{'es' if hosts != 1 else ''}, e.g. {examples}")
        return "refusals in the last interval: " + "; ".join(parts)

    async def run(self, interval: float = REFUSAL_LOG_INTERVAL) -> None:
        """Log the summary line every ``interval`` seconds while there are refusals."""
        while True:
            await trio.sleep(interval)
            line = self.summary()
            if line:
                log.warning("%s", line)


def _reason_label(reason: str) -> str:
    """A reason without the parts a client chooses (quoted names, numbers): a bounded label."""
    return re.sub(r"'[^']*'|\"[^\"]*\"|\d+", "_", reason)[:100]


def printable(name: object, limit: int = 64) -> str:
    """A peer-supplied name made safe for one log line."""
    text = name if isinstance(name, str) else ""
    return repr(text[:limit]) if text else ""
