"""Refresh a view in place, like `watch nodetool netstats`: ``--watch`` of status and
transfers. On a terminal the view is redrawn with rich Live; in a pipe each refresh is
printed after the last (a log of snapshots), and with ``--json`` each is one JSON line."""

from __future__ import annotations

import time
from collections.abc import Callable

from kvctl import render


def watch(fetch: Callable[[], dict], show: Callable[[dict], object], *, interval: float,
          count: int | None, as_json: bool) -> None:
    """Every ``interval`` seconds ``fetch()`` a document and draw ``show(doc)`` (a rich
    renderable), ``count`` times or until Ctrl-C (kvctl then exits 130)."""
    done = 0

    def pause() -> bool:
        """Whether another refresh is due (after the interval)."""
        if count is not None and done >= count:
            return False
        time.sleep(interval)
        return True

    if as_json or not render.stdout.is_terminal:
        while True:
            doc = fetch()
            if as_json:
                render.emit_json(doc)
            else:
                render.stdout.print(show(doc))
            done += 1
            if not pause():
                return
    from rich.live import Live

    with Live(console=render.stdout, auto_refresh=False) as live:
        while True:
            live.update(show(fetch()), refresh=True)
            done += 1
            if not pause():
                return
