"""The engine's prefix cache, chunked prefill and KV accounting, checked against the plain (uncached) model."""

from __future__ import annotations

import random

import pytest
import torch

from prmserve import PRM
from prmserve.engine import Engine, EngineConfig, Request
from prmserve.errors import InputTooLongError
from tiny_checkpoints import build
from uncached import uncached_outputs

TOLERANCE = 1e-5
CHECKPOINTS = ("qwen_prm", "skywork_prm")


pytestmark = pytest.mark.usefixtures("single_torch_thread")


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine_cache_ckpts")
    return {name: build(name, root / name) for name in CHECKPOINTS}


@pytest.fixture
def make_prm(paths):
    """PRM(...) with engine options; engines are closed at teardown."""
    made: list[PRM] = []

    def make(name: str = "skywork_prm", **options) -> PRM:
        options.setdefault("kv_cache_gb", 0.002)
        prm = PRM(str(paths[name]), device="cpu", **options)
        made.append(prm)
        return prm

    yield make
    for prm in made:
        prm.close()


# ---------------------------------------------------------------------------------------------
# Items and the plain path
# ---------------------------------------------------------------------------------------------

WORDS = ["add", "the", "carry", "so", "we", "get", "then", "minus", "times", "equals", "total", "apples"]


def text(rng: random.Random, words: int) -> str:
    parts = []
    for _ in range(words):
        if rng.random() < 0.3:
            parts.append(f"{rng.randint(0, 99)}+{rng.randint(0, 99)}={rng.randint(0, 199)}")
        else:
            parts.append(rng.choice(WORDS))
    return " ".join(parts)


def problem(rng: random.Random) -> str:
    return "Problem: " + text(rng, rng.randint(8, 20)) + "?"


def step(rng: random.Random) -> str:
    return text(rng, rng.randint(2, 9)) + "."


def best_of_n(rng: random.Random, n: int) -> list[dict]:
    """N solutions of one problem."""
    p = problem(rng)
    return [{"problem": p, "steps": [step(rng) for _ in range(rng.randint(1, 4))]} for _ in range(n)]


def tree_search(rng: random.Random, depth: int, width: int) -> list[list[dict]]:
    """Rounds of a step-level search: the same problem and accepted steps 1..k, with new candidates for step k+1."""
    p = problem(rng)
    accepted: list[str] = []
    rounds = []
    for _ in range(depth):
        candidates = [step(rng) for _ in range(width)]
        rounds.append([{"problem": p, "steps": accepted + [c]} for c in candidates])
        accepted.append(candidates[0])
    return rounds


_PLAIN: dict[tuple, list[float]] = {}


def plain_rewards(prm: PRM, item: dict) -> list[float]:
    """The plain path's rewards (memoised per checkpoint and token sequence: every PRM here loads the same weights)."""
    encoded = prm.encode(item)
    key = (str(prm.path), prm.dtype, tuple(encoded.token_ids), tuple(encoded.read_positions))
    if key not in _PLAIN:
        out = uncached_outputs(prm.model, encoded.token_ids)
        _PLAIN[key] = prm.format.rewards(out[encoded.read_positions])
    return _PLAIN[key]


def assert_rewards_match(prm: PRM, items: list[dict], results) -> None:
    assert len(results) == len(items)
    for item, result in zip(items, results):
        expected = plain_rewards(prm, item)
        assert len(result.step_rewards) == len(expected) == len(item["steps"])
        assert result.step_rewards == pytest.approx(expected, abs=TOLERANCE, rel=0)
        usage = result.usage
        assert usage.prompt_tokens == len(prm.encode(item).token_ids)
        assert usage.computed_tokens + usage.cached_tokens == scored_length(prm, item)


def scored_length(prm: PRM, item: dict) -> int:
    """Tokens the engine computes or reads from the cache: up to the last read position (none after it is computed)."""
    return max(prm.encode(item).read_positions) + 1


def assert_no_block_pinned(engine: Engine) -> None:
    """Nothing running: every block unreferenced and available (free or evictable cache)."""
    assert not engine.has_unfinished()
    assert all(block.ref_count == 0 for block in engine.blocks.blocks)
    assert engine.blocks.num_available == engine.blocks.num_blocks
    stats = engine.stats()
    assert stats.kv_blocks_in_use == 0
    assert stats.num_waiting == stats.num_running == 0


