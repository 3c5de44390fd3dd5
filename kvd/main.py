"""The ``kvd`` console script: load the config, set up logging, run the server.

Contract (DESIGN section 7): flags override ``KVD_*`` environment variables, which override
the file. Expected failures print ONE line ``kvd: error: <message>`` on stderr and never a
traceback: exit 2 for configuration errors, 1 for other startup failures, 130 on Ctrl-C.
Graceful SIGTERM handling belongs to :func:`kvd.server.run`.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from kvd._version import version
from kvd.errors import ConfigError, KvdError

if TYPE_CHECKING:
    from kvd.config import Config
# The config schema (pydantic) and the server are imported in main(), where Ctrl-C during
# their import (the first ~0.3 s) ends kvd with 130 and no traceback.

if sys.version_info < (3, 11):  # pragma: no cover - trio depends on the backport there
    from exceptiongroup import BaseExceptionGroup

log = logging.getLogger("kvd")

EXIT_FAILED = 1
EXIT_CONFIG = 2
EXIT_INTERRUPTED = 130

# Python level -> syslog priority, for the "<N>" prefix journald understands (sd-daemon(3)).
_SYSLOG_PRIORITY = {
    logging.DEBUG: 7,
    logging.INFO: 6,
    logging.WARNING: 4,
    logging.ERROR: 3,
    logging.CRITICAL: 2,
}


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface; flag names mirror config keys (``--peer-listen``)."""
    p = argparse.ArgumentParser(
        prog="kvd",
        description="Run a kvd node in the foreground. Flags override KVD_* environment "
        "variables, which override the config file.",
        epilog="kvd restore FILE --data-dir DIR rebuilds a stopped node's data directory "
        "from a backup made by `kvctl backup` (see kvd(8)).",
    )
    p.add_argument("--config", metavar="FILE", help="TOML config file (see kvd.toml(5))")
    p.add_argument("--node-id", metavar="ID", help="unique, stable name of this node")
    p.add_argument("--listen", metavar="HOST:PORT", help="client address (127.0.0.1:7379)")
    p.add_argument("--peer-listen", metavar="HOST:PORT", help="peer address (127.0.0.1:7380)")
    p.add_argument("--resp-listen", metavar="HOST:PORT",
                   help="Redis-protocol address (off by default; e.g. 127.0.0.1:7382)")
    p.add_argument("--data-dir", metavar="DIR", help="data directory (/var/lib/kvd)")
    p.add_argument("--seeds", metavar="HOST:PORT,...", help="peer addresses of members")
    p.add_argument(
        "--cluster-secret-file", metavar="FILE", help="shared secret peers authenticate with"
    )
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    p.add_argument(
        "--check", action="store_true", help="validate and print the effective config, then exit"
    )
    p.add_argument("--version", action="version", version=f"kvd {version()}")
    return p


def overrides_from_args(args: argparse.Namespace) -> dict[str, object]:
    """Config overrides from parsed flags; flags not given are absent."""
    keys = ("node_id", "listen", "peer_listen", "resp_listen", "data_dir", "seeds",
            "cluster_secret_file", "log_level")
    return {k: getattr(args, k) for k in keys if getattr(args, k) is not None}


class _Formatter(logging.Formatter):
    """``LEVEL name: message``; with ``journald`` every line gets the ``<N>`` priority
    prefix, so even traceback lines are filed at the event's priority. Without journald
    (which stamps each line itself) a line starts with its UTC time, to the millisecond."""

    def __init__(self, journald: bool) -> None:
        fmt = "%(levelname)s %(name)s: %(message)s"
        super().__init__(fmt if journald else "%(asctime)s " + fmt)
        self.journald = journald

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        return f"{stamp}.{int(record.msecs):03d}Z"

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if not self.journald:
            return text
        prefix = f"<{_SYSLOG_PRIORITY.get(record.levelno, 6)}>"
        return "\n".join(prefix + line for line in text.split("\n"))


