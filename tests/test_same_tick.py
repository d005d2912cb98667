"""Async calls of one event-loop turn queued together: `SameTickBatcher`, and `PRM.score_async`/`extend_async` through it.

A search's `asyncio.gather` over a level's calls must reach the engine as one submission (one tokenizer batch for the
children; a big level in growing parts, so the GPU starts early), give each call exactly what it would get alone, and
keep each call's errors and cancellation its own.
"""

from __future__ import annotations

import asyncio

import pytest

from prmserve import PRM
from prmserve.errors import EngineSleepingError, HandleNotFoundError, InvalidInputError, QueueFullError
from prmserve.same_tick import SameTickBatcher
from tiny_checkpoints import FORMAT_OF, build

PROBLEM = "Tom has 3 apples and buys 2 more, then gives away 1. How many apples does he have?"
NODES = [["Tom has 3 apples."], ["Tom has 3 apples.", "He buys 2 more: 3 + 2 = 5."]]
CHILDREN = [[["He gives 1 away: 5 - 1 = 4."], ["The answer is 4."]], [["5 - 1 = 4 apples."], ["So 4.", "Done."]]]

pytestmark = pytest.mark.usefixtures("single_torch_thread")


# The batcher alone ------------------------------------------------------------------------------


def test_calls_of_one_turn_form_one_batch_and_get_their_own_outcomes():
    batches: list[list[int]] = []

    def handle(calls: list[int]) -> list[int | Exception]:
        batches.append(calls)
        return [ValueError(f"no {c}") if c < 0 else c * 10 for c in calls]

    async def main():
        batcher = SameTickBatcher(handle, lambda outcome: None)
        first = await asyncio.gather(batcher(1), batcher(-2), batcher(3), return_exceptions=True)
        second = await asyncio.gather(batcher(4), batcher(5))
        return first, second

    first, second = asyncio.run(main())
    assert batches == [[1, -2, 3], [4, 5]]
    assert first[0] == 10 and first[2] == 30 and isinstance(first[1], ValueError) and str(first[1]) == "no -2"
    assert second == [40, 50]


def test_a_failing_batch_fails_each_of_its_calls():
    def handle(calls: list[int]) -> list[int]:
        raise RuntimeError("the batch broke")

    async def main():
        batcher = SameTickBatcher(handle, lambda outcome: None)
        return await asyncio.gather(batcher(1), batcher(2), return_exceptions=True)

    outcomes = asyncio.run(main())
    assert [str(o) for o in outcomes] == ["the batch broke", "the batch broke"]


def test_a_call_cancelled_before_its_batch_is_left_out():
    batches: list[list[int]] = []

    async def main():
        batcher = SameTickBatcher(lambda calls: batches.append(calls) or calls, lambda outcome: None)
        cancelled = asyncio.ensure_future(batcher(1))
        kept = asyncio.ensure_future(batcher(2))
        await asyncio.sleep(0)  # both registered; the batch runs on the next turn
        cancelled.cancel()
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        return await kept

    assert asyncio.run(main()) == 2
    assert batches == [[2]]


def test_a_call_cancelled_before_its_batch_is_forgotten_when_asked():
    forgotten: list[int] = []

    async def main():
        batcher = SameTickBatcher(lambda calls: calls, lambda outcome: None, forgotten.append)
        cancelled = asyncio.ensure_future(batcher(1))
        kept = asyncio.ensure_future(batcher(2))
        await asyncio.sleep(0)
        cancelled.cancel()
        return await kept

    assert asyncio.run(main()) == 2
    assert forgotten == [1]  # what the cancelled call held is let go; the kept one's is not


def test_a_call_cancelled_after_its_batch_has_its_outcome_discarded():
    discarded: list[int] = []

    async def main():
        batcher = SameTickBatcher(lambda calls: [c * 2 for c in calls], discarded.append)
        task = asyncio.ensure_future(batcher(3))
        await asyncio.sleep(0)  # registered; the batch is due this coming turn
        asyncio.get_running_loop().call_soon(task.cancel)  # after the batch, before the caller resumes
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert discarded == [6]


# Through PRM ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return build("qwen_prm", tmp_path_factory.mktemp("same_tick") / "qwen_prm")


@pytest.fixture
def make_prm(checkpoint):
    made: list[PRM] = []

    def make(**options) -> PRM:
        prm = PRM(str(checkpoint), format=FORMAT_OF["qwen_prm"], device="cpu", dtype="float32", **options)
        made.append(prm)
        return prm

    yield make
    for prm in made:
        prm.close()


def flat(results) -> list[float]:
    return [reward for result in results for reward in result.step_rewards]


