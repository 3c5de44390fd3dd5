"""`kvctl transfers`: partition moves with each one's own progress, a summary (partitions,
bytes, rate, ETA), and ``--watch`` that redraws it in place (kvctl.live)."""

from __future__ import annotations

from kvctl import render
from kvctl.cluster import admin_call
from kvctl.common import WatchCount, WatchFlag, WatchInterval, options

COLUMNS = ["partition", "from", "to", "state", "keys", "bytes", "rate"]


def summarize(rows: list[dict]) -> dict:
    """Totals over ``rows``: partitions by state, bytes so far, the current rate (bytes/s of
    the running fetches) and an ETA estimated from the partitions already done (None until
    one is; 0 once all are). Between two partitions, when nothing runs for a moment, the
    done ones' own rate stands in for the current one, so the ETA does not flip to unknown."""
    states = [r["state"] for r in rows]
    done = [r for r in rows if r["state"] == "done"]
    running = [r for r in rows if r["state"] == "running"]
    rate = sum(r["rate_bps"] for r in running)
    eta = None
    if done:
        per_partition = sum(r["bytes_done"] for r in done) / len(done)
        left = per_partition * (len(rows) - len(done)) - sum(r["bytes_done"] for r in running)
        pace = rate or sum(r["rate_bps"] for r in done) / len(done)
        if len(done) == len(rows):
            eta = 0
        elif pace:
            eta = round(max(left, 0) / pace)
    return {"partitions": len(rows), "done": len(done), "running": len(running),
            "pending": states.count("pending"), "retrying": states.count("retrying"),
            "bytes_done": sum(r["bytes_done"] for r in rows), "rate_bps": rate, "eta_s": eta}


def summary_line(summary: dict) -> str:
    """One line for people: ``12 partitions: 4 done, 2 running, 6 pending; 1.2 MiB at ...``."""
    parts = [f"{summary[k]} {k}" for k in ("done", "running", "pending", "retrying")
             if summary[k] or k != "retrying"]
    eta = "unknown" if summary["eta_s"] is None else _duration(summary["eta_s"])
    return (f"{summary['partitions']} partitions: {', '.join(parts)}; "
            f"{render.human_bytes(summary['bytes_done'])} moved at "
            f"{render.human_bytes(summary['rate_bps'])}/s; ETA {eta}")


def reasons(rows: list[dict]) -> list[str]:
    """Why partitions are retrying, one line per fetching node and reason:
    ``n5 retries partitions 3, 17: waiting for n4, which holds it, ...``."""
    retrying: dict[tuple[str, str], list[int]] = {}
    for row in rows:
        if row["state"] == "retrying" and row.get("error"):
            retrying.setdefault((row["to"], row["error"]), []).append(row["partition"])
    return [f"{to} retries partition{'s' if len(qs) > 1 else ''} "
            f"{', '.join(map(str, sorted(qs)))}: {error}"
            for (to, error), qs in sorted(retrying.items())]


def _duration(seconds: int) -> str:
    minutes, secs = divmod(seconds, 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


def _rows(doc: dict) -> list[list]:
    return [[t["partition"], t["from"], t["to"], t["state"], t["keys_done"],
             render.human_bytes(t["bytes_done"]), render.human_bytes(t["rate_bps"]) + "/s"]
            for t in doc["transfers"]]


def fetch() -> dict:
    """The transfers document, with its summary (a field added to the JSON contract)."""
    doc = admin_call({"op": "transfers"})
    doc["summary"] = summarize(doc["transfers"])
    return doc


def view(doc: dict):
    """The table and summary as one rich renderable (for --watch)."""
    from rich.console import Group
    from rich.text import Text

    if not doc["transfers"]:
        return Text("no transfers pending")
    lines = [summary_line(doc["summary"]), *reasons(doc["transfers"])]
    return Group(render.grid(None, COLUMNS, _rows(doc)), Text("\n".join(lines)))


def transfers(
    watch: WatchFlag = False,
    interval: WatchInterval = 2.0,
    count: WatchCount = None,
) -> None:
    """Partition transfers in progress or pending, each with its own progress; a summary."""
    if watch:
        from kvctl.live import watch as live_watch

        live_watch(fetch, view, _print, interval=interval, count=count, as_json=options.json)
        return
    doc = fetch()
    if options.json:
        render.emit_json(doc)
        return
    _print(doc)


def _print(doc: dict) -> None:
    if not doc["transfers"]:
        render.note("no transfers pending")
        return
    render.table(None, COLUMNS, _rows(doc))
    render.note(summary_line(doc["summary"]))
    for line in reasons(doc["transfers"]):
        render.note(line)
