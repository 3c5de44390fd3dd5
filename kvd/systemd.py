"""kvd as a systemd service: sd_notify(3) written by hand, the watchdog, SIGHUP reload.

No dependency on libsystemd or python-systemd: the notify protocol is one datagram of
``KEY=VALUE`` lines sent to the AF_UNIX socket named by ``$NOTIFY_SOCKET`` (a path, or an
abstract name written ``@name``). Rules this module keeps:

1. Without ``$NOTIFY_SOCKET`` (not under systemd, or ``Type=simple``) every call is a no-op.
2. Notifying never blocks and never raises: a datagram that cannot be sent is logged once.
3. ``READY=1`` is sent by ``kvd.server.serve`` once the listeners accept connections and the
   ring is loaded; ``STOPPING=1`` by ``kvd.server.run`` when it starts draining.
4. ``WATCHDOG=1`` comes from a trio task every half ``$WATCHDOG_USEC`` (sd_watchdog_enabled(3),
   honouring ``$WATCHDOG_PID``), so an event loop that is blocked stops pinging and systemd
   restarts the service.
5. SIGHUP re-reads the configuration the daemon was started with (file, ``KVD_*``
   environment, flags) and applies the keys in ``RELOADABLE``; every other key that changed is
   named in one warning line saying it needs a restart. A bad file changes nothing.
6. A reload never weakens authentication: the secret, tokens and key files are checked as at
   start (kvd.security rule 2) and any problem refuses the whole reload; the secret, TLS and
   which files are used change only with a restart. The one thing a reload takes from them is
   the contents of the same tokens file, so a leaked token can be revoked without a restart.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import trio

from kvd.config import Config, load_config
from kvd.errors import ConfigError
from kvd.security import Security

__all__ = [
    "Notifier",
    "RELOADABLE",
    "apply_reload",
    "notifier",
    "reload_config",
    "reload_on_sighup",
    "set_reload_source",
]

log = logging.getLogger("kvd.systemd")

# Keys every reader takes from the live Config at each use, so assigning them takes effect
# without a restart (transfer_limit from the next fetch plan, anti_entropy_interval after the
# current pause). read_repair is also copied into the coordinator, which apply_reload updates.
RELOADABLE = (
    "log_level",
    "transfer_rate_mb",
    "transfer_limit",
    "anti_entropy",
    "anti_entropy_interval",
    "tombstone_grace",
    "hinted_handoff",
    "hint_window",
    "read_repair",
)

# How often the STATUS= line is refreshed while serving (`systemctl status kvd` shows it).
STATUS_INTERVAL = 10.0


class Notifier:
    """Sends sd_notify datagrams to ``$NOTIFY_SOCKET`` (see the module rules)."""

    def __init__(self, environ: Mapping[str, str] | None = None):
        environ = os.environ if environ is None else environ
        address = environ.get("NOTIFY_SOCKET", "")
        if address.startswith("@"):
            address = "\0" + address[1:]  # abstract namespace
        self.address: str | None = address if address[:1] in ("/", "\0") else None
        self.watchdog_interval: float | None = _watchdog_interval(environ)
        self._sock: socket.socket | None = None
        self._warned = False

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, *fields: str) -> bool:
        """Send ``fields`` (``"READY=1"``, ``"STATUS=..."``) in one datagram; True if sent."""
        if self.address is None:
            return False
        data = "\n".join(f.replace("\n", " ") for f in fields).encode()
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.setblocking(False)
            self._sock.sendto(data, self.address)
        except OSError as exc:
            if not self._warned:
                self._warned = True
                log.warning("cannot notify systemd at %s: %s", self.address.replace("\0", "@"),
                            exc.strerror or exc)
            return False
        return True

    def ready(self, status: str) -> bool:
        return self.notify("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")

    def status(self, status: str) -> bool:
        return self.notify(f"STATUS={status}")

    def stopping(self, status: str = "draining in-flight requests") -> bool:
        return self.notify("STOPPING=1", f"STATUS={status}")

    def reloading(self) -> bool:
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.notify("RELOADING=1", f"MONOTONIC_USEC={usec}", "STATUS=reloading")

    async def run_watchdog(self) -> None:
        """Ping the watchdog every half interval until cancelled; returns at once when
        systemd asked for no watchdog."""
        if self.address is None or self.watchdog_interval is None:
            return
        log.debug("watchdog: pinging every %.3f s", self.watchdog_interval)
        while True:
            self.notify("WATCHDOG=1")
            await trio.sleep(self.watchdog_interval)

    async def run_status(self, describe: Callable[[], str]) -> None:
        """Refresh STATUS= with ``describe()`` when it changes, every STATUS_INTERVAL."""
        if self.address is None:
            return
        last = None
        while True:
            await trio.sleep(STATUS_INTERVAL)
            text = describe()
            if text != last:
                self.status(text)
                last = text

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _watchdog_interval(environ: Mapping[str, str]) -> float | None:
    """Half of ``$WATCHDOG_USEC`` in seconds, or None (sd_watchdog_enabled(3) rules)."""
    try:
        usec = int(environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    pid = environ.get("WATCHDOG_PID")
    if pid and pid != str(os.getpid()):
        return None  # meant for another process (e.g. a wrapper that exec'd us is fine)
    return usec / 2e6


_notifier: Notifier | None = None


def notifier() -> Notifier:
    """The process-wide notifier, built from the environment on first use."""
    global _notifier
    if _notifier is None:
        _notifier = Notifier()
    return _notifier


# ------------------------------------------------------------------ SIGHUP reload

# (config file, flag overrides) the daemon was started with; set by kvd.main.
_reload_source: tuple[str | None, dict[str, Any]] | None = None


def set_reload_source(path: str | None, overrides: Mapping[str, Any]) -> None:
    """Remember how the running config was built, so SIGHUP can build it again."""
    global _reload_source
    _reload_source = (path, dict(overrides))


def reload_config(environ: Mapping[str, str] | None = None) -> Config:
    """The config as it would be loaded now; raises ConfigError."""
    if _reload_source is None:
        raise ConfigError("this process was not started by the kvd command: nothing to re-read")
    path, overrides = _reload_source
    return load_config(path, os.environ if environ is None else environ, overrides)


def apply_reload(node: Any, new: Config) -> tuple[dict[str, Any], list[str]]:
    """Apply the RELOADABLE keys of ``new`` to the running node.

    Returns ({key: new value} applied, sorted keys that changed but need a restart).
    """
    current: Config = node.config
    applied: dict[str, Any] = {}
    for key in RELOADABLE:
        value = getattr(new, key)
        if value != getattr(current, key):
            setattr(current, key, value)
            applied[key] = value
    if "log_level" in applied:
        logging.getLogger().setLevel(new.log_level.upper())
    if "read_repair" in applied:
        node.coordinator.read_repair = new.read_repair
    now, then = new.model_dump(), current.model_dump()
    refused = sorted(k for k in now if k not in RELOADABLE and now[k] != then[k])
    return applied, refused


def reload(node: Any, notify: Notifier | None = None) -> tuple[dict[str, Any], list[str]]:
    """One SIGHUP: re-read, apply, log one line per outcome, tell systemd."""
    notify = notify or notifier()
    notify.reloading()
    try:
        try:
            new = reload_config()
            fresh = Security.from_config(new)  # rule 6: the same checks as at start
        except (ConfigError, OSError) as exc:  # OSError: whatever a file read let through
            log.error("reload failed, nothing changed: %s", exc)
            return {}, []
        applied, refused = apply_reload(node, new)
        _reload_tokens(node, fresh, refused)
        if applied:
            log.info("reloaded: %s", ", ".join(f"{k} = {v!r}" for k, v in applied.items()))
        else:
            log.info("reloaded: no reloadable setting changed")
        if refused:
            log.warning("reload: not applied, restart kvd to change: %s", ", ".join(refused))
        return applied, refused
    finally:
        notify.notify("READY=1", "STATUS=serving")


def _reload_tokens(node: Any, fresh: Security, refused: list[str]) -> None:
    """Take the re-read contents of the same tokens file (rule 6)."""
    running = getattr(node, "security", None)
    if running is None or running.tokens is None or "client_tokens_file" in refused:
        return
    if fresh.tokens is not None and fresh.tokens != running.tokens:
        running.tokens = fresh.tokens
        count = len(fresh.tokens)
        log.info("client tokens re-read: %d token%s", count, "" if count == 1 else "s")


async def reload_on_sighup(node: Any, signals: AsyncIterator[int],
                           notify: Notifier | None = None) -> None:
    """Reload on every SIGHUP until cancelled (ExecReload=kill -HUP $MAINPID). ``signals``
    was opened before the node started listening, so a SIGHUP sent once the port is open
    waits for the node to be ready instead of being lost."""
    async for _ in signals:
        reload(node, notify)