def count_submissions(prm: PRM, monkeypatch) -> list[int]:
    """The request count of each submission to the engine's queue."""
    sizes: list[int] = []
    original = prm.loop.submit_requests

    def counted(requests):
        sizes.append(len(requests))
        return original(requests)

    monkeypatch.setattr(prm.loop, "submit_requests", counted)
    return sizes


def test_gathered_extends_and_scores_reach_the_engine_as_one_submission(make_prm, monkeypatch):
    prm = make_prm()
    nodes = prm.score([{"problem": PROBLEM, "steps": steps} for steps in NODES], keep=True)
    alone = [prm.extend(node.handle, kids) for node, kids in zip(nodes, CHILDREN)]
    scored_alone = prm.score([{"problem": PROBLEM, "steps": ["3 + 2 = 5.", "5 - 1 = 4."]}])
    sizes = count_submissions(prm, monkeypatch)

    async def level():
        return await asyncio.gather(*(prm.extend_async(node.handle, kids) for node, kids in zip(nodes, CHILDREN)),
                                    prm.score_async([{"problem": PROBLEM, "steps": ["3 + 2 = 5.", "5 - 1 = 4."]}]))

    *together, scored = asyncio.run(level())
    assert sizes == [5]  # 2 + 2 children and 1 item, queued at once
    for a, b in zip(together, alone):
        assert flat(a) == pytest.approx(flat(b), abs=1e-6)
    assert scored[0].step_rewards == pytest.approx(scored_alone[0].step_rewards, abs=1e-6)
    full = prm.score([{"problem": PROBLEM, "steps": NODES[1] + kid} for kid in CHILDREN[1]])  # the ids as a whole item's
    assert flat(together[1]) == pytest.approx(flat(full), abs=1e-6)
    prm.release([node.handle for node in nodes])


def test_gathered_calls_that_finish_together_are_collected_in_one_rewards_operation(make_prm, monkeypatch):
    """The calls of a level finish in one engine step: their rewards are computed and copied to the host once, and
    each call still gets its own results and handles, equal to single calls'."""
    prm = make_prm()
    nodes = prm.score([{"problem": PROBLEM, "steps": steps} for steps in NODES], keep=True)
    alone = [prm.extend(node.handle, kids) for node, kids in zip(nodes, CHILDREN)]
    rows: list[int] = []
    original = prm.format.rewards
    monkeypatch.setattr(prm.format, "rewards", lambda outputs: rows.append(len(outputs)) or original(outputs))

    async def level():
        return await asyncio.gather(*(prm.extend_async(node.handle, kids, keep=True) for node, kids in zip(nodes, CHILDREN)))

    together = asyncio.run(level())
    assert len(rows) == 1  # both calls' 4 children in one operation
    assert rows[0] == sum(len(r.step_rewards) - len(node.step_rewards) for node, kids in zip(nodes, together) for r in kids)
    for a, b in zip(together, alone):
        assert flat(a) == pytest.approx(flat(b), abs=1e-6)
    handles = [r.handle for kids in together for r in kids]
    assert len(set(handles)) == 4 and all(h is not None for h in handles)
    assert prm.release(handles) == 4
    prm.release([node.handle for node in nodes])


def test_each_gathered_call_keeps_its_own_error(make_prm, monkeypatch):
    prm = make_prm()
    node = prm.score([{"problem": PROBLEM, "steps": NODES[0]}], keep=True)[0]
    sizes = count_submissions(prm, monkeypatch)

    async def level():
        return await asyncio.gather(
            prm.extend_async("no-such-handle", CHILDREN[0]),
            prm.extend_async(node.handle, "not a list of children"),
            prm.extend_async(node.handle, [["ok"], [""]]),  # the second child's step is empty
            prm.extend_async(node.handle, CHILDREN[0]),
            prm.score_async([{"problem": PROBLEM, "steps": []}]),
            return_exceptions=True)

    missing, shapeless, empty_step, fine, no_steps = asyncio.run(level())
    assert isinstance(missing, HandleNotFoundError)
    assert isinstance(shapeless, InvalidInputError) and "children" in str(shapeless)
    assert isinstance(empty_step, InvalidInputError) and "child 1" in str(empty_step)
    assert isinstance(no_steps, InvalidInputError)
    assert sizes == [2]  # only the good call's children were queued
    assert flat(fine) == pytest.approx(flat(prm.extend(node.handle, CHILDREN[0])), abs=1e-6)


def test_a_queue_too_small_for_the_batch_takes_each_call_alone(make_prm):
    prm = make_prm(max_queue=3)
    node = prm.score([{"problem": PROBLEM, "steps": NODES[0]}], keep=True)[0]
    three = [["a step."], ["another step."], ["a third step."]]

    async def level():
        return await asyncio.gather(prm.extend_async(node.handle, three), prm.extend_async(node.handle, three),
                                    return_exceptions=True)

    first, second = asyncio.run(level())  # six requests at once exceed the queue; the first call's three fit
    assert [len(r.step_rewards) for r in first] == [2, 2, 2]
    assert isinstance(second, QueueFullError)
    assert prm.num_pending == 0


