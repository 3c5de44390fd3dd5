"""`kvctl version`: this client's version and protocol, and every node's server version
and protocol as each node reports it, so a mixed-version cluster shows (like `nodetool
version` run everywhere, or etcd's endpoint status)."""

from __future__ import annotations

import typer

from kvctl import render
from kvctl.common import options, run

ASK_TIMEOUT = 3.0  # seconds to wait for one node's answer; a node down says "unreachable"


async def _report(host: str, connect: dict) -> dict:
    import trio

    from kvd.client import open_client
    from kvd.errors import KvdError

    async with open_client(host, **connect) as client:
        status = await client.status()
    nodes = {row["node"]: {"node": row["node"], "address": row["address"],
                           "state": row["state"], "version": None, "protocol": None,
                           "error": None} for row in status["nodes"]}

    async def ask(entry: dict) -> None:
        try:
            with trio.fail_after(ASK_TIMEOUT):
                async with open_client(entry["address"], **connect) as client:
                    mine = await client.status()
        except (KvdError, OSError, trio.TooSlowError) as exc:
            entry["error"] = str(exc) or "no answer"
            return
        row: dict = next((r for r in mine["nodes"] if r["node"] == mine["node"]), {})
        # A node older than this report does not say: "unknown", which is itself a sign.
        entry["version"] = row.get("server_version", "unknown")
        entry["protocol"] = row.get("protocol")

    async with trio.open_nursery() as nursery:
        for entry in nodes.values():
            nursery.start_soon(ask, entry)
    return {"nodes": list(nodes.values())}


def version_command() -> None:
    """The client's version and protocol, and each node's server version and protocol."""
    from kvd._version import version
    from kvd.proto.messages import PROTOCOL_VERSION

    connect = {"token": options.token, "ssl_context": options.ssl_context,
               "connect_timeout": options.timeout}
    doc = run(lambda: _report(options.host, connect))
    doc = {"client": {"version": version(fallback="(development)"),
                      "protocol": PROTOCOL_VERSION}, **doc}
    if options.json:
        render.emit_json(doc)
        return
    render.note(f"kvctl {doc['client']['version']}, protocol {doc['client']['protocol']}")
    render.table(None, ["node", "address", "state", "version", "protocol"],
                 [[n["node"], n["address"], n["state"], n["version"] or "unreachable",
                   n["protocol"] if n["protocol"] is not None else "-"] for n in doc["nodes"]])
    seen = {n["version"] for n in doc["nodes"] if n["version"]}
    if len(seen) > 1:
        render.note("mixed versions: " + ", ".join(sorted(seen)))
