"""Refresh a view in place, like `watch nodetool netstats`: ``--watch`` of status and
transfers. On a terminal the view is redrawn with rich Live; in a pipe each refresh is
printed after the last as the command prints it once (plain columns, or one JSON line
with ``--json``), a log of snapshots."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from kvctl import render


def watch(fetch: Callable[[], dict], show: Callable[[dict], Any],
          print_once: Callable[[dict], None], *, interval: float, count: int | None,
          as_json: bool) -> None:
    """Every ``interval`` seconds ``fetch()`` a document; draw ``show(doc)`` (a rich
    renderable) on a terminal, else ``print_once(doc)``; ``count`` times or until Ctrl-C
    (kvctl then exits 130)."""
    done = 0

    def again() -> bool:
        """Whether another refresh is due (after the interval)."""
        if count is not None and done >= count:
            return False
        time.sleep(interval)
        return True

    if as_json or not render.stdout_is_terminal():
        while True:
            doc = fetch()
            render.emit_json(doc) if as_json else print_once(doc)
            done += 1
            if not again():
                return
    from rich.console import Console
    from rich.live import Live

    with Live(console=Console(), auto_refresh=False) as live:
        while True:
            live.update(show(fetch()), refresh=True)
            done += 1
            if not again():
                return
