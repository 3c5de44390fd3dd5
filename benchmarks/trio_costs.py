"""What trio's primitives cost on this machine (issue 14's analysis of the coordinator's
fan-out, docs/DECISIONS.md "Where a three-node write's CPU goes"): CPU microseconds per
cancel scope, checkpoint, memory channel, task, and per two-leg fan-out as the coordinator
runs one (a task, a cancel scope and a channel outcome per leg, and the wait for both).
Prints figures; never fails."""

from __future__ import annotations

import time

import trio

ROUNDS = 20000


async def main() -> None:
    async with trio.open_nursery() as background:

        def timed(name: str, began: float) -> None:
            print(f"{name:48} {(time.process_time() - began) / ROUNDS * 1e6:6.1f} us")

        began = time.process_time()
        for _ in range(ROUNDS):
            with trio.CancelScope(deadline=trio.current_time() + 1):
                pass
        timed("cancel scope with a deadline, entered and left", began)

        began = time.process_time()
        for _ in range(ROUNDS):
            await trio.lowlevel.checkpoint()
        timed("checkpoint", began)

        began = time.process_time()
        for _ in range(ROUNDS):
            trio.open_memory_channel(2)
        timed("memory channel, opened", began)

        async def nothing() -> None:
            pass

        began = time.process_time()
        for _ in range(ROUNDS):
            background.start_soon(nothing)
            await trio.lowlevel.checkpoint()
        timed("task spawned and run (with one checkpoint)", began)

        async def leg(send: trio.MemorySendChannel) -> None:
            with trio.CancelScope(deadline=trio.current_time() + 1):
                await trio.lowlevel.checkpoint()  # the replica call
            send.send_nowait(None)

        began = time.process_time()
        for _ in range(ROUNDS):
            send, receive = trio.open_memory_channel(2)
            background.start_soon(leg, send)
            background.start_soon(leg, send)
            with trio.move_on_after(1):
                await receive.receive()
                await receive.receive()
        timed("two-leg fan-out: tasks, scopes, channel, wait", began)
        background.cancel_scope.cancel()


if __name__ == "__main__":
    trio.run(main)
