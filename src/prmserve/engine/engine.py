"""The engine loop: admit requests, schedule a step, run it, hand finished requests their outputs."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from prmserve.engine.block_manager import BlockManager
from prmserve.engine.config import EngineConfig
from prmserve.engine.model_runner import ModelRunner
from prmserve.engine.request import Request
from prmserve.engine.scheduler import Scheduler
from prmserve.engine.sleep import (
    SLEEP_LEVELS,
    SleepReport,
    device_memory_in_use,
    drop_weights,
    offload_weights,
    refill_weights,
    restore_weights,
)
from prmserve.errors import InputTooLongError, InvalidInputError
from prmserve.models.transformer import RewardModel

if TYPE_CHECKING:
    from prmserve.parallel.workers import TensorParallelWorkers


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

    def __init__(self, model: RewardModel, config: EngineConfig, workers: TensorParallelWorkers | None = None) -> None:
        """`workers`: the other tensor-parallel ranks, when `model` is rank 0's part of a split model."""
        self.config = config
        self.model = model
        param = next(model.parameters())
        num_blocks = config.num_kv_blocks or _pool_blocks(model, config, param.device, param.dtype, workers)
        self.blocks = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching, config.max_pinned_fraction,
                                   share_partial_blocks=workers is None)  # the other ranks' pools get no copies
        self.scheduler = Scheduler(config, self.blocks)
        self.runner = ModelRunner(model, self.blocks, workers)
        self.step_observers: list[Callable[[StepStats], None]] = []
        self._device = param.device
        self._launched: deque[torch.cuda.Event] = deque()  # steps launched whose GPU work may not be done
        self._steps = self._prompt = self._computed = self._cached = 0
        self.sleep_level = 0  # 0 awake; else the level it sleeps at (its runner and pools are gone)
        self._graph_seqs: int | None = None  # the CUDA graphs' max_seqs, to capture them again on waking

    def capture_graphs(self, max_seqs: int) -> bool:
        """`ModelRunner.capture_graphs`, and small queues scheduled in steps the graphs replay."""
        same_layers = self.runner.capture_graphs(max_seqs)
        self.scheduler.graph_tokens = self.runner.graphs.max_tokens
        return same_layers

    @property
    def device(self) -> torch.device:
        return self._device

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
        """Block until the launched steps' GPU work is done (before sleep mode moves the pools and weights)."""
        while self._launched:
            self._launched.popleft().synchronize()

    def make_way(self) -> bool:
        """Before the next step: whether it may be launched now, without waiting. Yes when the queue is worth a step
        behind the one still running (`Scheduler.worth_running_ahead`; one step ahead at most, so the GPU never idles
        while the host schedules), or when the GPU is done; else no, and the caller (`EngineLoop`) takes in arrivals
        meanwhile, so they join the next step, and asks again."""
        if self._launched and self.scheduler.worth_running_ahead():
            while len(self._launched) > 1:
                self._launched.popleft().synchronize()
            return True
        return self.gpu_done()

    def gpu_done(self) -> bool:
        """Whether every launched step's GPU work is done (forgetting those that are), without waiting."""
        while self._launched and self._launched[0].query():
            self._launched.popleft()
        return not self._launched

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def reset_prefix_cache(self) -> None:
        """Drop all cached prefixes: after new weights, cached KV and rewards are stale."""
        self.blocks.reset_prefix_cache()

    def sleep(self, level: int = 1) -> SleepReport:
        """Give the device back while idle: the KV pool (and its prefix cache, pins included) goes, weights go to host
        memory (level 1) or are dropped (level 2). Call with nothing unfinished."""
        if level not in SLEEP_LEVELS:
            raise InvalidInputError(f"sleep level must be 1 or 2, not {level!r}")
        if getattr(self.runner, "workers", None) is not None:  # the other ranks' weights and pools are not ours to move
            raise InvalidInputError("sleep mode does not work with tensor_parallel_size > 1 yet")
        assert not self.has_unfinished() and not self.sleep_level, "sleep needs an idle, awake engine"
        started = time.perf_counter()
        self.wait_for_gpu()
        before = device_memory_in_use(self._device)
        pool_bytes = self.blocks.num_blocks * ModelRunner.bytes_per_block(self.model, self.blocks.block_size, self.runner.dtype)
        self.blocks.reset_prefix_cache()
        self._graph_seqs = self.runner.graphs.max_seqs if self.runner.graphs is not None else None
        del self.runner  # the pools and the graphs that point into them
        dropped = offload_weights(self.model) if level == 1 else drop_weights(self.model)
        self.sleep_level = level
        after = device_memory_in_use(self._device)
        if before is None or after is None:
            return SleepReport(level, pool_bytes + dropped, "KV pool bytes" + (" + weight bytes" if dropped else ""),
                               time.perf_counter() - started)
        return SleepReport(level, before - after, "torch.cuda.mem_get_info", time.perf_counter() - started)

    def wake_up(self, reload: Callable[[], RewardModel] | None = None) -> None:
        """Undo `sleep`: weights back on the device (from `reload()`, the checkpoint loaded again, after level 2),
        a fresh KV pool of the same size, CUDA graphs captured again if there were any."""
        assert self.sleep_level, "wake_up of an engine that is awake"
        if self.sleep_level == 2:
            if reload is None:
                raise InvalidInputError("waking from sleep level 2 needs the weights loaded again")
            refill_weights(self.model, reload(), self._device)
        else:
            restore_weights(self.model, self._device)
        self.runner = ModelRunner(self.model, self.blocks)
        if self._graph_seqs is not None:
            self.capture_graphs(self._graph_seqs)
        self.sleep_level = 0

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
        if (plan.chunks or done) and self._device.type == "cuda":
            launched = torch.cuda.Event()
            launched.record()
            self._launched.append(launched)
            for request in done:
                request.ready = launched
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


def _pool_blocks(
    model: RewardModel, config: EngineConfig, device: torch.device, dtype: torch.dtype, workers: TensorParallelWorkers | None
) -> int:
    """Blocks that fit the configured memory: a GPU fraction, or a size in GB on the CPU."""
    per_block = ModelRunner.bytes_per_block(model, config.block_size, dtype)
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        if workers is not None:  # every rank gets a pool of this size: the GPU with the least free memory decides
            free = min([free, *workers.free_memory])
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
