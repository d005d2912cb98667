"""Scheduling: priorities (lower first, FIFO within a level), token and sequence budgets, chunked prefill."""

from __future__ import annotations

import random

import pytest
import torch

from prmserve.engine import Engine, EngineConfig, Request
from prmserve.engine.scheduler import RUN_AHEAD_TOKENS
from prmserve.models import BackboneConfig, load_reward_model
from prmserve.models.heads import HeadSpec
from tiny_checkpoints import build
from uncached import uncached_outputs

TOLERANCE = 1e-5


pytestmark = pytest.mark.usefixtures("single_torch_thread")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """The tiny Skywork PRM's backbone and value head, float32 on the CPU."""
    path = build("skywork_prm", tmp_path_factory.mktemp("sched") / "skywork_prm")
    config = BackboneConfig.from_file(path)
    head = HeadSpec("linear", "v_head.summary", out_features=1, bias=True)
    return load_reward_model(path, config, head, torch.device("cpu"), torch.float32)


def engine_for(model, **options) -> Engine:
    options.setdefault("num_kv_blocks", 256)
    options.setdefault("block_size", 4)
    return Engine(model, EngineConfig(**options))


def random_ids(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(1, 400) for _ in range(n)]


def make_request(rid: str, ids: list[int], priority: int = 0) -> Request:
    return Request(rid, ids, list(range(0, len(ids), 3)) + [len(ids) - 1], priority)


def drain(engine: Engine, max_steps: int = 10_000) -> list[Request]:
    done: list[Request] = []
    for _ in range(max_steps):
        if not engine.has_unfinished():
            return done
        done += engine.step()
    raise AssertionError("the engine did not finish")


