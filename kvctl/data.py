"""kvctl's key commands: put, get, delete and inspect.

Writes mean what they say: without --context a put or delete supersedes what the cluster
holds (the coordinator reads the key first); --blind adds a sibling instead. A read never
mixes headers into the data on stdout: several siblings are a conflict (exit 5) unless
--all asks for them with separators (docs/DECISIONS.md).
"""

from __future__ import annotations

import os
import shutil
import stat
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer

from kvctl import render
from kvctl.common import (
    CONFLICT_EXIT,
    call,
    check_quorum,
    context_arg,
    fail,
    key_arg,
    options,
)

NOT_FOUND_EXIT = 1
_SPOOL_IN_MEMORY = 8 << 20

KeyArg = Annotated[str, typer.Argument(metavar="KEY", help="The key (1..1024 bytes of UTF-8).",
                                       show_default=False)]
ContextOpt = Annotated[Optional[str], typer.Option(
    "--context", "-c", metavar="CONTEXT",
    help="Context from a previous get: supersede what that get saw.")]
BlindOpt = Annotated[bool, typer.Option(
    "--blind", help="Do not supersede: add a sibling beside what is stored.")]
NOpt = Annotated[Optional[int], typer.Option(
    "-n", min=1, metavar="N", help="Replicas (N) for this request.")]
WOpt = Annotated[Optional[int], typer.Option(
    "-w", min=1, metavar="W", help="Write quorum (W), 1..N.")]
ROpt = Annotated[Optional[int], typer.Option(
    "-r", min=1, metavar="R", help="Read quorum (R), 1..N.")]


def _write_context(context: str | None, blind: bool) -> bytes | None:
    """The --context of a write; with --blind there is none (a blind write supersedes
    nothing, a write with a context supersedes what that context saw)."""
    if context is not None and blind:
        fail("--blind and --context exclude each other", 2)
    return context_arg(context)


@contextmanager
def _value_source(value: str | None, file: Path | None):
    """Yield (bytes, None) for a literal value or (None, binary file) for --file / stdin."""
    if (value is None) == (file is None):
        fail("give a VALUE, '-' for stdin, or --file F (exactly one)", 2)
    if file is not None:
        try:
            handle = open(file, "rb")
        except OSError as exc:
            fail(f"--file {file}: {exc.strerror}", 1)
        with handle, _from_handle(handle) as source:
            yield source
    elif value == "-":
        with _from_handle(sys.stdin.buffer) as source:
            yield source
    else:
        assert value is not None  # exactly one of value and file, checked above
        yield value.encode("utf-8", "surrogateescape"), None


@contextmanager
def _from_handle(handle):
    """Yield (bytes, None) or (None, handle) for a binary file: a regular file is streamed
    by its size; a pipe has no size and is spooled (to disk past 8 MiB) to learn it."""
    try:
        info = os.fstat(handle.fileno())
        regular = stat.S_ISREG(info.st_mode)
    except (OSError, ValueError):
        regular = False
    if regular and info.st_size > 0:
        yield None, handle
    elif regular:
        yield b"", None  # the node refuses a stream of zero bytes: an empty value is inline
    else:
        with tempfile.SpooledTemporaryFile(max_size=_SPOOL_IN_MEMORY) as spool:
            shutil.copyfileobj(handle, spool, 1 << 20)
            size = spool.tell()
            spool.seek(0)
            if size <= _SPOOL_IN_MEMORY:
                yield spool.read(), None
            else:
                yield None, spool


def put(
    key: KeyArg,
    value: Annotated[Optional[str], typer.Argument(
        metavar="[VALUE|-]", help="The value, or '-' to read stdin.", show_default=False)] = None,
    file: Annotated[Optional[Path], typer.Option(
        "--file", "-f", metavar="FILE", help="Read the value from a file.")] = None,
    context: ContextOpt = None,
    blind: BlindOpt = False,
    n: NOpt = None,
    w: WOpt = None,
) -> None:
    """Write a value; it supersedes what the cluster holds (--blind: add a sibling)."""
    data_key = key_arg(key)
    ctx = _write_context(context, blind)
    check_quorum(n, w=w)
    with _value_source(value, file) as (data, handle):
        result = call(lambda c: c.put(data_key, data, source=handle, context=ctx, blind=blind,
                                      n=n, w=w))
    doc = {**key_fields(data_key), "context": render.encode_context(result.context),
           "siblings": result.siblings, "replicas": result.replicas}
    if options.json:
        render.emit_json(doc)
    else:
        render.note(f"ok: {result.replicas} replicas, {result.siblings} sibling(s)")
        render.note(f"context: {doc['context']}")


