"""`kvctl backup` (one node's consistent snapshot, streamed to a file with progress) and
`kvctl export` / `kvctl import` (the whole cluster's live keys as JSON lines with their
siblings and contexts, for migrations). The restore of a backup is `kvd restore`."""

from __future__ import annotations

import base64
import binascii
import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from kvctl import render
from kvctl.common import call, fail, options


def backup(
    output: Annotated[Path, typer.Option("--output", "-o", help="File to write the backup "
                                         "to ('-' for stdout).")],
) -> None:
    """Back up --host's node: a consistent LevelDB snapshot plus its blob files."""
    to_stdout = str(output) == "-"  # as for export: for `kvd restore -` across a pipe
    # Refused before the node streams anything (a directory failed only at the end).
    if to_stdout and options.json:
        fail("--output -: the backup takes stdout, so --json cannot; give a file name", 2)
    if to_stdout and render.stdout_is_terminal():
        fail("--output -: refusing to write a binary backup to a terminal; redirect stdout "
             "to a file or a pipe", 2)
    if not to_stdout and output.is_dir():
        fail(f"--output {output}: is a directory; give a file name", 2)
    if to_stdout:
        doc = _stream(sys.stdout.buffer)
        sys.stdout.buffer.flush()
    else:
        doc = _to_file(output)
    where = "standard output" if to_stdout else str(output)
    doc = {"node": doc["node"], "cluster": doc["cluster"], "bytes": doc["bytes"],
           "output": str(output)}
    if options.json:
        render.emit_json(doc)
    else:
        render.note(f"backed up node {doc['node']} ({render.human_bytes(doc['bytes'])}) to "
                    f"{where}; restore with `kvd restore {output} --data-dir DIR`")


def _to_file(output: Path) -> dict:
    """The backup streamed to FILE.partial, renamed FILE once complete and on disk."""
    partial = output.with_name(output.name + ".partial")
    try:
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    except OSError as exc:
        fail(f"--output {output}: {exc.strerror}", 1)
    try:
        with os.fdopen(fd, "wb") as out:
            # A backup is a copy of every value the node holds: private as kvd's data
            # directory is, 0600 whatever the umask or the mode of a file left there before.
            os.fchmod(fd, 0o600)
            doc = _stream(out)
            out.flush()
            os.fsync(out.fileno())
        os.replace(partial, output)  # a file named FILE is always a complete backup
    finally:
        if partial.exists():
            partial.unlink()
    return doc


def _stream(out) -> dict:
    """The node's backup written to the binary file ``out``, with progress on a terminal."""
    show = sys.stderr.isatty() and not options.json

    async def run(client):
        if not show:
            return await client.backup(out)
        from rich.progress import DownloadColumn, Progress, TransferSpeedColumn

        from rich.console import Console

        with Progress(*Progress.get_default_columns()[:1], DownloadColumn(),
                      TransferSpeedColumn(), console=Console(stderr=True),
                      transient=True) as bar:
            task = bar.add_task("backup", total=None)
            return await client.backup(out, lambda done: bar.update(task, completed=done))

    return call(run)


def _encoded(data: bytes) -> dict:
    text, encoding = render.value_field(data)
    return {"value": text, "encoding": encoding}


def _decoded(doc: dict, field: str, encoding_field: str) -> bytes:
    """The bytes an export line's ``doc[field]`` stands for, as ``doc[encoding_field]``
    says (utf-8 when absent); ValueError naming what is wrong. A made-up encoding is
    refused, not stored as UTF-8, and base64 is decoded strictly (a lenient decoder drops
    what is not base64)."""
    text = doc.get(field)
    if not isinstance(text, str):
        raise ValueError(f'"{field}" is not a string')
    encoding = doc.get(encoding_field, "utf-8")
    try:
        if encoding == "utf-8":
            return text.encode()
        if encoding == "base64":
            return base64.b64decode(text, validate=True)
    except (UnicodeEncodeError, binascii.Error):
        raise ValueError(f'"{field}" is not {encoding}') from None
    raise ValueError(f'"{encoding_field}" must be "utf-8" or "base64", got '
                     f"{json.dumps(encoding)[:40]}")


