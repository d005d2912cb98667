"""The engine thread: futures, cancellation, queue limits, and surviving a failed step."""

from __future__ import annotations

import asyncio
import random
import threading
import time

import pytest
import torch

from prmserve import PRM
from prmserve.engine import Engine, EngineConfig, EngineLoop, Request
from prmserve.engine import loop as loop_module
from prmserve.errors import InputTooLongError, InvalidInputError, QueueFullError, RequestCancelledError
from tiny_checkpoints import build
from uncached import uncached_outputs

TOLERANCE = 1e-5
WAIT = 10.0  # seconds; generous for a busy host, never reached when things work


pytestmark = pytest.mark.usefixtures("single_torch_thread")


@pytest.fixture(scope="module")
def prm(tmp_path_factory):
    path = build("skywork_prm", tmp_path_factory.mktemp("loop") / "skywork_prm")
    prm = PRM(str(path), device="cpu", num_kv_blocks=64, block_size=4)
    yield prm
    prm.close()


@pytest.fixture
def loops():
    made: list[EngineLoop] = []
    yield made
    for loop in made:
        loop.shutdown(timeout=WAIT)


def start(prm: PRM, loops: list, **options) -> EngineLoop:
    options.setdefault("num_kv_blocks", 64)
    options.setdefault("block_size", 4)
    loop = EngineLoop(Engine(prm.model, EngineConfig(**options)))
    loops.append(loop)
    return loop


def ids_of(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1, 400) for _ in range(n)]


def wait_until(condition, what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.002)


def wait_idle(loop: EngineLoop) -> None:
    wait_until(lambda: loop.num_pending == 0 and not loop.engine.has_unfinished(), "the loop to go idle")


def assert_clean(engine: Engine) -> None:
    assert not engine.scheduler.requests and not engine.scheduler.queue
    assert all(b.ref_count == 0 for b in engine.blocks.blocks)
    assert engine.stats().kv_blocks_in_use == 0


class Gate:
    """Wraps the runner's `run`: after each forward, waits until the test opens the gate."""

    def __init__(self, engine: Engine) -> None:
        self.original = engine.runner.run
        self.entered = threading.Event()
        self.opened = threading.Event()
        engine.runner.run = self.run

    def run(self, chunks):
        self.original(chunks)
        self.entered.set()
        assert self.opened.wait(WAIT)

    def wait_entered(self) -> None:
        assert self.entered.wait(WAIT)


def check_result(model, future, ids, reads) -> None:
    request = future.result(timeout=WAIT)
    torch.testing.assert_close(request.outputs, uncached_outputs(model, ids)[reads], atol=TOLERANCE, rtol=0)