def delete(key: KeyArg, context: ContextOpt = None, blind: BlindOpt = False, n: NOpt = None,
           w: WOpt = None) -> None:
    """Delete a key: a tombstone that supersedes what the cluster holds."""
    data_key = key_arg(key)
    ctx = _write_context(context, blind)
    check_quorum(n, w=w)
    result = call(lambda c: c.delete(data_key, context=ctx, blind=blind, n=n, w=w))
    if options.json:
        render.emit_json({**key_fields(data_key), "context": render.encode_context(result.context),
                          "replicas": result.replicas})
    else:
        render.note(f"deleted: {result.replicas} replicas")


class _Output:
    """Where ``get -o FILE`` puts values: FILE for one, FILE.1 .. FILE.N with --all.

    Values are written to temporary files beside FILE and renamed once the read has
    succeeded, so a failed or conflicting read never leaves a half-written FILE."""

    def __init__(self, path: Path):
        self.path = path
        self.directory = path.parent
        if path.is_dir():
            fail(f"-o {path}: is a directory; give a file name", 2)
        if not self.directory.is_dir():
            fail(f"-o {path}: directory {self.directory} does not exist", 1)
        if not os.access(self.directory, os.W_OK):
            fail(f"-o {path}: directory {self.directory} is not writable", 1)
        self.pending: dict[int, str] = {}  # sibling index -> temporary file

    def sink(self, index: int, count: int):
        handle = tempfile.NamedTemporaryFile(dir=self.directory, prefix=".kvctl-", delete=False)
        self.pending[index] = handle.name
        return handle

    def finish(self, values: dict[int, bytes], numbered: bool) -> list[str]:
        """Put each live sibling (index -> value, or None if streamed) in place."""
        written = []
        for number, (index, value) in enumerate(sorted(values.items()), start=1):
            target = f"{self.path}.{number}" if numbered else str(self.path)
            if index not in self.pending:
                with tempfile.NamedTemporaryFile(dir=self.directory, prefix=".kvctl-",
                                                 delete=False) as handle:
                    handle.write(value)
                    self.pending[index] = handle.name
            os.replace(self.pending.pop(index), target)
            written.append(target)
        return written

    def discard(self) -> None:
        for name in self.pending.values():
            Path(name).unlink(missing_ok=True)


def get(
    key: KeyArg,
    output: Annotated[Optional[Path], typer.Option(
        "--output", "-o", metavar="FILE",
        help="Write the value to a file (streamed); several siblings (--all) to FILE.1 ..")] = None,
    all_siblings: Annotated[bool, typer.Option(
        "--all",
        help="Print every sibling, each after a '--- sibling I of N: BYTES bytes' line.")] = False,
    raw: Annotated[bool, typer.Option(
        "--raw", help="On a terminal too, print the bytes as they are (no escaping).")] = False,
    r: ROpt = None,
    n: NOpt = None,
) -> None:
    """Read a key: its value on stdout, the context to write back with on stderr."""
    data_key = key_arg(key)
    check_quorum(n, r=r)
    out = _Output(output) if output is not None else None
    try:
        result = call(lambda c: c.get(data_key, r=r, n=n, sink=out.sink if out else None))
        live = {i: s.value for i, s in enumerate(result.siblings) if not s.deleted}
        context = render.encode_context(result.context)
        if options.json:
            _print_json(key, result, context)
        elif not result.found:
            fail(f"key {key!r} not found", NOT_FOUND_EXIT)
        elif len(live) > 1 and not all_siblings:
            _conflict(key, list(live.values()), context)
        elif out is None:
            _print_values(list(live.values()), all_siblings, raw)
        if out is not None and live:
            render.note("wrote " + ", ".join(out.finish(live, numbered=len(live) > 1)))
    finally:
        if out is not None:
            out.discard()
    if options.json and not result.found:
        raise typer.Exit(NOT_FOUND_EXIT)
    if not options.json:
        render.note(f"context: {context}")