def _export_line(raw: bytes) -> tuple[bytes, list[bytes]]:
    """The key and the live sibling values of one line of `kvctl export`; ValueError saying
    what is wrong. The whole line is checked before any of it is written."""
    from kvd.proto.messages import MAX_KEY_LEN

    try:
        doc = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ValueError("not UTF-8 text") from None
    except ValueError as exc:
        raise ValueError(f"not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise ValueError("not a JSON object")
    key = _decoded(doc, "key", "key_encoding")
    if not 1 <= len(key) <= MAX_KEY_LEN:
        raise ValueError(f'"key" must be 1..{MAX_KEY_LEN} bytes, got {len(key)}')
    siblings = doc.get("siblings")
    if not isinstance(siblings, list) or not all(isinstance(s, dict) for s in siblings):
        raise ValueError('"siblings" is not a list of objects')
    values = []
    for sibling in siblings:
        # Strictly a boolean: "deleted": "yes" was read as true, a delete.
        if not isinstance(sibling.get("deleted"), bool):
            raise ValueError('"deleted" of a sibling must be true or false')
        value = _decoded(sibling, "value", "encoding")
        if not sibling["deleted"]:
            values.append(value)
    return key, values


async def _export(client, write) -> int:
    """Every live key, listed by the coverage query (ADMIN ``keys``, as `kvctl keys`), then
    each read with the default quorum."""
    exported = 0
    position: list | None = [0, b""]
    while position is not None:
        page = await client.admin({"op": "keys", "partition": position[0],
                                   "after": position[1]})
        for key in page["keys"]:
            result = await client.get(key)
            if not result.found:
                continue  # deleted since it was listed
            key_text, key_encoding = render.value_field(key)
            write({"key": key_text, "key_encoding": key_encoding,
                   "siblings": [{**_encoded(s.value), "deleted": s.deleted}
                                for s in result.siblings if not s.deleted],
                   "context": render.encode_context(result.context)})
            exported += 1
        position = page["next"]
    return exported


def export(
    output: Annotated[Path, typer.Option("--output", "-o", help="File of JSON lines "
                                         "('-' for stdout).")] = Path("-"),
) -> None:
    """Write every live key of the cluster as JSON lines: key, siblings, context."""
    try:
        if str(output) == "-":
            out = sys.stdout
        else:  # every value of the cluster: 0600 like a backup, whatever the umask
            fd = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            os.fchmod(fd, 0o600)
            out = os.fdopen(fd, "w", encoding="utf-8")
    except OSError as exc:
        fail(f"--output {output}: {exc.strerror}", 1)

    def write(line: dict) -> None:
        out.write(json.dumps(line) + "\n")

    render.note("kvctl: warning: export reads every key of the cluster (a full scan)")

    async def go(client):  # the trio client: values of any size, streamed
        return await _export(client, write)

    try:
        count = call(go)
    finally:
        out.flush()
        if out is not sys.stdout:
            out.close()
    render.note(f"exported {count} keys")


def import_(
    file: Annotated[Path, typer.Argument(help="JSON lines from `kvctl export` ('-' for "
                                              "stdin).")],
) -> None:
    """Write every key of an export into the cluster at --host: the first live sibling
    supersedes what the key holds there, the others are added beside it (siblings stay
    siblings)."""
    try:
        # Bytes: each line is decoded on its own, so text that is not UTF-8 is named by
        # its line number instead of ending the import with a traceback.
        src = sys.stdin.buffer if str(file) == "-" else open(file, "rb")
    except OSError as exc:
        fail(f"{file}: {exc.strerror}", 1)

    def lines():
        with src:
            for number, raw in enumerate(src, 1):
                if not raw.strip():
                    continue
                try:
                    yield _export_line(raw)
                except ValueError as exc:
                    fail(f"{file}:{number}: not a line of `kvctl export`: {exc}", 2)

    async def run(client):
        count = 0
        for key, values in lines():
            for i, value in enumerate(values):
                await client.put(key, value, blind=i > 0)
            count += 1
        return count

    render.note(f"imported {call(run)} keys")
