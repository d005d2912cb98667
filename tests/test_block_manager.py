"""Unit tests of the paged-KV block manager and its prefix cache (no model involved)."""

from __future__ import annotations

import itertools

import pytest

from prmserve.engine.block_manager import BlockManager
from prmserve.engine.request import Request

_ids = itertools.count()


def req(tokens: list[int]) -> Request:
    return Request(f"r{next(_ids)}", list(tokens), [len(tokens) - 1])


def admit(bm: BlockManager, request: Request, step: int = 1):
    match = bm.match_prefix(request, step)
    assert not match.blocked
    assert bm.can_allocate(request, match)
    bm.allocate(request, match, step)
    return match


def compute_all(bm: BlockManager, request: Request, step: int = 1) -> None:
    """What the scheduler and runner do for a request computed in one chunk."""
    bm.mark_filling(request, request.num_done, request.num_tokens, step)
    request.num_done = request.num_tokens
    bm.mark_ready(request)


def test_full_blocks_are_shared_and_a_partial_blocks_tokens_copied():
    bm = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=True)
    a = req(list(range(10)))  # 2 full blocks + 2 tokens
    admit(bm, a)
    assert len(a.block_table) == 3 and a.num_cached == 0 and a.copy_in is None
    compute_all(bm, a)
    bm.release(a)
    bm.check_invariants()
    assert len(bm.evictable) == 3  # the partial block stays cached too, findable only for a copy
    assert len(bm.hash_to_block_id) == 2 and bm.num_available == 8
    partial = list(bm.evictable)[0]  # released last first: the leaf leads the LRU order

    b = req(list(range(9)) + [99, 100])
    match = admit(bm, b, step=2)
    assert len(match.block_ids) == 2 and b.block_table[:2] == a_table_prefix(bm, list(range(8)))
    # Token 8 is a's too: copied from a's partial block into b's own third block, not computed again.
    assert b.copy_in == (partial, b.block_table[2], 1) and b.num_cached == b.num_done == 9
    bm.check_invariants()
    compute_all(bm, b, step=2)
    bm.release(b)
    bm.check_invariants()
    assert all(block.ref_count == 0 for block in bm.blocks)


def a_table_prefix(bm: BlockManager, tokens: list[int]) -> list[int]:
    return [bm.hash_to_block_id[h] for h, _ in bm._chain_hashes(req(tokens))]


def test_identical_prompt_of_whole_blocks_is_fully_cached():
    bm = BlockManager(num_blocks=4, block_size=4, enable_prefix_caching=True)
    a = req(list(range(8)))
    admit(bm, a)
    compute_all(bm, a)
    bm.release(a)
    b = req(list(range(8)))
    admit(bm, b, step=2)
    assert b.num_cached == 8 and b.num_remaining == 0
    bm.release(b)
    bm.check_invariants()


def test_hash_chains_depend_on_the_whole_prefix():
    bm = BlockManager(num_blocks=8, block_size=2, enable_prefix_caching=True)
    a = req([1, 2, 3, 4])
    admit(bm, a)
    compute_all(bm, a)
    bm.release(a)
    # Same second block, different first block: nothing may be reused.
    b = req([9, 9, 3, 4])
    assert bm.match_prefix(b, 2).block_ids == []


def test_block_being_computed_blocks_later_steps_but_is_shared_in_its_step():
    bm = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=True)
    a = req(list(range(12)))
    admit(bm, a, step=1)
    # Step 1 computes only 6 tokens of `a`: block 0 is filled in step 1, block 1 is not.
    bm.mark_filling(a, 0, 6, step=1)
    other = list(range(12)) + [50]
    match = bm.match_prefix(req(other), 1)
    assert match.block_ids == [a.block_table[0]] and match.blocked
    # In a later step (before `a` finished block 0's forward was marked ready) it must wait.
    later = bm.match_prefix(req(other), 2)
    assert later.block_ids == [] and later.blocked
    a.num_done = 6
    bm.mark_ready(a)
    match = bm.match_prefix(req(other), 2)
    assert match.block_ids == [a.block_table[0]] and match.blocked  # block 1 still pending
    bm.mark_filling(a, 6, 12, step=2)
    match = bm.match_prefix(req(other), 2)
    assert match.block_ids == a.block_table[:3] and not match.blocked