def test_futures_resolve_to_finished_requests(prm, loops):
    loop = start(prm, loops, max_num_batched_tokens=9)
    cases = [(ids_of(n, n), [0, n // 2, n - 1]) for n in (5, 17, 30, 8)]
    futures = [loop.submit(ids, reads) for ids, reads in cases]
    for future, (ids, reads) in zip(futures, cases):
        check_result(prm.model, future, ids, reads)
        assert future.result().usage.prompt_tokens == len(ids)
    wait_idle(loop)
    assert_clean(loop.engine)


def test_cancelling_a_half_computed_request_aborts_it(prm, loops):
    loop = start(prm, loops, max_num_batched_tokens=4, max_num_seqs=1)
    gate = Gate(loop.engine)
    ids = ids_of(40, 1)
    running = loop.submit(ids, [39])
    queued = loop.submit(ids_of(12, 2), [11])
    gate.wait_entered()  # the first chunk of `running` is computed; the loop waits inside the step
    assert running.cancel() and queued.cancel()
    gate.opened.set()
    wait_idle(loop)
    assert running.cancelled() and queued.cancelled()
    assert_clean(loop.engine)
    assert loop.engine.stats().prompt_tokens == 0  # neither finished
    # The loop still serves, and the aborted prefix is reused or recomputed correctly.
    later = loop.submit(ids, [0, 20, 39])
    check_result(prm.model, later, ids, [0, 20, 39])
    wait_idle(loop)
    assert_clean(loop.engine)


def test_cancelling_a_queued_request_before_the_loop_sees_it(prm, loops):
    loop = start(prm, loops, max_num_batched_tokens=4, max_num_seqs=1)
    gate = Gate(loop.engine)
    first = loop.submit(ids_of(10, 3), [9])
    gate.wait_entered()
    cancelled = [loop.submit(ids_of(10, 4 + k), [9]) for k in range(3)]
    for f in cancelled:
        assert f.cancel()
    gate.opened.set()
    first.result(timeout=WAIT)
    wait_idle(loop)
    assert_clean(loop.engine)
    assert loop.engine.stats().prompt_tokens == 10


def test_max_queue_gives_queue_full_error(prm, loops):
    """The one limit: pending requests, the one being computed included; more at once than it holds is invalid."""
    loop = start(prm, loops, max_queue=3)
    gate = Gate(loop.engine)
    with pytest.raises(InvalidInputError, match="can never fit the queue of 3"):
        loop.submit_many([(ids_of(6, k), [5]) for k in range(4)])
    futures = loop.submit_many([(ids_of(6, k), [5]) for k in range(3)])
    gate.wait_entered()
    assert loop.engine.stats().num_waiting == 0  # all three are being computed, and still count
    with pytest.raises(QueueFullError, match="retry later"):
        loop.submit(ids_of(6, 9), [5])
    gate.opened.set()
    for f in futures:
        f.result(timeout=WAIT)
    wait_idle(loop)
    # Room again once they finished.
    check_result(prm.model, loop.submit(ids_of(6, 9), [5]), ids_of(6, 9), [5])


def test_prm_max_queue_option(tmp_path_factory):
    path = build("skywork_prm", tmp_path_factory.mktemp("loopq") / "skywork_prm")
    prm = PRM(str(path), device="cpu", num_kv_blocks=64, block_size=4, max_queue=2)
    try:
        gate = Gate(prm.engine)
        item = {"problem": "What is 1+2?", "steps": ["1+2=3."]}
        with pytest.raises(InvalidInputError):
            prm.score([item] * 3)
        held = prm.submit_jobs(prm.plan_score([item] * 2))
        with pytest.raises(QueueFullError):
            prm.score([item])
        gate.opened.set()
        for future in held:
            future.result(timeout=WAIT)
        wait_idle(prm.loop)
        assert len(prm.score([item] * 2)) == 2
    finally:
        prm.close()


def test_a_failing_step_fails_in_flight_futures_and_the_loop_survives(prm, loops):
    loop = start(prm, loops, max_num_batched_tokens=8)
    engine = loop.engine
    original = engine.runner.run
    calls = {"n": 0}

    def flaky(chunks):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("device fell over")
        original(chunks)

    engine.runner.run = flaky
    cases = [(ids_of(20 + k, 10 + k), [0, 19]) for k in range(4)]
    futures = [loop.submit(ids, reads) for ids, reads in cases]
    with pytest.raises(RuntimeError, match="device fell over"):
        futures[0].result(timeout=WAIT)
    for future, (ids, reads) in zip(futures[1:], cases[1:]):
        try:
            check_result(prm.model, future, ids, reads)
        except RuntimeError as exc:  # in flight when the step failed
            assert "device fell over" in str(exc)
    wait_idle(loop)
    assert_clean(engine)
    # Later requests are served correctly, including ones whose prefix the failed step was computing.
    again = [loop.submit(ids, reads) for ids, reads in cases]
    for future, (ids, reads) in zip(again, cases):
        check_result(prm.model, future, ids, reads)
    wait_idle(loop)
    assert_clean(engine)


def test_engine_errors_at_add_fail_only_that_future(prm, loops):
    loop = start(prm, loops, num_kv_blocks=4, block_size=4)
    too_long = loop.submit(ids_of(17, 1), [16])
    fine = loop.submit(ids_of(16, 2), [15])
    with pytest.raises(InputTooLongError):
        too_long.result(timeout=WAIT)
    check_result(prm.model, fine, ids_of(16, 2), [15])
    wait_idle(loop)
    assert loop.num_pending == 0


def test_shutdown_finishes_submitted_work_then_refuses(prm):
    loop = EngineLoop(Engine(prm.model, EngineConfig(num_kv_blocks=64, block_size=4, max_num_batched_tokens=5)))
    futures = [loop.submit(ids_of(15, k), [14]) for k in range(3)]
    loop.shutdown(timeout=WAIT)
    assert all(f.done() and not f.cancelled() for f in futures)
    with pytest.raises(RequestCancelledError):
        loop.submit([1, 2, 3], [2])


def test_cancelling_score_async_aborts_its_requests(prm):
    gate = Gate(prm.engine)
    items = [{"problem": "What is 12+30?", "steps": ["12+30=42.", "So the answer is 42."]}] * 3

    async def main():
        task = asyncio.ensure_future(prm.score_async(items))
        await asyncio.sleep(0)
        await asyncio.get_running_loop().run_in_executor(None, gate.wait_entered)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    try:
        asyncio.run(main())
    finally:
        gate.opened.set()
        prm.engine.runner.run = gate.original
    wait_idle(prm.loop)
    assert_clean(prm.engine)
    results = prm.score(items)
    assert results[0].step_rewards == pytest.approx(results[1].step_rewards, abs=TOLERANCE)


def test_submit_racing_shutdown_never_leaves_a_future_unresolved(prm, monkeypatch):
    """BUG: `EngineLoop.submit` checks `_stopping` under the lock but puts its ("add", ...) message in the
    inbox after releasing it. A `shutdown()` that runs in between enqueues "stop" first; the loop thread,
    finding the engine idle, exits, and the late "add" is never read: the future stays pending forever
    (a `PRM.score` caller racing `PRM.close()` hangs).
    Fix: build the Request and Future first, then check `_stopping`, count it and `_inbox.put` it all under
    `self._lock` (shutdown takes the same lock before it enqueues "stop"), or have the thread, on exit,
    drain the inbox and fail every leftover "add" with RequestCancelledError."""
    import prmserve.engine.loop as loop_module

    loop = EngineLoop(Engine(prm.model, EngineConfig(num_kv_blocks=64, block_size=4)))
    building, proceed = threading.Event(), threading.Event()
    real_request = loop_module.Request

    def slow_request(*args, **kwargs):
        building.set()
        assert proceed.wait(WAIT)
        return real_request(*args, **kwargs)

    monkeypatch.setattr(loop_module, "Request", slow_request)
    holder = {}

    def submitter():
        try:
            holder["future"] = loop.submit(ids_of(6, 1), [5])
        except RequestCancelledError as exc:
            holder["refused"] = exc

    thread = threading.Thread(target=submitter)
    thread.start()
    assert building.wait(WAIT)  # submit passed its checks and is building the request
    stopper = threading.Thread(target=loop.shutdown, kwargs={"timeout": WAIT})
    stopper.start()
    time.sleep(0.2)  # let shutdown enqueue "stop" (it may also wait for the submit, if fixed that way)
    proceed.set()
    thread.join(WAIT)
    stopper.join(WAIT)
    if "refused" in holder:
        return  # refusing the submit is a fine outcome
    future = holder["future"]
    try:
        future.result(timeout=2)  # resolved: served before stopping
    except RequestCancelledError:
        pass  # failed as cancelled: also fine
    except TimeoutError:
        pytest.fail("the future of a submit accepted during shutdown never resolves")


def test_request_ids_are_unique_and_a_forked_child_draws_its_own():
    """Handles are request ids: one process never repeats one, and a forked worker never reissues its parent's."""
    import os

    from prmserve.engine.request import new_request_id

    ids = [new_request_id() for _ in range(1000)]
    assert len(set(ids)) == 1000
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report one id and leave at once
        os.write(write, new_request_id().encode())
        os._exit(0)
    os.waitpid(pid, 0)
    child = os.read(read, 100).decode()
    assert len(child) == len(ids[0]) and child[:20] != ids[0][:20]


class BusyGPU:
    """Stands in for the CUDA events of launched steps on CPU: every step "runs on the GPU" until `finish`."""

    def __init__(self, engine: Engine) -> None:
        self.done = threading.Event()
        self.busy_at_step: list[bool] = []  # per step: was the previous step still "running" when this one began
        inner = engine.step

        def step():
            self.busy_at_step.append(bool(engine._launched) and not self.done.is_set())
            finished = inner()
            engine._launched.append(self)
            return finished

        engine.step = step

    def query(self) -> bool:
        return self.done.is_set()

    def synchronize(self) -> None:
        assert self.done.wait(WAIT)


def test_work_that_arrives_while_the_gpu_runs_is_launched_behind_it_when_worth_a_step(prm, loops):
    """While a step runs and unfinished work waits, the loop takes in arrivals: once the queue is worth a step of its
    own, that step is launched behind the running one; a remainder too small for one waits for the GPU instead."""
    loop = start(prm, loops, max_num_batched_tokens=16)
    gpu = BusyGPU(loop.engine)
    long_ids, other_ids = ids_of(20, 1), ids_of(10, 2)
    first = loop.submit(long_ids, [19])  # 16 tokens now, 4 left: too few to launch behind the running step
    wait_until(lambda: len(gpu.busy_at_step) == 1, "the first step")
    time.sleep(0.02)
    assert len(gpu.busy_at_step) == 1  # the loop waits for the GPU: 4 queued tokens are not worth a step
    second = loop.submit(other_ids, [0, 9])  # 4 + 10 tokens: still under the 16 of a step
    time.sleep(0.02)
    assert len(gpu.busy_at_step) == 1
    third = loop.submit(ids_of(6, 3), [5])  # 20 queued tokens: a full step
    wait_until(lambda: len(gpu.busy_at_step) == 2, "a step behind the running one")
    assert gpu.busy_at_step == [False, True]
    time.sleep(0.02)
    assert len(gpu.busy_at_step) == 2  # 4 tokens left: they wait for the GPU
    gpu.done.set()
    check_result(prm.model, first, long_ids, [19])
    check_result(prm.model, second, other_ids, [0, 9])
    third.result(timeout=WAIT)
    assert gpu.busy_at_step == [False, True, False]
    wait_idle(loop)
    assert_clean(loop.engine)


def test_the_first_part_of_a_call_is_launched_before_the_next_is_planned(prm, loops, monkeypatch):
    """Handing off (on by default on a GPU): the first part of a call given in parts to an idle engine returns once
    the engine has launched it, so planning the next part does not compete with that step's preparation; the last
    part, or one given to a busy engine, returns at once."""
    loop = start(prm, loops, max_num_batched_tokens=64)
    loop.hand_off_first_part = True
    monkeypatch.setattr(loop_module, "HAND_OFF_S", WAIT)  # a slow CI host takes longer than a GPU's launch
    first, second = (Request(f"part-{i}", ids_of(12, 20 + i), [11]) for i in range(2))
    with loop.reserve(2) as room:
        assert room.hand_off
        futures = room.submit([first])
        assert first.scheduled_at is not None  # the engine took it before the caller went on
        futures += room.submit([second])
    for future, request in zip(futures, (first, second)):
        check_result(prm.model, future, request.token_ids, [11])

    gate = Gate(loop.engine)  # a step that cannot finish: the hand-off gives up after HAND_OFF_S
    blocker = loop.submit(ids_of(8, 30), [7])
    gate.wait_entered()
    with loop.reserve(2) as room:
        assert not room.hand_off  # the engine is busy: nothing to hand off to
    gate.opened.set()
    blocker.result(timeout=WAIT)
    wait_idle(loop)
    gate.opened.clear()  # the next step is held in the gate again
    monkeypatch.setattr(loop_module, "HAND_OFF_S", 0.05)
    late = Request("late", ids_of(10, 31), [9])
    began = time.monotonic()
    with loop.reserve(2) as room:
        assert room.hand_off
        futures = room.submit([late])  # its step is held in the gate: the wait is bounded
        assert time.monotonic() - began < 1.0
        gate.opened.set()
        futures += room.submit([Request("later", ids_of(4, 33), [3])])
    for future in futures:
        future.result(timeout=WAIT)
    wait_idle(loop)
    assert_clean(loop.engine)