def check_outputs(model, requests: list[Request]) -> None:
    for r in requests:
        torch.testing.assert_close(r.outputs, uncached_outputs(model, r.token_ids)[r.read_positions], atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("caching", [True, False])
def test_completion_order_is_priority_then_arrival(model, caching):
    rng = random.Random(1)
    engine = engine_for(model, max_num_seqs=1, max_num_batched_tokens=8, enable_prefix_caching=caching)
    priorities = [3, 0, 2, 0, 1, 3, -1, 2, 0, 1]
    requests = [make_request(f"r{i}", random_ids(rng, rng.randint(5, 30)), p) for i, p in enumerate(priorities)]
    for r in requests:
        engine.add(r)
    done = drain(engine)
    expected = sorted(requests, key=lambda r: (r.priority, r.arrival))
    assert [r.request_id for r in done] == [r.request_id for r in expected]
    check_outputs(model, requests)


def test_fifo_within_one_level(model):
    rng = random.Random(2)
    engine = engine_for(model, max_num_seqs=1, max_num_batched_tokens=5)
    requests = [make_request(f"r{i}", random_ids(rng, rng.randint(3, 20)), 5) for i in range(8)]
    for r in requests:
        engine.add(r)
    assert [r.request_id for r in drain(engine)] == [r.request_id for r in requests]


def test_identical_prompts_keep_fifo_order(model):
    """Requests that share their whole prompt still complete in arrival order within a level."""
    rng = random.Random(3)
    ids = random_ids(rng, 21)
    engine = engine_for(model, max_num_seqs=1, max_num_batched_tokens=6)
    requests = [make_request(f"r{i}", list(ids), 0) for i in range(4)]
    for r in requests:
        engine.add(r)
    assert [r.request_id for r in drain(engine)] == [r.request_id for r in requests]
    check_outputs(model, requests)


def test_late_high_priority_request_overtakes_the_queue(model):
    rng = random.Random(4)
    engine = engine_for(model, max_num_seqs=1, max_num_batched_tokens=4)
    low = [make_request(f"low{i}", random_ids(rng, 12), 5) for i in range(3)]
    for r in low:
        engine.add(r)
    done = engine.step() + engine.step()  # low0 is half computed
    assert not done and 0 < low[0].num_done < low[0].num_tokens
    urgent = make_request("urgent", random_ids(rng, 10), 0)
    engine.add(urgent)
    done = drain(engine)
    assert [r.request_id for r in done] == ["urgent", "low0", "low1", "low2"]
    check_outputs(model, low + [urgent])


def test_steps_respect_token_and_sequence_budgets_without_padding(model):
    rng = random.Random(5)
    budget, max_seqs = 13, 3
    engine = engine_for(model, max_num_seqs=max_seqs, max_num_batched_tokens=budget, enable_prefix_caching=False)
    steps = []
    engine.step_observers.append(steps.append)
    requests = [make_request(f"r{i}", random_ids(rng, rng.randint(1, 40)), rng.randint(0, 2)) for i in range(12)]
    for r in requests:
        engine.add(r)
    drain(engine)
    total = sum(r.num_tokens for r in requests)
    assert sum(s.num_tokens for s in steps) == total  # every token computed once, no padding
    assert all(1 <= s.num_seqs <= max_seqs and 1 <= s.num_tokens <= budget for s in steps)
    # Work is packed: only steps that ran out of sequences (or the last) leave budget unused.
    assert sum(1 for s in steps if s.num_tokens < budget and s.num_seqs < max_seqs) <= 1
    assert len(steps) <= -(-total // budget) + sum(1 for s in steps if s.num_seqs == max_seqs)
    check_outputs(model, requests)


def test_scheduled_chunks_are_packed_and_ordered(model):
    """Look at the schedule itself: chunk lengths sum to the budget, one chunk per request, priority order."""
    rng = random.Random(6)
    engine = engine_for(model, max_num_seqs=4, max_num_batched_tokens=10, enable_prefix_caching=False)
    requests = [make_request(f"r{i}", random_ids(rng, 7), p) for i, p in enumerate([2, 1, 0, 1])]
    for r in requests:
        engine.add(r)
    plan = engine.scheduler.schedule()
    assert [(c.request.request_id, c.start, c.end) for c in plan.chunks] == [("r2", 0, 7), ("r1", 0, 3)]
    engine.runner.run(plan.chunks)
    done = engine.scheduler.finish_step(plan)
    assert [r.request_id for r in done] == ["r2"]
    assert requests[1].num_done == 3


def test_memory_shortage_never_lets_a_lower_priority_request_jump_ahead(model):
    rng = random.Random(7)
    # 10 blocks of 4 tokens.
    engine = engine_for(model, num_kv_blocks=10, max_num_seqs=4, max_num_batched_tokens=8, enable_prefix_caching=False)
    big = make_request("big", random_ids(rng, 28), 0)  # 7 blocks
    engine.add(big)
    engine.step()
    mid = make_request("mid", random_ids(rng, 20), 1)  # 5 blocks: must wait for big
    small = make_request("small", random_ids(rng, 4), 2)  # 1 block: would fit now, but is behind mid
    engine.add(mid)
    engine.add(small)
    done = drain(engine)
    assert [r.request_id for r in done] == ["big", "mid", "small"]
    check_outputs(model, [big, mid, small])
    assert engine.stats().kv_blocks_in_use == 0


class FakeEvent:
    """Stands in for a CUDA event of a launched step: counts how often the host waited for it."""

    def __init__(self) -> None:
        self.waits = 0

    def synchronize(self) -> None:
        self.waits += 1

    def query(self) -> bool:
        return False  # still running until waited for


def test_the_next_step_runs_ahead_only_when_the_queue_fills_it(model) -> None:
    """`make_way` keeps one step queued behind the running one when queued work fills a step (the GPU never idles
    while the host schedules), and otherwise says no until the GPU is done, so that arrivals join the next step."""
    rng = random.Random(3)
    engine = engine_for(model, max_num_batched_tokens=64, max_num_seqs=8)
    engine.add(make_request("a", random_ids(rng, 40)))
    assert not engine.scheduler.worth_running_ahead()
    running, queued = FakeEvent(), FakeEvent()
    engine._launched.extend([running, queued])
    assert not engine.make_way()  # 40 of 64 tokens queued: not before the GPU is done, and nothing waited for
    assert (running.waits, queued.waits) == (0, 0) and list(engine._launched) == [running, queued]
    engine.wait_for_gpu()
    assert (running.waits, queued.waits) == (1, 1) and not engine._launched and engine.make_way()

    engine.add(make_request("b", random_ids(rng, 30)))
    assert engine.scheduler.worth_running_ahead()
    running, queued = FakeEvent(), FakeEvent()
    engine._launched.extend([running, queued])
    assert engine.make_way()  # 70 tokens queued: only the older step must be done
    assert (running.waits, queued.waits) == (1, 0) and list(engine._launched) == [queued]
    assert engine.make_way()  # one step in flight is allowed
    assert queued.waits == 0
    check_outputs(model, drain(engine))


def test_a_full_sequence_budget_fills_a_step(model) -> None:
    rng = random.Random(4)
    engine = engine_for(model, max_num_batched_tokens=10_000, max_num_seqs=3)
    for name in "abc":
        assert not engine.scheduler.worth_running_ahead()
        engine.add(make_request(name, random_ids(rng, 5)))
    assert engine.scheduler.worth_running_ahead()
    check_outputs(model, drain(engine))


def test_running_ahead_counts_new_tokens_after_cache_hits(model) -> None:
    """A step is worth launching behind the running one for the tokens it must compute: a child of a cached node
    counts its new tokens only, and RUN_AHEAD_TOKENS of them are enough where the step budget is bigger."""
    rng = random.Random(6)
    engine = engine_for(model, max_num_batched_tokens=64, max_num_seqs=8)
    node = random_ids(rng, 60)
    engine.add(make_request("node", node))
    drain(engine)
    child = make_request("child", node + random_ids(rng, 8))  # 68 tokens, 60 of them cached
    engine.add(child)
    assert not engine.scheduler.worth_running_ahead()
    engine.add(make_request("other", random_ids(rng, 60)))  # 68 + 60 tokens, 8 + 60 to compute
    assert engine.scheduler.worth_running_ahead()
    check_outputs(model, drain(engine))

    engine = engine_for(model, max_num_batched_tokens=10_000, max_num_seqs=64, num_kv_blocks=512)
    engine.add(make_request("a", random_ids(rng, RUN_AHEAD_TOKENS - 1)))
    assert not engine.scheduler.worth_running_ahead()
    engine.add(make_request("b", random_ids(rng, 1)))
    assert engine.scheduler.worth_running_ahead()
    check_outputs(model, drain(engine))


def test_a_small_queue_goes_in_steps_the_cuda_graphs_replay(model) -> None:
    """With graphs of up to `graph_tokens` tokens, a queue of at most GRAPH_SPLIT such steps is cut into as few
    steps of that size as hold it, of even sizes (no small tail step); a bigger queue takes the full token budget.
    The outputs are the same either way."""
    rng = random.Random(5)
    engine = engine_for(model, max_num_batched_tokens=200, max_num_seqs=16, enable_prefix_caching=False)
    engine.scheduler.graph_tokens = 16
    sizes: list[int] = []
    engine.step_observers.append(lambda stats: sizes.append(stats.num_tokens))
    for name in "abcd":  # 4 x 15 = 60 tokens: at most GRAPH_SPLIT (4) steps of 16, so 4 of 15
        engine.add(make_request(name, random_ids(rng, 15)))
    assert engine.scheduler.step_budget() == 15 and engine.scheduler.worth_running_ahead()
    check_outputs(model, drain(engine))
    assert sizes == [15, 15, 15, 15]

    sizes.clear()
    for name, length in zip("xyz", (7, 7, 7)):  # 21 tokens: two steps, 11 + 10 rather than 16 + 5
        engine.add(make_request(name, random_ids(rng, length)))
    check_outputs(model, drain(engine))
    assert sizes == [11, 10]

    sizes.clear()
    for name in "efghi":  # 75 tokens, more than 4 graph steps: full steps while the queue is big
        engine.add(make_request(name, random_ids(rng, 15)))
    assert engine.scheduler.step_budget() == 200
    check_outputs(model, drain(engine))
    assert sizes == [75]
    engine.scheduler.graph_tokens = 400  # graphs as big as the budget change nothing
    assert engine.scheduler.step_budget() == 200