def test_lru_eviction_of_unpinned_blocks_leaves_first():
    bm = BlockManager(num_blocks=4, block_size=2, enable_prefix_caching=True)
    a = req([1, 2, 3, 4])
    admit(bm, a)
    compute_all(bm, a)
    bm.release(a)
    b = req([5, 6, 7, 8])
    admit(bm, b)
    compute_all(bm, b)
    # `a` is unpinned and cached, `b` is running (pinned).
    assert bm.num_available == 2
    c = req([1, 2, 9, 9])  # reuses a's first block, needs one more: evicts a's leaf (the LRU tail first)
    admit(bm, c, step=2)
    assert c.num_cached == 2
    bm.check_invariants()
    assert bm.match_prefix(req([1, 2, 3, 4]), 3).block_ids == [c.block_table[0]]  # a's leaf is gone
    # b's blocks are pinned: they stay cached even though memory is short.
    assert len(bm.match_prefix(req([5, 6, 7, 8]), 3).block_ids) == 2
    d = req([7, 7])
    assert not bm.can_allocate(d, bm.match_prefix(d, 3))
    bm.release(b)
    bm.release(c)
    bm.check_invariants()
    assert all(block.ref_count == 0 for block in bm.blocks)
    admit(bm, d, step=3)
    bm.check_invariants()


def test_can_allocate_counts_reused_idle_blocks():
    bm = BlockManager(num_blocks=3, block_size=2, enable_prefix_caching=True)
    a = req([1, 2, 3, 4])
    admit(bm, a)
    compute_all(bm, a)
    bm.release(a)
    # Reusing both cached blocks and taking the free one: exactly fits.
    b = req([1, 2, 3, 4, 5])
    assert bm.can_allocate(b, bm.match_prefix(b, 2))
    # Needs 2 new blocks but only one is left once the two matched ones are pinned.
    c = req([1, 2, 3, 4, 5, 6, 7])
    assert not bm.can_allocate(c, bm.match_prefix(c, 2))


def test_can_allocate_in_a_full_pool_does_not_count_matched_blocks_in_use_as_taken():
    """Matched blocks another request still holds are not in the free or evictable pool: the one free block is
    enough. The quick yes (room even if every matched block were idle) does not apply here, so this is the count."""
    bm = BlockManager(num_blocks=3, block_size=2, enable_prefix_caching=True)
    a = req([1, 2, 3, 4])
    admit(bm, a)
    compute_all(bm, a)  # a keeps its two blocks
    b = req([1, 2, 3, 4, 5])
    assert bm.can_allocate(b, bm.match_prefix(b, 2))
    c = req([1, 2, 3, 4, 5, 6, 7])
    assert not bm.can_allocate(c, bm.match_prefix(c, 2))


def test_caching_disabled_never_shares_or_keeps_blocks():
    bm = BlockManager(num_blocks=4, block_size=2, enable_prefix_caching=False)
    a = req([1, 2, 3, 4])
    admit(bm, a)
    compute_all(bm, a)
    bm.release(a)
    assert not bm.hash_to_block_id and not bm.evictable and len(bm.free) == 4
    b = req([1, 2, 3, 4])
    admit(bm, b, step=2)
    assert b.num_cached == 0 and b.num_done == 0


def test_abort_of_half_computed_request_forgets_unready_blocks():
    bm = BlockManager(num_blocks=6, block_size=2, enable_prefix_caching=True)
    a = req([1, 2, 3, 4, 5, 6])
    admit(bm, a)
    bm.mark_filling(a, 0, 3, step=1)
    a.num_done = 3
    bm.mark_ready(a)
    bm.release(a)  # aborted after one chunk
    bm.check_invariants()
    assert all(block.ref_count == 0 for block in bm.blocks)
    # Only the computed block is still cached; nothing waits on the forgotten ones.
    match = bm.match_prefix(req([1, 2, 3, 4, 5, 6]), 2)
    assert len(match.block_ids) == 1 and not match.blocked


