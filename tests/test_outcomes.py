"""kvd.node.outcomes: a fan-out's outcomes reach one receiver at a time, in arrival order;
the ones nobody waited for stay for the next receiver (read repair, late twins)."""

from __future__ import annotations

import pytest
import trio

from kvd.node.outcomes import Outcomes


async def test_outcomes_arrive_in_order_and_wake_a_waiting_receiver(autojump_clock):
    outcomes = Outcomes[int]()
    got = []

    async def receiver() -> None:
        for _ in range(3):
            got.append(await outcomes.receive())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(receiver)
        await trio.sleep(1)  # the receiver waits
        outcomes.send_nowait(1)
        outcomes.send_nowait(2)
        await trio.sleep(1)
        outcomes.send_nowait(3)
    assert got == [1, 2, 3]


async def test_a_cancelled_receiver_leaves_later_outcomes_to_the_next(autojump_clock):
    outcomes = Outcomes[str]()
    with trio.move_on_after(1) as waited:
        await outcomes.receive()
    assert waited.cancelled_caught
    outcomes.send_nowait("late")  # nobody waits now: kept
    outcomes.send_nowait("later")
    assert [await outcomes.receive(), await outcomes.receive()] == ["late", "later"]


async def test_one_receiver_at_a_time(autojump_clock):
    outcomes = Outcomes[int]()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(outcomes.receive)
        await trio.sleep(1)
        with pytest.raises(RuntimeError, match="one receiver"):
            await outcomes.receive()
        nursery.cancel_scope.cancel()
