"""The node API for tree search: keep a scored node, extend it by children, release it.

A child's rewards must equal scoring the whole item from scratch; handles pin, expire, are capped
and released; pins never starve a request that needs their memory.
"""

from __future__ import annotations

import random
import time

import pytest

from prmserve import PRM
from prmserve.errors import FormatError, HandleNotFoundError, InvalidInputError
from tiny_checkpoints import FORMAT_OF, build

TOLERANCE = 1e-6
OPENR = {"preset": "openr"}
FAMILIES = {  # checkpoint -> format options
    "qwen_prm": {},
    "qwen_prm_jinja": {},
    "skywork_prm": {},
    "math_shepherd": {},
    "math_shepherd_openr": OPENR,
    "rlhflow": {},
    "llemma": {},
    "token_classification_qwen2": {},
    "token_classification_llama": {"step_separator": "\n\n", "reward": "p1_minus_p0"},
    "token_classification_qwen3": {},
}
PROBLEM = "Janet's ducks lay 16 eggs per day. She eats 3 and bakes with 4. She sells the rest at $2 each. How much?"
NODE = ["Step 1: She eats 3 eggs, so 16 - 3 = 13 eggs remain.", "Step 2: She bakes with 4, so 13 - 4 = 9 remain."]
CHILDREN = [
    ["Step 3: She sells 9 eggs at $2 each: 9 * 2 = 18."],
    ["Step 3: She sells 9 eggs at $3 each: 27.", "The answer is 27."],
    ["So the answer is 18 dollars. Été ✓ 答案"],
]

pytestmark = pytest.mark.usefixtures("single_torch_thread")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("node_ckpts")
    return {name: build(name, root / name) for name in [*FAMILIES, "outcome_qwen"]}


@pytest.fixture
def make_prm(checkpoints):
    made: list[PRM] = []

    def make(name: str = "qwen_prm", **options) -> PRM:
        options = {**FAMILIES.get(name, {}), **options}
        prm = PRM(str(checkpoints[name]), format=FORMAT_OF[name], device="cpu", dtype="float32", **options)
        made.append(prm)
        return prm

    yield make
    for prm in made:
        prm.close()


def full_rewards(prm: PRM, steps: list[str]) -> list[float]:
    return prm.score([{"problem": PROBLEM, "steps": steps}])[0].step_rewards


def assert_close(got: list[float], want: list[float]) -> None:
    assert len(got) == len(want)
    assert max(abs(a - b) for a, b in zip(got, want)) <= TOLERANCE, (got, want)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_children_equal_scoring_the_whole_item(name: str, make_prm) -> None:
    prm = make_prm(name)
    plain = make_prm(name, enable_prefix_caching=False, recent_encodings=0)
    node = prm.score([{"problem": PROBLEM, "steps": NODE}], keep=True)[0]
    assert node.handle is not None
    kids = prm.extend(node.handle, CHILDREN)
    for child, new in zip(kids, CHILDREN):
        assert child.handle is None
        assert_close(child.step_rewards, full_rewards(plain, NODE + new))
        assert child.step_rewards[: len(NODE)] == node.step_rewards  # the node's rewards, as it got them
        assert child.usage.cached_tokens > 0  # the node's blocks were reused, not recomputed
        assert child.usage.prompt_tokens == len(prm.encode({"problem": PROBLEM, "steps": NODE + new}).token_ids)


@pytest.mark.parametrize("block_size", [16, 5])
def test_a_child_computes_only_its_new_tokens(make_prm, block_size: int) -> None:
    """The node's tokens in its last, partly filled block are copied, not computed again by every child."""
    prm = make_prm("qwen_prm", block_size=block_size)
    plain = make_prm("qwen_prm", enable_prefix_caching=False)
    node = prm.score([{"problem": PROBLEM, "steps": NODE}], keep=True)[0]
    body = prm.encode({"problem": PROBLEM, "steps": NODE}).body_len
    assert body % block_size
    for new in CHILDREN:  # one call each: siblings that begin alike would share more than the node
        child = prm.extend(node.handle, [new])[0]
        scored = prm.encode({"problem": PROBLEM, "steps": NODE + new}).read_positions[-1] + 1  # none after the last read
        assert child.usage.cached_tokens == body
        assert child.usage.computed_tokens == scored - body
        assert_close(child.step_rewards, full_rewards(plain, NODE + new))
        prm.reset_prefix_cache()
        node = prm.score([{"problem": PROBLEM, "steps": NODE}], keep=True)[0]