def test_eviction_takes_the_least_recently_used_entry():
    bm = BlockManager(num_blocks=4, block_size=2, enable_prefix_caching=True)
    a, b = req([1, 2]), req([3, 4])
    for r in (a, b):
        admit(bm, r)
        compute_all(bm, r)
    bm.release(a)
    bm.release(b)  # b is the most recently used
    c = req([5, 6, 7, 8])  # two free blocks: no eviction yet
    admit(bm, c, step=2)
    d = req([9, 9])  # evicts a (least recently used), keeps b
    admit(bm, d, step=2)
    assert bm.match_prefix(req([1, 2]), 3).block_ids == []
    assert len(bm.match_prefix(req([3, 4]), 3).block_ids) == 1
    # Reusing an entry makes it the most recently used again.
    bm.release(d)  # d's block is now newest; b is the oldest
    e = req([3, 4])
    admit(bm, e, step=3)  # b reused
    bm.release(e)  # b is the newest again; d is the oldest
    f = req([7, 7])
    admit(bm, f, step=3)
    assert bm.match_prefix(req([9, 9]), 4).block_ids == []
    assert len(bm.match_prefix(req([3, 4]), 4).block_ids) == 1
    bm.check_invariants()


def test_a_steady_load_reuses_the_blocks_it_freed_instead_of_walking_the_pool():
    """Uncached blocks are handed out most recently freed first: on the CPU a block never written costs no resident
    memory, so a server's RSS stays flat under load instead of creeping up until it has touched the whole pool."""
    bm = BlockManager(num_blocks=64, block_size=4, enable_prefix_caching=True, share_partial_blocks=False)
    used: set[int] = set()
    for step in range(1, 200):
        r = req([7, 7, 7, 7, step, step])  # a full block (a cache hit after the first) and a partial one (not kept here)
        admit(bm, r, step)
        compute_all(bm, r, step)
        used.add(r.block_table[1])
        bm.release(r)
    bm.check_invariants()
    assert used == {1}, f"partial blocks came from {len(used)} different slots of the pool"


def test_the_debug_check_finds_broken_bookkeeping():
    """check_invariants fails where a block is both free and evictable, or a pin count drifts; allocating a request
    twice and releasing a block more often than it was taken are caught where they happen."""
    bm = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=True)
    a = req(list(range(8)))
    admit(bm, a)
    with pytest.raises(AssertionError, match="allocated twice"):
        bm.allocate(a, bm.match_prefix(a, 1))
    compute_all(bm, a)
    bm.pin("node", a)
    bm.check_invariants()
    bm.num_pinned += 1
    with pytest.raises(AssertionError):
        bm.check_invariants()
    bm.num_pinned -= 1
    bm.release(a)
    bm.unpin("node")
    bm.check_invariants()
    bm.free.append(next(iter(bm.evictable)))
    with pytest.raises(AssertionError, match="both free and evictable"):
        bm.check_invariants()
    bm.free.pop()
    a.block_table = [next(iter(bm.evictable))]  # a table released already: its blocks are held by no one
    with pytest.raises(AssertionError, match="released more often"):
        bm.release(a)


def test_partial_reuse_takes_the_longest_run_and_leaves_a_token_to_compute():
    bm = BlockManager(num_blocks=12, block_size=4, enable_prefix_caching=True)
    for tokens in ([1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 5, 6, 7, 8, 9]):  # a partial block [5, 6]; a full one [5, 6, 7, 8]
        r = req(tokens)
        admit(bm, r)
        compute_all(bm, r)
        bm.release(r)
    child = req([1, 2, 3, 4, 5, 6, 7, 50, 51])
    admit(bm, child, step=2)
    source, own, count = child.copy_in
    assert count == 3 and bm.blocks[source].tokens == (5, 6, 7, 8)  # a full block's first tokens count too
    assert own == child.block_table[1] and child.num_cached == 7
    bm.check_invariants()
    same = req([1, 2, 3, 4, 5, 6])  # all of it is cached: the last token is still computed, for its output
    admit(bm, same, step=2)
    assert same.copy_in[2] == 1 and same.num_remaining == 1
    bm.check_invariants()


