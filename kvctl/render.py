"""Output for kvctl: JSON documents on stdout, rich tables for people, errors on stderr.

The ``--json`` shapes are a contract (DESIGN section 7, docs/kvctl-json.md): fields may be
added, never renamed or removed. Rich drops colour by itself when stdout is not a terminal
or NO_COLOR is set.
"""

from __future__ import annotations

import base64
import json
import sys

from rich.console import Console
from rich.table import Table

stdout = Console()
stderr = Console(stderr=True)


def encode_context(context: bytes) -> str:
    """Contexts travel through shells as unpadded base64url."""
    return base64.urlsafe_b64encode(context).decode().rstrip("=")


def decode_context(text: str) -> bytes:
    padded = text + "=" * (-len(text) % 4)
    try:
        return base64.urlsafe_b64decode(padded.encode())
    except (ValueError, UnicodeEncodeError):
        raise ValueError(f"--context {text[:20]!r} is not a context printed by kvctl") from None


def value_field(value: bytes) -> tuple[str, str]:
    """(text, encoding) for a value in JSON: utf-8 when it decodes, base64 otherwise."""
    try:
        return value.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        return base64.b64encode(value).decode(), "base64"


def emit_json(document) -> None:
    sys.stdout.write(json.dumps(document, sort_keys=False) + "\n")
    sys.stdout.flush()


def error(message: str) -> None:
    """One line on stderr, never wrapped (scripts grep it)."""
    note("kvctl: error: " + " ".join(message.split()))


def note(message: str) -> None:
    sys.stderr.write(message + "\n")
    sys.stderr.flush()


def grid(title: str | None, columns: list[str], rows: list[list]) -> Table:
    """A table as a rich renderable (``table`` prints one; ``--watch`` redraws one)."""
    out = Table(title=title, show_edge=False, header_style="bold")
    for column in columns:
        out.add_column(column)
    for row in rows:
        out.add_row(*[str(cell) for cell in row])
    return out


def table(title: str | None, columns: list[str], rows: list[list]) -> None:
    stdout.print(grid(title, columns, rows))


def human_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(count) < 1024 or unit == "TiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count} B"
