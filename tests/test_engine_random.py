"""Randomised engine runs (fixed seeds): shared prefixes, priorities, tiny budgets and pools, aborts, cache on/off.

Every output must equal the plain path (the model on the whole sequence, no cache) within 1e-5, and the
block manager's bookkeeping must stay exact after every step.
"""

from __future__ import annotations

import random
from collections import Counter

import pytest
import torch

from prmserve import PRM
from prmserve.engine import Engine, EngineConfig, Request
from prmserve.engine.request import RequestStatus
from tiny_checkpoints import FORMAT_OF as FORMATS
from tiny_checkpoints import build
from uncached import uncached_outputs

TOLERANCE = 1e-5


pytestmark = pytest.mark.usefixtures("single_torch_thread")


@pytest.fixture(scope="module", params=["skywork_prm", "qwen_prm", "rlhflow+window"])
def model(request, tmp_path_factory):
    name, _, window = request.param.partition("+")
    path = build(name, tmp_path_factory.mktemp("random") / name)
    prm = PRM(str(path), device="cpu", format=FORMATS[name], num_kv_blocks=1)
    if window:  # a short sliding window, so chunks and cached prefixes cross it
        for layer in prm.model.layers:
            layer.self_attn.sliding_window = 6
    return prm.model


_PLAIN: dict[tuple, torch.Tensor] = {}


def plain(model, ids: list[int]) -> torch.Tensor:
    key = (id(model), tuple(ids))
    if key not in _PLAIN:
        _PLAIN[key] = uncached_outputs(model, ids)
    return _PLAIN[key]


def random_workload(rng: random.Random, count: int) -> list[tuple[list[int], list[int], int]]:
    """(token ids, read positions, priority): a few problems, solutions sharing steps like a search tree."""
    tok = lambda n: [rng.randrange(1, 500) for _ in range(n)]  # noqa: E731
    problems = [tok(rng.randint(1, 30)) for _ in range(rng.randint(1, 3))]
    steps = [tok(rng.randint(1, 9)) for _ in range(6)]
    out = []
    for _ in range(count):
        ids = list(rng.choice(problems))
        for _ in range(rng.randint(0, 4)):
            ids += rng.choice(steps) if rng.random() < 0.7 else tok(rng.randint(1, 9))
        if rng.random() < 0.5 and out:
            ids = list(rng.choice(out)[0])  # an exact repeat
        reads = sorted(set(rng.sample(range(len(ids)), min(len(ids), rng.randint(1, 5))) + [len(ids) - 1]))
        out.append((ids, reads, rng.randint(0, 3)))
    return out


def check_bookkeeping(engine: Engine) -> None:
    blocks = engine.blocks
    holders = Counter(b for r in engine.scheduler.requests.values() for b in r.block_table)
    blocks.check_invariants()
    for block in blocks.blocks:
        assert block.ref_count == holders[block.block_id], block
    assert engine.stats().kv_blocks_in_use == blocks.num_blocks - len(blocks.free) - len(blocks.evictable)
    for r in engine.scheduler.requests.values():
        if r.status is RequestStatus.RUNNING:
            assert len(r.block_table) == blocks.blocks_needed(r.num_tokens)
        else:
            assert r.block_table == []


def run_trial(model, seed: int) -> dict:
    rng = random.Random(seed)
    work = random_workload(rng, rng.randint(3, 12))
    block_size = rng.choice([1, 2, 3, 4, 5, 8, 16])
    caching = rng.random() < 0.75
    need = max(-(-len(ids) // block_size) for ids, _, _ in work)
    num_blocks = need + rng.choice([0, 1, 2, 5, 40])
    config = EngineConfig(
        max_num_batched_tokens=rng.choice([1, 3, 7, 16, 33, 200]),
        max_num_seqs=rng.choice([1, 2, 3, 8]),
        block_size=block_size,
        num_kv_blocks=num_blocks,
        enable_prefix_caching=caching,
    )
    engine = Engine(model, config)
    shared = 0  # requests that read their first tokens from a block the same step computes (`share_in`)
    allocate = engine.blocks.allocate

    def counted(request, match, step=None):
        nonlocal shared
        allocate(request, match, step)
        shared += request.share_in is not None

    engine.blocks.allocate = counted
    requests = [Request(f"{seed}-{i}", ids, reads, prio) for i, (ids, reads, prio) in enumerate(work)]
    pending = list(requests)
    aborted: set[str] = set()
    finished: list[Request] = []
    for _ in range(100_000):
        # Requests arrive over time; now and then one is aborted (queued or half computed).
        while pending and rng.random() < 0.5:
            engine.add(pending.pop(0))
        if rng.random() < 0.05 and engine.scheduler.requests:
            victim = rng.choice(sorted(engine.scheduler.requests))
            assert engine.abort(victim)
            aborted.add(victim)
        check_bookkeeping(engine)
        if not engine.has_unfinished():
            if not pending:
                break
            continue
        finished += engine.step()
        check_bookkeeping(engine)
    else:
        raise AssertionError("the engine did not finish")
    assert {r.request_id for r in finished} == {r.request_id for r in requests} - aborted
    assert len(finished) == len({r.request_id for r in finished})
    partial = 0
    for r in finished:
        torch.testing.assert_close(r.outputs, plain(model, r.token_ids)[r.read_positions], atol=TOLERANCE, rtol=0)
        usage = r.usage
        assert usage.prompt_tokens == r.num_tokens == usage.computed_tokens + usage.cached_tokens
        # Whole cached blocks, and maybe the leading tokens of one more copied (which leaves a token to compute).
        assert usage.cached_tokens % block_size == 0 or usage.computed_tokens > 0
        partial += usage.cached_tokens % block_size != 0
        if not caching:
            assert usage.cached_tokens == 0
    assert all(b.ref_count == 0 for b in engine.blocks.blocks)
    assert engine.stats().kv_blocks_in_use == 0
    stats = engine.stats()
    assert stats.prompt_tokens == sum(r.num_tokens for r in finished)
    assert stats.prompt_tokens == stats.computed_tokens + stats.cached_tokens
    return {"cached": stats.cached_tokens, "steps": stats.num_steps, "partial": partial, "shared": shared}


def test_random_workloads_match_the_plain_path(model):
    totals = Counter()
    for seed in range(50):
        totals.update(run_trial(model, seed))
    assert totals["cached"] > 0 and totals["partial"] > 0  # the cache really was exercised, partial copies too
    assert totals["shared"] > 0  # and copies from blocks of the same step
