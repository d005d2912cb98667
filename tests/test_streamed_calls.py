"""Big calls are planned and queued in parts, so the engine starts on the first part while the rest are tokenised;
they are still admitted or refused as a whole, and a bad item in a later part leaves nothing behind."""

from __future__ import annotations

import threading

import pytest

import prmserve.prm as prm_module
from prmserve import PRM
from prmserve.engine.loop import Reservation
from prmserve.errors import InvalidInputError, QueueFullError
from tiny_checkpoints import build

WAIT = 10.0

pytestmark = pytest.mark.usefixtures("single_torch_thread")


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    return build("qwen_prm", tmp_path_factory.mktemp("streamed") / "qwen_prm")


def items(count: int) -> list[dict]:
    return [{"problem": f"What is {k} + {k % 7}?", "steps": [f"{k} + {k % 7} = {k + k % 7}.", f"So {k + k % 7}."]}
            for k in range(count)]


def test_parts_grow_and_cover_every_item():
    bounds = prm_module._parts(1000)
    assert bounds[0] == (0, 32) and bounds[1] == (32, 96)
    assert [b - a for a, b in bounds][:5] == [32, 64, 128, 256, 256]
    assert all(a == b for (_, a), (b, _) in zip(bounds, bounds[1:])) and bounds[-1][1] == 1000
    assert prm_module._parts(65) == [(0, 32), (32, 65)]


def test_the_engine_starts_before_the_last_part_is_planned(path):
    """The last part's planning waits until the engine has run a step: without early queueing this would time out."""
    prm = PRM(str(path), device="cpu")
    try:
        plan = prm.plan_score
        seen = []

        def gated(chunk, *args, first_index=0, **kwargs):
            if first_index + len(chunk) == 200:  # the last part
                stepped = threading.Event()
                prm.engine.step_observers.append(lambda stats: stepped.set())
                seen.append(stepped.wait(WAIT))
            return plan(chunk, *args, first_index=first_index, **kwargs)

        prm.plan_score = gated
        streamed = prm.score(items(200))
        assert seen == [True]
        del prm.plan_score
        prm.reset_prefix_cache()
        prm.recent.clear()
        whole = [prm.score([item])[0] for item in items(200)]  # each alone: nothing shared, nothing cached
        assert [r.step_rewards for r in streamed] == [r.step_rewards for r in whole]  # deterministic: bit-identical
        assert [r.usage.prompt_tokens for r in streamed] == [r.usage.prompt_tokens for r in whole]
    finally:
        prm.close()


def test_a_bad_item_in_a_later_part_cancels_the_queued_parts(path, monkeypatch):
    prm = PRM(str(path), device="cpu")
    try:
        batch = items(150)
        batch[140] = {"problem": "Broken", "steps": []}
        queued = []
        submit = Reservation.submit
        monkeypatch.setattr(Reservation, "submit", lambda self, requests: queued.append(len(requests)) or submit(self, requests))
        with pytest.raises(InvalidInputError, match="^item 140: 'steps' must be a non-empty list"):
            prm.score(batch, keep=True)
        assert queued == [32, 64]  # the parts before the bad one were queued, then cancelled
        prm.loop.shutdown(timeout=WAIT)  # lets whatever was queued finish (or be aborted), then stops
        stats = prm.engine.stats()
        assert prm.loop.num_pending == 0 and stats.kv_blocks_pinned == 0 and len(prm.nodes) == 0
        assert not prm.engine.has_unfinished()
    finally:
        prm.close()


def test_a_big_call_is_admitted_or_refused_whole(path):
    prm = PRM(str(path), device="cpu", max_queue=120)
    try:
        with pytest.raises(InvalidInputError, match="can never fit the queue of 120"):
            prm.score(items(121))
        room = prm.loop.reserve(30)  # 30 pending elsewhere
        with pytest.raises(QueueFullError, match="retry later"):
            prm.score(items(100))
        assert prm.loop.num_pending == 30  # nothing of the refused call was queued
        room.close()
        assert prm.loop.num_pending == 0
        assert len(prm.score(items(100))) == 100
        assert prm.loop.num_pending == 0
    finally:
        prm.close()


def test_a_request_cancelled_while_it_is_tokenised_drops_what_it_queues():
    """The server plans and queues in its tokenizer pool; if the client's task is cancelled meanwhile, the work
    queued by the pool thread is cancelled and its kept nodes let go once that thread is done."""
    import asyncio
    from concurrent.futures import Future, ThreadPoolExecutor

    from prmserve.server.app import _queued

    class FakePRM:
        abandoned: list = []
        drop = PRM.drop  # the real one: cancels the futures, then `abandon`

        def abandon(self, jobs):
            self.abandoned.append(jobs)

    prm, release, started = FakePRM(), threading.Event(), threading.Event()
    queued = [Future(), Future()]

    def work():
        started.set()
        assert release.wait(WAIT)
        return ["job"], queued

    async def go():
        with ThreadPoolExecutor(1) as pool:
            task = asyncio.ensure_future(_queued(prm, pool, work))
            await asyncio.get_running_loop().run_in_executor(None, started.wait, WAIT)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            release.set()
        await asyncio.sleep(0.05)  # the pool's result reaches the loop's callback

    asyncio.run(go())
    assert all(f.cancelled() for f in queued) and prm.abandoned == [["job"]]
