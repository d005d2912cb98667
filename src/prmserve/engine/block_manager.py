"""Paged KV blocks with reference counts, and the prefix cache over them.

A full block is known by the hash of its tokens chained to its predecessor's hash, so a block id
stands for a whole token prefix. Blocks with no users stay cached (KV and head outputs intact)
in LRU order until memory is needed. A block registered by a request scheduled in the current
step can be shared at once: every layer writes the step's new keys before any sequence reads them.

A block is also indexed under its predecessor's hash, so a request whose next tokens begin like a cached
block's (a child after its node's last, partly filled block; siblings after a shared prompt) copies those
tokens' KV into its own block instead of computing them again: with 16-token blocks, every child of a node
otherwise recomputes up to 15 of its parent's tokens. A finished request's last, partial block stays cached
(evictable) for that. The copy is the runner's, before the step's forward writes anything. Where the source
block is being computed in the same step (siblings that arrive together), the request's attention reads those
tokens' keys from the source's slots and the copy follows the forward (`Request.share_in`); until then its own
block is not offered to other requests of the step.

A pin (a tree-search node kept for its children) holds one reference on a finished request's
cached blocks, so they are not evicted; pins are dropped oldest first when they would take more
than their share of the pool, or when a request needs their memory.
"""

from __future__ import annotations

import gc
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass

from prmserve.engine.request import Request


@dataclass(slots=True)  # no per-block dict: a pool has ~100k of them, and the garbage collector walks each
class KVBlock:
    """One page of `block_size` token slots."""

    block_id: int
    ref_count: int = 0
    hash: int | None = None
    tokens: tuple[int, ...] = ()  # a partial block's are fewer than block_size
    parent: int | None = None  # the hash before it, while indexed as a source of copies (ready hash owners, kept partial blocks)
    ready: bool = False  # its KV and head outputs are written
    filled_in_step: int = -1  # the step whose forward writes it, while not ready


@dataclass(frozen=True)
class PrefixMatch:
    """Cached blocks a request can reuse; `blocked` when the next block is still being computed elsewhere."""

    block_ids: list[int]
    blocked: bool


PARTIAL_CANDIDATES = 16  # cached blocks after one prefix looked at for a partial reuse, newest first (bounds the scan)


