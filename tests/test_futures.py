"""`all_done`: a call's engine futures (resolved on the engine thread) awaited from asyncio with one wake-up."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import Future

from prmserve.engine.futures import all_done


def resolve_later(futures: list[Future], outcomes: list) -> threading.Thread:
    """Settle the futures from another thread, as the engine does: a value, an exception, or None to cancel."""

    def settle() -> None:
        for f, outcome in zip(futures, outcomes):
            if isinstance(outcome, BaseException):
                f.set_exception(outcome)
            elif outcome is None:
                f.cancel()
            else:
                f.set_result(outcome)

    return threading.Thread(target=settle)


def run_with_wakeups(futures: list[Future], outcomes: list):
    """Await all_done(futures) while another thread settles them; (outcome or exception, loop wake-ups asked)."""

    async def main():
        loop = asyncio.get_running_loop()
        wakeups = []
        original = loop.call_soon_threadsafe
        loop.call_soon_threadsafe = lambda *a, **k: (wakeups.append(1), original(*a, **k))[1]
        waiter = all_done(futures)
        thread = resolve_later(futures, outcomes)
        thread.start()
        try:
            return await waiter, len(wakeups)
        except BaseException as exc:  # CancelledError included
            return exc, len(wakeups)
        finally:
            thread.join()

    return asyncio.run(main())


def test_results_in_order_after_one_wake_up():
    futures = [Future() for _ in range(16)]
    result, wakeups = run_with_wakeups(futures, [f"r{i}" for i in range(16)])
    assert result == [f"r{i}" for i in range(16)]
    assert wakeups == 1


def test_the_first_failure_is_raised_without_waiting_for_the_rest():
    futures = [Future() for _ in range(3)]
    error = ValueError("too long for the KV pool")
    outcome, _ = run_with_wakeups(futures, ["ok", error])  # the third never resolves
    assert outcome is error


def test_a_cancelled_future_cancels_the_wait():
    futures = [Future() for _ in range(4)]
    outcome, _ = run_with_wakeups(futures, ["a", None, "c", "d"])
    assert isinstance(outcome, asyncio.CancelledError)


def test_no_futures_is_an_empty_result_at_once():
    async def main():
        return await all_done([])

    assert asyncio.run(main()) == []


def test_futures_resolving_after_the_loop_closed_are_ignored():
    future: Future = Future()

    async def main():
        return all_done([future])

    waiter = asyncio.run(main())  # the loop closes with the wait pending
    future.set_result("late")  # must not raise in the engine thread's callback
    assert not waiter.done()