def test_partial_reuse_needs_a_ready_block_and_forgets_evicted_ones():
    bm = BlockManager(num_blocks=3, block_size=2, enable_prefix_caching=True)
    a = req([1, 2, 3])
    admit(bm, a)
    bm.mark_filling(a, 0, 3, step=1)  # in this step's forward: not ready
    assert bm.match_prefix(req([1, 2, 3, 9]), 1).block_ids == [a.block_table[0]]
    b = req([1, 2, 3, 9])
    admit(bm, b, step=1)
    assert b.copy_in is None and b.num_cached == 2  # a's block 1 is being computed and holds no full-block hash
    a.num_done = 3
    bm.mark_ready(a)
    bm.release(a)
    bm.release(b)
    bm.check_invariants()
    c = req([7, 7, 7, 7, 7, 7])  # needs every block: evicts the cached ones, partial one included
    admit(bm, c, step=2)
    bm.check_invariants()
    assert not bm.by_parent.get(bm._chain_hashes(req([1, 2]))[0][0])
    bm.release(c)


@pytest.mark.parametrize("caching, share", [(True, False), (False, True)])
def test_partial_reuse_off(caching, share):
    bm = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=caching, share_partial_blocks=share)
    a = req(list(range(6)))
    admit(bm, a)
    compute_all(bm, a)
    bm.release(a)
    b = req(list(range(7)))
    admit(bm, b, step=2)
    assert b.copy_in is None and b.num_cached == (4 if caching else 0)
    bm.check_invariants()


def test_reset_forgets_partial_blocks():
    bm = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=True)
    a = req(list(range(6)))
    admit(bm, a)
    compute_all(bm, a)
    bm.release(a)
    bm.reset_prefix_cache()
    assert not bm.by_parent and len(bm.free) == 8
    b = req(list(range(7)))
    admit(bm, b, step=2)
    assert b.copy_in is None and b.num_cached == 0
    bm.check_invariants()


def test_a_repeated_items_partial_block_is_kept_once():
    """Re-sending an item copies its partial block's tokens; that copy is not cached again, so repeats do not
    walk the pool (on the CPU, every block ever written stays resident)."""
    bm = BlockManager(num_blocks=16, block_size=4, enable_prefix_caching=True)
    for step in range(1, 6):
        r = req([1, 2, 3, 4, 5, 6])
        admit(bm, r, step)
        compute_all(bm, r, step)
        bm.release(r)
        bm.check_invariants()
    assert len(bm.evictable) == 2  # the full block and one partial block
    assert len(bm.by_parent) == 2


def test_a_block_the_same_step_computes_is_shared_after_its_forward():
    bm = BlockManager(num_blocks=12, block_size=4, enable_prefix_caching=True)
    a = req([1, 2, 3, 4, 5, 6, 7, 8, 9])
    admit(bm, a, step=1)
    bm.mark_filling(a, 0, 9, step=1)
    b = req([1, 2, 3, 4, 5, 6, 70, 71, 72])  # a sibling in the same step: 5, 6 are a's block 1's first tokens
    admit(bm, b, step=1)
    assert b.block_table[0] == a.block_table[0]  # the full block, shared at once (every layer writes before reading)
    assert b.copy_in is None and b.share_in == (a.block_table[1], b.block_table[1], 2) and b.num_cached == 6
    bm.mark_filling(b, 6, 9, step=1)
    assert bm.blocks[b.block_table[1]].filled_in_step != 1  # its first tokens arrive after the forward
    c = req([1, 2, 3, 4, 5, 6, 70, 71, 99])
    assert bm.match_prefix(c, 1).blocked  # so nobody else in the step reads b's block 1
    bm.check_invariants()
    for r in (a, b):
        r.num_done = r.num_tokens
        bm.mark_ready(r)
    match = admit(bm, c, step=2)
    assert match.block_ids == b.block_table[:2] and c.share_in is None
    bm.check_invariants()


def test_a_block_another_step_computes_is_no_source():
    bm = BlockManager(num_blocks=12, block_size=4, enable_prefix_caching=True)
    a = req([1, 2, 3, 4, 5, 6, 7, 8, 9])
    admit(bm, a, step=1)
    bm.mark_filling(a, 0, 6, step=1)  # a chunk that ends inside block 1: it is completed in a later step
    b = req([1, 2, 3, 4, 5, 6, 70, 71, 72])
    assert bm.match_prefix(b, 1).block_ids == a.block_table[:1]
    admit(bm, b, step=1)
    assert b.share_in is None and b.copy_in is None and b.num_cached == 4
    bm.check_invariants()