def configure_logging(level: str, environ: Mapping[str, str]) -> None:
    """Send log records to stderr, one line per event (journald-aware)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter(journald=bool(environ.get("JOURNAL_STREAM"))))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in _leaves(sub)]
    return [exc]


def _fail(message: str, code: int) -> int:
    print(f"kvd: error: {' '.join(str(message).splitlines())}", file=sys.stderr)
    return code


def _serve(config: Config) -> None:
    import trio

    import kvd.server  # imported here so --check works without the server's dependencies
    from kvd.net.admission import raise_nofile_limit

    raise_nofile_limit()  # before LevelDB and the connection budgets size themselves on it
    trio.run(kvd.server.run, config)


def restore_main(argv: Sequence[str]) -> int:
    """``kvd restore FILE --data-dir DIR``: rebuild a stopped node's data directory from a
    backup made by `kvctl backup` (kvd.backup)."""
    p = argparse.ArgumentParser(
        prog="kvd restore",
        description="Rebuild an empty data directory from a backup made by `kvctl backup`; "
        "the node then fetches what changed since from the other replicas before serving.")
    p.add_argument("file", metavar="FILE", help="the backup file ('-' for standard input)")
    p.add_argument("--data-dir", metavar="DIR", required=True, help="empty data directory")
    args = p.parse_args(argv)
    import trio

    from kvd.backup import restore

    try:
        with (sys.stdin.buffer if args.file == "-" else open(args.file, "rb")) as source:
            doc = trio.run(restore, source, Path(args.data_dir))
    except KvdError as e:
        return _fail(str(e), e.exit_code)
    except OSError as e:
        return _fail(_os_error_text(e), EXIT_FAILED)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    print(f"restored node {doc['node']} of cluster {doc['cluster']} ({doc['records']} "
          f"records, {doc['blobs']} blobs) into {args.data_dir}; start kvd with its usual "
          "config: it fetches what was written since the backup before it serves",
          file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``kvd`` console script; returns (and exits with) the exit code."""
    try:
        return _main(sys.argv[1:] if argv is None else list(argv))
    except KeyboardInterrupt:  # before the server handles SIGINT (it then drains: exit 0)
        return EXIT_INTERRUPTED


def _main(argv: list[str]) -> int:
    from kvd.config import load_config, unknown_env_vars

    if argv[:1] == ["restore"]:
        return restore_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        config = load_config(args.config, os.environ, overrides_from_args(args))
    except ConfigError as e:
        return _fail(str(e), EXIT_CONFIG)

    if args.check:
        for var in unknown_env_vars(os.environ):
            print(f"kvd: warning: {var} matches no config key (a typo?); ignored",
                  file=sys.stderr)
        from kvd.node import data_dir
        from kvd.security import Security

        try:  # the secret, tokens and TLS files, loaded as start-up loads them
            Security.from_config(config)
            if config.data_dir != ":memory:":
                data_dir.check(config.data_dir)  # as start-up judges it, touching nothing
        except KvdError as e:
            return _fail(str(e), EXIT_CONFIG if isinstance(e, ConfigError) else EXIT_FAILED)
        _print_check(config)
        return 0

    configure_logging(config.log_level, os.environ)
    for var in unknown_env_vars(os.environ):
        log.warning("ignoring environment variable %s: it matches no config key", var)

    # Until the reload task listens for SIGHUP, one asked for is dropped, not fatal (its
    # default action killed a node reloaded the moment its port opened).
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        from kvd.systemd import set_reload_source  # SIGHUP re-reads the same sources

        set_reload_source(args.config, overrides_from_args(args))
        _serve(config)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BaseException as e:  # noqa: BLE001 - sorted into expected and unexpected below
        leaves = _leaves(e)
        if all(isinstance(x, KeyboardInterrupt) for x in leaves):
            return EXIT_INTERRUPTED
        expected = [x for x in leaves if isinstance(x, (KvdError, OSError))]
        if not expected or len(expected) != len(leaves):
            raise
        first = expected[0]
        log.debug("startup failed", exc_info=first)
        code = EXIT_CONFIG if isinstance(first, ConfigError) else EXIT_FAILED
        message = str(first) if isinstance(first, KvdError) else _os_error_text(first)
        return _fail(message, code)
    return 0


def _os_error_text(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        target = f": {e.filename}" if e.filename else ""
        return f"{e.strerror}{target}"
    return str(e)


def _print_check(config: Config) -> None:
    from kvd.config import format_config

    try:
        sys.stdout.write(format_config(config))
        sys.stdout.flush()
    except BrokenPipeError:
        # `kvd --check | head` closed the pipe: not an error, and no traceback at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


if __name__ == "__main__":
    sys.exit(main())
