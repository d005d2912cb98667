"""Async calls made in one turn of an event loop, handled as one batch on the loop's next turn.

A search scores a level with `asyncio.gather` over one `extend_async` call per live beam: handled one by one, the
engine starts a step on the first call's children while the others are still being tokenised, and a 12-level
replay ran 80-110 steps where 15 would do (each re-reads the weights). Batched, the level's calls are planned
together, their children tokenised in a few batches (`PRM` queues a big level in growing parts of whole calls, so
the GPU starts on the first while the rest are tokenised). A lone call waits one loop turn (microseconds) for company.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Generic, TypeVar

Call = TypeVar("Call")
Outcome = TypeVar("Outcome")


class SameTickBatcher(Generic[Call, Outcome]):
    """`await batcher(call)`: the call's outcome from `handle(calls)`, which gets every call of the same loop turn
    (a list of outcomes, or exceptions, in call order). `discard(outcome)` undoes an outcome whose caller was
    cancelled before it could take it (queued work nobody will collect); `forget(call)`, a call whose caller was
    cancelled before the batch ran (what the call itself holds)."""

    def __init__(self, handle: Callable[[list[Call]], list[Outcome | Exception]], discard: Callable[[Outcome], None],
                 forget: Callable[[Call], None] | None = None) -> None:
        self._handle = handle
        self._discard = discard
        self._forget = forget
        self._waiting: dict[asyncio.AbstractEventLoop, list[tuple[Call, asyncio.Future]]] = {}  # one list per loop

    async def __call__(self, call: Call) -> Outcome:
        loop = asyncio.get_running_loop()
        waiting = self._waiting.get(loop)
        if waiting is None:  # the turn's first call: the batch goes after every callback already due this turn
            waiting = self._waiting[loop] = []
            loop.call_soon(self._run, loop)
        future = loop.create_future()
        waiting.append((call, future))
        try:
            return await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled() and future.exception() is None:
                self._discard(future.result())  # handled, then cancelled before the caller resumed
            raise

    def _run(self, loop: asyncio.AbstractEventLoop) -> None:
        waiting = []
        for call, future in self._waiting.pop(loop):
            if not future.cancelled():
                waiting.append((call, future))
            elif self._forget is not None:
                self._forget(call)
        if not waiting:
            return
        try:
            outcomes = self._handle([call for call, _ in waiting])
        except Exception as exc:  # a failure of the batch as a whole reaches every caller
            outcomes = [exc] * len(waiting)
        for (_, future), outcome in zip(waiting, outcomes, strict=True):
            if isinstance(outcome, Exception):
                future.set_exception(outcome)
            else:
                future.set_result(outcome)