def test_stateless_items_share_cached_tokens_to_the_token(make_prm) -> None:
    """A re-sent prefix is reused to the token, not to the last whole block: the tokens past it come out of a cached
    block's leading slots."""
    prm = make_prm("qwen_prm")
    plain = make_prm("qwen_prm", enable_prefix_caching=False)
    first = {"problem": PROBLEM, "steps": NODE[:1]}
    prm.score([first])
    for new in CHILDREN:
        prm.reset_prefix_cache()
        prm.score([first])  # alone in the cache (the children before share more with each other)
        item = {"problem": PROBLEM, "steps": NODE[:1] + new}
        ids, seen = prm.encode(item).token_ids, prm.encode(first).token_ids
        common = next(i for i, (a, b) in enumerate(zip(ids, seen)) if a != b)
        assert common % 16
        result = prm.score([item])[0]
        assert result.usage.cached_tokens == common
        assert_close(result.step_rewards, full_rewards(plain, NODE[:1] + new))


@pytest.mark.parametrize("name", list(FAMILIES))
def test_extended_ids_equal_the_whole_items_ids_without_retokenising_the_node(name: str, make_prm) -> None:
    prm = make_prm(name)
    fmt = prm.format
    for k in range(1, len(NODE) + 1):
        node = fmt.encode(PROBLEM, NODE[:k])
        for new in CHILDREN:
            assert fmt.continuation(NODE[k - 1], new) is not None  # the fast path: only new steps tokenised
            assert fmt.extend(node, PROBLEM, NODE[:k], new) == fmt.encode(PROBLEM, NODE[:k] + new)


def test_walking_down_the_tree_with_kept_children(make_prm) -> None:
    prm = make_prm("qwen_prm")
    plain = make_prm("qwen_prm", enable_prefix_caching=False)
    path = [NODE[0]]
    handle = prm.score([{"problem": PROBLEM, "steps": path}], keep=True)[0].handle
    for depth in range(4):
        new = [f"Level {depth}: {depth} + 2 = {depth + 2}.", f"Level {depth}: {depth} * 3 = {depth * 3}."]
        kids = prm.extend(handle, [[s] for s in new], keep=True)
        assert all(k.handle for k in kids)
        best = kids[1]
        path.append(new[1])
        assert_close(best.step_rewards, full_rewards(plain, path))
        prm.release([handle, kids[0].handle])
        handle = best.handle
    assert prm.release(handle) == 1
    assert len(prm.nodes) == 0


def test_a_kept_node_is_pinned_until_released(make_prm) -> None:
    prm = make_prm("qwen_prm", num_kv_blocks=64)
    node = prm.score([{"problem": PROBLEM, "steps": NODE}], keep=True)[0]
    engine_blocks = prm.engine.blocks
    _sync(prm)
    body = prm.encode({"problem": PROBLEM, "steps": NODE}).body_len
    pinned = list(engine_blocks.pins[node.handle])
    assert body % 16  # so the block with the body's last tokens is pinned too
    assert len(pinned) == engine_blocks.num_pinned == body // 16 + 1  # every block of the node's body
    # Unrelated work, one request at a time, cycles more blocks than the pool holds through the LRU
    # cache: it evicts everything unpinned, never the pinned blocks.
    for i in range(20):
        prm.score([{"problem": f"Filler problem {i} " * 6, "steps": ["a step " * 12]}])
    assert prm.engine.stats().computed_tokens > 64 * 16
    assert all(engine_blocks.blocks[b].ref_count >= 1 for b in pinned)
    kid = prm.extend(node.handle, [CHILDREN[0]])[0]
    assert kid.usage.cached_tokens == body  # the last few copied out of the pinned partial block
    assert prm.release([node.handle, "no-such-handle"]) == 1
    _sync(prm)
    assert engine_blocks.num_pinned == 0 and node.handle not in engine_blocks.pins
    with pytest.raises(HandleNotFoundError):
        prm.extend(node.handle, [CHILDREN[0]])


