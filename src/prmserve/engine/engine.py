"""The engine loop: admit requests, schedule a step, run it, hand finished requests their outputs."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from prmserve.engine.block_manager import BlockManager
from prmserve.engine.config import EngineConfig
from prmserve.engine.model_runner import ModelRunner
from prmserve.engine.request import Request
from prmserve.engine.scheduler import Scheduler
from prmserve.errors import InputTooLongError, InvalidInputError
from prmserve.models.transformer import RewardModel


@dataclass
class StepStats:
    """What one step did, for metrics; `seconds` is the host's share (the GPU may still be running it)."""

    num_seqs: int
    num_tokens: int
    seconds: float


@dataclass
class EngineStats:
    """Totals since start and the queue as it is now."""

    num_waiting: int
    num_running: int
    num_steps: int
    prompt_tokens: int
    computed_tokens: int
    cached_tokens: int
    kv_blocks_total: int
    kv_blocks_in_use: int
    kv_blocks_pinned: int


class Engine:
    """Single-threaded core: `add`, `step`, `abort`. The thread-safe front is `EngineLoop`."""

    def __init__(self, model: RewardModel, config: EngineConfig) -> None:
        self.config = config
        self.model = model
        param = next(model.parameters())
        num_blocks = config.num_kv_blocks or _pool_blocks(model, config, param.device, param.dtype)
        self.blocks = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching, config.max_pinned_fraction)
        self.scheduler = Scheduler(config, self.blocks)
        self.runner = ModelRunner(model, self.blocks)
        self.step_observers: list[Callable[[StepStats], None]] = []
        self._device = param.device
        self._launched: torch.cuda.Event | None = None  # the GPU work of the last step, once launched
        self._steps = self._prompt = self._computed = self._cached = 0

    @property
    def max_tokens_per_request(self) -> int:
        """The longest prompt the KV pool can ever hold."""
        return self.blocks.num_blocks * self.blocks.block_size

    def add(self, request: Request) -> None:
        """Queue a request; refuse it if it can never be scored (the queue limit is `EngineLoop`'s)."""
        if request.num_tokens == 0:
            raise InvalidInputError("an empty token sequence cannot be scored")
        if any(not 0 <= p < request.num_tokens for p in request.read_positions):
            raise InvalidInputError(f"read positions must lie in [0, {request.num_tokens}) for a {request.num_tokens}-token input")
        if request.num_tokens > self.max_tokens_per_request:
            raise InputTooLongError(
                f"{request.num_tokens} tokens exceed the KV pool's {self.max_tokens_per_request}; give it more memory"
            )
        self.scheduler.add(request)

    def abort(self, request_id: str) -> bool:
        """Drop a request and free its memory; False if it was not there."""
        return self.scheduler.abort(request_id) is not None

    def unpin(self, key: str) -> bool:
        """Let a kept request's blocks be evicted again (its node handle was released or expired)."""
        return self.blocks.unpin(key)

    def wait_for_gpu(self) -> None:
        """Block until the last step's GPU work is done: requests that arrive meanwhile join the next step
        (continuous batching), instead of many tiny steps queueing behind it on the GPU."""
        if self._launched is not None:
            self._launched.synchronize()
            self._launched = None

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def reset_prefix_cache(self) -> None:
        """Drop all cached prefixes: after new weights, cached KV and rewards are stale."""
        self.blocks.reset_prefix_cache()

    def step(self) -> list[Request]:
        """Run one forward pass; return the requests it finished, with `outputs` set."""
        started = time.perf_counter()
        plan = self.scheduler.schedule()
        if plan.chunks:
            self.runner.run(plan.chunks)
        done = self.scheduler.finish_step(plan)
        if done:
            for request, outputs in zip(done, self.runner.read_outputs(done)):
                request.outputs = outputs
        if plan.chunks and self._device.type == "cuda":
            self._launched = torch.cuda.Event()
            self._launched.record()
        for request in done:
            if request.keep_tokens:
                self.blocks.pin(request.request_id, request)  # a node kept for its children
            self.scheduler.release(request)
            usage = request.usage
            self._prompt += usage.prompt_tokens
            self._computed += usage.computed_tokens
            self._cached += usage.cached_tokens
        self._steps += 1
        if plan.chunks and self.step_observers:
            stats = StepStats(len(plan.chunks), plan.num_tokens, time.perf_counter() - started)
            for observer in self.step_observers:
                observer(stats)
        return done

    def stats(self) -> EngineStats:
        in_use = self.blocks.num_blocks - self.blocks.num_available
        return EngineStats(
            self.scheduler.num_waiting, self.scheduler.num_running, self._steps,
            self._prompt, self._computed, self._cached, self.blocks.num_blocks, in_use, self.blocks.num_pinned,
        )


def _pool_blocks(model: RewardModel, config: EngineConfig, device: torch.device, dtype: torch.dtype) -> int:
    """Blocks that fit the configured memory: a GPU fraction, or a size in GB on the CPU."""
    per_block = ModelRunner.bytes_per_block(model, config.block_size, dtype)
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        used = total - free
        # Leave room for the largest batch's activations: about 12 bytes per token per MLP unit (gate/up, product, temporaries).
        activations = config.max_num_batched_tokens * model.config.intermediate_size * 2 * 6
        budget = total * config.gpu_memory_utilization - used - activations
    else:
        budget = config.kv_cache_gb * 1024**3
    blocks = int(budget // per_block)
    if blocks < 1:
        raise MemoryError("no memory left for the KV pool: raise gpu_memory_utilization or kv_cache_gb")
    return blocks
