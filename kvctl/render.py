"""Output for kvctl: JSON documents and tables on stdout, notes and errors on stderr.

The ``--json`` shapes are a contract (DESIGN section 7, docs/kvctl-json.md): fields may be
added, never renamed or removed. Tables are rich tables on a terminal and plain whitespace
columns in a pipe (one header line, no truncation, no cell with a space in it, ``-`` for an
empty cell), so ``awk`` can read them as ``kubectl get``'s. rich is imported only to draw
on a terminal, and drops colour by itself when NO_COLOR is set.
"""

from __future__ import annotations

import base64
import json
import sys


def encode_context(context: bytes) -> str:
    """Contexts travel through shells as unpadded base64url (kvd.versions.context_to_text,
    shared with the RESP port's KV.GET)."""
    from kvd.versions import context_to_text

    return context_to_text(context)


def decode_context(text: str) -> bytes:
    """A --context back to bytes, strictly: a made-up one is refused here, not read as "no
    context" (kvd.versions.context_from_text, shared with the RESP port's KV.PUT)."""
    from kvd.versions import context_from_text

    try:
        return context_from_text(text)
    except ValueError:
        raise ValueError(f"--context {text[:20]!r} is not a context printed by kvctl: use "
                         "the context of a get or put of this key, unchanged") from None


def value_field(value: bytes) -> tuple[str, str]:
    """(text, encoding) for a value in JSON: utf-8 when it decodes, base64 otherwise."""
    try:
        return value.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        return base64.b64encode(value).decode(), "base64"


def escape_for_terminal(value: bytes) -> bytes:
    """A value made safe to show on a terminal, as redis-cli does: control bytes (ESC, CR,
    NUL, ...) and bytes that are not UTF-8 become ``\\xNN``; newlines and tabs stay."""
    text = value.decode("utf-8", "backslashreplace")
    out = []
    for char in text:
        code = ord(char)
        if (code < 0x20 and char not in "\n\t") or 0x7F <= code < 0xA0:
            out.append(f"\\x{code:02x}")
        else:
            out.append(char)
    return "".join(out).encode("utf-8")


def emit_json(document) -> None:
    sys.stdout.write(json.dumps(document, sort_keys=False) + "\n")
    sys.stdout.flush()


def error(message: str) -> None:
    """One line on stderr, never wrapped (scripts grep it)."""
    note("kvctl: error: " + " ".join(message.split()))


def note(message: str) -> None:
    sys.stderr.write(message + "\n")
    sys.stderr.flush()


def stdout_is_terminal() -> bool:
    """Whether stdout is a terminal: people get rich tables and escaped values there."""
    return sys.stdout.isatty()


def table(title: str | None, columns: list[str], rows: list[list]) -> None:
    """Rows under column headers: rich on a terminal, plain columns in a pipe (the title
    then goes to stderr, so stdout is the header line and the rows only)."""
    if stdout_is_terminal():
        from rich.console import Console

        Console().print(grid(title, columns, rows))
        return
    if title:
        note(title)
    sys.stdout.write(plain_table(columns, rows))
    sys.stdout.flush()


def grid(title: str | None, columns: list[str], rows: list[list]):
    """A rich table (a renderable): what ``table`` prints on a terminal, and what
    ``--watch`` redraws (kvctl.live)."""
    from rich.table import Table

    out = Table(title=title, show_edge=False, header_style="bold")
    for column in columns:
        out.add_column(column)
    for row in rows:
        out.add_row(*[str(cell) for cell in row])
    return out


def plain_table(columns: list[str], rows: list[list]) -> str:
    """Whitespace-aligned columns, upper-case headers, every cell one word."""
    lines = [[_word(c).upper() for c in columns]] + [[_word(cell) for cell in row]
                                                      for row in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(columns))]
    return "".join(
        "   ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() + "\n"
        for line in lines)


def _word(cell) -> str:
    text = str(cell)
    return "_".join(text.split()) or "-"


def human_bytes(count: float) -> str:
    """1023B, 1.5KiB, ...: one word, so a column of them stays one awk field."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(count) < 1024 or unit == "TiB":
            return f"{count:.0f}{unit}" if unit == "B" else f"{count:.1f}{unit}"
        count /= 1024
    return f"{count}B"
