"""`PRMActor`: a whole `PRM` in a Ray actor, for RL loops that hold the reward model in-process (score, extend,
release, sleep, wake_up), and the engine replica that `RoutedPRM` spreads requests over (`run`, `abort`, `unpin`)."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import ray
import torch

from prmserve.engine import EngineStats, Request
from prmserve.engine.futures import all_done
from prmserve.engine.loop import freeze_heap
from prmserve.engine.readout import reading
from prmserve.engine.sleep import SleepReport
from prmserve.prm import PRM
from prmserve.results import ScoreResult


@dataclass(frozen=True)
class RequestSpec:
    """An engine request as it travels to a replica: what `Request` needs to be scored there."""

    request_id: str
    token_ids: list[int]
    read_positions: list[int]
    priority: int
    keep_tokens: int

    @classmethod
    def of(cls, request: Request) -> "RequestSpec":
        return cls(request.request_id, request.token_ids, request.read_positions, request.priority, request.keep_tokens)


@dataclass(frozen=True)
class RequestOutcome:
    """A scored request coming back: head outputs at its read positions (on the CPU), tokens found cached, queue time."""

    outputs: torch.Tensor
    num_cached: int
    queue_seconds: float | None


@dataclass(frozen=True)
class ReplicaInfo:
    """What a router needs to know of a replica once: where it runs and the limits of its engine."""

    device: str
    dtype: str
    max_tokens_per_request: int
    num_blocks: int
    block_size: int
    compiled: bool


@ray.remote
class PRMActor:
    """A `PRM(model, **options)` in its own process: `PRMActor.options(num_gpus=1).remote(model)`, then
    `ray.get(actor.score.remote(items))`. Calls run concurrently (an async actor), so they batch in one engine.
    The actor owns its process, so the loaded heap is frozen, as the commands do (`freeze_heap`)."""

    def __init__(self, model: str | None = None, **options: Any) -> None:
        self.prm = PRM(model, **options)
        freeze_heap()
        self._inflight: dict[str, Future] = {}

    # The PRM's own API --------------------------------------------------------------------------------------

    async def score(self, items: Sequence[Mapping[str, Any]], priority: int = 0, keep: bool = False) -> list[ScoreResult]:
        """`PRM.score`: results in item order; `keep=True` gives handles valid on this actor."""
        return await self.prm.score_async(items, priority, keep)

    async def extend(self, handle: str, children: Sequence[Sequence[str]], priority: int = 0, keep: bool = False) -> list[ScoreResult]:
        """`PRM.extend` of a node kept by this actor."""
        return await self.prm.extend_async(handle, children, priority, keep)

    def release(self, handles: str | Sequence[str]) -> int:
        return self.prm.release(handles)

    async def sleep(self, level: int = 1) -> SleepReport:
        """`PRM.sleep`: waits for the work in flight, then frees the KV pool and moves or drops the weights."""
        return await asyncio.to_thread(self.prm.sleep, level)

    async def wake_up(self) -> None:
        await asyncio.to_thread(self.prm.wake_up)

    def is_sleeping(self) -> bool:
        return self.prm.is_sleeping

    def stats(self) -> EngineStats:
        return self.prm.engine.stats()

    async def reset_prefix_cache(self) -> None:
        """`PRM.reset_prefix_cache`: after new weights, forget cached prefixes and kept nodes."""
        await asyncio.to_thread(self.prm.reset_prefix_cache)

    # The engine replica's side, for RoutedPRM ----------------------------------------------------------------

    def info(self) -> ReplicaInfo:
        prm = self.prm
        blocks = prm.engine.blocks
        return ReplicaInfo(str(prm.device), str(prm.dtype).removeprefix("torch."), prm.engine.max_tokens_per_request,
                           blocks.num_blocks, blocks.block_size, prm.compiled)

    async def run(self, specs: Sequence[RequestSpec]) -> tuple[list[RequestOutcome], EngineStats]:
        """Score requests planned elsewhere (queued together, as `PRM.submit_jobs` does); their outcomes in order,
        and the engine's totals after them. Cancelling the call aborts what is still queued."""
        requests = [Request(s.request_id, list(s.token_ids), list(s.read_positions), s.priority, keep_tokens=s.keep_tokens)
                    for s in specs]
        futures = self.prm.loop.submit_requests(requests)
        self._inflight.update((r.request_id, f) for r, f in zip(requests, futures))
        try:
            done = await all_done(futures)
        finally:
            for request, future in zip(requests, futures):
                future.cancel()  # a no-op once finished; aborts the rest
                self._inflight.pop(request.request_id, None)
        with reading(done):
            outputs = torch.cat([r.outputs for r in done]).cpu().split([len(r.read_positions) for r in done])
        outcomes = [RequestOutcome(o, r.num_cached, r.queue_seconds) for o, r in zip(outputs, done)]
        return outcomes, self.prm.engine.stats()

    def abort(self, request_ids: Sequence[str]) -> None:
        """Drop queued requests of a `run` whose caller gave up on them."""
        for request_id in request_ids:
            future = self._inflight.pop(request_id, None)
            if future is not None:
                future.cancel()

    def unpin(self, key: str) -> None:
        """Let a kept request's blocks be evicted (its node was released by the router)."""
        self.prm.loop.unpin(key)