class BlockManager:
    """Allocates blocks to requests, shares cached prefixes, evicts unused cached blocks LRU-first."""

    def __init__(
        self, num_blocks: int, block_size: int, enable_prefix_caching: bool, max_pinned_fraction: float = 0.5,
        share_partial_blocks: bool = True,
    ) -> None:
        """`share_partial_blocks`: reuse the leading tokens of cached blocks by copying (off where the runner
        cannot copy, as with tensor parallelism's other ranks' pools)."""
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.share_partial_blocks = share_partial_blocks and enable_prefix_caching
        self.blocks = _new_blocks(num_blocks)
        # Hold nothing reusable; the most recently freed first, so a steady load keeps reusing the same few
        # blocks (on the CPU an untouched block costs no resident memory, so RSS stays flat instead of
        # creeping towards the whole pool as a FIFO walk through it would make it).
        self.free: deque[int] = deque(range(num_blocks))
        self.evictable: OrderedDict[int, None] = OrderedDict()  # unused but cached (KV intact), oldest first
        self.hash_to_block_id: dict[int, int] = {}
        self.by_parent: dict[int, dict[int, None]] = {}  # predecessor hash -> blocks indexed after it, newest last
        self.pins: OrderedDict[str, list[int]] = OrderedDict()  # pin key -> blocks it holds, oldest first
        self.num_pinned = 0  # block references held by pins
        self.max_pinned = int(num_blocks * max_pinned_fraction)

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_available(self) -> int:
        """Blocks that can be handed out now (free or evictable)."""
        return len(self.free) + len(self.evictable)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _chain_hashes(self, request: Request) -> list[tuple[int, tuple[int, ...]]]:
        """(hash, tokens) of every full block of the request's tokens, computed once per request.

        Keys handed down from a parent (`request.block_hashes` set at submit) are continued, not redone.
        """
        known = request.block_hashes or []
        full = len(request.token_ids) // self.block_size
        if request.block_hashes is None or len(known) < full:
            out, ids, size = list(known), request.token_ids, self.block_size
            parent = out[-1][0] if out else 0
            for start in range(len(out) * size, full * size, size):
                tokens = tuple(ids[start : start + size])
                parent = hash((parent, tokens))
                out.append((parent, tokens))
            request.block_hashes = out
        return request.block_hashes

    def match_prefix(self, request: Request, step: int) -> PrefixMatch:
        """The longest run of cached full blocks usable in `step` at the start of the request."""
        if not self.enable_prefix_caching:
            return PrefixMatch([], False)
        matched: list[int] = []
        for block_hash, tokens in self._chain_hashes(request):
            block_id = self.hash_to_block_id.get(block_hash)
            if block_id is None:
                break
            block = self.blocks[block_id]
            if block.tokens != tokens:  # a hash collision: treat as a miss
                break
            if not block.ready and block.filled_in_step != step:
                return PrefixMatch(matched, True)
            matched.append(block_id)
        return PrefixMatch(matched, False)

    def can_allocate(self, request: Request, match: PrefixMatch) -> bool:
        """Enough blocks for the rest of the request, after reusing the matched ones.

        Matched blocks that are idle count as available but cannot be taken; they are counted only when the pool
        is too full for the answer to be yes whatever their number (this runs for every admitted request)."""
        new = self.blocks_needed(request.num_tokens) - len(match.block_ids)
        available = self.num_available
        if new <= available - len(match.block_ids):
            return True
        reused_idle = sum(1 for b in match.block_ids if self.blocks[b].ref_count == 0)
        return new <= available - reused_idle

    def allocate(self, request: Request, match: PrefixMatch, step: int | None = None) -> None:
        """Give the request its whole block table: matched blocks shared, the rest fresh. `step`: the step it is
        scheduled in (blocks that step completes can be copied from)."""
        assert not request.block_table, f"{request.request_id} is allocated twice"
        # Looked up before new blocks are taken (taking may evict the source: its KV stays intact until this
        # step's forward, which runs after the copy).
        partial = self._partial_source(request, len(match.block_ids), step)
        for block_id in match.block_ids:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                self.evictable.pop(block_id, None)
            block.ref_count += 1
        table = list(match.block_ids)
        for _ in range(self.blocks_needed(request.num_tokens) - len(table)):
            table.append(self._take_block())
        hashes = self._chain_hashes(request) if self.enable_prefix_caching else []
        for index in range(len(match.block_ids), len(hashes)):
            block_hash, tokens = hashes[index]
            block = self.blocks[table[index]]
            if block_hash not in self.hash_to_block_id:  # first writer owns the cache entry
                block.hash, block.tokens = block_hash, tokens
                self.hash_to_block_id[block_hash] = block.block_id
                if self.share_partial_blocks:  # a source for copies once ready, or while its step computes it
                    self._index(block, hashes[index - 1][0] if index else 0)
        request.block_table = table
        request.num_cached = request.num_done = len(match.block_ids) * self.block_size
        if partial is not None:
            source, count, same_step = partial
            copy = (source, table[len(match.block_ids)], count)
            if same_step:
                request.share_in = copy
            else:
                request.copy_in = copy
            request.num_cached = request.num_done = request.num_done + count

    def _partial_source(self, request: Request, matched: int, step: int | None) -> tuple[int, int, bool] | None:
        """(block, count, same step): a cached block after the request's matched blocks whose first `count` tokens
        are the request's next ones (the most among the newest few), leaving at least one token to compute; ready,
        or completed by `step` itself (same step); None if none."""
        if not self.share_partial_blocks:
            return None
        hashes = self._chain_hashes(request)
        after = self.by_parent.get(hashes[matched - 1][0] if matched else 0)
        if not after:
            return None
        start = matched * self.block_size
        wanted = tuple(request.token_ids[start : min(start + self.block_size, request.num_tokens - 1)])
        best, most = None, 0
        for seen, block_id in enumerate(reversed(after)):
            if seen == PARTIAL_CANDIDATES or most == len(wanted):
                break
            block = self.blocks[block_id]
            theirs = block.tokens
            if not (block.ready or block.filled_in_step == step) or theirs[: most + 1] != wanted[: most + 1]:
                continue  # cannot beat the best so far (one slice comparison: this runs per child on the hot path)
            same = most + 1
            while same < len(wanted) and same < len(theirs) and theirs[same] == wanted[same]:
                same += 1
            best, most = block_id, same
        return None if best is None else (best, most, not self.blocks[best].ready)

    def _index(self, block: KVBlock, parent: int) -> None:
        block.parent = parent
        self.by_parent.setdefault(parent, {})[block.block_id] = None

    def _take_block(self) -> int:
        if self.free:
            block_id = self.free.popleft()
        else:
            block_id, _ = self.evictable.popitem(last=False)  # evict the least recently used
            self._forget(self.blocks[block_id])
        block = self.blocks[block_id]
        block.ref_count, block.ready, block.filled_in_step = 1, False, -1
        return block_id

    def _forget(self, block: KVBlock) -> None:
        if block.hash is not None and self.hash_to_block_id.get(block.hash) == block.block_id:
            del self.hash_to_block_id[block.hash]
        if block.parent is not None:
            after = self.by_parent.get(block.parent)
            if after is not None:
                after.pop(block.block_id, None)
                if not after:
                    del self.by_parent[block.parent]
        block.hash, block.tokens, block.parent = None, (), None

    def mark_filling(self, request: Request, start: int, end: int, step: int) -> None:
        """Tokens [start, end) of the request are computed in `step`: note which blocks that completes (not a block
        whose first tokens are copied in after the forward: others in the step cannot read it)."""
        shared_into = request.share_in[1] if request.share_in is not None else None
        for index in range(start // self.block_size, self.blocks_needed(end)):
            block = self.blocks[request.block_table[index]]
            if not block.ready and (index + 1) * self.block_size <= end and block.block_id != shared_into:
                block.filled_in_step = step

    def mark_ready(self, request: Request) -> None:
        """After a forward: blocks fully covered by the request's computed tokens hold valid KV."""
        for index in range(request.num_done // self.block_size):
            self.blocks[request.block_table[index]].ready = True

    def release(self, request: Request) -> None:
        """Drop the request's references; cached blocks go to the LRU tail, leaves first to be evicted. A finished
        request's last, partial block stays cached too (for partial reuse)."""
        if self.share_partial_blocks and request.block_table and request.num_done == request.num_tokens:
            self._keep_partial(request)
        self._drop_references(request.block_table)
        request.block_table = []

    def _keep_partial(self, request: Request) -> None:
        """Index a finished request's partly filled last block under the hash of the full blocks before it."""
        full = request.num_tokens // self.block_size
        hashes = request.block_hashes or []
        if request.num_tokens % self.block_size == 0 or len(request.block_table) <= full or len(hashes) < full:
            return
        block = self.blocks[request.block_table[full]]
        if block.parent is not None or block.ref_count != 1:
            return
        parent, tokens = hashes[full - 1][0] if full else 0, tuple(request.token_ids[full * self.block_size :])
        for seen, block_id in enumerate(reversed(self.by_parent.get(parent, {}))):
            if seen == PARTIAL_CANDIDATES:
                break
            if self.blocks[block_id].tokens[: len(tokens)] == tokens:
                return  # a cached block begins with these tokens already (a repeated item): keep one copy
        block.tokens = tokens
        block.ready = True
        self._index(block, parent)

    def _drop_references(self, block_ids: list[int]) -> None:
        """One reference less on each block, last first: unused cached blocks become evictable (leaves
        first), unused uncached ones free."""
        for block_id in reversed(block_ids):
            block = self.blocks[block_id]
            assert block.ref_count > 0, f"block {block_id} released more often than it was taken"
            block.ref_count -= 1
            if block.ref_count > 0:
                continue
            if (block.hash is not None or block.parent is not None) and block.ready:  # a hash owner or a kept partial block
                self.evictable[block_id] = None
            else:
                self._forget(block)
                block.ready = False
                self.free.appendleft(block_id)

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix (e.g. after a weight update); blocks in use keep serving their owners."""
        for key in list(self.pins):
            self.unpin(key)
        for block in self.blocks:
            self._forget(block)
        self.by_parent.clear()
        self.free.extendleft(self.evictable)
        self.evictable.clear()

    # Pins -----------------------------------------------------------------------------------------

    def pin(self, key: str, request: Request) -> int:
        """Hold the cached full blocks of the request's first `keep_tokens` tokens under `key`, and the block with
        the last few of them (children copy those).

        Call before the request's own references are freed. Older pins (this one too, if alone it is
        over the share) are dropped until pins hold at most `max_pinned` blocks. Returns blocks pinned.
        """
        held = []
        keep = min(request.keep_tokens, request.num_tokens)
        for index in range(keep // self.block_size):
            block = self.blocks[request.block_table[index]]
            if block.hash is None or self.hash_to_block_id.get(block.hash) != block.block_id or not block.ready:
                break  # not findable by a child's prefix match: pinning it (or what follows) buys nothing
            held.append(block.block_id)
        if self.share_partial_blocks and keep % self.block_size and len(held) == keep // self.block_size:
            self._keep_partial(request)  # the block holding the kept tokens' last few: children copy them
            block = self.blocks[request.block_table[len(held)]]
            if block.parent is not None and block.ready:
                held.append(block.block_id)
        if not held:
            return 0
        for block_id in held:
            self.blocks[block_id].ref_count += 1
        self.pins[key] = held
        self.num_pinned += len(held)
        while self.num_pinned > self.max_pinned and self.pins:
            self.unpin(next(iter(self.pins)))
        return len(self.pins.get(key, ()))

    def unpin(self, key: str) -> bool:
        """Drop a pin; its blocks stay cached (evictable, LRU) unless something else holds them."""
        held = self.pins.pop(key, None)
        if held is None:
            return False
        self.num_pinned -= len(held)
        self._drop_references(held)
        return True

    def unpin_oldest(self) -> bool:
        """Drop the oldest pin to make room for a request; False when nothing is pinned."""
        return bool(self.pins) and self.unpin(next(iter(self.pins)))

    def check_invariants(self) -> None:
        """Raise AssertionError where the bookkeeping disagrees with itself (a debug check; tests call it)."""
        free, evictable = set(self.free), set(self.evictable)
        assert len(free) == len(self.free), "a block is free twice"
        assert not free & evictable, f"blocks both free and evictable: {sorted(free & evictable)}"
        unused = free | evictable
        for block in self.blocks:
            assert block.ref_count >= 0, block
            assert (block.ref_count == 0) == (block.block_id in unused), block
            if block.block_id in evictable:
                assert block.ready and (block.hash is not None or block.parent is not None), block
                assert block.hash is None or self.hash_to_block_id.get(block.hash) == block.block_id, block
            if block.parent is not None:
                assert block.block_id in self.by_parent.get(block.parent, {}), block
        for parent, after in self.by_parent.items():
            for block_id in after:
                assert self.blocks[block_id].parent == parent, (parent, self.blocks[block_id])
        for block_hash, block_id in self.hash_to_block_id.items():
            assert self.blocks[block_id].hash == block_hash, (block_hash, self.blocks[block_id])
        pinned = Counter(b for held in self.pins.values() for b in held)
        assert self.num_pinned == pinned.total(), (self.num_pinned, pinned.total())
        for block_id, count in pinned.items():
            assert self.blocks[block_id].ref_count >= count, self.blocks[block_id]

    def slot(self, request: Request, position: int) -> int:
        """The KV pool slot holding the token at `position` of the request."""
        return request.block_table[position // self.block_size] * self.block_size + position % self.block_size


def _new_blocks(count: int) -> list[KVBlock]:
    """The pool's blocks, made with the garbage collector paused: growing the heap by ~100k objects at once set off
    several full collections, each walking the whole heap (70 ms of loading for 130k blocks on a 2-core CPU)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        return [KVBlock(i) for i in range(count)]
    finally:
        if enabled:
            gc.enable()