def test_handles_expire_and_are_capped(make_prm) -> None:
    prm = make_prm("qwen_prm", handle_ttl=0.2, max_handles=2)
    handles = [r.handle for r in prm.score([{"problem": PROBLEM, "steps": NODE[:1] + [f"Step {i}."]} for i in range(3)], keep=True)]
    assert len(prm.nodes) == 2  # the oldest of three went
    with pytest.raises(HandleNotFoundError):
        prm.extend(handles[0], [["more"]])
    prm.extend(handles[2], [["more"]])  # use keeps it fresh
    time.sleep(0.3)
    with pytest.raises(HandleNotFoundError):
        prm.extend(handles[2], [["more"]])
    _sync(prm)
    assert prm.engine.blocks.num_pinned == 0  # expired handles leave no pins behind


def test_pins_never_starve_a_request_that_needs_their_memory(make_prm) -> None:
    prm = make_prm("qwen_prm", num_kv_blocks=40, max_pinned_fraction=1.0)
    kept = prm.score([{"problem": f"{PROBLEM} Variant {i}.", "steps": NODE} for i in range(8)], keep=True)
    _sync(prm)
    assert prm.engine.blocks.num_pinned > 20
    long_item = {"problem": "Long " * 110, "steps": ["ok"]}  # needs nearly the whole pool
    assert 30 * 16 < len(prm.encode(long_item).token_ids) <= 40 * 16
    result = prm.score([long_item])[0]
    assert len(result.step_rewards) == 1
    # The nodes survive as handles (their pins were dropped): children are still scored, just recomputed.
    assert all(h.handle in prm.nodes for h in kept)
    child = prm.extend(kept[0].handle, [CHILDREN[0]])[0]
    plain = make_prm("qwen_prm", enable_prefix_caching=False)
    assert_close(child.step_rewards, full_rewards_for(plain, f"{PROBLEM} Variant 0.", NODE + CHILDREN[0]))


def test_pinned_share_is_capped(make_prm) -> None:
    prm = make_prm("qwen_prm", num_kv_blocks=100, max_pinned_fraction=0.2)
    prm.score([{"problem": f"{PROBLEM} Variant {i}.", "steps": NODE} for i in range(10)], keep=True)
    _sync(prm)
    assert 0 < prm.engine.blocks.num_pinned <= 20


def test_bad_node_requests_are_refused(make_prm) -> None:
    prm = make_prm("qwen_prm")
    with pytest.raises(InvalidInputError, match="keep=True needs a problem"):
        prm.score([{"text": "1 + 1 = 2<extra_0>"}], keep=True)
    handle = prm.score([{"problem": PROBLEM, "steps": NODE}], keep=True)[0].handle
    with pytest.raises(InvalidInputError, match="child 1: step 2 is empty"):
        prm.extend(handle, [["fine"], ["  "]])
    with pytest.raises(InvalidInputError, match="child 0: step 2 contains the special token '<extra_0>'"):
        prm.extend(handle, [["a<extra_0>b"]])
    with pytest.raises(InvalidInputError, match="non-empty list"):
        prm.extend(handle, [])
    with pytest.raises(InvalidInputError, match="not a string"):
        prm.extend(handle, ["a bare string"])
    with pytest.raises(HandleNotFoundError):
        prm.extend("nope", [["x"]])
    outcome = PRM(str(prm.path.parent / "outcome_qwen"), device="cpu")
    try:
        with pytest.raises(FormatError, match="per-step rewards"):
            outcome.score([{"problem": PROBLEM, "steps": NODE}], keep=True)
    finally:
        outcome.close()


def test_stateless_calls_reuse_a_recent_prefix_tokenisation(make_prm, monkeypatch) -> None:
    prm = make_prm("qwen_prm")
    fresh = make_prm("qwen_prm", recent_encodings=0)
    prm.score([{"problem": PROBLEM, "steps": NODE}])
    calls = []
    real_encode, real_many = prm.format.encode, prm.format.encode_many
    monkeypatch.setattr(prm.format, "encode", lambda *a: calls.append(a) or real_encode(*a))
    monkeypatch.setattr(prm.format, "encode_many", lambda items: calls.extend(items) or real_many(items))
    items = [{"problem": PROBLEM, "steps": NODE + new} for new in CHILDREN]
    for item in items:
        assert prm.encode(item) == fresh.encode(item)
    assert calls == []  # every child came from the node's cached encoding plus its new steps
    got = prm.score([{"problem": PROBLEM, "steps": NODE + new + ["One more step."]} for new in CHILDREN] + items)
    assert calls == []  # a whole call too: each item extends a recent prefix, none is tokenised whole
    got = got[len(CHILDREN):]
    want = fresh.score(items)
    for g, w in zip(got, want):
        assert_close(g.step_rewards, w.step_rewards)