def wait_idle(prm: PRM) -> None:
    """score() returns when futures resolve; the loop thread may still be finishing its bookkeeping."""
    import time

    deadline = time.monotonic() + 5
    while prm.engine.has_unfinished() or (prm._loop is not None and prm._loop.num_pending):
        assert time.monotonic() < deadline
        time.sleep(0.001)


def run_engine(engine: Engine, requests: list[Request]) -> list[Request]:
    """Add all, step until done; the requests in completion order."""
    for request in requests:
        engine.add(request)
    done: list[Request] = []
    for _ in range(10_000):
        if not engine.has_unfinished():
            return done
        done += engine.step()
    raise AssertionError("the engine did not finish")


# ---------------------------------------------------------------------------------------------
# 1. Rewards: cache on == cache off == plain path
# ---------------------------------------------------------------------------------------------


def test_engine_options_are_prm_keyword_arguments(make_prm):
    prm = make_prm(
        enable_prefix_caching=False, max_num_batched_tokens=33, max_num_seqs=3, block_size=8, num_kv_blocks=40, max_queue=9
    )
    config = prm.engine.config
    assert (config.enable_prefix_caching, config.max_num_batched_tokens, config.max_num_seqs) == (False, 33, 3)
    assert (config.block_size, config.num_kv_blocks, config.max_queue) == (8, 40, 9)
    assert prm.engine.blocks.num_blocks == 40 and prm.engine.blocks.block_size == 8
    assert prm.max_model_len == 40 * 8
    with pytest.raises(ValueError):
        make_prm(block_size=17)


@pytest.mark.parametrize("name", CHECKPOINTS)
@pytest.mark.parametrize("budget", [7, 16, 33])
@pytest.mark.parametrize("block_size", [4, 16])
def test_rewards_match_plain_path_across_chunks(make_prm, name, budget, block_size):
    rng = random.Random(budget * 100 + block_size)
    items = best_of_n(rng, 3) + best_of_n(rng, 2)
    on = make_prm(name, max_num_batched_tokens=budget, block_size=block_size, max_num_seqs=4)
    off = make_prm(name, max_num_batched_tokens=budget, block_size=block_size, enable_prefix_caching=False)
    first = on.score(items)
    again = on.score(items)  # now largely from the cache
    without = off.score(items)
    assert_rewards_match(on, items, first)
    assert_rewards_match(on, items, again)
    assert_rewards_match(off, items, without)
    for a, b, c in zip(first, again, without):
        assert a.step_rewards == pytest.approx(c.step_rewards, abs=TOLERANCE, rel=0)
        assert b.step_rewards == pytest.approx(c.step_rewards, abs=TOLERANCE, rel=0)
        assert c.usage.cached_tokens == 0
    assert sum(r.usage.cached_tokens for r in again) > 0
    # Chunks really split inputs mid-block and mid-step.
    longest = max(len(on.encode(i).token_ids) for i in items)
    assert longest > budget or budget == 33
    wait_idle(on)
    wait_idle(off)
    assert_no_block_pinned(on.engine)
    assert_no_block_pinned(off.engine)


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_tree_search_rescoring_reads_cached_rewards(make_prm, name):
    rng = random.Random(7)
    prm = make_prm(name, max_num_batched_tokens=16, block_size=4)
    for round_items in tree_search(rng, depth=4, width=3):
        results = prm.score(round_items)
        assert_rewards_match(prm, round_items, results)


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_eviction_under_a_tiny_pool_recomputes_correctly(make_prm, name):
    rng = random.Random(11)
    groups = [best_of_n(rng, 3) for _ in range(4)]
    rounds = tree_search(rng, depth=3, width=2)
    items = [i for g in groups for i in g] + [i for r in rounds for i in r]
    block_size = 4
    probe = make_prm(name, block_size=block_size)
    need = max(probe.engine.blocks.blocks_needed(len(probe.encode(i).token_ids)) for i in items)
    prm = make_prm(name, block_size=block_size, num_kv_blocks=need + 2, max_num_batched_tokens=16)
    engine = prm.engine
    evictions = 0
    original_forget = engine.blocks._forget

    def counting_forget(block):
        nonlocal evictions
        if block.hash is not None and block.ready:
            evictions += 1
        original_forget(block)

    engine.blocks._forget = counting_forget
    # Twice over: the second pass finds some prefixes cached, others evicted and recomputed.
    for _ in range(2):
        for group in groups + rounds:
            results = prm.score(group)
            assert_rewards_match(prm, group, results)
    # A sequential pass through everything, one item at a time.
    for item in reversed(items):
        assert_rewards_match(prm, [item], prm.score([item]))
    assert evictions > 0
    wait_idle(prm)
    assert_no_block_pinned(engine)


