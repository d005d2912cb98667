"""Chooses what the next forward pass computes: by priority, within the token and sequence budgets."""

from __future__ import annotations

import heapq
import time
from dataclasses import dataclass, field

from prmserve.engine.block_manager import BlockManager, PrefixMatch
from prmserve.engine.config import EngineConfig
from prmserve.engine.request import Request, RequestStatus

GRAPH_SPLIT = 4  # a queue of up to this many graph-sized steps is split into them
# New tokens that make a step worth launching behind the one on the GPU instead of waiting for arrivals to join it:
# a layer's GEMMs do about as many FLOPs per weight byte as the step has tokens, and Hopper turns compute-bound near
# 300 (H100) or 210 (H200), so waiting for a bigger step would save no GPU time.
RUN_AHEAD_TOKENS = 512


@dataclass
class ScheduledChunk:
    """Tokens [start, end) of one request, computed in this step."""

    request: Request
    start: int
    end: int


@dataclass
class Schedule:
    """One step's work: chunks to compute, and requests already complete from the cache alone."""

    step: int
    chunks: list[ScheduledChunk] = field(default_factory=list)
    finished_from_cache: list[Request] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(c.end - c.start for c in self.chunks)


class Scheduler:
    """Priority queue (lower value first, FIFO within a level) over waiting and running requests.

    A request is admitted only when blocks for its whole prompt are available, so an admitted
    request never stalls for memory; a long prompt is split into chunks across steps.
    """

    def __init__(self, config: EngineConfig, blocks: BlockManager) -> None:
        self.config = config
        self.blocks = blocks
        self.queue: list[tuple[tuple[int, int], Request]] = []  # every unfinished request
        self.requests: dict[str, Request] = {}
        # Unfinished requests per status, counted as they move: metrics read them from other threads,
        # which must never iterate `requests` while this thread changes it.
        self._counts = {RequestStatus.WAITING: 0, RequestStatus.RUNNING: 0}
        self.step = 0
        # The largest step a CUDA graph replays (None: no graphs). A small queue goes in steps of that size: a
        # replay costs ~1 ms of host time, an eager step ~20 ms of kernel launches (28 layers), which left the
        # GPU idle 2/3 of a beam search on a 1.5B model (bench/notes).
        self.graph_tokens: int | None = None
        self._spared: dict[str, int] = {}  # waiting request -> tokens its cached prefix spared when first looked at

    def step_budget(self) -> int:
        """Tokens the next step may take: `max_num_batched_tokens`, or, while the queue holds at most GRAPH_SPLIT
        graph-sized steps after its cache hits (a bigger queue keeps the GPU busy whatever the host does), an even
        share of it in as few steps as the graphs replay: 2,300 queued tokens go as 2 x 1,150, not 2,048 + 252,
        whose small tail step is memory-bound (it reads all the weights for a few tokens: 7.5 ms on a 7B, H100)."""
        budget = self.config.max_num_batched_tokens
        if self.graph_tokens is None or self.graph_tokens >= budget:
            return budget
        queued = 0
        for _, request in self.queue:
            queued += self._uncached(request)
            if queued > GRAPH_SPLIT * self.graph_tokens:
                return budget
        steps = -(-queued // self.graph_tokens)
        return self.graph_tokens if steps <= 1 else -(-queued // steps)

    def _uncached(self, request: Request) -> int:
        """Tokens the request still needs computed; for a waiting one, less what its cached prefix spares (an
        estimate made when first looked at, and kept)."""
        remaining = request.num_remaining
        if request.status is RequestStatus.WAITING:
            spared = self._spared.get(request.request_id)
            if spared is None:
                spared = len(self.blocks.match_prefix(request, self.step + 1).block_ids) * self.blocks.block_size
                self._spared[request.request_id] = spared
            remaining -= spared
        return remaining

    def add(self, request: Request) -> None:
        assert request.status is RequestStatus.WAITING, f"request {request.request_id} was added twice"
        self.requests[request.request_id] = request
        self._counts[RequestStatus.WAITING] += 1
        heapq.heappush(self.queue, (request.sort_key, request))

    def abort(self, request_id: str) -> Request | None:
        """Remove a request wherever it is; its blocks are released."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        self._spared.pop(request_id, None)
        self.queue = [(k, r) for k, r in self.queue if r is not request]
        heapq.heapify(self.queue)
        self._release(request)
        return request

    @property
    def num_waiting(self) -> int:
        return self._counts[RequestStatus.WAITING]

    @property
    def num_running(self) -> int:
        return self._counts[RequestStatus.RUNNING]

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    def worth_running_ahead(self) -> bool:
        """Whether the queued work makes a step worth launching behind the one the GPU runs now: a full sequence
        budget, or new tokens (after cache hits) enough to fill the step or to keep the GPU compute-bound."""
        if len(self.queue) >= self.config.max_num_seqs:
            return True
        need = min(self.step_budget(), RUN_AHEAD_TOKENS)
        for _, request in self.queue:
            need -= self._uncached(request)
            if need <= 0:
                return True
        return False

    def schedule(self) -> Schedule:
        """Pick this step's chunks in priority order."""
        budget = self.step_budget()
        self.step += 1
        plan = Schedule(self.step)
        kept: list[tuple[tuple[int, int], Request]] = []
        admitting = True  # strict priority: once one request can't get memory, admit none behind it
        while self.queue and budget > 0 and len(plan.chunks) < self.config.max_num_seqs:
            key, request = heapq.heappop(self.queue)
            kept.append((key, request))
            if request.status is RequestStatus.WAITING:
                if not admitting:
                    continue
                match = self.blocks.match_prefix(request, self.step)
                if match.blocked:
                    continue  # its prefix is being computed by another request: wait, don't redo it
                if not self._make_room(request, match):
                    admitting = False
                    continue
                self.blocks.allocate(request, match, self.step)
                self._move(request, RequestStatus.RUNNING)
                request.scheduled_at = time.monotonic()
                if request.num_remaining == 0:
                    kept.pop()
                    plan.finished_from_cache.append(request)
                    continue
            end = request.num_done + min(request.num_remaining, budget)
            self.blocks.mark_filling(request, request.num_done, end, self.step)
            plan.chunks.append(ScheduledChunk(request, request.num_done, end))
            budget -= end - request.num_done
        for item in kept:
            heapq.heappush(self.queue, item)
        return plan

    def _make_room(self, request: Request, match: PrefixMatch) -> bool:
        """Whether the request's blocks can be allocated, dropping pins (oldest first) that are in the way.

        Unpinned blocks stay cached until taken, so the match stays valid.
        """
        while not self.blocks.can_allocate(request, match):
            if not self.blocks.unpin_oldest():
                return False
        return True

    def finish_step(self, plan: Schedule) -> list[Request]:
        """Advance the computed chunks; return the requests now complete (their blocks released)."""
        done = list(plan.finished_from_cache)
        for chunk in plan.chunks:
            chunk.request.num_done = chunk.end
            self.blocks.mark_ready(chunk.request)
            if chunk.request.num_remaining == 0:
                done.append(chunk.request)
        if done:
            finished = {id(r) for r in done}
            self.queue = [(k, r) for k, r in self.queue if id(r) not in finished]
            heapq.heapify(self.queue)
        return done

    def release(self, request: Request) -> None:
        """Free a finished request's blocks (after its outputs were read) and forget it."""
        self.requests.pop(request.request_id, None)
        self._release(request)

    def _release(self, request: Request) -> None:
        if request.block_table:
            self.blocks.release(request)
        if request.status is not RequestStatus.FINISHED:
            self._move(request, RequestStatus.FINISHED)

    def _move(self, request: Request, status: RequestStatus) -> None:
        """Change a request's status and the per-status counts with it."""
        if request.status is RequestStatus.WAITING:
            self._spared.pop(request.request_id, None)
        self._counts[request.status] -= 1
        if status in self._counts:
            self._counts[status] += 1
        request.status = status