def test_stateless_calls_continue_the_prefix_cache_keys_of_a_recent_prefix(make_prm) -> None:
    """A re-sent prefix's requests start with the keys the engine computed for the request that carried it (the
    engine hashes only the new blocks); those keys are the ones it would compute itself, and rewards are unchanged."""
    from dataclasses import replace

    prm = make_prm("qwen_prm")
    plain = make_prm("qwen_prm", enable_prefix_caching=False, recent_encodings=0)
    blocks = prm.engine.blocks
    prm.score([{"problem": PROBLEM, "steps": NODE}])  # one stateless call: no handle is kept
    items = [{"problem": PROBLEM, "steps": NODE + new} for new in CHILDREN] + [{"problem": PROBLEM, "steps": NODE}]
    jobs = prm.plan_score(items)
    body = prm.encode({"problem": PROBLEM, "steps": NODE}).body_len
    for job in jobs:
        handed = job.request.block_hashes
        assert handed is not None and len(handed) == body // blocks.block_size > 0
        own = replace(job.request, block_hashes=None)
        assert blocks._chain_hashes(own)[: len(handed)] == handed
    got = prm.collect(jobs, [f.result() for f in prm.submit_jobs(jobs)])
    for g, w in zip(got, plain.score(items)):
        assert_close(g.step_rewards, w.step_rewards)
    assert all(r.usage.cached_tokens > 0 for r in got)


def test_random_trees_match_a_plain_rescore(make_prm) -> None:
    """Keep, extend, release and evict at random; every answer equals scoring the path from scratch."""
    rng = random.Random(7)
    prm = make_prm("qwen_prm", num_kv_blocks=48, max_handles=6)
    plain = make_prm("qwen_prm", enable_prefix_caching=False, recent_encodings=0)
    live: dict[str, list[str]] = {}
    for round_ in range(30):
        action = rng.random()
        if not live or action < 0.15:
            steps = [f"Root {round_}: {rng.randint(1, 9)} + {rng.randint(1, 9)}."]
            result = prm.score([{"problem": PROBLEM, "steps": steps}], keep=True)[0]
            live[result.handle] = steps
        elif action < 0.75:
            handle = rng.choice(list(live))
            children = [[f"Child {round_}.{c}: {rng.randint(1, 99)}." for _ in range(rng.randint(1, 2))] for c in range(rng.randint(1, 4))]
            try:
                kids = prm.extend(handle, children, keep=rng.random() < 0.5)
            except HandleNotFoundError:  # pushed out by max_handles
                live.pop(handle)
                continue
            for kid, new in zip(kids, children):
                assert_close(kid.step_rewards, full_rewards(plain, live[handle] + new))
                if kid.handle:
                    live[kid.handle] = live[handle] + new
        elif action < 0.9:
            handle = rng.choice(list(live))
            prm.release(handle)
            live.pop(handle)
        else:  # unrelated work that evicts the LRU cache
            prm.score([{"problem": f"Evict {round_} " * 20, "steps": ["x " * 30]}])
        live = {h: s for h, s in live.items() if h in prm.nodes}
    _sync(prm)
    blocks = prm.engine.blocks
    assert blocks.num_pinned == sum(len(b) for b in blocks.pins.values())
    assert all(key in prm.nodes for key in blocks.pins)


def full_rewards_for(prm: PRM, problem: str, steps: list[str]) -> list[float]:
    return prm.score([{"problem": problem, "steps": steps}])[0].step_rewards


def _sync(prm: PRM) -> None:
    """Wait until the engine thread has handled every message sent so far (unpins are fire and
    forget): its inbox is in order, so a request sent now finishes after them."""
    prm.score([{"problem": "sync", "steps": ["sync"]}])