# ---------------------------------------------------------------------------------------------
# 3. Computed-token counters
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("block_size", [4, 16])
def test_rescored_prefix_is_not_recomputed(make_prm, block_size):
    rng = random.Random(block_size)
    prm = make_prm("qwen_prm", block_size=block_size, max_num_batched_tokens=64)
    p = problem(rng)
    steps = [step(rng) for _ in range(3)]
    first_item = {"problem": p, "steps": steps[:2]}
    second_item = {"problem": p, "steps": steps}
    first = prm.score([first_item])[0]
    assert first.usage.cached_tokens == 0 and first.usage.computed_tokens == scored_length(prm, first_item)
    assert first.usage.prompt_tokens > first.usage.computed_tokens  # Qwen's <|im_end|> and newline: never computed

    second = prm.score([second_item])[0]
    a, b = prm.encode(first_item).token_ids, prm.encode(second_item).token_ids[: scored_length(prm, second_item)]
    common = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
    new_tokens = len(b) - common
    # Reused to the token: whole blocks, then the leading tokens of the first's next block copied.
    assert second.usage.computed_tokens == new_tokens
    assert second.usage.cached_tokens == common
    assert_rewards_match(prm, [second_item], [second])
    # The shared steps' rewards are equal to the first scoring's (read back from the cache).
    assert second.step_rewards[:2] == pytest.approx(first.step_rewards, abs=TOLERANCE, rel=0)

    again = prm.score([second_item])[0]
    n = len(b)
    last = 1 if n % block_size else 0  # a partial block's tokens are copied but the last, whose output is read
    assert again.usage.computed_tokens == last
    assert again.usage.cached_tokens == n - last
    assert again.step_rewards == pytest.approx(second.step_rewards, abs=TOLERANCE, rel=0)


def test_identical_item_of_whole_blocks_computes_nothing(paths):
    prm = PRM(str(paths["skywork_prm"]), device="cpu", block_size=4, num_kv_blocks=64)
    engine = prm.engine
    ids = prm.encode({"problem": "What is 1+1?", "steps": ["1+1=2.", "The answer is 2."]}).token_ids
    ids = ids[: len(ids) - len(ids) % 4]
    reads = [len(ids) - 5, len(ids) - 1]
    first = run_engine(engine, [Request("a", ids, reads)])[0]
    second = run_engine(engine, [Request("b", ids, reads)])[0]
    assert second.usage.computed_tokens == 0 and second.usage.cached_tokens == len(ids)
    torch.testing.assert_close(second.outputs, first.outputs, atol=0, rtol=0)
    torch.testing.assert_close(second.outputs, uncached_outputs(prm.model, ids)[reads], atol=TOLERANCE, rtol=0)
    assert_no_block_pinned(engine)


def shared_problem_requests(prm: PRM, n: int, seed: int) -> tuple[list[Request], int]:
    """N candidate requests of one problem, and the length of their common token prefix."""
    rng = random.Random(seed)
    items = best_of_n(rng, n)
    encoded = [prm.encode(i) for i in items]
    first = encoded[0].token_ids
    common = min(next((k for k, (x, y) in enumerate(zip(first, e.token_ids)) if x != y), len(first)) for e in encoded[1:])
    requests = [Request(f"c{k}", e.token_ids, e.read_positions) for k, e in enumerate(encoded)]
    return requests, common


