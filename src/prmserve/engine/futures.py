"""Awaiting the engine's futures from asyncio: one wake-up of the event loop for a whole call."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from concurrent.futures import Future


def all_done(futures: Sequence[Future]) -> asyncio.Future:
    """One awaitable for a call's engine futures: the loop wakes once, when the last is done or the first fails
    (a future each woke it once per request: 128 wake-ups a beam level)."""
    loop = asyncio.get_running_loop()
    waiter = loop.create_future()
    left, lock = [len(futures)], threading.Lock()

    def settle() -> None:
        if waiter.done():
            return
        for f in futures:
            if f.done() and (f.cancelled() or f.exception() is not None):
                if f.cancelled():
                    waiter.cancel()
                else:
                    waiter.set_exception(f.exception())
                return
        if all(f.done() for f in futures):
            waiter.set_result([f.result() for f in futures])

    def done(f: Future) -> None:
        with lock:
            left[0] -= 1
            last = left[0] == 0
        if last or f.cancelled() or f.exception() is not None:
            try:
                loop.call_soon_threadsafe(settle)
            except RuntimeError:  # the loop closed: nobody is waiting any more
                pass

    if not futures:
        waiter.set_result([])
    for f in futures:
        f.add_done_callback(done)
    return waiter
