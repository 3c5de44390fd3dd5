"""Network addresses: the one parser of ``HOST:PORT`` (IPv6 as ``[::1]:PORT``).

Config validation, the daemon's listeners, the TCP dialler and kvctl's ``--host`` all parse
here, so an address that one accepts the others accept too.  Standard library only: kvctl
imports this without pulling in the config schema (pydantic).
"""

from __future__ import annotations

import ipaddress
import re

from kvd.errors import ConfigError

__all__ = ["AddressError", "is_loopback_host", "parse_address"]

_HOSTNAME_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,62}[A-Za-z0-9])?$")


class AddressError(ConfigError, ValueError):
    """An address is not HOST:PORT. Both a ConfigError and a ValueError, so it works as a
    pydantic validator error and can be caught by callers of either kind."""


def parse_address(s: str, *, to_dial: bool = False) -> tuple[str, int]:
    """Split ``HOST:PORT`` (IPv6 as ``[::1]:PORT``) into ``(host, port)``.

    The host is returned without brackets. Port 0 (any free port) is for listeners only:
    an address ``to_dial`` (a seed, a node to connect to) needs 1..65535. Raises
    :class:`AddressError` (a ConfigError and a ValueError) with a one-line message that
    does not name any config key.
    """
    if not isinstance(s, str):
        raise AddressError(f"expected HOST:PORT, got {s!r}")
    if s.startswith("["):
        end = s.find("]")
        if end < 0 or s[end + 1 : end + 2] != ":":
            raise AddressError(f"expected [IPV6]:PORT, got {s!r}")
        host, port_text = s[1:end], s[end + 2 :]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise AddressError(f"{host!r} in {s!r} is not an IPv6 address") from None
    else:
        host, sep, port_text = s.rpartition(":")
        if not sep or not host:
            raise AddressError(f"expected HOST:PORT, got {s!r}")
        if ":" in host:
            raise AddressError(f"IPv6 addresses need brackets, e.g. [::1]:7379, got {s!r}")
        if not _is_ipv4(host) and not _is_hostname(host):
            raise AddressError(f"{host!r} in {s!r} is not a valid host name or IP address")
    if not port_text.isascii() or not port_text.isdigit():
        raise AddressError(f"port must be a number 0..65535, got {port_text!r} in {s!r}")
    port = int(port_text)
    if to_dial and not 1 <= port <= 65535:
        raise AddressError(f"port must be 1..65535, got {port} in {s!r}")
    if not 0 <= port <= 65535:
        raise AddressError(f"port must be 0..65535 (0: any free port), got {port} in {s!r}")
    return host, port


def is_loopback_host(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 (also IPv4-mapped) and ``localhost``; no DNS lookups."""
    if host.rstrip(".").lower() == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def _is_ipv4(host: str) -> bool:
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        return False
    return True


def _is_hostname(host: str) -> bool:
    labels = host.rstrip(".").split(".")
    return len(host) <= 253 and all(_HOSTNAME_RE.match(label) for label in labels)