@pytest.mark.parametrize("one_step", [True, False])
def test_shared_problem_is_computed_once(paths, one_step):
    prm = PRM(str(paths["qwen_prm"]), device="cpu", block_size=8, num_kv_blocks=400)
    n = 6
    requests, common = shared_problem_requests(prm, n, seed=3)
    total = sum(r.num_tokens for r in requests)
    if one_step:
        config = EngineConfig(max_num_batched_tokens=total, max_num_seqs=n, block_size=8, num_kv_blocks=400)
    else:  # one sequence, few tokens per step: they land in different steps
        config = EngineConfig(max_num_batched_tokens=24, max_num_seqs=2, block_size=8, num_kv_blocks=400)
    engine = Engine(prm.model, config)
    steps_seen = []
    engine.step_observers.append(steps_seen.append)
    done = run_engine(engine, requests)
    assert {r.request_id for r in done} == {r.request_id for r in requests}
    if one_step:
        assert len(steps_seen) == 1 and steps_seen[0].num_seqs == n
    else:
        assert len(steps_seen) > n
    computed = sum(r.usage.computed_tokens for r in requests)
    cached = sum(r.usage.cached_tokens for r in requests)
    assert computed + cached == total
    shared_blocks_tokens = (common // 8) * 8
    assert common % 8 and shared_blocks_tokens > 0.5 * common
    if one_step:
        # The problem once, plus each candidate's own tokens from the first block that differs: that block's first
        # tokens are the first candidate's too, which computes them in the same step; the others read those keys
        # from its block (copied into theirs after the forward), so the problem's tokens are all computed once.
        start, first = shared_blocks_tokens, requests[0].token_ids
        assert len(first) >= start + 8  # its block there is a full one (a hash owner, findable in the step)

        def copied(request: Request) -> int:
            mine = request.token_ids[start : min(start + 8, request.num_tokens - 1)]
            return next((k for k, (x, y) in enumerate(zip(first[start:], mine)) if x != y), len(mine))

        assert all(copied(r) >= common % 8 for r in requests[1:])
        assert computed == total - (n - 1) * shared_blocks_tokens - sum(copied(r) for r in requests[1:])
    else:
        # Candidates scheduled after another one's block of the problem was done copy its leading tokens.
        assert computed < total - (n - 1) * shared_blocks_tokens
    for request in requests:
        expected = uncached_outputs(prm.model, request.token_ids)[request.read_positions]
        torch.testing.assert_close(request.outputs, expected, atol=TOLERANCE, rtol=0)
    assert_no_block_pinned(engine)


def test_shared_problem_through_score(make_prm):
    """All candidates submitted in one score() call: the problem is computed once whatever the loop timing."""
    rng = random.Random(5)
    items = best_of_n(rng, 8)
    prm = make_prm("qwen_prm", block_size=16, max_num_batched_tokens=4096, max_num_seqs=64)
    results = prm.score(items)
    assert_rewards_match(prm, items, results)
    prompts = [r.usage.prompt_tokens for r in results]
    encoded = [prm.encode(i).token_ids for i in items]
    common = min(next((k for k, (x, y) in enumerate(zip(encoded[0], e)) if x != y), len(e)) for e in encoded[1:])
    distinct = sum(p - common for p in prompts)
    computed = sum(r.usage.computed_tokens for r in results)
    assert computed <= common + distinct + len(items) * 15
    assert computed < 0.5 * sum(prompts)


# ---------------------------------------------------------------------------------------------
# 4. Prefix caching off
# ---------------------------------------------------------------------------------------------


def test_prefix_caching_off_never_caches(make_prm):
    rng = random.Random(2)
    rounds = tree_search(rng, depth=3, width=3)
    prm = make_prm("qwen_prm", enable_prefix_caching=False, block_size=4, max_num_batched_tokens=16)
    for items in rounds + rounds:
        results = prm.score(items)
        assert_rewards_match(prm, items, results)
        for r in results:
            assert r.usage.cached_tokens == 0 and r.usage.computed_tokens == scored_length(prm, items[results.index(r)])
    wait_idle(prm)
    assert not prm.engine.blocks.hash_to_block_id and not prm.engine.blocks.evictable
    assert prm.engine.stats().cached_tokens == 0
    assert_no_block_pinned(prm.engine)


# ---------------------------------------------------------------------------------------------
# 5. Memory accounting, aborts, too-long inputs
# ---------------------------------------------------------------------------------------------


def test_usage_totals_in_stats(make_prm):
    rng = random.Random(9)
    items = best_of_n(rng, 4)
    prm = make_prm("skywork_prm", block_size=4)
    results = prm.score(items) + prm.score(items)
    wait_idle(prm)
    stats = prm.engine.stats()
    assert stats.prompt_tokens == sum(r.usage.prompt_tokens for r in results)
    assert stats.computed_tokens == sum(r.usage.computed_tokens for r in results)
    assert stats.cached_tokens == sum(r.usage.cached_tokens for r in results)
    assert stats.prompt_tokens == stats.computed_tokens + stats.cached_tokens
    assert stats.kv_blocks_in_use == 0 and stats.kv_blocks_total == prm.engine.blocks.num_blocks


def test_blocks_pinned_while_running_and_released_after(paths):
    prm = PRM(str(paths["skywork_prm"]), device="cpu", block_size=4, num_kv_blocks=64)
    engine = Engine(prm.model, EngineConfig(max_num_batched_tokens=8, block_size=4, num_kv_blocks=64))
    ids = prm.encode({"problem": "What is 12+30?", "steps": ["12+30=42.", "So 42."]}).token_ids
    request = Request("x", ids, [len(ids) - 1])
    engine.add(request)
    engine.step()
    assert engine.stats().num_running == 1
    needed = engine.blocks.blocks_needed(len(ids))
    assert engine.stats().kv_blocks_in_use == needed  # the whole prompt's blocks, held from admission
    assert all(engine.blocks.blocks[b].ref_count == 1 for b in request.block_table)
    while engine.has_unfinished():
        engine.step()
    assert_no_block_pinned(engine)
    assert len(ids) % 4
    assert len(engine.blocks.evictable) == needed  # all its blocks stay cached, unpinned, the partial last one too


@pytest.mark.parametrize("caching", [True, False])
def test_abort_queued_and_half_computed_requests(paths, caching):
    prm = PRM(str(paths["skywork_prm"]), device="cpu", block_size=4, num_kv_blocks=64)
    config = EngineConfig(max_num_batched_tokens=7, max_num_seqs=1, block_size=4, num_kv_blocks=120,
                          enable_prefix_caching=caching)
    engine = Engine(prm.model, config)
    rng = random.Random(4)
    items = best_of_n(rng, 3)
    encoded = [prm.encode(i) for i in items]
    requests = [Request(f"r{k}", e.token_ids, e.read_positions) for k, e in enumerate(encoded)]
    for r in requests:
        engine.add(r)
    engine.step()
    engine.step()
    assert 0 < requests[0].num_done < requests[0].num_tokens  # half computed
    assert engine.abort("r0") and engine.abort("r2")  # running (chunked) and queued
    assert not engine.abort("r2") and not engine.abort("nope")
    assert engine.stats().num_running == 0 and engine.stats().num_waiting == 1
    assert engine.stats().kv_blocks_in_use == 0
    assert all(b.ref_count == 0 for b in engine.blocks.blocks)
    while engine.has_unfinished():
        engine.step()
    # Later requests (including resubmissions of the aborted ones) score correctly.
    again = [Request(f"s{k}", e.token_ids, e.read_positions) for k, e in enumerate(encoded)]
    run_engine(engine, again)
    for request in [requests[1]] + again:
        expected = uncached_outputs(prm.model, request.token_ids)[request.read_positions]
        torch.testing.assert_close(request.outputs, expected, atol=TOLERANCE, rtol=0)
    assert_no_block_pinned(engine)


def test_abort_of_the_prefix_owner_does_not_strand_waiters(paths):
    """A request waiting for a prefix another request is computing must not hang if that one is aborted."""
    prm = PRM(str(paths["skywork_prm"]), device="cpu", block_size=4, num_kv_blocks=64)
    engine = Engine(prm.model, EngineConfig(max_num_batched_tokens=6, max_num_seqs=4, block_size=4, num_kv_blocks=64))
    rng = random.Random(8)
    encoded = [prm.encode(i) for i in best_of_n(rng, 2)]
    owner = Request("owner", encoded[0].token_ids, encoded[0].read_positions)
    waiter = Request("waiter", encoded[1].token_ids, encoded[1].read_positions)
    engine.add(owner)
    engine.add(waiter)
    engine.step()
    assert engine.abort("owner")
    done = run_engine(engine, [])
    assert [r.request_id for r in done] == ["waiter"]
    expected = uncached_outputs(prm.model, waiter.token_ids)[waiter.read_positions]
    torch.testing.assert_close(waiter.outputs, expected, atol=TOLERANCE, rtol=0)
    assert_no_block_pinned(engine)


def test_input_longer_than_the_pool_is_refused_at_submit(make_prm):
    prm = make_prm("skywork_prm", block_size=4, num_kv_blocks=8)  # 32 tokens
    long_item = {"problem": "Problem: " + " ".join(["add the carry"] * 20), "steps": ["so we get 3."]}
    with pytest.raises(InputTooLongError):
        prm.score([long_item])
    with pytest.raises(InputTooLongError):
        prm.engine.add(Request("long", list(range(33)), [32]))
    prm.engine.add(Request("fits", list(range(32)), [31]))  # exactly the pool: accepted
    short = {"problem": "1+1?", "steps": ["2."]}
    engine_result = run_engine(prm.engine, [])
    assert [r.request_id for r in engine_result] == ["fits"]
    assert_rewards_match(prm, [short], prm.score([short]))


def test_reset_prefix_cache_forgets_cached_prefixes(paths):
    prm = PRM(str(paths["skywork_prm"]), device="cpu", block_size=4, num_kv_blocks=200)
    engine = prm.engine
    encoded = [prm.encode(i) for i in best_of_n(random.Random(12), 3)]
    first = [Request(f"a{k}", e.token_ids, e.read_positions) for k, e in enumerate(encoded)]
    run_engine(engine, first)
    # Reset while one request is half computed: it still finishes correctly.
    engine2 = Engine(prm.model, EngineConfig(block_size=4, num_kv_blocks=200, max_num_batched_tokens=10))
    run_engine(engine2, [Request("w", encoded[0].token_ids, encoded[0].read_positions)])
    running = Request("r", encoded[1].token_ids, encoded[1].read_positions)
    engine2.add(running)
    engine2.step()
    engine2.reset_prefix_cache()
    engine.reset_prefix_cache()
    assert not engine.blocks.hash_to_block_id and not engine.blocks.evictable
    run_engine(engine2, [])
    again = [Request(f"b{k}", e.token_ids, e.read_positions) for k, e in enumerate(encoded)]
    run_engine(engine, again[:1])
    assert again[0].usage.cached_tokens == 0
    run_engine(engine, again[1:])
    for request in first + again + [running]:
        expected = uncached_outputs(prm.model, request.token_ids)[request.read_positions]
        torch.testing.assert_close(request.outputs, expected, atol=TOLERANCE, rtol=0)
    assert_no_block_pinned(engine)
    assert_no_block_pinned(engine2)


def test_read_positions_outside_the_prompt_are_refused(paths):
    """BUG: Engine.add accepts any read position. A negative one silently reads another token's slot
    (Python indexing of the block table and `%`), e.g. -1 on a 10-token prompt with block_size 4 reads
    slot 3 of the last block, a position never written for this request; one past the end raises inside
    the step, which the EngineLoop turns into a failure of every request in flight.
    Fix: in Engine.add (or Request), raise InvalidInputError unless 0 <= p < num_tokens for every read position."""
    from prmserve.errors import InvalidInputError

    prm = PRM(str(paths["skywork_prm"]), device="cpu", block_size=4, num_kv_blocks=16)
    for bad in ([-1], [10], [3, 12]):
        with pytest.raises(InvalidInputError):
            prm.engine.add(Request(f"bad{bad}", list(range(1, 11)), bad))
    assert not prm.engine.has_unfinished()


def test_warmup_at_load_changes_no_reward(make_prm) -> None:
    """The load-time warm-up (run on CUDA) writes only slots nothing holds: rewards are the same after it."""
    item = {"problem": "What is 3 + 4?", "steps": ["3 + 4 = 7.", "The answer is 7."]}
    plain = make_prm("qwen_prm").score([item])[0].step_rewards
    warmed = make_prm("qwen_prm")
    warmed.engine.runner.warmup(64)
    assert warmed.score([item])[0].step_rewards == plain