def test_a_gathered_call_cancelled_before_its_turn_queues_nothing(make_prm, monkeypatch):
    prm = make_prm()
    node = prm.score([{"problem": PROBLEM, "steps": NODES[0]}], keep=True)[0]
    sizes = count_submissions(prm, monkeypatch)
    handles = len(prm.nodes)

    async def main():
        task = asyncio.ensure_future(prm.extend_async(node.handle, CHILDREN[0], keep=True))
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert sizes == [] and len(prm.nodes) == handles and prm.num_pending == 0


def count_enqueued(prm: PRM, monkeypatch, fail_after: int | None = None) -> list[int]:
    """The request count of each message to the engine's queue (whole submissions and reserved parts alike);
    `fail_after`: later ones are refused as if the engine fell asleep."""
    sizes: list[int] = []
    original = prm.loop._enqueue

    def counted(requests):
        if fail_after is not None and len(sizes) >= fail_after:
            raise EngineSleepingError("asleep")
        sizes.append(len(requests))
        return original(requests)

    monkeypatch.setattr(prm.loop, "_enqueue", counted)
    return sizes


FOUR = [["5 - 1 = 4."], ["He has 4 apples."], ["The answer is 4."], ["So 4 apples remain."]]


def test_a_big_level_goes_in_growing_parts_of_whole_calls(make_prm, monkeypatch):
    prm = make_prm()
    node = prm.score([{"problem": PROBLEM, "steps": NODES[1]}], keep=True)[0]
    kids = [[[f"({call}) {steps[0]}"] for steps in FOUR] for call in range(20)]  # 80 children: more than one part
    alone = [prm.extend(node.handle, k) for k in kids[:3]]
    prm.reset_prefix_cache()
    node = prm.score([{"problem": PROBLEM, "steps": NODES[1]}], keep=True)[0]
    sizes = count_enqueued(prm, monkeypatch)

    async def level():
        return await asyncio.gather(*(prm.extend_async(node.handle, k) for k in kids))

    together = asyncio.run(level())
    assert sizes == [32, 48]  # 8 calls of 4 children (the first part's 32), then the other 12 calls
    assert [len(r) for r in together] == [4] * 20
    for a, b in zip(together, alone):
        assert flat(a) == pytest.approx(flat(b), abs=1e-6)
    full = prm.score([{"problem": PROBLEM, "steps": NODES[1] + k} for k in kids[19]])
    assert flat(together[19]) == pytest.approx(flat(full), abs=1e-6)
    assert prm.num_pending == 0


def test_a_part_refused_midway_fails_only_the_calls_not_yet_queued(make_prm, monkeypatch):
    prm = make_prm()
    node = prm.score([{"problem": PROBLEM, "steps": NODES[1]}], keep=True)[0]
    kids = [[[f"({call}) {steps[0]}"] for steps in FOUR] for call in range(20)]
    sizes = count_enqueued(prm, monkeypatch, fail_after=1)

    async def level():
        return await asyncio.gather(*(prm.extend_async("no-such-handle" if i == 10 else node.handle, k, keep=True)
                                      for i, k in enumerate(kids)), return_exceptions=True)

    handles = len(prm.nodes)
    outcomes = asyncio.run(level())
    assert sizes == [32]
    assert all(isinstance(o, list) and len(o) == 4 and all(r.handle for r in o) for o in outcomes[:8])
    assert isinstance(outcomes[10], HandleNotFoundError)  # its own error, not the refusal of its part
    assert all(isinstance(o, EngineSleepingError) for i, o in enumerate(outcomes[8:], 8) if i != 10)
    assert len(prm.nodes) == handles + 32  # only the queued calls' children were kept
    assert prm.num_pending == 0  # the refused parts' reserved room was given back


def test_a_queue_too_small_for_a_big_level_takes_each_call_alone(make_prm):
    prm = make_prm(max_queue=70)
    node = prm.score([{"problem": PROBLEM, "steps": NODES[1]}], keep=True)[0]
    kids = [[[f"({call}) {steps[0]}"] for steps in FOUR] for call in range(20)]

    async def level():
        return await asyncio.gather(*(prm.extend_async(node.handle, k) for k in kids), return_exceptions=True)

    outcomes = asyncio.run(level())  # 80 at once exceed the queue of 70: each call alone, so 17 fit and 3 are refused
    assert sum(isinstance(o, list) for o in outcomes) == 17
    assert all(isinstance(o, QueueFullError) for o in outcomes[17:])
    assert prm.num_pending == 0