def _print_json(key: str, result, context: str) -> None:
    siblings = []
    for sibling in result.siblings:
        text, encoding = render.value_field(sibling.value)
        siblings.append({"value": text, "encoding": encoding, "deleted": sibling.deleted,
                         "length": sibling.length})
    render.emit_json({**key_fields(key_arg(key)), "found": result.found, "siblings": siblings,
                      "context": context, "replicas": result.replicas})


def _conflict(key: str, values: list[bytes], context: str) -> None:
    """Several live siblings and no --all: nothing on stdout; they are listed on stderr."""
    render.error(f"key {key!r} has {len(values)} conflicting siblings; `get --all` prints "
                 "them, `--json` lists them, a put with the context below resolves them")
    for number, value in enumerate(values, start=1):
        shown = render.escape_for_terminal(value[:60]).decode()
        more = "..." if len(value) > 60 else ""
        render.note(f"  sibling {number}: {len(value)} bytes: {shown}{more}")
    render.note(f"context: {context}")
    raise typer.Exit(CONFLICT_EXIT)


def _print_values(values: list[bytes], all_siblings: bool, raw: bool) -> None:
    """The value(s) on stdout: exact bytes in a pipe; on a terminal escaped (unless --raw)
    and ending with a newline, so the prompt starts on its own line."""
    terminal = render.stdout_is_terminal()
    out = sys.stdout.buffer
    for number, value in enumerate(values, start=1):
        if all_siblings:
            out.write(f"--- sibling {number} of {len(values)}: {len(value)} bytes\n".encode())
        shown = render.escape_for_terminal(value) if terminal and not raw else value
        out.write(shown)
        if (terminal or all_siblings) and not shown.endswith(b"\n"):
            out.write(b"\n")
    out.flush()


def inspect(key: KeyArg) -> None:
    """Show each replica of a key: node, role, siblings, digest — do they agree?"""
    data_key = key_arg(key)
    doc = call(lambda c: c.inspect(data_key))
    replicas = []
    for replica in doc["replicas"]:
        entry = dict(replica)
        if isinstance(entry.get("version"), bytes):
            entry["version"] = render.encode_context(entry["version"])
        replicas.append(entry)
    out = {**key_fields(data_key), "partition": doc["partition"], "replicas": replicas,
           "agree": replicas_agree(replicas)}
    if options.json:
        render.emit_json(out)
        return
    rows, notes = inspect_table(replicas)
    render.table(f"key {key!r} — partition {doc['partition']}",
                 ["node", "role", "present", "siblings", "digest"], rows)
    for line in notes:
        render.note(line)


def inspect_table(replicas: list[dict]) -> tuple[list[list], list[str]]:
    """The rows and the verdict of `kvctl inspect`. A replica that did not answer shows "?",
    not "no", and is named (outside tester: a paused replica read as not holding the key)."""
    rows = [[r["node"], r["role"], "?" if r.get("error") else "yes" if r["present"] else "no",
             "-" if r.get("error") else r["siblings"], r.get("digest") or "-"]
            for r in replicas]
    silent = [f"{r['node']} ({r['error']})" for r in replicas if r.get("error")]
    answered = [r for r in replicas if not r.get("error")]
    notes = [f"did not answer: {', '.join(silent)}"] if silent else []
    those = "the replicas that answered" if silent else "replicas"
    if not replicas_agree(answered):
        notes.append("replicas DIFFER")
    elif answered and not answered[0].get("present"):
        notes.append(f"{those} agree: the key is absent on all of them")
    elif answered:
        notes.append(f"{those} agree")
    return rows, notes


def key_fields(data_key: bytes) -> dict:
    """``key`` and ``key_encoding`` for --json, as export and keys give them: a key that is
    not UTF-8 in base64 (outside tester: it came out as lone surrogates, which jq mangles)."""
    text, encoding = render.value_field(data_key)
    return {"key": text, "key_encoding": encoding}


def replicas_agree(replicas: list[dict]) -> bool:
    """Every replica holds the same object, or none holds the key at all."""
    present = [r.get("present") for r in replicas]
    digests = {r.get("digest") for r in replicas if r.get("present")}
    return len(digests) <= 1 and (all(present) or not any(present))
